"""What every release harness shares: the model and data ivlib would use, handed to a release's own code,
and the release's per-query answers turned into accuracy with ivlib's bootstrap interval.

A harness runs the authors' evaluation code from a checkout the user supplies (never a copy in
this project) and replaces only what the brief of a reproduction allows: where the model comes
from (ivlib's loader, so both sides run the same weights) and where the data come from (ivlib's
split, so both sides answer the same queries). Whatever else the release does (template, demo
sampling, scoring, selection) is its own. The few adapters below change no number: they let code
written for transformers 4.x and CUDA run on this machine (see `legacy_cache`, `hub_tokenizer_class`).

    python bench/releases/harness.py compare RELEASE.json IVLIB_RESULTS.jsonl [--method dt ...]
        # paired difference, the same queries answered by the release and by an ivlib run (--log-samples)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from ivlib.config import load_config, lookup  # noqa: E402
from ivlib.episodes import sample_episodes  # noqa: E402
from ivlib.errors import UsageError  # noqa: E402
from ivlib.metrics import bootstrap_f1  # noqa: E402
from ivlib.paired import compare as paired_compare  # noqa: E402
from ivlib.tasks import Task  # noqa: E402

DEFAULT_CONFIGS = ("config/local.yaml", "bench/releases/smollm2.yaml")


# ---- arguments -----------------------------------------------------------------------------------
def checkout(path: str, marker: str, release: str) -> Path:
    """The release checkout, refused in one line unless it holds the file the harness runs."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UsageError(f"--release '{path}' is not a folder; accepted: a checkout of {release}")
    if not (root / marker).is_file():
        raise UsageError(f"--release '{path}' has no {marker}; accepted: a checkout of {release} (its root folder)")
    return root.resolve()


def positive(name: str, value: int) -> int:
    if value < 1:
        raise UsageError(f"{name} {value} is out of range; accepted: an integer >= 1")
    return value


def add_common(ap: argparse.ArgumentParser, task: str, n: int) -> None:
    ap.add_argument("--release", required=True, help="path of a checkout of the release")
    ap.add_argument("-c", "--config", action="append", help=f"ivlib registries (default: {' '.join(DEFAULT_CONFIGS)})")
    ap.add_argument("-m", "--model", default="smollm2-135m", help="ivlib registry model (default smollm2-135m)")
    ap.add_argument("-t", "--task", default=task, help=f"ivlib task whose split the release gets (default {task})")
    ap.add_argument(
        "-n", "--queries", type=int, default=n, help=f"test queries: ivlib's stream for --seed (default {n})"
    )
    ap.add_argument("--seed", type=int, default=42, help="ivlib's query stream and the release's own seed (default 42)")
    ap.add_argument("--out", help="JSON summary with per-query answers (default results/releases/NAME.json)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: shared cores)")


# ---- model and data from ivlib --------------------------------------------------------------------
def load_lm(model: str, configs: Sequence[str] | None) -> Any:
    """ivlib's LoadedModel for a registry name, on CPU: the same weights an ivlib run gets."""
    import torch

    from ivlib.models import load_model

    registry = load_config(list(configs or DEFAULT_CONFIGS))
    return load_model(model, lookup(registry.models, "model", model), torch.device("cpu"), quiet=True)


def load_ivlib_task(name: str, configs: Sequence[str] | None, inputs: str = "stripped") -> Task:
    from ivlib.api import load_task

    return load_task(name, list(configs or DEFAULT_CONFIGS), inputs=inputs)


def query_rows(task: Task, split: str, n: int, seed: int) -> list[int]:
    """Rows of `split` an ivlib run with `--seed seed -n n` answers, in its order (episodic or fixed alike)."""
    episodes = sample_episodes(task.splits[split], task.n_classes, 0, positive("-n", n), seed, f"{split}/eval")
    return [int(e.query.index) for e in episodes]


def rows_as_records(task: Task, split: str, rows: Sequence[int], text: str, label: str) -> list[dict[str, Any]]:
    """The split's rows under the field names the release reads (e.g. GLUE's `sentence`/`label`)."""
    part = task.splits[split]
    return [{text: part.texts[i], label: int(part.labels[i])} for i in rows]


# ---- adapters that change no number -----------------------------------------------------------------
def legacy_cache(model: Any) -> Any:
    """Let `model` take and return the key/value cache as transformers 4.x did (a sequence of (key,
    value) per layer), which the releases index and pass back; transformers 5 wants a Cache object.
    The tensors are the same ones, so every score is unchanged (tests/test_release_harness.py)."""
    import inspect

    from transformers import DynamicCache

    inner = model.forward
    name = "cache" if "cache" in inspect.signature(inner).parameters else "past_key_values"  # renamed in 5.x

    def forward(*args: Any, past_key_values: Any = None, **kwargs: Any) -> Any:
        if isinstance(past_key_values, (list, tuple)):
            past_key_values = DynamicCache([(layer[0], layer[1]) for layer in past_key_values])
        if past_key_values is not None:
            kwargs[name] = past_key_values
        out = inner(*args, **kwargs)
        cache = out.get(name)
        if cache is not None and hasattr(cache, "layers"):
            out.past_key_values = tuple((layer.keys, layer.values) for layer in cache.layers)
        return out

    model.forward = forward
    return model


