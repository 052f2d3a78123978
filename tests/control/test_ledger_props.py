"""Property tests of the ledger's state machine: random programs of submits, transport
failures, device reports, cancels, time passing and restarts (graceful or crash)."""

from __future__ import annotations

import itertools
from typing import Any

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twin.control.ledger import (
    SENT,
    TERMINAL,
    CommandStatus,
    IllegalTransition,
    Ledger,
    MemoryStore,
    legal,
)
from twin.errors import BindingConnectError, BindingError

from .helpers import FakeTransport, make_ledger

DEVICES = ["fan_01", "fan_02", "door"]

op = st.one_of(
    st.tuples(st.just("submit"), st.integers(0, 2), st.integers(1, 20)),
    st.tuples(st.just("fail"), st.booleans()),
    st.tuples(
        st.just("report"),
        st.integers(0, 30),
        st.sampled_from(["executing", "success", "failed", "cancelled"]),
    ),
    st.tuples(st.just("cancel"), st.integers(0, 30)),
    st.tuples(
        st.just("poll"),
    ),
    st.tuples(st.just("sleep"), st.floats(0, 6)),
    st.tuples(st.just("restart"), st.booleans()),
)


def check_history(transitions: Any) -> None:
    names = [CommandStatus(s) for s, _ in transitions]
    assert names[0] is CommandStatus.PENDING
    for a, b in itertools.pairwise(names):
        assert legal(a, b), names
    times = [t for _, t in transitions]
    assert times == sorted(times)
    assert sum(1 for s in names if s in TERMINAL) <= 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=st.lists(op, max_size=40), deferred=st.booleans())
def test_ledger_state_machine(program: list[tuple[Any, ...]], deferred: bool) -> None:
    async def main() -> None:
        store = MemoryStore()
        transport = FakeTransport(reply=SENT if deferred else None)
        submitted: list[str] = []

        async def session(ops: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
            ledger, _, _ = make_ledger(store, transport)
            async with trio.open_nursery() as n:
                await n.start(ledger.run)
                for i, o in enumerate(ops):
                    kind = o[0]
                    if kind == "submit":
                        cmd = await ledger.submit(DEVICES[o[1]], "reboot", command_timeout=o[2])
                        submitted.append(cmd.id)
                    elif kind == "fail":
                        transport.failures.append(
                            BindingConnectError("flaky") if o[1] else BindingError("broken")
                        )
                    elif kind == "report" and submitted:
                        cid = submitted[o[1] % len(submitted)]
                        before = (await ledger.get(cid)).status
                        try:
                            await ledger.report(cid, o[2])
                        except IllegalTransition:
                            assert before in TERMINAL or not legal(before, CommandStatus(o[2]))
                    elif kind == "cancel" and submitted:
                        cid = submitted[o[1] % len(submitted)]
                        try:
                            await ledger.cancel(cid)
                        except IllegalTransition:
                            assert (await ledger.get(cid)).status in TERMINAL
                    elif kind == "poll":
                        await ledger.poll("door")
                    elif kind == "sleep":
                        await trio.sleep(o[1])
                    elif kind == "restart":
                        if o[1]:  # crash: transitions not yet written are lost
                            ledger._dirty.clear()
                        n.cancel_scope.cancel()
                        return ops[i + 1 :]
                    for cmd in ledger.commands.values():
                        check_history(cmd.transitions)
                # the end: let every deadline pass, keep polling for the polling device
                for _ in range(25):
                    await ledger.poll("door")
                    await trio.sleep(1)
                for cid in submitted:
                    cmd = await ledger.get(cid)
                    assert cmd.status in TERMINAL, cmd
                await ledger.flushed()
                n.cancel_scope.cancel()
            return []

        rest = program
        while True:
            rest = await session(rest)
            if not rest:
                await session([])  # one more start: recovery finishes what was left
                break
        # nothing lost: every command is in the store, finished, with a legal history
        for cid in submitted:
            rec = store.rows[cid]
            assert rec.status in TERMINAL
            check_history(rec.transitions)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_restart_mid_flight_never_leaves_a_command_stuck() -> None:
    async def main() -> None:
        store = MemoryStore()
        ledger, _, _ = make_ledger(store, FakeTransport(reply=SENT))
        async with trio.open_nursery() as n:
            await n.start(ledger.run)
            for _ in range(20):
                await ledger.submit("fan_01", "reboot", command_timeout=5)
            await trio.sleep(0.1)
            n.cancel_scope.cancel()
        await trio.sleep(3)
        again = Ledger(
            store, FakeTransport(), ledger.catalog, clock=trio.current_time, threaded=False
        )
        async with trio.open_nursery() as n:
            await n.start(again.run)
            await trio.sleep(10)
            await again.flushed()
            n.cancel_scope.cancel()
        assert {r.status for r in store.rows.values()} <= {"success", "timeout"}

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
