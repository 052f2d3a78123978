"""twin.bindings.values: the one value check of every ingest edge."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twin.bindings.values import (
    INT64_MAX,
    INT64_MIN,
    Limits,
    ValueRefused,
    check_data,
    check_point,
    check_reading,
    check_ts,
    check_value,
    is_safe,
)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (10**400, "does not fit in 64 bits"),
        (INT64_MAX + 1, "64 bits"),
        (INT64_MIN - 1, "64 bits"),
        (math.nan, "not finite"),
        (math.inf, "not finite"),
        (-math.inf, "not finite"),
        ("\ud800", "lone surrogate"),
        ("x" * 20_000, "at most 16384"),
        ([[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]], "nested more than 16"),
        (list(range(1001)), "more than 1000 elements"),
        ({"k": [1, math.nan]}, "not finite"),
        ({"\udc00": 1}, "lone surrogate"),
        (b"bytes", "unsupported value type bytes"),
        (object(), "unsupported value type object"),
    ],
)
def test_refused_values_name_the_point(value: Any, words: str) -> None:
    with pytest.raises(ValueRefused, match=words) as info:
        check_value(value, "temperature")
    assert str(info.value).startswith("point 'temperature': ")
    assert not is_safe(value)


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        INT64_MAX,
        INT64_MIN,
        1.5,
        -0.0,
        1e308,
        "",
        "héllo ✓",
        [1, "a"],
        {"lat": 52.5, "lon": 13.4, "tags": ["a", None]},
    ],
)
def test_accepted_values_come_back_unchanged(value: Any) -> None:
    assert check_value(value) is value
    assert is_safe(value)


def test_points_and_timestamps() -> None:
    assert check_point("data.t") == "data.t"
    assert check_point("Temp_1:avg/5m") == "Temp_1:avg/5m"
    for bad in ("", " t", "t\n", "a b", "x" * 129, "\ud800", ".hidden"):
        with pytest.raises(ValueRefused, match="invalid point name"):
            check_point(bad)
    with pytest.raises(ValueRefused, match="must be a string"):
        check_point(5)
    assert check_ts(1_700_000_000) == 1.7e9
    for bad, words in (
        (math.nan, "got nan"),
        (1e300, "years 1-9999"),
        ("now", "got str"),
        (True, "got bool"),
        (10**400, "years 1-9999"),
    ):
        with pytest.raises(ValueRefused, match=words):
            check_ts(bad)
    assert check_reading("t", 1.0, 5) == ("t", 1.0, 5.0)
    with pytest.raises(ValueRefused, match="'e': more than 3 elements"):
        check_data({"a": [1, 2, 3]}, "e", Limits(max_items=3))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(), children, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_whatever_is_accepted_is_strict_json_and_utf8(value: Any) -> None:
    """Either refused with ValueRefused (nothing else is raised), or safe for every layer
    inside: strict JSON (no NaN), UTF-8, numbers that fit float64/int64."""
    try:
        check_value(value)
    except ValueRefused:
        assert not is_safe(value)
        return
    assert is_safe(value)
    json.dumps(value, allow_nan=False).encode("utf-8")
    json.dumps(value, ensure_ascii=False).encode("utf-8")


def test_mqtt_payload_refusals_name_the_point() -> None:
    from twin.bindings.mqtt import MqttBinding
    from twin.mqtt.hub import InMessage

    doc = {"metadata": {"name": "d", "site": "s"}}
    b = MqttBinding("d", {}, doc, None, hub=object())  # type: ignore[arg-type]
    huge = b'{"t": 1.5, "x": 1' + b"0" * 400 + b"}"
    with pytest.raises(ValueRefused, match=r"point 'x': integer of about 401 digits"):
        b._readings(InMessage("flux/s/d/telemetry", huge))
    with pytest.raises(ValueRefused, match=r"point 'a.b': number nan is not finite"):
        b._readings(InMessage("flux/s/d/telemetry", b'{"a": {"b": NaN}}'))
    with pytest.raises(ValueRefused, match="nested more than 16"):
        b._readings(InMessage("flux/s/d/telemetry", b'{"a":' + b"[" * 40 + b"]" * 40 + b"}"))
    with pytest.raises(ValueRefused, match="timestamp"):
        b._readings(InMessage("flux/s/d/telemetry", b'{"t": 1, "ts": 1e300}'))
    assert [(r.point, r.value) for r in b._readings(InMessage("x", b'{"t": 2}'))] == [("t", 2)]
    raw = MqttBinding("d", {"format": "raw"}, doc, None, hub=object())  # type: ignore[arg-type]
    for payload in (b"nan", b"1e999", b"1" + b"0" * 30):
        with pytest.raises(ValueRefused):
            raw._readings(InMessage("x", payload))


def test_a_point_name_accepted_once_is_still_judged_by_other_limits() -> None:
    from twin.bindings.values import Limits, check_point

    name = "a-rather-long-point-name"
    assert check_point(name) == name  # accepted (and remembered) under the default limits
    assert check_point(name) == name
    with pytest.raises(ValueRefused):
        check_point(name, Limits(max_point=8))
    with pytest.raises(ValueRefused):
        check_point("bad name")  # refused names are never remembered
    with pytest.raises(ValueRefused):
        check_point("bad name")
