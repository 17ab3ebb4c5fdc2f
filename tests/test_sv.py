"""State Vector: the aggregation by hand, the fit against a plain loop, the edit replaces exactly the first
L attention outputs at the last token, the cached L search is exact, batching changes nothing, CLI and API."""

import contextlib
import json
from pathlib import Path

import pytest
import torch
from conftest import wrap
from safetensors.torch import load_file

import ivlib
from ivlib.cli import main
from ivlib.episodes import sample_episodes
from ivlib.hooks import edit_outputs
from ivlib.methods.sv import StateVector, aggregate
from ivlib.prompts import PromptEncoder
from ivlib.scoring import Scorer
from ivlib.tiny import TINY_ARCHS

REPO = Path(__file__).resolve().parent.parent
CLI = ["-c", "config/tiny.yaml", "-t", "review_sentiment", "--method", "sv", "-s", "2", "-e", "6", "-n", "20"]
CLI += ["--select-episodes", "12", "--batch-size", "4", "--quiet"]


def _episodes(task, n_train=6, n_val=10):
    train = sample_episodes(task.splits["train"], 2, 2, n_train, 3, "train/extract")  # 4 demonstrations each
    val = sample_episodes(task.splits["validation"], 2, 1, n_val, 3, "validation/select")
    return train, val


def _fitted(lm, encoder, task, batch_size=4, **settings):
    train, val = _episodes(task)
    sv = StateVector(**settings)
    sv.fit(Scorer(lm, encoder.label_ids, batch_size, quiet=True), encoder, train, val)
    return sv, train, val


# ---- the aggregation ----------------------------------------------------------------------------
def test_aggregate_by_hand_on_a_known_sequence():
    # demonstrations 1, 3, 4, 8 then the query 10; window 3: mean(3, 4, 8, 10) = 6.25;
    # steps 4-3 = 1 (older, weight 0.5) and 8-4 = 4 (weight 1), normalised: 1/3 * 1 + 2/3 * 4 = 3
    states = torch.tensor([1.0, 3.0, 4.0, 8.0, 10.0]).view(1, 5, 1)
    assert aggregate(states, 3, 0.5, 1.0).item() == pytest.approx(9.25)
    assert aggregate(states, 3, 0.5, 0.5).item() == pytest.approx(6.25 + 1.5)
    assert aggregate(states, 3, 0.0, 1.0).item() == pytest.approx(6.25 + 4)  # beta 0: the newest step only
    assert aggregate(states, 1, 0.5, 1.0).item() == pytest.approx(9.0)  # one state and the query: no step
    assert aggregate(states, 99, 1.0, 1.0).item() == pytest.approx(26 / 5 + 7 / 3)  # window clipped to the 4


def test_default_weights_are_the_releases_1_2_4_8_16():
    states = torch.randn(3, 11, 2, 5, generator=torch.Generator().manual_seed(0))  # 10 demonstrations + query
    demos, query = states[:, :10], states[:, 10]
    inner = torch.cat([demos[:, 4:], query[:, None]], 1).mean(1)  # the last 6 and the query
    steps = [demos[:, i] - demos[:, i - 1] for i in range(5, 10)]
    momentum = sum(w * d for w, d in zip([1, 2, 4, 8, 16], steps)) / 31
    torch.testing.assert_close(aggregate(states, 6, 0.5, 1.0), inner + momentum)


# ---- the fit --------------------------------------------------------------------------------------
def plain_fit(lm, encoder, episodes, window, beta, lr):
    """[n_layers, D]: one unpadded forward per episode, hooks reading each attention output at the
    separators, the inner mean and the momentum written out with a Python loop."""
    per_episode = []
    for episode in episodes:
        p = encoder.encode(episode)
        reads = {}

        def hook(layer):
            def fn(_module, _args, output):
                out = output[0] if isinstance(output, tuple) else output
                reads[layer] = out[0, p.sep_pos].float()  # [S, D]

            return fn

        handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(lm.layout.attn_out)]
        with torch.no_grad():
            lm.model(input_ids=torch.tensor([p.ids]))
        for h in handles:
            h.remove()
        layers = []
        for layer in range(lm.layout.n_layers):
            s = reads[layer]
            demos, query = list(s[:-1]), s[-1]
            k = min(window, len(demos))
            recent = demos[-k:]
            inner = (sum(recent) + query) / (k + 1)
            weights = [beta ** (k - 1 - i) for i in range(1, k)]
            steps = sum(w * (recent[i] - recent[i - 1]) for w, i in zip(weights, range(1, k)))
            layers.append(inner + lr * steps / sum(weights) if k > 1 else inner)
        per_episode.append(torch.stack(layers))
    return torch.stack(per_episode).mean(0)


