"""Fitting speed: ivlib's IV extraction, TV layer search, FV and SV fits vs the plainest correct loops.

Each part times ivlib's own `fit` against a loop written here from the method's description, one
prompt per forward, unpadded, with full logits (`model(input_ids=ids)`: what a plain
implementation runs), and checks that both reach the same result. Ratio = plain time / ivlib time,
both measured in this one run (higher is better).

    iv   `IterativeVectors.fit` (zero-shot side batched freely, few-shot side batched within each
         refresh window of --ext-batch episodes) vs, per episode in order: the zero-shot prompt's
         forward reading every layer's o_proj output at its separator, the few-shot prompt's forward
         with a1 x the current vectors added at its separators reading the same, and the running
         mean refreshed after episode 0 and every b episodes. Agreement: max |difference| of the vectors.
    tv   `TaskVectors.fit` (batched extraction; layer search that encodes each validation prompt's
         prefix once and re-runs only the last token per layer) vs one forward per training prompt
         reading every block's output at the query separator, then one full forward per
         (validation prompt, layer) with that position replaced by theta[layer]. Agreement: theta,
         the per-layer macro-F1 and the chosen layer.
    fv   `FunctionVectors.fit` end to end (mean head activations, indirect effects with cached
         prefixes and many heads per forward, top heads, vector) vs one forward per prompt for the
         mean activations, `plain_effects` from bench/fv_indirect_effect.py (one full forward per
         trial and one per (trial, head) with that head's last-token input replaced by its mean),
         the same top-k and the vector summed from o_proj of each zero-padded head mean.
         Agreement: mean activations, effects, the top heads (same set, same order), the vector.
    sv   `StateVector.fit` (batched reads of every attention output at the separators; search over
         L = 1..n_layers with each validation prompt's prefix encoded once) vs one forward per
         training prompt reading the attention outputs at its separators, the inner mean and momentum
         written out per episode, then one full forward per (validation prompt, L) with the first L
         attention outputs replaced at the last token. Agreement: the vector, the per-L macro-F1, L.
    i2cl `ImplicitICL.context_vectors` (the distinct demonstrations of the training episodes, each
         alone, length-sorted batches, the attention and MLP outputs of every layer read at the last
         token) vs one unpadded forward per demonstration with the same reads, averaged. Agreement:
         max |difference| of the vectors. Then the calibration (a and b by AdamW through the frozen
         model) on the demonstrations of the first --i2cl-episodes episodes, timed alone: seconds,
         optimiser steps per second, and the loss of its first and last epoch.
    site `head_means` (SITE's task embedding: batched, prefix-free, o_proj inputs at the last token)
         vs one forward per prompt reading the same; then the mixing weights' optimisation
         (`SoftInjection.optimise`, --site-steps Adam steps of one zero-shot prompt each, one
         validation checkpoint at the end) vs a loop written here: a pre-hook that mixes each
         head's last-token input by hand, one unpadded prompt, full logits, cross-entropy of the
         label's first token, Adam on the logits, the same prompt order, the same final validation.
         Agreement: embeddings, the logits after the last step, the validation loss. The
         optimisation is timed after two warm-up steps of each side, --repeats times per side in
         alternating order (median); on a CPU in the process's CPU seconds (wall seconds beside
         them), since its many short steps lose wall time to whatever else runs on the machine.

"agree" is yes when each result's max |difference| is within 1e-3 of the result's largest entry (3e-2 in
bf16/fp16, where padded batches round differently from lone prompts) and, for TV, FV and SV, the
per-layer F1 / chosen layer and the top heads are identical; the differences themselves are printed.

Each part is warmed up (ivlib on a few episodes, the plain loop on one) before its clock starts.
The plain loops' full logits and unpadded prompts are part of what they are compared against: the
ratio is "ivlib vs a straightforward implementation", not "batching alone".

    python bench/extraction.py --quick --threads 1       # SmolLM2-135M on CPU, a few minutes
    python bench/extraction.py --parts iv tv             # skip FV's per-head loop (the slow one)
    python bench/extraction.py --quick --threads 1 --parts site
    python bench/extraction.py -g 0 --repeats 3
    python bench/extraction.py --random-llama7b -g 0 --fv-trials 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Sequence

import numpy as np
import torch
import transformers
from common import add_common_args, make_encoder, model_vocab, set_threads, setup, timed, where_it_ran
from fv_indirect_effect import plain_effects

from ivlib.episodes import Episode, sample_episodes
from ivlib.methods.fv import FunctionVectors, shuffle_labels
from ivlib.methods.i2cl import ImplicitICL, demo_prompt, demonstrations, site_modules
from ivlib.methods.iv import IterativeVectors
from ivlib.methods.site import SoftInjection, head_means
from ivlib.methods.sv import StateVector
from ivlib.methods.tv import TaskVectors
from ivlib.metrics import f1_scores
from ivlib.models import LoadedModel
from ivlib.prompts import EncodedPrompt, PromptEncoder
from ivlib.scoring import Scorer

PARTS = ("iv", "tv", "fv", "sv", "i2cl", "site")


def close(diff: float, reference: torch.Tensor, dtype: torch.dtype) -> bool:
    """diff small against the reference's largest entry: 1e-3 of it in float32; 3e-2 in 16-bit types, where
    a padded batch and a lone prompt round differently (bench/RESULTS.md, throughput section)."""
    scale = max(reference.abs().max().item(), 1e-12)
    return diff <= (1e-3 if dtype == torch.float32 else 3e-2) * scale


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.inference_mode()
def run_with_hooks(
    lm: LoadedModel, ids: list[int], modules: Sequence[torch.nn.Module], hooks: Sequence, pre: bool = False
) -> torch.Tensor:
    """One unpadded prompt through the model with one hook per module; full [V] logits of the last position."""
    register = (lambda m, h: m.register_forward_pre_hook(h)) if pre else (lambda m, h: m.register_forward_hook(h))
    handles = [register(m, h) for m, h in zip(modules, hooks)]
    try:
        return lm.model(input_ids=torch.tensor([ids], device=lm.device)).logits[0, -1].float()
    finally:
        for handle in handles:
            handle.remove()


# ---- IV -------------------------------------------------------------------------------------------
def plain_iv(lm: LoadedModel, encoder: PromptEncoder, episodes: list[Episode], a1: float, b: int) -> torch.Tensor:
    """[L, C + 1, D]: Iterative Vectors extracted one episode at a time, in order."""
    n_layers, slots = lm.layout.n_layers, encoder.n_classes + 1

    def o_proj_at(ids: list[int], positions: list[int], adds: torch.Tensor | None) -> torch.Tensor:  # [L, P, D]
        reads: list[torch.Tensor] = [None] * n_layers  # type: ignore[list-item]

        def hook(layer: int):
            def fn(module, args, output):
                out = _hidden(output)
                if adds is not None:
                    out[0, positions] += adds[layer]
                reads[layer] = out[0, positions].float()
                return output

            return fn

        run_with_hooks(lm, ids, lm.layout.attn_out, [hook(i) for i in range(n_layers)])
        return torch.stack(reads)

    total: torch.Tensor | None = None
    current: torch.Tensor | None = None
    for i, episode in enumerate(episodes):
        few, zero = encoder.encode(episode), encoder.encode(episode.query_only())
        unsteered = o_proj_at(zero.ids, zero.sep_pos[-1:], None)  # [L, 1, D] at the query separator
        adds = None if current is None else (a1 * current[:, few.sep_class]).to(lm.dtype)
        delta = o_proj_at(few.ids, few.sep_pos, adds) - unsteered  # [L, P, D]
        classes = torch.tensor(few.sep_class)
        sample = torch.stack([delta[:, (classes == k).nonzero().view(-1).tolist()].mean(1) for k in range(slots)], 1)
        total = sample if total is None else total + sample
        if b > 0 and i % b == 0:  # refreshed after episode 0, b, 2b, ...
            current = total / (i + 1)
    return (total / len(episodes)).cpu()


def bench_iv(args, lm: LoadedModel, scorer: Scorer, encoder: PromptEncoder, train: list[Episode]) -> dict:
    def ivlib() -> torch.Tensor:
        iv = IterativeVectors(strength=0.5, ext_strength=args.ext_strength, ext_batch=args.ext_batch)
        iv.fit(scorer, encoder, train)
        return iv.vectors

    def plain() -> torch.Tensor:
        return plain_iv(lm, encoder, train, args.ext_strength, args.ext_batch)

    IterativeVectors(0.5, args.ext_strength, args.ext_batch).fit(scorer, encoder, train[:4])  # warm-up
    plain_iv(lm, encoder, train[:1], args.ext_strength, args.ext_batch)
    t_fast, t_plain = [], []
    for _ in range(args.repeats):
        fast, t = timed(ivlib, lm.device)
        t_fast.append(t)
        slow, t = timed(plain, lm.device)
        t_plain.append(t)
    diff = (fast - slow).abs().max().item()
    return {
        "part": "iv",
        "what": f"{len(train)} episodes, {args.ext_shot}-shot, a1 {args.ext_strength}, refresh every "
        f"{args.ext_batch}: 2 x {len(train)} forwards",
        "n": len(train),
        "fast": statistics.median(t_fast),
        "plain": statistics.median(t_plain),
        "agree": f"vectors max |diff| {diff:.2e} (largest |v| {slow.abs().max().item():.2e})",
        "same": close(diff, slow, lm.dtype),
    }


# ---- TV -------------------------------------------------------------------------------------------
def plain_tv(
    lm: LoadedModel, encoder: PromptEncoder, train: list[Episode], validation: list[Episode]
) -> tuple[torch.Tensor, list[float], int]:
    """(theta [L, D], macro-F1 per layer on validation, chosen layer), one prompt per forward."""
    blocks, n_layers = lm.layout.blocks, lm.layout.n_layers
    labels = torch.tensor(encoder.label_ids, device=lm.device)
    total = torch.zeros(n_layers, lm.layout.d_model, device=lm.device)
    for episode in train:
        reads: list[torch.Tensor] = [None] * n_layers  # type: ignore[list-item]

        def read(layer: int):
            def fn(module, args, output):
                reads[layer] = _hidden(output)[0, -1].float()

            return fn

        run_with_hooks(lm, encoder.encode(episode).ids, blocks, [read(i) for i in range(n_layers)])
        total += torch.stack(reads)
    theta = total / len(train)

    prompts = [encoder.encode(e) for e in validation]
    preds = torch.empty(len(prompts), n_layers, dtype=torch.long)
    for i, p in enumerate(prompts):
        for layer in range(n_layers):

            def replace(module, args, output, layer=layer):
                _hidden(output)[0, -1] = theta[layer].to(lm.dtype)
                return output

            logits = run_with_hooks(lm, p.ids, [blocks[layer]], [replace])
            preds[i, layer] = torch.log_softmax(logits, -1)[labels].argmax()
    truth = [p.label for p in prompts]
    scores = [f1_scores(truth, preds[:, layer].numpy(), encoder.n_classes)["macro"] for layer in range(n_layers)]
    best = max(range(n_layers), key=lambda layer: (scores[layer], -layer))  # ties: the earliest, as ivlib
    return theta.cpu(), scores, best


def bench_tv(
    args, lm: LoadedModel, scorer: Scorer, encoder: PromptEncoder, train: list[Episode], validation: list[Episode]
) -> dict:
    def ivlib() -> TaskVectors:
        tv = TaskVectors()
        tv.fit(scorer, encoder, train, validation)
        return tv

    TaskVectors().fit(scorer, encoder, train[:2], validation[:4])  # warm-up
    plain_tv(lm, encoder, train[:1], validation[:1])
    fast, t_fast = timed(ivlib, lm.device)
    (theta, scores, best), t_plain = timed(lambda: plain_tv(lm, encoder, train, validation), lm.device)
    theta_diff = (fast.theta - theta).abs().max().item()
    f1_diff = max(abs(a - b) for a, b in zip(fast.layer_scores, scores))
    n_layers = lm.layout.n_layers
    return {
        "part": "tv",
        "what": f"{len(train)} train + {len(validation)} validation episodes x {n_layers} layers: "
        f"{len(train) + len(validation) * n_layers} plain forwards",
        "n": len(train) + len(validation),
        "fast": t_fast,
        "plain": t_plain,
        "agree": f"theta max |diff| {theta_diff:.2e}, per-layer macro-F1 max |diff| {f1_diff:.3f}, "
        f"layer {fast.layer} vs {best}",
        "same": f1_diff == 0 and fast.layer == best and close(theta_diff, theta, lm.dtype),
    }


# ---- FV -------------------------------------------------------------------------------------------
def plain_fv(
    lm: LoadedModel, encoder: PromptEncoder, episodes: list[Episode], trials: list[EncodedPrompt], k: int
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]], torch.Tensor]:
    """(mean activations [L, H, hd], effects [L, H], top-k heads, vector [D]), one prompt per forward."""
    layout = lm.layout
    n_layers, n_heads = layout.n_layers, layout.n_heads
    total: torch.Tensor | None = None
    for episode in episodes:
        reads: list[torch.Tensor] = [None] * n_layers  # type: ignore[list-item]

        def read(layer: int):
            def fn(module, args):
                reads[layer] = args[0][0, -1].float()  # o_proj's input at the query separator: all heads

            return fn

        run_with_hooks(lm, encoder.encode(episode).ids, layout.attn_out, [read(i) for i in range(n_layers)], pre=True)
        stacked = torch.stack(reads)
        total = stacked if total is None else total + stacked
    mean_act = (total / len(episodes)).view(n_layers, n_heads, -1).cpu()
    effects = plain_effects(lm, encoder.label_ids, trials, mean_act, list(range(n_layers)))
    heads = [(i // n_heads, i % n_heads) for i in torch.topk(effects.flatten(), k).indices.tolist()]
    hd = mean_act.shape[-1]
    vector = torch.zeros(layout.d_model)
    with torch.inference_mode():
        for layer, head in heads:
            padded = torch.zeros(n_heads * hd)
            padded[head * hd : (head + 1) * hd] = mean_act[layer, head]
            vector += layout.attn_out[layer](padded.to(lm.device, lm.dtype)[None, None]).float().view(-1).cpu()
    return mean_act, effects, heads, vector


def bench_fv(args, lm: LoadedModel, scorer: Scorer, encoder: PromptEncoder, train: list[Episode]) -> dict:
    episodes = train[: args.fv_episodes]

    def ivlib() -> FunctionVectors:
        fv = FunctionVectors(n_top_heads=args.fv_heads, ie_episodes=args.fv_trials)
        fv.fit(scorer, encoder, episodes)
        return fv

    FunctionVectors(n_top_heads=args.fv_heads, ie_episodes=1).fit(scorer, encoder, episodes[:2])  # warm-up
    fast, t_fast = timed(ivlib, lm.device)
    trials = [encoder.encode(e) for e in shuffle_labels(episodes[: args.fv_trials], fast.seed)]
    k = fast.n_top_heads  # resolved by fit when --fv-heads is not given
    (mean_act, effects, heads, vector), t_plain = timed(lambda: plain_fv(lm, encoder, episodes, trials, k), lm.device)
    n_heads = lm.layout.n_layers * lm.layout.n_heads
    mean_diff = (fast.mean_act - mean_act).abs().max().item()
    effect_diff = (fast.effects - effects).abs().max().item()
    vector_diff = (fast.vector - vector).abs().max().item()
    same_heads = fast.heads == heads
    return {
        "part": "fv",
        "what": f"{len(episodes)} episodes ({args.ext_shot}-shot) for the means, {len(trials)} "
        f"trials x {n_heads} heads, top {k}: {len(episodes) + len(trials) * (n_heads + 1)} "
        "plain forwards",
        "n": len(episodes),
        "fast": t_fast,
        "plain": t_plain,
        "agree": f"mean act max |diff| {mean_diff:.2e}, effects {effect_diff:.2e} (largest "
        f"{effects.abs().max().item():.2e}), top heads {'same' if same_heads else 'DIFFER'}, "
        f"vector {vector_diff:.2e} (largest {vector.abs().max().item():.2e})",
        "same": same_heads and close(vector_diff, vector, lm.dtype),
    }


# ---- SV -------------------------------------------------------------------------------------------
def plain_sv_vector(lm: LoadedModel, encoder: PromptEncoder, train: list[Episode], window: int, beta: float, lr: float):
    """[L, D]: per episode, one forward reading every attention output at the separators, then the inner
    mean of the last `window` demonstration states and the query's plus lr x the beta-weighted steps."""
    n_layers = lm.layout.n_layers
    total = torch.zeros(n_layers, lm.layout.d_model, device=lm.device)
    for episode in train:
        p = encoder.encode(episode)
        reads: list[torch.Tensor] = [None] * n_layers  # type: ignore[list-item]

        def read(layer: int, positions=p.sep_pos):
            def fn(module, args, output):
                reads[layer] = _hidden(output)[0, positions].float()  # [S, D]

            return fn

        run_with_hooks(lm, p.ids, lm.layout.attn_out, [read(i) for i in range(n_layers)])
        for layer in range(n_layers):
            demos, query = reads[layer][:-1], reads[layer][-1]
            k = min(window, len(demos))
            recent = demos[len(demos) - k :]
            vector = (recent.sum(0) + query) / (k + 1)
            if k > 1:
                weights = [beta ** (k - 1 - i) for i in range(1, k)]
                steps = sum(w * (recent[i] - recent[i - 1]) for w, i in zip(weights, range(1, k)))
                vector = vector + lr * steps / sum(weights)
            total[layer] += vector
    return (total / len(train)).cpu()


