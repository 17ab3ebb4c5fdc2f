"""What a run consumed, for every record: labeled examples and model compute.

A comparison of in-context methods is read against their budgets: 1-shot ICL conditions on a few
labeled examples per query, SITE and the probe fit on hundreds, IV's extraction reads hundreds more.
Without each method's budget on its record nobody can tell "a better method" from "more data". Two
kinds are counted:

- labeled examples: the distinct training examples whose labels the fit used, the distinct
  validation examples a selection used (each method says which, `Method.labeled_examples`), and the
  demonstrations each evaluation query is shown;
- compute: the token positions the model ran forward (real tokens: padding is not counted, so the
  count does not depend on the batch size), for the fit and per evaluation query. A backward pass
  (SITE's and I2CL's fits) is not counted; their records say they ran one per step.

Under data parallel each process counts its own forwards; the loops split over processes
(`BatchRunner.shared`) add the other processes' counts of their shares, so every process ends with
what one process would have run alone, and the record is the same with one process or several.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .episodes import Episode, Example

_active: list[TokenCount] = []  # the counters of the blocks currently open, innermost last


class TokenCount:
    """Token positions run forward while its block was open (and, under data parallel, the other
    processes' split work, added by `BatchRunner.shared`)."""

    def __init__(self) -> None:
        self.tokens = 0

    def hook(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        mask = kwargs.get("attention_mask")
        width = ids.shape[1]
        self.tokens += (
            int(mask[:, -width:].sum()) if isinstance(mask, torch.Tensor) and mask.dim() == 2 else ids.numel()
        )


@contextmanager
def counting(model: nn.Module) -> Iterator[TokenCount]:
    """Count the token positions `model` runs forward inside the block (nested blocks count alike)."""
    count = TokenCount()
    handle = model.register_forward_pre_hook(count.hook, with_kwargs=True)
    _active.append(count)
    try:
        yield count
    finally:
        _active.remove(count)
        handle.remove()


def counted() -> int:
    """Tokens counted so far by the innermost open block (0 outside any)."""
    return _active[-1].tokens if _active else 0


def add_elsewhere(tokens: int) -> None:
    """Tokens another process ran for a loop split over processes: every open block counts them."""
    for count in _active:
        count.tokens += tokens


def distinct(examples: Iterable[Example]) -> int:
    """How many different examples (a row counted once however many episodes show it)."""
    return len(set(examples))


def demonstrations(episodes: Iterable[Episode]) -> list[Example]:
    return [d for e in episodes for d in e.demos]


def queries(episodes: Iterable[Episode]) -> list[Example]:
    return [e.query for e in episodes]


def per_query(episodes: list[Episode]) -> int:
    """Labeled examples shown with each evaluation query (its demonstrations; the most, if they vary)."""
    return max((len(e.demos) for e in episodes), default=0)
