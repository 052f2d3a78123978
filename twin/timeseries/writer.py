"""The batched Trio writer: every reading reaches the store through here.

::

    producers ──write()/write_many()──▶ bounded memory channel (chunks) ──▶ run() ──▶ store
                                                                         (worker thread)

* **Bounded.** The channel holds at most ``max_chunks`` chunks of at most ``batch_size``
  points; ``run`` holds at most one batch being built plus the one being written. So memory
  is bounded by ``(max_chunks + 2) * batch_size`` points. When the store is slower than the
  producers the channel fills and ``write`` blocks: backpressure, never an unbounded queue.
* **Flush by size and by time.** A batch is written when it reaches ``batch_size`` points, or
  ``flush_interval`` seconds after its first point arrived, whichever comes first.
* **Store calls run in a worker thread** (``trio.to_thread.run_sync``), one at a time.
* **Clean shutdown** (``aclose()``, or cancelling ``run``): the channel is closed, drained
  and the last batch written before ``run`` returns, so every point whose ``write``
  returned is on disk.
* **Crash loss window.** After ``kill -9`` the points lost are those accepted since the last
  completed flush: at most ``flush_interval`` seconds of data plus the time of the flush in
  progress (and whatever producers were blocked on). ``on_flush`` is called after each
  completed flush with the number of points written; tests use it to prove the bound.
* **Write-ahead log positions.** ``write_many(..., wal_pos=lsn)`` marks a chunk as the WAL's
  records up to ``lsn`` (the time-series service feeds them in LSN order); after a flush,
  ``wal_flushed`` is the highest such position written (every earlier one is in the same or
  an earlier flush: the channel is FIFO), read by ``on_flush`` to checkpoint the log.
* **Store errors** (e.g. ``StorageError`` on a full disk) are logged loudly and the batch is
  retried with backoff; meanwhile the channel fills and producers block, so nothing is
  dropped silently, and writing resumes when space returns.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import trio

from twin.errors import StorageError
from twin.timeseries.base import DataPoint, Record, storable

if TYPE_CHECKING:
    from twin.timeseries.base import TimeSeriesStore

log = logging.getLogger(__name__)


class BatchedWriter:
    def __init__(
        self,
        store: TimeSeriesStore,
        *,
        batch_size: int = 10_000,
        flush_interval: float = 1.0,
        max_chunks: int = 16,
        retry_max_delay: float = 30.0,
        on_flush: Callable[[int], Any] | None = None,
        run_sync: Callable[..., Awaitable[Any]] | None = None,
    ) -> None:
        if batch_size < 1 or flush_interval <= 0 or max_chunks < 1:
            raise ValueError("batch_size, flush_interval and max_chunks must be positive")
        self.store = store
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.retry_max_delay = retry_max_delay
        self.on_flush = on_flush
        # how store calls are made: a worker thread (tests may run them inline)
        self._run_sync = run_sync or trio.to_thread.run_sync
        self._send, self._recv = trio.open_memory_channel[tuple[list[Record], int]](max_chunks)
        self._done = trio.Event()
        self.points_written = 0
        self.flushes = 0
        self.errors = 0
        self.wal_flushed = 0
        self.dropped = 0  # records no store can hold (see base.storable), counted and skipped

    # --- producer side --------------------------------------------------------------
    async def write(self, item: Record | DataPoint) -> None:
        """Accept one reading record or DataPoint; blocks while the writer is full."""
        recs = item.records() if isinstance(item, DataPoint) else [item]
        await self._send.send((recs, 0))

    async def write_many(self, items: Iterable[Record | DataPoint], *, wal_pos: int = 0) -> None:
        """Accept many; ``wal_pos``: these are the write-ahead log's records up to that LSN."""
        chunk: list[Record] = []
        for item in items:
            if isinstance(item, DataPoint):
                chunk.extend(item.records())
            else:
                chunk.append(item)
            if len(chunk) >= self.batch_size:
                await self._send.send((chunk, 0))
                chunk = []
        if chunk or wal_pos:
            await self._send.send((chunk, wal_pos))

    async def write_reading(
        self,
        device: str,
        point: str,
        value: Any,
        ts: float,
        quality: int = 0,
        *,
        site: str = "",
        group: str = "",
        tags: str = ",",
    ) -> None:
        """The runtime's shape: ``Reading(device, point, value, ts, quality)`` + device tags
        (``tags`` canonical, see ``base.canonical_tags``)."""
        await self._send.send(([(device, point, value, ts, quality, site, group, tags)], 0))

    async def aclose(self) -> None:
        """Stop accepting, then wait until everything accepted is on disk."""
        await self._send.aclose()
        await self._done.wait()

    # --- consumer side --------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        buf: list[Record] = []
        pos = 0  # highest WAL position in buf
        deadline = math.inf
        try:
            async with self._recv:
                while True:
                    with trio.move_on_at(deadline):
                        try:
                            chunk, chunk_pos = await self._recv.receive()
                        except trio.EndOfChannel:
                            break
                        if not buf and not pos:
                            deadline = trio.current_time() + self.flush_interval
                        buf.extend(chunk)
                        pos = max(pos, chunk_pos)
                        if len(buf) < self.batch_size:
                            continue
                    # size reached or deadline passed
                    await self._flush(buf, pos=pos)
                    buf, pos = [], 0
                    deadline = math.inf
        finally:
            # clean shutdown or cancellation: drain what was accepted and write it
            with trio.CancelScope(shield=True):
                while True:
                    try:
                        chunk, chunk_pos = self._recv.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                        break
                    buf.extend(chunk)
                    pos = max(pos, chunk_pos)
                if buf or pos:
                    await self._flush(buf, final=True, pos=pos)
                self._done.set()

    async def _flush(self, buf: Sequence[Record], final: bool = False, pos: int = 0) -> None:
        delay = 0.1
        attempts = 0
        for start in range(0, len(buf), self.batch_size):
            part = buf[start : start + self.batch_size]
            good = storable(part)
            if len(good) != len(part):
                kept = {id(g) for g in good}
                self.dropped += len(part) - len(good)
                log.error(
                    "timeseries: %d record(s) no store can hold dropped (%d so far); first: %s",
                    len(part) - len(good),
                    self.dropped,
                    _describe(next(r for r in part if id(r) not in kept)),
                )
            while good:
                try:
                    await self._run_sync(self.store.write_records, good)
                    break
                except StorageError as exc:
                    self.errors += 1
                    attempts += 1
                    log.error(
                        "timeseries: write of %d points failed: %s; retrying in %.1fs",
                        len(part),
                        exc,
                        delay,
                    )
                    if final and attempts >= 5:
                        log.critical(
                            "timeseries: giving up at shutdown: %d points not stored",
                            len(buf) - start,
                        )
                        raise
                    await trio.sleep(delay)
                    delay = min(delay * 2, self.retry_max_delay)
            self.points_written += len(part)
        self.flushes += 1
        self.wal_flushed = max(self.wal_flushed, pos)
        if self.on_flush is not None:
            self.on_flush(len(buf))


