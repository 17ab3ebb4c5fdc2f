"""The comparison table (markdown for reading, CSV for scripts) and plots from a results file.

Every test number shown is that of the setting chosen on validation (selection.py), so the
table can be compared with the paper's Table 1 without test-set tuning creeping in. matplotlib
is imported inside the plotting functions: analysis is optional, the runner must not need it.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import files
from .errors import UsageError
from .paired import Paired, aligned, compare, confusion, per_class_f1
from .samples import SamplesError, read_samples
from .seeds import Spread, seeds_table, spread
from .selection import (
    Scored,
    best_of,
    check_metric,
    choose,
    latest,
    latest_per_setting,
    over_seeds,
    score_records,
    test_for,
    warn,
)
from .versus import LogCache, Versus, below_table, claim_table, pooled_versus, several_seeds, versus

BASELINE = "icl"  # the paired table: each method minus 1-shot ICL
SIGNIFICANT = "*"
DAGGER = "†"
FALLBACK_MARK = "ᵃ"
MISSING = "–"
DPI = 100


@dataclass(frozen=True)
class Cell:
    """One table entry; `selected` is False for a test run shown without a validation choice."""

    run: Scored
    selected: bool

    @property
    def key(self) -> tuple[str, str, str]:
        return self.run.model, self.run.task, self.run.method


def method_order(methods: Iterable[str]) -> list[str]:
    """The registry's order, which the methods declare (`Method.position`: the paper's, newer rivals, IV
    last); methods a results file names but none registers go last, alphabetically."""
    from .methods import METHODS  # here, not at import: reading results needs no torch until a table is drawn

    present = set(methods)
    known = [m for m in METHODS if m in present]
    return known + sorted(present - set(METHODS))


def table_cells(scored: list[Scored]) -> tuple[list[Cell], list[tuple[str, str, str]]]:
    """Cells of the table, and the (model, task, method) chosen on validation but not yet tested."""
    cells: dict[tuple[str, str, str], Cell] = {}
    untested = []
    choices = choose(scored)
    for choice in choices:
        run = test_for(choice, scored)
        if run is None:
            untested.append(choice.key)
        else:
            cells[choice.key] = Cell(run, selected=True)
    chosen = {c.key for c in choices}
    unselected: dict[tuple[str, str, str], list[Scored]] = {}
    for s in scored:
        if s.split == "test" and (s.model, s.task, s.method) not in chosen:
            unselected.setdefault((s.model, s.task, s.method), []).append(s)
    for key, runs in unselected.items():
        cells[key] = Cell(latest(runs), selected=False)
    return [cells[k] for k in sorted(cells)], untested


# ---- markdown ---------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _shown(x: float) -> float:
    """The value as printed, so cells that read the same are bolded alike."""
    return round(100 * x, 1)


def format_cell(cell: Cell, metric: str, bold: bool) -> str:
    run = cell.run
    text = f"**{_pct(run.value)}**" if bold else _pct(run.value)
    if not cell.selected:
        text += DAGGER
    if run.metric != metric:
        text += FALLBACK_MARK
    if run.ci_low is not None and run.ci_high is not None:
        text += f" [{_pct(run.ci_low)}, {_pct(run.ci_high)}]"
    return text


def _bold_set(values: dict[str, float]) -> set[str]:
    if not values:
        return set()
    top = max(_shown(v) for v in values.values())
    return {m for m, v in values.items() if _shown(v) == top}


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def model_table(cells: list[Cell], metric: str) -> tuple[list[str], int]:
    """Markdown lines of one model's table, and how many tasks the average is over."""
    by_key = {(c.run.task, c.run.method): c for c in cells}
    methods = method_order(c.run.method for c in cells)
    tasks = sorted({c.run.task for c in cells})
    lines = [_row(["Task", *methods]), _row(["---"] * (len(methods) + 1))]
    for task in tasks:
        present = {m: by_key[task, m].run.value for m in methods if (task, m) in by_key}
        bold = _bold_set(present)
        lines.append(
            _row(
                [task, *(format_cell(by_key[task, m], metric, m in bold) if m in present else MISSING for m in methods)]
            )
        )
    complete = [t for t in tasks if all((t, m) in by_key for m in methods)]
    averages = {m: sum(by_key[t, m].run.value for t in complete) / len(complete) for m in methods} if complete else {}
    bold = _bold_set(averages)
    lines.append(
        _row(
            [
                "Average",
                *(
                    (f"**{_pct(averages[m])}**" if m in bold else _pct(averages[m])) if m in averages else MISSING
                    for m in methods
                ),
            ]
        )
    )
    return lines, len(complete)


