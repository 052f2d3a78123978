"""Fuzz (issue 11 item 1): hostile reading payloads through HTTP ingest and MQTT (paho-mqtt,
MQTT 5 and 3.1.1, against the engine's embedded broker on a free port) while other devices
ingest. Huge integers, NaN/±Inf, deep nesting, lone surrogates, wrong types, huge strings,
bad point names, garbage bytes. The engine must stay up, answer every hostile request with a
clear 2xx/4xx (never a 5xx; MQTT 5: 0x00 or 0x99), and every reading of the other devices must
arrive in the twin and in the time-series store.

Bounded (a few hundred examples, no shrinking of passing runs): seconds, not minutes. The
engine runs in its own thread (trio.run); hypothesis drives it from the test thread."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.runtime.ingest_stack import WAIT, Device, Stack, ingest_stack, mqtt_ready

T = TypeVar("T")
T0 = time.time() - 3600.0  # the other devices' readings: unique timestamps T0 + i

# -- what a hostile device sends --------------------------------------------------------------
ANY_CHAR = st.characters(blacklist_categories=())  # includes lone surrogates (category Cs)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**64 + 2),
    st.integers(min_value=20, max_value=600).map(lambda n: 10**n),
    st.floats(),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0, 5e-324]),
    st.text(ANY_CHAR, max_size=30),
    st.integers(min_value=16_000, max_value=80_000).map(lambda n: "x" * n),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(ANY_CHAR, max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
points = st.one_of(
    st.sampled_from(["temperature", "t", "a.b", "", " ", "x" * 200, "\ud800", "a\nb"]),
    st.text(ANY_CHAR, max_size=20),
)
reading = st.fixed_dictionaries(
    {"point": points | values, "value": values},
    optional={"ts": values, "quality": values},
)
event = values | st.fixed_dictionaries({}, optional={"type": values, "data": values, "ts": values})
ingest_doc = st.fixed_dictionaries(
    {},
    optional={
        "values": st.dictionaries(points, values, max_size=4),
        "readings": st.lists(reading, max_size=3),
        "ts": values,
        "events": st.lists(event, max_size=2),
        "heartbeat": values,
        "bogus": values,
    },
)


def dumps(doc: Any) -> bytes:
    # allow_nan: NaN/Infinity literals (Python's json reads them back); ensure_ascii: lone
    # surrogates travel as \ud800 escapes and come back as lone surrogates
    return json.dumps(doc, allow_nan=True).encode()


deep = st.integers(min_value=1, max_value=6000).map(lambda n: "[" * n + "]" * n)
huge_literal = st.integers(min_value=300, max_value=5000).map(lambda n: "1" + "0" * n)
http_bodies = st.one_of(
    ingest_doc.map(dumps),
    values.map(dumps),
    st.tuples(points, deep | huge_literal).map(
        lambda pv: b'{"values":{' + json.dumps(pv[0]).encode() + b":" + pv[1].encode() + b"}}"
    ),
    st.binary(max_size=300),
)
mqtt_payloads = st.one_of(
    st.dictionaries(points, values, max_size=5).map(dumps),
    values.map(dumps),
    (deep | huge_literal).map(str.encode),
    st.binary(max_size=300),
)

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- the engine in its own thread ---------------------------------------------------------------
class EngineThread:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.stack: Stack | None = None
        self._stop: trio.Event | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            async with ingest_stack(self.tmp_path) as stack:
                await mqtt_ready(stack.engine, "mq1", "mq2")
                self.stack = stack
                self._token = trio.lowlevel.current_trio_token()
                self._stop = trio.Event()
                self.ready.set()
                await self._stop.wait()

        try:
            trio.run(main)
        except BaseException as exc:  # reported by the test (the engine must not die)
            self.error = exc
        finally:
            self.ready.set()

    def start(self) -> Stack:
        self.thread.start()
        assert self.ready.wait(120), "engine did not start"
        assert self.error is None and self.stack is not None, self.error
        return self.stack

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the engine's Trio thread (reading its state is safe there)."""
        assert self.thread.is_alive(), f"the engine stopped: {self.error!r}"
        return trio.from_thread.run_sync(fn, trio_token=self._token)

    def stop(self) -> None:
        if self._stop is not None and self.thread.is_alive():
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self.thread.join(60)


