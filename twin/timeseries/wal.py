"""The write-ahead log of readings: an acknowledgement means the reading is on disk.

An ingest edge (HTTP ``/api/v1/ingest``, the embedded MQTT broker's PUBACK/PUBREC) answers
its peer only after the readings are in this log and the log is fsynced. The time-series
service (``twin/runtime/timeseries_service.py``) owns the log: it replays it into the store at
engine start, before any device runs, feeds every committed record to the store's writer, and
truncates the log once the writer has flushed it (a durable checkpoint).

::

    ingest ──validate──▶ append() ──▶ pending batch ──▶ committer: write + fdatasync (thread)
                           │                                        │
                           └── await commit() ◀──── batch done ◀────┘──▶ on_commit(entries)
                                  │                                        │
                                 ack                      the service's feeder → writer → store
                                                                   │
                               checkpoint(lsn) ◀── writer flushed up to lsn

**Group commit.** ``append`` is synchronous: it encodes the record, gives it the next log
sequence number (LSN) and adds it to the pending batch. One committer thread writes the whole
pending batch with one ``write`` and one ``fdatasync``; everything appended while that runs
forms the next batch. So concurrent ingest calls share one fsync, and a lone call waits for
one fsync (no timer: the batch is as large as the load makes it). The thread goes from one
batch to the next without a hand-over; results come back to Trio in commit order.

**Files.** ``<state_dir>/wal/`` (0700): segments ``<first lsn, 20 digits>.wal`` (0600), each
starting with :data:`MAGIC`, then records::

    u32 payload length | u32 CRC-32 of (lsn + payload) | u64 lsn | payload

A payload is one append: a list of readings ``(device, point, value, ts, quality)``. Its
encoding is the segment's format, named by the magic's last byte: format 2 (``FLUXWAL\x02``,
written now) is the list in ``marshal`` version 4 (C speed both ways, values keep their type;
a value marshal cannot hold is logged as its ``str``, as JSON's ``default=str`` did); format 1
(``FLUXWAL\x01``, written before) is the list in compact JSON, still read, so a log left by an
older version replays (one segment never mixes formats: a new segment is started at every
open). Encoding a 10-reading record took 23 µs as JSON, 0.5 µs in marshal. A new
segment is started at every open (never appended to an old one) and when the current one
exceeds ``segment_bytes``; its directory entry is fsynced with the first batch. ``checkpoint``
holds the highest LSN the store has (written to a temporary file, fsynced, renamed, the
directory fsynced). Segments whose records are all at or below the checkpoint are deleted.

**Replay** (``open``): every record above the checkpoint, in LSN order. A record whose header
or CRC does not check out (a torn write at a crash, or corruption) ends the replay of its
segment: it is logged with its offset and the bytes after it are ignored; the next segment
(written by a later run) is replayed normally.

**Errors.** A failed write or fsync fails the whole batch (its callers get :class:`WalFull`
on ENOSPC, else :class:`WalError`) and nothing of it is acknowledged: the segment is cut back
to its size before the batch and closed, the next batch starts a new segment (after a failed
fsync the kernel may have dropped the dirty pages, so the file is not trusted further). If the
cut itself fails, the failed batch's records may still be replayed later: readings the client
was refused may then be stored (never the reverse). ``on_state(ok, message)`` reports the
transitions between failing and working (the service raises and clears an alarm).

**Bounded.** ``backlog`` counts readings appended but not yet checkpointed (in the log and in
memory on their way to the store). Above ``max_backlog`` ``append`` raises :class:`WalBusy`
(the ingest edge answers 503 with Retry-After): when the store is down, ingest is refused
rather than the log growing without bound.
"""

from __future__ import annotations

import errno
import json
import logging
import marshal
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from twin.errors import StorageError
from twin.files import private_dir
from twin.storage.segments import HEADER as HEADER  # the record header (tests read it)
from twin.storage.segments import frame, frames, fsync_dir, write_number

log = logging.getLogger(__name__)

MAGIC = b"FLUXWAL\x02"
"""What a segment written now starts with: format 2, marshal payloads."""
MAGIC_V1 = b"FLUXWAL\x01"
"""Format 1 (JSON payloads): read, no longer written."""
MARSHAL_VERSION = 4
SUFFIX = ".wal"
CHECKPOINT = "checkpoint"

WalReading = tuple[str, str, Any, float, str]
"""``(device, point, value, ts, quality)``: what a record holds per reading."""
Entry = tuple[int, list[WalReading]]
"""``(lsn, readings)``: one record."""


