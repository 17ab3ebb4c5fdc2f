"""The report from a crafted results file: bold cells, average row, daggers, CSV rows, real PNGs."""

from __future__ import annotations

import csv
import itertools
import json

import pytest

from ivlib import analyze
from ivlib.report import safe_name, write_report
from ivlib.selection import load_records

M1, M2 = "smollm2-135m", "tiny-llama"
RT, EMO, AG = "rotten_tomatoes-local", "tweet_eval/emotion", "ag_news"
ICL_HP = {"shot": 1, "ext_shot": None, "episodes": None, "max_example_tokens": 256}
BEST_IV = (4, 0.5, 0.3)  # ext_shot, strength, ext_strength


def iv_hp(ext_shot: int, strength: float, ext_strength: float) -> dict:
    return {
        "strength": strength,
        "ext_strength": ext_strength,
        "ext_batch": 10,
        "shot": 1,
        "ext_shot": ext_shot,
        "episodes": 200,
        "max_example_tokens": 256,
    }


def rec(model: str, task: str, method: str, split: str, hp: dict, value: float) -> dict:
    return {
        "method": method,
        "model": model,
        "task": task,
        "split": split,
        "hyperparameters": hp,
        "seed": 42,
        "n_eval_episodes": 200,
        "time": "2026-11-24T17:00:00+00:00",
        "metrics": {"macro": {"value": value, "ci_low": value - 0.05, "ci_high": value + 0.05}},
        "command": ["-m", model, "-t", task, "--method", method],
    }


def iv_grid(model: str, task: str, best: float) -> list[dict]:
    """Validation sweep whose maximum is at BEST_IV; the rest score lower by distinct amounts."""
    out = []
    for i, (shot, s, e) in enumerate(itertools.product((1, 4), (0.3, 0.5), (0.1, 0.3))):
        value = best if (shot, s, e) == BEST_IV else best - 0.02 * (i + 1)
        out.append(rec(model, task, "iv", "validation", iv_hp(shot, s, e), value))
    return out


def crafted() -> list[dict]:
    records = []
    for model, task in [(M1, RT), (M1, EMO), (M1, AG), (M2, RT)]:
        records += iv_grid(model, task, 0.7)
    for model, task in [(M1, RT), (M1, EMO), (M2, RT)]:
        records += [rec(model, task, m, "validation", ICL_HP, 0.5) for m in ("zero-shot", "icl")]
    test = {  # (model, task): {method: test value}; tv has no validation runs: dagger
        (M1, RT): {"zero-shot": 0.50, "icl": 0.60, "iv": 0.712, "tv": 0.70},
        (M1, EMO): {"zero-shot": 0.30, "icl": 0.45, "iv": 0.40, "tv": 0.20},
        (M2, RT): {"zero-shot": 0.55, "icl": 0.65, "iv": 0.62},
    }
    for (model, task), values in test.items():
        for method, value in values.items():
            hp = iv_hp(*BEST_IV) if method == "iv" else ICL_HP if method != "tv" else {"layer": 3, "shot": 1}
            records.append(rec(model, task, method, "test", hp, value))
    # a test run of a setting not chosen on validation: must not reach the table
    records.append(rec(M1, RT, "iv", "test", iv_hp(1, 0.3, 0.1), 0.99))
    # ag_news: iv chosen on validation but never tested; icl tested without validation runs
    records.append(rec(M1, AG, "icl", "test", ICL_HP, 0.80))
    return records


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    results = tmp / "runs.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in crafted()))
    paths = write_report(load_records(results), tmp / "out")
    return tmp / "out", paths


def section(md: str, model: str) -> str:
    return md.split(f"## {model}\n", 1)[1].split("\n## ", 1)[0]


def row(md: str, model: str, first_cell: str) -> str:
    return next(line for line in section(md, model).splitlines() if line.startswith(f"| {first_cell} |"))


def test_table_marks_the_known_best_in_bold(report):
    out, _ = report
    md = (out / "table.md").read_text()
    assert row(md, M1, "Task") == "| Task | zero-shot | icl | tv | iv |"
    assert row(md, M1, RT) == (
        "| rotten_tomatoes-local | 50.0 [45.0, 55.0] | 60.0 [55.0, 65.0] | 70.0† [65.0, 75.0] | **71.2** [66.2, 76.2] |"
    )
    assert "| **45.0** [40.0, 50.0] |" in row(md, M1, EMO)
    assert row(md, M1, AG) == "| ag_news | – | **80.0**† [75.0, 85.0] | – | – |"
    assert row(md, M1, "Average") == "| Average | 40.0 | 52.5 | 45.0 | **55.6** |"  # ag_news left out
    assert row(md, M2, "Task") == "| Task | zero-shot | icl | iv |"
    assert row(md, M2, "Average") == "| Average | 55.0 | **65.0** | 62.0 |"
    assert "99.0" not in md  # the unchosen setting's test run
    assert "† No validation runs" in md and "- smollm2-135m / ag_news / iv" in md


