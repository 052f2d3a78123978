"""The write-ahead log on a real file system: group commit, replay, truncation, torn and
corrupt records, a full disk (``/dev/full``), the backlog bound, file modes."""

from __future__ import annotations

import json
import logging
import os
import stat
import struct
import zlib
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio
import trio.testing

from twin.timeseries.wal import (
    HEADER,
    MAGIC,
    MAGIC_V1,
    WalBusy,
    WalFull,
    WalReading,
    WriteAheadLog,
    read_segment,
)


def reading(i: int, device: str = "d1") -> WalReading:
    return (device, "temperature", 20.0 + i, 1_700_000_000.0 + i, "good")


async def run_wal(wal: WriteAheadLog, nursery: trio.Nursery) -> None:
    await nursery.start(wal.run)


async def test_concurrent_appends_share_one_fsync(tmp_path: Path) -> None:
    committed: list[int] = []
    wal = WriteAheadLog(tmp_path / "wal", on_commit=lambda es: committed.extend(e[0] for e in es))
    assert wal.open() == []
    lsns: list[int] = []
    async with trio.open_nursery() as nursery:
        await run_wal(wal, nursery)

        async def ingest(i: int) -> None:
            lsns.append(await wal.log([reading(i)]))

        async with trio.open_nursery() as clients:
            # the committer is busy (holding its lock stands for a write in progress): the
            # 50 calls arriving meanwhile form one batch
            with wal._cond:
                for i in range(50):
                    clients.start_soon(ingest, i)
                await trio.testing.wait_all_tasks_blocked()
                assert wal.durable_lsn == 0 and not lsns  # nobody acknowledged yet
        nursery.cancel_scope.cancel()
    assert sorted(lsns) == list(range(1, 51))
    assert committed == list(range(1, 51))  # handed on in LSN order
    assert wal.records == 50
    assert wal.fsyncs == 1, wal.stats()
    assert wal.durable_lsn == 50


async def test_reopen_replays_every_record_in_order(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path / "wal")
    wal.open()
    async with trio.open_nursery() as nursery:
        await run_wal(wal, nursery)
        for i in range(10):
            await wal.log([reading(i), reading(i, "d2")])
        nursery.cancel_scope.cancel()
    again = WriteAheadLog(tmp_path / "wal")
    entries = again.open()
    assert [lsn for lsn, _ in entries] == list(range(1, 11))
    assert entries[3][1] == [reading(3), reading(3, "d2")]
    assert again.next_lsn == 11 and again.backlog == 20
    # a reopened log appends to a new segment, never after an old (possibly torn) tail
    async with trio.open_nursery() as nursery:
        await run_wal(again, nursery)
        assert await again.log([reading(99)]) == 11
        nursery.cancel_scope.cancel()
    assert len(again.segment_files()) == 2
    assert [lsn for lsn, _ in WriteAheadLog(tmp_path / "wal").open()] == list(range(1, 12))


async def test_checkpoint_truncates_and_survives_reopen(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path / "wal", segment_bytes=200)  # a few records per segment
    wal.open()
    async with trio.open_nursery() as nursery:
        await run_wal(wal, nursery)
        for i in range(30):
            await wal.log([reading(i)])
        segments = len(wal.segment_files())
        assert segments > 5
        await wal.checkpoint(20)
        assert wal.checkpointed == 20 and wal.backlog == 10
        assert len(wal.segment_files()) < segments
        nursery.cancel_scope.cancel()
    entries = WriteAheadLog(tmp_path / "wal").open()
    assert [lsn for lsn, _ in entries] == list(range(21, 31))
    # everything stored: every old segment goes, and nothing is left to replay
    wal2 = WriteAheadLog(tmp_path / "wal", segment_bytes=200)
    assert len(wal2.open()) == 10
    await wal2.checkpoint(30)
    assert wal2.segment_files() == []
    assert WriteAheadLog(tmp_path / "wal").open() == []


async def test_a_format_1_log_left_by_an_older_version_replays(tmp_path: Path) -> None:
    """Format 1 (JSON payloads) written out by hand, as the previous version wrote it: it
    replays, and the reopened log appends format 2 to a new segment; both replay."""
    d = tmp_path / "wal"
    d.mkdir()
    out = bytearray(MAGIC_V1)
    for lsn in (1, 2, 3):
        payload = json.dumps([list(reading(lsn)), list(reading(lsn, "d2"))]).encode()
        lsn_b = struct.pack("<Q", lsn)
        out += struct.pack("<IIQ", len(payload), zlib.crc32(payload, zlib.crc32(lsn_b)), lsn)
        out += payload
    (d / f"{1:020d}.wal").write_bytes(bytes(out))
    wal = WriteAheadLog(d)
    entries = wal.open()
    assert entries == [(i, [reading(i), reading(i, "d2")]) for i in (1, 2, 3)]
    async with trio.open_nursery() as nursery:
        await run_wal(wal, nursery)
        assert await wal.log([reading(4)]) == 4
        nursery.cancel_scope.cancel()
    old, new = wal.segment_files()
    assert old.read_bytes().startswith(MAGIC_V1) and new.read_bytes().startswith(MAGIC)
    assert [e[1] for e in WriteAheadLog(d).open()] == [e[1] for e in entries] + [[reading(4)]]


