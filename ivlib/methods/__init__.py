"""Registry of methods by their `--method` name."""
from .base import Method
from .icl import ICL, ZeroShot
from .iv import IterativeVectors

METHODS: dict[str, type[Method]] = {m.name: m for m in (ZeroShot, ICL, IterativeVectors)}

__all__ = ["METHODS", "Method"]
