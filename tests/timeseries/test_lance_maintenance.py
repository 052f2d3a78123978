"""LanceDB maintenance off the write path: appends go on while a maintenance runs, the
engine's ``Maintainer`` keeps the fragment count bounded in the background, and the
store's inline safety net still does it when nothing runs in the background."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import trio

from twin.timeseries.base import RAW, Record, Selector
from twin.timeseries.lance import LanceStore
from twin.timeseries.writer import BatchedWriter, Maintainer

from .conftest import T0


def records(k: int, devices: int = 5) -> list[Record]:
    """One poll cycle: every device's two metrics at timestamp ``k``."""
    return [
        (f"d{i}", m, float(i + k) / 10, T0 + k * 10, 0, "s", "g", ",")
        for i in range(devices)
        for m in ("a", "b")
    ]


def total(store: LanceStore) -> int:
    return int(store.read_raw(Selector(), 0, 2e9).num_rows)


def test_safety_net_bounds_fragments_without_background_maintenance(tmp_path: Path) -> None:
    # a bare store (the CLI): nobody calls maintain(), the store does it inline
    store = LanceStore(tmp_path / "ts", min_free_bytes=0, compact_every=2, inline_compact_every=6)
    try:
        seen = []
        for k in range(40):
            store.write_records(records(k))
            seen.append(store.fragment_count(RAW))
            if k == 1:
                assert store.maintenance_due()  # due for the background from 2 appends on
        assert max(seen) <= 6  # without the net: 40
        assert seen[-1] < 6
        assert total(store) == 40 * 10
    finally:
        store.close()


def test_appends_proceed_while_a_maintenance_runs(tmp_path: Path) -> None:
    store = LanceStore(
        tmp_path / "ts", min_free_bytes=0, compact_every=2, inline_compact_every=10**9
    )
    try:
        for k in range(6):
            store.write_records(records(k))
        assert store.fragment_count(RAW) == 6
        in_cluster = threading.Event()
        appended = threading.Event()
        original = store._cluster

        def paused_cluster(*a: Any, **kw: Any) -> Any:
            in_cluster.set()  # the maintenance has read the table's fragments ...
            assert appended.wait(30), "the append waited for the maintenance"
            return original(*a, **kw)  # ... and commits its Rewrite after the append

        store._cluster = paused_cluster  # type: ignore[method-assign]
        errors: list[BaseException] = []

        def maintain() -> None:
            try:
                store.maintain()
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        t = threading.Thread(target=maintain)
        t.start()
        assert in_cluster.wait(30)
        writer = threading.Thread(target=lambda: store.write_records(records(6)))
        writer.start()
        writer.join(30)
        # if appends needed the maintenance's lock this would still be blocked
        assert not writer.is_alive()
        appended.set()
        t.join(60)
        assert not t.is_alive() and not errors
        # the Rewrite was rebased over the concurrent append: nothing lost; the clustered
        # fragment and the new one (merged by the compaction that follows): 7 -> 1 or 2
        assert total(store) == 7 * 10
        assert store.fragment_count(RAW) <= 2
        assert store.pending_appends() == 1
    finally:
        store.close()


async def test_background_maintainer_bounds_fragments_while_writing(tmp_path: Path) -> None:
    # safety net out of reach: only the background task can keep the fragments down
    every = 4
    store = LanceStore(
        tmp_path / "ts", min_free_bytes=0, compact_every=every, inline_compact_every=10**9
    )
    maintainer = Maintainer(store, interval=3600)  # only the writer's flushes trigger it
    writer = BatchedWriter(
        store, batch_size=10, flush_interval=0.05, on_flush=lambda _n: maintainer.poke()
    )
    rounds, per_round = 10, every + 1
    seen: list[int] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(maintainer.run)
            await nursery.start(writer.run)
            k = 0
            for _ in range(rounds):
                runs = maintainer.runs
                for _ in range(per_round):
                    await writer.write_many(records(k))  # one batch = one append
                    k += 1
                # the writer goes on; the flush that made the maintenance due woke the task
                with trio.fail_after(60):  # a hang guard, not a timing threshold
                    while maintainer.runs == runs or maintainer.running:  # noqa: ASYNC110
                        await trio.sleep(0.01)
                seen.append(await trio.to_thread.run_sync(store.fragment_count, RAW))
            await writer.aclose()
            nursery.cancel_scope.cancel()
        appends = rounds * per_round
        assert writer.flushes == appends
        assert maintainer.runs >= rounds and maintainer.errors == 0
        # bounded while writing: the clustered fragment + what was appended during the run
        # (without maintenance: 5, 10, ... 50)
        assert max(seen) <= 1 + per_round
        assert total(store) == appends * 10
    finally:
        store.close()
