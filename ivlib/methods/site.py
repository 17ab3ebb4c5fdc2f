"""Soft Injection of task embeddings (SITE; Park & Rhee 2025).

1. Task embedding: every attention head's mean output (the input of the attention output
   projection, sliced per head, as Function Vectors read it) at the last token of the `-s`-shot
   training prompts: `emb` [L, H, head_dim].
2. Soft head selection: one mixing weight per head, alpha = sigmoid(logit), all logits starting at
   `site_init`. At the last token of a zero-shot prompt every head's output h becomes
   (1 - alpha) * h + alpha * emb; the logits are fitted with Adam on the cross-entropy of the
   correct label's first token (the full vocabulary's softmax, as the reference), against the
   frozen model, on zero-shot prompts of the training episodes' queries, `site_batch` per step
   (shuffled passes over them).
3. Every `site_val_every` steps (and after the last) the weights are scored on zero-shot prompts
   of the validation episodes' queries; the best checkpoint (`site_select`: validation loss, the
   reference's criterion, or macro-F1) is kept. The reference meant to keep the best too, but its
   best loss is never updated, so it keeps the last validated weights.
4. Evaluation is zero-shot: the query alone, mixed at its last token.

Data parallel: every process runs the whole optimisation on the same seeded batches; at each
checkpoint all processes adopt the main process's logits (one exchange of L x H floats), so the
validation, the kept checkpoint and the evaluation use identical weights on every process.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch

from .. import budget
from .. import distributed as dist
from ..episodes import Episode
from ..hooks import edit_inputs
from ..layout import ModelLayout
from ..metrics import f1_scores
from ..prompts import EncodedPrompt, PromptBatch, PromptEncoder
from ..scoring import Scorer, gold_first, head_means
from ..settings import Setting
from ..state import TensorSpec
from .base import Method, fitted, register

SELECT = ("loss", "macro_f1")
TOP_HEADS = 10  # heads listed in the record, by alpha


def soft_injection(
    scorer: Scorer, emb: torch.Tensor, alpha: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> AbstractContextManager:
    """At (rows, cols), every head's input to the output projection h <- (1 - alpha) h + alpha emb.

    `emb` [L, H, hd], `alpha` [L, H]. The pre-hook writes into a copy of the input (`InputSite`),
    so gradients reach `alpha` and nothing the model keeps is edited in place."""
    hd = emb.shape[-1]
    device = rows.device
    alpha = alpha.to(device)
    keep = (1 - alpha)[:, :, None].expand(-1, -1, hd).reshape(alpha.shape[0], -1)  # [L, F]
    value = (alpha[:, :, None] * emb.to(device)).reshape(alpha.shape[0], -1)  # [L, F]
    n = len(rows)
    patch = [(keep[l].expand(n, -1), value[l].expand(n, -1)) for l in range(alpha.shape[0])]
    return edit_inputs(scorer.layout.attn_out, rows, cols, patch=patch)


def _passes(n: int, rng: np.random.Generator) -> Iterator[int]:
    """Indices 0..n-1 in a fresh random order on each pass, endlessly."""
    while True:
        yield from rng.permutation(n).tolist()


@register
class SoftInjection(Method):
    name = "site"
    supports_open_vocabulary = True
    needs_fit = True
    needs_validation = True  # keeps the best checkpoint on validation
    has_state = True
    fixed_eval_shot = 0
    settings = (
        Setting("site_steps", int, 400, "optimisation steps of the mixing weights", low=1, symbol="steps"),
        Setting("site_lr", float, 0.2, "Adam learning rate of the mixing logits", low=1e-6, symbol="lr"),
        Setting("site_batch", int, 1, "zero-shot training prompts per step", low=1),
        Setting(
            "site_init",
            float,
            0.0,
            "initial logit of every head's weight (alpha = sigmoid(logit); 0 is alpha 0.5)",
            low=-30.0,
            high=30.0,
        ),
        Setting("site_val_every", int, 50, "steps between validation checkpoints (the last step is one)", low=1),
        Setting(
            "site_select",
            str,
            "loss",
            "what picks the kept checkpoint on validation: loss (the reference's) or macro_f1",
            choices=SELECT,
        ),
    )

    site_steps: int
    site_lr: float
    site_batch: int
    site_init: float
    site_val_every: int
    site_select: str

    def __init__(self, *args: Any, seed: int = 42, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seed = seed  # the run's: the order of the training prompts
        self.emb: torch.Tensor | None = None  # [L, H, head_dim] float32
        self.logits: torch.Tensor | None = None  # [L, H] float32, the kept checkpoint
        self.loss_curve: list[float] = []  # training loss per step
        self.checkpoints: list[dict[str, float]] = []  # {step, loss, macro_f1} on validation
        self.chosen: int | None = None  # the kept checkpoint's step

    @classmethod
    def from_settings(cls, values: dict[str, Any], seed: int) -> SoftInjection:
        return cls(**values, seed=seed)

    @property
    def alpha(self) -> torch.Tensor:
        """[L, H] mixing weights of the kept checkpoint."""
        return torch.sigmoid(fitted(self.logits, self.name))

    # ---- fitting -------------------------------------------------------------------------------
    def fit(
        self, scorer: Scorer, encoder: PromptEncoder, episodes: list[Episode], validation: list[Episode] | None = None
    ) -> None:
        if not validation:
            raise ValueError("SITE keeps its best checkpoint on validation episodes")
        self.emb = head_means(scorer, [encoder.encode(e) for e in episodes], "SITE task embedding")
        train = [encoder.encode(e.query_only()) for e in episodes]
        val = [encoder.encode(e.query_only()) for e in validation]
        self.optimise(scorer, train, val, encoder.n_classes)

    def _loss(self, scorer: Scorer, batch: PromptBatch, logits: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the correct label's first token, differentiable in `logits`."""
        rows = torch.arange(batch.input_ids.shape[0], device=batch.input_ids.device)
        with soft_injection(scorer, fitted(self.emb, self.name), torch.sigmoid(logits), rows, batch.query_cols):
            scores = scorer.differentiable_scores(batch)  # [B, C] log-probs over the whole vocabulary
        return -scores[rows, batch.labels.to(scores.device)].mean()

    def optimise(self, scorer: Scorer, train: list[EncodedPrompt], val: list[EncodedPrompt], n_classes: int) -> None:
        """Fit the logits on `train` (zero-shot prompts), keeping the best checkpoint on `val`."""
        layout = scorer.layout
        logits = torch.full((layout.n_layers, layout.n_heads), self.site_init, device=scorer.lm.device)
        logits.requires_grad_(True)
        optimizer = torch.optim.Adam([logits], lr=self.site_lr)
        order = _passes(len(train), np.random.default_rng([self.seed, 18]))
        self.loss_curve, self.checkpoints = [], []
        best: tuple[tuple[float, float], torch.Tensor, int] | None = None
        with scorer.trainable(), scorer.runner.progress(self.site_steps, "SITE optimisation") as bar:
            for step in range(1, self.site_steps + 1):
                batch = scorer.batch([train[next(order)] for _ in range(self.site_batch)])
                optimizer.zero_grad()
                loss = self._loss(scorer, batch, logits)
                loss.backward()
                optimizer.step()
                self.loss_curve.append(float(loss.detach()))
                bar.update(1)
                if step % self.site_val_every and step != self.site_steps:
                    continue
                with torch.no_grad():  # every process continues from the main process's logits
                    logits.copy_(dist.share(lambda: logits.detach().cpu(), "SITE weights")[0])
                point = self.validate(scorer, val, logits.detach(), n_classes)
                self.checkpoints.append({"step": step, **point})
                key = self._rank(point)
                if best is None or key > best[0]:  # ties: the earlier checkpoint
                    best = (key, logits.detach().cpu().clone(), step)
        assert best is not None  # the last step is always a checkpoint
        _, self.logits, self.chosen = best

    def _rank(self, point: dict[str, float]) -> tuple[float, float]:
        """Higher is better: the validation loss alone, or macro-F1 with ties to the lower loss."""
        if self.site_select == "loss":
            return (-point["loss"], 0.0)
        return (point["macro_f1"], -point["loss"])

    def validate(
        self, scorer: Scorer, prompts: list[EncodedPrompt], logits: torch.Tensor, n_classes: int
    ) -> dict[str, float]:
        """Validation loss (mean cross-entropy of the correct label's first token: the training
        objective) and macro-F1 of the predictions the run's scoring rule makes, under `logits`."""
        alpha = torch.sigmoid(logits)

        def scores(batch: PromptBatch) -> torch.Tensor:  # [B, C + W]: first-token log-probs, the rule's row
            rows = torch.arange(batch.input_ids.shape[0], device=batch.input_ids.device)
            with soft_injection(scorer, fitted(self.emb, self.name), alpha, rows, batch.query_cols):
                answer = scorer.forward(batch)
                gold = gold_first(batch)
                judged = scorer.rule.from_logits(answer, gold) if scorer.rule.last_token else scorer.label_scores(batch)
            return torch.cat([scorer.label_logprobs(answer, gold), judged], dim=1)

        out = scorer.runner.map(prompts, scores, "SITE validation")
        labels = torch.tensor([p.label for p in prompts])
        loss = float(-out[torch.arange(len(prompts)), labels].mean())
        predictions = scorer.predictions(out[:, n_classes:], prompts)
        macro = f1_scores(labels.numpy(), predictions, n_classes)["macro"]
        return {"loss": round(loss, 6), "macro_f1": round(float(macro), 6)}

    def labeled_examples(self, train: list[Episode], validation: list[Episode] | None) -> dict[str, int]:
        """The embedding reads the training demonstrations and the weights learn from the queries'
        labels; the checkpoints are scored on the validation queries alone (zero-shot)."""
        return {
            "fit": budget.distinct(budget.demonstrations(train) + budget.queries(train)),
            "selection": budget.distinct(budget.queries(validation or [])),
        }

    def fit_summary(self) -> dict[str, Any]:
        alpha = self.alpha
        n_heads = alpha.shape[1]
        top = torch.topk(alpha.flatten(), min(TOP_HEADS, alpha.numel())).indices.tolist()
        return {
            "chosen_step": self.chosen,
            "chosen_by": self.site_select,
            "loss_curve": [round(x, 4) for x in self.loss_curve],
            "validation": self.checkpoints,
            "alpha": {
                "mean": round(float(alpha.mean()), 4),
                "max": round(float(alpha.max()), 4),
                "above_half": int((alpha > 0.5).sum()),
                "top_heads": [[i // n_heads, i % n_heads, round(float(alpha.flatten()[i]), 4)] for i in top],
            },
        }

    # ---- evaluation ----------------------------------------------------------------------------
    def predict(self, scorer: Scorer, batch: PromptBatch) -> torch.Tensor:
        rows = torch.arange(batch.input_ids.shape[0], device=batch.input_ids.device)
        with soft_injection(scorer, fitted(self.emb, self.name), self.alpha, rows, batch.query_cols):
            return scorer.label_scores(batch)

    @classmethod
    def state_spec(cls, layout: ModelLayout, n_classes: int) -> dict[str, TensorSpec]:
        n, h = layout.n_layers, layout.n_heads
        return {
            "emb": TensorSpec((n, h, layout.head_dim)),
            "logits": TensorSpec((n, h)),
            "chosen": TensorSpec((), "int"),  # -1: no checkpoint kept
            "loss_curve": TensorSpec((None,)),
            "val_steps": TensorSpec((None,), "int"),
            "val_loss": TensorSpec((None,)),
            "val_macro_f1": TensorSpec((None,)),
        }

    def state(self) -> dict[str, torch.Tensor]:
        cps = self.checkpoints
        return {
            "emb": fitted(self.emb, self.name).contiguous(),
            "logits": fitted(self.logits, self.name).contiguous(),
            "chosen": torch.tensor(-1 if self.chosen is None else self.chosen),
            "loss_curve": torch.tensor(self.loss_curve, dtype=torch.float64),
            "val_steps": torch.tensor([c["step"] for c in cps], dtype=torch.long),
            "val_loss": torch.tensor([c["loss"] for c in cps], dtype=torch.float64),
            "val_macro_f1": torch.tensor([c["macro_f1"] for c in cps], dtype=torch.float64),
        }

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.emb = tensors["emb"].float()
        self.logits = tensors["logits"].float()
        chosen = int(tensors["chosen"])
        self.chosen = None if chosen < 0 else chosen
        self.loss_curve = tensors["loss_curve"].tolist()
        self.checkpoints = [
            {"step": int(s), "loss": float(l), "macro_f1": float(f)}
            for s, l, f in zip(tensors["val_steps"], tensors["val_loss"], tensors["val_macro_f1"])
        ]
