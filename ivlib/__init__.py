"""ivlib: Iterative Vectors and the in-context-learning baselines it is compared with.

The Python API (`ivlib.api`, README "Python API"): `wrap` a model and tokenizer, get a task
(`load_task`, `task_from_lists`), `fit` a method, `evaluate` it, `save`/`load` its state and
`steer` the model's own forward or `generate` with it.

The names below are imported on first use (PEP 562), not with the package: `import ivlib` alone
loads no torch, so the command's entry point (`ivlib.entry`) has its interrupt handlers in place
before the seconds of importing torch and transformers begin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

from .errors import UsageError  # noqa: E402  (light: argparse only)

if TYPE_CHECKING:
    from .api import (
        Evaluation,
        batch,
        encode,
        encoder,
        evaluate,
        fit,
        load,
        load_task,
        protocol_for,
        sample_episodes,
        save,
        steer,
        task_from_lists,
        tiny_model,
        wrap,
    )
    from .methods import METHODS, Method, get_method
    from .protocol import Protocol
    from .templates import Template

_FROM_API = (
    "Evaluation",
    "batch",
    "encode",
    "encoder",
    "evaluate",
    "fit",
    "load",
    "load_task",
    "protocol_for",
    "sample_episodes",
    "save",
    "steer",
    "task_from_lists",
    "tiny_model",
    "wrap",
)
_FROM_METHODS = ("METHODS", "Method", "get_method")
_CLASSES = {"Protocol": "protocol", "Template": "templates"}  # the value types a protocol is made of


def __getattr__(name: str) -> Any:
    if name in _FROM_API:
        from . import api

        return getattr(api, name)
    if name in _FROM_METHODS:
        from . import methods

        return getattr(methods, name)
    if name in _CLASSES:
        import importlib

        return getattr(importlib.import_module(f".{_CLASSES[name]}", __name__), name)
    raise AttributeError(f"module 'ivlib' has no attribute {name!r}")


__all__ = [
    "METHODS",
    "Evaluation",
    "Method",
    "Protocol",
    "Template",
    "UsageError",
    "__version__",
    "batch",
    "encode",
    "encoder",
    "evaluate",
    "fit",
    "get_method",
    "load",
    "load_task",
    "protocol_for",
    "sample_episodes",
    "save",
    "steer",
    "task_from_lists",
    "tiny_model",
    "wrap",
]
