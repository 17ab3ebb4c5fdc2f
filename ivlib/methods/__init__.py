"""Registry of methods by their `--method` name."""

from .base import Method
from .dt import DeepThinking
from .fv import FunctionVectors
from .icl import ICL, ZeroShot
from .iv import IterativeVectors
from .tv import TaskVectors

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (ZeroShot, ICL, IterativeVectors, TaskVectors, FunctionVectors, DeepThinking)
}

__all__ = ["METHODS", "Method"]
