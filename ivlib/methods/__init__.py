"""The methods: every module of this package, and every installed package's entry point in the group
`ivlib.methods`, registers its `Method`s (`@register`) when it is imported here.

No list of methods is kept by hand: a new file in this folder is found (pkgutil), and a separate
package makes its methods known by declaring, in its own pyproject.toml,

    [project.entry-points."ivlib.methods"]
    my-shift = "my_package.my_shift"        # a module that registers them, or a Method class

The registry's order is the methods' declared `position`, never the order files are found in.
"""

from __future__ import annotations

import importlib
import pkgutil
import warnings
from importlib.metadata import entry_points

from .base import METHODS, Method, get_method, register

__all__ = ["ENTRY_POINTS", "METHODS", "Method", "PluginWarning", "discover", "get_method", "register"]

ENTRY_POINTS = "ivlib.methods"  # the entry-point group a separate package registers its methods under


class PluginWarning(UserWarning):
    """An entry point of the `ivlib.methods` group that could not be loaded: its methods are missing."""


def builtin_modules() -> list[str]:
    """The modules of this package that hold methods (every one but `base`), by name."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base" and not m.name.startswith("_"))


def discover() -> None:
    """Import the built-in method modules, then load every installed `ivlib.methods` entry point. A
    plugin that fails to load is a `PluginWarning` naming it, not a failure of every command."""
    for module in builtin_modules():
        importlib.import_module(f"{__name__}.{module}")
    for point in entry_points(group=ENTRY_POINTS):
        try:
            loaded = point.load()
            if isinstance(loaded, type) and issubclass(loaded, Method) and METHODS.get(loaded.name) is not loaded:
                register(loaded)
        except Exception as exc:  # a third party's import error: said once, the other methods still run
            warnings.warn(
                f"ivlib: method plugin '{point.name}' ({point.value}) failed to load ({type(exc).__name__}: {exc}); "
                "its methods are not available",
                PluginWarning,
                stacklevel=2,
            )


discover()
