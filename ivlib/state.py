"""Saving and loading a fitted method (e.g. IV's vectors) as safetensors with provenance.

The file's metadata names the model, task, labels and fitting settings, so a load can refuse a
file fitted for another model or task instead of silently steering with the wrong vectors.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .errors import UsageError

MATCH_KEYS = ("method", "model", "task", "label_words", "n_layers", "d_model")


def save_state(path: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".partial")
    try:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={k: json.dumps(v) for k, v in meta.items()})
        os.replace(tmp, target)  # complete file or none
    finally:
        tmp.unlink(missing_ok=True)  # an interrupted save leaves nothing behind


def load_state(path: str, expect: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    if not Path(path).is_file():
        raise UsageError(f"--load-vectors '{path}' does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:
        raise UsageError(f"--load-vectors '{path}' is not a safetensors file written by ivlib") from None
    for key in MATCH_KEYS:
        if key in expect and meta.get(key) != expect[key]:
            raise UsageError(f"--load-vectors '{path}' was fitted with {key}={meta.get(key)!r}; this run has {expect[key]!r}")
    return tensors, meta