class OtherDevices(threading.Thread):
    """push2 (HTTP) and mq2 (MQTT 3.1.1, QoS 1) send one good reading each every few ms,
    with unique timestamps, while the fuzz runs."""

    def __init__(self, stack: Stack) -> None:
        super().__init__(name="other-devices", daemon=True)
        self.stack = stack
        self.halt = threading.Event()
        self.http_sent = 0
        self.mqtt_sent = 0
        self.failures: list[str] = []

    def run(self) -> None:
        s = self.stack
        mq2 = Device(s.mqtt_port, "mq2", s.keys["mq2"], v5=False)
        topic = s.telemetry_topic("mq2")
        try:
            with httpx.Client(base_url=s.api_url, timeout=WAIT) as client:
                i = 0
                while not self.halt.is_set():
                    i += 1
                    body = {"readings": [{"point": "temperature", "value": i, "ts": T0 + i}]}
                    r = client.post(
                        "/api/v1/ingest/push2",
                        json=body,
                        headers={"X-Device-Key": s.keys["push2"]},
                    )
                    if r.status_code != 200:
                        self.failures.append(f"push2 {i}: {r.status_code} {r.text}")
                    else:
                        self.http_sent = i
                    rc = mq2.send(topic, {"temperature": i, "ts": T0 + i})
                    if rc != 0:
                        self.failures.append(f"mq2 {i}: reason code {rc}")
                    else:
                        self.mqtt_sent = i
                    time.sleep(0.005)
        except Exception as exc:  # the engine went away: reported by the test
            self.failures.append(f"{type(exc).__name__}: {exc}")
        finally:
            mq2.close()


@pytest.mark.slow
def test_fuzzed_readings_never_stop_the_engine_and_lose_nothing_else(tmp_path: Path) -> None:
    engine = EngineThread(tmp_path)
    stack = engine.start()
    others = OtherDevices(stack)
    others.start()
    v5 = Device(stack.mqtt_port, "mq1", stack.keys["mq1"], v5=True)
    v3 = Device(stack.mqtt_port, "mq1", stack.keys["mq1"], v5=False, client_id="mq1-v3")
    topics = [
        stack.telemetry_topic("mq1"),
        stack.telemetry_topic("mq1").replace("telemetry", "events"),
    ]
    statuses: dict[int, int] = {}
    codes: dict[int, int] = {}
    try:
        with httpx.Client(base_url=stack.api_url, timeout=WAIT) as client:

            @FUZZ
            @given(body=http_bodies)
            def http_case(body: bytes) -> None:
                r = client.post(
                    "/api/v1/ingest/push1",
                    content=body,
                    headers={"X-Device-Key": stack.keys["push1"]},
                )
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                assert r.status_code in (200, 413, 422), (r.status_code, r.text[:300])
                if r.status_code == 422:
                    assert r.json()["detail"]  # a message, not an empty refusal

            http_case()

        # MQTT 5 at QoS 0 and 1 (paho 2.x ignores a PUBREC's reason code: it sends PUBREL
        # anyway and reports the PUBCOMP, so a QoS 2 refusal is not visible to it); 3.1.1 at
        # QoS 1 and 2 (always acknowledged: refused messages are dropped and counted)
        @FUZZ
        @given(
            payload=mqtt_payloads,
            events=st.booleans(),
            qos5=st.sampled_from([0, 1, 1]),
            qos3=st.sampled_from([1, 2]),
        )
        def mqtt_case(payload: bytes, events: bool, qos5: int, qos3: int) -> None:
            topic = topics[1] if events else topics[0]
            rc = v5.publish(topic, payload, qos5)
            codes[rc] = codes.get(rc, 0) + 1
            assert rc in (0x00, 0x99), rc
            assert v3.publish(topic, payload, qos3) == 0

        mqtt_case()
    finally:
        others.halt.set()
        others.join(60)
        v5.close()
        v3.close()
    try:
        assert not others.failures, others.failures[:5]
        assert statuses.get(422, 0) > 0 and codes.get(0x99, 0) > 0  # the fuzz did hit refusals
        assert others.http_sent > 0 and others.mqtt_sent > 0
        # every reading of the other devices arrived: in the twin and in the store
        deadline = time.monotonic() + 60
        want = {"push2": others.http_sent, "mq2": others.mqtt_sent}
        while True:
            got = engine.call(lambda: {d: len(stack.stored(d, "temperature")) for d in want})
            if got == want or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert got == want
        for device, n in want.items():
            value = engine.call(
                lambda d=device: stack.engine.twin(d).reported["temperature"].value  # type: ignore[union-attr]
            )
            assert value == n
            rows = engine.call(lambda d=device: stack.stored(d, "temperature"))
            assert sorted(r["value"] for r in rows) == [float(i) for i in range(1, n + 1)]
        # the simulated device kept reporting all along, and nothing was counted as a crash
        assert engine.call(lambda: len(stack.stored("sim1"))) > 0
        text = engine.call(stack.metrics)
        assert "twin_supervised_failures_total{" not in text, text
        assert engine.thread.is_alive(), engine.error
    finally:
        engine.stop()
    assert engine.error is None, engine.error
