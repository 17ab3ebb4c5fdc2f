"""Evaluation throughput: ivlib's batched path vs one episode per forward, same model and episodes.

ivlib's path is `scorer.runner.map` with the method's own `predict`: length-sorted, left-padded
batches, logits of the last position only, IV added by one indexed add per layer. The
one-at-a-time loop is the plainest correct implementation (what the reference code does): each
prompt alone in its own forward, unpadded, full logits, IV added by hooks registered per episode
(the vectors are moved to the device once, so the loop is not charged for copying them). Both
paths score the very same prompts. The script prints episodes per second of each path, their
ratio measured in this one run, and how well the two agree (argmax agreement, largest label
log-prob difference, and how close to a tie the disagreeing episodes were).

IV vectors are fitted by ivlib on `--fit-episodes` training episodes (1-shot, a1 0.3, refresh
every 10) and added at a2 0.5: real vectors of the right shape; their quality does not matter here.

    python bench/throughput.py                      # SmolLM2-135M on CPU, review_sentiment, 200 episodes
    python bench/throughput.py --quick              # 60 episodes, well under 2 minutes on 2 CPU cores
    python bench/throughput.py --random-llama7b -g 0 --episodes 300 --batch-size 16 32 --repeats 3
    python bench/throughput.py --random-llama7b -g 0 --tokenizer DIR   # SmolLM2's tokenizer: BPE-length prompts
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from common import add_common_args, make_encoder, model_vocab, setup, timed

from ivlib.episodes import sample_episodes
from ivlib.methods.icl import ICL
from ivlib.methods.iv import IterativeVectors
from ivlib.models import LoadedModel
from ivlib.prompts import EncodedPrompt
from ivlib.scoring import Scorer


@torch.inference_mode()
def one_at_a_time(
    lm: LoadedModel, label_ids: list[int], prompts: list[EncodedPrompt], vectors: torch.Tensor | None, strength: float
) -> torch.Tensor:
    """[N, C] label log-probs from the plain loop: one prompt per forward, full logits, per-episode hooks."""
    labels = torch.tensor(label_ids, device=lm.device)
    scaled = None if vectors is None else (strength * vectors).to(lm.device, lm.dtype)  # [L, C + 1, D]
    out = []
    for p in prompts:
        ids = torch.tensor([p.ids], device=lm.device)
        handles = []
        if scaled is not None:
            pos = torch.tensor(p.sep_pos, device=lm.device)
            adds = scaled[:, torch.tensor(p.sep_class, device=lm.device)]  # [L, P, D]
            for layer, module in enumerate(lm.layout.attn_out):

                def hook(_mod, _args, output, layer=layer, pos=pos, adds=adds):
                    output[0, pos] += adds[layer]
                    return output

                handles.append(module.register_forward_hook(hook))
        try:
            logits = lm.model(input_ids=ids).logits[0, -1].float()  # full [1, T, V] logits, last row kept
        finally:
            for h in handles:
                h.remove()
        out.append(torch.log_softmax(logits, -1)[labels])
    return torch.stack(out).cpu()


def batched(scorer: Scorer, method, prompts: list[EncodedPrompt]) -> torch.Tensor:
    """[N, C] label scores from ivlib's evaluation path, rows in prompt order."""
    return scorer.runner.map(prompts, lambda b: method.predict(scorer, b), method.name)


def agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(argmax agreement, max |a - b|, largest top-2 margin of `b` among the disagreeing rows)."""
    same = a.argmax(-1) == b.argmax(-1)
    top2 = b.topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1])[~same]
    return same.float().mean().item(), (a - b).abs().max().item(), margin.max().item() if len(margin) else 0.0


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--episodes", type=int, default=200, help="evaluation episodes (validation split)")
    ap.add_argument(
        "--batch-size",
        type=int,
        nargs="+",
        default=[16],
        help="ivlib batch size(s); each is timed against the same one-at-a-time loop (default 16)",
    )
    ap.add_argument("--shot", type=int, default=1, help="evaluation demonstrations per class (default 1)")
    ap.add_argument("--fit-episodes", type=int, default=20, help="training episodes the IV vectors are fitted on")
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timed passes of every path, interleaved; the median is reported (default 1)",
    )
    ap.add_argument(
        "--tokenizer",
        help="with --random-llama7b: tokenizer directory that turns text into ids "
        "(ids >= 32000 are folded modulo 32000); default: ivlib's tiny word-level tokenizer",
    )
    ap.add_argument(
        "--fp32",
        action="store_true",
        help="with --random-llama7b: float32 weights instead of bf16 "
        "(27 GB; shows whether the two paths' differences are bf16 rounding)",
    )
    args = ap.parse_args()
    if args.quick:
        args.episodes, args.fit_episodes = min(args.episodes, 60), min(args.fit_episodes, 10)
    if args.tokenizer and not args.random_llama7b:
        ap.error("--tokenizer only applies with --random-llama7b (a registry model brings its own)")
    if args.fp32 and not args.random_llama7b:
        ap.error("--fp32 only applies with --random-llama7b (registry models run in float32 on CPU)")
    if min(args.batch_size) < 1 or args.episodes < 1 or args.repeats < 1 or args.fit_episodes < 1:
        ap.error("--episodes, --batch-size, --repeats and --fit-episodes must be >= 1")
    return args


@dataclass
class Run:
    """What was timed: the model, task, prompts, fitted IV, each path's times and scores."""

    args: argparse.Namespace
    lm: LoadedModel
    task: Any
    encoder: Any
    prompts: list[EncodedPrompt]
    train: list[Any]
    iv: IterativeVectors
    methods: list[tuple[Any, torch.Tensor | None]]
    scorers: dict[int, Scorer]
    single_t: dict[str, list[float]] = field(default_factory=dict)
    batched_t: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    single_out: dict[str, torch.Tensor] = field(default_factory=dict)
    batched_out: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)


def prepare(args: argparse.Namespace) -> Run:
    """The model, the evaluation prompts (checked against the vocabulary) and IV fitted once."""
    dtype = torch.float32 if args.fp32 else torch.bfloat16
    lm, task = setup(args.config, args.model, args.task, args.gpu, args.random_llama7b, args.tokenizer, dtype)
    encoder = make_encoder(lm, task, args.random_llama7b)
    evals = sample_episodes(task.splits["validation"], task.n_classes, args.shot, args.episodes, 42, "validation/eval")
    prompts = [encoder.encode(e) for e in evals]
    vocab = model_vocab(lm)
    largest = max(max(max(p.ids) for p in prompts), max(encoder.label_ids), lm.tokenizer.pad_token_id)
    if largest >= vocab:
        raise SystemExit(f"throughput.py: token id {largest} is outside the model's vocabulary of {vocab}")
    scorers = {b: Scorer(lm, encoder.label_ids, b, quiet=True) for b in args.batch_size}
    iv = IterativeVectors(strength=0.5, ext_strength=0.3, ext_batch=10)
    train = sample_episodes(task.splits["train"], task.n_classes, 1, args.fit_episodes, 42, "train/extract")
    iv.fit(scorers[args.batch_size[0]], encoder, train)
    return Run(args, lm, task, encoder, prompts, train, iv, [(ICL(), None), (iv, iv.vectors)], scorers)


def measure(run: Run) -> None:
    """Warm up every path untimed, then time them all, interleaved, `--repeats` times."""
    lm, prompts, strength, label_ids = run.lm, run.prompts, run.iv.settings.strength, run.encoder.label_ids
    # Warm-up, untimed: every padded shape of every batch size and method, and one prompt of every
    # length through the plain loop (GPU libraries pick kernels per shape on first use), so
    # neither path nor the method timed first is charged for it.
    by_length = list({len(p.ids): p for p in prompts}.values())
    for method, vectors in run.methods:
        for scorer in run.scorers.values():
            batched(scorer, method, prompts)
        one_at_a_time(lm, label_ids, by_length, vectors, strength)
    run.single_t = {m.name: [] for m, _ in run.methods}
    run.batched_t = {(m.name, b): [] for m, _ in run.methods for b in run.scorers}
    for _ in range(run.args.repeats):  # interleaved, so drift during the run hits every path alike
        for method, vectors in run.methods:
            run.single_out[method.name], t = timed(
                lambda: one_at_a_time(lm, label_ids, prompts, vectors, strength), lm.device
            )
            run.single_t[method.name].append(t)
            for b, scorer in run.scorers.items():
                run.batched_out[method.name, b], t = timed(lambda: batched(scorer, method, prompts), lm.device)
                run.batched_t[method.name, b].append(t)


