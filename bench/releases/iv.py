"""Iterative Vectors' own code (ArkciaTheDragon/iterative-vectors, `iv.py`) on ivlib's model and data,
and ivlib's IV on the very episodes the release drew.

Runs the release's `iv.py` as its `script.sh` test step does (extraction, then evaluation with
`--run-test`; `--clean` runs its ICL baseline, `--run-clean`), with these replaced from outside:

  model      `util.load_tokenizer_and_model` returns ivlib's SmolLM2-135M (float32) and a copy of its
             tokenizer (the release's Verbalizer adds a marker token to the tokenizer it is given).
             The layers it hooks are every block's attention output projection, named from ivlib's
             layout in a config file merged over the release's `config/base.yaml` (written into a
             temporary folder, with its result files, never into the checkout)
  data       `util.load_dataset_splits` returns ivlib's train, validation and test splits of the
             task as `datasets.Dataset`s with GLUE's fields (`sentence`, a `label` ClassLabel of
             ivlib's label words, `idx`: the row in ivlib's split). That function is the release's
             whole loader, so its swap of train for test (it returns the test split as train) goes
             with it: here, as in ivlib, the vectors are extracted from train

and one adapter that changes no number: of baukit only `nethook.py` is loaded (`sv.baukit_tracedict`).
Its episodes are its own (numpy RandomState(seed), `FewshotDataset.random_episode`: demonstrations
and query from the evaluated split, 1-shot demonstrations in class order), and so are its prompts
(the Verbalizer's tokens), its reads, its edits and its answer (the argmax over the labels' first
tokens). The harness records, without changing them, what `random_episode` returns and what
`util.verbalize` tokenizes; the answers are `iv.py`'s own `edit_result` (`clean_result`) and
`true_labels`, checked against the micro-F1 it writes to its result file.

ivlib's IV then runs on the release's recorded episodes (the same extraction episodes, the
demonstrations in the release's prompt order, the same evaluation episodes), twice: with ivlib's
own prompts (its tokenization of the same text) and with the release's token ids (each prompt cut
at the query's separator). It reports the difference between the two sides' vectors and the paired
difference of their answers. `--read-at-separator` is a diagnosis, not the release's protocol: the
release's zero-shot read (one token before the separator) is moved onto the separator, by handing
its extraction the zero-shot prompt's separator mask one position later.

    python bench/releases/iv.py --release /tmp/releases/iv --deps /tmp/releases/deps -n 500
    python bench/releases/iv.py --release PATH --deps DIR -n 500 --clean          # its ICL baseline
    python bench/releases/iv.py --release PATH --deps DIR -n 500 --read-at-separator
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import runpy
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import harness
import sv
from harness import UsageError

from ivlib.episodes import Episode, Example
from ivlib.prompts import EncodedPrompt


class Recording:
    """What the release drew and tokenized, in call order: each `random_episode` as (split, support
    rows, query row), each `verbalize` call as (its samples, token ids, separator positions).
    (A plain class: the tests load this file by path, where a dataclass cannot resolve its module.)"""

    def __init__(
        self,
        episodes: list[tuple[str, list[int], int]] | None = None,
        prompts: list[tuple[list[tuple[str, str]], list[int], list[int]]] | None = None,
    ) -> None:
        self.episodes = episodes if episodes is not None else []
        self.prompts = prompts if prompts is not None else []


def release_args(args: argparse.Namespace, config: str, task_key: str) -> list[str]:
    """The command line of the release's script.sh test step, with this run's settings."""
    return [
        "iv.py",
        *("-c", config, "-m", args.model, "-t", f"ivlib/{task_key}", "-g", "0"),
        *("-e", str(args.episodes), "-s", str(args.ext_shot), "--ext-batch", str(args.ext_batch)),
        *("--strength", str(args.strength), "--ext-strength", str(args.ext_strength)),
        *("--shot", str(args.shot), "-n", str(args.queries), "--seed", str(args.seed), "--run-test"),
        *(["--run-clean"] if args.clean else []),
    ]


def release_config(lm: Any, name: str, folder: Path) -> Path:
    """A config merged over the release's base.yaml: the model's hooked layers (every attention output
    projection, as the release's own entries list them) and result files in `folder`."""
    import yaml

    layout = lm.layout.describe()
    attn = f"{layout['blocks']}.{{}}.{layout['attn_out']}"
    config = {
        "models": {name: f"ivlib:{name}"},
        "no_split_layer": {name: type(lm.layout.blocks[0]).__name__},
        "target_layer": {name: [attn, 0, layout["n_layers"]]},
        "tv_target_layer": {name: [f"{layout['blocks']}.{{}}", 0, layout["n_layers"]]},
        "merge": {f"{k}_result_fn": str(folder / f"{k}.txt") for k in ("clean", "edit", "test", "fv", "tv")},
    }
    path = folder / "ivlib.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def as_dataset(task: Any, split: str) -> Any:
    """An ivlib split as the `datasets.Dataset` the release reads (GLUE's fields; `idx` is the row)."""
    import datasets

    part = task.splits[split]
    features = datasets.Features(
        {
            "sentence": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(task.label_words)),
            "idx": datasets.Value("int64"),
        }
    )
    rows = {"sentence": list(part.texts), "label": [int(y) for y in part.labels], "idx": list(range(len(part.texts)))}
    return datasets.Dataset.from_dict(rows, features=features)