def markdown(
    cells: list[Cell],
    untested: list[tuple[str, str, str]],
    metric: str,
    pairs: list[Pair] | None = None,
    spreads: dict[tuple[str, str, str], Spread] | None = None,
    pooled: list[Versus] | None = None,
) -> str:
    lines = [
        f"# Test {metric} (%), setting chosen on validation",
        "",
        "Each cell: the test-split value of the method's best validation setting, in percent, with its 95% "
        "bootstrap interval; a setting tested with several seeds shows all their episodes pooled, its interval "
        "resampling whole test queries (each seed's value is in the seeds table below it). Best per row in **bold**. Under each table: every cell's test "
        "episode count and setting.",
        "",
    ]
    for model in sorted({c.run.model for c in cells}):
        mine = [c for c in cells if c.run.model == model]
        table, n_complete = model_table(seeds_pooled(mine, spreads or {}), metric)
        lines += [f"## {model}", "", *table, ""]
        lines += _footnotes(mine, n_complete, metric)
        lines += details_table(mine)
        lines += seeds_table(_spread_rows(mine, spreads or {}), metric)
        lines += paired_table(mine, pairs or [])
    lines += _pooled_section(cells, pooled or [], metric)
    if untested:
        lines += [
            "## Not yet run on test",
            "",
            "Best validation setting with no test record (`python iv.py select --commands` prints the commands):",
            "",
        ]
        lines += [f"- {model} / {task} / {method}" for model, task, method in untested]
        lines.append("")
    if not cells:
        lines += ["No test records yet.", ""]
    return "\n".join(lines)


def seeds_pooled(cells: list[Cell], spreads: dict[tuple[str, str, str], Spread]) -> list[Cell]:
    """Each cell as the table and plots show it: tested with several seeds, the value and interval of all
    their episodes pooled, not whichever seed ran last (pairs keep one seed's run: `Cell.run`)."""
    out = []
    for c in cells:
        pooled = spreads[c.key].pooled if c.key in spreads else None
        if pooled is None:
            out.append(c)
            continue
        value, low, high = pooled["value"], pooled["ci_low"], pooled["ci_high"]
        out.append(dataclasses.replace(c, run=dataclasses.replace(c.run, value=value, ci_low=low, ci_high=high)))
    return out


def _pooled_section(cells: list[Cell], pooled: list[Versus], metric: str) -> list[str]:
    """The paper's claim, tested with every seed: IV minus its rivals, and counts below zero-shot / ICL."""
    body = claim_table(pooled, metric) + below_table(pooled, metric, method_order(c.run.method for c in cells))
    return ["## All seeds pooled: the IV paper's claim", "", *body] if body else []


def _spread_rows(cells: list[Cell], spreads: dict[tuple[str, str, str], Spread]) -> list[tuple[str, str, Spread]]:
    order = {m: i for i, m in enumerate(method_order(c.run.method for c in cells))}
    ordered = sorted((c for c in cells if c.key in spreads), key=lambda c: (c.run.task, order[c.run.method]))
    return [(c.run.task, c.run.method, spreads[c.key]) for c in ordered]


def seed_spreads(
    cells: list[Cell], scored: list[Scored], metric: str, base: str | Path | None
) -> dict[tuple[str, str, str], Spread]:
    """cell key -> its spread over seeds, for the cells whose setting was tested with several."""
    found = {c.key: spread(c.run, scored, metric, base) for c in cells}
    return {k: v for k, v in found.items() if v is not None}


def setting_text(hyperparameters: dict[str, Any]) -> str:
    """A setting as `name=value` pairs (unset ones left out), in the record's key order."""
    return ", ".join(f"{k}={v}" for k, v in hyperparameters.items() if v is not None) or "(defaults)"


def details_table(cells: list[Cell]) -> list[str]:
    """Each cell's test episode count and the setting it ran (the one chosen on validation)."""
    lines = [
        "Cells in detail: test episodes, and the setting (chosen on validation unless marked " + DAGGER + "):",
        "",
        _row(["Task", "Method", "Test episodes", "Setting"]),
        _row(["---"] * 4),
    ]
    order = {m: i for i, m in enumerate(method_order(c.run.method for c in cells))}
    for c in sorted(cells, key=lambda c: (c.run.task, order[c.run.method])):
        n = c.run.record.get("n_eval_episodes")
        lines.append(
            _row(
                [
                    c.run.task,
                    c.run.method + ("" if c.selected else DAGGER),
                    str(n) if isinstance(n, int) else MISSING,
                    f"`{setting_text(c.run.hyperparameters)}`",
                ]
            )
        )
    return [*lines, ""]


