"""Deep-Thinking vs k-shot ICL: evaluation episodes per second and peak memory, same model and episodes.

Deep-Thinking's claim is that dropping the demonstrations at inference buys speed and batch
size. In ivlib's episodic protocol every episode brings its own demonstrations, so DT cannot skip
them: per batch it encodes the demonstrations once (L tokens), runs T-1 tuning passes over 2L
positions, and scores the query over the tuned cache once, after the last step
(`DeepThinking.predict`). ICL runs the whole prompt once. This script times
three paths over the very same prompts through `scorer.runner.map`:

    icl      ICL().predict: one forward over demonstrations + query
    dt(1)    DeepThinking with T=1: demonstrations into a cache, query over it; no tuning, so the
             scores equal ICL's (checked) and the time is what inference over a cache costs
    dt(T)    DeepThinking with T=--steps (default 15), eta 0.01, beta 0.9 (library defaults)

plus, for the split of DT's time, "demos": the demonstrations' encoding alone. Every path is
warmed up once, then timed in interleaved passes (median of --repeats); the ratios are measured
in this one run.

Peak memory: on CUDA, torch.cuda.max_memory_allocated over one pass of each path (stats reset
between paths), and the same minus what was allocated before the pass (the model). On CPU, torch's
allocations are invisible to tracemalloc, so each path runs in a fresh subprocess (`--_child`):
it loads the model, reads every weight once (a memory-mapped checkpoint is otherwise paged in
during the first forward and would count as the method's), encodes the prompts, trims the C heap
(malloc_trim) and reads its RSS (VmRSS), resets the kernel's peak-RSS mark (writes 5 to
/proc/self/clear_refs), runs one pass, and reads the peak since the reset (VmHWM). Reported: that peak, the peak minus the RSS after loading (the part the
method adds), and the whole-process peak getrusage(RUSAGE_SELF).ru_maxrss, which the clear_refs reset
does not lower once a thread has exited, so it includes the model load's own transient peak.

On a CPU shared with other work, torch's default of one thread per core oversubscribes it and
OpenMP's waiting can make every forward several times slower (SmolLM2 ICL: 15 s vs 2 s for the
same 32 episodes, 2 vs 1 thread, load average 6 on 2 cores); `--threads 1` then measures the
methods rather than the contention.

    python bench/dt.py --quick                       # SmolLM2-135M on CPU, review_sentiment, 24 episodes
    python bench/dt.py --quick --threads 1           # the same on a busy CPU
    python bench/dt.py --repeats 3                   # 200 episodes
    python bench/dt.py -c config/local.yaml -t sst2-local --shot 2
    python bench/dt.py -g 0 --episodes 300 --repeats 3
    python bench/dt.py --random-llama7b -g 0 --episodes 300 --repeats 3

--fixed measures Deep-Thinking under its own protocol instead (--demos fixed: one demonstration
set for every query, tuned once, then query-only inference over the tuned cache) beside ICL under
fixed (the prefix encoded once) and episodic ICL, on the very same queries:

    icl         episodic ICL, every prompt whole (ivlib's default protocol)
    icl-fixed   ICL, the fixed demonstrations encoded once, each batch of queries over that cache
    dt-fixed    DT(T=--steps): the fixed demonstrations tuned once (timed apart: "tuning"), then each
                batch of queries over the tuned cache; dt(1)-fixed is checked equal to icl-fixed

It reports episodes/s after tuning, the tuning time, and the largest batch within a memory budget
(--budget-mib): every (path, size in --batch-sizes) runs in a fresh subprocess that loads the model,
prepares the path (DT: tunes), runs one untimed row, trims the heap, resets the peak-RSS mark and
runs one batch of that size (the queries cycled to fill it); the peak above the RSS before the
batch is what that size costs (on CUDA: max_memory_allocated above what was allocated before).
The largest tried size whose cost fits the budget is reported.

    python bench/dt.py --fixed --quick --threads 1
    python bench/dt.py --fixed -g 0 --random-llama7b --episodes 256 --batch-sizes 16 32 64 128 256 --budget-mib 8192
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

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
from ivlib.experiment import demo_set, evaluation_episodes
from ivlib.methods.dt import DeepThinking
from ivlib.methods.icl import ICL
from ivlib.models import LoadedModel
from ivlib.prompts import EncodedPrompt, PromptBatch, split_demos, split_prefix
from ivlib.scoring import Scorer
from ivlib.tasks import Task

CHILD_TAG = "DT-BENCH-CHILD "


@dataclass
class Setup:
    lm: LoadedModel
    task: Task
    prompts: list[EncodedPrompt]
    scorer: Scorer
    paths: dict[str, Callable[[PromptBatch], torch.Tensor]]


def demos_only(scorer: Scorer, batch: PromptBatch) -> torch.Tensor:
    """[B, 1]: the demonstrations encoded into a cache, nothing else (DT's first forward)."""
    demo_ids, demo_mask, *_ = split_demos(batch)
    logits, _ = scorer.encode(demo_ids, demo_mask, (demo_mask.cumsum(-1) - 1).clamp(min=0))
    return logits[:, :1].float()


def path_names(steps: int) -> list[str]:
    return ["icl", "dt(1)", f"dt({steps})"]


def prepare(args: argparse.Namespace) -> Setup:
    lm, task = setup(args.config, args.model, args.task, args.gpu, args.random_llama7b)
    encoder = make_encoder(lm, task, args.random_llama7b)
    episodes = sample_episodes(
        task.splits["validation"], task.n_classes, args.shot, args.episodes, 42, "validation/eval"
    )
    prompts = [encoder.encode(e) for e in episodes]
    largest = max(max(max(p.ids) for p in prompts), max(encoder.label_ids), lm.tokenizer.pad_token_id)
    if largest >= model_vocab(lm):
        raise SystemExit(f"dt.py: token id {largest} is outside the model's vocabulary of {model_vocab(lm)}")
    scorer = Scorer(lm, encoder.label_ids, args.batch_size, quiet=True)
    icl = ICL()
    dt1 = DeepThinking(dt_steps=1, dt_step=1)
    dtn = DeepThinking(dt_steps=args.steps, dt_step=args.steps)
    names = path_names(args.steps)
    paths: dict[str, Callable[[PromptBatch], torch.Tensor]] = {
        names[0]: lambda b: icl.predict(scorer, b),
        names[1]: lambda b: dt1.predict(scorer, b),
        names[2]: lambda b: dtn.predict(scorer, b),
        "demos": lambda b: demos_only(scorer, b),
    }
    return Setup(lm, task, prompts, scorer, paths)


def run(s: Setup, name: str, prompts: list[EncodedPrompt] | None = None) -> torch.Tensor:
    return s.scorer.runner.map(s.prompts if prompts is None else prompts, s.paths[name], name)


# ---- peak memory ----------------------------------------------------------------------------------
def child(args: argparse.Namespace) -> None:
    """One path, one pass, in this fresh process; prints a JSON line of RSS figures (KiB)."""
    s = prepare(args)
    after_load = settle_rss(s.lm.model)  # weights paged in, heap trimmed: RSS = what is live
    after_load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reset = reset_peak_rss()  # so the load's own peak cannot hide the method's
    run(s, args._child)
    peak = status_kib("VmHWM")  # since the reset; without it, since the start (load included)
    print(
        CHILD_TAG
        + json.dumps(
            {
                "path": args._child,
                "load_peak": after_load_peak,
                "after_load": after_load,
                "peak": peak,
                "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                "reset": reset,
            }
        ),
        flush=True,
    )


def cpu_memory(names: list[str]) -> dict[str, dict]:
    """Every path in its own subprocess (same arguments): CPU peak memory is per process."""
    return memory_children(__file__, sys.argv[1:], names, CHILD_TAG)


def cuda_memory(s: Setup, names: list[str]) -> dict[str, dict]:
    return cuda_peaks(s.lm.device, names, lambda name: run(s, name))


# ---- --fixed: DT under its own protocol -------------------------------------------------------------
FIXED_NAMES = ("icl", "icl-fixed", "dt-fixed")


@dataclass
class FixedSetup:
    lm: LoadedModel
    task: Task
    episodic: list[EncodedPrompt]  # each query with its own demonstrations
    fixed: list[EncodedPrompt]  # the same queries, one set
    queries: list[EncodedPrompt]  # the fixed prompts' query parts
    scorer: Scorer
    shared: PromptBatch  # BOS + the fixed demonstrations, one row


def fixed_prepare(args: argparse.Namespace) -> FixedSetup:
    lm, task = setup(args.config, args.model, args.task, args.gpu, args.random_llama7b)
    encoder = make_encoder(lm, task, args.random_llama7b)
    n, shot = args.episodes, args.shot
    episodic = [encoder.encode(e) for e in evaluation_episodes(task, "validation", shot, n, 42, None)]
    fixed = [encoder.encode(e) for e in evaluation_episodes(task, "validation", shot, n, 42, demo_set(task, shot, 42))]
    shared, queries, differ = split_prefix(fixed)
    if differ:
        raise SystemExit(f"dt.py --fixed: {len(differ)} prompts tokenize the demonstrations differently")
    scorer = Scorer(lm, encoder.label_ids, args.batch_size, quiet=True)
    return FixedSetup(lm, task, episodic, fixed, queries, scorer, scorer.batch([shared]))


def fixed_paths(
    s: FixedSetup, steps: int, only: str | None = None
) -> tuple[dict[str, Callable[[int | None], torch.Tensor]], float]:
    """Each path as a function of how many prompts to run (None: all, else the first k, cycled), and
    DT's tuning time (s); `only`: prepare that path alone (a memory subprocess)."""
    icl, dt = ICL(), DeepThinking(dt_steps=steps, dt_step=steps)
    prefix_icl = icl.prefix(s.scorer, s.shared) if only in (None, "icl-fixed") else None
    prefix_dt, tuning = (
        timed(lambda: dt.prefix(s.scorer, s.shared), s.lm.device) if only in (None, "dt-fixed") else (None, 0.0)
    )
    runner = s.scorer.runner

    def cycled(prompts: list[EncodedPrompt], k: int | None) -> list[EncodedPrompt]:
        return prompts if k is None else [prompts[i % len(prompts)] for i in range(k)]

    paths: dict[str, Callable[[int | None], torch.Tensor]] = {
        "icl": lambda k: runner.map(cycled(s.episodic, k), lambda b: icl.predict(s.scorer, b), "icl"),
        "icl-fixed": lambda k: runner.map(cycled(s.queries, k), partial(icl.predict_over, s.scorer, prefix_icl), "f"),
        "dt-fixed": lambda k: runner.map(cycled(s.queries, k), partial(dt.predict_over, s.scorer, prefix_dt), "dt"),
    }
    return paths, tuning


def fixed_child(args: argparse.Namespace) -> None:
    """One path, one batch of one size (`--_child path@size`), in this fresh process: each measurement
    starts from the same heap, so no path is charged (or credited) for what an earlier batch left.
    Prints a JSON line: the batch's peak bytes above what was resident (allocated) before it."""
    name, size = args._child.split("@")
    s = fixed_prepare(args)
    paths, _ = fixed_paths(s, args.steps, only=name)
    run = paths[name]
    run(1)  # first-use costs (thread pools, lazily built buffers) are not the batch's
    s.scorer.runner.batch_size = int(size)
    if s.lm.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(s.lm.device)
        before = torch.cuda.memory_allocated(s.lm.device)
        run(int(size))
        cost = torch.cuda.max_memory_allocated(s.lm.device) - before
    else:
        before = settle_rss(s.lm.model)
        reset_peak_rss()
        run(int(size))
        cost = (status_kib("VmHWM") - before) * 1024
    print(CHILD_TAG + json.dumps({"path": args._child, "cost": cost}), flush=True)


def fixed_main(args: argparse.Namespace) -> None:
    load_start = os.getloadavg()[0]
    s = fixed_prepare(args)
    paths, tuning = fixed_paths(s, args.steps)
    _, encode_s = timed(lambda: s.scorer.encode_prefix(s.shared), s.lm.device)
    for name in FIXED_NAMES:  # warm-up, untimed
        paths[name](args.batch_size)
    times: dict[str, list[float]] = {name: [] for name in FIXED_NAMES}
    outs: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for name in FIXED_NAMES:
            outs[name], t = timed(lambda: paths[name](None), s.lm.device)
            times[name].append(t)
    one, _ = fixed_paths(s, 1)
    dt1 = one["dt-fixed"](None)
    runs = [f"{name}@{size}" for name in FIXED_NAMES for size in args.batch_sizes]
    measured = memory_children(__file__, sys.argv[1:], runs, CHILD_TAG)
    memory = {name: {str(b): measured[f"{name}@{b}"]["cost"] for b in args.batch_sizes} for name in FIXED_NAMES}
    n = len(s.fixed)
    print(
        f"model {s.lm.name} ({s.lm.source}) on {where_it_ran(s.lm.device, load_start)}, "
        f"{str(s.lm.dtype).removeprefix('torch.')} | torch {torch.__version__}, transformers {transformers.__version__}"
    )
    qtok = sum(len(q.ids) for q in s.queries) / n
    print(
        f"task {s.task.name} | {n} validation queries, {args.shot}-shot, batch {args.batch_size} | fixed prefix "
        f"{s.shared.input_ids.shape[1]} tokens (BOS + demos), query mean {qtok:.1f} tokens, episodic prompts mean "
        f"{sum(len(p.ids) for p in s.episodic) / n:.1f} | DT T={args.steps}, eta 0.01, beta 0.9 | "
        f"{args.repeats} timed pass(es), median shown"
    )
    print(
        f"one-off cost before the queries: icl-fixed encodes the prefix in {1000 * encode_s:.1f} ms; "
        f"dt-fixed tunes it (T={args.steps}) in {1000 * tuning:.1f} ms ({tuning / encode_s:.1f}x the encoding)"
    )
    print()
    eps = {name: n / statistics.median(times[name]) for name in FIXED_NAMES}
    budget = args.budget_mib * 2**20
    fits = {name: max((int(b) for b, c in memory[name].items() if c <= budget), default=0) for name in FIXED_NAMES}
    sizes = " ".join(str(b) for b in args.batch_sizes)
    head = f"{'path':<10} {'episodes/s':>10} {'vs icl':>7} {'vs icl-fixed':>12}   MiB above before, batch of {sizes}"
    print(head)
    print("-" * len(head))
    for name in FIXED_NAMES:
        costs = " ".join(f"{memory[name][str(b)] / 2**20:.0f}" for b in args.batch_sizes)
        print(
            f"{name:<10} {eps[name]:>10.2f} {eps[name] / eps['icl']:>6.2f}x {eps[name] / eps['icl-fixed']:>11.2f}x   "
            f"{costs}"
        )
    print()
    print(
        f"largest batch of {sizes} within {args.budget_mib} MiB above the loaded model: "
        + ", ".join(f"{name} {fits[name]}" for name in FIXED_NAMES)
    )
    top = str(max(args.batch_sizes))
    per_row = {name: memory[name][top] / int(top) for name in FIXED_NAMES}
    print(
        f"per row at batch {top}: "
        + ", ".join(f"{name} {per_row[name] / 2**20:.2f} MiB" for name in FIXED_NAMES)
        + f"; so the budget holds about {per_row['icl'] / per_row['dt-fixed']:.2f}x episodic ICL's batch for dt-fixed "
        f"and {per_row['icl-fixed'] / per_row['dt-fixed']:.2f}x fixed ICL's (linear in the rows, an extrapolation)"
    )
    diff = (dt1 - outs["icl-fixed"]).abs().max().item()
    labels = torch.tensor([p.label for p in s.fixed])
    acc = {name: (outs[name].argmax(-1) == labels).float().mean().item() for name in FIXED_NAMES}
    print(f"correctness: dt(1)-fixed vs icl-fixed max |score difference| {diff:.2e} (T=1 is plain ICL)")
    print("accuracy (not the point here): " + ", ".join(f"{name} {acc[name]:.3f}" for name in FIXED_NAMES))
    ratio = eps["dt-fixed"] / eps["icl-fixed"]
    print(
        f"verdict: DT's query-only inference runs at {ratio:.2f}x fixed ICL's episodes/s "
        f"({'at least as fast' if ratio >= 1 else 'SLOWER'}) and {eps['dt-fixed'] / eps['icl']:.2f}x episodic ICL's, "
        f"after a one-off tuning of {tuning:.2f} s"
    )


# ---- report ---------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--episodes", type=int, default=200, help="evaluation episodes (validation split)")
    ap.add_argument("--shot", type=int, default=1, help="demonstrations per class, both methods (default 1)")
    ap.add_argument("--steps", type=int, default=15, help="DT's T: 1 encoding + T-1 tuning passes (default 15)")
    ap.add_argument("--batch-size", type=int, default=16, help="episodes per batch, both methods (default 16)")
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timed passes of every path, interleaved; the median is reported (default 1)",
    )
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, one per core)")
    ap.add_argument("--fixed", action="store_true", help="DT under its own protocol (--demos fixed); see above")
    ap.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128], help="--fixed: batch sizes tried"
    )
    ap.add_argument("--budget-mib", type=float, default=256, help="--fixed: memory budget above the loaded model")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.episodes = min(args.episodes, 24)
    if args.episodes < 1 or args.batch_size < 1 or args.repeats < 1 or args.shot < 1:
        ap.error("--episodes, --batch-size, --repeats and --shot must be >= 1")
    if args.steps < 2:
        ap.error("--steps must be >= 2 (T=1 is always measured as dt(1))")
    set_threads(ap, args.threads)
    if args.fixed:
        fixed_child(args) if args._child else fixed_main(args)
        return
    if args._child:
        child(args)
        return

    load_start = os.getloadavg()[0]
    s = prepare(args)
    device = s.lm.device
    names = path_names(args.steps)
    timed_names = [*names, "demos"]

    # Warm-up, untimed: one pass of every path (with --quick, over 4 prompts only), so that no path
    # pays for first-use costs (kernel selection per shape on GPU, allocator growth).
    warm = s.prompts[:4] if args.quick else s.prompts
    for name in timed_names:
        run(s, name, warm)
    times: dict[str, list[float]] = {name: [] for name in timed_names}
    outs: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):  # interleaved, so drift during the run hits every path alike
        for name in timed_names:
            outs[name], t = timed(lambda: run(s, name), device)
            times[name].append(t)

    memory = cuda_memory(s, names) if device.type == "cuda" else cpu_memory(names)

    n = len(s.prompts)
    demo = [p.query_start for p in s.prompts]
    qtok = [len(p.ids) - p.query_start for p in s.prompts]
    batches = -(-n // args.batch_size)
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (
            f"CPU, {torch.get_num_threads()} threads of {os.cpu_count()} cores, load average {load_start:.1f} at the "
            f"start, {os.getloadavg()[0]:.1f} at the end"
        )
    )
    print(
        f"model {s.lm.name} ({s.lm.source}) on {where}, {str(s.lm.dtype).removeprefix('torch.')} | "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print(
        f"task {s.task.name} | {n} validation episodes, {args.shot}-shot, batch {args.batch_size} ({batches} batches) | "
        f"tokens per prompt: BOS + demos L mean {sum(demo) / n:.1f} (max {max(demo)}), query mean "
        f"{sum(qtok) / n:.1f} (max {max(qtok)}) | {args.repeats} timed pass(es) per path, median shown"
    )
    print(
        f"DT: T={args.steps}, eta 0.01, beta 0.9, positions shifted; each tuning pass runs L demo tokens over "
        "an L-token cache, and predict scores the query once, after step T"
    )
    print()

    med = {name: statistics.median(times[name]) for name in timed_names}
    eps = {name: n / med[name] for name in timed_names}
    if device.type == "cuda":
        peak = {name: memory[name]["peak"] / 2**20 for name in names}
        extra = {name: (memory[name]["peak"] - memory[name]["before"]) / 2**20 for name in names}
        mem_head, extra_head = "peak alloc MiB", "above model MiB"
    else:
        peak = {name: memory[name]["peak"] / 1024 for name in names}
        extra = {name: (memory[name]["peak"] - memory[name]["after_load"]) / 1024 for name in names}
        mem_head, extra_head = "peak RSS MiB", "above load MiB"

    def ratio(value: dict[str, float], name: str) -> str:
        return f"{value[name] / value['icl']:.3f}x" if value["icl"] > 0 else "n/a"

    head = (
        f"{'path':<8} {'episodes/s':>10} {'vs icl':>7} {'ms/episode':>10} {'pass range ep/s':>16} "
        f"{mem_head:>15} {'vs icl':>7} {extra_head:>15} {'vs icl':>7}"
    )
    print(head)
    print("-" * len(head))
    for name in names:
        spread = f"{n / max(times[name]):.2f}-{n / min(times[name]):.2f}"
        print(
            f"{name:<8} {eps[name]:>10.2f} {ratio(eps, name):>7} {1000 * med[name] / n:>10.1f} {spread:>16} "
            f"{peak[name]:>15.1f} {ratio(peak, name):>7} {extra[name]:>15.1f} {ratio(extra, name):>7}"
        )
    print(
        f"{'demos':<8} {eps['demos']:>10.2f} {ratio(eps, 'demos'):>7} {1000 * med['demos'] / n:>10.1f}   "
        "(the demonstrations encoded alone, for the split below; not a method)"
    )
    if device.type != "cuda":
        reset = all(memory[name]["reset"] for name in names)
        whole = ", ".join(f"{name} {memory[name]['ru_maxrss'] / 1024:.0f}" for name in names)
        load = ", ".join(f"{name} {memory[name]['after_load'] / 1024:.0f}" for name in names)
        print(
            f"peak RSS = VmHWM over the pass, after a reset of the mark at load end ({'done' if reset else 'FAILED: the peaks include the load'}); "
            f"RSS at load end (MiB): {load}; whole-process ru_maxrss, model load included (MiB): {whole}"
        )
    print()

    per = {name: 1000 * med[name] / n for name in timed_names}  # ms per episode
    query = per[names[1]] - per["demos"]
    step = (per[names[2]] - per[names[1]]) / (args.steps - 1)
    print(
        f"split, ms per episode: icl {per['icl']:.1f} | dt: demos encoded {per['demos']:.1f}, query over the cache "
        f"~{query:.1f} (dt(1) - demos), each further step ~{step:.1f} ((dt({args.steps}) - dt(1)) / {args.steps - 1}: "
        f"one tuning pass of L tokens over an L-token cache)"
    )

    a, b = outs["icl"], outs[names[1]]
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    labels = torch.tensor([p.label for p in s.prompts])
    acc = {name: (outs[name].argmax(-1) == labels).float().mean().item() for name in names}
    print(
        f"correctness: dt(1) vs icl argmax agreement {agree:.3f} on {n} episodes, max |score difference| "
        f"{(a - b).abs().max().item():.2e}"
    )
    print("accuracy (not the point here): " + ", ".join(f"{name} {acc[name]:.3f}" for name in names))
    last, first = names[2], names[1]
    print(
        f"verdict: DT(T={args.steps}) evaluates at {eps[last] / eps['icl']:.2f}x ICL's episodes/s and "
        f"{peak[last] / peak['icl']:.2f}x its peak memory ({ratio(extra, last)} the part above the loaded model); "
        f"DT(T=1) at {eps[first] / eps['icl']:.2f}x and {peak[first] / peak['icl']:.2f}x ({ratio(extra, first)})"
    )


if __name__ == "__main__":
    main()
