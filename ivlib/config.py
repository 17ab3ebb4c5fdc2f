"""The YAML registries of models and tasks: `ivlib/base.yaml` (shipped inside the package), with
the user's files (`-c`, repeatable) merged over it in order.

A config file has two mappings, `models:` and `tasks:`. An entry in the user's file replaces the
base entry of the same name whole (no deep merge), so what a user writes is what runs.
Relative file paths in an entry are resolved against the directory of the file that holds it,
so a config can sit beside its data and still be run from anywhere; path values may name
environment variables (`${IVLIB_DATA:-../shared/data}/train.parquet`), so one config serves
machines whose data sits elsewhere.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import files
from .errors import UsageError
from .schema import MODEL_KEYS, TASK_KEYS, check_entry
from .yamlread import read_yaml

__all__ = ["MODEL_KEYS", "TASK_KEYS", "Config", "load_config", "lookup"]

PACKAGE_DIR = Path(__file__).resolve().parent
# The checkout holding the package, where the record's git commit is looked up; in an installed
# (non-editable) copy it is site-packages' parent, usually in no repository: no commit then.
REPO_DIR = PACKAGE_DIR.parent
BASE_CONFIG = PACKAGE_DIR / "base.yaml"  # package data: the base registry travels with the code

_PATH_KEYS = ("path", "tokenizer", "data_files")


@dataclass
class Config:
    """Merged registries; `sources` remembers which file each entry came from (for messages)."""

    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)


CONFIG_ACCEPTED = "a UTF-8 YAML file (-c DIR/name.yaml)"


def _read_yaml(path: Path) -> dict[str, Any]:
    data = read_yaml("config file", path, files.MAX_CONFIG_BYTES, CONFIG_ACCEPTED)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file '{path}' must be a mapping with 'models:' and/or 'tasks:'")
    unknown = sorted(set(data) - {"models", "tasks"})
    if unknown:
        raise UsageError(f"config '{path}': unknown top-level key '{unknown[0]}'; accepted: models, tasks")
    return data


# $NAME, ${NAME} or ${NAME:-default} in a path value (e.g. ${IVLIB_DATA:-../shared/data}/x.parquet)
_VARIABLE = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)
ENV_KEY = "_env"  # not a user key: the variables a resolved entry's paths used, and their values (for messages)


def expand_variables(value: str, where: str, used: dict[str, str]) -> str:
    """Environment variables in a path value. A variable's value that is a relative path is taken
    from the current directory (where it was set); a `:-default` stays relative to the config file.
    A variable that is unset and has no default is an error naming it."""

    def substitute(match: re.Match[str]) -> str:
        name = match.group("braced") or match.group("bare")
        value = os.environ.get(name)
        if value:
            expanded = str(Path(value).expanduser().absolute())
            used[name] = expanded
            return expanded
        default = match.group("default")
        if default is None:
            raise UsageError(
                f"{where} uses ${name}, which is not set; accepted: set {name} (e.g. export {name}=/path/to/data) "
                f"or write ${{{name}:-default}} in the config"
            )
        used[name] = f"unset: the default '{default}' was used"
        return default

    return _VARIABLE.sub(substitute, value)


def _resolve_paths(entry: dict[str, Any], base_dir: Path, where: str = "entry") -> dict[str, Any]:
    """Expand environment variables, then make relative local paths absolute against the config file's directory.

    A value is treated as a local path only when it starts with '.' or '~', or exists relative to
    the config file; otherwise it stays as written (a hub id such as 'EleutherAI/gpt-j-6b').
    """
    used: dict[str, str] = {}

    def fix(value: str, key: str) -> str:
        value = expand_variables(value, f"{where}.{key}", used)
        if value.startswith("~"):
            return str(Path(value).expanduser())
        candidate = base_dir / value
        if value.startswith(".") or candidate.exists():
            return str(candidate.resolve())
        return value

    out = dict(entry)
    for key in _PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str):
            out[key] = fix(value, key)
        elif isinstance(value, dict):
            out[key] = {k: fix(v, key) if isinstance(v, str) else v for k, v in value.items()}
    if used:
        out[ENV_KEY] = used
    return out


def _check_entries(kind: str, entries: Any, path: Path) -> dict[str, dict[str, Any]]:
    if entries is None:
        return {}
    if not isinstance(entries, dict):
        raise UsageError(f"config '{path}': '{kind}' must be a mapping of name -> entry")
    checked: dict[str, dict[str, Any]] = {}
    for name, entry in entries.items():
        if isinstance(entry, str):
            entry = {"path": entry} if kind == "models" else {"dataset": entry}
        if not isinstance(entry, dict):
            raise UsageError(f"config '{path}': {kind}.{name} must be a string or a mapping")
        check_entry(kind, str(name), entry, str(path))
        checked[str(name)] = _resolve_paths(entry, path.parent, f"config '{path}': {kind}.{name}")
    return checked


def config_files(user_files: str | Sequence[str] | None) -> list[str]:
    """The -c files as a list: None, one path, or several (merged in that order)."""
    if user_files is None:
        return []
    if isinstance(user_files, (str, os.PathLike)):
        return [str(user_files)]
    return [str(f) for f in user_files]


def load_config(user_files: str | Sequence[str] | None) -> Config:
    """Base registry, then each user file over it in order (entries replaced whole: the last file
    naming an entry wins); `sources` lists every file read, base first."""
    cfg = Config()
    files = [BASE_CONFIG]
    for user_file in config_files(user_files):
        user_path = Path(user_file).expanduser().resolve()
        if user_path not in files:
            files.append(user_path)
    for path in files:
        data = _read_yaml(path)
        cfg.models.update(_check_entries("models", data.get("models"), path))
        cfg.tasks.update(_check_entries("tasks", data.get("tasks"), path))
        cfg.sources.append(str(path))
    return cfg


def lookup(registry: dict[str, dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    if name not in registry:
        known = ", ".join(sorted(registry)) or "(none)"
        raise UsageError(f"unknown {kind} '{name}'; accepted: a {kind} of the registry: {known}")
    return registry[name]
