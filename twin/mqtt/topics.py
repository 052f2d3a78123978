"""Topic names, topic filters and the subscription tree.

Rules (MQTT 3.1.1 §4.7, 5.0 §4.7-4.8):

* a topic name is non-empty, at most 65535 bytes and has no ``+`` or ``#``;
* in a filter, ``#`` is only allowed as the whole last level, ``+`` only as a whole level;
* filters that start with a wildcard never match topics starting with ``$``;
* ``$share/{group}/{filter}`` is a shared subscription: the group is non-empty and has no
  ``/``, ``+`` or ``#``, and the filter is a valid non-shared filter.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

from twin.mqtt.codec import ProtocolError, ReasonCode

EDGE_LINK_ROOT = "flux/_edge"
"""Edge uplinks over MQTT (``twin/edge/mqtt_link.py``): an edge publishes its requests on
``flux/_edge/<edge>/req`` and the cloud answers on ``flux/_edge/<edge>/resp``."""


def edge_link_topics(edge: str) -> tuple[str, str]:
    """(request topic, response topic) of the edge ``edge``."""
    return f"{EDGE_LINK_ROOT}/{edge}/req", f"{EDGE_LINK_ROOT}/{edge}/resp"


def validate_topic_name(topic: str) -> None:
    if not topic or "+" in topic or "#" in topic:
        raise ProtocolError(f"invalid topic name {topic!r}", ReasonCode.TOPIC_NAME_INVALID)


def is_valid_filter(flt: str) -> bool:
    if not flt:
        return False
    levels = flt.split("/")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != last):
            return False
        if "+" in level and level != "+":
            return False
    return True


def parse_shared(flt: str) -> tuple[str, str] | None:
    """``$share/g/f`` → ``("g", "f")``; ``None`` for a normal filter.

    Raises ProtocolError(TOPIC_FILTER_INVALID) for a malformed shared filter."""
    if not flt.startswith("$share/"):
        return None
    rest = flt[7:]
    group, sep, inner = rest.partition("/")
    if not sep or not group or "+" in group or "#" in group or not is_valid_filter(inner):
        raise ProtocolError(f"invalid shared subscription {flt!r}", ReasonCode.TOPIC_FILTER_INVALID)
    return group, inner


def validate_filter(flt: str) -> None:
    if parse_shared(flt) is None and not is_valid_filter(flt):
        raise ProtocolError(f"invalid topic filter {flt!r}", ReasonCode.TOPIC_FILTER_INVALID)


def matches(flt: str, topic: str) -> bool:
    """Does the (non-shared) filter match the topic name?"""
    if topic.startswith("$") and flt[:1] in ("+", "#"):
        return False
    f = flt.split("/")
    t = topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t):
            return False
        if level != "+" and level != t[i]:
            return False
    return len(f) == len(t)


@dataclass
class _Node:
    children: dict[str, _Node] = field(default_factory=dict)
    entries: dict[Hashable, Any] = field(default_factory=dict)


class SubscriptionTree:
    """Maps filters to ``{key: value}`` entries; :meth:`match` walks a topic once.

    A match cache (topic → entries) is kept and cleared on every change.
    """

    def __init__(self, cache_size: int = 10_000) -> None:
        self._root = _Node()
        self._count = 0
        self._cache: dict[str, list[tuple[str, Hashable, Any]]] = {}
        self._cache_size = cache_size

    def __len__(self) -> int:
        return self._count

    def add(self, flt: str, key: Hashable, value: Any) -> bool:
        """Add or replace; returns True if the (filter, key) pair is new."""
        node = self._root
        for level in flt.split("/"):
            nxt = node.children.get(level)
            if nxt is None:
                nxt = node.children[level] = _Node()
            node = nxt
        new = key not in node.entries
        node.entries[key] = value
        if new:
            self._count += 1
        self._cache.clear()
        return new

    def get(self, flt: str, key: Hashable) -> Any:
        node: _Node | None = self._root
        for level in flt.split("/"):
            node = node.children.get(level) if node is not None else None
        return None if node is None else node.entries.get(key)

    def remove(self, flt: str, key: Hashable) -> bool:
        path: list[tuple[_Node, str]] = []
        node = self._root
        for level in flt.split("/"):
            nxt = node.children.get(level)
            if nxt is None:
                return False
            path.append((node, level))
            node = nxt
        if key not in node.entries:
            return False
        del node.entries[key]
        self._count -= 1
        self._cache.clear()
        for parent, level in reversed(path):  # prune empty branches
            child = parent.children[level]
            if child.entries or child.children:
                break
            del parent.children[level]
        return True

    def match(self, topic: str) -> list[tuple[str, Hashable, Any]]:
        """All ``(filter, key, value)`` whose filter matches ``topic``."""
        cached = self._cache.get(topic)
        if cached is not None:
            return cached
        out: list[tuple[str, Hashable, Any]] = []
        levels = topic.split("/")
        dollar = topic.startswith("$")
        self._walk(self._root, levels, 0, [], out, dollar)
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[topic] = out
        return out

    def _walk(
        self,
        node: _Node,
        levels: list[str],
        i: int,
        prefix: list[str],
        out: list[tuple[str, Hashable, Any]],
        dollar: bool,
    ) -> None:
        wild_ok = not (dollar and i == 0)
        if wild_ok:
            h = node.children.get("#")
            if h is not None and h.entries:
                flt = "/".join([*prefix, "#"])
                out.extend((flt, k, v) for k, v in h.entries.items())
        if i == len(levels):
            if node.entries:
                flt = "/".join(prefix)
                out.extend((flt, k, v) for k, v in node.entries.items())
            return
        level = levels[i]
        child = node.children.get(level)
        if child is not None:
            self._walk(child, levels, i + 1, [*prefix, level], out, dollar)
        if wild_ok and level != "+":
            plus = node.children.get("+")
            if plus is not None:
                self._walk(plus, levels, i + 1, [*prefix, "+"], out, dollar)

    def items(self) -> Iterator[tuple[str, Hashable, Any]]:
        stack: list[tuple[_Node, list[str]]] = [(self._root, [])]
        while stack:
            node, prefix = stack.pop()
            if node.entries and prefix:
                flt = "/".join(prefix)
                for k, v in node.entries.items():
                    yield flt, k, v
            for level, child in node.children.items():
                stack.append((child, [*prefix, level]))