def print_setup(run: Run) -> None:
    lm, args, iv, device = run.lm, run.args, run.iv, run.lm.device
    n, lengths = len(run.prompts), [len(p.ids) for p in run.prompts]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"model {lm.name} ({lm.source}) on {where}, {str(lm.dtype).removeprefix('torch.')} | "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print(
        f"task {run.task.name} | {n} validation episodes, {args.shot}-shot | prompt tokens mean {sum(lengths) / n:.1f}, "
        f"min {min(lengths)}, max {max(lengths)} | {args.repeats} timed pass(es) per path, median shown"
    )
    if getattr(run.encoder, "folded", 0):
        vocab = model_vocab(lm)
        print(f"ids >= {vocab} folded modulo {vocab}: {run.encoder.folded} of {run.encoder.total} tokens encoded")
    print(
        f"IV vectors [{', '.join(map(str, iv.vectors.shape))}] fitted on {len(run.train)} train episodes (1-shot, a1 0.3, "
        f"refresh 10), added at a2 {iv.settings.strength}; |v| mean {iv.vectors.norm(dim=-1).mean():.3g}"
    )
    print()


def print_table(run: Run) -> list[str]:
    """One row per method and batch size; the summary lines."""
    n = len(run.prompts)
    head = (
        f"{'method':<6} {'batch':>5} {'batched ep/s':>13} {'one-at-a-time ep/s':>19} {'ratio':>7} "
        f"{'argmax agree':>13} {'max |dlogp|':>12} {'max tie margin':>15} {'acc b/1':>11}"
    )
    print(head)
    print("-" * len(head))
    summary = []
    labels = torch.tensor([p.label for p in run.prompts])
    for method, _ in run.methods:
        single_s = statistics.median(run.single_t[method.name])
        for b in run.scorers:
            batch_s = statistics.median(run.batched_t[method.name, b])
            out_b, out_1 = run.batched_out[method.name, b], run.single_out[method.name]
            agree, diff, margin = agreement(out_b, out_1)
            acc_b = (out_b.argmax(-1) == labels).float().mean().item()
            acc_1 = (out_1.argmax(-1) == labels).float().mean().item()
            print(
                f"{method.name:<6} {b:>5} {n / batch_s:>13.2f} {n / single_s:>19.2f} {single_s / batch_s:>6.2f}x "
                f"{agree:>13.3f} {diff:>12.2e} {margin:>15.2e} {acc_b:>5.3f}/{acc_1:.3f}"
            )
            summary.append(
                f"{method.name.upper()}: batched {n / batch_s:.1f} ep/s (batch {b}) vs one-at-a-time "
                f"{n / single_s:.1f} ep/s -> {single_s / batch_s:.2f}x{spread(run, method.name, b)}"
            )
    return summary


def spread(run: Run, name: str, b: int) -> str:
    """The range over the timed passes, when there were several."""
    if run.args.repeats <= 1:
        return ""
    n, bs, ss = len(run.prompts), run.batched_t[name, b], run.single_t[name]
    return f" (passes: batched {n / max(bs):.1f}-{n / min(bs):.1f}, one-at-a-time {n / max(ss):.1f}-{n / min(ss):.1f} ep/s)"


def print_verdict(run: Run, summary: list[str]) -> None:
    device = run.lm.device
    print()
    print("\n".join(summary))
    # issue targets: >= 10x on a GPU with a 7B-sized model in bf16, >= 2x on 2 CPU cores with SmolLM2-135M
    target = 10.0 if device.type == "cuda" else 2.0
    best = {
        m.name: max(
            statistics.median(run.single_t[m.name]) / statistics.median(run.batched_t[m.name, b]) for b in run.scorers
        )
        for m, _ in run.methods
    }
    print(
        "verdict: "
        + "; ".join(
            f"{name.upper()} {r:.2f}x vs target {target:g}x: {'pass' if r >= target else 'short'}"
            for name, r in best.items()
        )
        + (
            ""
            if device.type == "cuda" or run.lm.name.startswith("smollm2")
            else " (the CPU target is for SmolLM2-135M)"
        )
    )
    print(
        "(max tie margin: the largest top-2 log-prob gap, in the one-at-a-time scores, among episodes whose "
        "argmax differs; 0 when all agree)"
    )
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


def main() -> None:
    run = prepare(parse_args())
    measure(run)
    print_setup(run)
    print_verdict(run, print_table(run))


if __name__ == "__main__":
    main()