async def test_values_keep_their_type_and_odd_ones_are_logged_as_text(tmp_path: Path) -> None:
    class Name(str):
        pass

    when = datetime(2026, 1, 2, tzinfo=UTC)
    plain: list[WalReading] = [
        ("d1", "on", True, 1.5, "good"),
        ("d1", "count", 2**70, 2.5, "good"),
        ("d1", "label", "héllo", 3.5, "uncertain"),
        ("d1", "temp", -0.25, 4.5, "bad"),
    ]
    odd: list[WalReading] = [(Name("d1"), "when", when, 5.5, "good")]
    wal = WriteAheadLog(tmp_path / "wal")
    wal.open()
    async with trio.open_nursery() as nursery:
        await run_wal(wal, nursery)
        await wal.log(plain)
        await wal.log(odd)
        nursery.cancel_scope.cancel()
    first, second = (readings for _, readings in WriteAheadLog(tmp_path / "wal").open())
    assert first == plain and [type(r[2]) for r in first] == [bool, int, str, float]
    assert second == [("d1", "when", str(when), 5.5, "good")]
    assert type(second[0][0]) is str


async def test_torn_tail_stops_the_segment_and_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wal = WriteAheadLog(tmp_path / "wal")
    wal.open()
    async with trio.open_nursery() as nursery:
        await run_wal(wal, nursery)
        for i in range(5):
            await wal.log([reading(i)])
        nursery.cancel_scope.cancel()
    (seg,) = wal.segment_files()
    whole = seg.read_bytes()
    # a crash in the middle of writing record 5: only part of it reached the disk
    seg.write_bytes(whole[: len(whole) - 7])
    with caplog.at_level(logging.WARNING, logger="twin.timeseries.wal"):
        entries = WriteAheadLog(tmp_path / "wal").open()
    assert [lsn for lsn, _ in entries] == [1, 2, 3, 4]
    assert "torn record" in caplog.text and seg.name in caplog.text
    # only a header fragment
    seg.write_bytes(whole[: len(MAGIC) + 3])
    assert WriteAheadLog(tmp_path / "wal").open() == []


async def test_corrupt_record_ends_its_segment_but_not_later_segments(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wal = WriteAheadLog(tmp_path / "wal")
    wal.open()
    async with trio.open_nursery() as nursery:
        await run_wal(wal, nursery)
        for i in range(4):
            await wal.log([reading(i)])
        nursery.cancel_scope.cancel()
    later = WriteAheadLog(tmp_path / "wal")
    later.open()
    async with trio.open_nursery() as nursery:
        await run_wal(later, nursery)
        await later.log([reading(10)])
        nursery.cancel_scope.cancel()
    first, _second = later.segment_files()
    data = bytearray(first.read_bytes())
    # flip one byte in the payload of record 2
    size = HEADER.unpack_from(data, len(MAGIC))[0]
    data[len(MAGIC) + HEADER.size + size + HEADER.size + 3] ^= 0xFF
    first.write_bytes(bytes(data))
    assert read_segment(first)[2] is not None
    with caplog.at_level(logging.WARNING, logger="twin.timeseries.wal"):
        entries = WriteAheadLog(tmp_path / "wal").open()
    assert [lsn for lsn, _ in entries] == [1, 5]
    assert "bad record" in caplog.text


async def test_files_are_private(tmp_path: Path) -> None:
    os.umask(0o022)
    wal = WriteAheadLog(tmp_path / "wal")
    wal.open()
    async with trio.open_nursery() as nursery:
        await run_wal(wal, nursery)
        await wal.log([reading(1)])
        await wal.checkpoint(1)
        nursery.cancel_scope.cancel()
    assert stat.S_IMODE((tmp_path / "wal").stat().st_mode) == 0o700
    files = list((tmp_path / "wal").iterdir())
    assert files
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


async def test_disk_full_refuses_the_batch_and_recovers(tmp_path: Path) -> None:
    states: list[tuple[bool, str]] = []
    committed: list[int] = []
    wal = WriteAheadLog(
        tmp_path / "wal",
        on_state=lambda ok, msg: states.append((ok, msg)),
        on_commit=lambda es: committed.extend(e[0] for e in es),
    )
    wal.open()
    async with trio.open_nursery() as nursery:
        await run_wal(wal, nursery)
        await wal.log([reading(1)])
        # the segment's disk fills up: every write now fails with ENOSPC (/dev/full)
        assert wal._fd is not None
        os.close(wal._fd)
        wal._fd = os.open("/dev/full", os.O_WRONLY)
        with pytest.raises(WalFull, match="No space left"):
            await wal.log([reading(2)])
        assert states and states[-1][0] is False
        assert wal.backlog == 1  # the refused reading is not counted
        # the next batch goes to a fresh segment and works again
        lsn = await wal.log([reading(3)])
        assert states[-1][0] is True
        nursery.cancel_scope.cancel()
    assert committed == [1, lsn]
    replayed = [r for _, rs in WriteAheadLog(tmp_path / "wal").open() for r in rs]
    assert replayed == [reading(1), reading(3)]


async def test_backlog_is_bounded_until_a_checkpoint(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path / "wal", max_backlog=10)
    wal.open()
    async with trio.open_nursery() as nursery:
        await run_wal(wal, nursery)
        last = await wal.log([reading(i) for i in range(10)])
        with pytest.raises(WalBusy):
            await wal.log([reading(11)])
        await wal.checkpoint(last)
        assert wal.backlog == 0
        await wal.log([reading(11)])
        nursery.cancel_scope.cancel()


async def test_appends_after_close_are_refused(tmp_path: Path) -> None:
    from twin.timeseries.wal import WalError

    wal = WriteAheadLog(tmp_path / "wal")
    wal.open()
    async with trio.open_nursery() as nursery:
        await run_wal(wal, nursery)
        nursery.cancel_scope.cancel()
    with pytest.raises(WalError):
        await wal.log([reading(1)])