def hub_tokenizer_class(tokenizer: Any, name: str) -> Any:
    """Give ivlib's tokenizer the class name the release would have got from the hub.

    Some releases decide a prompt detail from the class name (I2CL: a leading space on the answer
    when the name contains 'gpt'). From the hub, SmolLM2's tokenizer is `GPT2TokenizerFast` under the
    transformers the releases pin; loaded from the GGUF file it is `TokenizersBackend`. Same object,
    same behaviour, only the name differs; an empty `name` keeps the loaded one."""
    if name and type(tokenizer).__name__ != name:
        tokenizer.__class__ = type(name, (type(tokenizer),), {})
    return tokenizer


class Py310Random:
    """The `random` module as Python <= 3.10 had it for `sample`: a set population is taken as
    `tuple(set)` (3.11 refuses sets). Releases written before 3.11 pass sets; everything else,
    the global generator's state included, is the real module's."""

    def __getattr__(self, name: str) -> Any:
        return getattr(random, name)

    @staticmethod
    def sample(population: Any, k: int, **kwargs: Any) -> list[Any]:
        if isinstance(population, (set, frozenset)):
            population = tuple(population)
        return random.sample(population, k, **kwargs)


@contextmanager
def patched(target: Any, name: str, value: Any) -> Iterator[None]:
    """Set `target.name` for the duration (the release's module attributes it looks up at run time)."""
    old = getattr(target, name)
    setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, old)


@contextmanager
def release_on_path(root: Path) -> Iterator[None]:
    """Import the release's modules from its checkout, and forget them afterwards (two releases
    both have a `utils`)."""
    before = set(sys.modules)
    sys.path.insert(0, str(root))
    cwd = os.getcwd()
    try:
        yield
    finally:
        os.chdir(cwd)
        sys.path.remove(str(root))
        for name in set(sys.modules) - before:
            module = sys.modules.get(name)
            if getattr(module, "__file__", None) and str(root) in str(module.__file__):
                del sys.modules[name]


# ---- numbers ---------------------------------------------------------------------------------------
def summary(gold: Sequence[int], pred: Sequence[int], n_classes: int, seed: int) -> dict[str, Any]:
    """Accuracy and macro-F1 with the bootstrap 95% intervals an ivlib record holds for the same answers
    (its `micro`, which is accuracy for single-label classification, and `macro`: the same resampling,
    seeded as ivlib seeds it, with the run's --seed)."""
    y, p = np.asarray(gold), np.asarray(pred)
    if len(y) == 0 or len(y) != len(p):
        raise ValueError(f"gold and predictions must be non-empty and of one length (got {len(y)}, {len(p)})")
    scores = bootstrap_f1(y, p, n_classes, seed=seed)
    return {"n": len(y), "accuracy": scores["micro"], "macro": scores["macro"]}


def pct(interval: dict[str, float]) -> str:
    """'71.3 [67.0, 75.4]': percent with one decimal, as ivlib prints numbers."""
    return f"{100 * interval['value']:.1f} [{100 * interval['ci_low']:.1f}, {100 * interval['ci_high']:.1f}]"


def sample_lines(rows: Sequence[int], gold: Sequence[int], pred: Sequence[int]) -> list[dict[str, Any]]:
    """Per-query answers in the fields of ivlib's samples log, so `compare` can pair them."""
    if not len(rows) == len(gold) == len(pred):
        raise ValueError(f"rows, gold and predictions differ in length ({len(rows)}, {len(gold)}, {len(pred)})")
    return [
        {"episode": i, "query_row": int(r), "gold": int(g), "pred": int(p), "correct": int(g) == int(p)}
        for i, (r, g, p) in enumerate(zip(rows, gold, pred))
    ]


def write_summary(path: str | None, default_name: str, data: dict[str, Any]) -> Path:
    out = Path(path) if path else ROOT / "results" / "releases" / f"{default_name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, out)
    return out


def run_context() -> dict[str, Any]:
    """Date, load and versions, for docs/reproductions.md."""
    import platform
    from datetime import UTC, datetime

    import torch
    import transformers

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


