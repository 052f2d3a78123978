"""Live updates through the engine's WebSocket (``/api/v1/ws``), REST only for the backfill.

:class:`LiveFeed` is a background thread holding one WebSocket per (server, token): readings
go into a bounded ring (numbers only, compact tuples), status changes and ``last_seen`` into
small dicts, alarm events bump :attr:`LiveFeed.alarm_version`. Streamlit reruns read it; they
never block on it. Feeds are shared by the sessions of one user (:func:`feed_for`) and stop
themselves after ``idle`` seconds without a reader (Streamlit has no "session ended" hook).

A reader keeps a :class:`Cursor`. After a reconnect (``generation`` changed) or when the ring
has moved past the cursor, :meth:`LiveFeed.since` says the sequence is not complete and the
reader backfills from REST again.

:class:`LiveSeries` is what a chart or a stat tile keeps per panel: partial aggregates (sum,
count, min, max) per (series, metric, bucket), filled from one bucketed REST query and then
from the feed's readings, so an unchanged page costs no REST call per refresh.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pandas as pd

log = logging.getLogger(__name__)

T = TypeVar("T")

Reading = tuple[int, str, str, float, float]
"""(seq, device, metric, ts, value) — numeric readings only."""

KINDS = "reading,status,alarm"


@dataclass(frozen=True)
class Cursor:
    generation: int
    seq: int


def ws_url(server: str) -> str:
    base = server.rstrip("/")
    if base.startswith("https://"):
        base = "wss://" + base.removeprefix("https://")
    elif base.startswith("http://"):
        base = "ws://" + base.removeprefix("http://")
    return f"{base}/api/v1/ws?batch=1000&kinds={KINDS}"


class LiveFeed:
    """One WebSocket subscription in a daemon thread, reconnecting with backoff."""

    def __init__(
        self,
        server: str,
        token: str,
        *,
        buffer: int = 100_000,
        idle: float = 120.0,
        connect: Callable[..., Any] | None = None,
    ) -> None:
        self.url = ws_url(server)
        self.token = token
        self.idle = idle
        self._connect = connect
        self._lock = threading.Lock()
        self._ring: deque[Reading] = deque(maxlen=buffer)
        self.seq = 0
        self.generation = 0
        self.connected = threading.Event()
        self.status: dict[str, tuple[str, float]] = {}
        self.last_seen: dict[str, float] = {}
        self.alarm_version = 0
        self.received = 0
        self.error: str | None = None
        self.hello: dict[str, Any] | None = None
        self.shared: dict[str, Any] = {}
        """What the sessions of this feed share: panel series, the device and alarm lists
        (a reload or a second tab starts from them instead of a REST backfill)."""
        self.shared_lock = threading.RLock()
        self._used = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flux-live", daemon=True)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> LiveFeed:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def touch(self) -> None:
        self._used = time.monotonic()

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def _run(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            if time.monotonic() - self._used > self.idle:
                log.info("live feed %s: idle for %.0f s, closing", self.url, self.idle)
                break
            try:
                self._session()
                delay = 0.5
            except Exception as exc:  # any failure: reconnect (a bug here must not end the feed)
                self.error = f"{type(exc).__name__}: {exc}"
                log.info("live feed %s: %s; reconnecting in %.1f s", self.url, self.error, delay)
            self.connected.clear()
            self._stop.wait(delay)
            delay = min(delay * 2, 10.0)
        self._stop.set()
        self.connected.clear()

    def _session(self) -> None:
        connect: Callable[..., Any]
        if self._connect is not None:
            connect = self._connect
        else:
            from websockets.sync.client import connect
        headers = {"Authorization": f"Bearer {self.token}"}
        with connect(self.url, additional_headers=headers, open_timeout=5, max_size=2**24) as ws:
            while not self._stop.is_set():
                if time.monotonic() - self._used > self.idle:
                    return
                try:
                    raw = ws.recv(timeout=1.0)
                except TimeoutError:
                    continue
                data = json.loads(raw)
                self.ingest(data if isinstance(data, list) else [data])

    # -- events -------------------------------------------------------------------------------------
    def ingest(self, events: Iterable[Mapping[str, Any]]) -> None:
        """Apply a batch of bus events (public for tests and for the thread)."""
        with self._lock:
            for ev in events:
                kind = ev.get("kind")
                self.received += 1
                if kind == "reading":
                    device = str(ev.get("device"))
                    ts = float(ev.get("ts") or 0.0)
                    quality = ev.get("quality")
                    if quality == "stale":  # the last value again, the device was not heard
                        continue  # (and queries leave stale readings out, as bad ones)
                    if ts > self.last_seen.get(device, 0.0):
                        self.last_seen[device] = ts
                    v = ev.get("value")
                    if isinstance(v, bool) or not isinstance(v, int | float):
                        continue
                    if not math.isfinite(v) or quality == "bad":
                        continue  # queries leave bad readings out too
                    self.seq += 1
                    self._ring.append((self.seq, device, str(ev.get("point")), ts, float(v)))
                elif kind == "status":
                    self.status[str(ev.get("device"))] = (
                        str(ev.get("status")),
                        float(ev.get("ts") or 0.0),
                    )
                elif kind == "alarm":
                    self.alarm_version += 1
                elif kind == "hello":
                    self.hello = dict(ev)
                    self.generation += 1  # a new connection: what came before may have gaps
                    self.error = None
                    self.connected.set()

    def cursor(self) -> Cursor:
        with self._lock:
            return Cursor(self.generation, self.seq)

    def cursor_before(self, ts: float, margin: float = 5.0) -> Cursor:
        """A cursor before every reading in the ring stamped after ``ts`` (readings of
        different devices arrive a little out of order: ``margin`` seconds more)."""
        with self._lock:
            seq = self.seq
            for r in reversed(self._ring):
                if r[3] <= ts - margin:
                    break
                seq = r[0] - 1
            return Cursor(self.generation, seq)

    def since(self, cursor: Cursor) -> tuple[list[Reading], Cursor, bool]:
        """Readings after ``cursor``, the new cursor, and whether nothing was missed."""
        with self._lock:
            now = Cursor(self.generation, self.seq)
            if cursor.generation != self.generation or not self.connected.is_set():
                return [], now, False
            if cursor.seq == self.seq:
                return [], now, True
            oldest = self._ring[0][0] if self._ring else self.seq + 1
            if cursor.seq + 1 < oldest:
                return [], now, False
            out = list(itertools.islice(self._ring, cursor.seq + 1 - oldest, None))
            return out, now, True

    def overlay(self, devices: list[dict[str, Any]], fetched_at: float) -> list[dict[str, Any]]:
        """Device summaries (REST, fetched at ``fetched_at``) with live status and last_seen."""
        with self._lock:
            status = {d: s for d, (s, ts) in self.status.items() if ts >= fetched_at}
            seen = dict(self.last_seen)
        if not status and not seen:
            return devices
        out = []
        for d in devices:
            name = d.get("name")
            s = status.get(name)  # type: ignore[arg-type]
            t = seen.get(name)  # type: ignore[arg-type]
            if s is None and (t is None or t <= (d.get("last_seen") or 0)):
                out.append(d)
                continue
            d = dict(d)
            if s is not None:
                d["status"] = s
            if t is not None and t > (d.get("last_seen") or 0):
                d["last_seen"] = t
            out.append(d)
        return out


_FEEDS: dict[tuple[str, str], LiveFeed] = {}
_FEEDS_LOCK = threading.Lock()


def feed_for(server: str, token: str, *, wait: float = 0.0) -> LiveFeed:
    """The running feed of this (server, token), started if needed (shared by sessions)."""
    with _FEEDS_LOCK:
        feed = _FEEDS.get((server, token))
        if feed is None or not feed.alive:
            feed = LiveFeed(server, token).start()
            _FEEDS[(server, token)] = feed
        # a feed nobody reads any more has stopped itself; forget those
        for key, other in list(_FEEDS.items()):
            if not other.alive:
                del _FEEDS[key]
    feed.touch()
    if wait:
        feed.wait_connected(wait)
    return feed


# -- per panel: bucketed partials ----------------------------------------------------------------------
AGGS = ("avg", "min", "max", "sum", "count")
"""Aggregates a :class:`LiveSeries` can answer (first/last need the raw order: REST)."""


@dataclass
class LiveSeries:
    """Partials per (series, metric, bucket start) for one panel.

    ``series`` is the device name when ``by_device``, else one label for all devices.
    """

    metrics: tuple[str, ...]
    devices: frozenset[str]
    every: float
    span: float
    by_device: bool
    label: str = "all"
    cursor: Cursor | None = None
    after: float = 0.0  # readings up to this time came with the backfill
    buckets: dict[tuple[str, str, float], list[float]] = field(default_factory=dict)
    used: float = 0.0  # monotonic time of the last read (shared series are dropped when idle)

    def key(self) -> tuple[Any, ...]:
        return (self.metrics, self.devices, self.every, self.span, self.by_device, self.label)

    def backfill(
        self, rows: Iterable[Mapping[str, Any]], cursor: Cursor | None, after: float
    ) -> None:
        """Rows of a REST query with ``agg=avg,count,min,max`` and this bucket."""
        self.buckets.clear()
        for r in rows:
            n = r.get("count")
            avg = r.get("avg")
            if not n or avg is None:
                continue
            ts = _epoch(r["ts"])
            series = str(r.get("device")) if self.by_device else self.label
            mn = r.get("min")
            mx = r.get("max")
            self.buckets[(series, str(r["metric"]), ts)] = [
                float(avg) * float(n),
                float(n),
                float(avg if mn is None else mn),
                float(avg if mx is None else mx),
            ]
        self.cursor = cursor
        self.after = after

    def add(self, readings: Iterable[Reading]) -> int:
        n = 0
        for _, device, metric, ts, value in readings:
            if ts <= self.after or metric not in self.metrics or device not in self.devices:
                continue
            b = math.floor(ts / self.every) * self.every
            k = (device if self.by_device else self.label, metric, b)
            p = self.buckets.get(k)
            if p is None:
                self.buckets[k] = [value, 1.0, value, value]
            else:
                p[0] += value
                p[1] += 1.0
                p[2] = min(p[2], value)
                p[3] = max(p[3], value)
            n += 1
        return n

    def prune(self, now: float) -> None:
        edge = now - self.span - self.every
        for k in [k for k in self.buckets if k[2] < edge]:
            del self.buckets[k]

    def frame(self) -> pd.DataFrame:
        """``ts, device, metric, avg`` like a REST answer (``device`` is the series label)."""
        rows = [(b, s, m, p[0] / p[1]) for (s, m, b), p in self.buckets.items() if p[1]]
        df = pd.DataFrame(rows, columns=["ts", "device", "metric", "avg"])
        df["ts"] = pd.to_datetime(df["ts"], unit="s", utc=True)
        return df.sort_values(["device", "metric", "ts"], ignore_index=True)

    def value(self, agg: str, metric: str, since: float) -> float | None:
        """One aggregate of ``metric`` over the buckets starting at or after ``since``."""
        parts = [p for (_, m, b), p in self.buckets.items() if m == metric and b >= since and p[1]]
        if not parts:
            return None
        total = sum(p[0] for p in parts)
        count = sum(p[1] for p in parts)
        if agg == "sum":
            return total
        if agg == "count":
            return count
        if agg == "min":
            return min(p[2] for p in parts)
        if agg == "max":
            return max(p[3] for p in parts)
        return total / count


SHARED_IDLE = 600.0
"""A shared series no session has read for this long is dropped."""

WRITER_LAG = 3.0
"""Seconds the engine's batched time-series writer may hold a reading before it is queryable:
the REST backfill ends this long ago and the feed supplies what came after."""


def refresh_series(
    state: MutableMapping[str, Any] | Any,
    key: str,
    fresh: LiveSeries,
    feed: LiveFeed | None,
    backfill: Callable[[float], Iterable[Mapping[str, Any]]],
    now: float | None = None,
    read: Callable[[LiveSeries], T] = lambda s: s,  # type: ignore[assignment,return-value]
) -> T:
    """``read`` of the panel's series, brought up to date: from the feed when it has everything
    since the last call, else ``backfill(to)`` (REST rows up to ``to``) plus the feed's readings
    after ``to``. Without a connected feed every call backfills (REST polling).

    With a feed the series lives in ``feed.shared`` (the user's sessions share it, under the
    feed's lock, so ``read`` runs under it too); without one in ``state`` (the session)."""
    if feed is None:
        return read(_refresh(state, key, fresh, None, backfill, now))
    with feed.shared_lock:
        # sessions may show the same panel over different selections (another dashboard, a
        # changed device list): one series per selection, and the unused ones dropped
        key = f"{key}#{hash(fresh.key())}"
        series = _refresh(feed.shared, key, fresh, feed, backfill, now)
        series.used = time.monotonic()
        for k, v in list(feed.shared.items()):
            if isinstance(v, LiveSeries) and k != key and series.used - v.used > SHARED_IDLE:
                del feed.shared[k]
        return read(series)


def _refresh(
    state: MutableMapping[str, Any] | Any,
    key: str,
    fresh: LiveSeries,
    feed: LiveFeed | None,
    backfill: Callable[[float], Iterable[Mapping[str, Any]]],
    now: float | None,
) -> LiveSeries:
    cur = state.get(key)
    if not isinstance(cur, LiveSeries) or cur.key() != fresh.key():
        cur = fresh
    now = time.time() if now is None else now
    live = feed is not None and feed.connected.is_set()
    if live and cur.cursor is not None:
        assert feed is not None
        readings, cursor, complete = feed.since(cur.cursor)
        if complete:
            cur.add(readings)
            cur.cursor = cursor
            cur.prune(now)
            state[key] = cur
            return cur
    to = now - WRITER_LAG if live else now
    start = feed.cursor_before(to) if live and feed is not None else None
    cur.backfill(backfill(to), start, to)
    if start is not None and feed is not None:
        readings, cursor2, complete = feed.since(start)
        if complete:
            cur.add(readings)
            cur.cursor = cursor2
        else:
            cur.cursor = None
    state[key] = cur
    return cur


def cached(
    state: MutableMapping[str, Any] | Any,
    feed: LiveFeed | None,
    key: str,
    version: Any,
    ttl: float,
    fetch: Callable[[], T],
) -> T:
    """``fetch()``, kept in ``feed.shared`` (else ``state``) while ``version`` is unchanged and
    for at most ``ttl`` seconds."""
    store = feed.shared if feed is not None else state
    lock = feed.shared_lock if feed is not None else threading.RLock()
    with lock:
        hit = store.get(key)
        now = time.time()
        if hit is not None and hit[0] == version and now - hit[1] <= ttl:
            return hit[2]
        value = fetch()
        store[key] = (version, now, value)
        return value


def _epoch(ts: Any) -> float:
    if isinstance(ts, int | float):
        return float(ts)
    return float(pd.Timestamp(ts).timestamp())


__all__ = [
    "AGGS",
    "Cursor",
    "LiveFeed",
    "LiveSeries",
    "cached",
    "feed_for",
    "refresh_series",
    "ws_url",
]
