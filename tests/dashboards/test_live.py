"""The dashboard's live feed: unit tests of the bookkeeping, and one WebSocket subscription
against a real engine (`twin up` on the demo site)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from dashboards.client import FluxClient
from dashboards.live import Cursor, LiveFeed, LiveSeries, cached, refresh_series, ws_url
from tests.dashboards.procs import demo_copy, stop, twin_up


def reading(device: str, point: str, ts: float, value: Any, quality: str = "good") -> dict:
    return {"kind": "reading", "device": device, "point": point, "ts": ts, "value": value,
            "quality": quality}  # fmt: skip


def connected_feed(buffer: int = 100) -> LiveFeed:
    feed = LiveFeed("http://x", "t", buffer=buffer)  # never started: fed by hand
    feed.ingest([{"kind": "hello", "user": "u"}])
    return feed


def test_ws_url() -> None:
    assert ws_url("http://h:1/") == "ws://h:1/api/v1/ws?batch=1000&kinds=reading,status,alarm"
    assert ws_url("https://h").startswith("wss://h/api/v1/ws?")


def test_feed_keeps_numbers_status_and_alarm_versions() -> None:
    feed = connected_feed()
    c0 = feed.cursor()
    feed.ingest([
        reading("a", "t", 10.0, 1.5), reading("a", "s", 11.0, "on"), reading("b", "t", 12.0, True),
        reading("b", "t", 13.0, 9.0, "bad"),
        reading("b", "t", 13.5, 1.5, "stale"),  # the binding repeating b's last value
        {"kind": "status", "device": "a", "status": "offline", "ts": 14.0},
        {"kind": "alarm", "device": "a", "event": "raised", "ts": 14.0},
    ])  # fmt: skip
    out, c1, complete = feed.since(c0)
    assert complete and [(r[1], r[2], r[4]) for r in out] == [("a", "t", 1.5)]
    assert feed.last_seen == {"a": 11.0, "b": 13.0}  # any reading but a stale one is a sighting
    assert feed.alarm_version == 1
    devices = [{"name": "a", "status": "online", "last_seen": 5.0}, {"name": "c", "status": "x"}]
    shown = feed.overlay(devices, fetched_at=13.5)
    assert shown[0]["status"] == "offline" and shown[0]["last_seen"] == 11.0
    assert shown[1] == devices[1] and devices[0]["status"] == "online"  # not modified
    assert feed.overlay(devices, fetched_at=20.0)[0]["status"] == "online"  # REST is newer
    assert feed.since(c1) == ([], c1, True)


def test_feed_reports_gaps() -> None:
    feed = connected_feed(buffer=3)
    c0 = feed.cursor()
    feed.ingest([reading("a", "t", float(i), float(i)) for i in range(5)])
    _, now, complete = feed.since(c0)
    assert not complete  # the ring moved past the cursor
    feed.ingest([{"kind": "hello"}])  # reconnected
    assert feed.since(now)[2] is False
    assert feed.cursor_before(3.0, margin=0) == Cursor(feed.generation, 4)  # before ts 4.0


def test_series_backfill_then_live_readings() -> None:
    feed = connected_feed()
    series = LiveSeries(("t",), frozenset({"a", "b"}), 10.0, 60.0, by_device=True)
    state: dict[str, Any] = {}
    calls: list[float] = []

    def backfill(to: float) -> list[dict[str, Any]]:
        calls.append(to)
        return [{"ts": "1970-01-01T00:01:40Z", "device": "a", "metric": "t", "avg": 2.0,
                 "count": 2, "min": 1.0, "max": 3.0}]  # fmt: skip

    feed.ingest([reading("a", "t", 100.0, 5.0)])  # before the backfill's end: not counted
    s = refresh_series(state, "k", series, feed, backfill, now=105.0)
    assert calls == [102.0]  # the writer's lag: REST up to now - 3 s, the feed after
    feed.ingest([reading("a", "t", 104.0, 8.0), reading("c", "t", 104.0, 99.0),
                 reading("b", "x", 104.0, 99.0), reading("b", "t", 111.0, 4.0)])  # fmt: skip
    s = refresh_series(state, "k", series, feed, backfill, now=112.0)
    assert calls == [102.0]  # no second REST call
    df = s.frame()
    assert df[["device", "avg"]].values.tolist() == [["a", 4.0], ["b", 4.0]]  # (2*2+8)/3
    assert s.value("max", "t", since=0) == 8.0 and s.value("count", "t", since=0) == 4.0
    assert s.value("avg", "t", since=110) == 4.0
    feed.ingest([{"kind": "hello"}])  # a reconnect: backfill again
    refresh_series(state, "k", series, feed, backfill, now=200.0)
    assert calls == [102.0, 197.0]
    s = refresh_series(state, "k", series, feed, backfill, now=300.0)
    s.prune(300.0)
    assert s.frame().empty  # older than the range


def test_shared_series_per_selection_and_dropped_when_idle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dashboards.live as live

    feed = connected_feed()
    a = LiveSeries(("t",), frozenset({"a"}), 10.0, 60.0, by_device=True)
    b = LiveSeries(("t",), frozenset({"b"}), 10.0, 60.0, by_device=True)
    calls: list[float] = []

    def backfill(to: float) -> list[dict[str, Any]]:
        calls.append(to)
        return []

    for _ in range(2):  # two sessions, two selections, same panel: no backfill ping-pong
        refresh_series({}, "k", a, feed, backfill, now=100.0)
        refresh_series({}, "k", b, feed, backfill, now=100.0)
    assert len(calls) == 2 and len(feed.shared) == 2
    monkeypatch.setattr(live, "SHARED_IDLE", -1.0)
    refresh_series({}, "k", a, feed, backfill, now=100.0)
    assert len(feed.shared) == 1  # b's series was not read: dropped


def test_series_without_a_feed_polls_rest() -> None:
    calls: list[float] = []
    series = LiveSeries(("t",), frozenset({"a"}), 10.0, 60.0, by_device=False, label="all")
    for now in (1.0, 2.0):
        refresh_series({}, "k", series, None, lambda to: calls.append(to) or [], now=now)
    assert calls == [1.0, 2.0]


def test_cached_follows_version_and_ttl() -> None:
    feed = connected_feed()
    calls: list[int] = []

    def fetch() -> int:
        calls.append(1)
        return len(calls)

    assert cached({}, feed, "k", 1, 60.0, fetch) == 1
    assert cached({}, feed, "k", 1, 60.0, fetch) == 1  # shared by the feed's sessions
    assert cached({}, feed, "k", 2, 60.0, fetch) == 2  # an alarm event, a reconnect
    assert cached({}, feed, "k", 2, -1.0, fetch) == 3  # too old
    state: dict[str, Any] = {}
    assert cached(state, None, "k", 1, 60.0, fetch) == 4 and "k" in state  # per session


def test_an_unread_feed_stops_itself() -> None:
    feed = LiveFeed("http://127.0.0.1:9", "t", idle=0.3).start()  # nothing listens there
    feed.join(10)
    assert not feed.alive and feed.error  # it tried, then closed as idle


# -- against a real engine ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    site, _, env = demo_copy(tmp_path_factory.mktemp("live"), {"viewer": "viewer"})
    proc, api = twin_up(site, env)
    try:
        token = FluxClient(api).login("viewer", "secret123").token
        yield {"api": api, "token": token}
    finally:
        stop(proc)


@pytest.mark.integration
def test_feed_against_the_engine(engine: dict[str, str]) -> None:
    feed = LiveFeed(engine["api"], engine["token"]).start()
    try:
        assert feed.wait_connected(20), feed.error
        assert feed.hello and feed.hello["user"] == "viewer"
        cursor = feed.cursor()
        deadline = time.monotonic() + 30
        got: list[Any] = []
        while time.monotonic() < deadline and len({r[1] for r in got}) < 2:
            time.sleep(0.2)
            out, cursor, complete = feed.since(cursor)
            assert complete
            got += out
        assert len({r[1] for r in got}) >= 2, "numeric readings of 2 devices within 30 s"
        # the same series from REST and from the feed: a chart panel's update path
        client = FluxClient(engine["api"], engine["token"])
        device, metric = got[0][1], got[0][2]
        series = LiveSeries((metric,), frozenset({device}), 10.0, 600.0, by_device=True)

        def backfill(to: float) -> list[dict[str, Any]]:
            return client.query(metric=[metric], device=[device], from_=f"{to - 600:.3f}",
                                to=f"{to:.3f}", every="10s",
                                agg=["avg", "count", "min", "max"]).records()  # fmt: skip

        state: dict[str, Any] = {}
        s = refresh_series(state, "k", series, feed, backfill)
        assert s.cursor is not None
        before = sum(p[1] for p in s.buckets.values())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sum(p[1] for p in s.buckets.values()) <= before:
            time.sleep(0.5)
            s = refresh_series(state, "k", series, feed, backfill)
        assert sum(p[1] for p in s.buckets.values()) > before  # new readings came by WebSocket
    finally:
        feed.stop()
        feed.join(5)
    assert not feed.alive


def test_feed_with_a_bad_token_keeps_retrying(engine: dict[str, str]) -> None:
    feed = LiveFeed(engine["api"], "not-a-token").start()
    try:
        assert not feed.wait_connected(2)
        deadline = time.monotonic() + 10
        while feed.error is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert feed.error  # the rejection is kept for the page to show
    finally:
        feed.stop()
        feed.join(5)
    with httpx.Client() as c:  # the engine is still fine
        assert c.get(f"{engine['api']}/api/v1/health").status_code == 200
