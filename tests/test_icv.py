"""In-Context Vectors: the principal direction and the norm-preserving shift by hand, the extraction equals a
plain loop on every family, the shift lands on every position of every MLP output, batching changes
nothing, and the CLI, the state file, the Python API and `ivlib.steer` run it."""

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import wrap
from safetensors.torch import load_file

import ivlib
from ivlib.cli import main
from ivlib.episodes import Episode, sample_episodes
from ivlib.hooks import watch_outputs
from ivlib.methods.icv import InContextVectors, icv_shift, principal_direction
from ivlib.prompts import PromptEncoder
from ivlib.scoring import Scorer
from ivlib.tiny import TINY_ARCHS

REPO = Path(__file__).resolve().parent.parent
CLI = ["-c", "config/tiny.yaml", "-t", "review_sentiment", "--method", "icv", "-s", "2", "-e", "4", "-n", "20"]
CLI += ["--icv-sets", "2", "--icv-strength", "2", "--batch-size", "4", "--quiet"]
STRENGTH = 2.0  # a random tiny model needs a large step for the scores to move visibly


def _episodes(task, n_train=4, n_val=8):
    train = sample_episodes(task.splits["train"], 2, 2, n_train, 3, "train/extract")  # 4 demonstrations each
    val = sample_episodes(task.splits["validation"], 2, 0, n_val, 3, "validation/eval")
    return train, val


def _fitted(lm, encoder, task, batch_size=4, **settings):
    train, val = _episodes(task)
    icv = InContextVectors(**{"icv_sets": 2, "icv_strength": STRENGTH, **settings})
    icv.fit(Scorer(lm, encoder.label_ids, batch_size, quiet=True), encoder, train)
    return icv, train, val


# ---- the two formulas -----------------------------------------------------------------------------
def test_principal_direction_is_the_top_eigenvector_with_the_releases_sign():
    rng = np.random.default_rng(0)
    deltas = rng.normal(size=(6, 10)) + rng.normal(size=10)
    direction, mean, share = principal_direction(torch.from_numpy(deltas).float())
    centred = deltas - deltas.mean(0)
    values, vectors = np.linalg.eigh(centred.T @ centred)  # ascending
    top = vectors[:, -1]
    np.testing.assert_allclose(abs(direction.numpy() @ top), 1, atol=1e-5)  # the same axis, unit norm
    projections = centred @ direction.numpy()
    assert projections[np.abs(projections).argmax()] > 0  # the furthest demonstration projects positively
    np.testing.assert_allclose(mean.numpy(), deltas.mean(0), atol=1e-6)
    assert share == pytest.approx(values[-1] / values.sum(), rel=1e-5)
    one, mean_one, share_one = principal_direction(torch.ones(1, 4))  # no variance: the mean alone
    assert torch.equal(one, torch.zeros(4)) and torch.equal(mean_one, torch.ones(4)) and share_one == 0
    same, _, share_same = principal_direction(torch.ones(3, 4))
    assert torch.equal(same, torch.zeros(4)) and share_same == 0


def test_the_shift_is_the_releases_layer_written_out():
    rng = np.random.default_rng(1)
    hidden, v = rng.normal(size=(2, 3, 8)), rng.normal(size=8)
    out = icv_shift(torch.from_numpy(hidden).float(), torch.from_numpy(v).float(), 0.3).numpy()
    unit = v / np.linalg.norm(v)
    for b in range(2):
        for t in range(3):
            x = hidden[b, t]
            cos_away = max(0.0, float(x @ -unit) / np.linalg.norm(x))
            y = x / np.linalg.norm(x) + 0.3 * (1 + cos_away) * unit
            np.testing.assert_allclose(out[b, t], y / np.linalg.norm(y) * np.linalg.norm(x), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(hidden, axis=-1), rtol=1e-5)
    same = icv_shift(torch.from_numpy(hidden).float(), torch.from_numpy(v).float(), 0.0).numpy()
    np.testing.assert_allclose(same, hidden, atol=1e-5)  # strength 0: no shift


