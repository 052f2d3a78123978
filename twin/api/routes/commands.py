"""Commands (seed §3.3): send one, a batch, read, cancel; and the HTTP long-poll for devices.

Needs the engine to run :class:`twin.control.service.ControlService` (503 otherwise; see
:func:`control`). Roles: viewers read; operators send and cancel commands. Devices with an ``http`` push binding fetch their
commands with ``GET /api/v1/ingest/{device}/commands?wait=30`` and report with
``POST /api/v1/ingest/{device}/commands/{id}`` (``{"status": "executing"|"success"|"failed",
"result": ..., "error": ...}``), authenticated by their device key like ingest.
"""

from __future__ import annotations

from typing import Annotated, Any

import trio
from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, Field

from twin import policy
from twin.api.deps import PREFIX, Operator, Viewer, api_state, bearer
from twin.bindings.values import ValueRefused, check_value
from twin.control.ledger import IllegalTransition
from twin.control.service import ControlService
from twin.errors import CommandError, NotFoundError, TwinError

router = APIRouter(prefix=PREFIX, tags=["control"])


class CommandRequest(BaseModel):
    type: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)
    timeout: float | None = Field(default=None, gt=0, le=86400)
    idempotency_key: str | None = Field(default=None, max_length=200)


class BatchRequest(BaseModel):
    type: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)
    timeout: float | None = Field(default=None, gt=0, le=86400)
    devices: list[str] | None = None
    selector: str | None = None


class ReportRequest(BaseModel):
    status: str
    result: Any = None
    error: str | None = None


def control(request: Request) -> ControlService:
    svc = api_state(request).engine.service_info.get("control")
    if not isinstance(svc, ControlService):
        raise HTTPException(503, "the control service is not running in this engine")
    return svc


def device_doc(request: Request, device: str) -> dict[str, Any]:
    doc = api_state(request).engine.device_doc(device)
    if doc is None:
        raise HTTPException(404, f"no device {device!r}")
    return dict(doc)


def command_target(svc: ControlService, device: str) -> policy.Target:
    """A command lives in its device's site (an unknown device: no site a scoped user holds)."""
    doc = svc.catalog.device(device)
    return policy.Target.of("Command", policy.doc_site(doc) if doc is not None else None)


def command_error(exc: TwinError) -> HTTPException:
    if isinstance(exc, IllegalTransition):
        return HTTPException(409, str(exc))
    if isinstance(exc, NotFoundError):
        return HTTPException(404, str(exc))
    return HTTPException(422, str(exc) + (f" ({exc.hint})" if exc.hint else ""))


# -- commands --------------------------------------------------------------------------------
@router.post(
    "/devices/batch/commands",
    status_code=201,
    responses={404: {"description": "No device matched the ids or the selector"}},
)
async def batch_commands(request: Request, p: Operator, body: BatchRequest) -> dict[str, Any]:
    """Send one command to many devices (ids and/or a selector); per-device results."""
    svc = control(request)
    targets = list(body.devices or [])
    if body.selector:
        try:
            targets += [d for d in svc.catalog.select(body.selector) if d not in targets]
        except CommandError as exc:
            raise command_error(exc) from None
    allowed, refused = [], []
    for d in targets:
        decision = policy.decide(p, policy.OPERATE, new=command_target(svc, d))
        if decision.allowed:
            allowed.append(d)
        else:
            refused.append({"device": d, "accepted": False, "error": decision.reason})
    if not allowed and not refused:
        raise HTTPException(404, "batch: no device matched")
    result: dict[str, Any] = {"batch": None, "status": "rejected", "results": []}
    if allowed:
        try:
            res = await svc.ledger.submit_batch(
                body.type,
                body.params,
                devices=allowed,
                command_timeout=body.timeout,
                source=f"api:{p.subject}",
            )
        except CommandError as exc:
            raise command_error(exc) from None
        result = res.to_json()
    result["results"] = [*result["results"], *refused]
    if refused and result["status"] == "accepted":
        result["status"] = "partial"
    return result


