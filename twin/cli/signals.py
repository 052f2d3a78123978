"""Stopping long-running commands (``twin up``, ``twin broker``) on SIGINT and SIGTERM.

:func:`run_until_signal` runs a Trio ``main`` until it ends or the process gets SIGINT (Ctrl-C)
or SIGTERM (``kill``, systemd, docker stop). A signal cancels ``main``'s scope, so every service
shuts down through its ``finally`` blocks, children included; no ``KeyboardInterrupt`` is ever
raised into a task, so there is no ``BaseExceptionGroup`` traceback on Ctrl-C. If the shutdown
takes longer than ``grace`` seconds (a thread stuck in a library call), or a second signal
arrives, the process exits at once with code 130: a stop never hangs.

Errors of ``main`` come back unwrapped when there is only one (``TwinError`` from a service
that could not start is printed by the CLI as one line plus a hint).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import NoReturn

import trio

from twin.errors import TwinError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def run_until_signal(
    main: Callable[[], Awaitable[None]],
    *,
    grace: float = 8.0,
    on_signal: Callable[[int], None] | None = None,
) -> int | None:
    """Run ``main`` under Trio; return the signal that stopped it (None: it ended by itself).

    ``on_signal`` is called (from the Trio thread, once) when the first signal arrives: the
    place to stop child processes in parallel with the engine's own shutdown.
    """
    received: list[int] = []
    timers: list[threading.Timer] = []

    def force_exit() -> None:
        sys.stderr.write(f"shutdown took longer than {grace:g} s: exiting now\n")
        sys.stderr.flush()
        os._exit(130)

    async def root() -> None:
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    async for signum in signals:
                        if received:  # a second signal: do not wait for the shutdown
                            force_exit()
                        received.append(signum)
                        timer = threading.Timer(grace, force_exit)
                        timer.daemon = True
                        timer.start()
                        timers.append(timer)
                        if on_signal is not None:
                            on_signal(signum)
                        main_scope.cancel()

                main_scope = trio.CancelScope()
                nursery.start_soon(watch)
                try:
                    with main_scope:
                        await main()
                finally:
                    nursery.cancel_scope.cancel()

    try:
        trio.run(root)
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if len(leaves) == 1 and isinstance(leaves[0], (TwinError, KeyboardInterrupt)):
            raise leaves[0] from None
        raise
    finally:
        for timer in timers:  # the caller's own cleanup is short and bounded
            timer.cancel()
    return received[0] if received else None


def exit_now(code: int = 0) -> NoReturn:
    """End the process once a stopped command has cleaned up: flush output and logs, then
    ``os._exit``. The interpreter's own teardown adds seconds after a clean stop (LanceDB's
    runtime: ~2 s of the ~2.6 s measured) and must not stand between Ctrl-C and the prompt."""
    import logging

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing to flush to
            stream.flush()
    logging.shutdown()
    os._exit(code)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


def die_with_parent() -> None:
    """``preexec_fn`` for child processes: on Linux the kernel sends them SIGTERM when the
    ``twin`` process dies, even by SIGKILL, so no child is ever left orphaned."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


__all__ = ["STOP_SIGNALS", "die_with_parent", "exit_now", "run_until_signal"]