def _footnotes(cells: list[Cell], n_complete: int, metric: str) -> list[str]:
    notes = []
    if n_complete:
        notes.append(f"Average: mean over the {n_complete} task(s) where every shown method has a value.")
    else:
        notes.append("Average: no task has a value for every shown method.")
    if any(not c.selected for c in cells):
        notes.append(
            f"{DAGGER} No validation runs for this method: its latest test run is shown, "
            "not a setting chosen on validation."
        )
    if any(c.run.metric != metric for c in cells):
        notes.append(f"{FALLBACK_MARK} accuracy: the record has no '{metric}' metric (multiple-choice task).")
    return [f"- {n}" for n in notes] + [""]


# ---- paired differences ----------------------------------------------------------------------

Logs = dict[tuple[str, str, str], list[dict[str, Any]]]  # cell key -> its samples log
SAME_EPISODES = ("model", "task", "split", "seed", "n_eval_episodes")


@dataclass(frozen=True)
class Pair:
    """Cell `a` against cell `b` on one model and task: `paired` when both logs hold the same
    episodes, else None and `why` says what is missing."""

    a: Cell
    b: Cell
    paired: Paired | None
    why: str


def _multiple_choice(record: dict[str, Any]) -> bool:
    return record.get("task_kind") == "multiple_choice"


def load_logs(cells: list[Cell], base: str | Path | None) -> Logs:
    """The samples log of every cell whose record has one; a bad log is warned about and left out."""
    logs: Logs = {}
    if base is None:
        return logs
    for c in cells:
        try:
            found = read_samples(c.run.record, base)
        except SamplesError as exc:
            warn(f"{c.run.model} / {c.run.task} / {c.run.method}: {exc}; compared by intervals only")
            continue
        if found is not None:
            logs[c.key] = found
    return logs


def make_pair(a: Cell, b: Cell, logs: Logs) -> Pair:
    la, lb = logs.get(a.key), logs.get(b.key)
    missing = [c.run.method for c, log in ((a, la), (b, lb)) if log is None]
    if la is None or lb is None:
        return Pair(a, b, None, f"no samples log for {' and '.join(missing)}")
    if any(a.run.record.get(k) != b.run.record.get(k) for k in SAME_EPISODES):
        return Pair(a, b, None, "different episodes (seed or episode count)")
    if not aligned(la, lb):
        return Pair(a, b, None, "the logs' query rows differ")
    record = a.run.record
    n_classes = None if _multiple_choice(record) else len(record.get("label_words") or [])
    seed = record["seed"] if isinstance(record.get("seed"), int) else 0
    gold, pred_a, pred_b = ([x[k] for x in log] for k, log in (("gold", la), ("pred", la), ("pred", lb)))
    queries = [x["query_row"] for x in la]  # aligned: every episode names its query
    paired = compare(gold, pred_a, pred_b, n_classes or None, seed=seed, clusters=queries)
    return Pair(a, b, paired, f"paired, n = {paired.n}")


def all_pairs(cells: list[Cell], logs: Logs) -> list[Pair]:
    """Every ordered pair of methods with a test cell on the same model and task."""
    out = []
    for a in cells:
        for b in cells:
            if a.run.method != b.run.method and (a.run.model, a.run.task) == (b.run.model, b.run.task):
                out.append(make_pair(a, b, logs))
    return out


def seed_pairs(cells: list[Cell], scored: list[Scored], base: str | Path, cache: LogCache) -> list[Pair]:
    """`all_pairs` for a sweep with several seeds: each pair over every seed both were tested with, their
    episodes pooled pair by pair (`versus`), instead of one seed's run each."""
    out = []
    for a in cells:
        for b in cells:
            if a.run.method != b.run.method and (a.run.model, a.run.task) == (b.run.model, b.run.task):
                v = versus(a.run, b.run, scored, base, cache)
                out.append(Pair(a, b, v.paired, _pooled_basis(v)))
    return out


def _pooled_basis(v: Versus) -> str:
    """What a pooled pair rests on: `seeds 1, 2, 3 pooled, n = 1500`, `seed 3, n = 500`, or why it is unpaired."""
    if v.paired is None:
        return v.why
    seeds = ", ".join(str(s) for s in v.seeds)
    return f"seeds {seeds} pooled, n = {v.paired.n}" if len(v.seeds) > 1 else f"seed {seeds}, n = {v.paired.n}"


def _diff(d: float) -> str:
    return f"{100 * d:+.1f}"


def _interval_text(iv: Any) -> str:
    mark = SIGNIFICANT if iv.excludes_zero else ""
    return f"{_diff(iv.value)}{mark} [{_diff(iv.ci_low)}, {_diff(iv.ci_high)}]"