def plain_sv(
    lm: LoadedModel, encoder: PromptEncoder, train: list[Episode], validation: list[Episode]
) -> tuple[torch.Tensor, list[float], int]:
    """(vector [L, D], macro-F1 per number of first layers on validation, chosen L), one prompt per forward."""
    n_layers = lm.layout.n_layers
    vector = plain_sv_vector(lm, encoder, train, 6, 0.5, 1.0)  # StateVector's defaults
    labels = torch.tensor(encoder.label_ids, device=lm.device)
    prompts = [encoder.encode(e) for e in validation]
    preds = torch.empty(len(prompts), n_layers, dtype=torch.long)
    for i, p in enumerate(prompts):
        for n in range(1, n_layers + 1):

            def replace(layer: int):
                def fn(module, args, output):
                    _hidden(output)[0, -1] = vector[layer].to(lm.device, lm.dtype)
                    return output

                return fn

            logits = run_with_hooks(lm, p.ids, lm.layout.attn_out[:n], [replace(l) for l in range(n)])
            preds[i, n - 1] = torch.log_softmax(logits, -1)[labels].argmax()
    truth = [p.label for p in prompts]
    scores = [f1_scores(truth, preds[:, i].numpy(), encoder.n_classes)["macro"] for i in range(n_layers)]
    best = 1 + max(range(n_layers), key=lambda i: (scores[i], -i))  # ties: the fewest layers, as ivlib
    return vector, scores, best


