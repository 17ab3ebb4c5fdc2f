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
        save_file(
            {k: v.contiguous().cpu() for k, v in tensors.items()},
            str(tmp),
            metadata={k: json.dumps(v) for k, v in meta.items()},
        )
        os.replace(tmp, target)  # complete file or none
    finally:
        tmp.unlink(missing_ok=True)  # an interrupted save leaves nothing behind


def check_save_path(path: str) -> None:
    """Fail before any compute if the fitted state could not be saved at the end of the fit."""
    target = Path(path)
    if target.is_dir():
        raise UsageError(
            f"--save-vectors '{path}' is a directory; accepted: a file path, e.g. {target / 'iv.safetensors'}"
        )
    existing = next(p for p in (target.parent, *target.parent.parents, Path(".")) if p.exists())
    if not existing.is_dir():
        raise UsageError(
            f"--save-vectors '{path}': '{existing}' is a file, not a directory; accepted: a path under a directory"
        )
    if not os.access(existing, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise UsageError(f"--save-vectors '{path}' is not writable; accepted: a path in a writable directory")


def _open(path: str, tensors: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    if not Path(path).is_file():
        raise UsageError(f"--load-vectors '{path}' does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            loaded = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except Exception:
        raise UsageError(f"--load-vectors '{path}' is not a safetensors file written by ivlib") from None
    return loaded, meta


def read_meta(path: str) -> dict[str, Any]:
    """The file's provenance alone (no tensors): how, and for what, the state was fitted."""
    return _open(path, tensors=False)[1]


def load_state(path: str, expect: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, meta = _open(path, tensors=True)
    for key in MATCH_KEYS:
        if key in expect and meta.get(key) != expect[key]:
            raise UsageError(
                f"--load-vectors '{path}' was fitted with {key}={meta.get(key)!r}; this run has {expect[key]!r}"
            )
    return tensors, meta