def test_fit_equals_a_plain_loop(lm, encoder, task):
    sv, train, _ = _fitted(lm, encoder, task, sv_window=3, sv_beta=0.7, sv_lr=0.5)
    torch.testing.assert_close(sv.vector, plain_fit(lm, encoder, train, 3, 0.7, 0.5), atol=1e-5, rtol=1e-5)
    assert sv.window == 3 and sv.vector.shape == (lm.layout.n_layers, lm.layout.d_model)


def test_batched_equals_unbatched(lm, encoder, task):
    one, _, val = _fitted(lm, encoder, task, batch_size=1)
    four, _, _ = _fitted(lm, encoder, task, batch_size=4)
    torch.testing.assert_close(one.vector, four.vector, atol=1e-5, rtol=1e-5)
    assert one.layer_scores == four.layer_scores and one.layers == four.layers
    assert one.window == 4  # the default window 6, clipped to the 4 demonstrations
    prompts = [encoder.encode(e) for e in val]
    scores = []
    for bs in (1, 4):
        scorer = Scorer(lm, encoder.label_ids, bs, quiet=True)
        scores.append(scorer.runner.map(prompts, lambda b: one.predict(scorer, b), "t"))
    torch.testing.assert_close(scores[0], scores[1], atol=1e-4, rtol=1e-4)


# ---- the edit ----------------------------------------------------------------------------------
@pytest.mark.parametrize("layers", [1, 2])
def test_edit_replaces_the_last_token_at_the_first_l_attention_outputs(lm, encoder, task, layers):
    sv, _, val = _fitted(lm, encoder, task)
    sv.layers = layers
    scorer = Scorer(lm, encoder.label_ids, 4, quiet=True)
    batch = scorer.batch([encoder.encode(e) for e in val[:3]])
    b, t = batch.input_ids.shape
    rows, cols = torch.arange(b).repeat_interleave(t), torch.arange(t).repeat(b)
    mask = batch.attention_mask.bool()[:, :-1]

    def attn_outputs(edit):
        with edit(), edit_outputs(lm.layout.attn_out, rows, cols, read=True) as sites:
            scorer.forward(batch)
        return [s.value.view(b, t, -1) for s in sites]

    plain = attn_outputs(contextlib.nullcontext)
    edited = attn_outputs(lambda: sv.edit(lm, batch).apply())
    for layer in range(lm.layout.n_layers):
        # earlier positions never change (the edit is at the last token, attention is causal)
        torch.testing.assert_close(edited[layer][:, :-1][mask], plain[layer][:, :-1][mask], atol=1e-5, rtol=1e-5)
        if layer < layers:  # the edited layers hold SV at the last token
            torch.testing.assert_close(edited[layer][:, -1], sv.vector[layer].expand(b, -1), atol=1e-5, rtol=1e-5)
        else:  # a later layer is not written, but sees the edited inputs
            assert not torch.allclose(edited[layer][:, -1], sv.vector[layer].expand(b, -1), atol=1e-6, rtol=0)
            assert not torch.allclose(edited[layer][:, -1], plain[layer][:, -1], atol=1e-7, rtol=0)


def test_cached_l_search_equals_full_forwards(lm, encoder, task):
    sv, _, val = _fitted(lm, encoder, task)
    scorer = Scorer(lm, encoder.label_ids, 4, quiet=True)
    batch = scorer.batch([encoder.encode(e) for e in val[:5]])
    n = lm.layout.n_layers
    cached = scorer.last_token_variants(batch, [sv._edit(scorer, layers) for layers in range(1, n + 1)])
    for layers in range(1, n + 1):
        with scorer.at_last_token(batch, sv._edit(scorer, layers)):
            torch.testing.assert_close(cached[layers - 1], scorer.label_scores(batch), atol=1e-4, rtol=1e-4)
        sv.layers = layers  # and `predict` runs the very edit the search tried
        torch.testing.assert_close(cached[layers - 1], sv.predict(scorer, batch), atol=1e-4, rtol=1e-4)
    assert len(sv.layer_scores) == n
    assert StateVector().fit_summary()["layers_chosen_by"] == "validation"


def test_given_layers_skip_the_search(lm, encoder, task):
    sv, _, _ = _fitted(lm, encoder, task, sv_layers=2)
    assert sv.layers == 2 and sv.layer_scores == [] and sv.fit_summary()["layers_chosen_by"] == "user"


