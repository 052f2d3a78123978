from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twin.mqtt.codec import ProtocolError
from twin.mqtt.topics import (
    SubscriptionTree,
    is_valid_filter,
    matches,
    parse_shared,
    validate_filter,
)

levels = st.sampled_from(["a", "b", "", "$SYS", "c d"])
topics = st.lists(levels, min_size=1, max_size=4).map("/".join).filter(bool)
filters = (
    st.lists(st.sampled_from(["a", "b", "", "+", "$SYS"]), min_size=1, max_size=4)
    .flatmap(lambda ls: st.sampled_from(["/".join(ls), "/".join([*ls, "#"])]))
    .filter(is_valid_filter)
)


@pytest.mark.parametrize(
    ("flt", "topic", "expected"),
    [
        ("sport/tennis/#", "sport/tennis", True),
        ("sport/#", "sport", True),
        ("#", "a/b/c", True),
        ("+/+", "/finance", True),
        ("/+", "/finance", True),
        ("+", "/finance", False),
        ("sport/+", "sport/", True),
        ("#", "$SYS/uptime", False),
        ("+/monitor", "$SYS/monitor", False),
        ("$SYS/#", "$SYS/monitor", True),
        ("$SYS/+", "$SYS/monitor", True),
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/b/d", False),
    ],
)
def test_matches(flt: str, topic: str, expected: bool) -> None:
    assert matches(flt, topic) is expected
    tree = SubscriptionTree()
    tree.add(flt, "k", 1)
    assert bool(tree.match(topic)) is expected


@pytest.mark.parametrize("flt", ["", "a/#/b", "a#", "a/b+", "+a", "##"])
def test_invalid_filters(flt: str) -> None:
    assert not is_valid_filter(flt)
    with pytest.raises(ProtocolError):
        validate_filter(flt)


def test_shared() -> None:
    assert parse_shared("$share/g/a/+") == ("g", "a/+")
    assert parse_shared("a/b") is None
    for bad in ["$share/g", "$share//a", "$share/g+/a", "$share/g/a/#/b"]:
        with pytest.raises(ProtocolError):
            parse_shared(bad)


@settings(max_examples=200, deadline=None)
@given(st.lists(filters, max_size=8), topics)
def test_tree_agrees_with_matches(flts: list[str], topic: str) -> None:
    tree = SubscriptionTree()
    for i, f in enumerate(flts):
        tree.add(f, i, f)
    got = sorted((k, v) for _, k, v in tree.match(topic))
    want = sorted((i, f) for i, f in enumerate(flts) if matches(f, topic))
    assert got == want
    for i, f in enumerate(flts):
        assert tree.remove(f, i)
    assert len(tree) == 0
    assert tree.match(topic) == []
