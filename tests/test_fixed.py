"""--demos fixed: one demonstration set per seed, its prefix encoded once, scores equal to whole prompts."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import wrap
from test_multiple_choice import MC_SPEC, write_csqa

from ivlib.api import evaluate, task_from_lists
from ivlib.cli import main
from ivlib.episodes import sample_episodes, with_demos
from ivlib.errors import UsageError
from ivlib.experiment import Experiment, RunSpec, demo_set, evaluation_episodes, fixed_scores
from ivlib.kvcache import expand_rows, read_kv
from ivlib.methods import METHODS, Method
from ivlib.methods.dt import DeepThinking
from ivlib.methods.fv import FunctionVectors
from ivlib.methods.icl import ICL
from ivlib.methods.iv import IterativeVectors
from ivlib.methods.sv import StateVector
from ivlib.methods.tv import TaskVectors
from ivlib.metrics import selection_score
from ivlib.prompts import PromptEncoder, split_prefix
from ivlib.samples import read_samples
from ivlib.scoring import Scorer
from ivlib.selection import select_best
from ivlib.tasks import load_task
from ivlib.tiny import TINY_ARCHS

_models = {}


def tiny(arch):
    if arch not in _models:
        _models[arch] = wrap(arch)
    return _models[arch]


def _fitted(name, lm, n_classes):
    """Each method with a random but fixed state, so the edits are large enough to matter."""
    g = torch.Generator().manual_seed(3)
    layout = lm.layout
    if name == "icl":
        return ICL()
    if name == "iv":
        iv = IterativeVectors(strength=1.0)
        iv.vectors = torch.randn(layout.n_layers, n_classes + 1, layout.d_model, generator=g)
        return iv
    if name == "tv":
        tv = TaskVectors()
        tv.theta, tv.layer = torch.randn(layout.n_layers, layout.d_model, generator=g), 1
        return tv
    if name == "sv":
        sv = StateVector()
        sv.vector, sv.layers = torch.randn(layout.n_layers, layout.d_model, generator=g), 2
        return sv
    if name == "fv":
        fv = FunctionVectors()
        fv.vector, fv.layer = torch.randn(layout.d_model, generator=g), 0
        return fv
    dt = DeepThinking(dt_eta=1.0, dt_step=3)
    dt.step = 3
    return dt


def _prompts(lm, task, shot=2, n=6, seed=1):
    encoder = PromptEncoder(lm.tokenizer, task.label_words, add_bos=True)
    demos = demo_set(task, shot, seed)
    episodes = with_demos(sample_episodes(task.splits["validation"], 2, 0, n, seed, "validation/eval"), demos)
    return encoder, [encoder.encode(e) for e in episodes]


@pytest.mark.parametrize("name", ["icl", "iv", "dt", "tv", "fv", "sv"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_cached_prefix_scores_equal_whole_prompts(arch, name, task):
    lm = tiny(arch)
    encoder, prompts = _prompts(lm, task)
    method = _fitted(name, lm, encoder.n_classes)
    scorer = Scorer(lm, encoder.label_ids, 4, quiet=True)  # 6 queries: batches of 4 and 2, padded
    try:
        whole = scorer.runner.map(prompts, lambda b: method.predict(scorer, b), "whole")
    except UsageError as exc:  # DT refuses a sliding-window cache (mistral): the cached path refuses alike
        with pytest.raises(UsageError, match="cannot be tuned"):
            fixed_scores(method, scorer, prompts, "cached")
        assert "cannot be tuned" in str(exc)
        return
    calls = []
    encode = scorer.encode_prefix
    scorer.encode_prefix = lambda batch: calls.append(batch.input_ids.shape) or encode(batch)
    cached = fixed_scores(method, scorer, prompts, "cached")
    if name != "dt":  # DT tunes its own cache; the others encode the prefix once, for all six queries
        assert calls == [torch.Size([1, prompts[0].query_start])]
    torch.testing.assert_close(cached, whole, atol=2e-4, rtol=1e-4)
    other = _fitted("icl", lm, encoder.n_classes)
    if name != "icl":  # the method's edits are in the cached scores: they differ from plain ICL's
        assert (fixed_scores(other, scorer, prompts, "icl") - cached).abs().max() > 1e-3


# ---- the one demonstration set ----------------------------------------------------------------------
def test_fixed_set_is_stratified_seeded_and_shared_by_every_query(task):
    sets = {seed: demo_set(task, 3, seed) for seed in (1, 2, 3, 4)}
    for demos in sets.values():
        assert sorted(d.label for d in demos) == [0, 0, 0, 1, 1, 1]
        assert all(d.text == task.splits["train"].texts[d.index] for d in demos)  # drawn from train
    assert len({tuple(d.index for d in demos) for demos in sets.values()}) == 4  # differs across seeds
    assert demo_set(task, 3, 2) == sets[2]  # and is the same again for the same seed
    grouped = [[0, 0, 0, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
    assert any([d.label for d in demos] not in grouped for demos in sets.values())  # shuffled, not class order
    episodes = evaluation_episodes(task, "validation", 3, 30, 1, sets[1])
    assert all(e.demos == sets[1] for e in episodes)
    episodic = sample_episodes(task.splits["validation"], 2, 3, 30, 1, "validation/eval")
    assert [e.query for e in episodes] == [e.query for e in episodic]  # the very same query stream
    assert len({e.demos for e in episodic}) == 30  # (where each query has its own)


def test_a_train_text_found_in_validation_or_test_is_never_a_demonstration():
    words = ["bad", "good"]
    train = [f"review {i}" for i in range(12)]
    labels = [i % 2 for i in range(12)]
    # every train text but two per class also occurs in validation or test
    task = task_from_lists(words, (train, labels), (train[4:8], labels[4:8]), (train[8:], labels[8:]))
    for seed in range(20):
        demos = demo_set(task, 2, seed)
        assert {d.text for d in demos} == set(train[:4])
    with pytest.raises(UsageError, match=r"--demos fixed --shot 3: class 'bad' has 2 train examples not found"):
        demo_set(task, 3, 0)


# ---- cached prefix: the fallback and multiple choice ---------------------------------------------------
def test_prompts_whose_prefix_differs_are_scored_whole(lm, task):
    encoder = PromptEncoder(lm.tokenizer, task.label_words, add_bos=True)
    queries = sample_episodes(task.splits["validation"], 2, 0, 6, 1, "validation/eval")
    episodes = with_demos(queries[:4], demo_set(task, 1, 1)) + with_demos(queries[4:], demo_set(task, 1, 2))
    prompts = [encoder.encode(e) for e in episodes]
    assert split_prefix(prompts)[2] == [4, 5]
    scorer = Scorer(lm, encoder.label_ids, 4, quiet=True)
    method = _fitted("iv", lm, 2)
    whole = scorer.runner.map(prompts, lambda b: method.predict(scorer, b), "whole")
    torch.testing.assert_close(fixed_scores(method, scorer, prompts, "cached"), whole, atol=2e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def mc_task(tmp_path_factory):
    path = write_csqa(tmp_path_factory.mktemp("csqa") / "train.jsonl")
    return load_task("csqa", {"data_files": {"train": str(path)}, **MC_SPEC})


@pytest.mark.parametrize("name", ["icl", "dt"])
def test_options_are_scored_over_the_cached_prefix(lm, mc_task, name):
    encoder = PromptEncoder(lm.tokenizer, [], add_bos=True)
    demos = demo_set(mc_task, 2, 0)
    assert len(demos) == 2 and all(d.options is not None for d in demos)
    prompts = [encoder.encode(e) for e in evaluation_episodes(mc_task, "validation", 2, 5, 0, demos)]
    assert any(len(o) > 1 for p in prompts for o in p.options)  # multi-token options run over the cache too
    method = _fitted(name, lm, 5)
    scorer = Scorer(lm, [], 2, quiet=True)
    whole = scorer.runner.map(prompts, lambda b: method.predict(scorer, b), "whole")
    torch.testing.assert_close(fixed_scores(method, scorer, prompts, "cached"), whole, atol=1e-3, rtol=1e-4)


# ---- DT under its own protocol --------------------------------------------------------------------------
def test_dt_tunes_the_fixed_set_once_and_selects_the_same_step(lm, task):
    encoder = PromptEncoder(lm.tokenizer, task.label_words, add_bos=True)
    validation = evaluation_episodes(task, "validation", 2, 10, 3, demo_set(task, 2, 3), "select")
    prompts = [encoder.encode(e) for e in validation]
    scorer = Scorer(lm, encoder.label_ids, 4, quiet=True)
    dt = DeepThinking(dt_steps=4, dt_eta=1.0)
    per_batch = scorer.runner.map(prompts, lambda b: dt.step_scores(scorer, b, 4), "per batch")  # [N, 4, C]
    tunes = []
    tuned = dt.tuned
    dt.tuned = lambda *a: tunes.append(a[1].shape) or tuned(*a)
    dt.fit(scorer, encoder, [], validation)
    assert tunes == [torch.Size([1, prompts[0].query_start])]  # one tuning, of the demonstrations alone
    torch.testing.assert_close(dt._fixed_step_scores(scorer, prompts), per_batch, atol=2e-4, rtol=1e-4)
    labels = np.array([p.label for p in prompts])
    curve = [selection_score(labels, per_batch[:, t].argmax(-1).numpy(), 2, False) for t in range(4)]
    assert dt.curve == pytest.approx(curve) and dt.step == int(np.argmax(curve)) + 1  # the per-batch path's choice


# ---- the CLI: records, --resume, select, refusal ------------------------------------------------------
REPO = Path(__file__).resolve().parent.parent


def _cli(out, *args):
    base = ["-c", "config/tiny.yaml", "-m", "tiny-llama", "-t", "review_sentiment", "-n", "12", "--batch-size", "4"]
    return main([*base, "--quiet", "--results", str(out), *args])


def test_fixed_and_episodic_records_are_kept_apart(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    out = tmp_path / "runs.jsonl"
    assert _cli(out, "--method", "icl", "--shot", "2", "--demos", "fixed", "--resume") == 0
    assert _cli(out, "--method", "icl", "--shot", "2", "--resume") == 0  # episodic: not the fixed run's record
    assert _cli(out, "--method", "icl", "--shot", "2", "--demos", "fixed", "--resume") == 0  # skipped
    assert "skipped (--resume)" in capsys.readouterr().out
    fixed, episodic = [json.loads(line) for line in out.read_text().splitlines()]
    assert fixed["hyperparameters"]["demos"] == "fixed" and "demos" not in episodic["hyperparameters"]
    assert {k: v for k, v in fixed["hyperparameters"].items() if k != "demos"} == episodic["hyperparameters"]
    assert [c.best.method for c in select_best([fixed, episodic])] == ["icl", "icl@fixed"]
    # zero-shot has no demonstrations to fix: the same setting under either protocol
    assert _cli(out, "--method", "zero-shot", "--resume") == 0
    assert _cli(out, "--method", "zero-shot", "--demos", "fixed", "--resume") == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3 and "demos" not in records[-1]["hyperparameters"]


def test_a_runspec_fixed_run_logs_one_set_and_scores_as_whole_prompts(tmp_path, monkeypatch):
    """The Python RunSpec runs --demos fixed too; IV through the runner's cached path scores what
    `predict` scores on the whole prompts."""
    monkeypatch.chdir(REPO)
    out = tmp_path / "runs.jsonl"
    spec = RunSpec(
        model="tiny-llama",
        task="review_sentiment",
        config="config/tiny.yaml",
        shot=2,
        episodes=8,
        eval_episodes=12,
        batch_size=4,
        demos="fixed",
        quiet=True,
        log_samples=True,
        results=str(out),
    )
    exp = Experiment(spec)
    (record,) = exp.run()
    assert record["hyperparameters"]["demos"] == "fixed"
    lines = read_samples(record, tmp_path)
    assert len({tuple(x["demo_rows"]) for x in lines}) == 1 and len(lines[0]["demo_rows"]) == 4
    assert exp.loaded is not None and exp.sampled is not None and exp.fitted is not None
    assert lines[0]["demo_rows"] == [d.index for d in demo_set(exp.loaded.task, 2, 42)]  # train rows
    method, scorer = exp.fitted.methods[0], exp.loaded.scorer
    whole = scorer.runner.map(exp.sampled.prompts, lambda b: method.predict(scorer, b), "whole")
    torch.testing.assert_close(torch.tensor([x["scores"] for x in lines]), whole, atol=2e-4, rtol=1e-4)


class NeedsItsOwnDemos(Method):
    """Stands for a method that picks demonstrations per query (nearest neighbours, say)."""

    name = "own-demos"
    supports_fixed_demos = False

    def predict(self, scorer, batch):
        return scorer.label_scores(batch)


def test_a_method_that_cannot_take_fixed_demonstrations_refuses_before_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    monkeypatch.setitem(METHODS, NeedsItsOwnDemos.name, NeedsItsOwnDemos)
    monkeypatch.setattr("ivlib.experiment.load_model", lambda *a, **k: pytest.fail("loaded the model first"))
    assert _cli(tmp_path / "runs.jsonl", "--method", "own-demos", "--demos", "fixed") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--demos fixed does not apply to --method own-demos; accepted with: zero-shot, icl, tv, " in err


def test_the_api_refuses_it_too(gpt2, task):
    with pytest.raises(UsageError, match="--demos fixed does not apply to --method own-demos"):
        evaluate(NeedsItsOwnDemos(), gpt2, task, demos="fixed", n=4)
    assert evaluate(NeedsItsOwnDemos(), gpt2, task, n=4).scores.shape == (4, 2)  # episodic: fine


def test_each_batch_sees_the_prefix_without_a_copy_and_keeps_nothing(gpt2, task):
    encoder, prompts = _prompts(gpt2, task)
    scorer = Scorer(gpt2, encoder.label_ids, 4, quiet=True)
    shared, queries, _ = split_prefix(prompts)
    prefix = scorer.encode_prefix(scorer.batch([shared]))
    (k0, _), *_ = read_kv(prefix.cache)
    for keep in (True, False):
        cache = expand_rows(prefix.cache, 3, keep)
        keys = cache.layers[0].keys
        assert keys.shape[0] == 3 and keys.stride(0) == 0 and keys.data_ptr() == k0.data_ptr()
    batch = scorer.batch(queries[:3])
    cache = expand_rows(prefix.cache, 3, keep=False)
    mask = torch.cat([batch.attention_mask.new_ones(3, prefix.length), batch.attention_mask], 1)
    scorer.encode(batch.input_ids, mask, batch.position_ids + prefix.length, past=cache)
    assert all(layer.keys.shape[-2] == prefix.length for layer in cache.layers)  # nothing appended
    assert read_kv(prefix.cache)[0][0] is k0 and k0.shape[-2] == prefix.length  # the prefix is untouched


def test_a_prompt_beyond_the_context_is_refused_though_its_query_part_fits(gpt2, task, monkeypatch):
    encoder, prompts = _prompts(gpt2, task)
    scorer = Scorer(gpt2, encoder.label_ids, 4, quiet=True)
    longest = max(len(p.ids) for p in prompts)
    monkeypatch.setattr(scorer, "_context", longest - 1)
    assert max(len(q.ids) for q in split_prefix(prompts)[1]) < longest - 1
    with pytest.raises(UsageError, match=f"a prompt of {longest} tokens exceeds the context"):
        fixed_scores(ICL(), scorer, prompts, "cached")


def test_a_method_that_selects_on_validation_runs_fixed_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "runs.jsonl"
    assert _cli(out, "--method", "tv", "--demos", "fixed", "-e", "8", "--select-episodes", "8", "--log-samples") == 0
    record = json.loads(out.read_text())
    assert record["hyperparameters"]["demos"] == "fixed" and len(record["fit"]["layer_scores"]) == 2
    lines = read_samples(record, tmp_path)
    assert len({tuple(x["demo_rows"]) for x in lines}) == 1
