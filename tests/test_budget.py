"""Every record says what its method consumed: labeled examples and token positions, checked by hand
for ICL, IV and SITE, and present and sane for every registered method."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import ivlib
from ivlib import budget
from ivlib.cli import main
from ivlib.experiment import fit_episodes
from ivlib.methods import METHODS
from ivlib.methods.site import _passes
from ivlib.prompts import PromptEncoder
from ivlib.protocol import Protocol

REPO = Path(__file__).resolve().parent.parent
KEYS = {"fit_examples", "selection_examples", "fit_tokens", "demonstrations_per_query", "tokens_per_query"}
FIT = {"ext_shot": 1, "episodes": 12, "select_episodes": 3, "seed": 42}
SMALL = {
    "i2cl": {"i2cl_epochs": 1},
    "site": {"site_steps": 3, "site_val_every": 2},
    "fv": {"ie_episodes": 2},
    "dt": {"dt_steps": 2},
    "probe": {"probe_c": 1.0},
}


def _lengths(prompts) -> int:
    return sum(len(p.ids) for p in prompts)  # real tokens: BOS + text, no padding


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_reports_its_budget(gpt2, task, name):
    method = ivlib.fit(name, gpt2, task, **FIT, **SMALL.get(name, {}))
    result = ivlib.evaluate(method, gpt2, task, n=6, seed=5)
    spent = result.budget
    assert set(spent) == KEYS
    assert all(isinstance(spent[k], int) and spent[k] >= 0 for k in KEYS - {"tokens_per_query"})
    assert spent["tokens_per_query"] > 0
    cls = METHODS[name]
    assert (spent["fit_tokens"] > 0) == (cls.needs_fit or (cls.needs_validation and name != "probe"))
    assert spent["demonstrations_per_query"] == Protocol().eval_shot(cls) * task.n_classes


def test_icl_budget_by_hand(gpt2, task):
    result = ivlib.evaluate("icl", gpt2, task, n=6, seed=5)
    encoder = PromptEncoder(gpt2.tokenizer, task.label_words, True)
    prompts = [encoder.encode(e) for e in result.episodes]
    assert result.budget == {
        "fit_examples": 0,
        "selection_examples": 0,
        "fit_tokens": 0,
        "demonstrations_per_query": 2,  # one per class
        "tokens_per_query": round(_lengths(prompts) / 6, 1),
    }


def test_iv_budget_by_hand(gpt2, task):
    iv = ivlib.fit("iv", gpt2, task, ext_shot=2, episodes=5, seed=5)
    train, _ = fit_episodes(task, METHODS["iv"], Protocol(), 2, 5, 200, 5)
    encoder = PromptEncoder(gpt2.tokenizer, task.label_words, True)
    demos = {d for e in train for d in e.demos}
    assert iv.fit_budget["fit_examples"] == len(demos)  # the queries' labels are never read
    # one zero-shot forward of each query, one few-shot forward of each episode
    few = _lengths(encoder.encode(e) for e in train)
    zero = _lengths(encoder.encode(e.query_only()) for e in train)
    assert iv.fit_budget["fit_tokens"] == few + zero
    assert iv.fit_budget["selection_examples"] == 0


def test_site_budget_by_hand(gpt2, task):
    steps, every = 4, 2
    site = ivlib.fit(
        "site", gpt2, task, ext_shot=1, episodes=4, select_episodes=3, seed=5, site_steps=steps, site_val_every=every
    )
    train, validation = fit_episodes(task, METHODS["site"], Protocol(), 1, 4, 3, 5)
    encoder = PromptEncoder(gpt2.tokenizer, task.label_words, True)
    assert site.fit_budget["fit_examples"] == len({d for e in train for d in e.demos} | {e.query for e in train})
    assert site.fit_budget["selection_examples"] == len({e.query for e in validation})
    embedding = _lengths(encoder.encode(e) for e in train)
    zero_shot = [len(encoder.encode(e.query_only()).ids) for e in train]
    order = _passes(len(train), np.random.default_rng([5, 18]))
    training = sum(zero_shot[next(order)] for _ in range(steps))  # one prompt per step (--site-batch 1)
    checkpoints = len([s for s in range(1, steps + 1) if s % every == 0 or s == steps])
    validating = checkpoints * _lengths(encoder.encode(e.query_only()) for e in validation)
    assert site.fit_budget["fit_tokens"] == embedding + training + validating


def test_records_carry_the_budget_and_state_files_keep_the_fits(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    vec, out = str(tmp_path / "iv.safetensors"), tmp_path / "r.jsonl"
    common = ["-c", "config/tiny.yaml", "-m", "tiny-gpt2", "-t", "review_sentiment", "--quiet", "-n", "8"]
    assert main([*common, "-s", "1", "-e", "3", "--save-vectors", vec, "--results", str(out)]) == 0
    assert main([*common, "--load-vectors", vec, "--results", str(out)]) == 0
    fitted, loaded = (json.loads(line) for line in out.read_text().splitlines())
    assert set(fitted["budget"]) == KEYS and fitted["budget"]["fit_examples"] == 6
    for key in ("fit_examples", "selection_examples", "fit_tokens"):  # a loaded state says what its fit cost
        assert loaded["budget"][key] == fitted["budget"][key]


def test_split_loops_count_every_process_share():
    """Under data parallel a split loop adds the other processes' tokens (BatchRunner.shared)."""
    with budget.counting(ivlib.tiny_model()[0]) as count:
        budget.add_elsewhere(7)
        assert budget.counted() == 7
    assert count.tokens == 7 and budget.counted() == 0


def _record(method: str, hp: dict, value: float, spent: dict | None) -> dict:
    out = {
        "method": method,
        "model": "m",
        "task": "t",
        "split": "test",
        "hyperparameters": hp,
        "seed": 42,
        "metrics": {"macro": {"value": value, "ci_low": value - 0.05, "ci_high": value + 0.05}},
    }
    return out if spent is None else {**out, "budget": spent}


def test_the_report_plots_metric_against_labeled_examples_in_one_colour_per_method(tmp_path):
    from ivlib.report import budget_text, labeled, method_styles, write_report

    spent = {
        "fit_examples": 400,
        "selection_examples": 200,
        "demonstrations_per_query": 0,
        "fit_tokens": 9,
        "tokens_per_query": 5.0,
    }
    records = [
        _record(
            "icl",
            {"shot": 1},
            0.6,
            {**spent, "fit_examples": 0, "selection_examples": 0, "demonstrations_per_query": 2},
        ),
        _record("icl", {"shot": 1, "demos": "fixed"}, 0.55, None),  # an older record: no budget
        _record("dt", {"shot": 1, "demos": "fixed"}, 0.62, spent),
        _record("site", {"shot": 0}, 0.8, spent),
    ]
    assert labeled(records[0]) == 2 and labeled(records[1]) is None and labeled(records[3]) == 600
    assert budget_text(records[3]) == "400 + 200 + 0/q"
    styles = method_styles(["icl", "icl@fixed", "dt@fixed", "site"])
    assert len({colour for colour, _ in styles.values()}) == 4  # icl@fixed and dt@fixed no longer share one
    many = method_styles([f"m{i}" for i in range(25)])
    assert len(set(many.values())) == 25  # past tab20's colours: hatched
    written = write_report(records, tmp_path / "rep")
    assert tmp_path / "rep" / "budget_m.png" in written
    assert (tmp_path / "rep" / "budget_m.png").stat().st_size > 1000