class WalError(StorageError):
    """The write-ahead log cannot take readings now (HTTP 503, MQTT 0x80)."""

    retry_after = 5


class WalFull(WalError):
    """No space left for the write-ahead log (HTTP 507, MQTT 0x97 quota exceeded)."""

    retry_after = 30


class WalBusy(WalError):
    """Too many readings not yet in the store (the store is slow or down): HTTP 503."""

    retry_after = 1


@dataclass(eq=False)
class _Batch:
    entries: list[Entry] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    readings: int = 0
    done: trio.Event = field(default_factory=trio.Event)
    error: WalError | None = None


_PLAIN = (str, float, int, bool, type(None))


def _plain(r: Sequence[Any]) -> WalReading:
    """A reading marshal can hold: exact built-in types, a value of another type as its str."""
    device, point, value, ts, quality = r
    if type(value) not in _PLAIN:
        value = str(value)
    return (str(device), str(point), value, float(ts), str(quality))


def encode_payload(readings: Sequence[WalReading]) -> bytes:
    """One record's payload in the current format (2: marshal)."""
    try:
        return marshal.dumps(readings if type(readings) is list else list(readings),
                             MARSHAL_VERSION)  # fmt: skip
    except ValueError:  # an object marshal cannot hold (a subclass, a datetime...)
        return marshal.dumps([_plain(r) for r in readings], MARSHAL_VERSION)


def decode_payload(payload: bytes, fmt: int) -> list[WalReading]:
    """One record's readings; raises ValueError when the payload does not decode."""
    try:
        if fmt == 1:
            return [tuple(r) for r in json.loads(payload)]
        rows = marshal.loads(payload)
    except (ValueError, TypeError, EOFError) as exc:
        raise ValueError(str(exc)) from None
    if type(rows) is not list:
        raise ValueError(f"a record holds {type(rows).__name__}, not a list")
    return rows


def encode(lsn: int, readings: Sequence[WalReading]) -> bytes:
    return frame(lsn, encode_payload(readings))


def read_segment(path: Path, after: int = 0) -> tuple[list[Entry], int, str | None]:
    """The records of one segment with an LSN above ``after``; (entries, highest LSN seen,
    what ended the segment early: None when it ended cleanly)."""
    data = path.read_bytes()
    if data.startswith(MAGIC):
        fmt = 2
    elif data.startswith(MAGIC_V1):
        fmt = 1
    else:
        return [], 0, "no segment header" if data else None
    out: list[Entry] = []
    last = 0
    for f in frames(data, len(MAGIC), seq_name="LSN"):
        if isinstance(f, str):
            return out, last, f
        lsn, pos, _, payload = f
        last = lsn
        if lsn > after:
            try:
                readings = decode_payload(payload, fmt)
            except ValueError as exc:
                return out, last, f"undecodable record at offset {pos}: {exc}"
            out.append((lsn, readings))
    return out, last, None


