"""The methods, registered by `@register` as their modules are imported (one file each).

The import order is the registry's order: the order `--help`, messages and `iv.py methods` list.
"""

from . import icl, iv, tv, tv_hendel, fv, dt, sv, i2cl, site, icv, hc, probe  # noqa: F401, I001  (importing registers them, in this order)
from .base import METHODS, Method, get_method, register

__all__ = ["METHODS", "Method", "get_method", "register"]