_archs = {}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_family_fits_and_searches_exactly(arch, task):
    if arch not in _archs:
        _archs[arch] = wrap(arch)
    lm = _archs[arch]
    encoder = PromptEncoder(lm.tokenizer, task.label_words, add_bos=True)
    sv, train, val = _fitted(lm, encoder, task)
    torch.testing.assert_close(sv.vector, plain_fit(lm, encoder, train, 6, 0.5, 1.0), atol=1e-4, rtol=1e-4)
    scorer = Scorer(lm, encoder.label_ids, 4, quiet=True)
    batch = scorer.batch([encoder.encode(e) for e in val[:4]])
    cached = scorer.last_token_variants(batch, [sv._edit(scorer, 1), sv._edit(scorer, 2)])
    for layers in (1, 2):
        sv.layers = layers
        torch.testing.assert_close(cached[layers - 1], sv.predict(scorer, batch), atol=1e-4, rtol=1e-4)


# ---- CLI and API ----------------------------------------------------------------------------------
def _records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_cli_records_the_fit_and_vectors_round_trip(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    results, state = tmp_path / "runs.jsonl", tmp_path / "sv.safetensors"
    argv = CLI + ["-m", "tiny-llama", "--results", str(results)]
    assert main(argv + ["--save-vectors", str(state)]) == 0
    assert main(argv + ["--load-vectors", str(state)]) == 0
    fitted, loaded = _records(results)
    fit = fitted["fit"]
    assert fit["layers"] in (1, 2) and len(fit["layer_scores"]) == 2 and fit["layers_chosen_by"] == "validation"
    assert fit["window_used"] == 4 and fit["sv_window"] == 6 and fit["select_episodes"] == 12
    assert fit["layers"] == 1 + max(range(2), key=lambda i: (fit["layer_scores"][i], -i))
    assert loaded["fit"]["layers"] == fit["layers"] and loaded["fit"]["loaded_from"] == str(state)
    assert loaded["metrics"] == fitted["metrics"]
    assert set(load_file(str(state))) == {"vector", "layers", "layer_scores", "window_used"}


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--sv-beta", "2"], "--sv-beta 2"),
        (["--sv-window", "0"], "--sv-window 0"),
        (["--sv-lr", "nan"], "--sv-lr nan"),
        (["--sv-layers", "5"], "--sv-layers 5"),  # the tiny model has 2 layers
        (["--sv-layers", "two"], "'two'"),
    ],
)
def test_bad_settings_exit_2_with_one_line(flags, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    results = tmp_path / "runs.jsonl"
    capsys.readouterr()
    try:
        code = main(CLI + ["-m", "tiny-gpt2", "--results", str(results)] + flags)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err and "Traceback" not in err, err
    assert not results.exists()


def test_python_api_matches_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    gpt2 = ivlib.wrap(*ivlib.tiny_model("gpt2"), name="tiny-gpt2")
    task = ivlib.load_task("review_sentiment")
    results, cli_file = tmp_path / "runs.jsonl", tmp_path / "cli.safetensors"
    assert main(CLI + ["-m", "tiny-gpt2", "--results", str(results), "--save-vectors", str(cli_file)]) == 0
    (record,) = _records(results)
    method = ivlib.fit("sv", gpt2, task, ext_shot=2, episodes=6, select_episodes=12, batch_size=4)
    for key, tensor in load_file(str(cli_file)).items():
        assert torch.equal(method.state()[key].cpu(), tensor), key
    assert json.loads(json.dumps(method.fit_info)) == {
        k: v for k, v in record["fit"].items() if not k.startswith("shared_by")
    }
    result = ivlib.evaluate(method, gpt2, task, split="validation", shot=1, n=20, batch_size=4)
    assert json.loads(json.dumps(result.metrics)) == record["metrics"]
    loaded = ivlib.load(str(cli_file), gpt2, task)
    assert json.loads(json.dumps(ivlib.evaluate(loaded, gpt2, task, n=20, batch_size=4).metrics)) == record["metrics"]
    prompt = ivlib.encode(gpt2, task, demos=[(task.splits["validation"].texts[0], 0)], query="a fine film")
    batch = ivlib.batch(gpt2, prompt)
    with torch.no_grad(), ivlib.steer(method, gpt2, prompt) as steered:  # the steering API runs its edit
        logits = gpt2.model(input_ids=steered.input_ids, attention_mask=steered.attention_mask).logits[:, -1]
    scorer = Scorer(gpt2, ivlib.encoder(gpt2, task).label_ids, 4, quiet=True)
    torch.testing.assert_close(
        torch.log_softmax(logits.float(), -1)[:, scorer.label_ids], method.predict(scorer, batch)
    )
