"""The asyncio↔Trio bridge: one asyncio event loop in one worker thread for every asyncio
library the engine uses (asyncua, aiocoap; pymodbus' serial client, its servers and the Modbus
simulators — Modbus TCP polling is Trio-native, twin/bindings/modbus_transport.py), driven
from Trio.

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

Hand-offs (batched: one wake-up per tick each way, however many calls)
    Trio→asyncio: ``run`` queues the call in its Trio run; an instrument's ``before_io_wait``
    (the end of a Trio tick) hands the queued calls over in one ``call_soon_threadsafe`` when
    Trio is about to sleep (or after ``HOLD`` busy ticks). asyncio→Trio: results (and
    ``push`` items sent on the bridge thread) are queued per Trio run and posted by the
    loop's selector when the loop is about to sleep (or after ``HOLD`` busy iterations), one
    ``TrioToken.run_sync_soon`` per Trio run; the Trio caller is rescheduled
    directly (no Event). Each wake-up is posted as the poster goes idle, so the woken thread
    does not fight it for the GIL.
Supervision
    If an exception escapes the loop (``SystemExit`` in a task), the thread ends: every call in
    flight fails with :class:`AioLoopDied` and the next call starts a new loop
    (``AioLoop.restarts``).

Overhead: ``python benchmarks/protocols/bridge.py`` and ``benchmarks/protocols/modbus.py``
(figures in benchmarks/README.md, "Session 6: asyncio bridge").
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import inspect
import logging
import selectors
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
HOLD = 8
"""Busy iterations (asyncio loop) or ticks (Trio) a hand-off may wait for more to carry;
it goes at once when its side is about to sleep."""
STOP_TIMEOUT = 5.0
"""How long shutdown waits for the loop's remaining tasks to end."""


class AioCancelled(RuntimeError):
    """The asyncio task was cancelled on the asyncio side (not by the Trio caller)."""


class AioLoopDied(RuntimeError):
    """The asyncio thread ended (an exception escaped its loop) while this call was in it."""


_here = threading.local()  # .runner on a bridge thread: the _Runner that thread runs


def _deliver(items: list[tuple[Callable[[Any], object], Any]]) -> None:  # Trio thread
    for fn, arg in items:
        fn(arg)


def _post_direct(token: trio.lowlevel.TrioToken, fn: Callable[[Any], object], arg: Any) -> None:
    with contextlib.suppress(trio.RunFinishedError):
        token.run_sync_soon(fn, arg)


class _Selector(selectors.DefaultSelector):
    """The loop's selector: before the loop sleeps (or polls), what its last iteration
    produced for Trio is posted, one ``run_sync_soon`` per Trio run."""

    def __init__(self, runner: _Runner) -> None:
        super().__init__()
        self._runner = runner

    def select(self, timeout: float | None = None) -> Any:
        runner = self._runner
        if runner.out:
            # only when the loop is about to sleep (more comes back in one wake-up), or after
            # HOLD busy iterations
            if timeout != 0 or runner.held >= HOLD:
                runner.flush()
            else:
                runner.held += 1
        return super().select(timeout)


