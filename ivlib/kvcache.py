"""Reading, overwriting and preallocating a model's key/value cache as plain tensors.

Deep-Thinking tunes the cache itself, so it needs the per-layer keys and values of whatever cache
class the model builds, and a way to put tuned tensors back. Only layers that keep every position
can be tuned: transformers' `DynamicLayer`, and its `DynamicSlidingWindowLayer` while no entry
has left the window (DT checks its prompts fit first: `sliding_window`). A quantised layer, or a
window that has dropped entries, would silently change the method, so those are refused.
The per-layer and per-head searches of TV and FV run many one-token forwards over one prefix;
`repeated_with_room` gives them a fixed-length cache those forwards write into in place.
Under --demos fixed every batch of queries runs after one encoded prefix; `expand_rows` gives
each batch that prefix without copying it where the cache allows.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer, StaticLayer

from .errors import UsageError

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each [B, n_kv_heads, T, head_dim]


def _layers(cache: Any, model_name: str) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise UsageError(
            f"model '{model_name}' returns a {type(cache).__name__} cache without per-layer entries; "
            "accepted: models with a standard transformers DynamicCache"
        )
    for layer in layers:
        if type(layer) not in TUNABLE or not hasattr(layer, "keys"):
            raise UsageError(
                f"model '{model_name}' uses a {type(layer).__name__} cache layer, which cannot be tuned; "
                "accepted: models whose cache layers are DynamicLayer or DynamicSlidingWindowLayer"
            )
    return list(layers)


def _check_nothing_dropped(layers: list[Any], model_name: str) -> None:
    for layer in layers:
        if isinstance(layer, DynamicSlidingWindowLayer) and layer.keys is not None:
            held, seen = layer.keys.shape[-2], int(layer.cumulative_length)
            if held < seen:  # the window dropped the oldest entries: they can no longer be read or tuned
                raise UsageError(
                    f"model '{model_name}': {seen} positions exceed its {layer.sliding_window}-token sliding "
                    "window, which keeps only the last ones; accepted: prompts that fit the window"
                )


TUNABLE = (DynamicLayer, DynamicSlidingWindowLayer)  # exact types: subclasses may drop or re-encode entries


def sliding_window(config: Any) -> int | None:
    """The smallest sliding window among the cache layers a model builds from `config` (None: none slides).

    Read the way transformers' DynamicCache reads it (`get_layer_types_and_kwargs`), so this is the
    window of the `DynamicSlidingWindowLayer`s the model's forward will fill."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    get_text = getattr(config, "get_text_config", None)
    if get_text is None:
        return None
    try:
        types, kwargs = get_layer_types_and_kwargs(get_text(decoder=True))
    except (AttributeError, TypeError, KeyError):
        return None
    windows = [kw.get("sliding_window") for t, kw in zip(types, kwargs) if t == "sliding_attention"]
    known = [int(w) for w in windows if w is not None]
    return min(known) if known else None


def read_kv(cache: Any, model_name: str = "model") -> KV:
    """The cache's tensors (not copies): callers must not modify them in place. Refused once a sliding
    window has dropped entries (what is left is not every position's)."""
    layers = _layers(cache, model_name)
    _check_nothing_dropped(layers, model_name)
    return [(layer.keys, layer.values) for layer in layers]


def write_kv(cache: Any, kv: KV, dtype: torch.dtype, model_name: str = "model") -> None:
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
        if isinstance(layer, DynamicSlidingWindowLayer):
            # its own count of positions seen (what the masks' offsets and lengths come from), not the
            # tensors' length: reset it, or every later forward would place its window too far on
            layer.cumulative_length = k.shape[-2]


