"""Evaluation against its practical limit: ivlib's episodes/s vs a plain batched forward of the same batches.

How close is ivlib's evaluation to what the model alone costs? The "limit" is a plain forward over
exactly the batches ivlib builds (`length_sorted_batches` + `collate`: length-sorted, left-padded),
with no hooks, no scoring and no per-batch copy back to the host:

    model(input_ids, attention_mask, position_ids, use_cache=False, logits_to_keep=1)

`logits_to_keep=1` is passed when the model's forward accepts it, as ivlib's Scorer does, so the
limit is not charged for an LM head over every position that ivlib never computes. The batches
are collated and moved to the device *before* the clock starts (`limit`); `limit+collate` is the
same with collate and the copy inside the clock, to split ivlib's overhead into batch building
and the rest. Timed over the very same prompts:

    icl      `scorer.runner.map(prompts, ICL().predict)`
    iv       the same with `IterativeVectors.predict` (vectors fitted by ivlib on `--fit-episodes`
             train episodes, 1-shot, a1 0.3, refresh 10, added at a2 0.5; their quality does not matter)
    dt(1)    DeepThinking with T=1 (demonstrations into a cache, query over it)
    dt(T)    DeepThinking with T=--dt-step (default 3), eta 0.01, beta 0.9

Ratio = limit episodes/s / path episodes/s (lower is better; 1.00x is the limit itself). Targets:
ivlib within 1.15x of the limit on GPU, within 1.30x on CPU, for ICL and IV. DT's "limit" is the
same whole-prompt forward (what ICL would cost); its ratio is printed but it has no target, since
it does T-1 extra passes (and, even at T=1, encodes demonstrations and query in two forwards).
Every path is warmed up once (with --quick on the narrowest and widest batch only), then timed in
interleaved passes (median of --repeats; 3 with --quick), so every ratio comes from this one run.

Peak memory of one evaluation batch (the batch with the most padded tokens), IV vs the plain forward
of the same batch (ICL for reference); target IV within 1.05x. On CUDA: torch.cuda.max_memory_allocated,
stats reset before each path. On CPU each path runs in a fresh subprocess (`--_child`) as in
bench/dt.py: load, page every weight in, trim the heap, read VmRSS, reset the peak mark
(/proc/self/clear_refs), run the batch once, read VmHWM. The plain forward's batch is collated
before the reset, ivlib's inside its pass (a few KiB of index tensors).

    python bench/limit.py --quick --threads 1        # SmolLM2-135M on CPU, 48 episodes, a few minutes
    python bench/limit.py --repeats 3                # 200 episodes
    python bench/limit.py -g 0 --episodes 400 --repeats 3
    python bench/limit.py --random-llama7b -g 0 --episodes 400 --repeats 3 --batch-size 32
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from common import (
    add_common_args,
    cuda_peaks,
    make_encoder,
    memory_children,
    model_vocab,
    reset_peak_rss,
    set_threads,
    settle_rss,
    setup,
    status_kib,
    timed,
    where_it_ran,
)

from ivlib.episodes import sample_episodes
from ivlib.methods.dt import DeepThinking
from ivlib.methods.icl import ICL
from ivlib.methods.iv import IterativeVectors
from ivlib.models import LoadedModel
from ivlib.prompts import EncodedPrompt, PromptBatch, collate, length_sorted_batches
from ivlib.scoring import Scorer
from ivlib.tasks import Task

CHILD_TAG = "LIMIT-BENCH-CHILD "
MEMORY_PATHS = ["limit", "icl", "iv"]
TARGET = {"cuda": 1.15, "cpu": 1.30}
MEMORY_TARGET = 1.05


@dataclass
class Bench:
    lm: LoadedModel
    task: Task
    prompts: list[EncodedPrompt]
    scorer: Scorer
    iv: IterativeVectors
    keep_last: bool  # whether the model's forward takes logits_to_keep
    plan: list[list[int]]  # ivlib's batches: prompt indices, length-sorted
    batches: list[PromptBatch]  # the same batches, collated and on the device
    paths: dict[str, Callable[[list[int]], torch.Tensor | None]]  # name -> run over these batch numbers


@torch.inference_mode()
def plain_forward(lm: LoadedModel, batch: PromptBatch, keep_last: bool) -> torch.Tensor:
    """The limit: one forward, nothing else; [B, 1, V] logits of the last column (or all, without logits_to_keep)."""
    extra = {"logits_to_keep": 1} if keep_last else {}
    return lm.model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
        **extra,
    ).logits


def path_names(dt_step: int) -> list[str]:
    return ["limit", "limit+collate", "icl", "iv", "dt(1)", *([f"dt({dt_step})"] if dt_step > 1 else [])]


def prepare(args: argparse.Namespace, fit: bool = True) -> Bench:
    lm, task = setup(args.config, args.model, args.task, args.gpu, args.random_llama7b, args.tokenizer)
    encoder = make_encoder(lm, task, args.random_llama7b)
    episodes = sample_episodes(
        task.splits["validation"], task.n_classes, args.shot, args.episodes, 42, "validation/eval"
    )
    prompts = [encoder.encode(e) for e in episodes]
    largest = max(max(max(p.ids) for p in prompts), max(encoder.label_ids), lm.tokenizer.pad_token_id)
    if largest >= model_vocab(lm):
        raise SystemExit(f"limit.py: token id {largest} is outside the model's vocabulary of {model_vocab(lm)}")
    scorer = Scorer(lm, encoder.label_ids, args.batch_size, quiet=True)
    iv = IterativeVectors(strength=0.5, ext_strength=0.3, ext_batch=10)
    if fit:
        train = sample_episodes(task.splits["train"], task.n_classes, 1, args.fit_episodes, 42, "train/extract")
        iv.fit(scorer, encoder, train)
    else:  # memory subprocess: the parent's vectors, so that no fitting runs in it
        iv.load_state({"vectors": torch.load(args._vectors)})
    keep_last = "logits_to_keep" in inspect.signature(lm.model.forward).parameters
    pad = lm.tokenizer.pad_token_id
    plan = length_sorted_batches(prompts, args.batch_size)
    batches = [collate([prompts[i] for i in idx], pad).to(lm.device) for idx in plan]
    methods = {"icl": ICL(), "iv": iv, "dt(1)": DeepThinking(dt_steps=1, dt_step=1)}
    if args.dt_step > 1:
        methods[f"dt({args.dt_step})"] = DeepThinking(dt_steps=args.dt_step, dt_step=args.dt_step)

    def subset(which: list[int]) -> list[EncodedPrompt]:  # all of them in input order: rows come back in it
        return prompts if len(which) == len(plan) else [prompts[i] for b in which for i in plan[b]]

    def limit(which: list[int]) -> None:
        for b in which:
            plain_forward(lm, batches[b], keep_last)

    def limit_collate(which: list[int]) -> None:
        for b in which:
            plain_forward(lm, collate([prompts[i] for i in plan[b]], pad).to(lm.device), keep_last)

    def ivlib(method) -> Callable[[list[int]], torch.Tensor]:
        return lambda which: scorer.runner.map(subset(which), lambda b: method.predict(scorer, b), method.name)

    paths = {"limit": limit, "limit+collate": limit_collate, **{name: ivlib(m) for name, m in methods.items()}}
    return Bench(lm, task, prompts, scorer, iv, keep_last, plan, batches, paths)


def widest(s: Bench) -> int:
    """The batch with the most padded tokens: where a pass peaks."""
    return max(range(len(s.plan)), key=lambda b: s.batches[b].input_ids.numel())


@torch.inference_mode()
def limit_scores(s: Bench) -> torch.Tensor:
    """[N, C] label log-probs from the limit's own logits (untimed): shows it runs what ICL runs."""
    labels = s.scorer.label_ids.to(s.lm.device)
    out = torch.empty(len(s.prompts), len(labels))
    for idx, batch in zip(s.plan, s.batches):
        logits = plain_forward(s.lm, batch, s.keep_last)[:, -1].float()
        out[torch.tensor(idx)] = torch.log_softmax(logits, -1)[:, labels].cpu()
    return out