def _entry(record: dict[str, Any], name: str) -> dict[str, Any] | None:
    entry = (record.get("metrics") or {}).get(name)
    return entry if isinstance(entry, dict) and isinstance(entry.get("value"), (int, float)) else None


def _unpaired(p: Pair) -> tuple[str, str, str]:
    """(Δ macro-F1, Δ accuracy, basis) from the two records alone: point differences, and whether
    the runs' own intervals overlap."""
    ra, rb = p.a.run.record, p.b.run.record
    mc = _multiple_choice(ra)
    acc_name = "accuracy" if mc else "micro"  # single-label classification: micro-F1 is accuracy
    texts = []
    for name in (None if mc else "macro", acc_name):
        ea, eb = (_entry(ra, name), _entry(rb, name)) if name else (None, None)
        texts.append(_diff(ea["value"] - eb["value"]) if ea and eb else MISSING)
    ea, eb = _entry(ra, acc_name if mc else "macro"), _entry(rb, acc_name if mc else "macro")
    overlap = "intervals unknown"
    if ea and eb and all(isinstance(e.get(k), (int, float)) for e in (ea, eb) for k in ("ci_low", "ci_high")):
        apart = ea["ci_low"] > eb["ci_high"] or eb["ci_low"] > ea["ci_high"]
        overlap = "intervals disjoint" if apart else "intervals overlap"
    return texts[0], texts[1], f"unpaired ({p.why}): {overlap}"


def labeled(record: dict[str, Any]) -> int | None:
    """Labeled examples a run's answers depend on: its fit's, its selection's and each query's
    demonstrations (the record's `budget`); None for a record made before budgets were kept."""
    spent = record.get("budget")
    keys = ("fit_examples", "selection_examples", "demonstrations_per_query")
    if not isinstance(spent, dict) or not all(isinstance(spent.get(k), int) for k in keys):
        return None
    return int(sum(spent[k] for k in keys))


def budget_text(record: dict[str, Any]) -> str:
    """`fit + selection + per query` labeled examples, e.g. `400 + 0 + 2/q`."""
    spent = record.get("budget")
    if labeled(record) is None or not isinstance(spent, dict):
        return MISSING
    return f"{spent['fit_examples']} + {spent['selection_examples']} + {spent['demonstrations_per_query']}/q"


def paired_table(cells: list[Cell], pairs: list[Pair]) -> list[str]:
    """One model's table of each method minus the baseline (icl) on the same test episodes."""
    keys = {c.key for c in cells}
    mine = [p for p in pairs if p.a.key in keys and p.b.run.method == BASELINE]
    if not mine:
        others = any(c.run.method != BASELINE for c in cells)
        has_baseline = any(c.run.method == BASELINE for c in cells)
        return [] if has_baseline or not others else [f"No {BASELINE} test cell: no paired differences.", ""]
    lines = [
        f"Paired differences, each method minus {BASELINE} (percentage points): on the same test episodes (with "
        "several seeds, all of them: each seed's episodes paired, then pooled), "
        "with 95% paired bootstrap intervals (test queries resampled jointly, each with all its episodes: a "
        "query drawn twice is one piece of evidence), "
        f"{SIGNIFICANT} where the interval excludes zero; W/T/L: episodes only the method got right / "
        f"both or neither / only {BASELINE} got right; p: exact McNemar test on those discordant episodes, each query's episodes together (a query drawn several times is one unit). "
        "Runs without a samples log (`--log-samples`) are compared by their own intervals only: "
        "a point difference, and whether the two intervals overlap. Labeled: the examples whose labels each "
        "side used, fit + selection + demonstrations per query (the record's `budget`): a difference at "
        "unequal budgets is not a difference of methods alone (README: reading a comparison at unequal budgets).",
        "",
        _row(["Task", "Method", "Δ macro-F1", "Δ accuracy", "W/T/L", "McNemar p", "Labeled (method / icl)", "Basis"]),
        _row(["---"] * 8),
    ]
    order = {m: i for i, m in enumerate(method_order(c.run.method for c in cells))}
    for p in sorted(mine, key=lambda p: (p.a.run.task, order[p.a.run.method])):
        spent = f"{budget_text(p.a.run.record)} / {budget_text(p.b.run.record)}"
        if p.paired is None:
            macro, acc, basis = _unpaired(p)
            lines.append(_row([p.a.run.task, p.a.run.method, macro, acc, MISSING, MISSING, spent, basis]))
            continue
        r = p.paired
        lines.append(
            _row(
                [
                    p.a.run.task,
                    p.a.run.method,
                    MISSING if r.macro is None else _interval_text(r.macro),
                    _interval_text(r.accuracy),
                    f"{r.wins}/{r.ties}/{r.losses}",
                    f"{r.mcnemar_p:.3g}",
                    spent,
                    p.why,
                ]
            )
        )
    return [*lines, ""]


