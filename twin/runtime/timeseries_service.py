"""The time-series engine service: readings → one ``BatchedWriter`` → the store; retention.

``Engine(..., services=[TimeSeriesService()])`` (``twin up`` adds it unless ``--no-timeseries``)::

    timeseries
    ├─ pump        bus subscription (kind "reading") → records with the device's tags → writer
    ├─ writer      BatchedWriter: flush by size / time, bounded, store calls in a worker thread
    ├─ rollup      RetentionManager.downsample as soon as a window of any tier closes
    │              (+ ``rollup_lateness``), after the writer has flushed every reading
    │              accepted until then
    ├─ maintenance Maintainer: store maintenance (LanceDB clustering, compaction, index
    │              refresh, version cleanup) in a worker thread beside the writer, when
    │              the store says it is due (checked after every flush) or every
    │              ``maintenance_interval``; flushes never wait for a rewrite
    ├─ retention   expiry + compaction every ``retention_interval`` (slow cadence); the
    │              manager is built from the running revision's ``kind: RetentionPolicy``
    │              documents and rebuilt when they change (hot reload)
    └─ monitor     StorageMonitor → Prometheus gauges on /metrics, disk-nearly-full alarm

Store: LanceDB in ``<state_dir>/timeseries`` by default; ``url`` (or ``$TWIN_TIMESERIES``)
``postgresql://...`` selects PostgreSQL (see ``twin.timeseries.factory``).

Tags: each row carries the device's ``site`` and ``group`` (``metadata.group``) and one
canonical tag string from ``metadata.tags`` and ``metadata.labels`` (``",critical,floor=1,hvac,"``),
read from the device spec of the running revision (cached per revision).

Backpressure: the bus never blocks the engine and drops a subscriber whose buffer is full.
The pump uses a large buffer and moves readings into the writer in chunks; if the store is so
slow that the buffer still overflows, the pump logs it, counts the readings as lost
(``twin_timeseries_lost_subscriptions_total``) and resubscribes: the engine stays up.

Disk-nearly-full alarm: raised through ``registry.raise_alarm`` on the pseudo device
``_storage`` with type ``disk_nearly_full`` (severity ``major``) when the store reports less
than its free-space threshold (LanceDB: 5 % of the disk or twice ``min_free_bytes``), and
cleared automatically when space returns. Writes are refused below ``min_free_bytes`` and the
writer retries them (producers block) until space returns.

Rollup lag: at start-up (catching up after downtime) and after a policy change the rollup
loop runs at once; then a window ``[t, t+res)`` closes at ``t+res`` and the loop sleeps until
``t+res+rollup_lateness`` (``RetentionManager.next_due``) so that readings stamped inside the
window have reached the pump, then waits until the writer has stored every reading the pump
had accepted at that moment (a flush barrier on ``points_written``; it waits as long as the
store refuses writes, e.g. on a full disk, rather than rolling up a window with holes), then
rolls up. Readings that arrive later than that (a device clock far behind, store-and-forward
replays) are in raw but not in the tier. Per (policy, tier) the storage stats
(``GET /api/v1/timeseries/storage`` → ``rollup``) and /metrics report the watermark, its age
(``now - watermark``: ``twin_timeseries_rollup_watermark_age_seconds``) and the lag proper,
how long the oldest closed window has waited (``twin_timeseries_rollup_lag_seconds``), computed
at scrape time. ``benchmarks/timeseries/rollup_lag.py`` measures it.

Write-ahead log (``twin/timeseries/wal.py``, files in ``<state_dir>/wal/``): the ingest edges
call :meth:`TimeSeriesService.log_readings` before they acknowledge (HTTP 2xx; the embedded
broker's PUBACK/PUBREC through the hook ``twin/runtime/mqtt_service.py`` installs), so an
acknowledged reading survives ``kill -9``. This service owns the log:

* **Replay** at start, before the service reports ready (so before any device runs): every
  record above the checkpoint goes to the writer, then the service waits (up to
  ``replay_wait`` s) until it is flushed and checkpointed.
* **Feed**: each committed batch goes to the writer in LSN order (``wal_pos``); those readings
  reach the bus marked ``"logged": true`` and the pump's subscription does not take them
  (``Filter.unlogged``: stored once, not twice, and not queued for nothing).
* **Truncate**: after each flush the writer reports the highest WAL position it stored; the
  checkpointer records it durably and the log drops the segments below it.
* **Duplicates**: a crash between a store write and its checkpoint replays readings the store
  already has. Replay first reads the store over the replayed time range and skips readings
  whose (device, point, timestamp to the microsecond) is already there: a reading is stored
  once. (A device sending two readings with the same point and timestamp keeps both, except
  when one of them is replayed after a crash.)
* **Refusals**: disk full → ``WalFull`` (HTTP 507, MQTT 0x97), other write errors →
  ``WalError`` (503); either raises the alarm ``wal_write_failed`` (critical) on
  ``_storage``, cleared by the next successful commit. More than ``wal_max_backlog`` readings
  logged but not yet stored (the store is down or slow) → ``WalBusy`` (503 + Retry-After):
  the log and the memory behind it stay bounded, the devices retry.
* Without this service (``twin up --no-timeseries``) nothing is stored, and ingest is
  acknowledged without a log.

``engine.service_info["timeseries"]`` is this object: the API and CLI use ``.store``.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from twin.bindings.values import check_ts, is_safe
from twin.errors import StorageError
from twin.runtime.bus import Filter, Subscription
from twin.timeseries.base import Quality, Record, Selector, TimeSeriesStore, canonical_tags
from twin.timeseries.factory import describe, open_store
from twin.timeseries.retention import RetentionManager, RetentionPolicy, StorageMonitor
from twin.timeseries.wal import Entry, WalReading, WriteAheadLog
from twin.timeseries.writer import BatchedWriter, Maintainer

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from twin.runtime.engine import Engine

log = logging.getLogger(__name__)

STORAGE_DEVICE = "_storage"
"""Pseudo device of storage alarms (``GET /api/v1/alarms?device=_storage``)."""
DISK_ALARM = "disk_nearly_full"
WAL_ALARM = "wal_write_failed"

_QUALITY = {q.name.lower(): int(q) for q in Quality}
_PLAIN_VALUES = frozenset({float, int, bool, str, type(None)})
_READINGS = Filter.of(kinds=["reading"], unlogged=True)
"""The pump's subscription: readings not in the write-ahead log (those come from the log;
the bus does not even queue them for the pump)."""


class _Prom:
    """Time-series gauges on the engine's Prometheus registry (served on /metrics)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter, Gauge

        r = registry
        self.points = Gauge(
            "twin_timeseries_points", "Stored points per tier", ["tier"], registry=r
        )
        self.bytes = Gauge("twin_timeseries_bytes", "Bytes on disk per tier", ["tier"], registry=r)
        self.bytes_per_point = Gauge(
            "twin_timeseries_bytes_per_point", "Bytes per stored point, all tiers", registry=r
        )
        self.free = Gauge(
            "twin_timeseries_free_bytes", "Free bytes on the store's disk (-1 unknown)", registry=r
        )
        self.nearly_full = Gauge(
            "twin_timeseries_disk_nearly_full", "1 when the store's disk is nearly full", registry=r
        )
        self.growth = Gauge(
            "twin_timeseries_growth_bytes_per_second", "Store growth rate", registry=r
        )
        self.written = Counter(
            "twin_timeseries_points_written", "Points written by the batched writer", registry=r
        )
        self.write_errors = Gauge(
            "twin_timeseries_write_errors", "Failed store writes (retried)", registry=r
        )
        self.lost = Counter(
            "twin_timeseries_lost_subscriptions",
            "Times the writer fell behind the bus and was resubscribed",
            registry=r,
        )
        self.passes = Counter(
            "twin_timeseries_retention_passes", "Retention passes", ["result"], registry=r
        )
        self.rollups = Counter(
            "twin_timeseries_rollups", "Rollup (downsampling) runs", ["result"], registry=r
        )


