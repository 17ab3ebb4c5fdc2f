"""The trained probe: its training examples are the run's distinct labeled examples, its regression and C
equal scikit-learn's fitted by hand on transformers' last hidden states, batching changes nothing, it runs
on every family, and the CLI, the state file, the Python API and data parallel (with ICV and HC) agree."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import wrap
from dp_driver import how_far
from safetensors.torch import load_file
from test_hc import plain_last_hidden

import ivlib
from ivlib.cli import main
from ivlib.episodes import Episode, Example, sample_episodes
from ivlib.methods.probe import C_GRID, Probe, distinct_examples, logistic_regression
from ivlib.metrics import f1_scores
from ivlib.prompts import PromptEncoder
from ivlib.readout import last_hiddens
from ivlib.scoring import Scorer
from ivlib.tiny import TINY_ARCHS

REPO = Path(__file__).resolve().parent.parent
CLI = ["-c", "config/tiny.yaml", "-t", "review_sentiment", "--method", "probe", "-s", "1", "-e", "6", "-n", "20"]
CLI += ["--select-episodes", "12", "--batch-size", "4", "--quiet"]


def _episodes(task, n_train=6, n_val=12):
    train = sample_episodes(task.splits["train"], 2, 1, n_train, 3, "train/extract")
    val = sample_episodes(task.splits["validation"], 2, 1, n_val, 3, "validation/select")
    return train, val


def _fitted(lm, encoder, task, batch_size=4, **settings):
    train, val = _episodes(task)
    probe = Probe(**settings)
    probe.fit(Scorer(lm, encoder.label_ids, batch_size, quiet=True), encoder, train, val)
    return probe, train, val


def plain_features(lm, encoder, examples):
    """[N, D] float64: each example's zero-shot prompt, unpadded, read by transformers."""
    return torch.stack([plain_last_hidden(lm, encoder.encode(Episode((), x))) for x in examples]).double().numpy()


def plain_fit(lm, encoder, train, val):
    """(the scikit-learn model, mean, scale, chosen C, validation macro-F1 per C), all written out.

    The features are checked against transformers' own reads, then the batched reads themselves are
    used: a nearly unregularised fit (C = 1e4 on a few separable examples) is ill-conditioned, so reads
    that agree to 1e-7 may still flip a validation prediction between two solvers' stopping points."""
    from sklearn.linear_model import LogisticRegression

    seen, examples = set(), []
    for episode in train:  # demonstrations in prompt order, then the query; each example once
        for x in (*episode.demos, episode.query):
            if x not in seen:
                seen.add(x)
                examples.append(x)
    scorer = Scorer(lm, encoder.label_ids, 4, quiet=True)
    reads = last_hiddens(scorer, [encoder.encode(Episode((), x)) for x in examples], "t").double().numpy()
    np.testing.assert_allclose(reads, plain_features(lm, encoder, examples), atol=1e-5, rtol=1e-5)
    features, labels = reads, np.array([x.label for x in examples])
    mean, scale = features.mean(0), features.std(0)
    scale[scale == 0] = 1
    val_features = last_hiddens(scorer, [encoder.encode(e.query_only()) for e in val], "t").double().numpy()
    np.testing.assert_allclose(val_features, plain_features(lm, encoder, [e.query for e in val]), atol=1e-5, rtol=1e-5)
    val_labels = np.array([e.query.label for e in val])
    models, scores = [], []
    for c in C_GRID:
        model = LogisticRegression(C=c, tol=1e-8, max_iter=10_000).fit((features - mean) / scale, labels)
        scores.append(f1_scores(val_labels, model.predict((val_features - mean) / scale), 2)["macro"])
        models.append(model)
    best = max(range(len(C_GRID)), key=lambda i: (scores[i], -i))
    return models[best], mean, scale, C_GRID[best], scores


def test_the_training_examples_are_every_distinct_demonstration_and_query():
    a, b, c, d = (Example(t, y) for t, y in [("a", 0), ("b", 1), ("c", 0), ("d", 1)])
    episodes = [Episode((b, a), c), Episode((a, d), b), Episode((c, b), a)]
    assert distinct_examples(episodes) == [b, a, c, d]
    assert Probe(probe_examples=3).training_examples(episodes, ["x", "y"]) == [b, a, c]
    with pytest.raises(ivlib.UsageError, match="no example of class 'x'"):
        Probe(probe_examples=1).training_examples(episodes, ["x", "y"])


@pytest.mark.parametrize("n_classes", [2, 3])
def test_the_kept_regression_gives_scikit_learns_probabilities(n_classes):
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 5)), np.arange(40) % n_classes
    x[:, 0] += y  # learnable
    weight, bias, converged = logistic_regression(x, y, 0.5, n_classes)
    model = LogisticRegression(C=0.5, tol=1e-8, max_iter=10_000).fit(x, y)
    z = torch.from_numpy(x @ weight.T + bias)
    np.testing.assert_allclose(torch.log_softmax(z, -1).numpy(), model.predict_log_proba(x), atol=1e-10)
    assert weight.shape == (n_classes, 5) and converged


