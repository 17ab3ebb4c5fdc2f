"""Evaluation throughput: ivlib's batched path vs one episode per forward, same model and episodes.

The one-at-a-time loop is the plainest correct implementation (what the reference code does):
each prompt alone, unpadded, full logits, IV added by per-episode hooks. Both paths score the same
prompts; the script prints episodes per second of each, their ratio measured in this one run,
and how well the two agree (argmax agreement, largest label log-prob difference).

    python bench/throughput.py                      # SmolLM2-135M on CPU, review_sentiment
    python bench/throughput.py --quick              # fewer episodes
    python bench/throughput.py --random-llama7b -g 0 --batch-size 32   # Llama-2-7B shape, random bf16 weights
"""
from __future__ import annotations

import argparse

import torch

from common import add_common_args, setup, timed

from ivlib.episodes import sample_episodes
from ivlib.methods.icl import ICL
from ivlib.methods.iv import IterativeVectors
from ivlib.models import LoadedModel
from ivlib.prompts import EncodedPrompt, PromptEncoder
from ivlib.scoring import Scorer


@torch.inference_mode()
def one_at_a_time(lm: LoadedModel, label_ids: list[int], prompts: list[EncodedPrompt],
                  vectors: torch.Tensor | None, strength: float) -> torch.Tensor:
    """The plain loop: one prompt per forward, full logits, hooks registered per episode."""
    out = []
    for p in prompts:
        handles = []
        if vectors is not None:
            adds = (strength * vectors[:, p.sep_class]).to(lm.device, lm.dtype)  # [L, P, D]
            for layer, module in enumerate(lm.layout.attn_out):
                def hook(mod, args, output, layer=layer):
                    output[0, p.sep_pos] += adds[layer]
                    return output
                handles.append(module.register_forward_hook(hook))
        try:
            logits = lm.model(input_ids=torch.tensor([p.ids], device=lm.device)).logits[0, -1].float()
        finally:
            for h in handles:
                h.remove()
        out.append(torch.log_softmax(logits, -1)[label_ids].cpu())
    return torch.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--fit-episodes", type=int, default=20, help="IV extraction episodes for realistic vectors")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--shot", type=int, default=1)
    args = ap.parse_args()
    if args.quick:
        args.episodes, args.fit_episodes = 60, 10

    lm, task = setup(args.config, args.model, args.task, args.gpu, args.random_llama7b)
    device = lm.device
    encoder = PromptEncoder(lm.tokenizer, task.label_words, lm.add_bos)
    evals = sample_episodes(task.splits["validation"], task.n_classes, args.shot, args.episodes, 42, "validation/eval")
    prompts = [encoder.encode(e) for e in evals]
    scorer = Scorer(lm, encoder.label_ids, args.batch_size, quiet=True)
    iv = IterativeVectors(strength=0.5, ext_strength=0.3, ext_batch=10)
    train = sample_episodes(task.splits["train"], task.n_classes, 1, args.fit_episodes, 42, "train/extract")
    iv.fit(scorer, encoder, train)

    # Warm-up: every padded shape once per path (GPU kernels are tuned per shape on first use),
    # so the method timed first is not charged for it.
    for method in (ICL(), iv):
        scorer.run_batched(prompts, lambda b: method.predict(scorer, b), "warm-up")
    one_at_a_time(lm, encoder.label_ids, prompts[:10], iv.vectors, iv.strength)

    tokens = sum(len(p.ids) for p in prompts) / len(prompts)
    name = lm.name + (f" ({device}, {str(lm.dtype).removeprefix('torch.')})")
    print(f"model {name} | task {args.task} | {len(prompts)} episodes, {args.shot}-shot, "
          f"{tokens:.0f} tokens/prompt | batch size {args.batch_size}")
    print(f"{'method':<6} {'batched ep/s':>13} {'one-at-a-time ep/s':>19} {'ratio':>7} {'argmax agree':>13} {'max |dlogp|':>12}")
    for method, vectors in ((ICL(), None), (iv, iv.vectors)):
        batched, t_b = timed(lambda: scorer.run_batched(prompts, lambda b: method.predict(scorer, b), "b"), device)
        single, t_s = timed(lambda: one_at_a_time(lm, encoder.label_ids, prompts, vectors, iv.strength), device)
        agree = (batched.argmax(-1) == single.argmax(-1)).float().mean().item()
        diff = (batched - single).abs().max().item()
        print(f"{method.name:<6} {len(prompts) / t_b:>13.2f} {len(prompts) / t_s:>19.2f} {t_s / t_b:>6.2f}x "
              f"{agree:>13.3f} {diff:>12.2e}")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