@router.post("/devices/{device}/commands", status_code=201)
async def send_command(
    request: Request,
    p: Operator,
    device: str,
    body: CommandRequest,
    wait: Annotated[float, Query(ge=0, le=300)] = 0,
) -> dict[str, Any]:
    """Queue a command (validated against the device's model). ``wait``: seconds to wait for
    the outcome before answering."""
    device_doc(request, device)
    svc = control(request)
    policy.check(p, policy.OPERATE, new=command_target(svc, device))
    try:
        cmd = await svc.ledger.submit(
            device,
            body.type,
            body.params,
            command_timeout=body.timeout,
            idempotency_key=body.idempotency_key,
            source=f"api:{p.subject}",
        )
    except CommandError as exc:
        raise command_error(exc) from None
    if wait:
        with trio.move_on_after(wait):
            cmd = await svc.ledger.wait(cmd.id)
    return cmd.to_json()


@router.get("/devices/{device}/commands")
async def list_commands(
    request: Request,
    p: Viewer,
    device: str,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> dict[str, Any]:
    device_doc(request, device)
    svc = control(request)
    policy.check(p, policy.READ, old=command_target(svc, device))
    cmds = await svc.ledger.history(device, limit)
    return {"device": device, "commands": [c.to_json() for c in cmds]}


@router.get("/commands/{command_id}")
async def get_command(request: Request, p: Viewer, command_id: str) -> dict[str, Any]:
    svc = control(request)
    try:
        cmd = await svc.ledger.get(command_id)
    except NotFoundError as exc:
        raise HTTPException(404, str(exc)) from None
    policy.check(p, policy.READ, old=command_target(svc, cmd.device))
    return cmd.to_json()


@router.delete("/commands/{command_id}")
async def cancel_command(request: Request, p: Operator, command_id: str) -> dict[str, Any]:
    svc = control(request)
    try:
        cmd = await svc.ledger.get(command_id)
        policy.check(p, policy.OPERATE, old=command_target(svc, cmd.device))
        cmd = await svc.ledger.cancel(command_id)
    except TwinError as exc:
        raise command_error(exc) from None
    return cmd.to_json()


# -- HTTP long-poll for devices -----------------------------------------------------------------
async def _device_auth(request: Request, device: str) -> None:
    st = api_state(request)
    key = request.headers.get("x-device-key") or bearer(request.headers)
    if not key:
        raise HTTPException(401, "missing device key (X-Device-Key header)")
    # the cached key check, argon2 off-thread and once per concurrent key (like ingest)
    if not await st.check_device_key(device, key):
        raise HTTPException(401, "invalid device key")


@router.get("/ingest/{device}/commands", tags=["ingest"])
async def poll_commands(
    request: Request, device: str, wait: Annotated[float, Query(ge=0, le=120)] = 30
) -> dict[str, Any]:
    """Long-poll: the device's pending commands (they become ``sent``) and cancels."""
    await _device_auth(request, device)
    svc = control(request)
    if svc.catalog.device(device) is None:
        raise HTTPException(404, f"no device {device!r}")
    return await svc.ledger.poll(device, wait)


@router.post("/ingest/{device}/commands/{command_id}", tags=["ingest"])
async def report_command(
    request: Request, device: str, command_id: str, body: ReportRequest
) -> dict[str, Any]:
    """The device reports ``executing``, ``success`` (with a result), ``failed`` (with an
    error) or ``cancelled``."""
    await _device_auth(request, device)
    try:  # what a device sends is checked like any reading (twin.bindings.values)
        check_value(body.result, "result")
        check_value(body.error, "error")
    except ValueRefused as exc:
        raise HTTPException(422, f"command {command_id}: {exc}") from None
    svc = control(request)
    try:
        cmd = await svc.ledger.report(
            command_id, body.status, result=body.result, error=body.error, device=device
        )
    except TwinError as exc:
        raise command_error(exc) from None
    return cmd.to_json()
