"""One method against another over every seed at once, and how often each falls below a baseline.

A seed redraws the demonstrations, the fit's episodes and the queries, so one seed's paired interval
says how two methods differ on that draw only. Pooling the seeds' episodes (each seed's two test runs
answer the same queries, so every episode stays a pair) gives the interval a claim about the methods
needs. The IV paper's claim is such a claim: that IV never falls below ICL while TV and FV often do.
The report tests it from the records: IV minus each rival on every (model, task), and for every
method the number of (model, task) cells where it is significantly below zero-shot or ICL. Shown
when some cell was tested with several seeds (scripts.sh SEEDS); one seed's pairs are the report's
per-model paired table.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .paired import Interval, Paired, aligned, compare
from .samples import SamplesError, read_samples
from .seeds import seed_runs
from .selection import Scored

PROTAGONIST = "iv"  # the paper's method, set against each of RIVALS
RIVALS = ("zero-shot", "icl", "tv", "fv")
FLOORS = ("zero-shot", "icl")  # falling significantly below either is what the claim counts
SIGNIFICANT = "*"
MISSING = "–"


@dataclass(frozen=True)
class Versus:
    """Method `a` minus method `b` on one (model, task), over the seeds both were tested with."""

    model: str
    task: str
    a: str
    b: str
    seeds: tuple[Any, ...]
    paired: Paired | None
    why: str  # why `paired` is None ("" when it is not)

    def difference(self, metric: str) -> Interval | None:
        """The headline metric's difference: macro-F1, or accuracy (multiple choice has only accuracy)."""
        if self.paired is None:
            return None
        return self.paired.accuracy if metric == "accuracy" or self.paired.macro is None else self.paired.macro


Log = list[dict[str, Any]]
LogCache = dict[str, Log]  # a samples log's path -> its episodes: a report reads each log once, not once a pair


def _logs(chosen: Scored, scored: list[Scored], base: str | Path, cache: LogCache) -> tuple[dict[Any, Log], str]:
    """seed -> the samples log of the chosen setting's test run with that seed; and why a log is missing."""
    logs = {}
    for run in seed_runs(chosen, scored):
        path = str((run.record.get("samples") or {}).get("path"))
        try:
            log = cache[path] if path in cache else read_samples(run.record, base)
        except SamplesError as exc:
            return {}, f"{chosen.method} seed {run.record.get('seed')}: {exc}"
        if log is None:
            return {}, f"{chosen.method} seed {run.record.get('seed')} has no samples log (--log-samples)"
        cache[path] = logs[run.record.get("seed")] = log
    return logs, ""


def versus(a: Scored, b: Scored, scored: list[Scored], base: str | Path, cache: LogCache | None = None) -> Versus:
    """`a` minus `b` (each a chosen setting), their episodes of every common seed pooled, pair by pair;
    `cache` keeps the logs read for the next pair."""
    head = (a.model, a.task, a.method, b.method)
    cache = {} if cache is None else cache
    logs_a, why_a = _logs(a, scored, base, cache)
    logs_b, why_b = _logs(b, scored, base, cache)
    if why_a or why_b:
        return Versus(*head, (), None, why_a or why_b)
    seeds = tuple(sorted(set(logs_a) & set(logs_b), key=lambda s: str(s).zfill(20)))
    if not seeds:
        return Versus(*head, (), None, "no seed tested with both")
    for seed in seeds:
        if not aligned(logs_a[seed], logs_b[seed]):
            return Versus(*head, seeds, None, f"seed {seed}: the logs' query rows differ")
    gold = [x["gold"] for s in seeds for x in logs_a[s]]
    pred_a = [x["pred"] for s in seeds for x in logs_a[s]]
    pred_b = [x["pred"] for s in seeds for x in logs_b[s]]
    queries = [x["query_row"] for s in seeds for x in logs_a[s]]  # a row recurring across seeds is one query
    multiple_choice = a.record.get("task_kind") == "multiple_choice"
    n_classes = None if multiple_choice else len(a.record.get("label_words") or []) or None
    return Versus(*head, seeds, compare(gold, pred_a, pred_b, n_classes, clusters=queries), "")


def pooled_versus(
    chosen: Iterable[Scored], scored: list[Scored], base: str | Path, cache: LogCache | None = None
) -> list[Versus]:
    """Every pair the claim needs, among the chosen settings: the protagonist minus each rival, and each
    method minus each floor, on every (model, task) where both were tested."""
    cells, cache = {(c.model, c.task, c.method): c for c in chosen}, {} if cache is None else cache
    wanted = [(PROTAGONIST, r) for r in RIVALS] + [(m, f) for m in sorted({k[2] for k in cells}) for f in FLOORS]
    out = []
    for model, task in sorted({k[:2] for k in cells}):
        for a, b in dict.fromkeys(wanted):
            if a != b and (model, task, a) in cells and (model, task, b) in cells:
                out.append(versus(cells[model, task, a], cells[model, task, b], scored, base, cache))
    return out


def several_seeds(chosen: Iterable[Scored], scored: list[Scored]) -> bool:
    return any(len(seed_runs(c, scored)) > 1 for c in chosen)


def _named(metric: str) -> str:
    return "macro-F1" if metric == "macro" else metric