def _describe(record: Record) -> str:
    """One record for a log line (a value of 400 digits is not printed whole)."""
    value = record[2]
    text = repr(value) if not isinstance(value, int) or value.bit_length() <= 64 else "<big int>"
    return f"device {record[0]!r} point {record[1]!r} value {text[:80]} ts {record[3]!r:.40}"


class Maintainer:
    """Store maintenance off the write path (LanceDB: clustering, compaction, index refresh,
    old-version cleanup; see ``lance.py``): ``store.maintain()`` in a worker thread, when
    the store says it is due (``maintenance_due()``, checked after every flush through
    ``poke``) and at least every ``interval`` seconds for tables with a few appends only.

    ``BatchedWriter(on_flush=...)`` calls ``poke``; the time-series service and the
    benchmark run ``run`` beside the writer, so flushes never wait for a rewrite. Stores
    without ``maintenance_due`` (PostgreSQL) need nothing here: ``run`` returns at once.
    Errors are logged and counted; the next trigger tries again. Cancelling ``run`` waits
    for a maintenance in progress to finish (its commit is atomic either way)."""

    def __init__(
        self,
        store: Any,
        *,
        interval: float = 60.0,
        run_sync: Callable[..., Awaitable[Any]] | None = None,
    ) -> None:
        self.store = store
        self.interval = interval
        self._due = getattr(store, "maintenance_due", None)
        self._run_sync = run_sync or trio.to_thread.run_sync
        self._wake = trio.Event()
        self.runs = 0
        self.errors = 0
        self.seconds = 0.0
        self.running = False

    @property
    def supported(self) -> bool:
        return self._due is not None

    def poke(self) -> None:
        """After a flush: wake ``run`` if the store has enough appends pending."""
        if self._due is not None and not self.running and self._due():
            self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        if self._due is None:
            return
        while True:
            with trio.move_on_after(self.interval):
                await self._wake.wait()
            self._wake = trio.Event()
            await self.run_once()

    async def run_once(self) -> None:
        t0 = trio.current_time()
        self.running = True
        try:
            await self._run_sync(self.store.maintain)
            self.runs += 1
        except Exception:
            self.errors += 1
            log.exception("timeseries: background maintenance failed")
        finally:
            self.running = False
            self.seconds += trio.current_time() - t0
