"""Hidden Calibration: the read is transformers' last hidden state at the answer position on every family,
the centroids and scores equal a plain loop, batching and the fixed prefix change nothing, and the CLI,
the state file and the Python API run it."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import wrap
from safetensors.torch import load_file

import ivlib
from ivlib.cli import main
from ivlib.episodes import sample_episodes, with_demos
from ivlib.experiment import fixed_scores
from ivlib.methods.hc import HiddenCalibration
from ivlib.prompts import PromptEncoder
from ivlib.readout import last_hidden, last_hiddens
from ivlib.scoring import Scorer
from ivlib.tiny import TINY_ARCHS

REPO = Path(__file__).resolve().parent.parent
CLI = ["-c", "config/tiny.yaml", "-t", "review_sentiment", "--method", "hc", "-s", "1", "-e", "8", "-n", "20"]
CLI += ["--batch-size", "4", "--quiet"]


def _episodes(task, n_train=8, n_val=6, shot=1):
    train = sample_episodes(task.splits["train"], 2, shot, n_train, 3, "train/extract")
    val = sample_episodes(task.splits["validation"], 2, shot, n_val, 3, "validation/eval")
    return train, val


def plain_last_hidden(lm, prompt):
    """[D]: transformers' own last hidden state (after the final norm) at the prompt's last token, one
    unpadded prompt at a time."""
    with torch.no_grad():
        out = lm.model(input_ids=torch.tensor([prompt.ids]), output_hidden_states=True)
    return out.hidden_states[-1][0, -1].float()


def plain_fit(lm, encoder, episodes):
    """[C, D] class means of the plain reads of the training prompts, by their queries' labels."""
    per_class = {}
    for episode in episodes:
        p = encoder.encode(episode)
        per_class.setdefault(p.label, []).append(plain_last_hidden(lm, p))
    return torch.stack([torch.stack(per_class[c]).mean(0) for c in range(encoder.n_classes)])


def _fitted(lm, encoder, task, batch_size=4, **settings):
    train, val = _episodes(task)
    hc = HiddenCalibration(**settings)
    hc.fit(Scorer(lm, encoder.label_ids, batch_size, quiet=True), encoder, train)
    return hc, train, val