def recorders(util: Any, record: Recording, names: dict[int, str], shift_single: bool) -> dict[str, Any]:
    """Stand-ins for `FewshotDataset.random_episode` and `verbalize` that call the release's own and
    record what they return; with `shift_single`, a one-sample prompt's separator mask moves one
    position later (the diagnosis: the zero-shot read lands on the separator)."""
    episode, verbalize = util.FewshotDataset.random_episode, util.verbalize

    def random_episode(self: Any, *a: Any, **k: Any) -> Any:
        support, query = episode(self, *a, **k)
        record.episodes.append((names[id(self.dataset)], [int(i) for i in support["idx"]], int(query["idx"][0])))
        return support, query

    def verbalize_recorded(verbalizer: Any, samples: list[dict[str, str]], device: Any) -> Any:
        token, ans_mask, io_mask = verbalize(verbalizer, samples, device)
        seps = io_mask[0].nonzero().flatten().tolist()
        pairs = [(s["input"], s["output"]) for s in samples]
        record.prompts.append((pairs, token["input_ids"][0].tolist(), seps))
        if shift_single and len(samples) == 1:
            io_mask = io_mask.roll(1, dims=1)
        return token, ans_mask, io_mask

    return {"random_episode": random_episode, "verbalize": verbalize_recorded}


def run_release(root: Path, args: argparse.Namespace, lm: Any, data: dict[str, Any]) -> dict[str, Any]:
    """Execute iv.py as __main__ with model and data replaced; its answers, vectors and what it drew."""
    import torch

    record = Recording()
    tokenizer = copy.deepcopy(lm.tokenizer)
    with harness.release_on_path(root), ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        os.chdir(root)
        import util

        names = {id(d): split for split, d in data.items()}
        found = recorders(util, record, names, args.read_at_separator)
        config = release_config(lm, args.model, Path(tmp))
        argv = release_args(args, str(config), args.task_key)
        for target, name, value in (
            (util, "load_tokenizer_and_model", lambda *a, **k: (tokenizer, lm.model)),
            (util, "load_dataset_splits", lambda *a, **k: (data["train"], data["validation"], data["test"])),
            (util.FewshotDataset, "random_episode", found["random_episode"]),
            (util, "verbalize", found["verbalize"]),
            (sys, "argv", argv),
        ):
            stack.enter_context(harness.patched(target, name, value))
        out = runpy.run_path(str(root / "iv.py"), run_name="__main__")
        written = Path(tmp, "clean.txt" if args.clean else "test.txt").read_text()
    ivs = out.get("ivs")
    vectors = None if ivs is None else torch.stack([ivs[k].float().cpu() for k in out["args"].target_layers])
    answers = out["clean_result"] if args.clean else out["edit_result"]
    return {
        "answers": [int(a) for a in answers],
        "true_labels": [int(y) for y in out["true_labels"]],
        "i2label": dict(out["i2label"]),
        "first_tokens": [int(t) for t in out["first_tokens"].values()],
        "ex_sep": list(out["vb"].ex_sep_ids),
        "written": written.strip(),
        "vectors": vectors,
        "record": record,
        "argv": argv,
    }


def written_scores(line: str) -> dict[str, float]:
    """The micro/macro/weighted F1 (percent) on the release's result line."""
    return {k: float(v) for k, v in re.findall(r"\b(micro|macro|weighted)=([0-9.]+)", line)}


