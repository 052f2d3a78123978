"""The asyncio↔Trio bridge (twin/bindings/aio.py): results, errors, cancellation both ways,
pushes from asyncio callbacks, lifecycle. Real threads and a real asyncio loop (no fakes)."""

from __future__ import annotations

import asyncio
import threading

import pytest
import trio

from twin.bindings import aio


@pytest.fixture
def bridge():
    b = aio.AioLoop(name="test-asyncio")
    yield b
    b.shutdown()


async def test_result_and_runs_on_the_asyncio_thread(bridge: aio.AioLoop) -> None:
    async def work(x: int) -> tuple[int, str, bool]:
        await asyncio.sleep(0.001)
        return x * 2, threading.current_thread().name, asyncio.get_running_loop() is not None

    assert await aio.run(lambda: work(21), bridge=bridge) == (42, "test-asyncio", True)
    # a synchronous factory: its value, computed on the asyncio thread
    assert await aio.run(lambda: threading.current_thread().name, bridge=bridge) == "test-asyncio"


async def test_exception_is_raised_in_the_trio_caller(bridge: aio.AioLoop) -> None:
    class Boom(Exception):
        pass

    async def fail() -> None:
        await asyncio.sleep(0)
        raise Boom("from asyncio")

    with pytest.raises(Boom, match="from asyncio"):
        await aio.run(fail, bridge=bridge)

    def fail_sync() -> None:
        raise ValueError("in the factory")

    with pytest.raises(ValueError, match="in the factory"):
        await aio.run(fail_sync, bridge=bridge)
    # the bridge still works after errors
    assert await aio.run(lambda: 7, bridge=bridge) == 7


async def test_trio_cancel_cancels_the_asyncio_task(bridge: aio.AioLoop) -> None:
    ended = threading.Event()

    async def hang() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            ended.set()

    with trio.move_on_after(0.1) as scope:
        await aio.run(hang, bridge=bridge)
    assert scope.cancelled_caught
    assert ended.is_set()  # the caller waited for the asyncio task's real end


async def test_a_swallowed_cancel_is_repeated_until_the_task_ends(bridge: aio.AioLoop) -> None:
    """Python 3.11's wait_for can swallow a cancel; the bridge cancels again until the end."""
    cancels = []

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancels.append(1)
                if len(cancels) >= 3:
                    raise

    with trio.move_on_after(0.05):
        await aio.run(stubborn, bridge=bridge)
    assert len(cancels) == 3


async def test_a_hung_call_is_bounded_by_fail_after(bridge: aio.AioLoop) -> None:
    with pytest.raises(trio.TooSlowError):
        with trio.fail_after(0.1):
            await aio.run(lambda: asyncio.Event().wait(), bridge=bridge)


async def test_asyncio_side_cancel_raises_aiocancelled(bridge: aio.AioLoop) -> None:
    async def self_cancel() -> None:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().call_soon(task.cancel)
        await asyncio.sleep(3600)

    with pytest.raises(aio.AioCancelled):
        await aio.run(self_cancel, bridge=bridge)


async def test_many_concurrent_calls(bridge: aio.AioLoop) -> None:
    results: list[int] = []

    async def one(i: int) -> None:
        results.append(await aio.run(lambda: asyncio.sleep(0.001, result=i), bridge=bridge))

    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(one, i)
    assert sorted(results) == list(range(200))


async def test_push_from_asyncio_callbacks_into_trio(bridge: aio.AioLoop) -> None:
    push, receive = aio.channel(100)

    def schedule() -> None:  # asyncio thread: a subscription callback firing 50 times
        loop = asyncio.get_running_loop()
        for i in range(50):
            loop.call_later(0.001 * i, push, i)
        loop.call_later(0.06, push.close)

    await aio.run(schedule, bridge=bridge)
    got = [item async for item in receive]
    assert got == list(range(50))
    assert push.dropped == 0


async def test_push_drops_and_counts_when_full(bridge: aio.AioLoop) -> None:
    push, receive = aio.channel(5)

    def burst() -> None:
        for i in range(20):
            push(i)

    await aio.run(burst, bridge=bridge)
    await trio.sleep(0.05)  # let the deliveries run
    got = [receive.receive_nowait() for _ in range(5)]
    assert got == [0, 1, 2, 3, 4]
    assert push.dropped == 15
    receive.close()
    push(99)  # after the receiver closed: dropped silently, never raises
    await trio.sleep(0.01)