def _text(d: Interval | None) -> str:
    if d is None:
        return MISSING
    mark = SIGNIFICANT if d.excludes_zero else ""
    return f"{100 * d.value:+.1f}{mark} [{100 * d.ci_low:+.1f}, {100 * d.ci_high:+.1f}]"


def claim_table(pairs: list[Versus], metric: str) -> list[str]:
    """Markdown: per (model, task), the protagonist minus each rival, seeds pooled."""
    mine = {(v.model, v.task, v.b): v for v in pairs if v.a == PROTAGONIST and v.b in RIVALS}
    rows = sorted({k[:2] for k in mine})
    if not rows:
        return []
    lines = [
        f"{PROTAGONIST} minus each rival, test {_named(metric)} in percentage points, every seed's episodes pooled pair by "
        f"pair, 95% paired bootstrap interval resampling whole test queries (a query recurs within and across "
        f"seeds); {SIGNIFICANT} where it excludes zero; n: paired episodes.",
        "",
        "| Model | Task | Seeds | n | " + " | ".join(f"{PROTAGONIST} − {r}" for r in RIVALS) + " |",
        "| --- | --- | --- | --- |" + " --- |" * len(RIVALS),
    ]
    for model, task in rows:
        found = [mine.get((model, task, r)) for r in RIVALS]
        paired = [v for v in found if v is not None and v.paired is not None]
        widest = max(paired, key=lambda v: len(v.seeds)) if paired else None  # the row's seeds and n
        n = str(widest.paired.n) if widest and widest.paired else MISSING
        seeds = ", ".join(str(s) for s in widest.seeds) if widest else MISSING
        cells = [_cell(v, metric, widest) for v in found]
        lines.append(f"| {model} | {task} | {seeds} | {n} | " + " | ".join(cells) + " |")
    return [*lines, *_why(mine.values()), ""]


def _cell(v: Versus | None, metric: str, widest: Versus | None) -> str:
    """A difference, with its own seeds where a rival was tested with fewer than the row's."""
    if v is None:
        return MISSING
    text = _text(v.difference(metric))
    if v.paired is not None and widest is not None and v.seeds != widest.seeds:
        text += f" (seeds {', '.join(str(s) for s in v.seeds)}; n = {v.paired.n})"
    return text


def below_counts(pairs: list[Versus], metric: str) -> dict[str, dict[str, tuple[int, int, list[str]]]]:
    """method -> floor -> (cells significantly below it, cells compared, those cells' names)."""
    out: dict[str, dict[str, tuple[int, int, list[str]]]] = {}
    for v in pairs:
        d = v.difference(metric)
        if v.b not in FLOORS or d is None:
            continue
        below, compared, where = out.setdefault(v.a, {}).get(v.b, (0, 0, []))
        worse = d.ci_high < 0
        out[v.a][v.b] = (below + worse, compared + 1, where + ([f"{v.model} / {v.task}"] if worse else []))
    return out


def below_table(pairs: list[Versus], metric: str, order: list[str]) -> list[str]:
    """Markdown: for each method, in how many (model, task) cells it is significantly below each floor."""
    counts = below_counts(pairs, metric)
    if not counts:
        return []
    lines = [
        f"Cells (model, task) where a method's test {_named(metric)} is significantly below zero-shot or ICL: its pooled "
        "paired interval (over every seed both were tested with) lies wholly below zero. k / n: k such cells of the n "
        "compared; a cell tested with fewer seeds is named with them under Seeds.",
        "",
        "| Method | " + " | ".join(f"below {f}" for f in FLOORS) + " | Where | Seeds |",
        "| --- |" + " --- |" * len(FLOORS) + " --- | --- |",
    ]
    fewer = _fewer_seeds(pairs)
    for method in [m for m in order if m in counts]:
        shown = [counts[method].get(f) for f in FLOORS]
        where = sorted({w for c in shown if c for w in c[2]})
        cells = [f"{c[0]} / {c[1]}" if c else MISSING for c in shown]
        seeds = "; ".join(fewer.get(method, [])) or "all"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {'; '.join(where) or MISSING} | {seeds} |")
    return [*lines, ""]


def _fewer_seeds(pairs: list[Versus]) -> dict[str, list[str]]:
    """method -> its compared cells paired over fewer seeds than the most any pair has, each named with
    its seeds (a count resting on one seed should say so)."""
    paired = [v for v in pairs if v.paired is not None]
    most = max((len(v.seeds) for v in paired), default=0)  # the sweep's seeds, as far as any pair shows
    out: dict[str, set[str]] = {}
    for v in paired:
        if v.b in FLOORS and len(v.seeds) < most:
            seeds = ", ".join(str(s) for s in v.seeds)
            out.setdefault(v.a, set()).add(f"{v.model} / {v.task}: seed{'s' if len(v.seeds) > 1 else ''} {seeds}")
    return {m: sorted(c) for m, c in out.items()}


def _why(pairs: Iterable[Versus]) -> list[str]:
    reasons = sorted({f"{v.model} / {v.task} / {v.a} − {v.b}: {v.why}" for v in pairs if v.paired is None})
    return ["", *[f"- not paired: {r}" for r in reasons]] if reasons else []
