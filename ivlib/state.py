"""Saving and loading a fitted method (e.g. IV's vectors) as safetensors with provenance.

The file's metadata names the model, task, labels and fitting settings, so a load can refuse a
file fitted for another model or task instead of silently steering with the wrong vectors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .errors import UsageError
from .fingerprint import describe, same_model, well_formed
from .settings import Setting

MATCH_KEYS = ("method", "model", "task", "label_words", "n_layers", "d_model")
TENSORS_KEY = "tensors"  # metadata: each tensor's shape and dtype as saved, so a file can be checked against itself
FINGERPRINT_KEY = "model_fingerprint"  # metadata: the model's architecture and sampled weights (ivlib.fingerprint)
FIT_KEY = "fit"  # metadata: the fitting settings and what the fit chose (a mapping)


@dataclass(frozen=True)
class TensorSpec:
    """What one tensor of a fitted state must be for a model layout and task (`Method.state_spec`):
    a file that passes steers with vectors of the right shape, kind and range, or is refused."""

    shape: tuple[int | None, ...]  # None: any size along that axis
    kind: Literal["float", "int"] = "float"  # float: any floating dtype, finite values; int: an integer dtype
    below: tuple[int, ...] | None = None  # int: values in [0, below[i]) along the last axis (one bound: every value)

    def describe(self) -> str:
        return "[" + ", ".join("any" if n is None else str(n) for n in self.shape) + "]"


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(n) for n in t.shape) + "]"


def check_tensors(path: str, tensors: dict[str, torch.Tensor], spec: dict[str, TensorSpec], method: str) -> None:
    """Every tensor the method needs, of the shape, dtype and range this model and task need; no other."""
    where = f"--load-vectors '{path}'"
    for name in spec:
        if name not in tensors:
            held = ", ".join(sorted(tensors)) or "none"
            raise UsageError(f"{where} lacks tensor '{name}' that {method} needs; it holds: {held}")
    for name, t in tensors.items():
        if name not in spec:
            raise UsageError(f"{where} has tensor '{name}' that {method} does not use; accepted: {', '.join(spec)}")
        want = spec[name]
        if len(t.shape) != len(want.shape) or any(w is not None and n != w for n, w in zip(t.shape, want.shape)):
            raise UsageError(
                f"{where}: tensor '{name}' has shape {_shape(t)}; this model and task need {want.describe()}"
            )
        if want.kind == "float" and not t.is_floating_point():
            raise UsageError(f"{where}: tensor '{name}' is {t.dtype}; accepted: a floating-point tensor")
        if want.kind == "float" and t.numel() and not bool(torch.isfinite(t.float()).all()):
            raise UsageError(f"{where}: tensor '{name}' holds non-finite values (inf or NaN); accepted: finite values")
        if want.kind == "int" and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
            raise UsageError(f"{where}: tensor '{name}' is {t.dtype}; accepted: an integer tensor")
        if want.kind == "int" and want.below is not None and t.numel():
            _check_range(where, name, t, want.below)


def _check_range(where: str, name: str, t: torch.Tensor, below: tuple[int, ...]) -> None:
    columns = t.reshape(-1, len(below)) if len(below) > 1 else t.reshape(-1, 1)
    for i, bound in enumerate(below):
        values = columns[:, i]
        bad = values[(values < 0) | (values >= bound)]
        if bad.numel():
            axis = f" (column {i})" if len(below) > 1 else ""
            raise UsageError(
                f"{where}: tensor '{name}'{axis} holds {int(bad[0])}, outside this model's range; accepted: 0..{bound - 1}"
            )


def check_own_metadata(path: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """A file whose tensors are not the ones its metadata says were saved was edited or assembled by
    hand: refused (files saved before this record existed carry none and pass)."""
    recorded = meta.get(TENSORS_KEY)
    if recorded is None:
        return
    actual = _tensor_table(tensors)
    if not isinstance(recorded, dict) or recorded != actual:
        names = sorted(set(actual) | set(recorded if isinstance(recorded, dict) else {}))
        first = next((n for n in names if not isinstance(recorded, dict) or recorded.get(n) != actual.get(n)), "?")
        raise UsageError(
            f"--load-vectors '{path}': its tensors disagree with its own metadata (tensor '{first}': saved as "
            f"{recorded.get(first) if isinstance(recorded, dict) else recorded}, holds {actual.get(first)}); "
            "accepted: a file written by --save-vectors, unedited"
        )


def _tensor_table(tensors: dict[str, torch.Tensor]) -> dict[str, list[Any]]:
    return {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in sorted(tensors.items())}


def save_state(path: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".partial")
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    meta = {**meta, TENSORS_KEY: _tensor_table(tensors)}
    try:
        save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
        os.replace(tmp, target)  # complete file or none
    except (OSError, SafetensorError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0][:200]
        raise UsageError(f"--save-vectors '{path}' could not be written ({reason}); no vectors file written") from None
    finally:
        tmp.unlink(missing_ok=True)  # an interrupted save leaves nothing behind


def check_save_path(path: str) -> None:
    """Fail before any compute if the fitted state could not be saved at the end of the fit."""
    from .results import check_free_space, check_output_path

    target = check_output_path("--save-vectors", path, "iv.safetensors")
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
    check_free_space("--save-vectors", path, existing)


def _open(path: str, tensors: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    if Path(path).exists() and not Path(path).is_file():
        raise UsageError(
            f"--load-vectors '{path}' is not a file (a directory or device); accepted: a .safetensors file"
        )
    if not Path(path).is_file():
        raise UsageError(f"--load-vectors '{path}' does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            loaded = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except Exception:
        raise UsageError(f"--load-vectors '{path}' is not a safetensors file written by ivlib") from None
    _check_meta_types(path, meta)
    return loaded, meta


def _check_meta_types(path: str, meta: dict[str, Any]) -> None:
    """The metadata every reader indexes into has the structure ivlib writes, or the file is refused
    here in one line (not with a TypeError wherever it is first read)."""
    fit = meta.get(FIT_KEY)
    if fit is not None and not isinstance(fit, dict):
        raise UsageError(
            f"--load-vectors '{path}': its '{FIT_KEY}' metadata is {type(fit).__name__} {_short(fit)}, not a mapping; "
            "accepted: a file written by --save-vectors, unedited"
        )
    if FINGERPRINT_KEY in meta and not well_formed(meta[FINGERPRINT_KEY]):
        raise UsageError(
            f"--load-vectors '{path}': its '{FINGERPRINT_KEY}' metadata is not what ivlib writes; "
            "accepted: a file written by --save-vectors, unedited"
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def checked_fit(path: str, meta: dict[str, Any], settings: Iterable[Setting]) -> dict[str, Any]:
    """The file's `fit` metadata with each of `settings` it holds passed through that setting's own check,
    as the same value given as a flag would be: a file is no way around a range check (a record with
    `ext_shot: -5` or `episodes: "lots"` is never written from one)."""
    fit = dict(meta.get(FIT_KEY) or {})  # a mapping: `_open` refused anything else
    for setting in settings:
        if setting.name not in fit:
            continue
        try:
            fit[setting.name] = setting.check(fit[setting.name])
        except UsageError as exc:
            raise UsageError(
                f"--load-vectors '{path}' holds fit setting {setting.name}={_short(fit[setting.name])}, "
                f"which a flag would not pass: {exc}"
            ) from None
    return fit


def read_meta(path: str) -> dict[str, Any]:
    """The file's provenance alone (no tensors): how, and for what, the state was fitted."""
    return _open(path, tensors=False)[1]