async def test_lifetime_stops_the_loop_and_a_later_run_restarts_it(bridge: aio.AioLoop) -> None:
    ended = threading.Event()

    async def background() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            ended.set()

    async with aio.lifetime(bridge):
        async with aio.lifetime(bridge):  # nested holders: the last one stops it
            await aio.run(lambda: asyncio.ensure_future(background()) and None, bridge=bridge)
        assert bridge.running
    assert not bridge.running
    assert ended.is_set()  # the loop's leftover tasks were cancelled at stop
    assert await aio.run(lambda: 5, bridge=bridge) == 5
    assert bridge.running


async def test_one_failing_call_among_concurrent_ones_fails_alone(bridge: aio.AioLoop) -> None:
    """Calls handed over in one batch: one raising (in the factory or in its task) leaves the
    others' results alone."""
    results: dict[int, object] = {}

    async def work(i: int) -> int:
        await asyncio.sleep(0)
        if i == 3:
            raise KeyError(i)
        return i

    def factory(i: int) -> object:
        if i == 5:
            raise ValueError(i)
        return work(i)

    async def one(i: int) -> None:
        try:
            results[i] = await aio.run(lambda: factory(i), bridge=bridge)
        except (KeyError, ValueError) as exc:
            results[i] = type(exc)

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(one, i)
    assert results == {i: KeyError if i == 3 else ValueError if i == 5 else i for i in range(10)}


async def test_the_loop_thread_dying_fails_its_calls_and_the_next_call_restarts_it(
    bridge: aio.AioLoop,
) -> None:
    """SystemExit raised in an asyncio task escapes run_forever and ends the thread: every
    call in flight fails with AioLoopDied (none hangs), and the next call gets a new loop."""
    started = threading.Event()
    outcome: list[BaseException] = []

    async def hang() -> None:
        started.set()
        await asyncio.sleep(3600)

    async def in_flight() -> None:
        try:
            await aio.run(hang, bridge=bridge)
        except aio.AioLoopDied as exc:
            outcome.append(exc)

    async def die() -> None:
        await asyncio.sleep(0)
        raise SystemExit("a library gave up")

    first = bridge.loop()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(in_flight)
        await trio.to_thread.run_sync(started.wait)
        with pytest.raises(aio.AioLoopDied, match="a library gave up"):
            await aio.run(die, bridge=bridge)
    assert len(outcome) == 1
    assert bridge.restarts == 1
    assert await aio.run(lambda: threading.current_thread().name, bridge=bridge) == "test-asyncio"
    assert bridge.loop() is not first


async def test_a_library_callback_error_is_one_warning_line_and_the_loop_goes_on(
    bridge: aio.AioLoop, caplog: pytest.LogCaptureFixture
) -> None:
    """A timer a library left behind raising after its transport closed (aiocoap's empty-ACK
    timeout at shutdown did this): one warning line naming the error, no traceback unless
    debug logging is on, and the loop keeps serving calls."""

    def leftover_timer() -> None:
        raise AttributeError("'NoneType' object has no attribute 'sendmsg'")

    caplog.set_level("INFO", logger="twin.bindings.aio")
    await aio.run(lambda: bridge.loop().call_soon(leftover_timer) and None, bridge=bridge)
    assert await aio.run(lambda: 7, bridge=bridge) == 7
    [record] = [r for r in caplog.records if "sendmsg" in r.getMessage()]
    assert record.levelname == "WARNING"
    assert "Exception in callback" in record.getMessage()
    assert "AttributeError" in record.getMessage()
    assert record.exc_info is None  # the traceback only under debug logging

    caplog.set_level("DEBUG", logger="twin.bindings.aio")
    await aio.run(lambda: bridge.loop().call_soon(leftover_timer) and None, bridge=bridge)
    assert await aio.run(lambda: 8, bridge=bridge) == 8
    assert [r for r in caplog.records if "sendmsg" in r.getMessage()][-1].exc_info is not None
