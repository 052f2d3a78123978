"""The asyncio↔Trio bridge: one asyncio event loop in one worker thread for every asyncio
library the engine uses (pymodbus, asyncua, aiocoap), driven from Trio.

Contract (what a binding author relies on)
------------------------------------------
``await aio.run(factory)`` (from Trio)
    ``factory`` is a zero-argument callable that is **called on the asyncio thread** and
    returns an awaitable (``lambda: client.read_holding_registers(0, count=10)``) or a plain
    value (``lambda: ctx.setValues(...)``: a synchronous touch of a library object). Library
    objects are created and used **only** on the asyncio thread, so build them inside a
    factory too (``client = await aio.run(lambda: make_client())`` is fine: the object is
    created there; keep it and pass it back in later factories).

    * The result is returned to the Trio caller; an exception raised by the asyncio code is
      raised in the Trio caller unchanged (same object, traceback kept).
    * The Trio caller waits without blocking a thread: the asyncio task's done-callback wakes
      it through the Trio token (``TrioToken.run_sync_soon``).
    * Cancellation: when the Trio caller is cancelled (a cancel scope, ``move_on_after``,
      ``fail_after``), the asyncio task is cancelled, and cancelled again every
      ``RECANCEL`` seconds until it has really ended (Python 3.11's ``asyncio.wait_for`` can
      swallow one cancel); the Trio caller waits for that end at most ``CANCEL_GRACE``
      seconds (shielded), then raises ``trio.Cancelled`` as usual. A hung asyncio call is
      therefore bounded by the caller's Trio cancel scope, nothing else.
    * If the asyncio task is cancelled from the asyncio side (not by Trio), the caller gets
      :class:`AioCancelled`.

``aio.channel(max_buffer)`` (from Trio) → ``(push, receive)``
    For asyncio callbacks (subscriptions, CoAP observe, a Modbus server's write hook): call
    ``push(item)`` **on the asyncio thread** (or any thread); it never blocks and never
    raises. The item arrives in the Trio ``receive`` channel in order. When the buffer is full
    the item is dropped and counted (``push.dropped``); after the receiver is closed or the
    Trio run ended, items are dropped silently. ``push.close()`` closes the send side (the
    receiver then ends its ``async for``).

Lifecycle
    The loop starts lazily on the first ``run``/``channel`` and is stopped with the engine:
    the engine holds ``async with aio.lifetime():``; when the last holder leaves, the loop's
    remaining tasks are cancelled, async generators closed and the thread joined (bounded).
    A later ``run`` starts a fresh loop. ``aio.shutdown()`` stops it explicitly (tests,
    atexit).

Overhead (``python benchmarks/protocols/bridge.py``, 2-core VM): one sequential caller ~85 µs
per round trip (two thread wake-ups; ``trio.to_thread.run_sync`` costs the same here), 10
concurrent callers ~25 µs per call amortised; plain asyncio awaits the same coroutine in 1-2 µs.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import inspect
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, TypeVar, overload

import trio

log = logging.getLogger(__name__)

T = TypeVar("T")

RECANCEL = 0.05
"""Seconds between repeated cancels of an asyncio task whose Trio caller was cancelled."""
CANCEL_GRACE = 2.0
"""How long a cancelled Trio caller waits (shielded) for its asyncio task to end."""
STOP_TIMEOUT = 5.0
"""How long shutdown waits for the loop's remaining tasks to end."""


class AioCancelled(RuntimeError):
    """The asyncio task was cancelled on the asyncio side (not by the Trio caller)."""


class AioLoop:
    """One asyncio loop in one daemon thread. Thread-safe start/stop."""

    def __init__(self, name: str = "twin-asyncio") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.users = 0
        self.calls = 0  # run() calls submitted (for /metrics and benchmarks)

    @property
    def running(self) -> bool:
        return self._loop is not None

    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, started if needed."""
        loop = self._loop
        if loop is not None:
            return loop
        with self._lock:
            if self._loop is None:
                ready = threading.Event()
                new = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=self._main, args=(new, ready), name=self.name, daemon=True
                )
                thread.start()
                ready.wait()
                self._loop, self._thread = new, thread
            return self._loop

    @staticmethod
    def _main(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
            # stopped: end what is left, bounded
            tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in tasks:
                t.cancel()
            if tasks:
                gathered = asyncio.gather(*tasks, return_exceptions=True)
                with contextlib.suppress(Exception):
                    loop.run_until_complete(asyncio.wait_for(gathered, STOP_TIMEOUT))
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    def shutdown(self, timeout: float = STOP_TIMEOUT + 1) -> None:
        """Stop the loop (cancelling its tasks) and join the thread. Idempotent."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):  # already closed
            loop.call_soon_threadsafe(loop.stop)
        if thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning("aio: the asyncio thread did not stop within %.1f s", timeout)


