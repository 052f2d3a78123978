from __future__ import annotations

import pytest
import trio

from twin.control.ledger import (
    SENT,
    TERMINAL,
    CommandStatus,
    IllegalTransition,
    Ledger,
    MemoryStore,
    legal,
)
from twin.errors import BindingConnectError, BindingError, CommandError

from .helpers import FakeTransport, make_ledger


def statuses(cmd: object) -> list[str]:
    return [s for s, _ in cmd.transitions]  # type: ignore[attr-defined]


async def test_validation_rejects_before_queueing(autojump_clock: trio.abc.Clock) -> None:
    ledger, store, _ = make_ledger()
    async with trio.open_nursery() as n:
        await n.start(ledger.run)
        with pytest.raises(CommandError, match=r"params\.state"):
            await ledger.submit("fan_01", "set_state", {"state": "on"})
        with pytest.raises(CommandError, match="no command 'ptz'"):
            await ledger.submit("fan_01", "ptz", {})
        with pytest.raises(CommandError, match="no device"):
            await ledger.submit("nope", "reboot")
        with pytest.raises(CommandError, match="read-only"):
            await ledger.submit("fan_01", "set", {"property": "firmware", "value": "x"})
        with pytest.raises(CommandError, match="above the maximum"):
            await ledger.submit("fan_01", "set", {"property": "speed", "value": 101})
        with pytest.raises(CommandError, match="no command 'reboot'"):
            await ledger.submit("temp_01", "reboot")  # its model declares no commands
        # a device without a model gets the seed's command types and schemas
        with pytest.raises(CommandError, match=r"params\.rate"):
            await ledger.submit("legacy", "set_sampling_rate", {"rate": 0})
        ok = await ledger.submit("legacy", "set_sampling_rate", {"rate": 5})
        assert ok.type == "set_sampling_rate"
        assert len(store.rows) == 1
        n.cancel_scope.cancel()


async def test_success_path_records_every_transition(autojump_clock: trio.abc.Clock) -> None:
    ledger, store, _ = make_ledger()
    async with trio.open_nursery() as n:
        await n.start(ledger.run)
        cmd = await ledger.submit("fan_01", "set_state", {"state": True}, source="api")
        done = await ledger.wait(cmd.id)
        assert done.status is CommandStatus.SUCCESS
        assert statuses(done) == ["pending", "sent", "success"]
        assert done.result == {"ok": True}
        assert done.deadline == done.created_at + 30
        reboot = await ledger.submit("fan_01", "reboot")
        assert reboot.timeout == 10.0  # the model's timeout
        await ledger.wait(reboot.id)
        await ledger.flushed()
        assert store.rows[cmd.id].status == "success"
        assert [s for s, _ in store.rows[cmd.id].transitions] == ["pending", "sent", "success"]
        n.cancel_scope.cancel()


async def test_per_device_queue_is_ordered_one_in_flight(autojump_clock: trio.abc.Clock) -> None:
    ledger, _, transport = make_ledger(transport=FakeTransport(reply=SENT))
    async with trio.open_nursery() as n:
        await n.start(ledger.run)
        a = await ledger.submit("fan_01", "set_state", {"state": True})
        b = await ledger.submit("fan_01", "set_state", {"state": False})
        c = await ledger.submit("fan_02", "reboot")
        await trio.sleep(1)
        assert transport.sent == [a.id, c.id]  # b waits for a; fan_02 is independent
        await ledger.report(a.id, "executing")
        await ledger.report(a.id, "success", result={"power": True})
        await trio.sleep(1)
        assert transport.sent == [a.id, c.id, b.id]
        assert statuses(a) == ["pending", "sent", "executing", "success"]
        with pytest.raises(IllegalTransition):
            await ledger.report(a.id, "failed", error="late")
        n.cancel_scope.cancel()


async def test_transport_failures_retry_with_backoff(autojump_clock: trio.abc.Clock) -> None:
    ledger, _, transport = make_ledger()
    transport.failures.extend([BindingConnectError("down"), BindingConnectError("down")])
    async with trio.open_nursery() as n:
        await n.start(ledger.run)
        t0 = trio.current_time()
        cmd = await ledger.submit("fan_01", "reboot")
        done = await ledger.wait(cmd.id)
        assert done.status is CommandStatus.SUCCESS
        assert done.attempts == 3
        assert trio.current_time() - t0 == pytest.approx(0.5 + 1.0)
        # a permanent failure fails at once
        transport.failures.append(BindingError("bad register"))
        bad = await ledger.wait((await ledger.submit("fan_01", "reboot")).id)
        assert bad.status is CommandStatus.FAILED and bad.error == "bad register"
        transport.failures.append(CommandError("refused"))
        bad = await ledger.wait((await ledger.submit("fan_01", "reboot")).id)
        assert bad.status is CommandStatus.FAILED
        n.cancel_scope.cancel()


