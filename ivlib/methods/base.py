"""The interface every method implements: fit on training episodes, then score evaluation batches.

A new method is one file with one subclass, plus a line in `ivlib.methods.METHODS`; the CLI,
episode sampling, batching, metrics and records are shared.
"""

from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from ..episodes import Episode
from ..prompts import EncodedPrompt, PromptBatch, PromptEncoder
from ..scoring import Scorer


class Method(ABC):
    name: ClassVar[str]
    needs_fit: ClassVar[bool] = False  # whether `fit` uses training episodes at all
    needs_validation: ClassVar[bool] = False  # whether `fit` also selects something on validation episodes
    fixed_eval_shot: ClassVar[int | None] = None  # e.g. zero-shot evaluates with no demonstrations
    uses_strength: ClassVar[bool] = False  # evaluates at `strength`: several strengths can share one fit
    supports_multiple_choice: ClassVar[bool] = False  # whether it can score per-question answer options

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Method:
        return cls()

    def hyperparameters(self) -> dict[str, Any]:
        """What goes into the run record beside the shared protocol settings."""
        return {}

    def fit(
        self, scorer: Scorer, encoder: PromptEncoder, episodes: list[Episode], validation: list[Episode] | None = None
    ) -> None:
        """Learn from training episodes; `validation` is given to methods that select on it."""

    def fit_summary(self) -> dict[str, Any]:
        """What fitting chose (a layer, heads...), for the run record."""
        return {}

    def check_prompts(self, scorer: Scorer, prompts: list[EncodedPrompt]) -> None:
        """Refuse, before any compute, prompts this method cannot run (the context-length check every
        method shares is `Scorer.batch`); a method that needs more room than the prompt says so here."""

    @abstractmethod
    def predict(self, scorer: Scorer, batch: PromptBatch) -> torch.Tensor:
        """[B, n_classes] label scores for a batch of evaluation prompts."""

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors that make a fitted method reusable (saved with --save-vectors)."""
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError(f"{self.name} has no state to load")