DEFAULT = AioLoop()
atexit.register(DEFAULT.shutdown)


def shutdown() -> None:
    DEFAULT.shutdown()


@contextlib.asynccontextmanager
async def lifetime(bridge: AioLoop = DEFAULT) -> AsyncIterator[AioLoop]:
    """Hold the bridge while the block runs (the engine's run); the last holder to leave
    stops the loop (in a worker thread, shielded and bounded)."""
    bridge.users += 1
    try:
        yield bridge
    finally:
        bridge.users -= 1
        if bridge.users == 0 and bridge.running:
            with trio.move_on_after(STOP_TIMEOUT + 2) as scope:
                scope.shield = True
                await trio.to_thread.run_sync(bridge.shutdown)


class _Call:
    """The state of one run(): touched on the asyncio thread until ``done`` is set (which
    happens on the Trio thread, after the asyncio side has written ``outcome``)."""

    __slots__ = ("cancel_requested", "error", "finished", "ok", "task", "value")

    def __init__(self) -> None:
        self.task: asyncio.Future[Any] | None = None
        self.ok = False
        self.value: Any = None
        self.error: BaseException | None = None
        self.finished = False
        self.cancel_requested = False


@overload
async def run(factory: Callable[[], Awaitable[T]], *, bridge: AioLoop = ...) -> T: ...
@overload
async def run(factory: Callable[[], T], *, bridge: AioLoop = ...) -> T: ...


async def run(factory: Callable[[], Any], *, bridge: AioLoop = DEFAULT) -> Any:
    """Run ``factory()`` on the asyncio thread and return its (awaited) result. See the
    module docstring for the contract."""
    loop = bridge.loop()
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    call = _Call()
    bridge.calls += 1

    def wake() -> None:  # asyncio thread
        call.finished = True
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(done.set)

    def on_done(fut: asyncio.Future[Any]) -> None:  # asyncio thread
        if fut.cancelled():
            call.error = AioCancelled("the asyncio task was cancelled")
        else:
            exc = fut.exception()
            if exc is None:
                call.ok, call.value = True, fut.result()
            else:
                call.error = exc
        wake()

    def start() -> None:  # asyncio thread
        if call.cancel_requested:  # cancelled before it started
            call.error = AioCancelled("cancelled before start")
            wake()
            return
        try:
            res = factory()
            if inspect.isawaitable(res):
                task = asyncio.ensure_future(res)
            else:
                call.ok, call.value = True, res
                wake()
                return
        except Exception as exc:  # handed to the Trio caller
            call.error = exc
            wake()
            return
        call.task = task
        task.add_done_callback(on_done)

    def cancel() -> None:  # asyncio thread, after start() (FIFO)
        task = call.task
        if task is None or task.done():
            return
        task.cancel()
        loop.call_later(RECANCEL, cancel)  # until it has really ended

    loop.call_soon_threadsafe(start)
    try:
        await done.wait()
    except trio.Cancelled:
        call.cancel_requested = True
        with contextlib.suppress(RuntimeError):  # loop closed meanwhile
            loop.call_soon_threadsafe(cancel)
        with trio.move_on_after(CANCEL_GRACE) as scope:
            scope.shield = True
            await done.wait()
        if not call.finished:
            log.warning("aio: an asyncio task did not end within %.1f s of its cancel", CANCEL_GRACE)
        raise
    if call.ok:
        return call.value
    assert call.error is not None
    raise call.error


class Push(Generic[T]):
    """The asyncio side of :func:`channel`: ``push(item)`` from any thread, never blocks."""

    def __init__(self, send: trio.MemorySendChannel[T], token: trio.lowlevel.TrioToken) -> None:
        self._send = send
        self._token = token
        self.dropped = 0
        self.closed = False

    def _deliver(self, item: T) -> None:  # Trio thread
        if self.closed:
            return
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            self.dropped += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.closed = True

    def __call__(self, item: T) -> None:
        if self.closed:
            return
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._deliver, item)

    def _close(self) -> None:  # Trio thread
        self.closed = True
        self._send.close()

    def close(self) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._close)


def channel(max_buffer: int = 256) -> tuple[Push[Any], trio.MemoryReceiveChannel[Any]]:
    """``(push, receive)``: asyncio callbacks ``push(item)``; Trio reads ``receive``."""
    send, receive = trio.open_memory_channel[Any](max_buffer)
    return Push(send, trio.lowlevel.current_trio_token()), receive
