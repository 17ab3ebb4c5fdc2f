"""Where a model keeps what the methods touch: decoder blocks, attention output projections, heads.

This is the only module with model-specific knowledge. It is discovered from the model (module
tree and config), never from the checkpoint's name, so a new checkpoint of a known family needs
no edit and an unknown family needs at most two module names in YAML.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from .errors import UsageError

ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
OUT_PROJ_NAMES = ("o_proj", "out_proj", "c_proj", "dense", "wo", "o")
MLP_NAMES = ("mlp", "feed_forward", "ffn", "mlp_block")
# blocks with no MLP module of their own (OPT): the MLP's last projection sits in the block itself
MLP_OUT_PROJ_NAMES = ("fc2", "fc_out", "dense_4h_to_h")


@dataclass
class ModelLayout:
    blocks: list[nn.Module]  # decoder blocks, in order
    attn_out: list[nn.Module]  # each block's attention output projection
    blocks_path: str  # e.g. "model.layers", for messages and records
    attn_out_path: str  # relative to a block, e.g. "self_attn.o_proj"
    n_heads: int
    n_kv_heads: int
    d_model: int
    mlp_out_override: str | None = None  # the YAML layout's `mlp_out`, if it names one
    _mlp_out: tuple[str, list[nn.Module]] | None = field(default=None, repr=False)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def head_dim(self) -> int | None:
        """Width of one head at the attention output projection's input (not always d_model / n_heads:
        Gemma's heads are wider), read from the projection itself; None when it names no width."""
        if not self.attn_out:
            return None
        proj = self.attn_out[0]
        features = getattr(proj, "in_features", None)  # nn.Linear
        weight = getattr(proj, "weight", None)
        if features is None and type(proj).__name__ == "Conv1D" and isinstance(weight, torch.Tensor):
            features = weight.shape[0]  # GPT-2's Conv1D: weight is [in, out]
        return features // self.n_heads if isinstance(features, int) else None

    @property
    def mlp_out(self) -> list[nn.Module]:
        """Each block's MLP (the module whose output joins the residual stream after the MLP), found
        on first use: only some methods need it (I2CL), and a model whose MLP cannot be found still
        runs the others. Its output is [B, T, D], except OPT's fc2, which sees the block's flattened
        [B * T, D] (a reader of positions reshapes it)."""
        return self._mlp()[1]

    @property
    def mlp_out_path(self) -> str:
        """Relative to a block, e.g. "mlp" (OPT: "fc2")."""
        return self._mlp()[0]

    def _mlp(self) -> tuple[str, list[nn.Module]]:
        if self._mlp_out is None:
            try:
                path = self.mlp_out_override or _find_mlp_out(self.blocks[0], self.d_model)
                self._mlp_out = (path, [_get(b, path) for b in self.blocks])
            except (LookupError, AttributeError) as exc:
                raise UsageError(
                    f"cannot find the MLP of {type(self.blocks[0]).__name__} ({exc}); name it in the model's "
                    "config entry, e.g. layout: {mlp_out: mlp}"
                ) from None
        return self._mlp_out

    def describe(self) -> dict[str, Any]:
        return {
            "blocks": self.blocks_path,
            "attn_out": self.attn_out_path,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "d_model": self.d_model,
        }


def _get(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        if not hasattr(module, part):
            raise AttributeError(path)
        module = getattr(module, part)
    return module


def _find_blocks(model: nn.Module, n_layers: int | None) -> str:
    """The ModuleList of decoder blocks: the longest list of same-class modules (matching the config's count)."""
    best: tuple[int, str] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) != 1:
                continue
            if n_layers is not None and len(module) != n_layers:
                continue
            if best is None or len(module) > best[0]:
                best = (len(module), name)
    if best is None:
        raise LookupError("no ModuleList of decoder blocks")
    return best[1]


def _linear_out(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    weight = getattr(module, "weight", None)  # GPT-2's Conv1D stores [in, out]
    if type(module).__name__ == "Conv1D" and weight is not None:
        return int(weight.shape[1])
    return None


def _find_attn_out(block: nn.Module, d_model: int | None) -> str:
    attn_name = next((n for n in ATTN_NAMES if hasattr(block, n)), None)
    if attn_name is None:
        attn_name = next((n for n, m in block.named_children() if "attention" in type(m).__name__.lower()), None)
    if attn_name is None:
        raise LookupError("no attention module in the block")
    attn = getattr(block, attn_name)
    for name in OUT_PROJ_NAMES:
        child = getattr(attn, name, None)
        if child is not None and _linear_out(child) == d_model:
            return f"{attn_name}.{name}"
    raise LookupError(f"no output projection in '{attn_name}'")


def _find_mlp_out(block: nn.Module, d_model: int | None) -> str:
    """The block's MLP module by name or class name, else its MLP output projection (OPT's fc2)."""
    for name in MLP_NAMES:
        if isinstance(getattr(block, name, None), nn.Module):
            return name
    for name, child in block.named_children():
        kind = type(child).__name__.lower()
        if "mlp" in kind or "feedforward" in kind:
            return name
    for name in MLP_OUT_PROJ_NAMES:
        proj = getattr(block, name, None)
        if isinstance(proj, nn.Module) and _linear_out(proj) == d_model:
            return name
    raise LookupError("no MLP module in the block")


def _config_int(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def discover_layout(model: nn.Module, override: dict[str, str] | None = None) -> ModelLayout:
    """Find the layout; `override` ({blocks, attn_out, mlp_out}) names modules for unknown families."""
    model_config: Any = model.config  # a transformers PretrainedConfig
    config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    n_layers = _config_int(config, "num_hidden_layers", "n_layer", "num_layers")
    d_model = _config_int(config, "hidden_size", "n_embd", "d_model")
    n_heads = _config_int(config, "num_attention_heads", "n_head", "num_heads")
    n_kv = _config_int(config, "num_key_value_heads", "n_head_kv", "num_kv_heads") or n_heads
    override = override or {}
    unknown = sorted(set(override) - {"blocks", "attn_out", "mlp_out"})
    if unknown:
        raise UsageError(f"layout key '{unknown[0]}' is unknown; accepted: blocks, attn_out, mlp_out")
    hint = "name them in the model's config entry, e.g. layout: {blocks: model.layers, attn_out: self_attn.o_proj}"
    try:
        blocks_path = override.get("blocks") or _find_blocks(model, n_layers)
        blocks = list(cast(nn.ModuleList, _get(model, blocks_path)))
        attn_out_path = override.get("attn_out") or _find_attn_out(blocks[0], d_model)
        attn_out = [_get(b, attn_out_path) for b in blocks]
    except (LookupError, AttributeError) as exc:
        raise UsageError(f"cannot find the layout of {type(model).__name__} ({exc}); {hint}") from None
    if n_heads is None or d_model is None:
        raise UsageError(f"{type(model).__name__}: the config gives no head count or hidden size")
    assert n_kv is not None  # n_heads when the config names no key/value heads
    return ModelLayout(
        blocks, attn_out, blocks_path, attn_out_path, n_heads, n_kv, d_model, override.get("mlp_out") or None
    )