def bench_sv(
    args, lm: LoadedModel, scorer: Scorer, encoder: PromptEncoder, train: list[Episode], validation: list[Episode]
) -> dict:
    def ivlib() -> StateVector:
        sv = StateVector()
        sv.fit(scorer, encoder, train, validation)
        return sv

    StateVector().fit(scorer, encoder, train[:2], validation[:4])  # warm-up
    plain_sv(lm, encoder, train[:1], validation[:1])
    fast, t_fast = timed(ivlib, lm.device)
    (vector, scores, best), t_plain = timed(lambda: plain_sv(lm, encoder, train, validation), lm.device)
    assert fast.vector is not None
    diff = (fast.vector - vector).abs().max().item()
    f1_diff = max(abs(a - b) for a, b in zip(fast.layer_scores, scores))
    n_layers = lm.layout.n_layers
    return {
        "part": "sv",
        "what": f"{len(train)} train + {len(validation)} validation episodes x {n_layers} L: "
        f"{len(train) + len(validation) * n_layers} plain forwards",
        "n": len(train) + len(validation),
        "fast": t_fast,
        "plain": t_plain,
        "agree": f"vector max |diff| {diff:.2e} (largest {vector.abs().max().item():.2e}), per-L macro-F1 max "
        f"|diff| {f1_diff:.3f}, L {fast.layers} vs {best}",
        "same": f1_diff == 0 and fast.layers == best and close(diff, vector, lm.dtype),
    }