# ---- peak memory ----------------------------------------------------------------------------------
def child(args: argparse.Namespace) -> None:
    """One path over the widest batch, in this fresh process; prints a JSON line of RSS figures (KiB)."""
    s = prepare(args, fit=False)
    which = [widest(s)]
    after_load = settle_rss(s.lm.model)
    reset = reset_peak_rss()
    s.paths[args._child](which)
    print(
        CHILD_TAG
        + json.dumps(
            {
                "path": args._child,
                "after_load": after_load,
                "peak": status_kib("VmHWM"),
                "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                "reset": reset,
            }
        ),
        flush=True,
    )


def cpu_memory(s: Bench) -> dict[str, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        vectors = os.path.join(tmp, "iv.pt")
        torch.save(s.iv.vectors, vectors)
        return memory_children(__file__, [*sys.argv[1:], "--_vectors", vectors], MEMORY_PATHS, CHILD_TAG)


def cuda_memory(s: Bench) -> dict[str, dict]:
    which = [widest(s)]
    return cuda_peaks(s.lm.device, MEMORY_PATHS, lambda name: s.paths[name](which))


# ---- report ---------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--episodes", type=int, default=200, help="evaluation episodes (validation split)")
    ap.add_argument("--shot", type=int, default=1, help="evaluation demonstrations per class (default 1)")
    ap.add_argument("--batch-size", type=int, default=16, help="episodes per batch, every path (default 16)")
    ap.add_argument("--dt-step", type=int, default=3, help="DT's T for dt(T); dt(1) is always timed (default 3)")
    ap.add_argument("--fit-episodes", type=int, default=20, help="train episodes the IV vectors are fitted on")
    ap.add_argument(
        "--repeats",
        type=int,
        help="timed passes of every path, interleaved; the median is reported (default 1; --quick: 3)",
    )
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory comparison")
    ap.add_argument("--tokenizer", help="with --random-llama7b: tokenizer directory (see bench/throughput.py)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, one per core)")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_vectors", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.episodes, args.fit_episodes = min(args.episodes, 48), min(args.fit_episodes, 10)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 1
    if min(args.episodes, args.batch_size, args.repeats, args.shot, args.dt_step, args.fit_episodes) < 1:
        ap.error("--episodes, --batch-size, --repeats, --shot, --dt-step and --fit-episodes must be >= 1")
    if args.tokenizer and not args.random_llama7b:
        ap.error("--tokenizer only applies with --random-llama7b")
    set_threads(ap, args.threads)
    return args


def measure(s: Bench, args: argparse.Namespace, names: list[str]) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """(each path's times, each path's scores): every path warmed up untimed, then timed interleaved."""
    every = list(range(len(s.plan)))
    warm = sorted({0, len(s.plan) - 1}) if args.quick else every
    for name in names:  # untimed: first-use costs (per-shape kernel choice on GPU, allocator growth)
        s.paths[name](warm)
    times: dict[str, list[float]] = {name: [] for name in names}
    outs: dict[str, Any] = {}
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits every path alike
        for name in names:
            outs[name], t = timed(lambda: s.paths[name](every), s.lm.device)
            times[name].append(t)
    return times, outs


def print_setup(s: Bench, args: argparse.Namespace, load_start: float) -> None:
    device = s.lm.device
    n, nb = len(s.prompts), len(s.plan)
    lengths = [len(p.ids) for p in s.prompts]
    padded = sum(b.input_ids.numel() for b in s.batches)
    print(
        f"model {s.lm.name} ({s.lm.source}) on {where_it_ran(device, load_start)}, "
        f"{str(s.lm.dtype).removeprefix('torch.')} | torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print(
        f"task {s.task.name} | {n} validation episodes, {args.shot}-shot, batch {args.batch_size} ({nb} batches) | "
        f"tokens per prompt mean {sum(lengths) / n:.1f} (min {min(lengths)}, max {max(lengths)}), "
        f"{padded / sum(lengths):.3f}x with padding | {args.repeats} timed pass(es) per path, median shown"
    )
    print(
        f"limit: plain model(input_ids, attention_mask, position_ids, use_cache=False"
        f"{', logits_to_keep=1' if s.keep_last else ''}) over ivlib's batches, collated and on the device before "
        "the clock starts; no hooks, no scoring, no copy back. limit+collate: collate + copy inside the clock"
    )
    print(
        f"IV vectors [{', '.join(map(str, s.iv.vectors.shape))}] added at a2 {s.iv.settings.strength}; "
        f"DT eta 0.01, beta 0.9, T = {args.dt_step}"
    )
    print()


def verdicts(names: list[str], ratio: dict[str, float], target: float) -> dict[str, str]:
    verdict: dict[str, str] = {}
    for name in names:
        if name.startswith("dt"):
            verdict[name] = (
                "n/a (DT does T-1 extra passes)" if name != "dt(1)" else "n/a (DT: demos and query in two forwards)"
            )
        elif name in ("icl", "iv"):
            verdict[name] = "pass" if ratio[name] <= target else "short"
        else:
            verdict[name] = "(the limit)" if name == "limit" else "(limit + batch building)"
    return verdict


def print_paths(s: Bench, names: list[str], times: dict[str, list[float]], target: float) -> dict[str, float]:
    """The table of paths; each path's time as a multiple of the limit's."""
    n, nb = len(s.prompts), len(s.plan)
    med = {name: statistics.median(times[name]) for name in names}
    eps = {name: n / med[name] for name in names}
    ratio = {name: eps["limit"] / eps[name] for name in names}
    verdict = verdicts(names, ratio, target)
    head = (
        f"{'path':<14} {'episodes/s':>10} {'limit/path':>10} {'+ms/batch':>10} {'pass range ep/s':>16} "
        f"{'target':>7}  verdict"
    )
    print(head)
    print("-" * len(head))
    for name in names:
        extra = 1000 * (med[name] - med["limit"]) / nb
        spread = f"{n / max(times[name]):.2f}-{n / min(times[name]):.2f}"
        goal = f"{target:.2f}x" if name in ("icl", "iv") else ""
        print(
            f"{name:<14} {eps[name]:>10.2f} {ratio[name]:>9.3f}x {extra:>10.1f} {spread:>16} {goal:>7}  {verdict[name]}"
        )
    print("(+ms/batch: the path's time minus the limit's, per batch)")
    print()
    return ratio


def print_memory(s: Bench, memory: dict[str, dict[str, Any]]) -> str:
    """The peak-memory table; the verdict's memory clause."""
    device = s.lm.device
    b = widest(s)
    shape = tuple(s.batches[b].input_ids.shape)
    if device.type == "cuda":
        peak = {k: v["peak"] / 2**20 for k, v in memory.items()}
        above = {k: (v["peak"] - v["before"]) / 2**20 for k, v in memory.items()}
        heads = ("peak alloc MiB", "above model MiB")
        how = "torch.cuda.max_memory_allocated, stats reset before each path, one batch each"
    else:
        peak = {k: v["peak"] / 1024 for k, v in memory.items()}
        above = {k: (v["peak"] - v["after_load"]) / 1024 for k, v in memory.items()}
        heads = ("peak RSS MiB", "above load MiB")
        ok = all(v["reset"] for v in memory.values())
        how = (
            f"VmHWM of a fresh process per path after a reset at load end ({'done' if ok else 'FAILED: peaks include the load'}); "
            "RSS at load end " + ", ".join(f"{k} {v['after_load'] / 1024:.0f}" for k, v in memory.items()) + " MiB"
        )
    print(f"peak memory of one batch, the widest ({shape[0]} x {shape[1]} tokens): {how}")
    mhead = f"{'path':<6} {heads[0]:>15} {'vs limit':>9} {heads[1]:>16} {'vs limit':>9}"
    print(mhead)
    print("-" * len(mhead))
    for name in MEMORY_PATHS:
        rel = f"{above[name] / above['limit']:.3f}x" if above["limit"] > 0 else "n/a"
        print(f"{name:<6} {peak[name]:>15.1f} {peak[name] / peak['limit']:>8.3f}x {above[name]:>16.1f} {rel:>9}")
    print()
    m = peak["iv"] / peak["limit"]
    rel = f"{above['iv'] / above['limit']:.2f}x" if above["limit"] > 0 else "n/a"
    return (
        f"; memory: IV peak {m:.3f}x the plain forward's (target <= {MEMORY_TARGET:.2f}x: "
        f"{'pass' if m <= MEMORY_TARGET else 'short'}; the part above the model {rel})"
    )


def main() -> None:
    args = parse_args()
    if args._child:
        child(args)
        return
    load_start = os.getloadavg()[0]
    s = prepare(args)
    device = s.lm.device
    names = path_names(args.dt_step)
    times, outs = measure(s, args, names)
    reference = limit_scores(s)
    memory = None if args.no_memory else (cuda_memory(s) if device.type == "cuda" else cpu_memory(s))
    print_setup(s, args, load_start)
    target = TARGET["cuda" if device.type == "cuda" else "cpu"]
    ratio = print_paths(s, names, times, target)
    mem_line = "" if memory is None else print_memory(s, memory)
    verdict = verdicts(names, ratio, target)
    icl = outs["icl"]
    print(
        f"correctness: icl vs the limit's own logits (log-softmax at the label ids, untimed pass) max |diff| "
        f"{(icl - reference).abs().max().item():.2e}; dt(1) vs icl max |diff| {(outs['dt(1)'] - icl).abs().max().item():.2e}, "
        f"argmax agreement {(outs['dt(1)'].argmax(-1) == icl.argmax(-1)).float().mean().item():.3f}"
    )
    dts = ", ".join(f"{name.upper()} {ratio[name]:.2f}x" for name in names if name.startswith("dt"))
    print(
        f"verdict ({device.type.upper()}, target <= {target:.2f}x): ICL {ratio['icl']:.2f}x of the limit "
        f"({verdict['icl']}), IV {ratio['iv']:.2f}x ({verdict['iv']}); {dts}: n/a (DT does T-1 extra passes)"
        f"{mem_line}"
    )


if __name__ == "__main__":
    main()