PAIRED_COLUMNS = (
    "model",
    "task",
    "split",
    "method",
    "baseline",
    "n",
    "d_macro",
    "d_macro_low",
    "d_macro_high",
    "d_accuracy",
    "d_accuracy_low",
    "d_accuracy_high",
    "wins",
    "ties",
    "losses",
    "mcnemar_p",
)


def write_paired_csv(pairs: list[Pair], path: Path) -> None:
    """Every paired comparison (both orders), differences as fractions."""
    with output(path) as f:
        writer = csv.writer(f)
        writer.writerow(PAIRED_COLUMNS)
        for p in pairs:
            r = p.paired
            if r is None:
                continue
            macro = ["", "", ""] if r.macro is None else [r.macro.value, r.macro.ci_low, r.macro.ci_high]
            acc = [r.accuracy.value, r.accuracy.ci_low, r.accuracy.ci_high]
            run = p.a.run
            writer.writerow(
                [run.model, run.task, run.split, run.method, p.b.run.method, r.n, *macro, *acc]
                + [r.wins, r.ties, r.losses, r.mcnemar_p]
            )


def class_view(cell: Cell, logs: Logs) -> tuple[list[str], Any] | None:
    """(label words, confusion matrix) of a classification cell with a samples log."""
    log, record = logs.get(cell.key), cell.run.record
    words = record.get("label_words")
    if log is None or _multiple_choice(record) or not isinstance(words, list) or not words:
        return None
    return words, confusion([x["gold"] for x in log], [x["pred"] for x in log], len(words))


# ---- csv --------------------------------------------------------------------------------------

CSV_COLUMNS = ("model", "task", "method", "split", "value", "ci_low", "ci_high", "setting", "per_class_f1")


def write_csv(cells: list[Cell], path: Path, logs: Logs | None = None) -> None:
    """Values as fractions (as in the records), one row per table cell; `per_class_f1` (from the
    samples log, empty without one) as `label=F1` pairs joined by `;`."""
    with output(path) as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for c in cells:
            r = c.run
            view = class_view(c, logs or {})
            per_class = "" if view is None else ";".join(f"{w}={f:.6g}" for w, f in zip(view[0], per_class_f1(view[1])))
            writer.writerow(
                [
                    r.model,
                    r.task,
                    r.method,
                    r.split,
                    r.value,
                    "" if r.ci_low is None else r.ci_low,
                    "" if r.ci_high is None else r.ci_high,
                    r.setting,
                    per_class,
                ]
            )


# ---- plots ------------------------------------------------------------------------------------


