"""What a loaded model is, in a few hundred bytes: its architecture and a sample of its weights.

A state file (IV's vectors, TV's layer, ...) is only meaningful for the model it was fitted on.
The registry name alone does not say which model that was (two checkpoints can be registered
under one name, on two machines or one after the other), and the tensor shapes only catch another
width or depth. The fingerprint adds the architecture (model type, layers, width, heads, vocabulary)
and a fixed sample of weights from the embedding and the first and last blocks, so another
checkpoint of the same architecture (a fine-tune, another seed) differs too.

The sample is read at fixed, evenly spaced positions (a few values per tensor: cheap on any
device, no copy of a tensor). The same weights loaded in another precision (fitted on a GPU in
bfloat16, evaluated on a CPU in float32) round differently, so values are compared within the
rounding of the coarser of the two dtypes; in one dtype they must be equal.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .models import LoadedModel

SAMPLES = 16  # values read from each sampled tensor
# relative rounding of each dtype's conversion from float32 (half a unit in the last place, doubled
# for safety); float32 itself: exact
ROUNDING = {"float32": 0.0, "float64": 0.0, "bfloat16": 2.0**-8, "float16": 2.0**-11}
HALF_TINY = 6e-8  # float16's smallest step near zero: values below it flush to zero there
ARCHITECTURE_KEYS = ("model_type", "n_layers", "d_model", "n_heads", "n_kv_heads", "vocab_size")


def _first_matrix(module: torch.nn.Module) -> torch.Tensor | None:
    """The module's first 2-D parameter, in registration order (e.g. a block's first projection)."""
    return next((p for p in module.parameters() if p.dim() == 2), None)


def _sample(weight: torch.Tensor | None) -> dict[str, Any] | None:
    """SAMPLES values at evenly spaced flat positions of `weight`, with its dtype (None: no weights
    to read, e.g. offloaded to the meta device)."""
    if weight is None or weight.device.type == "meta" or weight.numel() == 0:
        return None
    flat = torch.linspace(0, weight.numel() - 1, SAMPLES, dtype=torch.float64).round().long()
    index = torch.unravel_index(flat, tuple(weight.shape))
    with torch.no_grad():
        values = weight.detach()[tuple(i.to(weight.device) for i in index)].float().cpu().tolist()
    return {"dtype": str(weight.dtype).removeprefix("torch."), "values": values}


def model_fingerprint(lm: LoadedModel) -> dict[str, Any]:
    """{architecture: {...}, weights: {embedding, first_block, last_block}} of a loaded model."""
    layout = lm.layout
    config = lm.model.config
    embedding = lm.model.get_input_embeddings().weight
    architecture = {
        "model_type": str(getattr(config, "model_type", "") or type(lm.model).__name__),
        "n_layers": layout.n_layers,
        "d_model": layout.d_model,
        "n_heads": layout.n_heads,
        "n_kv_heads": layout.n_kv_heads,
        "vocab_size": int(embedding.shape[0]),
    }
    weights = {
        "embedding": _sample(embedding),
        "first_block": _sample(_first_matrix(layout.blocks[0])),
        "last_block": _sample(_first_matrix(layout.blocks[-1])),
    }
    return {"architecture": architecture, "weights": weights}


def well_formed(fingerprint: Any) -> bool:
    """Whether a fingerprint read from a file has the structure `model_fingerprint` writes."""
    if not isinstance(fingerprint, dict) or not isinstance(fingerprint.get("architecture"), dict):
        return False
    weights = fingerprint.get("weights")
    if not isinstance(weights, dict):
        return False
    for sample in weights.values():
        if sample is None:
            continue
        if not isinstance(sample, dict) or sample.get("dtype") not in ROUNDING:
            return False
        values = sample.get("values")
        if not isinstance(values, list) or not all(_number(v) for v in values):
            return False
    return True


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _close(a: float, b: float, tolerance: float, near_zero: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= tolerance * max(abs(a), abs(b)) + near_zero


def _same_weights(saved: dict[str, Any] | None, current: dict[str, Any] | None) -> bool:
    if saved is None or current is None:  # a tensor one side could not read: nothing to compare
        return True
    if len(saved["values"]) != len(current["values"]):
        return False
    dtypes = {saved["dtype"], current["dtype"]}
    same = len(dtypes) == 1  # one dtype: the same weights read the same values, exactly
    tolerance = 0.0 if same else max(ROUNDING[d] for d in dtypes)
    near_zero = HALF_TINY if "float16" in dtypes and not same else 0.0
    return all(_close(a, b, tolerance, near_zero) for a, b in zip(saved["values"], current["values"]))


def same_model(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether two fingerprints name the same model: equal architecture, weights equal up to rounding."""
    arch_saved, arch_current = saved["architecture"], current["architecture"]
    if any(arch_saved.get(k) != arch_current.get(k) for k in ARCHITECTURE_KEYS):
        return False
    names = set(saved["weights"]) & set(current["weights"])
    return all(_same_weights(saved["weights"][n], current["weights"][n]) for n in names)


def describe(fingerprint: dict[str, Any]) -> str:
    """The fingerprint in words, for a message: architecture, then a short digest of the sampled weights."""
    arch = fingerprint["architecture"]
    digest = hashlib.sha256(json.dumps(fingerprint["weights"], sort_keys=True).encode()).hexdigest()[:10]
    return (
        f"{arch.get('model_type')}, {arch.get('n_layers')} layers, d_model {arch.get('d_model')}, "
        f"{arch.get('n_heads')} heads, vocabulary {arch.get('vocab_size')}, weights {digest}"
    )
