"""TEMPORARY stand-in for the shared asyncio bridge (lands from the modbus branch)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")

_loop: asyncio.AbstractEventLoop | None = None
_lock = threading.Lock()


def loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None:
            lp = asyncio.new_event_loop()
            threading.Thread(target=lp.run_forever, name="aio-bridge", daemon=True).start()
            _loop = lp
        return _loop


async def run(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    lp = loop()
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    fut: Any = asyncio.run_coroutine_threadsafe(fn(*args), lp)  # type: ignore[arg-type]
    fut.add_done_callback(lambda _f: token.run_sync_soon(done.set))
    try:
        await done.wait()
    finally:
        if not fut.done():
            fut.cancel()
            with trio.CancelScope(shield=True):
                await done.wait()
    return fut.result()
