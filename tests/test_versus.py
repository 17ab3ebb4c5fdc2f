"""The report's seeds-pooled section: IV minus each rival, and the cells where a method is below zero-shot or ICL."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ivlib.paired import Interval, Paired
from ivlib.report import write_report
from ivlib.selection import score_records
from ivlib.versus import Versus, below_counts, below_table, pooled_versus, versus

MODEL, TASK = "smollm2-135m", "staicc-bench/sst2"
GOLD = {1: [0, 1, 0, 1] * 10, 2: [1, 1, 0, 0] * 10}  # 40 queries per seed


def _record(split: str, method: str, seed: int, value: float) -> dict:
    return {
        "method": method,
        "model": MODEL,
        "task": TASK,
        "split": split,
        "hyperparameters": {"shot": 1},
        "seed": seed,
        "n_eval_episodes": 40,
        "label_words": ["negative", "positive"],
        "time": f"2026-12-02T15:00:{seed:02d}+00:00",
        "metrics": {"macro": {"value": value, "ci_low": value - 0.1, "ci_high": value + 0.1}},
        "command": ["python", "iv.py", "-m", MODEL, "-t", TASK, "--method", method, "--seed", str(seed)],
    }


def _logged(folder: Path, record: dict, pred: list[int], rows: list[int] | None = None) -> dict:
    gold = GOLD[record["seed"]]
    rows = rows or list(range(len(gold)))
    lines = [
        json.dumps({"episode": i, "gold": g, "pred": p, "query_row": r})
        for i, (g, p, r) in enumerate(zip(gold, pred, rows))
    ]
    data = ("\n".join(lines) + "\n").encode()
    name = f"{record['method']}_{record['seed']}.samples.jsonl"
    (folder / name).write_bytes(data)
    return {**record, "samples": {"path": name, "sha256": hashlib.sha256(data).hexdigest()}}


def _always(label: int, seed: int) -> list[int]:
    return [label] * len(GOLD[seed])


def _runs(folder: Path, seeds: tuple[int, ...] = (1, 2)) -> list[dict]:
    """IV and zero-shot answer every query right; ICL always says `negative` (half right), FV always
    `positive`; TV was never tested."""
    preds = {"iv": GOLD.__getitem__, "zero-shot": GOLD.__getitem__}
    preds |= {"icl": lambda s: _always(0, s), "fv": lambda s: _always(1, s)}
    records = [_record("validation", m, s, 0.5) for m in (*preds, "tv") for s in seeds]
    return records + [_logged(folder, _record("test", m, s, 0.5), p(s)) for m, p in preds.items() for s in seeds]


def test_iv_minus_icl_pools_every_seeds_episodes_pair_by_pair(tmp_path):
    records = _runs(tmp_path)
    scored = score_records(records, "macro")
    chosen = {s.method: s for s in scored if s.split == "test" and s.record["seed"] == 2}
    v = versus(chosen["iv"], chosen["icl"], scored, tmp_path)
    assert v.seeds == (1, 2) and v.paired is not None and v.paired.n == 80
    # IV right on all 80, ICL on the 40 negatives: accuracy +50 points. ICL's pooled macro-F1 is 1/3
    # (negative: 40 right, 40 false alarms, F1 2/3; positive never predicted, F1 0), IV's 1
    assert v.paired.accuracy.value == 0.5 and v.paired.wins == 40 and v.paired.losses == 0
    d = v.difference("macro")
    assert d is not None and abs(d.value - 2 / 3) < 1e-9 and d.ci_low > 0


def test_the_report_tests_the_claim_with_all_seeds(tmp_path):
    write_report(_runs(tmp_path), tmp_path / "report", base=tmp_path)
    table = (tmp_path / "report" / "table.md").read_text()
    assert "## All seeds pooled: the IV paper's claim" in table
    row = next(line for line in table.splitlines() if line.startswith(f"| {MODEL} | {TASK} | 1, 2 | 80 |"))
    zero_shot, icl, tv, fv = row.strip("| ").split(" | ")[4:]
    assert zero_shot.startswith("+0.0 [") and "*" not in zero_shot  # the same answers: no difference
    assert icl.startswith("+66.7* [") and fv.startswith("+66.7* [") and tv == "–"
    below = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.count("/ 1") >= 1}
    assert below["icl"].startswith("| icl | 1 / 1 | – |") and MODEL in below["icl"]
    assert below["fv"].startswith("| fv | 1 / 1 | 0 / 1 |")  # below zero-shot, level with ICL's 50%
    assert below["iv"].startswith("| iv | 0 / 1 | 0 / 1 |")
    # the per-model table of each method minus ICL pools the seeds too
    (paired,) = [line for line in table.splitlines() if line.startswith(f"| {TASK} | iv | +66.7* [")]
    assert paired.endswith("| seeds 1, 2 pooled, n = 80 |") and "| 40/40/0 |" in paired


def test_one_seed_shows_no_pooled_section(tmp_path):
    write_report(_runs(tmp_path, seeds=(1,)), tmp_path / "report", base=tmp_path)
    assert "All seeds pooled" not in (tmp_path / "report" / "table.md").read_text()


def test_a_missing_log_or_other_queries_are_said_not_paired(tmp_path):
    records = _runs(tmp_path)
    no_log = [r for r in records if not (r["method"] == "fv" and r["split"] == "test" and r["seed"] == 1)]
    no_log.append(_record("test", "fv", 1, 0.5))
    other_rows = _logged(tmp_path, _record("test", "icl", 2, 0.5), _always(0, 2), rows=list(range(100, 140)))
    shifted = [r for r in no_log if not (r["method"] == "icl" and r["split"] == "test" and r["seed"] == 2)]
    scored = score_records([*shifted, other_rows], "macro")
    chosen = [s for s in scored if s.split == "test" and s.record["seed"] == 1]
    found = {(v.a, v.b): v for v in pooled_versus(chosen, scored, tmp_path)}
    assert found["iv", "fv"].paired is None and "fv seed 1 has no samples log" in found["iv", "fv"].why
    assert found["iv", "icl"].paired is None and found["iv", "icl"].why == "seed 2: the logs' query rows differ"
    counts = below_counts(list(found.values()), "macro")
    assert counts["iv"]["zero-shot"][:2] == (0, 1) and "icl" not in counts.get("fv", {})


def test_a_rival_tested_with_fewer_seeds_says_which(tmp_path):
    records = [r for r in _runs(tmp_path) if not (r["method"] == "fv" and r["split"] == "test" and r["seed"] == 2)]
    write_report(records, tmp_path / "report", base=tmp_path)
    table = (tmp_path / "report" / "table.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith(f"| {MODEL} | {TASK} | 1, 2 | 80 |"))
    fv = row.strip("| ").split(" | ")[-1]
    assert fv.startswith("+66.7* [") and fv.endswith("(seeds 1; n = 40)")
    below = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.count("/ 1") >= 1}
    assert below["fv"].endswith(f"| {MODEL} / {TASK}: seed 1 |")  # its count rests on one seed: said
    assert below["iv"].endswith("| all |")


def test_a_cell_with_fewer_seeds_than_the_sweep_is_named_even_alone():
    """A cell where every pair has one seed, beside one with two: its counts rest on one seed, said."""
    below = Interval(-0.1, -0.2, -0.05)
    result = Paired(n=40, macro=below, accuracy=below, wins=0, ties=30, losses=10, mcnemar_p=0.01)
    pairs = [Versus(MODEL, task, "fv", "icl", seeds, result, "") for task, seeds in (("t1", (1, 2)), ("t2", (1,)))]
    (row,) = [line for line in below_table(pairs, "macro", ["fv"]) if line.startswith("| fv |")]
    assert row.endswith(f"| {MODEL} / t2: seed 1 |") and "2 / 2" in row