def test_csv_has_one_row_per_cell(report):
    out, _ = report
    with open(out / "table.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "model",
        "task",
        "method",
        "split",
        "value",
        "ci_low",
        "ci_high",
        "setting",
        "per_class_f1",
    ]
    assert sorted((r["model"], r["task"], r["method"]) for r in rows) == sorted(
        [(M1, AG, "icl")]
        + [(M1, t, m) for t in (RT, EMO) for m in ("zero-shot", "icl", "tv", "iv")]
        + [(M2, RT, m) for m in ("zero-shot", "icl", "iv")]
    )
    iv = next(r for r in rows if (r["model"], r["task"], r["method"]) == (M1, RT, "iv"))
    assert iv["split"] == "test" and float(iv["value"]) == 0.712
    assert json.loads(iv["setting"]) == iv_hp(*BEST_IV)


def test_pngs_are_real_images(report):
    import matplotlib.image

    out, paths = report
    expected = {f"heatmap_{safe_name(m)}_{safe_name(t)}_iv.png" for m, t in [(M1, RT), (M1, EMO), (M1, AG), (M2, RT)]}
    expected |= {f"bars_{M1}.png", f"bars_{M2}.png"}
    assert "heatmap_smollm2-135m_tweet_eval_emotion_iv.png" in expected
    assert {p.name for p in paths} == expected | {"table.md", "table.csv"}
    for name in expected:
        path = out / name
        assert path.stat().st_size > 5_000, name
        pixels = matplotlib.image.imread(path)
        assert pixels.std() > 0 and not (pixels == pixels[0, 0]).all(), name


def test_cli_report_prints_the_paths(report, tmp_path, capsys):
    out, _ = report
    results = tmp_path / "runs.jsonl"
    results.write_text(json.dumps(rec(M1, RT, "icl", "test", ICL_HP, 0.6)) + "\n")
    assert analyze.main(["report", "--results", str(results), "--out", str(tmp_path / "r")]) == 0
    printed = capsys.readouterr().out.split()
    assert printed[:2] == [str(tmp_path / "r" / "table.md"), str(tmp_path / "r" / "table.csv")]
    assert (tmp_path / "r" / f"bars_{M1}.png").exists()


def test_cli_report_unknown_metric_is_a_one_line_error(tmp_path, capsys):
    results = tmp_path / "runs.jsonl"
    results.write_text(json.dumps(rec(M1, RT, "icl", "test", ICL_HP, 0.6)) + "\n")
    assert analyze.main(["report", "--results", str(results), "--metric", "f1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["iv.py: error: --metric 'f1' is unknown; accepted: macro, micro, weighted, accuracy"]


def test_heatmap_cells_take_the_best_over_other_hyperparameters():
    from ivlib.report import heatmap_grids
    from ivlib.selection import score_records

    runs = [
        rec(M1, RT, "iv", "validation", {**iv_hp(4, 0.5, 0.3), "ext_batch": b}, v) for b, v in ((0, 0.6), (10, 0.7))
    ]
    runs.append(rec(M1, RT, "iv", "validation", {"ext_shot": 4}, 0.9))  # no strengths: not placeable
    grids, merged = heatmap_grids(score_records(runs))
    assert grids == {4: {(0.5, 0.3): 0.7}} and merged


def test_table_states_each_cells_episodes_and_setting(report):
    out, _ = report
    details = section((out / "table.md").read_text(), M1).split("Cells in detail", 1)[1]
    iv_row = next(line for line in details.splitlines() if line.startswith(f"| {RT} | iv |"))
    assert iv_row == (
        f"| {RT} | iv | 200 | `strength=0.5, ext_strength=0.3, ext_batch=10, shot=1, ext_shot=4, episodes=200, "
        "max_example_tokens=256` |"
    )
    assert f"| {RT} | tv† | 200 | `layer=3, shot=1` |" in details


def test_heatmap_has_a_fixed_scale_the_episode_count_and_the_chosen_cell_framed(tmp_path, monkeypatch):
    """86 vs 89 must not look dramatic: the colour scale is 0-100 whatever the grid holds; the title
    says n; the setting select picks is framed."""
    from ivlib import report as report_module
    from ivlib.selection import score_records

    panels, titles = [], []
    real_panel = report_module._heatmap_panel

    def spy(ax, grid, title, vmin, vmax, mark=None):
        panels.append((title, vmin, vmax, mark))
        return real_panel(ax, grid, title, vmin, vmax, mark)

    monkeypatch.setattr(report_module, "_heatmap_panel", spy)
    real_save = report_module._save
    monkeypatch.setattr(
        report_module, "_save", lambda fig, path: (titles.append(fig._suptitle.get_text()), real_save(fig, path))
    )
    runs = score_records(iv_grid(M1, RT, 0.89))
    names = {"strength": "strength (a2)", "ext_strength": "ext_strength (a1)", "ext_shot": "ext_shot"}
    assert report_module.plot_heatmap(
        M1, RT, "iv", runs, tmp_path / "h.png", ("strength", "ext_strength", "ext_shot"), names
    )
    assert {(vmin, vmax) for _, vmin, vmax, _ in panels} == {(0.0, 100.0)}
    marks = {title: mark for title, _, _, mark in panels}
    # BEST_IV = (ext_shot 4, strength 0.5, ext_strength 0.3): framed in the ext_shot = 4 panel only
    assert marks == {"ext_shot = 1": None, "ext_shot = 4": (0.5, 0.3)}
    assert "n = 200 episodes per cell" in titles[0] and "select picks, 89.0 [84.0, 94.0]" in titles[0]
