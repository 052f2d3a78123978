"""HTTP ingest's durable hand-off: validated messages → write-ahead log → device task.

``ingest_core`` (the gatekeeper's hot path) calls :func:`hand_in` after the body is parsed and
validated, and answers 2xx only when it returns::

    validate ─▶ room in the device's queue? (409 / 429) ─▶ WAL append + group commit
            (507 disk full / 503 + Retry-After) ─▶ hand inward (device task) ─▶ 2xx

The readings are then stored from the log by the time-series service (they reach the bus
marked ``logged`` and its pump skips them); see ``twin/timeseries/wal.py`` and
``twin/runtime/timeseries_service.py``. Without a time-series service (``--no-timeseries``)
nothing is stored and messages go straight to the device task, as before.

If the device stops between the commit and the hand-off (a reload removed it), the caller
answers 409 although its readings were logged: they are stored, and a client that retries
stores them twice. Rare (the window is one fsync), and never the reverse (nothing
acknowledged is lost).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twin.bindings.base import Message, Reading
from twin.runtime.timeseries_service import timeseries_of

if TYPE_CHECKING:
    from twin.runtime.engine import Engine


async def hand_in(engine: Engine, device: str, messages: list[Message]) -> dict[str, Any]:
    """Log the readings among ``messages`` durably, then deliver all of them to the device's
    task; returns the reply for the device (pending writes and commands).

    Raises ``DeviceNotRunning`` / ``IngestBusy`` (nothing logged) and ``WalError`` (nothing
    logged, nothing delivered)."""
    svc = timeseries_of(engine)
    readings = [m for m in messages if isinstance(m, Reading) and m.value is not None]
    if svc is None or svc.wal is None or not readings:
        return engine.hub.push(device, messages)
    engine.hub.check(device, len(messages))
    await svc.log_readings(readings)
    logged = [
        Reading(m.device, m.point, m.value, m.ts, m.quality, True)
        if isinstance(m, Reading) and m.value is not None
        else m
        for m in messages
    ]
    return await engine.hub.deliver(device, logged)