def _library_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's exception handler: an error in a library's own callback (a timer aiocoap
    left behind after its transport closed, an unretrieved task exception) is one warning
    line; the traceback only with debug logging. asyncio's default prints a traceback to
    stderr, which reads like the engine crashed; the loop and every other call go on."""
    exc = context.get("exception")
    what = context.get("message") or "error in an asyncio callback"
    detail = f": {type(exc).__name__}: {exc}" if exc is not None else ""
    debug = log.isEnabledFor(logging.DEBUG)
    log.warning(
        "aio: %s%s (dropped; the loop goes on)", what, detail, exc_info=exc if debug else None
    )


class _Runner:
    """The asyncio side of one start of an :class:`AioLoop`: its loop, its thread, the calls
    in flight and the outbox to Trio. ``out`` and ``inflight`` are touched only on its
    thread."""

    def __init__(self, bridge: AioLoop) -> None:
        self.bridge = bridge
        self.loop = asyncio.SelectorEventLoop(_Selector(self))
        self.loop.set_exception_handler(_library_error)
        self.out: dict[trio.lowlevel.TrioToken, list[tuple[Callable[[Any], object], Any]]] = {}
        self.inflight: set[_Call] = set()
        self.held = 0  # loop iterations the outbox was held (busy loop)
        self.batches = 0  # start_batch() runs: Trio→asyncio hand-offs (benchmarks)
        self.flushes = 0  # run_sync_soon posts: asyncio→Trio hand-offs (benchmarks)
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._main, name=bridge.name, daemon=True)

    # -- asyncio thread ----------------------------------------------------------------------
    def post(self, token: trio.lowlevel.TrioToken, fn: Callable[[Any], object], arg: Any) -> None:
        """Queue ``fn(arg)`` for the Trio run of ``token``; sent when the loop next selects."""
        box = self.out.get(token)
        if box is None:
            self.out[token] = [(fn, arg)]
        else:
            box.append((fn, arg))

    def flush(self) -> None:
        self.held = 0
        out, self.out = self.out, {}
        for token, items in out.items():
            self.flushes += 1
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(_deliver, items)

    def finish(self, call: _Call) -> None:
        if call.finished:  # failed when the thread died; its task ended later
            return
        self.inflight.discard(call)
        call.finished = True
        self.post(call.token, _Call.wake, call)

    def start_batch(self, calls: list[_Call]) -> None:
        self.batches += 1
        for call in calls:
            self.start(call)

    def start(self, call: _Call) -> None:
        if call.cancel_requested:  # cancelled before it started
            call.error = AioCancelled("cancelled before start")
            self.finish(call)
            return
        try:
            res = call.factory()
            if not inspect.isawaitable(res):
                call.ok, call.value = True, res
                self.finish(call)
                return
            task = asyncio.ensure_future(res, loop=self.loop)
        except Exception as exc:  # handed to the Trio caller
            call.error = exc
            self.finish(call)
            return
        call.task = task
        self.inflight.add(call)
        task.add_done_callback(call.on_done)

    def cancel(self, call: _Call) -> None:  # after start() (FIFO), or start() sees the flag
        task = call.task
        if task is None or task.done():
            return
        task.cancel()
        self.loop.call_later(RECANCEL, self.cancel, call)  # until it has really ended

    def _main(self) -> None:
        loop = self.loop
        _here.runner = self
        asyncio.set_event_loop(loop)
        loop.call_soon(self.ready.set)
        try:
            try:
                loop.run_forever()
            except BaseException as exc:  # escaped the loop (SystemExit in a task...): dying
                log.error("aio: the asyncio thread died: %r; the next call starts a new one", exc)
                self.bridge._died(self)
                for call in list(self.inflight):
                    task = call.task
                    if task is not None and task.done() and not task.cancelled():
                        task.exception()  # retrieved: it is the cause reported here
                    call.error = AioLoopDied(f"the asyncio thread died: {exc!r}")
                    self.finish(call)
            # stopped: end what is left, bounded
            tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in tasks:
                t.cancel()
            if tasks:
                gathered = asyncio.gather(*tasks, return_exceptions=True)
                with contextlib.suppress(BaseException):
                    loop.run_until_complete(asyncio.wait_for(gathered, STOP_TIMEOUT))
            with contextlib.suppress(BaseException):
                loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            self.flush()
            with contextlib.suppress(Exception):
                loop.close()


class AioLoop:
    """One asyncio loop in one daemon thread. Thread-safe start/stop; if the thread dies
    (an exception escaped the loop), its calls in flight fail with :class:`AioLoopDied` and
    the next call starts a new loop (``restarts`` counts them)."""

    def __init__(self, name: str = "twin-asyncio") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._runner: _Runner | None = None
        self.users = 0
        self.calls = 0  # run() calls submitted (for /metrics and benchmarks)
        self.restarts = 0  # new loops after the thread died

    @property
    def running(self) -> bool:
        return self._runner is not None

    def runner(self) -> _Runner:
        """The running loop's runner, started if needed."""
        runner = self._runner
        if runner is not None:
            return runner
        with self._lock:
            if self._runner is None:
                runner = _Runner(self)
                runner.thread.start()
                runner.ready.wait()
                self._runner = runner
            return self._runner

    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, started if needed."""
        return self.runner().loop

    def _died(self, runner: _Runner) -> None:  # the dying runner's thread
        with self._lock:
            if self._runner is runner:
                self._runner = None
                self.restarts += 1

    def _submit(self, calls: list[_Call]) -> None:
        """Trio thread: hand a batch of calls to the asyncio thread (one wake-up)."""
        for _ in range(2):
            runner = self.runner()
            for call in calls:
                call.runner = runner
            try:
                runner.loop.call_soon_threadsafe(runner.start_batch, calls)
            except RuntimeError:  # that loop closed meanwhile: a fresh one, once
                self._died(runner)
                continue
            return
        for call in calls:
            call.error = AioLoopDied("the asyncio loop is closed")
            call.finished = True
            call.wake()

    def shutdown(self, timeout: float = STOP_TIMEOUT + 1) -> None:
        """Stop the loop (cancelling its tasks) and join the thread. Idempotent."""
        with self._lock:
            runner, self._runner = self._runner, None
        if runner is None:
            return
        with contextlib.suppress(RuntimeError):  # already closed
            runner.loop.call_soon_threadsafe(runner.loop.stop)
        if runner.thread is not threading.current_thread():
            runner.thread.join(timeout)
            if runner.thread.is_alive():
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
    """The state of one run(). Written on the asyncio thread until ``finished`` is set there;
    the Trio caller reads it after ``wake`` (posted after ``finished``) set ``done``."""

    __slots__ = ("cancel_requested", "delivered", "done", "error", "factory", "finished", "ok",
                 "runner", "task", "token", "value", "waiter")

    def __init__(self, factory: Callable[[], Any], token: trio.lowlevel.TrioToken) -> None:
        self.factory = factory
        self.token = token
        self.waiter: trio.lowlevel.Task | None = None  # the Trio caller, parked
        self.done: trio.Event | None = None  # after its cancel: the shielded wait for the end
        self.delivered = False
        self.runner: _Runner | None = None  # set when handed to the asyncio thread
        self.task: asyncio.Future[Any] | None = None
        self.ok = False
        self.value: Any = None
        self.error: BaseException | None = None
        self.finished = False
        self.cancel_requested = False

    def on_done(self, fut: asyncio.Future[Any]) -> None:  # asyncio thread
        if self.finished:  # failed when the thread died
            return
        if fut.cancelled():
            self.error = AioCancelled("the asyncio task was cancelled")
        else:
            exc = fut.exception()
            if exc is None:
                self.ok, self.value = True, fut.result()
            else:
                self.error = exc
        assert self.runner is not None
        self.runner.finish(self)

    def wake(self) -> None:  # Trio thread
        self.delivered = True
        waiter, self.waiter = self.waiter, None
        if waiter is not None:
            trio.lowlevel.reschedule(waiter)
        elif self.done is not None:
            self.done.set()


class _Outgoing(trio.abc.Instrument):
    """One Trio run's calls not yet handed over, by bridge: sent in one batch per bridge when
    the run is about to wait for I/O (the end of its tick), so the tasks that called in one
    tick cost the asyncio thread one wake-up."""

    def __init__(self) -> None:
        self.pending: dict[AioLoop, list[_Call]] = {}
        self.held = 0

    def before_io_wait(self, timeout: float) -> None:
        if self.pending:
            if timeout == 0 and self.held < HOLD:  # more runnable tasks: they may call too
                self.held += 1
                return
            self.held = 0
            pending, self.pending = self.pending, {}
            for bridge, calls in pending.items():
                try:
                    bridge._submit(calls)
                except Exception as exc:  # never disable the instrument
                    log.exception("aio: handing calls to the asyncio thread failed")
                    for call in calls:
                        call.error, call.finished = exc, True
                        call.wake()


_OUTGOING: trio.lowlevel.RunVar[_Outgoing] = trio.lowlevel.RunVar("twin_aio_outgoing")


def _outgoing() -> _Outgoing:
    try:
        return _OUTGOING.get()
    except LookupError:
        out = _Outgoing()
        _OUTGOING.set(out)
        trio.lowlevel.add_instrument(out)
        return out


@overload
async def run(factory: Callable[[], Awaitable[T]], *, bridge: AioLoop = ...) -> T: ...
@overload
async def run(factory: Callable[[], T], *, bridge: AioLoop = ...) -> T: ...


async def run(factory: Callable[[], Any], *, bridge: AioLoop = DEFAULT) -> Any:
    """Run ``factory()`` on the asyncio thread and return its (awaited) result. See the
    module docstring for the contract."""
    bridge.runner()  # started now (not inside the Trio run loop's hand-off)
    call = _Call(factory, trio.lowlevel.current_trio_token())
    bridge.calls += 1
    out = _outgoing()
    batch = out.pending.get(bridge)
    if batch is None:
        out.pending[bridge] = [call]
    else:
        batch.append(call)
    call.waiter = trio.lowlevel.current_task()

    def abort(_: Any) -> trio.lowlevel.Abort:
        call.waiter = None
        return trio.lowlevel.Abort.SUCCEEDED

    try:
        await trio.lowlevel.wait_task_rescheduled(abort)
    except trio.Cancelled:
        call.cancel_requested = True
        runner = call.runner
        if runner is None:  # not handed over yet: it never runs
            batch = out.pending.get(bridge)
            if batch is not None and call in batch:
                batch.remove(call)
            raise
        with contextlib.suppress(RuntimeError):  # loop closed meanwhile
            runner.loop.call_soon_threadsafe(runner.cancel, call)
        if not call.delivered:
            call.done = trio.Event()
            with trio.move_on_after(CANCEL_GRACE) as scope:
                scope.shield = True
                await call.done.wait()
        if not call.finished:
            log.warning("aio: an asyncio task did not end within %.1f s of its cancel", CANCEL_GRACE)
        raise
    if call.ok:
        return call.value
    assert call.error is not None
    raise call.error


class Push(Generic[T]):
    """The asyncio side of :func:`channel`: ``push(item)`` from any thread, never blocks.
    On a bridge thread the items go out with that loop iteration's batch (in order)."""

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

    def _post(self, fn: Callable[[Any], object], arg: Any) -> None:
        runner = getattr(_here, "runner", None)
        if runner is not None:
            runner.post(self._token, fn, arg)
        else:
            _post_direct(self._token, fn, arg)

    def __call__(self, item: T) -> None:
        if self.closed:
            return
        self._post(self._deliver, item)

    def _close(self, _: object = None) -> None:  # Trio thread
        self.closed = True
        self._send.close()

    def close(self) -> None:
        self._post(self._close, None)


def channel(max_buffer: int = 256) -> tuple[Push[Any], trio.MemoryReceiveChannel[Any]]:
    """``(push, receive)``: asyncio callbacks ``push(item)``; Trio reads ``receive``."""
    send, receive = trio.open_memory_channel[Any](max_buffer)
    return Push(send, trio.lowlevel.current_trio_token()), receive
