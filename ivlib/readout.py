"""The model's last hidden state at the answer position: what Hidden Calibration and the probe classify.

It is the input of the output head (the unembedding): the last block's output after the model's final
norm (and OPT's output projection), the vector the next-token logits are computed from, i.e. what
transformers returns as `hidden_states[-1]`. It is read with a pre-hook on the head rather than by
asking for every layer's hidden states, so it costs nothing beyond the scorer's own forward and works
wherever that forward runs: whole prompts, or query parts over a shared prefix (`Scorer.over`). The
scorer keeps only the last column's logits, so the head sees that column alone; otherwise it sees
every column and the last one (the query's separator, the batch being left-padded) is kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .models import LoadedModel
from .prompts import EncodedPrompt, PromptBatch
from .scoring import Scorer


def output_head(lm: LoadedModel) -> nn.Module:
    """The module that turns the last hidden state into logits (`lm_head`, `embed_out`...)."""
    head = lm.model.get_output_embeddings()
    if not isinstance(head, nn.Module):
        raise RuntimeError(f"{type(lm.model).__name__} has no output head to read the last hidden state at")
    return head


@contextmanager
def reading_last_hidden(lm: LoadedModel) -> Iterator[list[torch.Tensor]]:
    """Inside the block, each forward appends its last column's final hidden state ([B, D] float32)."""
    seen: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen.append(args[0][:, -1].float())  # [B, T or 1, D] -> [B, D]

    handle = output_head(lm).register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def last_hidden(scorer: Scorer, batch: PromptBatch) -> torch.Tensor:
    """[B, D] float32: each row's final hidden state at its answer position (the query's separator)."""
    with reading_last_hidden(scorer.lm) as seen:
        scorer.forward(batch)
    if len(seen) != 1:
        raise RuntimeError(f"the output head ran {len(seen)} times in one forward; expected once")
    return seen[0]


def last_hiddens(scorer: Scorer, prompts: list[EncodedPrompt], desc: str) -> torch.Tensor:
    """[N, D] float32: `last_hidden` of every prompt, batched (and split over processes) by the runner."""
    return scorer.runner.map(prompts, lambda batch: last_hidden(scorer, batch), desc)