class WriteAheadLog:
    """See the module docstring. ``open()`` (sync), then ``run`` (the committer) in a
    nursery; ``append``/``commit`` (or ``log``) from Trio tasks; ``checkpoint`` after the
    store has the records."""

    def __init__(
        self,
        directory: Path | str,
        *,
        segment_bytes: int = 4 << 20,
        max_backlog: int = 500_000,
        on_commit: Callable[[list[Entry]], None] | None = None,
        on_state: Callable[[bool, str], None] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.segment_bytes = segment_bytes
        self.max_backlog = max_backlog
        self.on_commit = on_commit
        self.on_state = on_state
        self.next_lsn = 1
        self.durable_lsn = 0
        self.checkpointed = 0
        self.backlog = 0
        self.commits = 0
        self.commit_seconds = 0.0  # in write + fdatasync (worker thread included)
        self.fsyncs = 0
        self.records = 0
        self.failures = 0
        self.failing: str | None = None
        self._unstored: deque[tuple[int, int]] = deque()  # (lsn, readings) above checkpoint
        self._segments: list[tuple[Path, int]] = []  # closed segments: (path, last lsn)
        self._seg_lock = threading.Lock()  # _segments: the committer's and checkpoint's threads
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0
        self._last_in_segment = 0
        self._pending = _Batch()
        self._cond = threading.Condition()  # _pending and _closed: Trio and the committer
        self._open = False
        self._closed = False

    # --- open and replay ----------------------------------------------------------------
    def open(self) -> list[Entry]:
        """Create or open the log; return every record above the checkpoint (to replay)."""
        private_dir(self.directory)
        cp = self.directory / CHECKPOINT
        try:
            self.checkpointed = int(cp.read_text().strip() or 0)
        except FileNotFoundError:
            self.checkpointed = 0
        except ValueError:
            # the checkpoint is written by rename, so a bad one is corruption: replay all
            log.error("wal: %s is unreadable; replaying every segment", cp)
            self.checkpointed = 0
        replay: list[Entry] = []
        highest = self.checkpointed
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            entries, last, problem = read_segment(path, self.checkpointed)
            if problem:
                log.warning("wal: %s: %s; the rest of this segment is ignored", path, problem)
            if entries and entries[0][0] <= highest:
                log.error("wal: %s repeats LSNs up to %d; its older records ignored", path, highest)
                entries = [e for e in entries if e[0] > highest]
            replay.extend(entries)
            highest = max(highest, last)
            self._segments.append((path, last))
        self.next_lsn = highest + 1
        self.durable_lsn = highest
        for lsn, readings in replay:
            self._unstored.append((lsn, len(readings)))
            self.backlog += len(readings)
        self._open = True
        if replay:
            log.info(
                "wal: %d records (%d readings) above checkpoint %d to replay",
                len(replay),
                self.backlog,
                self.checkpointed,
            )
        return replay

    # --- appending ----------------------------------------------------------------------
    def append(self, readings: Sequence[WalReading]) -> tuple[int, _Batch]:
        """Add one record to the pending batch (no I/O); returns (lsn, batch). Raises
        WalBusy above ``max_backlog``, WalError when closed or not open."""
        if not self._open or self._closed:
            raise WalError("the write-ahead log is not open")
        n = len(readings)
        if self.backlog + n > self.max_backlog and self.backlog > 0:
            raise WalBusy(
                f"{self.backlog} readings not yet in the store (limit {self.max_backlog})"
            )
        lsn = self.next_lsn
        record = encode(lsn, readings)
        self.next_lsn += 1
        with self._cond:
            batch = self._pending
            batch.entries.append((lsn, list(readings)))
            batch.chunks.append(record)
            batch.readings += n
            self._cond.notify()
        self.backlog += n
        self._unstored.append((lsn, n))
        return lsn, batch

    async def commit(self, batch: _Batch) -> None:
        """Wait until ``batch`` is durable; raises its WalError if writing it failed."""
        await batch.done.wait()
        if batch.error is not None:
            raise batch.error

    async def log(self, readings: Sequence[WalReading]) -> int:
        """Append and wait until durable: the one call an ingest edge makes. Returns the LSN."""
        lsn, batch = self.append(readings)
        await self.commit(batch)
        return lsn

    # --- the committer ------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The committer: a dedicated thread that writes and fdatasyncs one pending batch
        after the other (a thread of its own, not one per batch: under CPU contention each
        hand-over to a fresh worker thread cost several ms on top of the fsync); results
        come back to Trio with ``run_sync_soon``, in order. Cancel to close the log."""
        if not self._open:
            await trio.to_thread.run_sync(self.open)
        token = trio.lowlevel.current_trio_token()
        thread = threading.Thread(target=self._commit_loop, args=(token,), name="wal", daemon=True)
        thread.start()
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            with self._cond:
                self._closed = True
                batch, self._pending = self._pending, _Batch()
                self._cond.notify()
            if batch.entries:
                self._forget(batch)
                batch.error = WalError("the write-ahead log is closed (engine stopping)")
                batch.done.set()
            with trio.CancelScope(shield=True):
                # a write in progress finishes (its callers learn the outcome when the
                # engine comes back: replay); then the file is closed
                await trio.to_thread.run_sync(thread.join)
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _commit_loop(self, token: trio.lowlevel.TrioToken) -> None:
        while True:
            with self._cond:
                while not self._pending.entries and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                batch, self._pending = self._pending, _Batch()
            t0 = time.perf_counter()
            error: OSError | None = None
            try:
                self._write_sync(b"".join(batch.chunks), batch.entries[0][0], batch.entries[-1][0])
            except OSError as exc:
                error = exc
            seconds = time.perf_counter() - t0
            try:
                token.run_sync_soon(self._committed, batch, error, seconds)
            except trio.RunFinishedError:
                return

    def _committed(self, batch: _Batch, exc: OSError | None, seconds: float) -> None:
        """In Trio, in commit order (a ``run_sync_soon`` callback: must never raise)."""
        try:
            self._settle(batch, exc, seconds)
        except Exception:
            log.exception("wal: settling a commit failed")
        finally:
            batch.done.set()

    def _settle(self, batch: _Batch, exc: OSError | None, seconds: float) -> None:
        if exc is not None:
            self.failures += 1
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            msg = f"write-ahead log write failed: {exc}"
            batch.error = (WalFull if full else WalError)(msg)
            self._forget(batch)
            if self.failing is None:
                log.error("wal: %s; refusing to acknowledge readings until it works", msg)
                self.failing = msg
                if self.on_state is not None:
                    self.on_state(False, msg)
            return
        self.commit_seconds += seconds
        self.durable_lsn = batch.entries[-1][0]
        self.commits += 1
        self.records += len(batch.entries)
        if self.failing is not None:
            log.warning("wal: writing works again (after: %s)", self.failing)
            self.failing = None
            if self.on_state is not None:
                self.on_state(True, "write-ahead log writes work again")
        if self.on_commit is not None:
            self.on_commit(batch.entries)

    def _forget(self, batch: _Batch) -> None:
        """A batch that is not in the log: it no longer counts in the backlog."""
        failed = {lsn for lsn, _ in batch.entries}
        self.backlog -= batch.readings
        self._unstored = deque(u for u in self._unstored if u[0] not in failed)

    def _write_sync(self, data: bytes, first_lsn: int, last_lsn: int) -> None:
        """(The committer thread.) Append one batch to the current segment and fdatasync."""
        if self._fd is None or self._size >= self.segment_bytes:
            self._roll(first_lsn)
        assert self._fd is not None
        before = self._size
        try:
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            os.fdatasync(self._fd)
            self.fsyncs += 1
        except OSError:
            self._abandon(before)
            raise
        self._size += len(data)
        self._last_in_segment = last_lsn

    def _roll(self, first_lsn: int) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            assert self._path is not None
            with self._seg_lock:
                self._segments.append((self._path, first_lsn - 1))
        path = self.directory / f"{first_lsn:020d}{SUFFIX}"
        self._last_in_segment = 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            os.write(fd, MAGIC)
            os.fsync(fd)
            fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        self._fd, self._path, self._size = fd, path, len(MAGIC)

    def _abandon(self, size: int) -> None:
        """After a failed write or fsync: cut the segment back and stop using it."""
        assert self._fd is not None and self._path is not None
        try:
            os.ftruncate(self._fd, size)
            os.fsync(self._fd)
        except OSError as exc:
            log.error("wal: cannot cut %s back after a failed write: %s", self._path, exc)
        os.close(self._fd)
        self._fd = None
        with self._seg_lock:
            self._segments.append((self._path, self._last_in_segment))

    # --- truncation ---------------------------------------------------------------------
    async def checkpoint(self, lsn: int) -> None:
        """The store has every record up to ``lsn``: record it durably, drop old segments."""
        if lsn <= self.checkpointed:
            return
        lsn = min(lsn, self.durable_lsn)
        await trio.to_thread.run_sync(self._checkpoint_sync, lsn)
        self.checkpointed = lsn
        while self._unstored and self._unstored[0][0] <= lsn:
            self.backlog -= self._unstored.popleft()[1]

    def _checkpoint_sync(self, lsn: int) -> None:
        write_number(self.directory, CHECKPOINT, lsn)
        with self._seg_lock:
            done = [s for s in self._segments if s[1] <= lsn]
            self._segments = [s for s in self._segments if s[1] > lsn]
        for path, _ in done:
            path.unlink(missing_ok=True)

    def segment_files(self) -> list[Path]:
        return sorted(self.directory.glob(f"*{SUFFIX}"))

    def stats(self) -> dict[str, Any]:
        return {
            "next_lsn": self.next_lsn,
            "durable_lsn": self.durable_lsn,
            "checkpoint": self.checkpointed,
            "backlog": self.backlog,
            "commits": self.commits,
            "commit_seconds": round(self.commit_seconds, 3),
            "fsyncs": self.fsyncs,
            "records": self.records,
            "failures": self.failures,
            "failing": self.failing,
        }


def readings_of(items: Iterable[Any]) -> list[WalReading]:
    """WAL readings from ``Reading``-like objects (device, point, value, ts, quality)."""
    return [(r.device, r.point, r.value, float(r.ts), str(r.quality)) for r in items]


__all__ = [
    "MAGIC",
    "MAGIC_V1",
    "Entry",
    "WalBusy",
    "WalError",
    "WalFull",
    "WalReading",
    "WriteAheadLog",
    "read_segment",
    "readings_of",
]