def load_state(path: str, expect: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The file's tensors and metadata, once it is known to be fitted for what `expect` describes (the
    run's identity: method, model name and fingerprint, task, labels, layout)."""
    tensors, meta = _open(path, tensors=True)
    check_own_metadata(path, tensors, meta)
    named, implied = MATCH_KEYS[:2], MATCH_KEYS[2:]  # (method, model), then what the model and task imply
    _check_keys(path, meta, expect, named)
    check_same_model(path, meta, expect)  # the model itself, before its layers and width say less
    _check_keys(path, meta, expect, implied)
    return tensors, meta


def _check_keys(path: str, meta: dict[str, Any], expect: dict[str, Any], keys: Iterable[str]) -> None:
    for key in keys:
        if key in expect and meta.get(key) != expect[key]:
            raise UsageError(
                f"--load-vectors '{path}' was fitted with {key}={meta.get(key)!r}; this run has {expect[key]!r}"
            )


def check_same_model(path: str, meta: dict[str, Any], expect: dict[str, Any]) -> None:
    """Refuse a file fitted on another model registered under this run's model name: its architecture or
    sampled weights differ. Files written before fingerprints existed carry none and keep the older
    checks (name, layers, width), as they always had."""
    saved, current = meta.get(FINGERPRINT_KEY), expect.get(FINGERPRINT_KEY)
    if saved is None or current is None or same_model(saved, current):
        return
    name = expect.get("model", meta.get("model"))
    raise UsageError(
        f"--load-vectors '{path}' was fitted on another model registered as '{name}' ({describe(saved)}); "
        f"this run's '{name}' is {describe(current)}; accepted: a file fitted on this model (refit it, or "
        "register the other model under its own name)"
    )