_archs = {}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_the_read_is_the_last_hidden_state_at_the_answer_position_on_every_family(arch, task):
    if arch not in _archs:
        _archs[arch] = wrap(arch)
    lm = _archs[arch]
    encoder = PromptEncoder(lm.tokenizer, task.label_words, add_bos=True)
    _, val = _episodes(task, shot=2)
    prompts = [encoder.encode(e) for e in val[:4]]
    assert len({len(p.ids) for p in prompts}) > 1  # padded rows: the answer position is each row's own
    reads = last_hiddens(Scorer(lm, encoder.label_ids, 4, quiet=True), prompts, "t")
    plain = torch.stack([plain_last_hidden(lm, p) for p in prompts])
    torch.testing.assert_close(reads, plain, atol=1e-5, rtol=1e-5)
    hc, train, _ = _fitted(lm, encoder, task)
    torch.testing.assert_close(hc.centroids, plain_fit(lm, encoder, train), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_fit_and_scores_equal_a_plain_loop(lm, encoder, task, distance):
    hc, train, val = _fitted(lm, encoder, task, hc_distance=distance)
    centroids = plain_fit(lm, encoder, train)
    torch.testing.assert_close(hc.centroids, centroids, atol=1e-5, rtol=1e-5)
    assert hc.counts.tolist() == np.bincount([e.query.label for e in train], minlength=2).tolist()
    scorer = Scorer(lm, encoder.label_ids, 4, quiet=True)
    prompts = [encoder.encode(e) for e in val]
    scores = scorer.runner.map(prompts, lambda b: hc.predict(scorer, b), "t")
    for row, p in zip(scores, prompts):
        h = plain_last_hidden(lm, p)
        if distance == "l2":
            expected = torch.stack([-torch.dist(h, c) for c in centroids])
        else:
            expected = torch.stack([torch.dot(h, c) / (h.norm() * c.norm()) - 1 for c in centroids])
        torch.testing.assert_close(row, expected, atol=1e-4, rtol=1e-4)
    assert hc.fit_summary() == {"calibration_prompts": 8, "per_class": hc.counts.tolist()}


def test_batched_equals_one_at_a_time(lm, encoder, task):
    one, _, val = _fitted(lm, encoder, task, batch_size=1)
    four, _, _ = _fitted(lm, encoder, task, batch_size=4)
    torch.testing.assert_close(one.centroids, four.centroids, atol=1e-5, rtol=1e-5)
    prompts = [encoder.encode(e) for e in val]
    scores = []
    for size in (1, 4):
        scorer = Scorer(lm, encoder.label_ids, size, quiet=True)
        scores.append(scorer.runner.map(prompts, lambda b: one.predict(scorer, b), "t"))
    torch.testing.assert_close(scores[0], scores[1], atol=1e-4, rtol=1e-4)


def test_fixed_demonstrations_over_the_cached_prefix_equal_whole_prompts(lm, encoder, task):
    hc, train, _ = _fitted(lm, encoder, task)
    assert HiddenCalibration.caches_fixed_prefix
    queries = sample_episodes(task.splits["validation"], 2, 0, 6, 5, "validation/eval")
    prompts = [encoder.encode(e) for e in with_demos(queries, train[0].demos)]
    scorer = Scorer(lm, encoder.label_ids, 4, quiet=True)
    whole = scorer.runner.map(prompts, lambda b: hc.predict(scorer, b), "t")
    torch.testing.assert_close(fixed_scores(hc, scorer, prompts, "t"), whole, atol=1e-4, rtol=1e-4)


def test_a_class_without_a_calibration_query_is_refused(gpt2, task):
    encoder = PromptEncoder(gpt2.tokenizer, task.label_words, add_bos=True)
    train, _ = _episodes(task)
    one_class = [e for e in train if e.query.label == 0]
    with pytest.raises(ivlib.UsageError, match="no calibration query of class 'good'"):
        HiddenCalibration().fit(Scorer(gpt2, encoder.label_ids, 4, quiet=True), encoder, one_class)


# ---- CLI and API ----------------------------------------------------------------------------------
def _records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_cli_records_both_distances_from_one_fit_and_the_state_round_trips(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    results, state = tmp_path / "runs.jsonl", tmp_path / "hc.safetensors"
    argv = CLI + ["-m", "tiny-llama", "--results", str(results)]
    assert main(argv + ["--hc-distance", "l2", "cosine", "--save-vectors", str(state)]) == 0
    assert main(argv + ["--load-vectors", str(state)]) == 0
    l2, cosine, loaded = _records(results)
    assert [r["hyperparameters"]["hc_distance"] for r in (l2, cosine, loaded)] == ["l2", "cosine", "l2"]
    assert l2["fit"]["shared_by_hc_distances"] == ["cosine", "l2"] and l2["fit"]["calibration_prompts"] == 8
    assert l2["hyperparameters"]["shot"] == 1 and l2["n_fit_episodes"] == 8
    assert loaded["metrics"] == l2["metrics"] and loaded["fit"]["loaded_from"] == str(state)
    assert set(load_file(str(state))) == {"centroids", "counts"}


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--hc-distance", "manhattan"], "--hc-distance 'manhattan'"),
        (["-e", "1"], "no calibration query of class"),  # one training query: one class has none
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


def test_a_state_of_another_task_shape_is_refused(tmp_path, monkeypatch, capsys):
    from test_state_spec import _put, _rewrite

    monkeypatch.chdir(REPO)
    state, bad = tmp_path / "hc.safetensors", tmp_path / "bad.safetensors"
    argv = CLI + ["-m", "tiny-gpt2", "--results", str(tmp_path / "fit.jsonl")]
    assert main(argv + ["--save-vectors", str(state)]) == 0
    _rewrite(state, bad, _put("centroids", lambda c: torch.cat([c, c[:1]])))  # three classes
    capsys.readouterr()
    results = tmp_path / "runs.jsonl"
    assert main(CLI + ["-m", "tiny-gpt2", "--results", str(results), "--load-vectors", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tensor 'centroids' has shape [3, 64]" in err, err
    assert not results.exists()


def test_python_api_matches_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    gpt2 = ivlib.wrap(*ivlib.tiny_model("gpt2"), name="tiny-gpt2")
    task = ivlib.load_task("review_sentiment")
    results, cli_file, api_file = tmp_path / "runs.jsonl", tmp_path / "cli.safetensors", tmp_path / "api.safetensors"
    assert main(CLI + ["-m", "tiny-gpt2", "--results", str(results), "--save-vectors", str(cli_file)]) == 0
    (record,) = _records(results)
    method = ivlib.fit("hc", gpt2, task, ext_shot=1, episodes=8, batch_size=4)
    for key, tensor in load_file(str(cli_file)).items():
        assert torch.equal(method.state()[key].cpu(), tensor), key
    assert json.loads(json.dumps(method.fit_info)) == record["fit"]
    result = ivlib.evaluate(method, gpt2, task, split="validation", shot=1, n=20, batch_size=4)
    assert json.loads(json.dumps(result.metrics)) == record["metrics"]
    ivlib.save(method, str(api_file), gpt2, task)
    loaded = ivlib.load(str(api_file), gpt2, task, hc_distance="cosine")
    assert loaded.settings.hc_distance == "cosine" and torch.equal(loaded.centroids, method.centroids)
    cosine = ivlib.evaluate(loaded, gpt2, task, n=20, batch_size=4)
    assert cosine.scores.shape == (20, 2) and bool((cosine.scores <= 0).all())
    prompt = ivlib.encode(gpt2, task, demos=[("a dull film", 0), ("a fine film", 1)], query="a good film")
    scorer = Scorer(gpt2, ivlib.encoder(gpt2, task).label_ids, 4, quiet=True)
    torch.testing.assert_close(last_hidden(scorer, ivlib.batch(gpt2, prompt))[0], plain_last_hidden(gpt2, prompt))


def test_calibration_prompts_have_the_evaluated_prompts_demonstrations(monkeypatch, tmp_path):
    """The paper calibrates on prompts like those it classifies: -s does not apply to HC, --shot and
    --demo-draw do, and the record says the shot used; other methods keep -s."""
    from ivlib.experiment import fit_episodes
    from ivlib.protocol import Protocol

    task = ivlib.load_task("review_sentiment")
    for protocol, demos in ((Protocol.build(shot=2), 4), (Protocol.build(shot=3, demo_draw="any"), 3)):
        shot = protocol.fit_shot(HiddenCalibration, 4)
        train, _ = fit_episodes(task, HiddenCalibration, protocol, shot, 12, 0, 1)
        assert [len(e.demos) for e in train] == [demos] * 12
    assert Protocol.build(shot=2).fit_shot(ivlib.methods.get_method("iv"), 4) == 4
    monkeypatch.chdir(REPO)
    results = tmp_path / "runs.jsonl"
    flags = ["-m", "tiny-gpt2", "--results", str(results), "--shot", "2"]
    assert main([*CLI, *flags]) == 0
    assert main([*CLI, *flags, "--method", "iv", "--strength", "0.1"]) == 0
    hc, iv = _records(results)
    assert (
        hc["hyperparameters"]["ext_shot"] == hc["fit"]["ext_shot"] == 2
        and hc["budget"]["demonstrations_per_query"] == 4
    )
    assert iv["hyperparameters"]["ext_shot"] == 1  # CLI's -s 1
    gpt2 = ivlib.wrap(*ivlib.tiny_model("gpt2"), name="tiny-gpt2")
    assert ivlib.fit("hc", gpt2, task, ext_shot=4, shot=2, episodes=8, batch_size=4).fit_info["ext_shot"] == 2


def test_a_state_loads_only_for_prompts_like_those_it_calibrated_on(monkeypatch, tmp_path, capsys):
    """A state calibrated on 1-shot per-class prompts classifies only those: another --shot or
    --demo-draw is refused by name (not as an -s the command never gave), and the same one loads."""
    monkeypatch.chdir(REPO)
    state, results = tmp_path / "hc.safetensors", tmp_path / "runs.jsonl"
    argv = CLI + ["-m", "tiny-gpt2", "--results", str(results)]
    assert main(argv + ["--save-vectors", str(state)]) == 0
    for flags, needle in (
        (
            ["--shot", "2"],
            "was calibrated on 1-shot prompts and this command evaluates 2-shot ones; accepted: --shot 1",
        ),
        (["--demo-draw", "any"], "was fitted with --demo-draw per-class; this command gives any"),
    ):
        capsys.readouterr()
        assert main(argv + ["--load-vectors", str(state), *flags]) == 2, flags
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
    assert len(_records(results)) == 1  # nothing recorded from a refused load
    assert main(argv + ["--load-vectors", str(state), "--hc-distance", "cosine"]) == 0
    fitted, loaded = _records(results)
    assert loaded["hyperparameters"]["ext_shot"] == fitted["hyperparameters"]["ext_shot"] == 1


def test_the_api_evaluates_a_fit_only_under_the_protocol_it_was_fitted_under():
    gpt2 = ivlib.wrap(*ivlib.tiny_model("gpt2"), name="tiny-gpt2")
    task = ivlib.load_task("review_sentiment")
    method = ivlib.fit("hc", gpt2, task, shot=2, episodes=8, batch_size=4)
    with pytest.raises(ivlib.UsageError, match="calibrated on 2-shot prompts and this evaluation has 1-shot ones"):
        ivlib.evaluate(method, gpt2, task, shot=1, n=4, batch_size=4)
    with pytest.raises(ivlib.UsageError, match="fitted with template='iv'; this evaluation has 'fv'"):
        ivlib.evaluate(method, gpt2, task, shot=2, n=4, batch_size=4, template="fv")
    assert ivlib.evaluate(method, gpt2, task, shot=2, n=4, batch_size=4).scores.shape == (4, 2)
    # what a selection maximised does not change what evaluation computes: not refused
    tv = ivlib.fit("tv", gpt2, task, metric="accuracy", episodes=4, select_episodes=4, batch_size=4)
    assert ivlib.evaluate(tv, gpt2, task, n=4, batch_size=4).scores.shape == (4, 2)


def test_ext_shot_is_not_checked_for_hc_it_does_not_apply(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    results = tmp_path / "runs.jsonl"
    assert main([*CLI, "-m", "tiny-gpt2", "--results", str(results), "-s", "0"]) == 0
    (hc,) = _records(results)
    assert hc["hyperparameters"]["ext_shot"] == hc["hyperparameters"]["shot"] == 1
    assert main([*CLI, "-m", "tiny-gpt2", "--results", str(results), "--method", "iv", "-s", "0"]) == 2


def test_under_fixed_demonstrations_hc_calibrates_on_the_one_set_in_the_evaluated_order(monkeypatch, tmp_path, capsys):
    from ivlib.experiment import demo_set, fit_episodes
    from ivlib.protocol import Protocol

    task = ivlib.load_task("review_sentiment")
    protocol = Protocol.build(shot=2, demos="fixed", demo_order="class")
    the_set = demo_set(task, 2, 1)
    train, _ = fit_episodes(task, HiddenCalibration, protocol, 2, 40, 0, 1, the_set)
    assert train and all(sorted(e.demos, key=lambda d: d.text) == sorted(the_set, key=lambda d: d.text) for e in train)
    assert all([d.label for d in e.demos] == sorted(d.label for d in e.demos) for e in train)  # by class
    assert not {e.query.text for e in train} & {d.text for d in the_set}  # no query meets itself
    iv_train, _ = fit_episodes(task, ivlib.methods.get_method("iv"), protocol, 2, 40, 0, 1, the_set)
    assert len({e.demos for e in iv_train}) > 1  # other methods learn from episodic draws, as before
    monkeypatch.chdir(REPO)
    state, results = tmp_path / "hc.safetensors", tmp_path / "runs.jsonl"
    argv = CLI + ["-m", "tiny-gpt2", "--results", str(results)]
    assert main(argv + ["--demos", "fixed", "--save-vectors", str(state)]) == 0
    capsys.readouterr()
    assert main(argv + ["--load-vectors", str(state)]) == 2
    assert "was fitted with --demos fixed; this command gives episodic" in capsys.readouterr().err
    assert main(argv + ["--demos", "fixed", "--load-vectors", str(state)]) == 0