class _LagCollector:
    """Rollup lag per (policy, tier), computed when /metrics is scraped."""

    def __init__(self, service: TimeSeriesService) -> None:
        self.service = service

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        lag = GaugeMetricFamily(
            "twin_timeseries_rollup_lag_seconds",
            "How long the oldest closed window not rolled up yet has been closed (0: current)",
            labels=["policy", "tier"],
        )
        age = GaugeMetricFamily(
            "twin_timeseries_rollup_watermark_age_seconds",
            "now minus the tier's watermark (includes the open window)",
            labels=["policy", "tier"],
        )
        for t in self.service.rollup_lags():
            if t["lag_s"] is not None:
                lag.add_metric([t["policy"], t["tier"]], t["lag_s"])
                age.add_metric([t["policy"], t["tier"]], t["watermark_age_s"])
        yield lag
        yield age


@dataclass
class TimeSeriesService:
    """Engine service; see the module docstring. ``store`` may be injected (tests)."""

    url: str | None = None
    store: TimeSeriesStore | None = None
    batch_size: int = 10_000
    flush_interval: float = 1.0
    max_chunks: int = 16
    bus_buffer: int = 20_000
    retention_interval: float = 60.0
    """Expiry and compaction cadence (rollup has its own prompt loop)."""
    rollup_lateness: float = 5.0
    """Seconds after a window closes before it is rolled up (readings in flight)."""
    rollup_retry: float = 5.0
    """Delay before retrying a failed rollup."""
    monitor_interval: float = 30.0
    maintenance_interval: float = 60.0
    """Background maintenance at least this often (tables with a few appends only)."""
    policy_check_interval: float = 0.5
    store_options: dict[str, Any] = field(default_factory=dict)
    wal_enabled: bool = True
    """Write-ahead log for acknowledged readings (False: ingest acks are not durable)."""
    wal_max_backlog: int = 500_000
    """Readings logged but not yet in the store before ingest is refused (503)."""
    wal_segment_bytes: int = 4 << 20
    ack_backlog: int | None = None
    """Back-pressure for the embedded MQTT broker: while more readings than this (default
    twice ``batch_size``) are logged but not yet in the store, QoS >= 1 acknowledgements are
    held (:meth:`caught_up`): a device's window of un-acked messages fills and it slows down
    to what the store takes, instead of the publish → queryable lag growing without bound
    (up to ``wal_max_backlog``, where publishes are refused). 0: acknowledge at once."""
    ack_hold_max: float = 10.0
    """Longest an acknowledgement is held for back-pressure (the readings are durable: a
    store that is down must not stall every device's session forever)."""
    replay_wait: float = 30.0
    name: str = "timeseries"

    writer: BatchedWriter | None = field(default=None, init=False)
    maintainer: Maintainer | None = field(default=None, init=False)
    retention: RetentionManager | None = field(default=None, init=False)
    policies: dict[str, Mapping[str, Any]] = field(default_factory=dict, init=False)
    last_report: dict[str, Any] | None = field(default=None, init=False)
    last_pass: dict[str, Any] | None = field(default=None, init=False)
    last_rollup: dict[str, Any] | None = field(default=None, init=False)
    accepted: int = field(default=0, init=False)
    """Readings the pump handed to the writer (the rollup's flush barrier)."""
    wal: WriteAheadLog | None = field(default=None, init=False)
    replayed: int = field(default=0, init=False)
    acks_held: int = field(default=0, init=False)
    """Acknowledgements held for back-pressure (:meth:`caught_up`)."""
    """Readings replayed from the write-ahead log at start (duplicates skipped)."""
    append_hook: Callable[[list[WalReading], Callable[[], Any]], Any] | None = field(
        default=None, init=False, repr=False
    )
    """Edge mode (``twin/edge/agent.py``): ``append_hook(rows, append)`` logs the rows in the
    outbox too and returns the batch to wait on (both durable before the ingest's ack)."""
    _wal_queue: deque[Entry] = field(default_factory=deque, init=False, repr=False)
    _wal_wake: trio.Event = field(default_factory=trio.Event, init=False, repr=False)
    _cp_wake: trio.Event = field(default_factory=trio.Event, init=False, repr=False)
    description: str = field(default="", init=False)
    _engine: Engine | None = field(default=None, init=False, repr=False)
    _prom: _Prom | None = field(default=None, init=False, repr=False)
    _tags: dict[str, tuple[str, str, str]] = field(default_factory=dict, init=False, repr=False)
    _tags_rev: int = field(default=-1, init=False, repr=False)
    _alarm_raised: bool | None = field(default=None, init=False, repr=False)
    _pass_lock: trio.Lock = field(default_factory=trio.Lock, init=False, repr=False)
    _policies_changed: trio.Event = field(default_factory=trio.Event, init=False, repr=False)
    _rollup_wake: trio.Event = field(default_factory=trio.Event, init=False, repr=False)
    _flushed: trio.Event = field(default_factory=trio.Event, init=False, repr=False)
    _caught_up: trio.Event = field(default_factory=trio.Event, init=False, repr=False)

    # --- service entry ------------------------------------------------------------------
    async def __call__(
        self, engine: Engine, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self._engine = engine
        state_dir = engine.config.state_dir
        # subscribe first: readings published while the store opens are buffered, not lost
        sub = engine.bus.open(_READINGS, buffer=self.bus_buffer, name="timeseries")
        owned = self.store is None
        if self.store is None:
            self.store = await trio.to_thread.run_sync(
                lambda: open_store(self.url, state_dir, **self.store_options)
            )
        store = self.store
        self.description = describe(self.url, state_dir) if owned else type(store).__name__
        if self._prom is None:  # once per engine: a restart by the supervisor reuses them
            self._prom = _Prom(engine.prom.registry)
            engine.prom.registry.register(_LagCollector(self))
        prom = self._prom

        self.maintainer = maintainer = Maintainer(store, interval=self.maintenance_interval)

        def flushed(n: int) -> None:
            prom.written.inc(n)
            self._flushed.set()
            self._cp_wake.set()
            maintainer.poke()

        self.writer = BatchedWriter(
            store,
            batch_size=self.batch_size,
            flush_interval=self.flush_interval,
            max_chunks=self.max_chunks,
            on_flush=flushed,
        )
        monitor = StorageMonitor(store)
        replay: list[Entry] = []
        if self.wal_enabled:
            self.wal = WriteAheadLog(
                state_dir / "wal",
                segment_bytes=self.wal_segment_bytes,
                max_backlog=self.wal_max_backlog,
                on_commit=self._wal_committed,
                on_state=self._wal_state,
            )
            replay = await trio.to_thread.run_sync(self.wal.open)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.writer.run)
                if self.wal is not None:
                    await self._replay(replay)
                    nursery.start_soon(self._checkpointer)
                    await nursery.start(self.wal.run)
                    nursery.start_soon(self._feed)
                await self._load_policies()
                nursery.start_soon(self._pump, sub)
                nursery.start_soon(self._watch_policies)
                nursery.start_soon(self._rollup_loop)
                nursery.start_soon(self._retention_loop)
                nursery.start_soon(self._monitor_loop, monitor)
                nursery.start_soon(maintainer.run)
                log.info("timeseries: storing readings in %s", self.description)
                task_status.started(self)
        finally:
            engine.bus.close(sub)
            # the writer's own finally has drained and flushed everything accepted
            with trio.move_on_after(10) as scope:
                scope.shield = True
                if self.wal is not None and self.writer.wal_flushed:
                    try:
                        await self.wal.checkpoint(self.writer.wal_flushed)
                    except OSError as exc:  # replay (deduplicated) covers it next start
                        log.warning("timeseries: final WAL checkpoint failed: %s", exc)
                if owned:
                    await trio.to_thread.run_sync(store.close)
                    self.store = None  # a restart (supervisor) opens it again

    # --- readings -----------------------------------------------------------------------
    def _device_tags(self, device: str) -> tuple[str, str, str]:
        engine = self._engine
        assert engine is not None
        if self._tags_rev != engine.revision_number:
            self._tags.clear()
            self._tags_rev = engine.revision_number
        hit = self._tags.get(device)
        if hit is None:
            doc = engine.device_doc(device) or {}
            meta = doc.get("metadata") or {}
            try:
                tags = canonical_tags(meta.get("tags") or (), meta.get("labels") or {})
            except ValueError:
                log.warning("timeseries: device %s has a tag with a comma; tags dropped", device)
                tags = ","
            hit = (str(meta.get("site") or ""), str(meta.get("group") or ""), tags)
            self._tags[device] = hit
        return hit

    def record(self, event: Mapping[str, Any]) -> Record:
        """A bus ``reading`` event as a store record with the device's tags."""
        device = str(event["device"])
        site, group, tags = self._device_tags(device)
        q = event.get("quality", "good")
        quality = _QUALITY.get(q, 0) if isinstance(q, str) else int(Quality.parse(q))
        value = event["value"]
        if not is_safe(value):  # the edges refuse these; never let one fail a whole batch
            raise ValueError(f"point {event.get('point')!r}: value refused")
        if value is not None and not isinstance(value, bool | int | float | str):
            value = str(value)
        return (
            device,
            str(event["point"]),
            value,
            check_ts(event["ts"]),
            quality,
            site or str(event.get("site") or ""),
            group,
            tags,
        )

    def record_of(self, r: Sequence[Any]) -> Record:
        """A write-ahead log reading ``(device, point, value, ts, quality)`` as a record (what
        :meth:`record` makes of the same reading's bus event)."""
        device, point, value, ts, q = r
        site, group, tags = self._device_tags(device)
        quality = _QUALITY.get(q, 0) if isinstance(q, str) else int(Quality.parse(q))
        if value is not None and not isinstance(value, bool | int | float | str):
            value = str(value)
        return (str(device), str(point), value, float(ts), quality, site, group, tags)

    def records_of(self, readings: Sequence[Sequence[Any]], out: list[Record]) -> None:
        """:meth:`record_of` for one write-ahead log record's readings, appended to ``out``:
        the device's tags looked up once per run of readings of the same device (a record is
        usually one message of one device) and plain types passed through without a call
        each (``record_of`` per reading was ~10 % of the engine's samples under MQTT load).
        A reading that does not convert is logged and skipped, the others kept."""
        start = len(out)
        quality_of = _QUALITY.get
        last: Any = None
        site = group = tags = ""
        try:
            for device, point, value, ts, q in readings:
                if device != last:
                    site, group, tags = self._device_tags(device)
                    last = device
                if type(value) not in _PLAIN_VALUES and not isinstance(
                    value, bool | int | float | str
                ):
                    value = str(value)
                out.append((
                    device if type(device) is str else str(device),
                    point if type(point) is str else str(point),
                    value,
                    ts if type(ts) is float else float(ts),
                    quality_of(q, 0) if isinstance(q, str) else int(Quality.parse(q)),
                    site,
                    group,
                    tags,
                ))  # fmt: skip
        except (KeyError, TypeError, ValueError, IndexError):
            del out[start:]  # again reading by reading: log the bad ones, keep the rest
            for r in readings:
                try:
                    out.append(self.record_of(r))
                except (KeyError, TypeError, ValueError, IndexError) as exc:
                    log.warning("timeseries: bad WAL reading %r: %s", r, exc)

    # --- write-ahead log ----------------------------------------------------------------
    async def log_readings(self, readings: Sequence[Any]) -> bool:
        """Log ``Reading``s durably (group commit) before an edge acknowledges them.

        Returns False when there is no log (nothing to do); raises ``WalError`` (``WalFull``,
        ``WalBusy``) when they cannot be logged: the edge must refuse them. Readings without
        a value are not stored and not logged."""
        wal = self.wal
        if wal is None:
            return False
        batch = self.append_readings(readings)
        if batch is not None:
            await wal.commit(batch)
        return True

    def append_readings(self, readings: Sequence[Any]) -> Any:
        """The synchronous half of :meth:`log_readings`: append to the log's pending batch
        and return it (``await self.wal.commit(batch)`` waits for the disk), or None when
        there is nothing to log. Raises ``WalError`` (``WalBusy``) like ``log_readings``."""
        wal = self.wal
        rows: list[WalReading] = [
            (r.device, r.point, r.value, float(r.ts), str(r.quality))
            for r in readings
            if r.value is not None
        ]
        if wal is None or not rows:
            return None
        if self.append_hook is not None:  # edge mode: the outbox too (twin/edge/agent.py)
            return self.append_hook(rows, lambda: wal.append(rows)[1])
        return wal.append(rows)[1]

    def _wal_committed(self, entries: list[Entry]) -> None:
        self._wal_queue.extend(entries)
        self._wal_wake.set()

    async def _feed(self) -> None:
        """Committed records → writer, in LSN order (one task: the order is the truncation's)."""
        writer = self.writer
        assert writer is not None
        while True:
            await self._wal_wake.wait()
            self._wal_wake = trio.Event()
            queue = self._wal_queue
            while queue:
                chunk: list[Record] = []
                last = 0
                while queue and len(chunk) < self.batch_size:
                    lsn, readings = queue.popleft()
                    last = lsn
                    self.records_of(readings, chunk)
                await writer.write_many(chunk, wal_pos=last)
                self.accepted += len(chunk)

    async def _replay(self, entries: list[Entry]) -> None:
        """Write-ahead log records above the checkpoint → the store (duplicates skipped)."""
        wal, writer, store = self.wal, self.writer, self.store
        assert wal is not None and writer is not None and store is not None
        if not entries:
            return
        records: list[Record] = []
        for _lsn, readings in entries:
            self.records_of(readings, records)
        try:
            fresh = await trio.to_thread.run_sync(_not_stored, store, records)
        except StorageError as exc:
            log.warning("timeseries: WAL replay cannot check for duplicates (%s)", exc)
            fresh = records
        last = entries[-1][0]
        await writer.write_many(fresh, wal_pos=last)
        self.accepted += len(fresh)
        self.replayed = len(fresh)
        log.info(
            "timeseries: replayed %d readings from the write-ahead log (%d already stored)",
            len(fresh),
            len(records) - len(fresh),
        )
        with trio.move_on_after(self.replay_wait):
            while wal.checkpointed < last:
                if writer.wal_flushed >= last:
                    await wal.checkpoint(writer.wal_flushed)
                    break
                self._flushed = trio.Event()
                await self._flushed.wait()

    async def _checkpointer(self) -> None:
        wal, writer = self.wal, self.writer
        assert wal is not None and writer is not None
        while True:
            await self._cp_wake.wait()
            self._cp_wake = trio.Event()
            if writer.wal_flushed > wal.checkpointed:
                try:
                    await wal.checkpoint(writer.wal_flushed)
                except OSError as exc:
                    log.error("timeseries: WAL checkpoint failed: %s; retrying", exc)
                    await trio.sleep(1.0)
                    self._cp_wake.set()
                    continue
                # the backlog shrank: held acknowledgements look again (see caught_up)
                self._caught_up.set()
                self._caught_up = trio.Event()

    def behind(self) -> bool:
        """More readings logged and not yet in the store than ``ack_backlog``."""
        wal = self.wal
        limit = 2 * self.batch_size if self.ack_backlog is None else self.ack_backlog
        return wal is not None and limit > 0 and wal.backlog > limit

    async def caught_up(self) -> bool:
        """Wait while the store is :meth:`behind` (at most ``ack_hold_max`` seconds): an
        ingest edge holds its acknowledgement here, after the readings are durable, so its
        peers slow down to the store's pace. Returns whether it had to wait."""
        if not self.behind():
            return False
        self.acks_held += 1
        with trio.move_on_after(self.ack_hold_max):
            while self.behind():
                await self._caught_up.wait()
        return True

    def _wal_state(self, ok: bool, message: str) -> None:
        engine = self._engine
        assert engine is not None
        now = time.time()
        if not ok:
            engine.writer.put(
                lambda r: r.raise_alarm(STORAGE_DEVICE, WAL_ALARM, "critical", message, now),
                lambda res: self._publish_alarm("raised", res[0]) if res[1] else None,
            )
            return

        def cleared(alarms: list[Any]) -> None:
            for a in alarms:
                self._publish_alarm("cleared", a)

        engine.writer.put(
            lambda r: r.clear_alarms(STORAGE_DEVICE, WAL_ALARM, "system", now), cleared
        )

    async def _pump(self, sub: Subscription) -> None:
        engine = self._engine
        writer = self.writer
        assert engine is not None and writer is not None and self._prom is not None
        try:
            while True:
                try:
                    first = await sub.receive.receive()
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    # the bus dropped us: we fell behind (store too slow); resubscribe
                    self._prom.lost.inc()
                    log.error(
                        "timeseries: writer fell behind the bus; readings were lost; resubscribing"
                    )
                    sub = engine.bus.open(_READINGS, buffer=self.bus_buffer, name="timeseries")
                    continue
                chunk: list[Record] = []
                event: dict[str, Any] | None = first
                while event is not None:
                    if (
                        event.get("value") is not None
                        and not event.get("logged")
                        and not event.get("remote")  # another engine's: it stored it
                    ):
                        try:
                            chunk.append(self.record(event))
                        except (KeyError, TypeError, ValueError, OverflowError) as exc:
                            engine.prom.dropped("timeseries")
                            log.warning(
                                "timeseries: reading of device %r skipped: %s",
                                event.get("device"),
                                exc,
                            )
                    if len(chunk) >= self.batch_size:
                        break
                    try:
                        event = sub.receive.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                        event = None
                if chunk:
                    await writer.write_many(chunk)
                    self.accepted += len(chunk)
        finally:
            engine.bus.close(sub)

    # --- retention ----------------------------------------------------------------------
    def _policy_docs(self) -> dict[str, Mapping[str, Any]]:
        engine = self._engine
        assert engine is not None
        return {n: d for (k, n), d in engine.specs.items() if k == "RetentionPolicy"}

    async def _load_policies(self) -> bool:
        """Rebuild the manager when the revision's RetentionPolicy documents changed."""
        docs = self._policy_docs()
        if docs == self.policies and (self.retention is not None or not docs):
            return False
        policies = []
        for name, doc in sorted(docs.items()):
            try:
                policies.append(RetentionPolicy.from_doc(doc))
            except ValueError as exc:  # validated at apply; keep the others running
                log.error("timeseries: RetentionPolicy %s ignored: %s", name, exc)
        store = self.store
        assert store is not None
        async with self._pass_lock:
            self.retention = (
                await trio.to_thread.run_sync(
                    lambda: RetentionManager(store, policies, lateness=self.rollup_lateness)
                )
                if policies
                else None
            )
        self.policies = dict(docs)
        log.info(
            "timeseries: retention policies %s",
            ", ".join(p.name for p in policies) if policies else "(none: raw kept forever)",
        )
        return True

    async def _watch_policies(self) -> None:
        rev = self._engine.revision_number if self._engine else 0
        while True:
            await trio.sleep(self.policy_check_interval)
            assert self._engine is not None
            if self._engine.revision_number == rev:
                continue
            rev = self._engine.revision_number
            try:
                if await self._load_policies():
                    self._policies_changed.set()
                    self._rollup_wake.set()
            except Exception:
                log.exception("timeseries: reloading retention policies failed")

    async def run_retention(
        self, now: float | None = None, *, rollup: bool = True, barrier_timeout: float = 10.0
    ) -> dict[str, Any] | None:
        """One retention pass now (API/CLI "run retention now": rollup, expiry, compaction;
        ``rollup=False``: the slow loop's expiry and compaction only). None without policies.

        The rollup first waits (up to ``barrier_timeout`` s) until every reading accepted so
        far is stored; if the writer cannot get there (the store refuses writes) the pass
        skips the rollup rather than roll up windows with readings missing, and says so
        (``rollup_skipped``)."""
        store = self.store
        assert store is not None and self._prom is not None
        skipped = None
        if rollup and self.writer is not None:
            with trio.move_on_after(barrier_timeout):
                await self.flush_barrier()
            if self.writer.points_written < self.accepted:
                rollup = False
                skipped = (
                    "the writer has not stored every accepted reading (store refusing writes?)"
                )
        async with self._pass_lock:
            mgr = self.retention
            if mgr is None:
                return None
            try:
                if rollup:
                    report = await trio.to_thread.run_sync(mgr.run_once, now)
                else:
                    report = await trio.to_thread.run_sync(mgr.expire_and_reclaim, now)
            except Exception:
                self._prom.passes.labels("error").inc()
                raise
        self._prom.passes.labels("ok").inc()
        self.last_pass = {
            "at": time.time(),
            "rolled_up": report.rolled_up,
            "expired": report.expired,
            "reclaimed_bytes": report.reclaimed_bytes,
            "seconds": report.seconds,
        }
        if skipped:
            self.last_pass["rollup_skipped"] = skipped
        return self.last_pass

    async def _our_job(self, name: str, seconds: float) -> bool:
        """A store several engines share (PostgreSQL) is maintained by one of them at a time
        (a fenced job lease, twin/runtime/cluster.py); a private store always by its engine."""
        if not str(self.url or "").startswith(("postgresql:", "postgres:")):
            return True
        engine = self._engine
        return engine is None or bool(await engine.ownership.job(f"timeseries:{name}", seconds))

    async def _retention_loop(self) -> None:
        while True:
            try:
                if await self._our_job("retention", 3 * self.retention_interval):
                    await self.run_retention(rollup=False)
            except Exception:
                log.exception("timeseries: retention pass failed; retrying next interval")
            with trio.move_on_after(self.retention_interval):
                await self._policies_changed.wait()
            self._policies_changed = trio.Event()

    # --- rollup -------------------------------------------------------------------------
    async def flush_barrier(self) -> None:
        """Wait until every reading the pump has accepted so far is in the store."""
        writer = self.writer
        assert writer is not None
        target = self.accepted
        waited = 0
        while writer.points_written < target:
            self._flushed = trio.Event()
            with trio.move_on_after(30) as scope:
                await self._flushed.wait()
            if scope.cancelled_caught:
                waited += 30
                log.warning(
                    "timeseries: rollup waits for the writer (%d of %d readings stored, %ds)",
                    writer.points_written,
                    target,
                    waited,
                )

    async def run_rollup(self, now: float | None = None) -> dict[str, int] | None:
        """Roll up every closed window now (what the rollup loop runs); None without
        policies. Callers that need every accepted reading included run ``flush_barrier``
        first."""
        assert self._prom is not None
        t0 = time.perf_counter()
        async with self._pass_lock:
            mgr = self.retention
            if mgr is None:
                return None
            try:
                written = await trio.to_thread.run_sync(mgr.downsample, now)
            except Exception:
                self._prom.rollups.labels("error").inc()
                raise
        self._prom.rollups.labels("ok").inc()
        self.last_rollup = {
            "at": time.time(),
            "rolled_up": written,
            "seconds": time.perf_counter() - t0,
        }
        return written

    def rollup_lags(self, now: float | None = None) -> list[dict[str, Any]]:
        """Watermark, watermark age and rollup lag per (policy, tier) of the running
        manager (see the module docstring); empty without policies."""
        mgr = self.retention
        return [t.as_dict() for t in mgr.lags(now)] if mgr is not None else []

    async def _rollup_loop(self) -> None:
        failed = ran = False
        while True:
            mgr = self.retention
            if mgr is None:
                delay = math.inf
            elif failed:  # the closed windows are still waiting: retry soon, not next window
                delay = self.rollup_retry
            else:  # due at once at start-up / after downtime, else when a window closes
                delay = max(mgr.next_due() - time.time(), 0.1 if ran else 0.0)
            if delay > 0:
                with trio.move_on_after(min(delay, 3600.0)):
                    await self._rollup_wake.wait()
                self._rollup_wake = trio.Event()
            if self.retention is None:
                continue
            await self.flush_barrier()
            ran = True
            if not await self._our_job("rollup", 60.0):
                await trio.sleep(self.rollup_retry)  # another engine rolls the shared store up
                continue
            try:
                await self.run_rollup()
                failed = False
            except Exception:
                log.exception("timeseries: rollup failed; retrying in %.0fs", self.rollup_retry)
                failed = True

    # --- monitoring ---------------------------------------------------------------------
    async def refresh_stats(self, monitor: StorageMonitor | None = None) -> dict[str, Any]:
        store = self.store
        assert store is not None and self._prom is not None
        mon = monitor or StorageMonitor(store)
        report = await trio.to_thread.run_sync(mon.report)
        writer = self.writer
        report["writer"] = (
            {
                "points_written": writer.points_written,
                "flushes": writer.flushes,
                "errors": writer.errors,
            }
            if writer
            else None
        )
        m = self.maintainer
        report["maintenance"] = (
            {"runs": m.runs, "errors": m.errors, "seconds": round(m.seconds, 3)}
            if m is not None and m.supported
            else None
        )
        report["wal"] = self.wal.stats() if self.wal is not None else None
        report["store"] = self.description
        report["policies"] = sorted(self.policies)
        report["skipped_policies"] = dict(self.retention.skipped) if self.retention else {}
        report["last_retention_pass"] = self.last_pass
        report["rollup"] = {
            "lateness_s": self.rollup_lateness,
            "tiers": self.rollup_lags(),
            "last": self.last_rollup,
        }
        self.last_report = report
        self._export(report)
        self._alarm(report)
        return report

    def _export(self, report: Mapping[str, Any]) -> None:
        p = self._prom
        assert p is not None
        for t in report["tiers"]:
            p.points.labels(t["tier"]).set(t["points"])
            p.bytes.labels(t["tier"]).set(t["bytes"])
        p.bytes_per_point.set(report["bytes_per_point"])
        p.free.set(report["free_bytes"])
        p.nearly_full.set(1 if report["disk_nearly_full"] else 0)
        if report.get("growth_bytes_per_s") is not None:
            p.growth.set(report["growth_bytes_per_s"])
        if self.writer is not None:
            p.write_errors.set(self.writer.errors)

    def _alarm(self, report: Mapping[str, Any]) -> None:
        engine = self._engine
        assert engine is not None
        full = bool(report["disk_nearly_full"])
        if full == self._alarm_raised:
            return
        first, self._alarm_raised = self._alarm_raised is None, full
        now = time.time()
        if full:
            msg = (
                f"time-series disk nearly full: {report['free_bytes']} bytes free "
                f"({self.description})"
            )
            log.warning("timeseries: %s", msg)
            engine.writer.put(
                lambda r: r.raise_alarm(STORAGE_DEVICE, DISK_ALARM, "major", msg, now),
                lambda res: self._publish_alarm("raised", res[0]) if res[1] else None,
            )
        else:
            if first:  # start-up: clear an alarm a previous run may have left active
                log.debug("timeseries: disk space ok; clearing any %s left active", DISK_ALARM)
            else:
                log.info("timeseries: disk space recovered; clearing %s", DISK_ALARM)

            def cleared(alarms: list[Any]) -> None:
                for a in alarms:
                    self._publish_alarm("cleared", a)

            engine.writer.put(
                lambda r: r.clear_alarms(STORAGE_DEVICE, DISK_ALARM, "system", now), cleared
            )

    def _publish_alarm(self, event: str, alarm: Any) -> None:
        from twin.runtime.monitor import alarm_json

        assert self._engine is not None
        self._engine.bus.publish(
            {
                "kind": "alarm",
                "device": STORAGE_DEVICE,
                "site": "",
                "groups": (),
                "ts": time.time(),
                "event": event,
                "alarm": alarm_json(alarm),
            }
        )

    async def _monitor_loop(self, monitor: StorageMonitor) -> None:
        while True:
            try:
                await self.refresh_stats(monitor)
            except Exception:
                log.exception("timeseries: storage stats failed")
            await trio.sleep(self.monitor_interval)


def _not_stored(store: TimeSeriesStore, records: list[Record]) -> list[Record]:
    """``records`` minus those whose (device, metric, ts in µs) the store already has."""
    if not records:
        return records
    devices = sorted({r[0] for r in records})
    lo = min(r[3] for r in records)
    hi = max(r[3] for r in records)
    table = store.read_raw(Selector.of(devices=devices), lo, hi + 0.001)
    if table.num_rows == 0:
        return records
    micros = table.column("ts").cast("int64").to_pylist()
    have = set(
        zip(
            table.column("device").to_pylist(),
            table.column("metric").to_pylist(),
            micros,
            strict=True,
        )
    )
    return [r for r in records if (r[0], r[1], round(r[3] * 1_000_000)) not in have]


def timeseries_of(engine: Engine) -> TimeSeriesService | None:
    """The engine's running time-series service, if any."""
    svc = engine.service_info.get("timeseries")
    return svc if isinstance(svc, TimeSeriesService) else None


__all__ = ["DISK_ALARM", "STORAGE_DEVICE", "WAL_ALARM", "TimeSeriesService", "timeseries_of"]