# ---- paired comparison with an ivlib run -----------------------------------------------------------------
def pair(release: list[dict[str, Any]], ivlib: list[dict[str, Any]], n_classes: int) -> dict[str, Any]:
    """ivlib minus the release on the very same queries (refused unless rows and gold labels align)."""
    if len(release) != len(ivlib) or any(
        a["query_row"] != b.get("query_row") or a["gold"] != b.get("gold") for a, b in zip(release, ivlib)
    ):
        raise UsageError(
            "the two runs did not answer the same queries in the same order; accepted: the same -t, -n, --seed"
        )
    gold = [a["gold"] for a in release]
    result = paired_compare(gold, [b["pred"] for b in ivlib], [a["pred"] for a in release], n_classes)
    agree = float(np.mean([a["pred"] == b["pred"] for a, b in zip(release, ivlib)]))
    return {
        "n": result.n,
        "accuracy": vars(result.accuracy),
        "agreement": agree,
        "wins": result.wins,
        "losses": result.losses,
    }


def same_queries(record: dict[str, Any], release: dict[str, Any], entry: str) -> bool:
    """Whether an ivlib record can have answered the release's queries: the same task, --seed and -n
    (a results file holds runs of several protocols, e.g. ICL under DT's 200 queries and I2CL's 500)."""
    return (
        record.get("task") == release.get("task")
        and record.get("seed") == release.get("seed")
        and record.get("n_eval_episodes") == len(release["answers"][entry])
    )


def _ivlib_lines(results: str, select: Callable[[dict[str, Any]], bool]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from ivlib.samples import read_samples

    records = [json.loads(x) for x in Path(results).read_text().splitlines() if x.strip()]
    chosen = [r for r in records if select(r) and r.get("samples")]
    if not chosen:
        raise UsageError(f"'{results}' has no matching record with a samples log; accepted: a run with --log-samples")
    lines = read_samples(chosen[-1], Path(results).parent)
    assert lines is not None, "a record with a samples entry has a log"
    return chosen[-1], lines


def compare_main(argv: Sequence[str]) -> None:
    ap = argparse.ArgumentParser(prog="harness.py compare", description="ivlib minus the release, same queries")
    ap.add_argument("release_json")
    ap.add_argument("ivlib_results")
    ap.add_argument("--method", help="the ivlib record's method (default: the last record with a samples log)")
    ap.add_argument("--model", help="the ivlib record's model (default: any)")
    ap.add_argument("--entry", default="headline", help="which of the release's answers (a key of its 'answers')")
    args = ap.parse_args(argv)
    release = json.loads(Path(args.release_json).read_text())
    by_item = "ranks" in release  # sv.py: the release answered every item once, ivlib draws items
    answers = release["ranks"] if by_item else release["answers"]
    if args.entry not in answers:
        raise UsageError(f"--entry '{args.entry}' unknown; accepted: {', '.join(answers)}")
    record, lines = _ivlib_lines(
        args.ivlib_results,
        lambda r: (
            args.method in (None, r.get("method"))
            and args.model in (None, r.get("model"))
            and (r.get("seed") == release.get("seed") if by_item else same_queries(r, release, args.entry))
        ),
    )
    if by_item:
        theirs, lines = release_by_item(answers[args.entry], lines), [hit_line(x, x["correct"]) for x in lines]
        paired = pair(theirs, lines, 2)
    else:
        paired = pair(answers[args.entry], lines, release["n_classes"])
    print(
        f"ivlib {record['method']} ({record['model']}) minus {release['release']} ({args.entry}) on the same "
        f"{paired['n']} {'items' if by_item else 'queries'}: accuracy {pct(paired['accuracy'])} points, "
        f"answers agree on {100 * paired['agreement']:.1f}%"
    )


def hit_line(line: dict[str, Any], right: bool) -> dict[str, Any]:
    """An open-vocabulary answer as a two-class line: gold 0, predicted 0 when right."""
    return {"query_row": line["query_row"], "gold": 0, "pred": 0 if right else 1}


def release_by_item(ranks: Sequence[int], lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The release's answer to each item an ivlib run drew (State Vector answers each of its test items
    once; an ivlib run draws its queries from those items with replacement): paired item by item,
    right when the release ranked the answer's first token first."""
    if any(not 0 <= x["query_row"] < len(ranks) for x in lines):
        raise UsageError(f"the ivlib run drew items beyond the release's {len(ranks)}; accepted: a run on its split")
    return [hit_line(x, ranks[x["query_row"]] == 0) for x in lines]


def guarded(main: Callable[[], None], name: str) -> None:
    """Run a harness's main: a bad argument is one line on stderr and exit code 2, as in ivlib's CLI."""
    try:
        main()
    except UsageError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    if sys.argv[1:2] != ["compare"]:
        raise SystemExit(
            "usage: python bench/releases/harness.py compare RELEASE.json IVLIB_RESULTS.jsonl [--method M]"
        )
    guarded(lambda: compare_main(sys.argv[2:]), "harness.py")
