"""Supervision: a failure of one child is caught at its boundary and never reaches its siblings.

A Trio nursery cancels every sibling when one child raises. So nothing but the engine's core
(registry writer, device controller, the supervisors themselves) sits directly in the engine's
nursery: each service, device task and engine loop runs under :func:`supervise`, which

* catches the child's failure (``Exception`` only: ``Cancelled``, ``KeyboardInterrupt`` and
  other ``BaseException`` s pass through untouched, so cancellation always works),
* reports it through :class:`Supervision`: one log line with kind, name and site, the counter
  ``twin_supervised_failures_total{kind,name}`` on /metrics, and an alarm (a device's on the
  device itself, type ``task_failure``; anything else on the pseudo device ``_engine``, type
  ``<kind>_failure:<name>``),
* restarts it with exponential backoff (:class:`RestartPolicy`; a run that lasted
  ``reset_after`` seconds counts as healthy: the alarm is cleared and the backoff starts over),
* after ``quarantine_after`` failures in a row **quarantines** it: it stays stopped for
  ``quarantine_for`` seconds (``twin_supervised_quarantined{kind,name}`` = 1, a critical
  alarm ``…quarantined…``), then is tried again. A device's controller also restarts a
  quarantined device on the next revision.

A child that needs ``task_status`` (services started with ``nursery.start``) is started with
``with_status=True``: its *first* start is reported to the caller, and a failure before that
first ``started()`` is raised to the caller as it is (a service that cannot come up at all, e.g.
a taken port, is a start-up error, not something to retry forever).

Scene runs, bus consumers and hub handlers are isolated where they run (``SceneEngine._run``,
``MqttHub.dispatch``, ...): one run or one message never stops the others.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from twin.errors import TwinError

log = logging.getLogger(__name__)

ENGINE_DEVICE = "_engine"
"""Pseudo device of supervision alarms of services, engine loops and scenes."""


@dataclass(frozen=True)
class RestartPolicy:
    initial: float = 1.0  # first restart delay (seconds)
    maximum: float = 60.0  # cap of the exponential backoff
    factor: float = 2.0
    reset_after: float = 60.0  # a run this long is healthy: failures and backoff start over
    quarantine_after: int = 5  # this many failures in a row: quarantined
    quarantine_for: float = 600.0  # then tried again

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """Backoff before restart number ``failures`` (1 = after the first failure); with
        ``rng``, jittered to 50-100 % so many children failing together spread out."""
        base = min(self.maximum, self.initial * self.factor ** max(0, failures - 1))
        return base * rng.uniform(0.5, 1.0) if rng is not None else base


AlarmRaise = Callable[[str, str, str, str], None]  # (device, type, severity, message)
AlarmClear = Callable[[str, str], None]  # (device, type)


@dataclass
class Supervision:
    """What every supervisor of one engine reports to: log, /metrics, alarms.

    ``prom`` is the engine's :class:`~twin.runtime.metrics.EngineMetrics` (or None);
    ``raise_alarm`` / ``clear_alarm`` put alarms in the registry (the engine wires them to its
    registry writer and bus). All reporting is best effort: a failing reporter is logged and
    never takes the supervisor down."""

    prom: Any = None
    raise_alarm: AlarmRaise | None = None
    clear_alarm: AlarmClear | None = None
    failures: dict[tuple[str, str], int] = field(default_factory=dict)  # total per child
    quarantined: set[tuple[str, str]] = field(default_factory=set)

    @staticmethod
    def alarm_of(kind: str, name: str, what: str = "failure") -> tuple[str, str]:
        """(device, alarm type) of a supervised child's alarms."""
        if kind == "device":
            return name, "task_failure" if what == "failure" else "quarantined"
        return ENGINE_DEVICE, f"{kind}_{'failure' if what == 'failure' else 'quarantined'}:{name}"

    def _safe(self, fn: Callable[..., None] | None, *args: Any) -> None:
        if fn is None:
            return
        try:
            fn(*args)
        except Exception:
            log.exception("supervisor: reporting failed")

    def failed(
        self, kind: str, name: str, exc: BaseException, *, site: str, failures: int, delay: float
    ) -> None:
        key = (kind, name)
        self.failures[key] = self.failures.get(key, 0) + 1
        where = f"{kind} {name}" + (f" (site {site})" if site else "")
        # a TwinError says what went wrong in its message (a camera that refuses, a peer that
        # times out): one line per retry, the traceback only at debug. Anything else is a bug:
        # its traceback is logged with the line.
        known = isinstance(exc, TwinError)
        log.error(
            "%s failed (%d in a row): %s: %s; restarting in %.1fs",
            where,
            failures,
            type(exc).__name__,
            exc,
            delay,
            exc_info=None if known else exc,
        )
        if known and log.isEnabledFor(logging.DEBUG):
            log.debug("%s failure traceback", where, exc_info=exc)
        if self.prom is not None:
            self._safe(lambda: self.prom.child(self.prom.supervised_failures, kind, name).inc())
        device, type_ = self.alarm_of(kind, name)
        message = f"{where} failed: {type(exc).__name__}: {exc}"[:500]
        self._safe(self.raise_alarm, device, type_, "major", message)

    def quarantine(self, kind: str, name: str, *, site: str, failures: int, until: float) -> None:
        self.quarantined.add((kind, name))
        where = f"{kind} {name}" + (f" (site {site})" if site else "")
        log.error(
            "%s quarantined after %d failures in a row; next try in %.0fs", where, failures, until
        )
        if self.prom is not None:
            self._safe(lambda: self.prom.child(self.prom.supervised_quarantined, kind, name).set(1))
        device, type_ = self.alarm_of(kind, name, "quarantined")
        message = f"{where} quarantined after {failures} failures in a row"
        self._safe(self.raise_alarm, device, type_, "critical", message)

    def released(self, kind: str, name: str) -> None:
        """Out of quarantine (being tried again)."""
        self.quarantined.discard((kind, name))
        if self.prom is not None:
            self._safe(lambda: self.prom.child(self.prom.supervised_quarantined, kind, name).set(0))

    def recovered(self, kind: str, name: str) -> None:
        """A run after failures stayed up ``reset_after``: clear its alarms."""
        self.released(kind, name)
        for what in ("failure", "quarantined"):
            self._safe(self.clear_alarm, *self.alarm_of(kind, name, what))