# ---- the extraction -------------------------------------------------------------------------------
def plain_fit(lm, encoder, episodes, pair):
    """[L, D]: each distinct demonstration's input and output prompts, unpadded, one forward each, every
    block's output read at the last token; the differences' top principal direction plus their mean."""
    seen, deltas = [], []
    for episode in episodes:
        for demo in episode.demos:
            if demo in seen:
                continue
            seen.append(demo)
            x = encoder.encode(Episode((), demo)).ids
            answer = encoder.label_words[demo.label]
            y_text = answer if pair == "separate" else encoder.truncate(demo.text) + "\n" + answer
            y = encoder.bos + encoder.tok(y_text, add_special_tokens=False)["input_ids"]
            deltas.append((_block_reads(lm, y) - _block_reads(lm, x)).reshape(-1))
    rows = np.stack(deltas)
    centred = rows - rows.mean(0)
    u, s, vh = np.linalg.svd(centred, full_matrices=False)
    direction = vh[0] * np.sign(u[np.abs(u[:, 0]).argmax(), 0])
    return torch.from_numpy(direction + rows.mean(0)).float().view(lm.layout.n_layers, -1)


def _block_reads(lm, ids):
    reads = {}

    def hook(layer):
        def fn(_module, _args, output):
            reads[layer] = (output[0] if isinstance(output, tuple) else output)[0, -1].double().numpy()

        return fn

    handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(lm.layout.blocks)]
    with torch.no_grad():
        lm.model(input_ids=torch.tensor([ids]))
    for h in handles:
        h.remove()
    return np.stack([reads[i] for i in range(len(lm.layout.blocks))])


@pytest.mark.parametrize("pair", ["separate", "joined"])
def test_fit_equals_a_plain_loop(lm, encoder, task, pair):
    icv, train, _ = _fitted(lm, encoder, task, icv_pair=pair)
    torch.testing.assert_close(icv.vector, plain_fit(lm, encoder, train[:2], pair), atol=1e-4, rtol=1e-4)
    assert icv.n_demos == len(dict.fromkeys(d for e in train[:2] for d in e.demos))
    assert icv.fit_summary()["demonstrations"] == icv.n_demos and 0 < icv.explained <= 1


def test_batched_equals_one_at_a_time(lm, encoder, task):
    one, _, val = _fitted(lm, encoder, task, batch_size=1)
    four, _, _ = _fitted(lm, encoder, task, batch_size=4)
    torch.testing.assert_close(one.vector, four.vector, atol=1e-5, rtol=1e-5)
    prompts = [encoder.encode(e) for e in val]
    scores = []
    for size in (1, 4):
        scorer = Scorer(lm, encoder.label_ids, size, quiet=True)
        scores.append(scorer.runner.map(prompts, lambda b: one.predict(scorer, b), "t"))
    torch.testing.assert_close(scores[0], scores[1], atol=1e-4, rtol=1e-4)


def test_the_shift_lands_on_every_position_of_every_mlp_output(lm, encoder, task):
    icv, _, val = _fitted(lm, encoder, task)
    scorer = Scorer(lm, encoder.label_ids, 4, quiet=True)
    batch = scorer.batch([encoder.encode(e) for e in val[:4]])
    modules = lm.layout.mlp_out

    def outputs(edit):
        """Each MLP's output as it left the module ([B, T, D]), and as the rest of the model saw it."""
        raw, seen = {}, {}
        with (
            watch_outputs(modules, lambda i, h: raw.__setitem__(i, h.clone())),  # installed first: runs first
            edit(),
            watch_outputs(modules, lambda i, h: seen.__setitem__(i, h.clone())),
        ):
            scorer.forward(batch)
        return raw, seen

    plain, plain_seen = outputs(contextlib.nullcontext)
    raw, seen = outputs(lambda: icv.edit(lm, batch).apply())
    vector = icv.vector
    for layer in range(lm.layout.n_layers):
        torch.testing.assert_close(plain_seen[layer], plain[layer], atol=0, rtol=0)  # unedited: untouched
        expected = icv_shift(raw[layer], vector[layer], STRENGTH)  # every position, pads included
        torch.testing.assert_close(seen[layer], expected, atol=1e-5, rtol=1e-5)
        moved = (seen[layer] - raw[layer]).norm(dim=-1)[batch.attention_mask.bool()]
        assert bool((moved > 1e-4).all())  # every real position is shifted
    torch.testing.assert_close(raw[0], plain[0], atol=1e-5, rtol=1e-5)  # nothing before the first MLP changes
    assert not torch.allclose(raw[1], plain[1], atol=1e-4)  # later MLPs see the shifted stream


