"""Registry YAML, parsed defensively: safe loader only, line numbers kept, hostile documents refused.

:func:`yaml_nodes` turns a registry document into :class:`Node` trees (value + 1-based line) so every
validation error can name its line. It refuses what a hand-written registry never needs and an attacker
would use: duplicate keys (which YAML silently lets the last one win), non-string keys, ``<<`` merge keys,
custom tags, recursive aliases and alias bombs ("billion laughs": more than :data:`MAX_YAML_NODES` values
once aliases are expanded). Only PyYAML's ``SafeLoader`` (the C one where available) ever sees the text.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import RegistryError

__all__ = ["MAX_YAML_NODES", "Node", "json_nodes", "plain", "to_nodes", "yaml_nodes"]


# Values a registry document may expand to (after aliases): far above any real registry.
MAX_YAML_NODES = 200_000


class Node:
    """A parsed YAML value with its 1-based line."""

    __slots__ = ("value", "line")

    def __init__(self, value: Any, line: int) -> None:
        self.value = value
        self.line = line


def yaml_nodes(text: str, file: str) -> Node:
    """Parse YAML into Node trees, refusing duplicate keys and non-scalar keys."""
    import yaml

    loader_cls = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        root = yaml.compose(text, Loader=loader_cls)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise RegistryError(f"not valid YAML: {getattr(exc, 'problem', None) or exc}", file=file, line=line) from None
    if root is None:
        raise RegistryError("the file is empty; expected 'version: 1' and 'models:'", file=file)
    constructor = yaml.SafeLoader("")  # reuse PyYAML's scalar resolution (ints, bools, nulls)
    budget = [MAX_YAML_NODES]
    active: set[int] = set()

    def scalar(node: Any) -> Any:
        try:
            return constructor.construct_object(node, deep=True)
        except yaml.YAMLError:
            raise RegistryError(f"unsupported YAML tag {node.tag!r} (tags and '<<' merge keys are not allowed)",
                                file=file, line=node.start_mark.line + 1) from None

    def convert(node: Any) -> Node:
        line = node.start_mark.line + 1
        budget[0] -= 1
        if budget[0] < 0:  # aliases can expand exponentially ("billion laughs")
            raise RegistryError(f"more than {MAX_YAML_NODES} values after expanding YAML aliases (an alias bomb?)",
                                file=file, line=line)
        if not isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            return Node(scalar(node), line)
        if id(node) in active:
            raise RegistryError("a YAML alias refers to itself (recursive structure)", file=file, line=line)
        active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return Node([convert(v) for v in node.value], line)
            out: dict[str, Node] = {}
            keylines: dict[str, int] = {}
            for knode, vnode in node.value:
                if not isinstance(knode, yaml.ScalarNode):
                    raise RegistryError("mapping keys must be plain strings", file=file, line=knode.start_mark.line + 1)
                if knode.tag == "tag:yaml.org,2002:merge":
                    raise RegistryError("YAML merge keys ('<<') are not allowed; write the fields out", file=file,
                                        line=knode.start_mark.line + 1)
                key = str(scalar(knode))
                if key in out:
                    raise RegistryError(f"duplicate key {key!r} (first at line {keylines[key]})", file=file,
                                        line=knode.start_mark.line + 1)
                keylines[key] = knode.start_mark.line + 1
                out[key] = convert(vnode)
            return Node(out, line)
        finally:
            active.discard(id(node))

    return convert(root)


def plain(node: Node) -> Any:
    """Strip line info recursively."""
    v = node.value
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [plain(x) for x in v]
    return v


def json_nodes(text: str) -> Node | None:
    """A registry written as JSON (a YAML subset), parsed without importing PyYAML; None when the text is not a
    JSON object or repeats a key, so that the YAML parser handles it (and names the line of what is wrong).

    Its Nodes carry no line numbers: a caller that finds an error in them re-parses with :func:`yaml_nodes`.
    """
    if not text.lstrip().startswith("{"):
        return None
    import json

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(items)
        if len(out) != len(items):
            raise ValueError("duplicate key")
        return out

    try:
        value = json.loads(text, object_pairs_hook=pairs)
    except ValueError:  # not JSON after all (or a duplicate key): YAML's turn
        return None
    return to_nodes(value) if isinstance(value, dict) else None


def to_nodes(value: Any) -> Node:
    """Wrap plain Python data (a dict registry) as Nodes without line numbers."""
    if isinstance(value, Mapping):
        return Node({str(k): to_nodes(v) for k, v in value.items()}, 0)
    if isinstance(value, (list, tuple)):
        return Node([to_nodes(v) for v in value], 0)
    return Node(value, 0)
