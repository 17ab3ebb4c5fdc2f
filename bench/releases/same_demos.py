"""ivlib with the release's own demonstrations: what is left of a release-vs-ivlib gap once both see
the very same demonstration set and queries.

Under a fixed-demonstration protocol (Deep-Thinking's, I2CL's few-shot baseline) the one set drawn
per seed dominates the variance, and a release draws it with its own generator: ivlib's set for the
same seed is another one. This takes a harness's summary (dt.py, i2cl.py), reads the
demonstrations the release used, and scores the same queries with ivlib under the release's
protocol with that set in place of ivlib's (`experiment.demo_set` returns it): ICL (paired with the
release's few-shot answers, or Deep-Thinking's step 1); for Deep-Thinking also DT at the steps
the harness kept (`--dt-step`: the release's reported step and its last); for I2CL also I2CL
calibrated on the release's demonstrations (its one training episode holds them). What differs then is the
implementation alone (tokenization at the demonstrations' end, padding, numerics).

    python bench/releases/same_demos.py results/releases/dt-sst2-local-seed42.json
    python bench/releases/same_demos.py results/releases/i2cl-sst2-local-seed42.json --icl-only
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import harness
from harness import UsageError

import ivlib
from ivlib import experiment
from ivlib.episodes import Episode, Example

# How each release writes one demonstration of a sentiment task (the input template, a space, the label).
DEMO = re.compile(r"Review: (.*?)\nSentiment: (\w+)")
RELEASES = {  # release -> (ivlib template family, scoring rule)
    "deep-thinking": ("dt", "full"),
    "i2cl": ("i2cl", "first-token"),
}


def demonstrations(text: str, task: Any) -> tuple[Example, ...]:
    """The release's demonstration string as ivlib examples, in prompt order (rows found in train)."""
    train = task.splits["train"]
    where = {t.strip(): i for i, t in enumerate(train.texts)}
    found = []
    for sentence, label in DEMO.findall(text):
        if label not in task.label_words:
            raise UsageError(f"demonstration label '{label}' is not a label word of '{task.name}'")
        row = where.get(sentence.strip())
        found.append(Example(sentence, task.label_words.index(label), index=row))
    if not found:
        raise UsageError("no demonstration found in the release's summary")
    return tuple(found)


def release_demos(summary: dict[str, Any]) -> str:
    if summary["release"] == "deep-thinking":
        return str(summary["exemplars"])
    return str(summary["result_dict"]["demon"]["run_0"][0])


ALIASES = {"icl": "icl/run0", "headline": "i2cl/run0"}  # i2cl.py's names of its one run's answers


def paired(summary: dict[str, Any], entry: str, rows: list[int], ev: Any) -> dict[str, Any]:
    lines = harness.sample_lines(rows, ev.labels.tolist(), ev.predictions.tolist())
    kept = summary["summaries"]
    return {
        "ivlib": harness.summary(ev.labels, ev.predictions, summary["n_classes"], summary["seed"]),
        "release": kept[entry] if entry in kept else kept[ALIASES[entry]],
        "paired": harness.pair(summary["answers"][entry], lines, summary["n_classes"]),
    }


def i2cl_fit(lm: Any, task: Any, demos: tuple[Example, ...], summary: dict[str, Any]) -> Any:
    """ivlib's I2CL calibrated on the release's demonstrations (its one training episode holds them,
    in the release's order), with the release's settings: 5 per class, one set, its template."""
    episode = Episode(demos, demos[0])  # I2CL reads the episode's demonstrations only
    with harness.patched(experiment, "fit_episodes", lambda *a, **k: ([episode], None)):
        return ivlib.fit(
            "i2cl",
            lm,
            task,
            ext_shot=len(demos) // task.n_classes,
            episodes=1,
            i2cl_sets=1,
            template="i2cl",
            score="first-token",
            seed=summary["seed"],
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("summary", help="a harness's JSON (dt.py, i2cl.py)")
    ap.add_argument("-c", "--config", action="append", help="ivlib registries (default: the harness's)")
    ap.add_argument("-m", "--model", default="smollm2-135m-nobos", help="(default: without BOS, as the releases)")
    ap.add_argument("--icl-only", action="store_true", help="score ICL only (no DT steps)")
    ap.add_argument("--out", help="JSON (default: beside the summary, *-same-demos.json)")
    args = ap.parse_args()
    path = Path(args.summary)
    summary = json.loads(path.read_text())
    if summary.get("release") not in RELEASES:
        raise UsageError(f"'{path}' is no dt.py or i2cl.py summary; accepted: {', '.join(RELEASES)} summaries")
    template, score = RELEASES[summary["release"]]
    task = harness.load_ivlib_task(summary["task"], args.config)
    demos = demonstrations(release_demos(summary), task)
    shot = len(demos) // task.n_classes
    rows = [line["query_row"] for line in summary["answers"]["icl"]]
    lm = harness.load_lm(args.model, args.config)
    common = dict(
        split="test", n=len(rows), seed=summary["seed"], shot=shot, demos="fixed", template=template, score=score
    )
    results: dict[str, Any] = {"demonstrations": [(d.text, d.label, d.index) for d in demos]}
    with harness.patched(experiment, "demo_set", lambda *a: demos):
        ev = ivlib.evaluate("icl", lm, task, **common)
        results["icl"] = paired(summary, "icl", rows, ev)
        if summary["release"] == "i2cl" and not args.icl_only:
            results["i2cl"] = paired(
                summary, "headline", rows, ivlib.evaluate(i2cl_fit(lm, task, demos, summary), lm, task, **common)
            )
        if summary["release"] == "deep-thinking" and not args.icl_only:
            for entry in ("headline", "final"):
                step = summary["steps_chosen"][entry]
                fit = dict(shot=shot, demos="fixed", template=template, score=score, seed=summary["seed"])
                method = ivlib.fit("dt", lm, task, select_episodes=1, dt_step=step, **fit)
                results[f"dt@{step}"] = paired(summary, entry, rows, ivlib.evaluate(method, lm, task, **common))
    out = Path(args.out) if args.out else path.with_name(path.stem + "-same-demos.json")
    out.write_text(json.dumps(results, indent=1) + "\n")
    for name, r in results.items():
        if name == "demonstrations":
            continue
        p = r["paired"]
        print(
            f"{name} with {summary['release']}'s demonstrations: ivlib {harness.pct(r['ivlib']['accuracy'])}, "
            f"release {harness.pct(r['release']['accuracy'])}; ivlib minus release {harness.pct(p['accuracy'])} "
            f"points, answers agree on {100 * p['agreement']:.1f}% of {p['n']}"
        )


if __name__ == "__main__":
    harness.guarded(main, "same_demos.py")
