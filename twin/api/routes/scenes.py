"""Scenes: list, create, replace, delete (each change a registry revision), run one by hand,
and read their traces. Needs the engine's control service (503 otherwise).

Operators write scenes, here as through ``/apply`` (the policy decides both the same way, on
the stored scene and the new one: see :mod:`twin.policy`).
"""

from __future__ import annotations

from typing import Annotated, Any

import trio
from fastapi import APIRouter, Body, HTTPException, Query, Request
from fastapi.responses import JSONResponse

from twin import policy
from twin.api.deps import PREFIX, Operator, Viewer, api_state, authorize, change, metadata_name
from twin.api.routes.commands import control
from twin.api.specio import Specs
from twin.control.service import ControlService

router = APIRouter(prefix=PREFIX, tags=["control"])


def _scene_doc(name: str, body: dict[str, Any]) -> dict[str, Any]:
    """Accept a whole Scene document or just its spec."""
    if body.get("kind") == "Scene" or "apiVersion" in body:
        metadata_name(body)  # 422 unless metadata is an object
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
    specs = api_state(request).engine.specs
    return {n: d for (k, n), d in specs.items() if k == "Scene"}


def _scene_target(request: Request, name: str) -> policy.Target:
    """A scene, or the traces a deleted scene left (no site a scoped user holds)."""
    return policy.doc_target(_scenes(request).get(name)) or policy.Target("Scene", None)


@router.get("/scenes")
async def list_scenes(request: Request, p: Viewer) -> dict[str, Any]:
    svc = control(request)
    return {
        "scenes": [
            _scene_json(svc, n, d)
            for n, d in sorted(_scenes(request).items())
            if policy.allows(p, policy.READ, old=policy.doc_target(d))
        ]
    }


@router.post("/scenes", status_code=201)
async def create_scene(
    request: Request, p: Operator, body: Annotated[dict[str, Any], Body()]
) -> dict[str, Any]:
    name = str(metadata_name(body) or body.get("name") or "")
    if not name:
        raise HTTPException(422, "a scene needs a name (metadata.name)")
    body = {k: v for k, v in body.items() if k != "name"}
    doc = _scene_doc(name, body)
    authorize(p, policy.WRITE, new=doc)  # before 409: a name in another site stays unknown
    if name in _scenes(request):
        raise HTTPException(409, f"scene {name!r} exists (PUT /api/v1/scenes/{name} to change it)")

    def fn(specs: Specs) -> Specs:
        specs[("Scene", name)] = doc
        return specs

    return {"scene": name, **await change(request, p, fn, f"create scene {name}")}


@router.put("/scenes/{name}")
async def put_scene(
    request: Request, p: Operator, name: str, body: Annotated[dict[str, Any], Body()]
) -> dict[str, Any]:
    """Create or replace; the policy judges the stored scene too (a scene of another site is
    not taken over by naming your site in the new one)."""
    stored = _scenes(request).get(name)
    if stored is not None:  # 403 before any validation problem; change() judges both
        authorize(p, policy.WRITE, old=stored)
    doc = _scene_doc(name, body)

    def fn(specs: Specs) -> Specs:
        specs[("Scene", name)] = doc
        return specs

    return {"scene": name, **await change(request, p, fn, f"update scene {name}")}


@router.delete("/scenes/{name}")
async def delete_scene(request: Request, p: Operator, name: str) -> dict[str, Any]:
    stored = _scenes(request).get(name)
    if stored is None:
        raise HTTPException(404, f"no scene {name!r}")
    authorize(p, policy.WRITE, old=stored)

    def fn(specs: Specs) -> Specs:
        specs.pop(("Scene", name), None)
        return specs

    return {"scene": name, **await change(request, p, fn, f"delete scene {name}")}


@router.post("/scenes/{name}/execute")
async def execute_scene(
    request: Request,
    p: Operator,
    name: str,
    wait: bool = False,
    body: Annotated[dict[str, Any] | None, Body()] = None,
) -> JSONResponse:
    svc = control(request)
    doc = _scenes(request).get(name)
    if doc is None or name not in svc.scenes.scenes:
        raise HTTPException(404, f"no scene {name!r}")
    authorize(p, policy.OPERATE, doc)
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
    st = api_state(request)
    policy.check(p, policy.READ, old=_scene_target(request, name))
    await st.engine.writer.flushed()
    rows = await st.call(lambda: st.engine.registry.scene_traces(name, limit=limit))
    return {"scene": name, "traces": [dict(t.trace) for t in rows]}


@router.get("/scene-traces/{run_id}")
async def scene_trace(request: Request, p: Viewer, run_id: str) -> dict[str, Any]:
    st = api_state(request)
    await st.engine.writer.flushed()
    t = await st.call(st.engine.registry.scene_trace, run_id)
    if t is None:
        raise HTTPException(404, f"no trace {run_id!r}")
    policy.check(p, policy.READ, old=_scene_target(request, t.scene))
    return dict(t.trace)
