"""A chosen setting's test runs over several seeds: their mean and spread, and the pooled interval.

One run's bootstrap interval says how much its value would move with other queries; it says
nothing of how much it moves with other demonstrations and fits, which another seed redraws. With
several seeds (scripts.sh SEEDS) the report shows both: the mean and standard deviation over the
seeds' values, and the interval of all their episodes pooled (from the samples logs, when every
seed's run has one), resampling whole queries: seeds draw their queries from one split, so a query
recurs within and across seeds, and its episodes are not independent evidence. With one seed
nothing here is shown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import AVERAGES, bootstrap_f1
from .samples import SamplesError, read_samples
from .selection import Scored, _command_key, _strip_flags, latest_per_setting, warn


@dataclass(frozen=True)
class Spread:
    """The test runs of one cell's setting, one per seed (sorted by seed)."""

    runs: tuple[Scored, ...]
    pooled: dict[str, float] | None  # value, ci_low, ci_high over every seed's episodes; None without logs
    why: str  # why `pooled` is None ("" when it is not)

    @property
    def seeds(self) -> list[Any]:
        return [r.record.get("seed") for r in self.runs]

    @property
    def mean(self) -> float:
        return sum(r.value for r in self.runs) / len(self.runs)

    @property
    def sd(self) -> float:
        """Sample standard deviation (n - 1): the seeds are a sample of the draws one could make."""
        m = self.mean
        return math.sqrt(sum((r.value - m) ** 2 for r in self.runs) / (len(self.runs) - 1))


def _key_without_seed(record: dict[str, Any]) -> tuple[str, ...] | None:
    key = _command_key(record)
    return None if key is None else tuple(_strip_flags(list(key), {"--seed"}))


def seed_runs(chosen: Scored, scored: list[Scored]) -> list[Scored]:
    """The latest test run per seed of `chosen`'s setting: the same hyperparameters, or else the same
    command but for --seed (a setting picked while fitting, tv's layer, may differ between seeds)."""
    same = [
        s
        for s in latest_per_setting(scored)
        if s.split == "test" and (s.model, s.task, s.method) == (chosen.model, chosen.task, chosen.method)
    ]
    command = _key_without_seed(chosen.record)
    matching = [s for s in same if s.setting == chosen.setting or (command and _key_without_seed(s.record) == command)]
    per_seed: dict[Any, Scored] = {}
    for s in sorted(matching, key=lambda s: (s.setting != chosen.setting, -s.order)):
        per_seed.setdefault(s.record.get("seed"), s)  # the exact setting first, then the newest
    return sorted(per_seed.values(), key=lambda s: str(s.record.get("seed")).zfill(20))


def pooled_interval(runs: list[Scored], metric: str, base: str | Path | None) -> tuple[dict[str, float] | None, str]:
    """The metric and its bootstrap interval over all the runs' episodes together, from their logs
    (accuracy: micro-F1, the same number for one label per query)."""
    metric = "micro" if metric == "accuracy" else metric
    if metric not in AVERAGES or any(r.record.get("task_kind") == "multiple_choice" for r in runs):
        return None, f"pooled interval: only for {', '.join(AVERAGES)} F1 of classification tasks"
    logs = []
    for r in runs:
        try:
            log = read_samples(r.record, base) if base is not None else None
        except SamplesError as exc:
            warn(f"{r.model} / {r.task} / {r.method} seed {r.record.get('seed')}: {exc}; no pooled interval")
            log = None
        if log is None:
            return None, "pooled interval: needs every seed's run made with --log-samples"
        logs.append(log)
    gold = np.array([line["gold"] for log in logs for line in log])
    pred = np.array([line["pred"] for log in logs for line in log])
    rows = [line.get("query_row") for log in logs for line in log]
    queries = np.array(rows) if None not in rows else None  # whole queries resampled where each episode names its own
    n_classes = len(runs[0].record.get("label_words") or []) or int(max(gold.max(), pred.max())) + 1
    seed = runs[0].record.get("seed")
    return bootstrap_f1(gold, pred, n_classes, seed=seed if isinstance(seed, int) else 0, clusters=queries)[metric], ""


def spread(chosen: Scored, scored: list[Scored], metric: str, base: str | Path | None) -> Spread | None:
    """The cell's spread over seeds, or None when its setting was tested with one seed only."""
    runs = seed_runs(chosen, scored)
    if len(runs) < 2:
        return None
    pooled, why = pooled_interval(runs, metric, base)
    return Spread(tuple(runs), pooled, why)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def seeds_table(rows: list[tuple[str, str, Spread]], metric: str) -> list[str]:
    """Markdown lines: per (task, method) with several seeds, the values, mean ± sd and pooled interval."""
    if not rows:
        return []
    lines = [
        f"Over seeds: the chosen setting's test {metric} (%) with each seed, their mean ± standard deviation, "
        "and the 95% bootstrap interval of all the seeds' episodes pooled (whole test queries resampled):",
        "",
        "| Task | Method | Seeds | Per seed | Mean ± sd | Pooled |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    notes = set()
    for task, method, s in rows:
        pooled = "–"
        if s.pooled is not None:
            pooled = f"{_pct(s.pooled['value'])} [{_pct(s.pooled['ci_low'])}, {_pct(s.pooled['ci_high'])}]"
        else:
            notes.add(s.why)
        seeds = ", ".join(str(x) for x in s.seeds)
        values = ", ".join(_pct(r.value) for r in s.runs)
        lines.append(
            f"| {task} | {method} | {len(s.runs)} ({seeds}) | {values} | {_pct(s.mean)} ± {_pct(s.sd)} | {pooled} |"
        )
    return [*lines, "", *(f"- {n}" for n in sorted(notes)), *([""] if notes else [])]
