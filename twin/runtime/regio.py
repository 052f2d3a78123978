"""Registry access from Trio: every call runs in a worker thread; writes are batched.

``RegistryIO.call(fn, ...)`` runs one synchronous registry call in a thread (bounded by a
capacity limiter). ``RegistryWriter`` is a service that persists status transitions, alarms,
metrics and audit entries in batches, in order, off the hot path; a failing write is logged and
never stops the engine.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import trio

from twin.registry.base import Registry

log = logging.getLogger(__name__)
T = TypeVar("T")


class RegistryIO:
    """Registry calls in worker threads, bounded by this registry's own capacity limiter (so
    CPU-bound work elsewhere, e.g. argon2, never starves registry writes, and vice versa).

    ``in_flight`` / ``idle()`` say whether a call is running in a thread: tests that drive a
    mock clock by hand advance it only when the registry is idle (see tests/runtime/helpers)."""

    def __init__(self, registry: Registry, *, threads: int = 4) -> None:
        self.registry = registry
        self.limiter = trio.CapacityLimiter(threads)
        self.in_flight = 0
        self._idle = trio.Event()
        self._idle.set()

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self.in_flight == 0:
            self._idle = trio.Event()
        self.in_flight += 1
        try:
            return await trio.to_thread.run_sync(partial(fn, *args, **kwargs), limiter=self.limiter)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def idle(self) -> None:
        """Return once no registry call is running in a worker thread."""
        while self.in_flight:
            await self._idle.wait()


Op = Callable[[Registry], Any]
Callback = Callable[[Any], None]


class RegistryWriter:
    """Ordered, batched background writes. ``put`` never blocks and never raises."""

    def __init__(self, rio: RegistryIO, *, batch: int = 500) -> None:
        self.rio = rio
        self.batch = batch
        self._pending: list[tuple[Op, Callback | None]] = []
        self._wake = trio.Event()
        self._idle = trio.Event()
        self._idle.set()
        self.written = 0
        self.failed = 0

    def put(self, op: Op, on_done: Callback | None = None) -> None:
        self._pending.append((op, on_done))
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._wake.set()

    def __len__(self) -> int:
        return len(self._pending)

    async def flushed(self) -> None:
        """Wait until everything put so far has been written."""
        while self._pending or not self._idle.is_set():
            await self._idle.wait()

    def _run_batch(
        self, batch: list[tuple[Op, Callback | None]]
    ) -> list[tuple[Callback | None, Any]]:
        out = []
        for op, cb in batch:
            try:
                out.append((cb, op(self.rio.registry)))
                self.written += 1
            except Exception:
                self.failed += 1
                log.exception("registry write failed")
        return out

    async def drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self.batch], self._pending[self.batch :]
            results = await self.rio.call(self._run_batch, batch)
            for cb, value in results:
                if cb is not None:
                    try:
                        cb(value)
                    except Exception:
                        log.exception("registry write callback failed")
        self._idle.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                await self.drain()
        finally:
            with trio.move_on_after(10) as scope:
                scope.shield = True
                if self._pending:
                    log.info("registry writer: flushing %d pending writes", len(self._pending))
                    await self.drain()


def inf_safe(value: float) -> float | None:
    return None if math.isinf(value) else value
