"""``/api/v1/alarms``: list (by device and state), acknowledge, clear; each change is also an
``alarm`` event on the bus (the WebSocket feed)."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query

from twin import policy
from twin.api import auth
from twin.api.deps import PREFIX, Limit, Operator, State, Viewer
from twin.api.state import ApiState
from twin.registry.base import Alarm
from twin.runtime.monitor import alarm_json

router = APIRouter(prefix=PREFIX, tags=["alarms"])


def alarm_target(st: ApiState, alarm: Alarm) -> policy.Target:
    """An alarm lives in its device's site (a device gone from the spec: no site a scoped
    user holds)."""
    doc = st.engine.device_doc(alarm.device)
    return policy.Target.of("Alarm", policy.doc_site(doc) if doc is not None else None)


def alarm_visible(st: ApiState, p: auth.Principal, alarm: Alarm) -> bool:
    return policy.allows(p, policy.READ, old=alarm_target(st, alarm))


@router.get("/alarms")
async def get_alarms(
    st: State,
    p: Viewer,
    device: str | None = None,
    state: Annotated[list[str] | None, Query()] = None,
    limit: Limit = 100,
) -> dict[str, Any]:
    rows = await st.call(st.engine.registry.alarms, device=device, states=state, limit=limit)
    return {"items": [alarm_json(a) for a in rows if alarm_visible(st, p, a)]}


async def alarm_action(
    st: ApiState, p: auth.Principal, alarm_id: int, action: str
) -> dict[str, Any]:
    engine = st.engine
    reg = engine.registry
    rows = await st.call(reg.alarms, limit=1_000_000)
    alarm = next((a for a in rows if a.id == alarm_id), None)
    if alarm is None:
        raise HTTPException(404, f"no alarm {alarm_id}")
    policy.check(p, policy.OPERATE, old=alarm_target(st, alarm))
    fn = reg.ack_alarm if action == "ack" else reg.clear_alarm
    updated: Alarm = await st.call(fn, alarm_id, p.subject, time.time())
    if action == "clear":
        engine.monitor.forget_alarm(updated.device, updated.type)
    twin = engine.twin(updated.device)
    engine.bus.publish(
        {
            "kind": "alarm",
            "device": updated.device,
            "site": twin.site if twin else None,
            "groups": twin.groups if twin else (),
            "ts": time.time(),
            "event": "acknowledged" if action == "ack" else "cleared",
            "alarm": alarm_json(updated),
        }
    )
    return alarm_json(updated)


@router.post("/alarms/{alarm_id}/ack")
async def ack_alarm(st: State, p: Operator, alarm_id: int) -> dict[str, Any]:
    return await alarm_action(st, p, alarm_id, "ack")


@router.post("/alarms/{alarm_id}/clear")
async def clear_alarm(st: State, p: Operator, alarm_id: int) -> dict[str, Any]:
    return await alarm_action(st, p, alarm_id, "clear")