# ---- the release's episodes and prompts, as ivlib's ---------------------------------------------
def in_prompt_order(task: Any, split: str, support: list[int], query: int, pairs: list[tuple[str, str]]) -> Episode:
    """The episode as the release posed it: its demonstrations in the prompt's order (the release
    permutes extraction prompts with torch.randperm), matched by text and label among the drawn rows."""
    part, words = task.splits[split], task.label_words
    left = list(support)
    demos = []
    for text, word in pairs[:-1]:
        row = next((r for r in left if part.texts[r] == text and words[int(part.labels[r])] == word), None)
        if row is None:
            raise SystemExit(f"iv.py: the release's prompt holds '{text[:40]}' ({word}), not among its episode's rows")
        left.remove(row)
        demos.append(Example(part.texts[row], int(part.labels[row]), index=row))
    if pairs[-1][0] != part.texts[query]:
        raise SystemExit(f"iv.py: the release's query text is not row {query} of {split}")
    return Episode(tuple(demos), Example(part.texts[query], int(part.labels[query]), index=query))


def release_prompt(
    episode: Episode, ids: list[int], seps: list[int], n_classes: int, ex_sep: list[int]
) -> EncodedPrompt:
    """The release's token ids as an ivlib prompt, cut at the query's separator (the release appends
    the query's answer; every read and edit is at or before the separator, so causally the same)."""
    end = seps[-1] + 1
    start = 0
    for i in range(end - len(ex_sep), -1, -1):  # the query begins after the last example separator
        if ids[i : i + len(ex_sep)] == ex_sep:
            start = i + len(ex_sep)
            break
    classes = [d.label for d in episode.demos] + [n_classes]
    if len(seps) != len(classes):
        raise SystemExit(f"iv.py: a release prompt has {len(seps)} separators for {len(classes)} examples")
    return EncodedPrompt(ids[:end], seps, classes, episode.query.label, start)


def episodes_and_prompts(
    task: Any, record: Recording, extraction: int, ex_sep: list[int]
) -> tuple[list[Episode], list[Episode], dict[Episode, EncodedPrompt]]:
    """(extraction episodes, evaluation episodes, the release's prompt of each episode and zero-shot query)."""
    calls = iter(record.prompts)
    fit, evaluated, tokens = [], [], {}
    for i, (split, support, query) in enumerate(record.episodes):
        pairs, ids, seps = next(calls)
        episode = in_prompt_order(task, split, support, query, pairs)
        tokens[episode] = release_prompt(episode, ids, seps, task.n_classes, ex_sep)
        if i < extraction:
            _, ids, seps = next(calls)  # the zero-shot prompt of its query
            tokens[episode.query_only()] = release_prompt(episode.query_only(), ids, seps, task.n_classes, ex_sep)
            fit.append(episode)
        else:
            evaluated.append(episode)
    return fit, evaluated, tokens


class ReleaseTokens:
    """ivlib's prompt encoder, except that `encode` gives the release's token ids of each episode."""

    def __init__(self, inner: Any, tokens: dict[Episode, EncodedPrompt]) -> None:
        self.inner, self.tokens = inner, tokens

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def encode(self, episode: Episode) -> EncodedPrompt:
        return self.tokens[episode]


# ---- ivlib on the release's episodes ---------------------------------------------------------------
def ivlib_run(
    lm: Any, task: Any, args: argparse.Namespace, episodes: tuple[list[Episode], list[Episode]], tokens: Any
) -> dict[str, Any]:
    """ivlib's IV (ICL with --clean) fitted on the release's extraction episodes and scored on its
    evaluation episodes: ivlib's own fit, edit and scorer; its own prompts, or (`tokens`) the release's."""
    import ivlib
    from ivlib import experiment
    from ivlib.methods import get_method

    fit, evaluated = episodes
    protocol = ivlib.protocol_for(task, shot=args.shot, template="iv", score="first-token")
    encoder = ivlib.encoder(lm, task, template="iv")
    if tokens is not None:
        encoder = ReleaseTokens(encoder, tokens)
    scorer = experiment.make_scorer(lm, task, encoder, args.batch_size, True, protocol)
    settings = {"strength": args.strength, "ext_strength": args.ext_strength, "ext_batch": args.ext_batch}
    method = get_method("icl" if args.clean else "iv").from_settings({} if args.clean else settings, args.seed)
    if not args.clean:
        method.fit(scorer, encoder, fit)
    prompts = [encoder.encode(e) for e in evaluated]
    scores = experiment.score_prompts(method, scorer, prompts, "ivlib on the release's episodes", False)
    return {
        "pred": [int(p) for p in scorer.predictions(scores, prompts)],
        "vectors": getattr(method, "vectors", None),
        "ids": [p.ids for p in prompts],
        "label_ids": list(encoder.label_ids),
    }


