"""The edge's durable outbox: what goes up to the cloud, on disk before it is acknowledged.

Everything the edge owes the cloud — telemetry, status changes, command results, alarms,
scene traces — is appended here as a *record* with the next per-edge sequence number, and the
local producer (an HTTP ingest answer, a PUBACK, a scene's "done") is told so only after the
record is fsynced. Records are deleted only after the cloud acknowledged every sequence number
up to theirs. Same shape as the time-series write-ahead log (``twin/timeseries/wal.py``): the
record header and CRC, group commit in one dedicated committer thread (concurrent appends
share one ``fdatasync``), segments that are never appended to after a restart, a checkpoint
file written by rename::

    append(kind, body) ─▶ pending batch ─▶ committer thread: write + fdatasync ─▶ ack
                                                      │
     uplink: pending(after, n) ◀── index ◀────────────┘
             acked(n)  ──▶ "acked" file (tmp + fsync + rename) ──▶ whole segments ≤ n deleted

**Files.** ``<dir>/`` (0700): segments ``<first seq, 20 digits>.obx`` (0600) starting with
:data:`MAGIC`, then records ``u32 length | u32 CRC-32 of (seq + payload) | u64 seq |
payload``; the payload is JSON ``[kind, ts, body]``. ``acked`` holds the highest sequence
number the cloud has acknowledged.

**Replay** (``open``): the index of every record above ``acked`` is rebuilt from the segments
(a torn tail from a crash ends its segment and is ignored: it was never acknowledged to the
producer, so its sequence number is used again). Bodies stay on disk; the uplink reads them
back in batches (:meth:`read`), so an outbox of millions of readings costs a small index in
memory, not the readings.

**Overflow.** ``max_bytes`` / ``max_records`` / ``max_age`` bound the outbox. When an append
would pass a limit, the oldest records of the kinds in ``drop`` are dropped (in the order of
``drop``: the oldest telemetry first, by default) until it fits; kinds in ``never`` are never
dropped. If only those remain, a droppable record is refused (:class:`OutboxFull`: the local
ingest answers 503) while a ``never`` record is still written (command results and alarms are
not lost to a full buffer; the limit is soft for them). Dropped records are counted per kind,
logged, noted in ``dropped`` (so a restart does not resurrect them) and reported to the cloud:
the uplink declares the gaps they leave (``twin/edge/protocol.py``). The limits count the
records still to send; a segment's disk space is reclaimed once none of its records is left
(all acknowledged or dropped), so a segment holding an alarm amid dropped telemetry stays on
disk until the alarm is acknowledged.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from twin.files import private_dir
from twin.storage.segments import HEADER, frame, frames, fsync_dir, write_number
from twin.timeseries.wal import WalError, WalFull

log = logging.getLogger(__name__)

MAGIC = b"FLUXOBX\x01"
SUFFIX = ".obx"
ACKED = "acked"
DROPPED = "dropped"
KINDS = ("telemetry", "status", "command_result", "alarm", "scene_trace")


class OutboxError(WalError):
    """The outbox cannot take records now (the local ingest answers 503, MQTT 0x80)."""

    retry_after = 5


class OutboxFull(OutboxError, WalFull):
    """The outbox is full and the overflow policy does not allow dropping for this record."""

    retry_after = 5


Record = tuple[int, str, float, Any]
"""``(seq, kind, ts, body)``: one outbox record."""


@dataclass(slots=True)
class _Entry:
    seq: int
    kind: str
    ts: float
    size: int
    segment: int  # the first seq of its segment (the file name)
    offset: int


@dataclass(eq=False)
class _Batch:
    entries: list[_Entry] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)
    error: OutboxError | None = None


def encode(seq: int, kind: str, ts: float, body: Any) -> bytes:
    return frame(seq, json.dumps([kind, ts, body], separators=(",", ":"), default=str).encode())


def scan(data: bytes) -> tuple[list[tuple[int, int, int, str, float]], str | None]:
    """Records of a segment's bytes as ``(seq, offset, size, kind, ts)``; what ended it early."""
    out: list[tuple[int, int, int, str, float]] = []
    if not data.startswith(MAGIC):
        return out, "no segment header" if data else None
    for f in frames(data, len(MAGIC)):
        if isinstance(f, str):
            return out, f
        seq, offset, size, payload = f
        try:
            kind, ts, _ = json.loads(payload)
        except (ValueError, TypeError) as exc:
            return out, f"undecodable record at offset {offset}: {exc}"
        out.append((seq, offset, size, str(kind), float(ts)))
    return out, None


