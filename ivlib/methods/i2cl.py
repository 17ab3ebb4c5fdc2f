"""Implicit In-context Learning (I2CL; Li et al., ICLR 2025): demonstrations as context vectors,
injected into a zero-shot forward with a few calibrated scalars.

Context vectors: each demonstration is run on its own (BOS, input, separator, answer and the
example separator, as it appears in a prompt) and two sites of every layer are read at its last
token: the attention output (the output projection, `layout.attn_out`) and the MLP output
(`layout.mlp_out`), before each joins the residual stream. Averaged over the demonstrations:
`vectors` is [n_layers, 2, d_model] (module axis: attn, mlp).

Injection: at every layer, both sites and every position of the query alone (zero-shot cost),
    out <- b * out + a * v,
with one (a, b) per layer and site, starting at (0.1, 1.0).

Calibration ("noisy self-calibration"): the frozen model is differentiated for a and b only, on
the demonstrations themselves posed as zero-shot queries: cross-entropy of the label's first token
(the evaluation's own scores), AdamW (lr 0.01, weight decay 1e-3), mini-batches of 2, 100 epochs,
a linear warm-up of the release's `int(0.05 * epochs * (n // batch))` steps, then a cosine decay
over all steps. While calibrating, Gaussian noise of 0.001 x each position's L2 norm is added after
every injection.

In ivlib's protocol the demonstrations are the distinct training examples that appear as
demonstrations in the fit episodes (-e episodes of -s per class; with -e 1 it is one
demonstration set, as in the reference's runs), from the train split only. Nothing is selected, so
no validation episodes are used. The reference draws each step's mini-batch afresh (examples can
repeat within an epoch); here each epoch visits every calibration prompt once, in a seeded order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn

from .. import budget
from .. import distributed as dist
from ..episodes import Episode, Example
from ..errors import UsageError
from ..hooks import map_outputs, watch_outputs
from ..layout import ModelLayout
from ..prompts import EncodedPrompt, PromptBatch, PromptEncoder
from ..scoring import Scorer
from ..settings import Setting
from ..state import TensorSpec
from .base import Method, fitted, register

SITES = ("attn", "mlp")  # the module axis of `vectors`, `a` and `b`


def site_modules(layout: ModelLayout) -> list[nn.Module]:
    """Layer-major: [attn 0, mlp 0, attn 1, mlp 1, ...]; index i is (layer i // 2, site i % 2)."""
    return [m for pair in zip(layout.attn_out, layout.mlp_out) for m in pair]


def demonstrations(episodes: list[Episode]) -> list[Example]:
    """The distinct demonstrations of the episodes, in order of first appearance."""
    return list(dict.fromkeys(d for e in episodes for d in e.demos))


def demo_prompt(encoder: PromptEncoder, demo: Example) -> EncodedPrompt:
    """One demonstration alone, as a prompt shows it in the run's template (answer and example
    separator included): its last token is where the context vectors are read."""
    text = encoder.demonstration(demo)
    ids = encoder.bos + list(encoder.tok(text, add_special_tokens=False)["input_ids"])
    return EncodedPrompt(ids, [len(ids) - 1], [encoder.n_classes], demo.label, len(ids))


WARMUP_SHARE = 0.05  # of the epochs, as the release counts them (`schedule`)


def schedule(n: int, batch: int, epochs: int) -> tuple[int, int, int]:
    """(steps per epoch, warm-up steps, total steps) of a calibration on `n` prompts, `batch` per step.

    Warm-up: the release's formula, `int(0.05 * epochs * (n // batch))` steps, truncated once after
    scaling (so 30 epochs of 2 steps warm up for 3 steps, not for one whole epoch). Steps: each epoch
    visits every prompt once, ceil(n / batch) steps (the last one short), and the cosine ends at the
    last step. Where `batch` divides `n` (the release's settings: k demonstrations per class, batches
    of 2) that is the release's count and horizon too. Otherwise the release takes n // batch steps
    per epoch, each a fresh random draw, towards a horizon of `epochs * n // batch` that its last step
    never reaches; a full pass per epoch needs the extra step, and the cosine then ends at zero."""
    per_epoch = math.ceil(n / batch)
    warmup = int((WARMUP_SHARE * epochs) * (n // batch))
    return per_epoch, warmup, epochs * per_epoch


def lr_factor(step: int, warmup: int, total: int) -> float:
    """The reference's schedule: linear warm-up, then a cosine over all `total` steps (not restarted)."""
    if warmup > 0 and step <= warmup:
        return step / warmup
    return (1 + math.cos(math.pi * step / total)) / 2


@register
class ImplicitICL(Method):
    name = "i2cl"
    needs_fit = True
    has_state = True
    fixed_eval_shot = 0  # the demonstrations live in the vectors: queries run alone
    # its injection edits every position of every forward: a label's continuation is scored under it, as
    # the steered model would score it, but decoding would inject into the tokens it writes, which the
    # paper (classification by label tokens) never defines
    scoring_rules = ("first-token", "full", "full-mean", "vocab")
    scoring_note = "it injects into every position of every forward, the tokens it would generate too"
    settings = (
        Setting(
            "i2cl_sets",
            int,
            1,
            "training episodes (from the first, at most -e) whose demonstrations make the context vectors and "
            "the calibration data: the paper uses one set of k per class; each more set multiplies the "
            "calibration's cost",
            low=1,
            symbol="sets",
        ),
        Setting("i2cl_epochs", int, 100, "calibration epochs over the demonstrations", low=1),
        Setting("i2cl_batch", int, 2, "calibration prompts per optimiser step", low=1),
        Setting("i2cl_lr", float, 0.01, "calibration learning rate (AdamW)", low=0, symbol="lr"),
        Setting("i2cl_wd", float, 1e-3, "calibration weight decay (AdamW)", low=0, symbol="wd"),
        Setting(
            "i2cl_noise", float, 0.001, "calibration noise, times each position's norm; 0 = none", low=0, symbol="noise"
        ),
        Setting("i2cl_init_a", float, 0.1, "initial strength a of the context vectors", symbol="a0", scales=True),
        Setting("i2cl_init_b", float, 1.0, "initial scale b of the module outputs", symbol="b0", scales=True),
    )

    i2cl_sets: int
    i2cl_epochs: int
    i2cl_batch: int
    i2cl_lr: float
    i2cl_wd: float
    i2cl_noise: float
    i2cl_init_a: float
    i2cl_init_b: float

    def __init__(self, *args: Any, seed: int = 42, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seed = seed  # the run's: the calibration's prompt order and noise
        self.vectors: torch.Tensor | None = None  # [L, 2, D] float32
        self.a: torch.Tensor | None = None  # [L, 2] float32
        self.b: torch.Tensor | None = None  # [L, 2] float32
        self.loss_curve: list[float] = []  # mean calibration loss per epoch
        self.n_demos = 0

    @classmethod
    def from_settings(cls, values: dict[str, Any], seed: int) -> ImplicitICL:
        return cls(**values, seed=seed)

    def labeled_examples(self, train: list[Episode], validation: list[Episode] | None) -> dict[str, int]:
        """The demonstrations of the first --i2cl-sets training episodes (vectors and calibration)."""
        return {"fit": budget.distinct(budget.demonstrations(train[: self.i2cl_sets])), "selection": 0}

    def fit_summary(self) -> dict[str, Any]:
        a, b = fitted(self.a, self.name), fitted(self.b, self.name)

        def per_site(t: torch.Tensor) -> dict[str, list[float]]:
            return {site: [round(float(x), 4) for x in t[:, j]] for j, site in enumerate(SITES)}

        return {
            "demonstrations": self.n_demos,
            "loss_curve": [round(x, 4) for x in self.loss_curve],
            "a": per_site(a),
            "b": per_site(b),
        }

    # ---- context vectors ------------------------------------------------------------------------
    def context_vectors(self, scorer: Scorer, encoder: PromptEncoder, demos: list[Example]) -> torch.Tensor:
        """[L, 2, D] float32: each site's output at each demonstration's last token, averaged."""
        modules = site_modules(scorer.layout)
        n_layers = scorer.layout.n_layers

        def read(batch: PromptBatch) -> torch.Tensor:  # [B, L, 2, D]
            rows, width = batch.input_ids.shape
            last: dict[int, torch.Tensor] = {}

            def keep(i: int, hidden: torch.Tensor) -> None:  # [B, T, D], or OPT's fc2: [B * T, D]
                last[i] = hidden.reshape(rows, width, -1)[:, -1].float()  # left-padded: the last token

            with watch_outputs(modules, keep):
                scorer.forward(batch)
            reads = torch.stack([last[i].to(last[0].device) for i in range(len(modules))])  # [2L, B, D]
            return reads.view(n_layers, 2, *reads.shape[1:]).permute(2, 0, 1, 3)

        prompts = [demo_prompt(encoder, d) for d in demos]
        return scorer.runner.map(prompts, read, "I2CL context vectors").mean(dim=0).clone()

    # ---- injection ------------------------------------------------------------------------------
    @contextmanager
    def injected(
        self,
        layout: ModelLayout,
        a: torch.Tensor,
        b: torch.Tensor,
        noise: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Iterator[None]:
        """out <- b * out + a * v at every position of every site; `noise` (calibration only) then adds
        Gaussian noise of that many times each position's norm. `a` and `b` may carry gradients."""
        vectors = fitted(self.vectors, self.name)
        modules = site_modules(layout)
        moved: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}  # vectors on each site's device, once

        def mix(i: int, hidden: torch.Tensor) -> torch.Tensor:
            layer, site = divmod(i, 2)
            dtype, device = hidden.dtype, hidden.device
            if (device, dtype) not in moved:
                moved[device, dtype] = vectors.to(device, dtype)
            v = moved[device, dtype][layer, site]  # [D]
            out = b[layer, site].to(device, dtype) * hidden + a[layer, site].to(device, dtype) * v
            if noise > 0:
                scale = out.detach().norm(dim=-1, keepdim=True)  # [B, T, 1]
                draw = torch.randn(out.shape, generator=generator, device=device, dtype=dtype)
                out = out + noise * scale * draw
            return out

        with map_outputs(modules, mix):
            yield

    # ---- calibration ----------------------------------------------------------------------------
    def calibrate(self, scorer: Scorer, encoder: PromptEncoder, demos: list[Example]) -> None:
        """Learn a and b by gradient descent through the frozen model; every process runs it whole
        (no split) with the same seeded order and noise, then all adopt rank 0's result."""
        layout, device = scorer.layout, scorer.lm.device
        prompts = [encoder.encode(Episode((), d)) for d in demos]  # each demonstration as a zero-shot query
        a = torch.full((layout.n_layers, 2), self.i2cl_init_a, device=device, requires_grad=True)
        b = torch.full((layout.n_layers, 2), self.i2cl_init_b, device=device, requires_grad=True)
        optimiser = torch.optim.AdamW([a, b], lr=self.i2cl_lr, weight_decay=self.i2cl_wd)
        _, warmup, total = schedule(len(prompts), self.i2cl_batch, self.i2cl_epochs)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, partial(lr_factor, warmup=warmup, total=total))
        order_gen = torch.Generator().manual_seed(self.seed)
        noise_gen = torch.Generator(device=device).manual_seed(self.seed)
        curve: list[float] = []
        with scorer.trainable(), self.injected(layout, a, b, self.i2cl_noise, noise_gen):
            for _ in range(self.i2cl_epochs):
                order = torch.randperm(len(prompts), generator=order_gen).tolist()
                losses = [
                    self._step(scorer, [prompts[i] for i in order[s : s + self.i2cl_batch]], optimiser, scheduler)
                    for s in range(0, len(order), self.i2cl_batch)
                ]
                curve.append(sum(losses) / len(losses))
        result = (a.detach().cpu(), b.detach().cpu(), curve)
        self.a, self.b, self.loss_curve = dist.share(lambda: result, "I2CL calibration")[0]  # rank 0's

    def _step(self, scorer: Scorer, prompts: list[EncodedPrompt], optimiser, schedule) -> float:
        """One optimiser step on one mini-batch; its loss."""
        batch = scorer.batch(prompts)
        try:
            scores = scorer.differentiable_scores(batch)  # [B, C] label log-probs
            loss = -scores.gather(1, batch.labels[:, None].to(scores.device)).mean()
            optimiser.zero_grad()
            loss.backward()
        except torch.OutOfMemoryError:
            raise UsageError(
                f"i2cl calibration: out of memory at --i2cl-batch {self.i2cl_batch}; accepted: a smaller --i2cl-batch"
            ) from None
        if not torch.isfinite(loss):
            raise UsageError("i2cl calibration: the loss is not finite; lower --i2cl-lr or run with --no-half")
        optimiser.step()
        schedule.step()
        return float(loss.detach())

    def fit(
        self, scorer: Scorer, encoder: PromptEncoder, episodes: list[Episode], validation: list[Episode] | None = None
    ) -> None:
        demos = demonstrations(episodes[: self.i2cl_sets])
        if not demos:
            raise UsageError("i2cl needs demonstrations in its training episodes; accepted: -s 1 or more")
        self.n_demos = len(demos)
        self.vectors = self.context_vectors(scorer, encoder, demos)
        self.calibrate(scorer, encoder, demos)

    def predict(self, scorer: Scorer, batch: PromptBatch) -> torch.Tensor:
        with self.injected(scorer.layout, fitted(self.a, self.name), fitted(self.b, self.name)):
            return scorer.label_scores(batch)

    @classmethod
    def state_spec(cls, layout: ModelLayout, n_classes: int) -> dict[str, TensorSpec]:
        n = layout.n_layers
        return {
            "vectors": TensorSpec((n, 2, layout.d_model)),  # sites: attention output, MLP output
            "a": TensorSpec((n, 2)),
            "b": TensorSpec((n, 2)),
            "loss_curve": TensorSpec((None,)),
            "demonstrations": TensorSpec((), "int"),
        }

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "vectors": fitted(self.vectors, self.name).contiguous(),
            "a": fitted(self.a, self.name).contiguous(),
            "b": fitted(self.b, self.name).contiguous(),
            "loss_curve": torch.tensor(self.loss_curve, dtype=torch.float64),
            "demonstrations": torch.tensor(self.n_demos),
        }

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.vectors = tensors["vectors"].float()
        self.a, self.b = tensors["a"].float(), tensors["b"].float()
        self.loss_curve = tensors["loss_curve"].tolist()
        self.n_demos = int(tensors["demonstrations"])