class _SlotLayer(StaticLayer):
    """A fixed-length layer built around a prefix that is already known.

    `StaticLayer` zero-fills its buffers before the first write; here the prefix fills all but
    the free slots at once and every free slot is written by the forward that reads it, so the
    zero fill (a pass over the whole buffer) is skipped.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        super().__init__(max_cache_len=keys.shape[-2])
        self.keys, self.values = keys, values  # [B, kv_heads, length + free slots, head_dim]
        self.device = keys.device
        self.batch_size, self.num_heads = keys.shape[:2]
        self.k_head_dim, self.v_head_dim = keys.shape[-1], values.shape[-1]
        self.cumulative_length = torch.tensor(length, dtype=torch.long, device=keys.device)
        self.is_initialized = True


def _with_room(t: torch.Tensor, repeats: int, free: int) -> torch.Tensor:
    """[B, H, T, d] -> [B * repeats, H, T + free, d], row b * repeats + j = row b, one copy."""
    b, h, length, d = t.shape
    out = torch.empty(b, repeats, h, length + free, d, dtype=t.dtype, device=t.device)
    out[:, :, :, :length] = t[:, None]
    return out.view(b * repeats, h, length + free, d)


def repeated_with_room(cache: Any, repeats: int, free: int = 1) -> Cache | None:
    """A fixed-length copy of a growing cache, each row repeated, with `free` slots after the prefix.

    Forwards over it write their tokens into the free slots in place; `crop(-n)` rewinds so the
    next forward overwrites them. A growing cache (`DynamicLayer`) appends by `torch.cat`, which
    copies the whole prefix on every forward. None when the cache is not all full-attention
    `DynamicLayer`s (sliding windows, quantised): callers keep the growing copy for those.
    """
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer or not layer.is_initialized for layer in layers):
        return None  # (an uninitialised layer: one that shares another layer's keys and values)
    length = layers[0].keys.shape[-2]
    return Cache(
        layers=[
            _SlotLayer(_with_room(layer.keys, repeats, free), _with_room(layer.values, repeats, free), length)
            for layer in layers
        ]
    )


def rewindable(cache: Any) -> Any:
    """`cache`, its sliding-window layers keeping what a forward would drop until `crop` takes the
    forward back: a last-token search writes one token into a growing copy and `crop(-1)` rewinds it,
    which transformers refuses once a prompt is longer than the window (Gemma 3's 512 on Financial
    Phrasebank's 4-shot prompts) unless the layer records its past."""
    for layer in getattr(cache, "layers", None) or []:
        if isinstance(layer, DynamicSlidingWindowLayer):
            layer.activate_past_recording()
    return cache


class _PrefixLayer(DynamicLayer):
    """A shared prefix's entries seen by every row (a stride-0 view), for one forward that keeps nothing.

    `update` returns prefix + the forward's keys and values for attention and stores nothing: a scoring
    forward never reads its cache again, so each layer's concatenation is freed as soon as that layer is
    done, where a `DynamicLayer` would keep every layer's (rows x (prefix + query)) copy to the end.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.keys, self.values = keys, values  # [rows, kv_heads, P, head_dim], expanded views
        self.device, self.is_initialized = keys.device, True
        self._prefix = (keys, values)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        keys, values = self._prefix
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)


def expand_rows(cache: Any, rows: int, keep: bool = True) -> Cache:
    """A one-row prefix cache as a `rows`-row cache for a batch of queries, the prefix left unchanged.

    Full-attention `DynamicLayer`s get stride-0 views (no copy: the forward's own `torch.cat` with the
    queries' keys is the one materialisation attention needs anyway, and it never writes into the
    prefix); with `keep=False` (a forward whose cache is not read afterwards) not even that is kept
    past its layer. Any other layer (sliding window, quantised, static) is deep-copied and repeated,
    which costs a copy per batch but keeps whatever that layer does to its entries.
    """
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        out: Cache = copy.deepcopy(cache)
        if rows > 1:
            out.batch_repeat_interleave(rows)
        return out
    views: list[Any] = []
    for layer in layers:
        if not layer.is_initialized:  # a layer sharing another's entries stays as it is
            views.append(copy.copy(layer))
            continue
        keys, values = layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1)
        if keep:
            view = copy.copy(layer)
            view.keys, view.values = keys, values
            views.append(view)
        else:
            views.append(_PrefixLayer(keys, values))
    return Cache(layers=views)