def decode_at(data: bytes, offset: int) -> Record:
    size, _crc, seq = HEADER.unpack_from(data, offset)
    start = offset + HEADER.size
    kind, ts, body = json.loads(data[start : start + size])
    return seq, str(kind), float(ts), body


def _in(ranges: list[tuple[int, int]], seq: int) -> bool:
    """Whether ``seq`` is in one of ``ranges`` (sorted by start, not overlapping)."""
    i = bisect_right(ranges, (seq, 1 << 63)) - 1
    return i >= 0 and ranges[i][0] <= seq <= ranges[i][1]


class Outbox:
    """See the module docstring. ``open()`` (sync), ``run`` (the committer) in a nursery,
    ``append``/``put`` from Trio tasks; the uplink uses ``pending``/``read``/``acked``."""

    def __init__(
        self,
        directory: Path | str,
        *,
        segment_bytes: int = 4 << 20,
        max_bytes: int | None = None,
        max_records: int | None = None,
        max_age: float | None = None,
        drop: Sequence[str] = ("telemetry", "scene_trace", "status"),
        never: Sequence[str] = ("command_result", "alarm"),
        clock: Callable[[], float] = time.time,
        on_drop: Callable[[str, int], None] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self.max_records = max_records
        self.max_age = max_age
        self.drop_order = tuple(k for k in drop if k not in never)
        self.never = tuple(never)
        self.clock = clock
        self.on_drop = on_drop
        self.next_seq = 1
        self.durable_seq = 0
        self.acked_seq = 0
        self.appended = 0
        self.commits = 0
        self.fsyncs = 0
        self.dropped: Counter[str] = Counter()
        self.refused = 0
        self.bytes = 0  # bytes of unacked records in the index
        self.failing: str | None = None
        self._index: dict[int, _Entry] = {}  # seq → entry (unacked, durable or pending)
        self._order: list[int] = []  # seqs of _index, ascending (appends are ascending)
        self._head = 0  # _order[:_head] are removed (acked or dropped): compacted lazily
        self._segments: dict[int, Path] = {}  # first seq → path (all, including current)
        self._seg_lock = threading.Lock()
        self._fd: int | None = None
        self._seg_first = 0
        self._size = 0
        self._pending = _Batch()
        self._cond = threading.Condition()
        self._open = False
        self._closed = False
        self._changed = trio.Event()
        self._reclaim_wanted = trio.Event()

    # --- open and replay ----------------------------------------------------------------
    def open(self) -> None:
        """Create or open the outbox and rebuild its index (every record above ``acked``)."""
        private_dir(self.directory)
        try:
            self.acked_seq = int((self.directory / ACKED).read_text().strip() or 0)
        except FileNotFoundError:
            self.acked_seq = 0
        except ValueError:
            log.error("outbox: %s is unreadable; every record is sent again", self.directory)
            self.acked_seq = 0
        dropped = self._read_dropped()
        highest = self.acked_seq
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            try:
                first = int(path.name.removesuffix(SUFFIX))
            except ValueError:
                continue
            records, problem = scan(path.read_bytes())
            if problem:
                log.warning("outbox: %s: %s; the rest of this segment is ignored", path, problem)
            records = [r for r in records if r[0] > highest]  # never a seq twice
            live = [r for r in records if r[0] > self.acked_seq and not _in(dropped, r[0])]
            if records:
                highest = records[-1][0]
            if not live:
                path.unlink(missing_ok=True)  # acked or dropped (a crash before its deletion)
                continue
            self._segments[first] = path
            for seq, offset, size, kind, ts in live:
                self._add(_Entry(seq, kind, ts, size, first, offset))
        self.next_seq = highest + 1
        self.durable_seq = highest
        self._open = True
        if self._order:
            log.info("outbox: %d records (%d bytes) not yet acknowledged by the cloud",
                      len(self), self.bytes)  # fmt: skip

    def _read_dropped(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        try:
            text = (self.directory / DROPPED).read_text()
        except FileNotFoundError:
            return out
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                out.append((int(parts[0]), int(parts[1])))
        out.sort()
        merged: list[tuple[int, int]] = []
        for lo, hi in out:
            if merged and lo <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
            else:
                merged.append((lo, hi))
        return merged

    def _note_dropped(self, seqs: list[int]) -> None:
        """Remember dropped sequence numbers (so a restart does not send them after all).
        Not fsynced: losing this note in a crash only means sending records the policy had
        dropped, which the cloud takes or skips as already covered."""
        seqs.sort()
        ranges: list[list[int]] = []
        for s in seqs:
            if ranges and ranges[-1][1] == s - 1:
                ranges[-1][1] = s
            else:
                ranges.append([s, s])
        try:
            with open(self.directory / DROPPED, "a") as f:
                f.write("".join(f"{lo} {hi}\n" for lo, hi in ranges))
        except OSError as exc:
            log.warning("outbox: cannot note dropped records: %s", exc)

    def _add(self, e: _Entry) -> None:
        self._index[e.seq] = e
        self._order.append(e.seq)
        self.bytes += e.size

    def _remove(self, seq: int) -> _Entry | None:
        e = self._index.pop(seq, None)
        if e is not None:
            self.bytes -= e.size
        return e

    def __len__(self) -> int:
        return len(self._index)

    # --- appending ----------------------------------------------------------------------
    def append(self, kind: str, body: Any, ts: float | None = None) -> tuple[int, _Batch]:
        """Add one record to the pending batch (no I/O); returns (seq, batch). Applies the
        overflow policy first: raises OutboxFull when it does not allow this record."""
        if not self._open or self._closed:
            raise OutboxError("the outbox is not open")
        if kind not in KINDS:
            raise ValueError(f"unknown outbox record kind {kind!r}")
        ts = self.clock() if ts is None else float(ts)
        seq = self.next_seq
        record = encode(seq, kind, ts, body)
        self._make_room(kind, len(record), ts)
        self.next_seq += 1
        with self._cond:
            batch = self._pending
            batch.entries.append(_Entry(seq, kind, ts, len(record), 0, 0))
            batch.chunks.append(record)
            self._cond.notify()
        self._add(batch.entries[-1])
        self.appended += 1
        return seq, batch

    async def commit(self, batch: _Batch) -> None:
        await batch.done.wait()
        if batch.error is not None:
            raise batch.error

    async def put(self, kind: str, body: Any, ts: float | None = None) -> int:
        """Append and wait until durable (the call a producer makes before its ack)."""
        seq, batch = self.append(kind, body, ts)
        await self.commit(batch)
        return seq

    def _over(self, extra_bytes: int, extra_records: int, now: float) -> bool:
        if self.max_bytes is not None and self.bytes + extra_bytes > self.max_bytes:
            return True
        return self.max_records is not None and len(self) + extra_records > self.max_records

    def _make_room(self, kind: str, size: int, now: float) -> None:
        if self.max_age is not None:
            self._drop_where(lambda e: now - e.ts > self.max_age, None)  # type: ignore[operator]
        if not self._over(size, 1, now):
            return
        for k in self.drop_order:
            self._drop_where(lambda e, k=k: e.kind == k, lambda: not self._over(size, 1, now))  # type: ignore[misc]
            if not self._over(size, 1, now):
                return
        if kind in self.never:
            return  # never lost to a full buffer: the limit is soft for these kinds
        self.refused += 1
        raise OutboxFull(
            f"outbox full ({len(self)} records, {self.bytes} bytes) and nothing droppable "
            f"left for a {kind} record"
        )

    def _drop_where(self, pred: Callable[[_Entry], bool], enough: Callable[[], bool] | None) -> None:
        """Drop the oldest durable entries matching ``pred`` (never a pending one: its batch
        is being written), until ``enough()``."""
        dropped: Counter[str] = Counter()
        seqs: list[int] = []
        for i in range(self._head, len(self._order)):
            seq = self._order[i]
            e = self._index.get(seq)
            if e is None or seq > self.durable_seq or e.kind in self.never:
                continue
            if not pred(e):
                continue
            self._remove(seq)
            seqs.append(seq)
            dropped[e.kind] += 1
            if enough is not None and enough():
                break
        for kind, n in dropped.items():
            self.dropped[kind] += n
            log.warning("outbox: overflow: dropped the %d oldest %s records (policy)", n, kind)
            if self.on_drop is not None:
                self.on_drop(kind, n)
        if dropped:
            self._note_dropped(seqs)
            self._compact_order()
            self._reclaim_wanted.set()

    def _compact_order(self) -> None:
        while self._head < len(self._order) and self._order[self._head] not in self._index:
            self._head += 1
        if self._head > 4096 and self._head > len(self._order) // 2:
            self._order = self._order[self._head :]
            self._head = 0

    # --- the committer ------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if not self._open:
            await trio.to_thread.run_sync(self.open)
        token = trio.lowlevel.current_trio_token()
        thread = threading.Thread(target=self._loop, args=(token,), name="outbox", daemon=True)
        thread.start()
        task_status.started()
        try:
            while True:  # segments freed by overflow drops are deleted at once (outage: no acks)
                await self._reclaim_wanted.wait()
                self._reclaim_wanted = trio.Event()
                await self.reclaim()
        finally:
            with self._cond:
                self._closed = True
                batch, self._pending = self._pending, _Batch()
                self._cond.notify()
            if batch.entries:
                for e in batch.entries:
                    self._remove(e.seq)
                batch.error = OutboxError("the outbox is closed (engine stopping)")
                batch.done.set()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(thread.join)
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _loop(self, token: trio.lowlevel.TrioToken) -> None:
        while True:
            with self._cond:
                while not self._pending.entries and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                batch, self._pending = self._pending, _Batch()
            error: OSError | None = None
            try:
                self._write(batch)
            except OSError as exc:
                error = exc
            try:
                token.run_sync_soon(self._committed, batch, error)
            except trio.RunFinishedError:
                return

    def _write(self, batch: _Batch) -> None:
        """(Committer thread.) One write + fdatasync for the batch; sets entry offsets."""
        if self._fd is None or self._size >= self.segment_bytes:
            self._roll(batch.entries[0].seq)
        assert self._fd is not None
        before = self._size
        offset = self._size
        for e, chunk in zip(batch.entries, batch.chunks, strict=True):
            e.segment, e.offset = self._seg_first, offset
            offset += len(chunk)
        data = memoryview(b"".join(batch.chunks))
        try:
            while data:
                n = os.write(self._fd, data)
                data = data[n:]
            os.fdatasync(self._fd)
            self.fsyncs += 1
        except OSError:
            try:
                os.ftruncate(self._fd, before)
            except OSError as exc:
                log.error("outbox: cannot cut a segment back after a failed write: %s", exc)
            os.close(self._fd)
            self._fd = None
            raise
        self._size = offset

    def _roll(self, first: int) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        path = self.directory / f"{first:020d}{SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            os.write(fd, MAGIC)
            os.fsync(fd)
            fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        with self._seg_lock:
            self._segments[first] = path
        self._fd, self._seg_first, self._size = fd, first, len(MAGIC)

    def _committed(self, batch: _Batch, exc: OSError | None) -> None:
        try:
            if exc is not None:
                full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
                msg = f"outbox write failed: {exc}"
                batch.error = OutboxFull(msg) if full else OutboxError(msg)
                for e in batch.entries:
                    self._remove(e.seq)
                if self.failing is None:
                    log.error("outbox: %s; refusing records until it works", msg)
                self.failing = msg
                return
            self.failing = None
            self.durable_seq = batch.entries[-1].seq
            self.commits += 1
            self._changed.set()
            self._changed = trio.Event()
        except Exception:
            log.exception("outbox: settling a commit failed")
        finally:
            batch.done.set()

    # --- the uplink's side --------------------------------------------------------------
    async def wait_for(self, seq: int) -> None:
        """Wait until some durable record has a sequence number above ``seq``."""
        while self.durable_seq <= seq:
            await self._changed.wait()

    def pending(self, after: int = 0, limit: int = 1000) -> list[int]:
        """Sequence numbers of durable, unacknowledged records above ``after`` (ascending)."""
        self._compact_order()
        order = self._order
        i = max(self._head, bisect_right(order, after, self._head))
        out: list[int] = []
        durable = self.durable_seq
        index = self._index
        while i < len(order) and len(out) < limit:
            seq = order[i]
            if seq > durable:
                break
            if seq in index:
                out.append(seq)
            i += 1
        return out

    def previous(self, seq: int) -> int:
        """The sequence number of the record before ``seq`` still in the outbox, or the acked
        mark (every number in between was dropped)."""
        i = bisect_right(self._order, seq - 1, self._head) - 1
        while i >= self._head:
            s = self._order[i]
            if s in self._index:
                return s
            i -= 1
        return self.acked_seq

    def read(self, seqs: Iterable[int]) -> list[Record]:
        """The records ``seqs`` (durable ones only), read back from their segments. Records
        dropped meanwhile are skipped. Sync file I/O: call in a worker thread for big batches."""
        by_seg: dict[int, list[_Entry]] = {}
        for s in seqs:
            e = self._index.get(s)
            if e is not None and s <= self.durable_seq:
                by_seg.setdefault(e.segment, []).append(e)
        out: list[Record] = []
        for first, entries in sorted(by_seg.items()):
            path = self._segments.get(first)
            if path is None:
                continue
            with open(path, "rb") as f:
                for e in entries:
                    f.seek(e.offset)
                    chunk = f.read(e.size)
                    if len(chunk) < e.size:
                        continue
                    out.append(decode_at(chunk, 0))
        out.sort(key=lambda r: r[0])
        return out

    def sizes(self, seq: int) -> int:
        """Bytes of record ``seq`` on disk (0 when it is gone)."""
        e = self._index.get(seq)
        return e.size if e is not None else 0

    def oldest_ts(self) -> float | None:
        self._compact_order()
        if self._head < len(self._order):
            e = self._index.get(self._order[self._head])
            return e.ts if e else None
        return None

    async def acked(self, upto: int, covered: Iterable[tuple[int, int]] = ()) -> None:
        """The cloud has every record up to ``upto`` (and the ranges ``covered`` above it):
        record it durably, drop their entries and the segments left with nothing to send."""
        for lo, hi in covered:
            for s in self.pending(lo - 1, limit=max(0, hi - lo + 1)):
                if s <= hi:
                    self._remove(s)
        if upto <= self.acked_seq:
            self._compact_order()
            return
        upto = min(upto, self.durable_seq)
        i = self._head
        while i < len(self._order) and self._order[i] <= upto:
            self._remove(self._order[i])
            i += 1
        self._head = i
        self._compact_order()
        self.acked_seq = upto
        await trio.to_thread.run_sync(self._acked_sync, upto)

    def _acked_sync(self, upto: int) -> None:
        write_number(self.directory, ACKED, upto)
        kept = [r for r in self._read_dropped() if r[1] > upto]
        tmp = self.directory / (DROPPED + ".tmp")
        tmp.write_text("".join(f"{lo} {hi}\n" for lo, hi in kept))
        os.replace(tmp, self.directory / DROPPED)
        self._reclaim()

    def _reclaim(self) -> None:
        """Delete closed segments none of whose records is still in the index."""
        with self._seg_lock:
            firsts = sorted(self._segments)
        live = {e.segment for e in list(self._index.values())}
        current = self._seg_first if self._fd is not None else None
        for first in firsts:
            if first == current or first in live:
                continue
            with self._seg_lock:
                path = self._segments.pop(first, None)
            if path is not None:
                path.unlink(missing_ok=True)

    async def reclaim(self) -> None:
        """Delete segments left with only dropped or acknowledged records (after overflow)."""
        await trio.to_thread.run_sync(self._reclaim)

    def stats(self) -> dict[str, Any]:
        oldest = self.oldest_ts()
        return {
            "depth": len(self),
            "bytes": self.bytes,
            "oldest_age_s": None if oldest is None else max(0.0, self.clock() - oldest),
            "next_seq": self.next_seq,
            "durable_seq": self.durable_seq,
            "acked_seq": self.acked_seq,
            "appended": self.appended,
            "commits": self.commits,
            "fsyncs": self.fsyncs,
            "dropped": dict(self.dropped),
            "refused": self.refused,
            "failing": self.failing,
        }


__all__ = ["KINDS", "Outbox", "OutboxError", "OutboxFull", "Record"]