def vector_difference(release: Any, ours: Any) -> dict[str, float]:
    """How far ivlib's vectors [L, C + 1, D] are from the release's: the largest absolute difference,
    the whole difference's norm relative to ivlib's, and the lowest cosine of any (layer, slot) pair."""
    import torch

    diff = release - ours
    cosine = torch.nn.functional.cosine_similarity(release, ours, dim=-1)
    return {
        "max_abs": float(diff.abs().max()),
        "max_abs_ivlib": float(ours.abs().max()),
        "relative": float(diff.norm() / ours.norm()),
        "relative_worst_layer": float((diff.norm(dim=(1, 2)) / ours.norm(dim=(1, 2))).max()),
        "cosine_min": float(cosine.min()),
    }


def identical_episodes(lm: Any, task: Any, args: argparse.Namespace, out: dict[str, Any]) -> dict[str, Any]:
    """ivlib on the release's very episodes, with ivlib's prompts and with the release's token ids:
    answers paired query by query with the release's, and (IV) the vectors set beside its vectors."""
    extraction = 0 if args.clean else args.episodes
    fit, evaluated, tokens = episodes_and_prompts(task, out["record"], extraction, out["ex_sep"])
    rows, gold = [e.query.index for e in evaluated], [e.query.label for e in evaluated]
    theirs = harness.sample_lines(rows, gold, out["answers"])
    results: dict[str, Any] = {}
    for name, given in (("ivlib prompts", None), ("release tokens", tokens)):
        run = ivlib_run(lm, task, args, (fit, evaluated), given)
        if run["label_ids"] != out["first_tokens"]:
            raise SystemExit(
                f"iv.py: ivlib's label tokens {run['label_ids']} are not the release's {out['first_tokens']}"
            )
        lines = harness.sample_lines(rows, gold, run["pred"])
        results[name] = {
            "ivlib": harness.summary(gold, run["pred"], task.n_classes, args.seed),
            "paired": harness.pair(theirs, lines, task.n_classes),
            "answers": lines,
        }
        if run["vectors"] is not None and out["vectors"] is not None:
            results[name]["vectors"] = vector_difference(out["vectors"], run["vectors"])
        if given is None:
            same = [a == tokens[e].ids for a, e in zip(run["ids"], evaluated)]
            results["same_token_ids"] = {"evaluation_prompts": sum(same), "of": len(same)}
    return results