def test_fit_and_scores_equal_scikit_learn_by_hand(lm, encoder, task):
    probe, train, val = _fitted(lm, encoder, task)
    model, mean, scale, c, scores = plain_fit(lm, encoder, train, val)
    assert probe.c == c and probe.c_scores == pytest.approx(scores) and probe.converged
    torch.testing.assert_close(probe.mean, torch.from_numpy(mean).float())
    torch.testing.assert_close(probe.scale, torch.from_numpy(scale).float())
    assert probe.counts == np.bincount([x.label for x in distinct_examples(train)], minlength=2).tolist()
    queries = sample_episodes(task.splits["validation"], 2, 0, 8, 9, "validation/eval")
    prompts = [encoder.encode(e) for e in queries]
    scorer = Scorer(lm, encoder.label_ids, 4, quiet=True)
    scores = scorer.runner.map(prompts, lambda b: probe.predict(scorer, b), "t")
    expected = model.predict_log_proba((plain_features(lm, encoder, [e.query for e in queries]) - mean) / scale)
    torch.testing.assert_close(scores, torch.from_numpy(expected).float(), atol=1e-4, rtol=1e-4)
    summary = probe.fit_summary()
    assert summary["examples"] == len(distinct_examples(train)) and summary["c_chosen_by"] == "validation"
    assert [c for c, _ in summary["c_scores"]] == list(C_GRID)


def test_a_given_c_skips_the_search_and_fewer_examples_are_a_smaller_budget(gpt2, task):
    encoder = PromptEncoder(gpt2.tokenizer, task.label_words, add_bos=True)
    train, _ = _episodes(task)
    probe = Probe(probe_c=0.3, probe_examples=5)
    probe.fit(Scorer(gpt2, encoder.label_ids, 4, quiet=True), encoder, train)  # no validation needed
    assert probe.c == 0.3 and probe.c_scores == [] and sum(probe.counts) == 5
    assert probe.fit_summary()["c_chosen_by"] == "user" and probe.fit_summary()["c_scores"] == []
    with pytest.raises(ValueError, match="validation"):
        Probe().fit(Scorer(gpt2, encoder.label_ids, 4, quiet=True), encoder, train)


def test_batched_equals_one_at_a_time(lm, encoder, task):
    one, _, val = _fitted(lm, encoder, task, batch_size=1)
    four, _, _ = _fitted(lm, encoder, task, batch_size=4)
    assert one.c == four.c and one.c_scores == pytest.approx(four.c_scores, abs=1e-9)
    torch.testing.assert_close(one.weight, four.weight, atol=1e-4, rtol=1e-4)
    prompts = [encoder.encode(e.query_only()) for e in val]
    scores = []
    for size in (1, 4):
        scorer = Scorer(lm, encoder.label_ids, size, quiet=True)
        scores.append(scorer.runner.map(prompts, lambda b: one.predict(scorer, b), "t"))
    torch.testing.assert_close(scores[0], scores[1], atol=1e-4, rtol=1e-4)


_archs = {}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_family_fits_on_its_last_hidden_state(arch, task):
    if arch not in _archs:
        _archs[arch] = wrap(arch)
    lm = _archs[arch]
    encoder = PromptEncoder(lm.tokenizer, task.label_words, add_bos=True)
    train, _ = _episodes(task)
    probe = Probe(probe_c=1.0)
    scorer = Scorer(lm, encoder.label_ids, 4, quiet=True)
    probe.fit(scorer, encoder, train)
    examples = distinct_examples(train)
    torch.testing.assert_close(probe.mean.double(), torch.from_numpy(plain_features(lm, encoder, examples).mean(0)))
    batch = scorer.batch([encoder.encode(e.query_only()) for e in train[:4]])
    features = torch.from_numpy(plain_features(lm, encoder, [e.query for e in train[:4]])).float()
    expected = torch.log_softmax(((features - probe.mean) / probe.scale) @ probe.weight.T + probe.bias, -1)
    torch.testing.assert_close(probe.predict(scorer, batch), expected, atol=1e-4, rtol=1e-4)


