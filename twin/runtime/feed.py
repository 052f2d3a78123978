"""The cross-engine live feed (scale-out): every engine's bus events reach every other engine.

Through PostgreSQL ``LISTEN/NOTIFY`` on the registry every engine already shares (no second
broker to run; measured in ``benchmarks/scaleout/run.py``: see benchmarks/README.md):

* **out**: a bus subscription takes this engine's own events (readings, status changes,
  alarms, scene/device events); they are batched (up to ``batch_delay`` or a payload near
  PostgreSQL's 8,000-byte NOTIFY limit) and sent with ``pg_notify`` from a worker thread.
  A feed that falls behind is dropped by the bus like any slow subscriber and re-opened: the
  live view may miss events then, the stored data never does (it is not carried here).
* **in**: a dedicated connection LISTENs in a worker thread; each event from another engine
  is published on the local bus marked ``"remote": <engine id>``: WebSocket clients, scenes
  and alarm views see it; the time-series pump skips it (its owner stored it), and the feed
  does not send it on again.

Events are the bus's JSON dicts; an event that does not parse is counted and dropped.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import trio

from twin.registry.cluster import ClusterStore
from twin.runtime.bus import Filter

log = logging.getLogger(__name__)

LIMIT = 7_800  # bytes of one NOTIFY payload (PostgreSQL refuses 8,000 and more)


class Feed:
    def __init__(
        self,
        engine: Any,
        store: ClusterStore,
        origin: str,
        *,
        channel: str = "twin_feed",
        batch_delay: float = 0.0,
        buffer: int = 50_000,
    ) -> None:
        self.engine = engine
        self.store = store
        self.origin = origin
        self.channel = channel[:63]
        self.batch_delay = batch_delay
        self.buffer = buffer
        self.sent = 0
        self.received = 0
        self.bad = 0
        self.notifies = 0
        self._conn: Any = None

    # -- out ----------------------------------------------------------------------------------
    def _encode(self, events: list[dict[str, Any]]) -> list[str]:
        out: list[str] = []
        parts: list[str] = []
        size = 0
        for ev in events:
            try:
                text = json.dumps(ev, separators=(",", ":"), default=str)
            except (TypeError, ValueError):
                self.bad += 1
                continue
            if len(text) + 64 > LIMIT:
                self.bad += 1  # too big for one notification (a huge free event): live view only
                continue
            if size + len(text) + 64 > LIMIT and parts:
                out.append(self._frame(parts))
                parts, size = [], 0
            parts.append(text)
            size += len(text) + 1
        if parts:
            out.append(self._frame(parts))
        return out

    def _frame(self, parts: list[str]) -> str:
        return '{"o":' + json.dumps(self.origin) + ',"e":[' + ",".join(parts) + "]}"

    def _notify(self, payloads: list[str]) -> None:
        """Send on the dedicated connection (opened on first use, again after an error)."""
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            conn = self._conn = self.store.sender()
        try:
            with conn.cursor() as cur:
                if len(payloads) == 1:
                    cur.execute("SELECT pg_notify(%s, %s)", (self.channel, payloads[0]))
                else:
                    cur.executemany(
                        "SELECT pg_notify(%s, %s)", [(self.channel, p) for p in payloads]
                    )
        except Exception:
            self._conn = None
            conn.close()
            raise

    async def _out(self) -> None:
        bus = self.engine.bus
        while True:
            sub = bus.open(Filter(), buffer=self.buffer, name="cluster-feed")
            try:
                while True:
                    first = await sub.receive.receive()
                    if self.batch_delay:
                        await trio.sleep(self.batch_delay)
                    batch = [first]  # and whatever queued while the last batch was sent
                    while True:
                        try:
                            batch.append(sub.receive.receive_nowait())
                        except trio.WouldBlock:
                            break
                    events = [e for e in batch if not e.get("remote")]
                    if not events:
                        continue
                    payloads = self._encode(events)
                    try:
                        await trio.to_thread.run_sync(self._notify, payloads)
                        self.sent += len(events)
                        self.notifies += len(payloads)
                    except Exception as exc:
                        log.warning("cluster feed: %d events not sent: %s", len(events), exc)
            except (trio.EndOfChannel, trio.ClosedResourceError):
                log.warning("cluster feed: fell behind the bus; events were skipped")
            finally:
                bus.close(sub)

    # -- in -----------------------------------------------------------------------------------
    def _deliver(self, payload: str) -> None:
        try:
            doc = json.loads(payload)
            origin = doc["o"]
            events = doc["e"]
        except (ValueError, KeyError, TypeError):
            self.bad += 1
            return
        if origin == self.origin or not isinstance(events, list):
            return
        bus = self.engine.bus
        for ev in events:
            if not isinstance(ev, dict) or "kind" not in ev:
                self.bad += 1
                continue
            ev["remote"] = origin
            self.received += 1
            bus.publish(ev)

    def _listen(self, token: trio.lowlevel.TrioToken, stop: threading.Event) -> None:
        conn = self.store.listen(self.channel)
        try:
            while not stop.is_set():
                for note in conn.notifies(timeout=0.5):
                    try:
                        trio.from_thread.run_sync(self._deliver, note.payload, trio_token=token)
                    except trio.RunFinishedError:
                        return
                    if stop.is_set():
                        return
        finally:
            conn.close()

    async def _in(self, task_status: trio.TaskStatus[None]) -> None:
        stop = threading.Event()
        token = trio.lowlevel.current_trio_token()
        ready = False
        try:
            while True:
                try:
                    # the LISTEN is up once the thread runs; report ready after the first try
                    if not ready:
                        ready = True
                        task_status.started()
                    await trio.to_thread.run_sync(
                        self._listen, token, stop, abandon_on_cancel=True
                    )
                except Exception as exc:
                    log.warning("cluster feed: listening failed (%s); again in 1 s", exc)
                await trio.sleep(1.0)
        finally:
            stop.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._out)
                await nursery.start(self._in)
                task_status.started()
        finally:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

    def stats(self) -> dict[str, int]:
        return {
            "sent": self.sent,
            "received": self.received,
            "notifies": self.notifies,
            "bad": self.bad,
        }