# ---- report -----------------------------------------------------------------------------------------
def report(args: argparse.Namespace, task: Any, out: dict[str, Any]) -> dict[str, Any]:
    """The release's answers with ivlib's interval, checked against what it wrote and against ivlib's data."""
    extraction = 0 if args.clean else args.episodes
    drawn = out["record"].episodes
    if len(drawn) != extraction + args.queries or any(s != "train" for s, _, _ in drawn[:extraction]):
        raise SystemExit(
            f"iv.py: the release drew {len(drawn)} episodes; expected {extraction} from train + {args.queries}"
        )
    rows = [q for _, _, q in drawn[extraction:]]
    gold = [int(task.splits["test"].labels[r]) for r in rows]
    if gold != out["true_labels"] or out["i2label"] != dict(enumerate(task.label_words)):
        raise SystemExit("iv.py: the release's gold labels or label words are not ivlib's: the data did not go through")
    summary = harness.summary(gold, out["answers"], task.n_classes, args.seed)
    written = written_scores(out["written"])
    if abs(written.get("micro", -1) - 100 * summary["accuracy"]["value"]) > 0.0051:
        raise SystemExit(f"iv.py: the recorded answers do not give the release's written result ({out['written']})")
    entry = "icl" if args.clean else "headline"
    return {
        "release": "iterative-vectors",
        "task": args.task,
        "n_classes": task.n_classes,
        "summaries": {entry: {**summary, "release": written}},
        "answers": {entry: harness.sample_lines(rows, gold, out["answers"])},
        "episodes": [{"split": s, "demos": d, "query": q} for s, d, q in drawn],
        "release_written": out["written"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common(ap, "sst2-local", 500)
    ap.set_defaults(model="smollm2-135m-nobos")  # the release tokenizes with the tokenizer's defaults: no BOS
    ap.add_argument("--deps", help="folder holding baukit (pip install --no-deps --target DIR ./baukit)")
    ap.add_argument("-e", "--episodes", type=int, default=200, help="extraction episodes (default 200, script.sh's)")
    ap.add_argument("-s", "--ext-shot", type=int, default=1, help="extraction shots per class (default 1)")
    ap.add_argument("--ext-batch", type=int, default=10, help="episodes between refreshes, b (default 10)")
    ap.add_argument("--ext-strength", type=float, default=0.3, help="a1 (default 0.3: ivlib's default)")
    ap.add_argument("--strength", type=float, default=0.5, help="a2 (default 0.5: ivlib's default)")
    ap.add_argument("--shot", type=int, default=1, help="evaluation shots per class (default 1)")
    ap.add_argument("--clean", action="store_true", help="the release's ICL baseline (--run-clean) instead of IV")
    ap.add_argument("--read-at-separator", action="store_true", help="diagnosis: the zero-shot read on the separator")
    ap.add_argument("--batch-size", type=int, default=16, help="ivlib's batch on the release's episodes (default 16)")
    ap.add_argument("--no-ivlib", action="store_true", help="skip ivlib on the release's episodes")
    args = ap.parse_args()
    run(args)


def run(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(harness.positive("--threads", args.threads))
    root = harness.checkout(args.release, "iv.py", "ArkciaTheDragon/iterative-vectors")
    for flag, value in (
        ("-n", args.queries),
        ("-e", args.episodes),
        ("-s", args.ext_shot),
        ("--shot", args.shot),
        ("--batch-size", args.batch_size),
    ):
        harness.positive(flag, value)
    if args.ext_batch < 0:
        raise UsageError(f"--ext-batch {args.ext_batch} is out of range; accepted: an integer >= 0")
    load_baukit(args.deps)
    task = harness.load_ivlib_task(args.task, args.config)
    if task.kind != "classification":
        raise UsageError(f"-t '{args.task}' is a {task.kind} task; accepted: a classification task")
    args.task_key = task.prompt.get("template_task") or task.name
    data = {split: as_dataset(task, split) for split in ("train", "validation", "test")}
    context = harness.run_context()
    lm = harness.load_lm(args.model, args.config)
    out = run_release(root, args, lm, data)
    summary = report(args, task, out)
    if not args.no_ivlib:
        summary["identical_episodes"] = identical_episodes(lm, task, args, out)
    settings = ("episodes", "ext_shot", "ext_batch", "ext_strength", "strength", "shot", "clean", "read_at_separator")
    summary.update(
        context={**context, "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        seed=args.seed,
        model=args.model,
        settings={k: getattr(args, k) for k in settings},
        release_path=str(root),
        release_argv=out["argv"],
    )
    name = (
        f"iv-{args.task}-seed{args.seed}"
        + ("-clean" if args.clean else "")
        + ("-atsep" if args.read_at_separator else "")
    )
    path = harness.write_summary(args.out, name, summary)
    if out["vectors"] is not None:
        torch.save(out["vectors"], path.with_suffix(".pt"))
    print_summary(summary)
    print(f"per-query answers: {path}")


def load_baukit(deps: str | None) -> None:
    """baukit's TraceDict from `deps` (its nethook module only), refused in one line when absent."""
    if deps:
        sys.path.append(str(Path(deps).resolve()))
    sv.baukit_tracedict(Path(deps).resolve() if deps else None)
    try:
        from baukit import TraceDict  # noqa: F401
    except ImportError:
        raise UsageError(
            "baukit is not importable; accepted: --deps DIR after `pip install --no-deps --target DIR ./baukit`"
        ) from None


def print_summary(summary: dict[str, Any]) -> None:
    for entry, s in summary["summaries"].items():
        print(
            f"iterative-vectors {entry}: accuracy {harness.pct(s['accuracy'])}, macro-F1 {harness.pct(s['macro'])}, "
            f"n={s['n']} (the release wrote {s['release']})"
        )
    for name, r in summary.get("identical_episodes", {}).items():
        if name == "same_token_ids":
            print(f"ivlib's token ids equal the release's on {r['evaluation_prompts']} of {r['of']} evaluation prompts")
            continue
        p, vectors = r["paired"], r.get("vectors")
        line = (
            f"ivlib on the release's episodes ({name}): accuracy {harness.pct(r['ivlib']['accuracy'])}; ivlib minus "
            f"the release {harness.pct(p['accuracy'])} points, answers agree on {100 * p['agreement']:.1f}%"
        )
        if vectors:
            line += f"; vectors: max |diff| {vectors['max_abs']:.2e}, relative {vectors['relative']:.2e}"
        print(line)


if __name__ == "__main__":
    harness.guarded(main, "iv.py")
