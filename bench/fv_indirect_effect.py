"""Function-vector indirect effects: ivlib's cached, head-batched path vs one patch per full forward.

Same model, same shuffled-label trials, same heads. The plain loop is the straightforward
implementation: for every trial and head, run the whole prompt with that head's last-token slice
overwritten by its mean, and compare P(correct label) with the unpatched prompt. ivlib encodes
each prompt's prefix once and runs only the last token, many heads per forward, each forward
writing its one token into a preallocated copy of the prefix cache. A third path, "growing",
is ivlib with a growing (`torch.cat`) cache instead, the previous implementation, which copies
the whole prefix cache on every forward: its time over ivlib's shows what the preallocation
saves (more on longer prompts: `--shot 4` on AG News). The script prints the times, the ratios
measured in this run, the largest difference between the effects, and a verdict.

    python bench/fv_indirect_effect.py --quick          # SmolLM2-135M, CPU
    python bench/fv_indirect_effect.py --random-llama7b -g 0 --layers 8
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from common import add_common_args, setup, timed

from ivlib.episodes import sample_episodes
from ivlib.methods.fv import FunctionVectors, shuffle_labels
from ivlib.models import LoadedModel
from ivlib.prompts import EncodedPrompt, PromptEncoder
from ivlib.scoring import Scorer


@torch.inference_mode()
def plain_effects(
    lm: LoadedModel, label_ids: list[int], trials: list[EncodedPrompt], mean_act: torch.Tensor, layers: list[int]
) -> torch.Tensor:
    """[len(layers), H] from one full forward per (trial, head), plus one unpatched forward per trial."""
    n_heads, hd = mean_act.shape[1], mean_act.shape[2]
    total = torch.zeros(len(layers), n_heads)
    for p in trials:
        ids = torch.tensor([p.ids], device=lm.device)
        target = label_ids[p.label]

        def p_correct() -> float:
            logits = lm.model(input_ids=ids).logits[0, -1].float()
            return torch.softmax(logits, -1)[target].item()

        base = p_correct()
        for i, layer in enumerate(layers):
            for head in range(n_heads):
                value = mean_act[layer, head].to(lm.device, lm.dtype)

                def patch(_mod, args, head=head, value=value):
                    x = args[0].clone()
                    x[0, -1, head * hd : (head + 1) * hd] = value
                    return (x, *args[1:])

                handle = lm.layout.attn_out[layer].register_forward_pre_hook(patch)
                try:
                    total[i, head] += p_correct() - base
                finally:
                    handle.remove()
    return total / len(trials)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--trials", type=int, default=8, help="shuffled-label prompts")
    ap.add_argument("--shot", type=int, default=2, help="demonstrations per class in each trial")
    ap.add_argument("--layers", type=int, default=0, help="only the first N layers' heads (0 = all)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs of each ivlib variant (median shown)")
    ap.add_argument(
        "--skip-plain",
        action="store_true",
        help="time only ivlib's two cache variants (long prompts x all layers: the plain loop takes hours)",
    )
    args = ap.parse_args()
    if args.quick:
        args.trials, args.layers = 4, args.layers or 6
    return args


def time_variants(
    scorer: Scorer, fv: FunctionVectors, trials: list[EncodedPrompt], layers: list[int], repeats: int
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(effects with the preallocated cache, with a growing one, their median times)."""
    fv.indirect_effects(scorer, trials[:2], layers[:1])  # warm-up
    times: dict[bool, list[float]] = {True: [], False: []}
    out: dict[bool, torch.Tensor] = {}
    for _ in range(repeats):  # interleaved, so neither variant is always the one that runs first
        for preallocate in (True, False):
            scorer.preallocate = preallocate
            out[preallocate], seconds = timed(lambda: fv.indirect_effects(scorer, trials, layers), scorer.lm.device)
            times[preallocate].append(seconds)
    scorer.preallocate = True
    t_fast, t_grown = (float(np.median(times[k])) for k in (True, False))
    return out[True], out[False], t_fast, t_grown


def main() -> None:
    args = parse_args()
    lm, task = setup(args.config, args.model, args.task, args.gpu, args.random_llama7b)
    encoder = PromptEncoder(lm.tokenizer, task.label_words, lm.add_bos)
    scorer = Scorer(lm, encoder.label_ids, args.batch_size, quiet=True)
    episodes = sample_episodes(task.splits["train"], task.n_classes, args.shot, args.trials, 42, "train/extract")
    fv = FunctionVectors(n_top_heads=1, ie_episodes=args.trials)
    fv.mean_act = fv.mean_activations(scorer, [encoder.encode(e) for e in episodes])
    trials = [encoder.encode(e) for e in shuffle_labels(episodes, 42)]
    layers = list(range(args.layers or lm.layout.n_layers))

    fast, grown, t_fast, t_grown = time_variants(scorer, fv, trials, layers, args.repeats)
    grown_vs_fast = (fast - grown).abs().max().item()
    same = grown_vs_fast <= (1e-5 if lm.dtype == torch.float32 else 3e-2 * fast.abs().max().item())
    heads = len(layers) * lm.layout.n_heads
    tokens = sum(len(p.ids) for p in trials) / len(trials)
    print(
        f"model {lm.name} ({lm.device}, {str(lm.dtype).removeprefix('torch.')}) | {len(trials)} trials of "
        f"{tokens:.0f} tokens | {heads} heads ({len(layers)} layers) | batch {args.batch_size}, "
        f"{fv.rows_per_forward} rows per forward"
    )
    print(
        f"ivlib cached + head-batched: {t_fast:.1f} s | the same with a growing cache: {t_grown:.1f} s | "
        f"preallocated prefix cache saves {t_grown / t_fast:.2f}x (effects max |difference| {grown_vs_fast:.2e}; "
        f"median of {args.repeats} interleaved run(s) each)"
    )
    if args.skip_plain:
        print(
            f"verdict: preallocated cache {t_grown / t_fast:.2f}x the growing one, results "
            f"{'agree' if same else 'DIFFER'} (plain loop skipped)"
        )
        return
    plain, t_plain = timed(lambda: plain_effects(lm, encoder.label_ids, trials, fv.mean_act, layers), lm.device)
    print(f"plain one-patch-per-forward: {t_plain:.1f} s | ratio plain / ivlib {t_plain / t_fast:.1f}x")
    diff = (fast - plain).abs().max().item()
    largest = plain.abs().max().item()
    top_same = fast.flatten().argmax().item() == plain.flatten().argmax().item()
    print(f"effects vs plain max |difference| {diff:.2e} (largest effect {largest:.2e}); same top head: {top_same}")
    agree = top_same and diff <= (1e-5 if lm.dtype == torch.float32 else 3e-2 * largest)  # fp32: the test suite's bound
    print(
        f"verdict: FV indirect effects {t_plain / t_fast:.1f}x the plain loop's speed (target for extraction: "
        f"faster than the plain loop: {'pass' if t_plain > t_fast else 'short'}), results "
        f"{'agree' if agree and same else 'DISAGREE'}; preallocated cache {t_grown / t_fast:.2f}x the growing one"
    )


if __name__ == "__main__":
    main()