# ---- I2CL -----------------------------------------------------------------------------------------
def plain_i2cl_vectors(lm: LoadedModel, encoder: PromptEncoder, demos: list) -> torch.Tensor:
    """[L, 2, D]: each demonstration alone, its sites' outputs at its last token, averaged."""
    modules = site_modules(lm.layout)
    total: torch.Tensor | None = None
    for demo in demos:
        ids = demo_prompt(encoder, demo).ids
        reads: list[torch.Tensor] = [None] * len(modules)  # type: ignore[list-item]

        def hook(i: int):
            def fn(module, args, output):
                reads[i] = _hidden(output).reshape(len(ids), -1)[-1].float()  # one row: [T, D] (OPT's fc2 too)

            return fn

        run_with_hooks(lm, ids, modules, [hook(i) for i in range(len(modules))])
        sample = torch.stack(reads).view(lm.layout.n_layers, 2, -1)
        total = sample if total is None else total + sample
    assert total is not None
    return (total / len(demos)).cpu()


def bench_i2cl(args, lm: LoadedModel, scorer: Scorer, encoder: PromptEncoder, train: list[Episode]) -> dict:
    demos = demonstrations(train)
    method = ImplicitICL(i2cl_epochs=args.i2cl_epochs)
    method.context_vectors(scorer, encoder, demos[:8])  # warm-up
    plain_i2cl_vectors(lm, encoder, demos[:1])
    fast, t_fast = timed(lambda: method.context_vectors(scorer, encoder, demos), lm.device)
    slow, t_plain = timed(lambda: plain_i2cl_vectors(lm, encoder, demos), lm.device)
    diff = (fast - slow).abs().max().item()
    method.vectors = fast
    calibration = demonstrations(train[: args.i2cl_episodes])
    _, t_cal = timed(lambda: method.calibrate(scorer, encoder, calibration), lm.device)
    steps = args.i2cl_epochs * -(-len(calibration) // method.i2cl_batch)
    return {
        "part": "i2cl",
        "what": f"context vectors of {len(demos)} distinct demonstrations: {len(demos)} forwards",
        "n": len(demos),
        "fast": t_fast,
        "plain": t_plain,
        "agree": f"vectors max |diff| {diff:.2e} (largest |v| {slow.abs().max().item():.2e})",
        "same": close(diff, slow, lm.dtype),
        "calibration": f"{t_cal:.2f} s for {steps} steps of {method.i2cl_batch} prompts ({steps / t_cal:.2f} steps/s; "
        f"{args.i2cl_epochs} epochs over {len(calibration)} demonstrations), loss "
        f"{method.loss_curve[0]:.4f} -> {method.loss_curve[-1]:.4f}",
    }


# ---- SITE -----------------------------------------------------------------------------------------
def plain_site_embedding(lm: LoadedModel, prompts: list[EncodedPrompt]) -> torch.Tensor:
    """[L, H, hd]: each head's o_proj input at the last token, one prompt per forward, averaged."""
    layout = lm.layout
    total: torch.Tensor | None = None
    for p in prompts:
        reads: list[torch.Tensor] = [None] * layout.n_layers  # type: ignore[list-item]

        def read(layer: int):
            def fn(module, args):
                reads[layer] = args[0][0, -1].float()

            return fn

        run_with_hooks(lm, p.ids, layout.attn_out, [read(i) for i in range(layout.n_layers)], pre=True)
        stacked = torch.stack(reads)
        total = stacked if total is None else total + stacked
    assert total is not None
    return (total / len(prompts)).view(layout.n_layers, layout.n_heads, -1).cpu()


def plain_site_loss(lm: LoadedModel, label_ids: list[int], emb: torch.Tensor, alpha: torch.Tensor, p: EncodedPrompt):
    """Cross-entropy of the label's first token, each head's last-token input mixed by hand."""
    n_heads, hd = emb.shape[1], emb.shape[2]

    def mix(layer: int):
        def fn(module, args):  # out of place: the mix saves h for the backward pass
            x = args[0]
            h = x[0, -1].view(n_heads, hd)
            a = alpha[layer][:, None].to(x.dtype)
            last = ((1 - a) * h + a * emb[layer].to(x.device, x.dtype)).reshape(1, 1, -1)
            return (torch.cat([x[:, :-1], last], dim=1), *args[1:])

        return fn

    handles = [m.register_forward_pre_hook(mix(i)) for i, m in enumerate(lm.layout.attn_out)]
    try:
        logits = lm.model(input_ids=torch.tensor([p.ids], device=lm.device)).logits[0, -1].float()
    finally:
        for handle in handles:
            handle.remove()
    return -torch.log_softmax(logits, -1)[label_ids[p.label]]


def plain_site_fit(
    lm: LoadedModel,
    label_ids: list[int],
    emb: torch.Tensor,
    train: list[EncodedPrompt],
    val: list[EncodedPrompt],
    steps: int,
    seed: int,
) -> tuple[torch.Tensor, float]:
    """(logits after `steps` Adam steps of one prompt each, validation loss): the defaults' lr and init."""
    logits = torch.zeros(lm.layout.n_layers, lm.layout.n_heads, device=lm.device, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=0.2)
    rng = np.random.default_rng([seed, 18])
    order: list[int] = []
    params = list(lm.model.parameters())
    flags = [q.requires_grad for q in params]
    for q in params:
        q.requires_grad_(False)
    try:
        for _ in range(steps):
            order = order or rng.permutation(len(train)).tolist()
            optimizer.zero_grad()
            plain_site_loss(lm, label_ids, emb, torch.sigmoid(logits), train[order.pop(0)]).backward()
            optimizer.step()
        with torch.no_grad():
            val_loss = sum(float(plain_site_loss(lm, label_ids, emb, torch.sigmoid(logits), p)) for p in val) / len(val)
    finally:
        for q, flag in zip(params, flags):
            q.requires_grad_(flag)
    return logits.detach().cpu(), val_loss


def alternating(fns: Sequence, repeats: int, device: torch.device) -> tuple[list, list[tuple[float, float]]]:
    """(each function's last result, its (median wall s, median CPU s)) over `repeats` runs each, the order
    alternating between runs. A loop of short steps on a CPU shared with other jobs loses wall time to
    them, more or less from one run to the next (SITE's optimisation once measured 0.6x its plain loop
    in wall time at load 10-13, and 1.25x in CPU time: bench/RESULTS.md); the process's CPU time is the
    work each side did, and alternating keeps a drift in the load from favouring one side."""
    results: list = [None] * len(fns)
    walls: list[list[float]] = [[] for _ in fns]
    cpus: list[list[float]] = [[] for _ in fns]
    for r in range(repeats):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            cpu0 = time.process_time()
            results[i], wall = timed(fns[i], device)
            cpus[i].append(time.process_time() - cpu0)
            walls[i].append(wall)
    return results, [(statistics.median(w), statistics.median(c)) for w, c in zip(walls, cpus)]


def bench_site(
    args, lm: LoadedModel, scorer: Scorer, encoder: PromptEncoder, train: list[Episode], validation: list[Episode]
) -> list[dict]:
    few_shot = [encoder.encode(e) for e in train]
    zero_shot = [encoder.encode(e.query_only()) for e in train]
    val = [encoder.encode(e.query_only()) for e in validation]
    head_means(scorer, few_shot[:4], "warm-up")
    plain_site_embedding(lm, few_shot[:1])
    emb, t_fast = timed(lambda: head_means(scorer, few_shot, "SITE"), lm.device)
    emb_plain, t_plain = timed(lambda: plain_site_embedding(lm, few_shot), lm.device)
    emb_diff = (emb - emb_plain).abs().max().item()

    def ivlib(steps: int = args.site_steps) -> SoftInjection:
        site = SoftInjection(site_steps=steps, site_val_every=steps + 1, seed=42)
        site.emb = emb
        site.optimise(scorer, zero_shot, val, encoder.n_classes)
        return site

    def plain(steps: int = args.site_steps) -> tuple[torch.Tensor, float]:
        return plain_site_fit(lm, encoder.label_ids, emb, zero_shot, val, steps, 42)

    ivlib(2), plain(2)  # warm-up: the first backward passes, outside the clocks
    (fit, (logits, val_loss)), clocks = alternating((ivlib, plain), args.repeats, lm.device)
    (t_opt, cpu_opt), (t_opt_plain, cpu_opt_plain) = clocks
    on_cpu = lm.device.type == "cpu"
    logit_diff = (fit.logits - logits).abs().max().item()
    loss_diff = abs(fit.checkpoints[-1]["loss"] - val_loss)
    return [
        {
            "part": "site",
            "what": f"task embedding: {len(train)} episodes ({args.ext_shot}-shot), {len(train)} forwards",
            "n": len(train),
            "fast": t_fast,
            "plain": t_plain,
            "agree": f"embedding max |diff| {emb_diff:.2e} (largest {emb_plain.abs().max().item():.2e})",
            "same": close(emb_diff, emb_plain, lm.dtype),
        },
        {
            "part": "opt",
            "what": f"SITE optimisation: {args.site_steps} steps of 1 zero-shot prompt (forward + backward), "
            f"then {len(val)} validation prompts ({args.site_steps / t_opt:.1f} steps/s incl. validation); "
            + (
                f"CPU seconds of this process, median of {args.repeats} alternating run(s) per side "
                f"(wall: {t_opt:.2f} s vs {t_opt_plain:.2f} s)"
                if on_cpu
                else f"median of {args.repeats} alternating run(s) per side"
            ),
            "n": args.site_steps,
            "fast": cpu_opt if on_cpu else t_opt,
            "plain": cpu_opt_plain if on_cpu else t_opt_plain,
            "agree": f"logits max |diff| {logit_diff:.2e} (largest {logits.abs().max().item():.2e}), "
            f"validation loss {fit.checkpoints[-1]['loss']:.4f} vs {val_loss:.4f}",
            "same": close(logit_diff, logits, lm.dtype) and loss_diff <= 1e-3 * max(1.0, abs(val_loss)),
        },
    ]


# ---- report ---------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which fits to time (default all)")
    ap.add_argument(
        "--episodes", type=int, default=100, help="IV extraction, TV and SV training episodes (default 100)"
    )
    ap.add_argument(
        "--ext-shot", type=int, default=4, help="demonstrations per class when fitting (default 4, as the CLI)"
    )
    ap.add_argument("--ext-strength", type=float, default=0.3, help="IV a1 (default 0.3)")
    ap.add_argument("--ext-batch", type=int, default=10, help="IV episodes between refreshes (default 10)")
    ap.add_argument(
        "--select-episodes", type=int, default=50, help="TV and SV validation episodes for the layer search"
    )
    ap.add_argument("--fv-episodes", type=int, default=20, help="FV episodes for the mean activations (default 20)")
    ap.add_argument("--fv-trials", type=int, default=4, help="FV shuffled-label trials for the effects (default 4)")
    ap.add_argument("--fv-heads", type=int, help="FV top heads (default: ivlib's, about 2%% of all heads)")
    ap.add_argument("--i2cl-epochs", type=int, default=100, help="I2CL calibration epochs (default 100, as the CLI)")
    ap.add_argument(
        "--i2cl-episodes", type=int, default=1, help="episodes whose demonstrations I2CL calibrates on (default 1)"
    )
    ap.add_argument("--site-steps", type=int, default=100, help="SITE optimisation steps timed (default 100)")
    ap.add_argument("--batch-size", type=int, default=16, help="ivlib's batch size (default 16)")
    ap.add_argument(
        "--repeats", type=int, default=1, help="IV and SITE's optimisation: timed runs of each side, median shown"
    )
    ap.add_argument("--tokenizer", help="with --random-llama7b: tokenizer directory (see bench/throughput.py)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, one per core)")
    args = ap.parse_args()
    if args.quick:
        args.episodes, args.select_episodes = min(args.episodes, 30), min(args.select_episodes, 10)
        args.fv_episodes, args.fv_trials = min(args.fv_episodes, 6), min(args.fv_trials, 2)
        args.i2cl_epochs = min(args.i2cl_epochs, 20)
        args.site_steps = min(args.site_steps, 20)
    if (
        min(
            args.episodes,
            args.ext_shot,
            args.select_episodes,
            args.fv_episodes,
            args.fv_trials,
            args.batch_size,
            args.repeats,
            args.i2cl_epochs,
            args.i2cl_episodes,
            args.site_steps,
        )
        < 1
        or args.ext_batch < 0
    ):
        ap.error("counts must be >= 1 (--ext-batch >= 0)")
    if args.fv_trials > args.fv_episodes:
        ap.error("--fv-trials cannot exceed --fv-episodes (the trials are the first episodes, labels shuffled)")
    if args.tokenizer and not args.random_llama7b:
        ap.error("--tokenizer only applies with --random-llama7b")
    set_threads(ap, args.threads)

    load_start = os.getloadavg()[0]
    lm, task = setup(args.config, args.model, args.task, args.gpu, args.random_llama7b, args.tokenizer)
    encoder = make_encoder(lm, task, args.random_llama7b)
    scorer = Scorer(lm, encoder.label_ids, args.batch_size, quiet=True)
    train = sample_episodes(
        task.splits["train"], task.n_classes, args.ext_shot, max(args.episodes, args.fv_episodes), 42, "train/extract"
    )
    validation = sample_episodes(
        task.splits["validation"], task.n_classes, 1, args.select_episodes, 42, "validation/select"
    )
    largest = max(max(max(encoder.encode(e).ids) for e in train), max(encoder.label_ids), lm.tokenizer.pad_token_id)
    if largest >= model_vocab(lm):
        raise SystemExit(f"extraction.py: token id {largest} is outside the model's vocabulary of {model_vocab(lm)}")

    rows = []
    if "iv" in args.parts:
        rows.append(bench_iv(args, lm, scorer, encoder, train[: args.episodes]))
    if "tv" in args.parts:
        rows.append(bench_tv(args, lm, scorer, encoder, train[: args.episodes], validation))
    if "fv" in args.parts:
        rows.append(bench_fv(args, lm, scorer, encoder, train))
    if "sv" in args.parts:
        rows.append(bench_sv(args, lm, scorer, encoder, train[: args.episodes], validation))
    if "i2cl" in args.parts:
        rows.append(bench_i2cl(args, lm, scorer, encoder, train[: args.episodes]))
    if "site" in args.parts:
        rows.extend(bench_site(args, lm, scorer, encoder, train[: args.episodes], validation))

    tokens = sum(len(encoder.encode(e).ids) for e in train) / len(train)
    print(
        f"model {lm.name} ({lm.source}) on {where_it_ran(lm.device, load_start)}, "
        f"{str(lm.dtype).removeprefix('torch.')} | torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print(
        f"task {task.name} | train prompts {args.ext_shot}-shot, {tokens:.1f} tokens mean; validation 1-shot | "
        f"ivlib batch {args.batch_size} | plain loops: one unpadded prompt per forward, full logits"
    )
    print()
    head = f"{'part':<4} {'ivlib s':>9} {'plain s':>9} {'ratio':>8}  {'agree':<6} work"
    print(head)
    print("-" * (len(head) + 40))
    for r in rows:
        print(
            f"{r['part']:<4} {r['fast']:>9.2f} {r['plain']:>9.2f} {r['plain'] / r['fast']:>7.1f}x  "
            f"{'yes' if r['same'] else 'NO':<6} {r['what']}"
        )
    print()
    for r in rows:
        print(f"{r['part']}: {r['agree']}")
        if "calibration" in r:
            print(f"{r['part']} calibration: {r['calibration']}")
    iv = next((r for r in rows if r["part"] == "iv"), None)
    if iv is not None:
        print(
            f"iv: ivlib {iv['n'] / iv['fast']:.2f} episodes/s vs one at a time {iv['n'] / iv['plain']:.2f} "
            f"({args.repeats} timed run(s) per side, median)"
        )
    print(
        "verdict: "
        + "; ".join(
            f"{r['part'].upper()} fit {r['plain'] / r['fast']:.1f}x the plain loop's speed, "
            f"results {'agree' if r['same'] else 'DIFFER'}"
            for r in rows
        )
    )


if __name__ == "__main__":
    main()
