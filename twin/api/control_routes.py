"""Control API (seed §3.3): commands, batch, scenes, traces, and the HTTP long-poll for devices.

Included by ``create_app`` with ``app.include_router(control_routes.router)``; needs the
engine to run :class:`twin.control.service.ControlService` (503 otherwise).

Roles: viewers read; operators send and cancel commands and run scenes; admins change scenes
(every change is a registry revision). Devices with an ``http`` push binding fetch their
commands with ``GET /api/v1/ingest/{device}/commands?wait=30`` and report with
``POST /api/v1/ingest/{device}/commands/{id}`` (``{"status": "executing"|"success"|"failed",
"result": ..., "error": ...}``), authenticated by their device key like ingest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import trio
from fastapi import APIRouter, Body, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from twin.api.app import Admin, Operator, Viewer, _bearer, _check_site
from twin.api.specio import Specs, apply_change
from twin.control.ledger import IllegalTransition
from twin.control.service import ControlService
from twin.errors import CommandError, NotFoundError, TwinError

router = APIRouter(prefix="/api/v1", tags=["control"])


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


def _control(request: Request) -> ControlService:
    svc = request.app.state.api.engine.service_info.get("control")
    if not isinstance(svc, ControlService):
        raise HTTPException(503, "the control service is not running in this engine")
    return svc


def _device_doc(request: Request, device: str) -> dict[str, Any]:
    doc = request.app.state.api.engine.device_doc(device)
    if doc is None:
        raise HTTPException(404, f"no device {device!r}")
    return dict(doc)


def _command_error(exc: TwinError) -> HTTPException:
    if isinstance(exc, IllegalTransition):
        return HTTPException(409, str(exc))
    if isinstance(exc, NotFoundError):
        return HTTPException(404, str(exc))
    return HTTPException(422, str(exc) + (f" ({exc.hint})" if exc.hint else ""))


# -- commands --------------------------------------------------------------------------------
@router.post("/devices/batch/commands", status_code=201)
async def batch_commands(request: Request, p: Operator, body: BatchRequest) -> dict[str, Any]:
    """Send one command to many devices (ids and/or a selector); per-device results."""
    svc = _control(request)
    targets = list(body.devices or [])
    if body.selector:
        try:
            targets += [d for d in svc.catalog.select(body.selector) if d not in targets]
        except CommandError as exc:
            raise _command_error(exc) from None
    allowed, refused = [], []
    for d in targets:
        doc = svc.catalog.device(d)
        if doc is not None and not p.can_site((doc.get("metadata") or {}).get("site")):
            refused.append({"device": d, "accepted": False, "error": "not allowed for its site"})
        else:
            allowed.append(d)
    if not allowed and not refused:
        raise HTTPException(422, "batch: no device matched")
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
            raise _command_error(exc) from None
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
    _check_site(p, _device_doc(request, device))
    svc = _control(request)
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
        raise _command_error(exc) from None
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
    _check_site(p, _device_doc(request, device))
    svc = _control(request)
    cmds = await svc.ledger.history(device, limit)
    return {"device": device, "commands": [c.to_json() for c in cmds]}


@router.get("/commands/{command_id}")
async def get_command(request: Request, p: Viewer, command_id: str) -> dict[str, Any]:
    svc = _control(request)
    try:
        cmd = await svc.ledger.get(command_id)
    except NotFoundError as exc:
        raise HTTPException(404, str(exc)) from None
    _check_site(p, svc.catalog.device(cmd.device))
    return cmd.to_json()


@router.delete("/commands/{command_id}")
async def cancel_command(request: Request, p: Operator, command_id: str) -> dict[str, Any]:
    svc = _control(request)
    try:
        cmd = await svc.ledger.get(command_id)
        _check_site(p, svc.catalog.device(cmd.device))
        cmd = await svc.ledger.cancel(command_id)
    except TwinError as exc:
        raise _command_error(exc) from None
    return cmd.to_json()


# -- HTTP long-poll for devices -----------------------------------------------------------------
async def _device_auth(request: Request, device: str) -> None:
    st = request.app.state.api
    key = request.headers.get("x-device-key") or _bearer(request.headers)
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
    svc = _control(request)
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
    svc = _control(request)
    try:
        cmd = await svc.ledger.report(
            command_id, body.status, result=body.result, error=body.error, device=device
        )
    except TwinError as exc:
        raise _command_error(exc) from None
    return cmd.to_json()


# -- scenes ----------------------------------------------------------------------------------
def _scene_doc(name: str, body: dict[str, Any]) -> dict[str, Any]:
    """Accept a whole Scene document or just its spec."""
    if body.get("kind") == "Scene" or "apiVersion" in body:
        doc = dict(body)
        meta = dict(doc.get("metadata") or {})
        if meta.get("name", name) != name:
            raise HTTPException(422, f"metadata.name {meta.get('name')!r} does not match {name!r}")
        meta["name"] = name
        doc["metadata"] = meta
        return doc
    spec = dict(body.get("spec", body))
    meta = {"name": name}
    if "site" in body:
        meta["site"] = body["site"]
        spec.pop("site", None)
    return {"apiVersion": "flux.iot/v1", "kind": "Scene", "metadata": meta, "spec": spec}


async def _change(
    request: Request, p: Any, fn: Callable[[Specs], Specs], message: str
) -> dict[str, Any]:
    st = request.app.state.api
    engine = st.engine
    rev, _ = await st.call(apply_change, engine.registry, fn, author=p.subject, message=message)
    if rev is None:
        return {"revision": engine.revision_number, "changed": False}
    request.scope["state"]["audit_detail"] = {"revision": rev.number}
    engine.poke()
    with trio.move_on_after(st.settings.reload_wait):
        await engine.wait_revision(rev.number)
    return {"revision": rev.number, "changed": True}


def _scene_json(svc: ControlService, name: str, doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc.get("spec") or {}
    return {
        "name": name,
        "site": (doc.get("metadata") or {}).get("site"),
        "enabled": spec.get("enabled", True),
        "mode": spec.get("mode", "single"),
        "description": spec.get("description", ""),
        "triggers": [t.get("type") for t in spec.get("triggers") or []],
        "loaded": name in svc.scenes.scenes,
        "stats": svc.scenes.stats(name),
        "spec": spec,
    }


def _scenes(request: Request) -> dict[str, dict[str, Any]]:
    specs = request.app.state.api.engine.specs
    return {n: d for (k, n), d in specs.items() if k == "Scene"}


@router.get("/scenes")
async def list_scenes(request: Request, p: Viewer) -> dict[str, Any]:
    svc = _control(request)
    return {
        "scenes": [
            _scene_json(svc, n, d)
            for n, d in sorted(_scenes(request).items())
            if p.can_site((d.get("metadata") or {}).get("site"))
        ]
    }


@router.post("/scenes", status_code=201)
async def create_scene(
    request: Request, p: Admin, body: Annotated[dict[str, Any], Body()]
) -> dict[str, Any]:
    name = str((body.get("metadata") or {}).get("name") or body.get("name") or "")
    if not name:
        raise HTTPException(422, "a scene needs a name (metadata.name)")
    body = {k: v for k, v in body.items() if k != "name"}
    doc = _scene_doc(name, body)
    _check_site(p, doc)
    if name in _scenes(request):
        raise HTTPException(409, f"scene {name!r} exists (PUT /api/v1/scenes/{name} to change it)")

    def fn(specs: Specs) -> Specs:
        specs[("Scene", name)] = doc
        return specs

    return {"scene": name, **await _change(request, p, fn, f"create scene {name}")}


@router.put("/scenes/{name}")
async def put_scene(
    request: Request, p: Admin, name: str, body: Annotated[dict[str, Any], Body()]
) -> dict[str, Any]:
    doc = _scene_doc(name, body)
    _check_site(p, doc)

    def fn(specs: Specs) -> Specs:
        specs[("Scene", name)] = doc
        return specs

    return {"scene": name, **await _change(request, p, fn, f"update scene {name}")}


@router.delete("/scenes/{name}")
async def delete_scene(request: Request, p: Admin, name: str) -> dict[str, Any]:
    doc = _scenes(request).get(name)
    if doc is None:
        raise HTTPException(404, f"no scene {name!r}")
    _check_site(p, doc)

    def fn(specs: Specs) -> Specs:
        specs.pop(("Scene", name), None)
        return specs

    return {"scene": name, **await _change(request, p, fn, f"delete scene {name}")}


@router.post("/scenes/{name}/execute")
async def execute_scene(
    request: Request,
    p: Operator,
    name: str,
    wait: bool = False,
    body: Annotated[dict[str, Any] | None, Body()] = None,
) -> JSONResponse:
    svc = _control(request)
    doc = _scenes(request).get(name)
    if doc is None or name not in svc.scenes.scenes:
        raise HTTPException(404, f"no scene {name!r}")
    _check_site(p, doc)
    scene = svc.scenes.scenes[name]
    run_id, done = svc.scenes.start(scene, {"type": "manual", "by": p.subject, **(body or {})})
    out: dict[str, Any] = {"scene": name, "run_id": run_id}
    if wait and run_id is not None:
        with trio.move_on_after(60):
            await done.wait()
        out["trace"] = next((t for t in svc.scenes.traces if t["run_id"] == run_id), None)
    return JSONResponse(out, status_code=202 if run_id else 409)


@router.get("/scenes/{name}/traces")
async def scene_traces(
    request: Request, p: Viewer, name: str, limit: Annotated[int, Query(ge=1, le=500)] = 20
) -> dict[str, Any]:
    st = request.app.state.api
    doc = _scenes(request).get(name)
    if doc is not None:
        _check_site(p, doc)
    await st.engine.writer.flushed()
    rows = await st.call(lambda: st.engine.registry.scene_traces(name, limit=limit))
    return {"scene": name, "traces": [dict(t.trace) for t in rows]}


@router.get("/scene-traces/{run_id}")
async def scene_trace(request: Request, p: Viewer, run_id: str) -> dict[str, Any]:
    st = request.app.state.api
    await st.engine.writer.flushed()
    t = await st.call(st.engine.registry.scene_trace, run_id)
    if t is None:
        raise HTTPException(404, f"no trace {run_id!r}")
    _check_site(p, _scenes(request).get(t.scene))
    return dict(t.trace)