async def test_engine_enforces_timeouts(autojump_clock: trio.abc.Clock) -> None:
    ledger, _, transport = make_ledger(transport=FakeTransport(reply=SENT))
    async with trio.open_nursery() as n:
        await n.start(ledger.run)
        t0 = trio.current_time()
        cmd = await ledger.submit("fan_01", "set_state", {"state": True}, command_timeout=5)
        queued = await ledger.submit("fan_01", "reboot")  # 10 s, waits behind cmd
        done = await ledger.wait(cmd.id)
        assert done.status is CommandStatus.TIMEOUT
        assert trio.current_time() - t0 == pytest.approx(5)
        await trio.sleep(0.1)
        assert transport.sent == [cmd.id, queued.id]  # the queue moved on
        # retries that never succeed end at the deadline too
        transport.failures.extend(BindingConnectError("down") for _ in range(100))
        stuck = await ledger.wait((await ledger.submit("fan_02", "reboot")).id)
        assert stuck.status is CommandStatus.TIMEOUT and stuck.attempts > 1
        n.cancel_scope.cancel()


async def test_cancel_semantics(autojump_clock: trio.abc.Clock) -> None:
    ledger, _, transport = make_ledger(transport=FakeTransport(reply=SENT))
    async with trio.open_nursery() as n:
        await n.start(ledger.run)
        first = await ledger.submit("fan_01", "reboot")
        second = await ledger.submit("fan_01", "reboot")
        await trio.sleep(0.1)
        # pending → cancelled at once
        await ledger.cancel(second.id)
        assert second.status is CommandStatus.CANCELLED
        # sent → a cancel goes to the device; its answer is recorded
        await ledger.cancel(first.id)
        assert transport.cancels == [first.id] and first.cancel_requested
        assert first.status is CommandStatus.SENT
        await ledger.report(first.id, "cancelled")
        assert first.status is CommandStatus.CANCELLED
        with pytest.raises(IllegalTransition):
            await ledger.cancel(first.id)
        # the device finished before it saw the cancel: the outcome is what happened
        third = await ledger.submit("fan_01", "reboot")
        await trio.sleep(0.1)
        await ledger.cancel(third.id)
        await ledger.report(third.id, "success")
        assert third.status is CommandStatus.SUCCESS
        # a device that never answers: cancelled at the deadline, saying so
        fourth = await ledger.submit("fan_01", "reboot")
        await trio.sleep(0.1)
        await ledger.cancel(fourth.id)
        done = await ledger.wait(fourth.id)
        assert done.status is CommandStatus.CANCELLED and "did not confirm" in (done.error or "")
        # a transport that confirms at once
        transport.cancel_confirms = True
        fifth = await ledger.submit("fan_02", "reboot")
        await trio.sleep(0.1)
        await ledger.cancel(fifth.id)
        assert fifth.status is CommandStatus.CANCELLED
        n.cancel_scope.cancel()


async def test_idempotency_key(autojump_clock: trio.abc.Clock) -> None:
    ledger, store, _ = make_ledger()
    async with trio.open_nursery() as n:
        await n.start(ledger.run)
        a = await ledger.submit("fan_01", "reboot", idempotency_key="k")
        b = await ledger.submit("fan_01", "reboot", idempotency_key="k")
        c = await ledger.submit("fan_02", "reboot", idempotency_key="k")
        assert a.id == b.id != c.id
        n.cancel_scope.cancel()
    # and across a restart (the store enforces it)
    again, _, _ = make_ledger(store=store)
    async with trio.open_nursery() as n:
        await n.start(again.run)
        d = await again.submit("fan_01", "reboot", idempotency_key="k")
        assert d.id == a.id
        n.cancel_scope.cancel()


async def test_restart_recovery(autojump_clock: trio.abc.Clock) -> None:
    store = MemoryStore()
    ledger, _, transport = make_ledger(store, FakeTransport(reply=SENT))
    async with trio.open_nursery() as n:
        await n.start(ledger.run)
        sent = await ledger.submit("fan_01", "reboot", command_timeout=100)
        pending = await ledger.submit("fan_01", "reboot", command_timeout=100)
        short = await ledger.submit("fan_02", "reboot", command_timeout=100)
        expiring = await ledger.submit("fan_03", "reboot", command_timeout=2)
        transport.failures.append(BindingConnectError("x"))
        await trio.sleep(0.1)
        await ledger.report(short.id, "executing")
        await ledger.flushed()
        n.cancel_scope.cancel()  # the engine stops
    await trio.sleep(10)  # ... and is down for 10 s: `expiring` passed its deadline
    transport2 = FakeTransport()
    again = Ledger(store, transport2, ledger.catalog, clock=trio.current_time, threaded=False)
    async with trio.open_nursery() as n:
        await n.start(again.run)
        assert (await again.get(expiring.id)).status is CommandStatus.TIMEOUT
        assert "engine was down" in ((await again.get(expiring.id)).error or "")
        # sent/executing wait for the device (or their deadline); pending resume in order
        assert (await again.get(sent.id)).status is CommandStatus.SENT
        await again.report(sent.id, "success")
        done = await again.wait(pending.id)
        assert done.status is CommandStatus.SUCCESS
        assert transport2.sent == [pending.id]
        late = await again.wait(short.id)
        assert late.status is CommandStatus.TIMEOUT
        new = await again.submit("fan_01", "reboot")
        assert new.seq > pending.seq
        await again.flushed()
        assert all(r.status in TERMINAL for r in store.rows.values() if r.id != new.id)
        n.cancel_scope.cancel()


