"""ICL with fixed demonstrations (--demos fixed): the shared prefix encoded once vs every prompt run whole.

Under --demos fixed every query of an evaluation shares one demonstration set, so BOS + the
demonstrations can be encoded once into a KV cache and each batch of queries run over it
(`experiment.fixed_scores`: `Method.prefix` once, then `Method.predict_over` per batch) instead
of re-encoding the same demonstrations in every prompt (`Method.predict` on the whole prompts).
For each shot count (default 1 and 4 per class) this times both paths over the very same prompts,
interleaved (median of --repeats), and checks that their scores agree: the ratio and the
equality are measured in this one run.

    python bench/fixed.py --quick --threads 1                    # SmolLM2-135M, review_sentiment, 48 queries
    python bench/fixed.py -c config/local.yaml -t sst2-local --episodes 200 --repeats 3
    python bench/fixed.py -g 0 --random-llama7b --episodes 512 --batch-size 64 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
import transformers
from common import add_common_args, make_encoder, set_threads, setup, timed, where_it_ran

from ivlib.experiment import demo_set, evaluation_episodes, fixed_scores
from ivlib.methods.icl import ICL
from ivlib.scoring import Scorer


def measure(args: argparse.Namespace, lm, task, shot: int) -> dict[str, float]:
    encoder = make_encoder(lm, task, args.random_llama7b)
    episodes = evaluation_episodes(task, "validation", shot, args.episodes, 42, demo_set(task, shot, 42))
    prompts = [encoder.encode(e) for e in episodes]
    scorer = Scorer(lm, encoder.label_ids, args.batch_size, quiet=True)
    icl = ICL()
    paths = {
        "whole": lambda ps: scorer.runner.map(ps, lambda b: icl.predict(scorer, b), "whole"),
        "cached": lambda ps: fixed_scores(icl, scorer, ps, "cached"),  # includes encoding the prefix, once a pass
    }
    for run in paths.values():  # warm-up, untimed
        run(prompts[: args.batch_size])
    times: dict[str, list[float]] = {name: [] for name in paths}
    outs: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for name, run in paths.items():
            outs[name], t = timed(lambda: run(prompts), lm.device)
            times[name].append(t)
    n = len(prompts)
    eps = {name: n / statistics.median(t) for name, t in times.items()}
    diff = (outs["cached"] - outs["whole"]).abs().max().item()
    agree = (outs["cached"].argmax(-1) == outs["whole"].argmax(-1)).float().mean().item()
    prefix = prompts[0].query_start
    query = sum(len(p.ids) - p.query_start for p in prompts) / n
    return {"shot": shot, "n": n, "prefix": prefix, "query": query, **eps, "diff": diff, "agree": agree}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--episodes", type=int, default=200, help="evaluation queries (validation split)")
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 4], help="demonstrations per class (default 1 4)")
    ap.add_argument("--batch-size", type=int, default=16, help="queries per batch, both paths (default 16)")
    ap.add_argument("--repeats", type=int, default=1, help="timed passes per path, interleaved; median shown")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, one per core)")
    args = ap.parse_args()
    if args.quick:
        args.episodes = min(args.episodes, 48)
    if min(args.episodes, args.batch_size, args.repeats, *args.shots) < 1:
        ap.error("--episodes, --batch-size, --repeats and --shots must be >= 1")
    set_threads(ap, args.threads)
    load_start = os.getloadavg()[0]
    lm, task = setup(args.config, args.model, args.task, args.gpu, args.random_llama7b)
    rows = [measure(args, lm, task, shot) for shot in args.shots]
    print(
        f"model {lm.name} ({lm.source}) on {where_it_ran(lm.device, load_start)}, "
        f"{str(lm.dtype).removeprefix('torch.')} | torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print(
        f"task {task.name} | ICL, --demos fixed (one set from train, seed 42) | {rows[0]['n']} validation queries, "
        f"batch {args.batch_size} | {args.repeats} timed pass(es) per path, median shown"
    )
    print()
    head = (
        f"{'shot/class':>10} {'prefix tok':>10} {'query tok':>9} {'whole ep/s':>10} {'cached ep/s':>11} "
        f"{'cached/whole':>12} {'max |diff|':>10} {'argmax agree':>12}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['shot']:>10} {r['prefix']:>10} {r['query']:>9.1f} {r['whole']:>10.2f} {r['cached']:>11.2f} "
            f"{r['cached'] / r['whole']:>11.2f}x {r['diff']:>10.2e} {r['agree']:>12.3f}"
        )
    print()
    for r in rows:
        verdict = "faster" if r["cached"] > r["whole"] else "NOT faster"
        print(
            f"verdict, {r['shot']} shot(s) per class: the cached prefix is {verdict} than whole prompts "
            f"({r['cached'] / r['whole']:.2f}x episodes/s), scores equal to {r['diff']:.1e}"
        )


if __name__ == "__main__":
    main()
