"""The Python API's boundary: every public function's arguments checked by declaration, as the CLI's
flags are, so a wrong argument is a `UsageError` naming it and what is accepted, never a raw
TypeError, AttributeError or numpy error from deep inside, and never silently taken (a label of 1.7
as class 1, the string "ab" as the label words ['a', 'b'], a bare transformers model where a wrapped
one is needed).

`@checked(name=KIND, ...)` binds the call, passes each named argument through its kind's check (which
may also convert it: a `pathlib.Path` becomes a `str`) and calls the function with the checked
values. The run settings (`seed`, `n`, `batch_size`...) are the CLI's own `Setting`s, so the API and
the CLI accept and refuse exactly the same values.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import UsageError
from .settings import Setting

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Kind:
    """What one argument accepts: `check(value) -> value` (possibly converted; None is a value) or a
    ValueError to refuse it; `accepts` is what the message says."""

    accepts: str | Callable[[], str]  # what the message says (computed when it is said, if a function)
    check: Callable[[Any], Any]

    def says(self) -> str:
        return self.accepts() if callable(self.accepts) else self.accepts


def kind(
    accepts: str | Callable[[], str], test: Callable[[Any], bool], convert: Callable[[Any], Any] = lambda v: v
) -> Kind:
    """A kind that accepts what `test` passes (converted by `convert`)."""

    def check(value: Any) -> Any:
        if not test(value):
            raise ValueError("refused")
        return convert(value)

    return Kind(accepts, check)


def _is_str_seq(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _is_model(value: Any) -> bool:
    from .models import LoadedModel

    return isinstance(value, LoadedModel)


def _is_task(value: Any) -> bool:
    from .tasks import Task

    return isinstance(value, Task)


def _is_method(value: Any) -> bool:
    from .methods import METHODS, Method

    return isinstance(value, Method) or (isinstance(value, str) and value in METHODS)


def _methods() -> list[str]:
    from .methods import METHODS

    return list(METHODS)


def _is_path(value: Any) -> bool:
    return (
        isinstance(value, (str, os.PathLike)) and isinstance(os.fspath(value), str) and bool(os.fspath(value).strip())
    )


def _is_words(value: Any) -> bool:
    return _is_str_seq(value) and all(isinstance(w, str) and w.strip() for w in value)


def optional(kind: Kind) -> Kind:
    return Kind(lambda: kind.says() + ", or None", lambda v: v if v is None else kind.check(v))


MODEL = kind("a model wrapped by ivlib.wrap(model, tokenizer)", _is_model)
TASK = kind("a task from ivlib.load_task or ivlib.task_from_lists", _is_task)
METHOD = kind(lambda: f"a registered method's name ({', '.join(_methods())}) or a Method", _is_method)
PATH = kind("a non-empty path (str or pathlib.Path)", _is_path, os.fspath)
WORDS = kind("a list of non-empty strings (not one string)", _is_words, list)
FLAG = kind("True or False", lambda v: isinstance(v, bool))
NAME = kind("a non-empty string", lambda v: isinstance(v, str) and bool(v.strip()))
SPLIT = kind("a split name: train, validation or test", lambda v: v in ("train", "validation", "test"))


def setting(s: Setting) -> Kind:
    """A run setting as the CLI checks it (range, type, finiteness): the same declaration; text is a
    flag's or a YAML file's form, so a Python caller's number given as a string is refused."""

    def check(value: Any) -> Any:
        if isinstance(value, str) and s.type is not str and not (s.parse and value in ("auto",)):
            raise ValueError(s.accepted())
        return s.check(value)

    return Kind(s.accepted(), check)


def checked(**kinds: Kind) -> Callable[[F], F]:
    """Check the named arguments of every call by their kinds before the function runs."""

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError as exc:
                raise UsageError(f"ivlib.{fn.__name__}: {exc}") from None
            for name, kind in kinds.items():
                if name in bound.arguments:
                    bound.arguments[name] = _one(fn.__name__, name, kind, bound.arguments[name])
            return fn(*bound.args, **bound.kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def _one(function: str, name: str, kind: Kind, value: Any) -> Any:
    """The checked value, or one line naming the function, the argument, its value and what is accepted
    (a Setting's own message names the flag; here the argument is named instead)."""
    try:
        return kind.check(value)
    except (UsageError, TypeError, ValueError):
        raise UsageError(f"ivlib.{function}: {name}={_short(value)} is not accepted; accepted: {kind.says()}") from None


def _short(value: Any) -> str:
    text = repr(value) if not hasattr(value, "named_modules") else f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."
