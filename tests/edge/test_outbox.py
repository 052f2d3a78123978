"""The edge outbox: durable before the ack, per-edge sequence numbers, deleted only after the
cloud's ack, replay after kill -9, overflow by policy (counted, never alarms)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from twin.edge.outbox import SUFFIX, Outbox, OutboxFull


async def _with(box: Outbox, fn):  # type: ignore[no-untyped-def]
    async with trio.open_nursery() as n:
        await n.start(box.run)
        try:
            return await fn()
        finally:
            n.cancel_scope.cancel()


async def test_append_read_ack_and_replay(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "ob", segment_bytes=2000)

    async def fill() -> list[int]:
        seqs = []
        async with trio.open_nursery() as n:  # concurrent producers share group commits
            async def producer(i: int) -> None:
                for j in range(20):
                    seqs.append(await box.put("telemetry", [["d", "p", i * 100 + j, 1.0 + j, "good"]]))
            for i in range(5):
                n.start_soon(producer, i)
        await box.put("alarm", {"device": "d", "type": "hot"})
        return seqs

    seqs = await _with(box, fill)
    assert sorted(seqs) == list(range(1, 101))
    assert box.commits < 101 and box.durable_seq == 101
    assert box.pending(0, 1000) == list(range(1, 102))
    recs = box.read(box.pending(95, 10))
    assert [r[0] for r in recs] == [96, 97, 98, 99, 100, 101] and recs[-1][1] == "alarm"
    segments = len(list((tmp_path / "ob").glob(f"*{SUFFIX}")))
    assert segments > 2
    # a new process: the index comes back from the files
    box2 = Outbox(tmp_path / "ob", segment_bytes=2000)
    box2.open()
    assert box2.pending(0, 1000) == list(range(1, 102)) and box2.next_seq == 102

    async def ack() -> None:
        await box2.acked(60)
        assert box2.pending(0, 1000) == list(range(61, 102))
        assert await box2.put("status", {"device": "d", "status": "online"}) == 102

    await _with(box2, ack)
    assert len(list((tmp_path / "ob").glob(f"*{SUFFIX}"))) < segments  # acked segments gone
    box3 = Outbox(tmp_path / "ob")
    box3.open()
    assert box3.pending(0, 1000) == list(range(61, 103)) and box3.acked_seq == 60


async def test_torn_tail_is_ignored(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "ob")

    async def fill() -> None:
        for i in range(10):
            await box.put("telemetry", [["d", "p", i, float(i), "good"]])

    await _with(box, fill)
    seg = sorted((tmp_path / "ob").glob(f"*{SUFFIX}"))[-1]
    data = seg.read_bytes()
    seg.write_bytes(data[:-7])  # a crash in the middle of the last record
    box2 = Outbox(tmp_path / "ob")
    box2.open()
    assert box2.pending(0, 100) == list(range(1, 10)) and box2.next_seq == 10


async def test_overflow_drops_oldest_telemetry_never_alarms(tmp_path: Path) -> None:
    drops: list[tuple[str, int]] = []
    box = Outbox(tmp_path / "ob", max_records=10, segment_bytes=300,
                 on_drop=lambda k, n: drops.append((k, n)))

    async def fill() -> None:
        await box.put("alarm", {"n": 0})
        for i in range(8):
            await box.put("telemetry", [["d", "p", i, float(i), "good"]])
        await box.put("command_result", {"id": "c1", "state": "success"})
        for i in range(8, 20):  # each needs room: the oldest telemetry goes first
            await box.put("telemetry", [["d", "p", i, float(i), "good"]])
        assert len(box) == 10
        kinds = [r[1] for r in box.read(box.pending(0, 100))]
        assert kinds.count("alarm") == 1 and kinds.count("command_result") == 1
        values = [r[3][0][2] for r in box.read(box.pending(0, 100)) if r[1] == "telemetry"]
        assert values == list(range(12, 20))  # the 12 oldest readings dropped, in order
        assert box.dropped == {"telemetry": 12}
        # fill the rest with never-dropped kinds: telemetry is now refused, alarms still taken
        for i in range(8):
            await box.put("alarm", {"n": i + 1})
        with pytest.raises(OutboxFull):
            await box.put("telemetry", [["d", "p", 99, 99.0, "good"]])
        await box.put("alarm", {"n": 99})
        assert box.refused == 1 and box.dropped == {"telemetry": 20}
        await trio.sleep(0.2)  # the reclaimer deletes segments left with dropped records only

    await _with(box, fill)
    assert sum(n for _, n in drops) == 20
    box2 = Outbox(tmp_path / "ob")
    box2.open()  # dropped records stay dropped after a restart
    kinds = [r[1] for r in box2.read(box2.pending(0, 100))]
    assert kinds.count("telemetry") == 0 and kinds.count("alarm") == 10
    assert kinds.count("command_result") == 1


WRITER = r"""
import sys, trio
from twin.edge.outbox import Outbox

async def main():
    box = Outbox(sys.argv[1], segment_bytes=20000)
    async with trio.open_nursery() as n:
        await n.start(box.run)
        i = 0
        while True:
            seq = await box.put("telemetry", [["d", "p", i, float(i), "good"]])
            print(seq, i, flush=True)   # the local ack: only after the fsync
            i += 1

trio.run(main)
"""


def test_kill_9_between_append_and_ack_loses_nothing_acked(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "ob")],
                            stdout=subprocess.PIPE, text=True, env=env)
    acked: list[tuple[int, int]] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        seq, i = map(int, line.split())
        acked.append((seq, i))
        if len(acked) >= 300:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    rest = proc.stdout.read()
    acked += [tuple(map(int, ln.split())) for ln in rest.splitlines() if ln.strip()]  # type: ignore[misc]
    box = Outbox(tmp_path / "ob")
    box.open()
    got = {r[0]: r[3][0][2] for r in box.read(box.pending(0, 10**6))}
    for seq, i in acked:
        assert got.get(seq) == i
    assert sorted(got) == list(range(1, len(got) + 1))  # contiguous: nothing skipped
