"""Health (public), Prometheus ``/metrics``, and the documented ``POST /api/v1/ingest/{device}``
(served by the gatekeeper's fast path; this route only gives it a place in OpenAPI)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from twin.api.deps import PREFIX, State, Viewer, bearer
from twin.api.gatekeeper import ingest_core

health_router = APIRouter(tags=["system"])
router = APIRouter()


@health_router.get(f"{PREFIX}/health")
async def health(st: State) -> dict[str, Any]:
    engine = st.engine
    return {"status": "ok", "revision": engine.revision_number, "devices": len(engine.twins)}


@router.post(
    f"{PREFIX}/ingest/{{device}}",
    tags=["ingest"],
    openapi_extra={
        "requestBody": {"content": {"application/json": {"schema": {"type": "object"}}}},
        "security": [{"DeviceKey": []}],
    },
)
async def ingest(request: Request, st: State, device: str) -> JSONResponse:
    """Readings, heartbeats and events from a device with ``binding: {http: {}}``.

    (Served by the gatekeeper's fast path without FastAPI; this route documents it.)"""
    key = request.headers.get("x-device-key") or bearer(request.headers)
    status, body, headers = await ingest_core(st, device, key, await request.body())
    return JSONResponse(body, status_code=status, headers=headers)


@router.get("/metrics", tags=["system"])
async def metrics(st: State, p: Viewer) -> Response:
    return Response(st.engine.prom.render(), media_type=CONTENT_TYPE_LATEST)
