"""--score full (each label's whole continuation) against --score first-token, on the same episodes.

`full` encodes the prompt once with its cache, then runs every label's remaining tokens over that
cache as one batch (`Scorer._answer_scores`): the cost over `first-token` is the cache it keeps and
one short forward of (rows x labels) x (longest label - 1) tokens. This times both on the very same
ICL prompts, interleaved (median of --repeats), and checks that single-token labels score the same
under both. Target: full at most 1.5x first-token's time with 4 labels of 1-3 tokens (AG News on
SmolLM2: World, Sports, Business, Sci/Tech).

    python bench/full_scoring.py --quick --threads 1        # SmolLM2-135M, ag_news-local, 64 episodes
    python bench/full_scoring.py --episodes 400 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
import transformers
from common import add_common_args, set_threads, setup, timed, where_it_ran

from ivlib.episodes import sample_episodes
from ivlib.experiment import make_scorer
from ivlib.methods.icl import ICL
from ivlib.prompts import PromptEncoder
from ivlib.protocol import Protocol


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.set_defaults(config="config/local.yaml", task="ag_news-local")
    ap.add_argument("--episodes", type=int, default=200, help="validation episodes (default 200)")
    ap.add_argument("--shot", type=int, default=1, help="demonstrations per class (default 1)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1, help="timed passes per rule, interleaved; median shown")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, one per core)")
    args = ap.parse_args()
    if args.quick:
        args.episodes = min(args.episodes, 64)
    set_threads(ap, args.threads)
    load_start = os.getloadavg()[0]
    lm, task = setup(args.config, args.model, args.task, args.gpu, args.random_llama7b)
    encoder = PromptEncoder(lm.tokenizer, task.label_words, lm.add_bos)
    episodes = sample_episodes(task.splits["validation"], task.n_classes, args.shot, args.episodes, 42, "v/eval")
    prompts = [encoder.encode(e) for e in episodes]
    scorers = {
        rule: make_scorer(lm, task, encoder, args.batch_size, True, Protocol.build(score=rule))
        for rule in ("first-token", "full")
    }
    for scorer in scorers.values():  # warm-up, untimed
        scorer.runner.map(prompts[: args.batch_size], lambda b, s=scorer: ICL().predict(s, b), "warm-up")
    times: dict[str, list[float]] = {rule: [] for rule in scorers}
    outs: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for rule, scorer in scorers.items():
            outs[rule], t = timed(
                lambda s=scorer: s.runner.map(prompts, lambda b: ICL().predict(s, b), rule), lm.device
            )
            times[rule].append(t)
    lengths = [len(t) for t in encoder.label_tokens]
    single = [c for c, n in enumerate(lengths) if n == 1]
    diff = (outs["full"][:, single] - outs["first-token"][:, single]).abs().max().item() if single else float("nan")
    med = {rule: statistics.median(t) for rule, t in times.items()}
    ratio = med["full"] / med["first-token"]
    print(
        f"model {lm.name} ({lm.source}) on {where_it_ran(lm.device, load_start)}, "
        f"{str(lm.dtype).removeprefix('torch.')} | torch {torch.__version__}, transformers {transformers.__version__}"
    )
    words = ", ".join(f"{w} ({n})" for w, n in zip(task.label_words, lengths))
    print(f"task {task.name} | labels (tokens): {words} | ICL {args.shot} shot(s) per class")
    print(
        f"{len(prompts)} validation episodes, batch {args.batch_size} | {args.repeats} timed pass(es) per rule, median"
    )
    print()
    for rule in scorers:
        print(f"{rule:>12}: {med[rule]:7.2f} s  {len(prompts) / med[rule]:7.2f} episodes/s")
    print(f"single-token labels' scores, full vs first-token: max |diff| {diff:.1e}")
    verdict = "pass" if ratio <= 1.5 else "short"
    print(f"verdict: {verdict}: --score full takes {ratio:.2f}x first-token's time (target <= 1.5x)")


if __name__ == "__main__":
    main()