async def test_long_poll_path(autojump_clock: trio.abc.Clock) -> None:
    ledger, _, transport = make_ledger()
    async with trio.open_nursery() as n:
        await n.start(ledger.run)
        got: list[dict[str, object]] = []

        async def device() -> None:
            got.append(await ledger.poll("door", wait=30))

        n.start_soon(device)
        await trio.sleep(5)
        assert got == []
        cmd = await ledger.submit("door", "set_state", {"state": True})
        await trio.sleep(0.1)
        assert got[0]["commands"] == [
            {"id": cmd.id, "type": "set_state", "params": {"state": True}, "deadline": cmd.deadline}
        ]
        assert cmd.status is CommandStatus.SENT and transport.sent == []
        await ledger.report(cmd.id, "success", device="door")
        assert cmd.status is CommandStatus.SUCCESS
        # nothing pending: the poll returns empty after its wait
        assert await ledger.poll("door", wait=1) == {"commands": [], "cancel": []}
        # cancel of a sent command is handed out on the next poll
        c2 = await ledger.submit("door", "reboot")
        await ledger.poll("door")
        await ledger.cancel(c2.id)
        assert await ledger.poll("door") == {"commands": [], "cancel": [c2.id]}
        n.cancel_scope.cancel()


async def test_batch_by_ids_and_selector(autojump_clock: trio.abc.Clock) -> None:
    ledger, _, _ = make_ledger()
    async with trio.open_nursery() as n:
        await n.start(ledger.run)
        res = await ledger.submit_batch("set_state", {"state": True}, selector="tag=hvac")
        by = {r["device"]: r for r in res.results}
        assert set(by) == {"fan_01", "fan_02", "temp_01"}
        assert by["fan_01"]["accepted"] and not by["temp_01"]["accepted"]
        assert res.status == "partial"
        res2 = await ledger.submit_batch("reboot", devices=["fan_01", "fan_03"])
        assert res2.status == "accepted"
        for r in res2.results:
            assert (await ledger.wait(r["command"])).batch == res2.batch
        with pytest.raises(CommandError):
            await ledger.submit_batch("reboot", selector="tag=nothing")
        n.cancel_scope.cancel()


def test_transition_table_is_a_dag_ending_in_terminal_states() -> None:
    for s in CommandStatus:
        for t in CommandStatus:
            if s in TERMINAL:
                assert not legal(s, t)
        assert not legal(s, CommandStatus.PENDING)
    assert legal(CommandStatus.SENT, CommandStatus.EXECUTING)
    assert not legal(CommandStatus.EXECUTING, CommandStatus.SENT)


async def test_restart_recovery_on_the_sqlite_registry(
    tmp_path: object, autojump_clock: trio.abc.Clock
) -> None:
    from pathlib import Path

    from twin.registry import open_registry

    reg = open_registry(None, Path(str(tmp_path)) / "state")
    catalog = make_ledger()[0].catalog
    ledger = Ledger(
        reg, FakeTransport(reply=SENT), catalog, clock=trio.current_time, threaded=False
    )
    async with trio.open_nursery() as n:
        await n.start(ledger.run)
        sent = await ledger.submit("fan_01", "reboot", command_timeout=100)
        waiting = await ledger.submit("fan_01", "reboot", command_timeout=100)
        expiring = await ledger.submit("door", "reboot", command_timeout=5)
        await trio.sleep(0.1)
        n.cancel_scope.cancel()
    await trio.sleep(20)
    transport = FakeTransport()
    again = Ledger(reg, transport, catalog, clock=trio.current_time, threaded=False)
    async with trio.open_nursery() as n:
        await n.start(again.run)
        assert (await again.get(expiring.id)).status is CommandStatus.TIMEOUT
        assert (await again.get(sent.id)).status is CommandStatus.SENT
        await again.report(sent.id, "success")
        assert (await again.wait(waiting.id)).status is CommandStatus.SUCCESS
        await again.flushed()
        n.cancel_scope.cancel()
    rows = {r.id: r for r in reg.commands(limit=10)}
    assert [s for s, _ in rows[expiring.id].transitions] == ["pending", "timeout"]
    assert [s for s, _ in rows[waiting.id].transitions] == ["pending", "sent", "success"], [
        (r.seq, r.device, r.transitions) for r in rows.values()
    ]
    reg.close()