_archs = {}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_family_extracts_exactly_and_scores_batched_as_alone(arch, task):
    if arch not in _archs:
        _archs[arch] = wrap(arch)
    lm = _archs[arch]
    encoder = PromptEncoder(lm.tokenizer, task.label_words, add_bos=True)
    icv, train, val = _fitted(lm, encoder, task)
    torch.testing.assert_close(icv.vector, plain_fit(lm, encoder, train[:2], "separate"), atol=1e-4, rtol=1e-4)
    prompts = [encoder.encode(e) for e in val[:4]]
    scores = []
    for size in (1, 4):
        scorer = Scorer(lm, encoder.label_ids, size, quiet=True)
        scores.append(scorer.runner.map(prompts, lambda b: icv.predict(scorer, b), "t"))
    torch.testing.assert_close(scores[0], scores[1], atol=1e-4, rtol=1e-4)
    plain = Scorer(lm, encoder.label_ids, 4, quiet=True).runner.map(prompts, lambda b: scorer.label_scores(b), "t")
    assert not torch.allclose(scores[1], plain, atol=1e-4)  # the shift reaches the scores on this family


# ---- CLI and API ----------------------------------------------------------------------------------
def _records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_cli_shares_one_extraction_between_strengths_and_the_state_round_trips(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    results, state = tmp_path / "runs.jsonl", tmp_path / "icv.safetensors"
    argv = CLI + ["-m", "tiny-llama", "--results", str(results)]
    assert main(argv + ["--icv-strength", "0", "2", "--save-vectors", str(state)]) == 0
    assert main(argv + ["--load-vectors", str(state)]) == 0
    zero, two, loaded = _records(results)
    assert [r["hyperparameters"]["icv_strength"] for r in (zero, two, loaded)] == [0.0, 2.0, 2.0]
    assert zero["fit"]["shared_by_icv_strengths"] == [0.0, 2.0] and zero["hyperparameters"]["shot"] == 0
    assert zero["fit"]["demonstrations"] == 8 and zero["fit"]["icv_pair"] == "separate"
    assert loaded["metrics"] == two["metrics"] and loaded["fit"]["loaded_from"] == str(state)
    assert set(load_file(str(state))) == {"principal", "mean", "explained_variance_ratio", "demonstrations"}
    zero_shot = tmp_path / "zero-shot.jsonl"  # strength 0 keeps every activation: the plain zero-shot run
    flags = [
        "-c",
        "config/tiny.yaml",
        "-t",
        "review_sentiment",
        "-m",
        "tiny-llama",
        "--method",
        "zero-shot",
        "-n",
        "20",
    ]
    assert main(flags + ["--batch-size", "4", "--quiet", "--results", str(zero_shot)]) == 0
    assert _records(zero_shot)[0]["metrics"] == zero["metrics"]


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--icv-strength", "-1"], "--icv-strength -1"),
        (["--icv-strength", "nan"], "--icv-strength nan"),
        (["--icv-pair", "both"], "--icv-pair 'both'"),
        (["--icv-sets", "0"], "--icv-sets 0"),
    ],
)
def test_bad_settings_exit_2_with_one_line(flags, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    results = tmp_path / "runs.jsonl"
    capsys.readouterr()
    code = main(CLI + ["-m", "tiny-gpt2", "--results", str(results)] + flags)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err and "Traceback" not in err, err
    assert not results.exists()


def test_a_state_of_another_model_shape_is_refused(tmp_path, monkeypatch, capsys):
    from test_state_spec import _put, _rewrite

    monkeypatch.chdir(REPO)
    state, bad = tmp_path / "icv.safetensors", tmp_path / "bad.safetensors"
    argv = CLI + ["-m", "tiny-gpt2"]
    assert main(argv + ["--results", str(tmp_path / "fit.jsonl"), "--save-vectors", str(state)]) == 0
    _rewrite(state, bad, _put("mean", lambda v: v[:1]))
    capsys.readouterr()
    results = tmp_path / "runs.jsonl"
    assert main(argv + ["--results", str(results), "--load-vectors", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tensor 'mean' has shape [1, 64]" in err, err
    assert not results.exists()


def test_python_api_matches_the_cli_and_steers(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    gpt2 = ivlib.wrap(*ivlib.tiny_model("gpt2"), name="tiny-gpt2")
    task = ivlib.load_task("review_sentiment")
    results, cli_file, api_file = tmp_path / "runs.jsonl", tmp_path / "cli.safetensors", tmp_path / "api.safetensors"
    assert main(CLI + ["-m", "tiny-gpt2", "--results", str(results), "--save-vectors", str(cli_file)]) == 0
    (record,) = _records(results)
    method = ivlib.fit("icv", gpt2, task, ext_shot=2, episodes=4, batch_size=4, icv_sets=2, icv_strength=STRENGTH)
    for key, tensor in load_file(str(cli_file)).items():
        assert torch.equal(method.state()[key].cpu(), tensor), key
    assert json.loads(json.dumps(method.fit_info)) == record["fit"]
    result = ivlib.evaluate(method, gpt2, task, split="validation", n=20, batch_size=4)
    assert json.loads(json.dumps(result.metrics)) == record["metrics"]
    ivlib.save(method, str(api_file), gpt2, task)
    loaded = ivlib.load(str(api_file), gpt2, task, icv_strength=STRENGTH)
    assert json.loads(json.dumps(ivlib.evaluate(loaded, gpt2, task, n=20, batch_size=4).metrics)) == record["metrics"]

    prompt = ivlib.encode(gpt2, task, query="a fine film")
    batch = ivlib.batch(gpt2, prompt)
    scorer = Scorer(gpt2, ivlib.encoder(gpt2, task).label_ids, 4, quiet=True)
    predicted = method.predict(scorer, batch)

    def label_logprobs(ids):
        with torch.no_grad():
            logits = gpt2.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1]
        return torch.log_softmax(logits.float(), -1)[:, scorer.label_ids]

    with ivlib.steer(method, gpt2, prompt) as steered:  # the shift at every position of the prompt
        torch.testing.assert_close(label_logprobs(steered.input_ids), predicted, atol=1e-5, rtol=1e-5)
    with ivlib.steer(method, gpt2, every_position=True):  # the same: ICV has no positions of its own
        torch.testing.assert_close(label_logprobs(batch.input_ids), predicted, atol=1e-5, rtol=1e-5)
    plain = label_logprobs(batch.input_ids)  # outside the blocks: unsteered again
    assert not torch.allclose(plain, predicted, atol=1e-4)
    ids = batch.input_ids
    greedy = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    with ivlib.steer(method, gpt2, every_position=True, icv_strength=50.0):  # generated tokens are shifted too
        generated = gpt2.model.generate(ids, **greedy)
    assert not torch.equal(generated, gpt2.model.generate(ids, **greedy))
    modules = [gpt2.model, *gpt2.layout.blocks, *gpt2.layout.mlp_out]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in modules)