# ---- CLI and API ----------------------------------------------------------------------------------
def _records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_cli_records_the_fit_and_the_state_round_trips(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    results, state = tmp_path / "runs.jsonl", tmp_path / "probe.safetensors"
    argv = CLI + ["-m", "tiny-llama", "--results", str(results)]
    assert main(argv + ["--save-vectors", str(state)]) == 0
    assert main(argv + ["--load-vectors", str(state)]) == 0
    fitted, loaded = _records(results)
    fit = fitted["fit"]
    assert fitted["hyperparameters"]["shot"] == 0 and fit["select_episodes"] == 12
    assert fit["c"] in C_GRID and len(fit["c_scores"]) == len(C_GRID) and fit["examples"] == sum(fit["per_class"])
    best = max(fit["c_scores"], key=lambda cs: cs[1])[1]
    assert fit["c"] == next(c for c, s in fit["c_scores"] if s == best)  # the smallest C of the best
    assert loaded["metrics"] == fitted["metrics"] and loaded["fit"]["c"] == fit["c"]
    assert set(load_file(str(state))) == {"mean", "scale", "weight", "bias", "c", "c_scores", "counts", "converged"}


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--probe-c", "0"], "--probe-c 0"),
        (["--probe-c", "big"], "--probe-c 'big'"),
        (["--probe-examples", "0"], "--probe-examples 0"),
        (["--probe-examples", "1"], "no example of class"),
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


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda t: {**t, "weight": t["weight"][:, :32]}, "differ in width"),
        (lambda t: {**t, "converged": torch.tensor(2)}, "tensor 'converged' holds 2"),
        (lambda t: {**t, "scale": torch.zeros_like(t["scale"])}, "not positive"),
    ],
)
def test_a_state_that_does_not_fit_is_refused(edit, needle, tmp_path, monkeypatch, capsys):
    from test_state_spec import _rewrite

    monkeypatch.chdir(REPO)
    state, bad = tmp_path / "probe.safetensors", tmp_path / "bad.safetensors"
    argv = CLI + ["-m", "tiny-gpt2"]
    assert main(argv + ["--results", str(tmp_path / "fit.jsonl"), "--save-vectors", str(state)]) == 0
    _rewrite(state, bad, edit)
    capsys.readouterr()
    results = tmp_path / "runs.jsonl"
    assert main(argv + ["--results", str(results), "--load-vectors", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not results.exists()


def test_python_api_matches_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    gpt2 = ivlib.wrap(*ivlib.tiny_model("gpt2"), name="tiny-gpt2")
    task = ivlib.load_task("review_sentiment")
    results, cli_file, api_file = tmp_path / "runs.jsonl", tmp_path / "cli.safetensors", tmp_path / "api.safetensors"
    assert main(CLI + ["-m", "tiny-gpt2", "--results", str(results), "--save-vectors", str(cli_file)]) == 0
    (record,) = _records(results)
    method = ivlib.fit("probe", gpt2, task, ext_shot=1, episodes=6, select_episodes=12, batch_size=4)
    for key, tensor in load_file(str(cli_file)).items():
        assert torch.equal(method.state()[key].cpu(), tensor), key
    assert json.loads(json.dumps(method.fit_info)) == record["fit"]
    result = ivlib.evaluate(method, gpt2, task, split="validation", n=20, batch_size=4)
    assert json.loads(json.dumps(result.metrics)) == record["metrics"]
    assert all(len(e.demos) == 0 for e in result.episodes)  # the probe reads the query alone
    ivlib.save(method, str(api_file), gpt2, task)
    loaded = ivlib.load(str(api_file), gpt2, task)
    assert json.loads(json.dumps(ivlib.evaluate(loaded, gpt2, task, n=20, batch_size=4).metrics)) == record["metrics"]
    with pytest.raises(ivlib.UsageError, match="fitted with probe_c=None"):  # a fitting setting is the file's
        ivlib.load(str(api_file), gpt2, task, probe_c=2.0)


# ---- data parallel: the three new methods in one launch ---------------------------------------------
def test_two_processes_write_the_records_of_one(tmp_path, monkeypatch):
    from test_distributed import COMMON, FIT, _records, _torchrun

    cases = {
        "probe": COMMON + FIT + ["--method", "probe", "--select-episodes", "10"],
        "hc": COMMON + FIT + ["--method", "hc", "--hc-distance", "l2", "cosine"],
        "icv": COMMON + FIT + ["--method", "icv", "--icv-sets", "3", "--icv-strength", "0.5"],
    }
    monkeypatch.chdir(REPO)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's workers run
    try:
        for name, argv in cases.items():
            assert main(argv + ["--results", str(tmp_path / f"{name}.one.jsonl")]) == 0
    finally:
        torch.set_num_threads(threads)
    launch = {name: argv + ["--results", str(tmp_path / f"{name}.jsonl")] for name, argv in cases.items()}
    (tmp_path / "cases.json").write_text(json.dumps(launch))
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)  # the launcher sets it
    done = _torchrun(["tests/dp_driver.py", str(tmp_path / "cases.json"), str(tmp_path)], env={"PYTHONPATH": path})
    assert done.returncode == 0, how_far(tmp_path, done.stderr)
    for name in cases:
        assert (tmp_path / f"{name}.0.rc").read_text() == "0" == (tmp_path / f"{name}.1.rc").read_text(), name
        one = _records(tmp_path / f"{name}.one.jsonl")
        assert one and _records(tmp_path / f"{name}.jsonl") == one, name
        assert (tmp_path / f"{name}.1.out").read_text() == ""  # the other process prints nothing
