"""YAML files a user hands ivlib (configs, template files), read bounded and strict: a regular file
of at most a stated size (`files.read_bytes`), UTF-8, with a key given twice in one mapping refused,
and the values aliases stand for counted while the document is composed, so an alias bomb (a few
aliases of aliases that stand for billions of values) or a nesting deep enough to exhaust the
composer's recursion is refused in one line, at once, wherever in the file it sits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from . import files
from .errors import UsageError

MAX_YAML_VALUES = 100_000  # values in a config once its aliases are expanded (an alias bomb: billions)
MAX_YAML_DEPTH = 64  # nesting of mappings and lists (the composer recurses)


class _Loader(yaml.SafeLoader):
    """safe_load, bounded and strict. It refuses a key given twice in one mapping (plain YAML keeps the
    last silently, so a forgotten earlier entry would run without a word); and it counts, while
    composing, the values each node stands for with its aliases (`*name`) expanded, refusing a
    document beyond MAX_YAML_VALUES or nested beyond MAX_YAML_DEPTH. An alias shares its anchor's node,
    so the count costs one pass over the text: a bomb (aliases of aliases) is refused at once, wherever
    it sits, before anything walks the expanded values."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._sizes: dict[int, int] = {}  # id(node) -> values it stands for, aliases expanded
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            return super().compose_node(parent, index)  # the anchor's node, counted where it was composed
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise _Refused(
                    f"nests more than {MAX_YAML_DEPTH} deep at line {line}",
                    f"mappings and lists nested at most {MAX_YAML_DEPTH} deep",
                )
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if node is not None:
            self._sizes[id(node)] = self._size(node)
        return node

    def _size(self, node: yaml.Node) -> int:
        """1 + the sizes of the node's children (keys and values), an alias counting as its anchor's node."""
        if isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        size = 1
        for child in children:
            if id(child) not in self._sizes:  # an alias of a node still being composed: it holds itself
                raise _Refused(
                    f"the alias at line {child.start_mark.line + 1} is inside the value it names (a recursive value)",
                    "aliases of values defined before them",
                )
            size += self._sizes[id(child)]
        if size > MAX_YAML_VALUES:
            raise _Refused(
                f"holds more than {MAX_YAML_VALUES:,} values once its aliases (*name) are expanded, "
                f"at line {node.start_mark.line + 1}",
                f"at most {MAX_YAML_VALUES:,} values with aliases expanded (aliases of aliases can stand for billions)",
            )
        return size

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _Refused(
                        f"key '{key}' is given twice (lines {seen[key]} and {line})", "each key once per mapping"
                    )
                seen[key] = line
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
        return super().construct_mapping(node, deep=deep)


class _Refused(Exception):
    def __init__(self, why: str, accepted: str):
        super().__init__(f"{why}; accepted: {accepted}")


def read_yaml(what: str, path: str | Path, limit: int, accepted: str) -> Any:
    """The YAML document in `path` (None when empty); UsageError in one line naming `what` otherwise."""
    data = files.read_bytes(what, path, limit, accepted)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{what} '{path}' cannot be read (not UTF-8 text); accepted: {accepted}") from None
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)
    except _Refused as exc:
        raise UsageError(f"{what} '{path}': {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UsageError(f"{what} '{path}' is not valid YAML{where}; accepted: {accepted}") from None