async def supervise(
    child: Callable[..., Awaitable[Any]],
    *,
    kind: str,
    name: str,
    supervision: Supervision,
    policy: RestartPolicy | None = None,
    site: str = "",
    with_status: bool = False,
    restart_on_return: bool = False,
    on_quarantine: Callable[[int, BaseException], None] | None = None,
    on_recovered: Callable[[], None] | None = None,
    on_started: Callable[[Any], None] | None = None,
    rng: random.Random | None = None,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``child()`` (or ``child(task_status=...)`` with ``with_status``) until it returns
    (or forever with ``restart_on_return``), restarting it after each failure; see the module
    docstring. ``on_quarantine(failures, last_error)`` / ``on_recovered()`` let the caller
    show the state (a device's status); ``on_started(value)`` gets what each (re)start of a
    ``with_status`` child reported (the engine keeps ``service_info`` current with it)."""
    policy = policy or RestartPolicy()
    failures = 0
    first = True

    def healthy() -> None:  # ran reset_after without failing: clear alarms, backoff over
        nonlocal failures
        failures = 0
        supervision.recovered(kind, name)
        _call(on_recovered)

    while True:
        started_at = trio.current_time()
        error: BaseException | None = None
        try:
            if with_status or failures:  # a nursery only when needed (10k device tasks)
                timer_scope = trio.CancelScope()

                async def timer(scope: trio.CancelScope = timer_scope) -> None:
                    with scope:
                        await trio.sleep(policy.reset_after)
                        healthy()

                async def run_child(
                    *,
                    scope: trio.CancelScope = timer_scope,
                    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
                ) -> None:
                    try:
                        if with_status:
                            await child(task_status=task_status)
                        else:
                            task_status.started()
                            await child()
                    finally:
                        scope.cancel()

                async with trio.open_nursery() as nursery:
                    if failures:
                        nursery.start_soon(timer)
                    value = await nursery.start(run_child)
                    if with_status:
                        _call(on_started, value)
                    if first:
                        task_status.started(value)
                        first = False
            else:
                if first:
                    task_status.started()
                    first = False
                await child()
        except Exception as exc:  # Cancelled and other BaseExceptions pass through
            if first:  # never came up: the caller's start fails with it (not retried)
                leaf = _unwrap(exc)
                if leaf is exc:
                    raise
                raise leaf from None
            error = _unwrap(exc)
        ran = trio.current_time() - started_at
        if failures and (error is None or ran >= policy.reset_after):
            healthy()  # it ended well (or ran long enough)
        if error is None:
            if not restart_on_return:
                return
            error = RuntimeError(f"{kind} {name} returned")
        failures += 1
        quarantine = failures >= policy.quarantine_after
        delay = policy.quarantine_for if quarantine else policy.delay(failures, rng)
        supervision.failed(kind, name, error, site=site, failures=failures, delay=delay)
        if quarantine:
            supervision.quarantine(
                kind, name, site=site, failures=failures, until=policy.quarantine_for
            )
            _call(on_quarantine, failures, error)
            await trio.sleep(policy.quarantine_for)
            supervision.released(kind, name)
            failures = policy.quarantine_after - 1  # one more failure: quarantined again
        else:
            await trio.sleep(delay)


def _call(fn: Callable[..., Any] | None, *args: Any) -> None:
    if fn is None:
        return
    try:
        fn(*args)
    except Exception:
        log.exception("supervisor: callback failed")


def _unwrap(exc: BaseException) -> BaseException:
    """The one real error inside nested single-exception groups (for the log line)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


__all__ = ["ENGINE_DEVICE", "RestartPolicy", "Supervision", "supervise"]
