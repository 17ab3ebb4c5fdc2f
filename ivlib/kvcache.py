"""Reading and overwriting a model's key/value cache as plain tensors.

Deep-Thinking tunes the cache itself, so it needs the per-layer keys and values of whatever cache
class the model builds, and a way to put tuned tensors back. Only caches that keep every
position (transformers' `DynamicLayer`) can be tuned: a sliding-window or quantised layer drops
or re-encodes entries, which would silently change the method, so those are refused.
"""
from __future__ import annotations

import torch

from .errors import UsageError

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each [B, n_kv_heads, T, head_dim]


def _layers(cache, model_name: str) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise UsageError(f"model '{model_name}' returns a {type(cache).__name__} cache without per-layer entries; "
                         "accepted: models with a standard transformers DynamicCache")
    for layer in layers:
        if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys") or type(layer).__name__ not in (
                "DynamicLayer",):
            raise UsageError(f"model '{model_name}' uses a {type(layer).__name__} cache layer, which cannot be tuned; "
                             "accepted: models whose cache layers are DynamicLayer (full attention)")
    return layers


def read_kv(cache, model_name: str = "model") -> KV:
    """The cache's tensors (not copies): callers must not modify them in place."""
    return [(layer.keys, layer.values) for layer in _layers(cache, model_name)]


def write_kv(cache, kv: KV, dtype: torch.dtype, model_name: str = "model") -> None:
    """Make `cache` hold `kv` (cast to the model's dtype), replacing whatever it held.

    The cache's layers append with `torch.cat`, so the tensors given here are never modified
    by a later forward that uses the cache.
    """
    layers = _layers(cache, model_name)
    if len(layers) != len(kv):
        raise ValueError(f"cache has {len(layers)} layers, state has {len(kv)}")
    for layer, (k, v) in zip(layers, kv):
        layer.keys = k.to(dtype)
        layer.values = v.to(dtype)