def safe_name(name: str) -> str:
    """File-name form of a model or task name (task names such as tweet_eval/emotion hold '/')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "unnamed"


def _pyplot() -> Any:  # matplotlib.pyplot, imported on first use
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _float(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


Axes = tuple[str, str, str]  # (x, y, one panel per value of): setting names, from a method's `grid_axes`


SCALE = (0.0, 100.0)  # the heatmap's fixed colour scale (%): differences look as large as they are


def heatmap_grids(
    runs: list[Scored], axes: Axes = ("strength", "ext_strength", "ext_shot")
) -> tuple[dict[Any, dict[tuple[float, float], float]], bool]:
    """panel value -> {(x, y): best value}, and whether any cell took a max over several runs (other
    hyperparameters such as ext_batch varied), which the title then says."""
    x_name, y_name, panel_name = axes
    grids: dict[Any, dict[tuple[float, float], float]] = {}
    merged = False
    for r in runs:
        hp = r.hyperparameters
        x, y = _float(hp.get(x_name)), _float(hp.get(y_name))
        if x is None or y is None:
            continue
        grid = grids.setdefault(hp.get(panel_name), {})
        merged |= (x, y) in grid
        grid[x, y] = max(grid.get((x, y), r.value), r.value)
    return grids, merged


def _episodes_text(runs: list[Scored]) -> str:
    counts = sorted({n for r in runs if isinstance(n := r.record.get("n_eval_episodes"), int)})
    if not counts:
        return "n unknown"
    return (
        f"n = {counts[0]} episodes per cell" if len(counts) == 1 else f"n = {counts[0]}-{counts[-1]} episodes per cell"
    )


def plot_heatmap(
    model: str, task: str, method: str, runs: list[Scored], path: Path, axes: Axes, names: dict[str, str]
) -> bool:
    """One panel per value of the third axis, so the landscape can be read at a glance; False if no grid.
    `names` gives each axis the label a reader knows (the paper's symbol beside the setting). The colour
    scale is fixed (SCALE), the episode count is in the title, and the setting `select` would pick is framed."""
    grids, merged = heatmap_grids(runs, axes)
    if not grids:
        return False
    plt = _pyplot()
    panels = sorted(grids, key=lambda s: (s is None, s if isinstance(s, (int, float)) else 0, str(s)))
    vmin, vmax = SCALE
    chosen = best_of(runs)
    chosen_hp = chosen.hyperparameters
    chosen_at = (chosen_hp.get(axes[2]), _float(chosen_hp.get(axes[0])), _float(chosen_hp.get(axes[1])))
    # the last, narrow column holds one colour bar shared by all panels (same vmin/vmax)
    fig, ax_row = plt.subplots(
        1, len(panels) + 1, figsize=(max(6.4, 4.2 * len(panels) + 1.2), 5.0), width_ratios=[1.0] * len(panels) + [0.06]
    )
    image = None
    for ax, panel in zip(ax_row[:-1], panels):
        mark = (chosen_at[1], chosen_at[2]) if chosen_at[0] == panel else None
        image = _heatmap_panel(ax, grids[panel], f"{names[axes[2]]} = {panel}", vmin, vmax, mark)
        ax.set_xlabel(names[axes[0]])
        ax.set_ylabel(names[axes[1]])
    used = "/".join(sorted({r.metric for r in runs}))
    ci = (
        f" [{_pct(chosen.ci_low)}, {_pct(chosen.ci_high)}]"
        if chosen.ci_low is not None and chosen.ci_high is not None
        else ""
    )
    note = "\neach cell: best over the other hyperparameters" if merged else ""
    fig.suptitle(
        f"{model} | {task} | {method} validation {used} (%)\n"
        f"{_episodes_text(runs)}\nred frame: the setting select picks, {_pct(chosen.value)}{ci}{note}",
        fontsize=10,
    )
    fig.colorbar(image, cax=ax_row[-1], label=f"{used} (%), fixed scale {vmin:g}-{vmax:g}")
    _save(fig, path)
    return True


def _heatmap_panel(
    ax: Any,
    grid: dict[tuple[float, float], float],
    title: str,
    vmin: float,
    vmax: float,
    mark: tuple[float | None, float | None] | None = None,
) -> Any:
    import numpy as np

    xs = sorted({x for x, _ in grid})
    ys = sorted({y for _, y in grid})
    data = np.full((len(ys), len(xs)), np.nan)
    for (x, y), v in grid.items():
        data[ys.index(y), xs.index(x)] = 100 * v
    image = ax.imshow(data, origin="lower", cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    middle = (vmin + vmax) / 2
    for i in range(len(ys)):
        for j in range(len(xs)):
            if not np.isnan(data[i, j]):
                colour = "black" if data[i, j] > middle else "white"
                ax.text(j, i, f"{data[i, j]:.1f}", ha="center", va="center", fontsize=9, color=colour)
    if mark is not None and mark[0] in xs and mark[1] in ys:
        from matplotlib.patches import Rectangle

        j, i = xs.index(mark[0]), ys.index(mark[1])
        ax.add_patch(Rectangle((j - 0.47, i - 0.47), 0.94, 0.94, fill=False, edgecolor="red", linewidth=2.5))
    ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
    ax.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
    ax.set_title(title)
    return image


HATCHES = ("", "//", "..", "xx", "\\\\", "++")  # after the 20 colours run out: the same colours hatched


def method_styles(methods: Iterable[str]) -> dict[str, tuple[Any, str]]:
    """(colour, hatch) of every method label of a report, one apiece and the same in every plot:
    the labels in the report's order take tab10's colours, then tab20's light ones, in turn (a protocol variant such as
    `icl@fixed` is a label of its own, not its base method's colour), then the colours again hatched."""
    plt = _pyplot()
    strong, light = plt.get_cmap("tab10"), plt.get_cmap("tab20")
    palette = [strong(i) for i in range(10)] + [light(2 * i + 1) for i in range(10)]  # 20, alike in no pair
    labels = method_order(methods)
    return {m: (palette[i % 20], HATCHES[(i // 20) % len(HATCHES)]) for i, m in enumerate(labels)}


def plot_bars(model: str, cells: list[Cell], metric: str, path: Path, styles: dict[str, tuple[Any, str]]) -> None:
    """Test values per task, grouped by method, with the bootstrap interval as error bars."""
    import numpy as np

    plt = _pyplot()
    methods = method_order(c.run.method for c in cells)
    tasks = sorted({c.run.task for c in cells})
    by_key = {(c.run.task, c.run.method): c.run for c in cells}
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(tasks) * max(1, len(methods)) ** 0.5 + 2), 4.5))
    for i, method in enumerate(methods):
        xs, heights, low, high = [], [], [], []
        for j, task in enumerate(tasks):
            run = by_key.get((task, method))
            if run is None:
                continue
            xs.append(j - 0.4 + width * (i + 0.5))
            heights.append(100 * run.value)
            low.append(max(0.0, 100 * (run.value - run.ci_low)) if run.ci_low is not None else 0.0)
            high.append(max(0.0, 100 * (run.ci_high - run.value)) if run.ci_high is not None else 0.0)
        colour, hatch = styles[method]
        ax.bar(xs, heights, width, yerr=np.array([low, high]), capsize=3, label=method, color=colour, hatch=hatch)
    crowded = len(tasks) > 3
    ax.set_xticks(range(len(tasks)), tasks, rotation=20 if crowded else 0, ha="right" if crowded else "center")
    ax.set_ylabel(f"test {metric} (%)")
    ax.set_ylim(0, 100)
    ax.set_title(
        f"{model}: test {metric} (%), setting chosen on validation\nerror bars: 95% bootstrap intervals",
        fontsize=10,
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def plot_budgets(model: str, cells: list[Cell], metric: str, path: Path, styles: dict[str, tuple[Any, str]]) -> bool:
    """Per task, each method's test value against the labeled examples it used (fit + selection +
    each query's demonstrations; log scale, 0 drawn at the axis' start): where a method gains over
    another by using many more labels, the plot shows it. False when no cell has a budget."""
    plt = _pyplot()
    tasks = sorted({c.run.task for c in cells if labeled(c.run.record) is not None})
    if not tasks:
        return False
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks) + 2.2, 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for cell in (c for c in cells if c.run.task == task):
            run, x = cell.run, labeled(cell.run.record)
            if x is None:
                continue
            colour, hatch = styles[run.method]
            low = 100 * (run.value - run.ci_low) if run.ci_low is not None else 0.0
            high = 100 * (run.ci_high - run.value) if run.ci_high is not None else 0.0
            marker = "o" if not hatch else "s"
            ax.errorbar(
                [max(x, 0.5)],
                [100 * run.value],
                yerr=[[max(low, 0.0)], [max(high, 0.0)]],
                fmt=marker,
                color=colour,
                capsize=3,
                label=run.method,
            )
        ax.set_xscale("log")
        ax.set_xlabel("labeled examples used (log; 0 drawn at 0.5)")
        ax.set_ylabel(f"test {metric} (%)")
        ax.set_ylim(0, 100)
        ax.set_title(task, fontsize=10)
        ax.grid(alpha=0.3)
    seen: dict[str, Any] = {}
    for a in axes[0]:
        for h, n in zip(*a.get_legend_handles_labels()):
            seen.setdefault(n, h)
    axes[0][-1].legend(list(seen.values()), list(seen), loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.suptitle(f"{model}: test {metric} (%) against labeled examples (fit + selection + per query)", fontsize=10)
    _save(fig, path)
    return True


def plot_confusion(cell: Cell, words: list[str], matrix: Any, path: Path) -> None:
    """Counts of (true, predicted) label pairs; colour by the share of each true class's episodes."""
    import numpy as np

    plt = _pyplot()
    k = len(words)
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.where(rows > 0, matrix / np.maximum(rows, 1), 0.0)
    size = max(4.5, 0.6 * k + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    image = ax.imshow(100 * share, cmap="Blues", vmin=0, vmax=100)
    for i in range(k):
        for j in range(k):
            colour = "white" if share[i, j] > 0.5 else "black"
            ax.text(
                j, i, f"{matrix[i, j]}\n{100 * share[i, j]:.0f}%", ha="center", va="center", fontsize=8, color=colour
            )
    crowded = k > 4
    ax.set_xticks(range(k), words, rotation=30 if crowded else 0, ha="right" if crowded else "center")
    ax.set_yticks(range(k), words)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    run = cell.run
    f1 = per_class_f1(matrix)
    ax.set_title(
        f"{run.model} | {run.task} | {run.method} {run.split}, n = {int(matrix.sum())} episodes\n"
        f"per-class F1 (%): " + ", ".join(f"{w} {_pct(v)}" for w, v in zip(words, f1)),
        fontsize=9,
    )
    fig.colorbar(image, ax=ax, label="share of the true class's episodes (%)")
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with output(path, binary=True) as f:
            fig.savefig(f, dpi=DPI, format="png")
    finally:
        plt.close(fig)


# ---- entry point ------------------------------------------------------------------------------


@contextmanager
def output(path: Path, binary: bool = False) -> Iterator[Any]:
    """A report file opened for writing, or one line (UsageError) saying why not: a directory, pipe or
    device of that name is refused before it is opened (a pipe would wait for a reader), and a write
    that fails says so instead of a traceback."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise UsageError(
            f"--out: '{path}' cannot be written ({exc.strerror}); accepted: a writable directory"
        ) from None
    if mode is not None and not stat.S_ISREG(mode):
        raise UsageError(
            f"--out: '{path}' is {files.kind(mode)}, not a file; accepted: remove it, or another --out directory"
        )
    try:
        with open(path, "wb") if binary else open(path, "w", newline="", encoding="utf-8") as f:
            yield f
    except OSError as exc:
        raise UsageError(
            f"--out: '{path}' could not be written ({exc.strerror}); accepted: a writable directory"
        ) from None


def write_report(
    records: list[dict[str, Any]], out_dir: str | Path, metric: str = "macro", base: str | Path | None = None
) -> list[Path]:
    """table.md, table.csv, heatmap_<model>_<task>.png and bars_<model>.png under out_dir; with
    samples logs (found relative to `base`, the results file's directory) also paired.csv and
    confusion_<model>_<task>_<method>.png."""
    check_metric(metric)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"--out '{out_dir}': cannot create directory ({exc.strerror}); accepted: a writable directory path"
        ) from None
    scored = score_records(records, metric)
    cells, untested = table_cells(scored)
    logs = load_logs(cells, base)
    written = [out / "table.md", out / "table.csv"]
    spreads = seed_spreads(cells, scored, metric, base)
    chosen = [c.run for c in cells if c.selected]
    pooled: list[Versus] = []
    if base is not None and several_seeds(chosen, scored):  # pairs over every seed, each log read once
        cache: LogCache = {}
        pairs, pooled = seed_pairs(cells, scored, base, cache), pooled_versus(chosen, scored, base, cache)
    else:
        pairs = all_pairs(cells, logs)
    with output(written[0]) as f:
        f.write(markdown(cells, untested, metric, pairs, spreads, pooled))
    shown = seeds_pooled(cells, spreads)  # what the CSV and the plots show, as the table does
    write_csv(shown, written[1], logs)
    if any(p.paired is not None for p in pairs):
        written.append(out / "paired.csv")
        write_paired_csv(pairs, written[-1])
    for cell in cells:
        view = class_view(cell, logs)
        if view is not None:
            model, task, method = cell.key
            path = out / f"confusion_{safe_name(model)}_{safe_name(task)}_{safe_name(method)}.png"
            plot_confusion(cell, *view, path)
            written.append(path)
    written += _heatmaps(scored, out)
    styles = method_styles(c.run.method for c in cells)  # one colour per method, the same in every plot
    for model in sorted({c.run.model for c in cells}):
        mine = [c for c in shown if c.run.model == model]
        path = out / f"bars_{safe_name(model)}.png"
        plot_bars(model, mine, metric, path, styles)
        written.append(path)
        path = out / f"budget_{safe_name(model)}.png"
        if plot_budgets(model, mine, metric, path, styles):
            written.append(path)
    return written


def _grid_methods() -> dict[str, tuple[Axes, dict[str, str]]]:
    """method -> (its declared heatmap axes, axis labels), for every method that declares a grid."""
    from .methods import METHODS
    from .runspec import PROTOCOL

    out = {}
    for name, cls in METHODS.items():
        if cls.grid_axes is None:
            continue
        declared = {s.name: s for s in (*PROTOCOL, *cls.declared_settings())}
        names = {a: f"{a} ({declared[a].symbol})" if a in declared and declared[a].symbol else a for a in cls.grid_axes}
        out[name] = (cls.grid_axes, names)
    return out


def _heatmaps(scored: list[Scored], out: Path) -> list[Path]:
    grids = _grid_methods()
    groups: dict[tuple[str, str, str], list[Scored]] = {}
    for s in latest_per_setting(scored):
        if s.record["method"] in grids and s.split == "validation":  # `iv@fixed` gets its own heatmap
            groups.setdefault((s.model, s.task, s.method), []).append(s)
    written = []
    for (model, task, method), runs in sorted(groups.items()):
        path = out / f"heatmap_{safe_name(model)}_{safe_name(task)}_{safe_name(method)}.png"
        axes, names = grids[runs[0].record["method"]]
        by_setting: dict[str, list[Scored]] = {}
        for r in runs:  # several seeds of one setting: one cell, their mean (as select ranks it)
            by_setting.setdefault(r.setting, []).append(r)
        runs = [over_seeds(same) for same in by_setting.values()]
        if plot_heatmap(model, task, method, runs, path, axes, names):
            written.append(path)
    return written
