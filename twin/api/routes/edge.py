"""Edge nodes: the link the edges use (``/api/v1/edge-link/{edge}/...``, authenticated by the
edge's own key, not a user token) and the link state users read (``/api/v1/edges``).

``POST /edge-link/{edge}/batch``  an upload from the edge's outbox (``twin/edge/protocol.py``);
                                  2xx only once stored durably, exactly once.
``GET  /edge-link/{edge}/specs``  the documents the edge runs (its revision flows down).
``GET  /edges``, ``/edges/{edge}`` online/offline, revision, lag, outbox depth, last sync.

The edge's key is a device key of the pseudo device ``edge:<name>`` (``twin edge-key NAME``),
sent as ``X-Device-Key`` or ``Authorization: Bearer``. Served by :class:`twin.edge.cloud.EdgeCloud`
(503 when the engine runs without it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import trio
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from twin import policy
from twin.api.deps import PREFIX, State, Viewer, bearer
from twin.api.state import ApiState
from twin.edge.cloud import EdgeCloud, EdgeRefused, link_device
from twin.timeseries.wal import WalError

router = APIRouter(prefix=PREFIX, tags=["edge"])


class EdgeLinkState(BaseModel):
    name: str
    online: bool
    last_sync: float | None = None
    since_sync_s: float | None = None
    revision: int | None = None
    acked: int = Field(description="highest sequence number up to which everything is stored")
    covered_above: list[list[int]] = []
    outbox_depth: int
    outbox_bytes: int
    lag_s: float | None = Field(None, description="age of the oldest record in the outbox")
    dropped_at_edge: dict[str, int] = {}
    refused_at_edge: int = 0
    received: dict[str, int] = {}
    duplicates: int = 0
    gaps: int = 0
    refused: int = 0
    uploads: int = 0


class EdgeLinks(BaseModel):
    items: list[EdgeLinkState]


class UploadAck(BaseModel):
    acked: int
    covered: list[list[int]]
    accepted: int
    duplicates: int
    dropped: int
    refused: int
    revision: int


class EdgeSpecs(BaseModel):
    revision: int
    hash: str
    documents: list[dict[str, Any]]


def _service(st: ApiState) -> EdgeCloud:
    svc = st.engine.service_info.get("edge")
    if not isinstance(svc, EdgeCloud):
        raise HTTPException(503, "the edge service is not running on this engine")
    return svc


async def _edge_auth(st: ApiState, request: Request, edge: str) -> EdgeCloud:
    key = request.headers.get("x-device-key") or bearer(request.headers)
    if not key or not await st.check_device_key(link_device(edge), key):
        raise HTTPException(401, "missing or invalid edge key (twin edge-key NAME)")
    svc = _service(st)
    if svc.edge_doc(edge) is None:
        raise HTTPException(404, f"no EdgeNode {edge!r} in the running revision")
    return svc


@router.post(
    "/edge-link/{edge}/batch",
    openapi_extra={"requestBody": {"content": {"application/json": {"schema": {"type": "object"}}}}},
)
async def edge_batch(request: Request, st: State, edge: str) -> UploadAck:
    """An upload from the edge's outbox; answered once its records are stored durably."""
    svc = await _edge_auth(st, request, edge)
    try:
        payload = json.loads(await request.body() or b"{}")
    except (ValueError, RecursionError) as exc:
        raise HTTPException(400, f"body is not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise HTTPException(422, "an upload is a JSON object with 'runs'")
    try:
        return UploadAck(**await svc.ingest(edge, payload))
    except EdgeRefused as exc:
        raise HTTPException(422, str(exc)) from None
    except WalError as exc:
        raise HTTPException(503, f"not stored, retry later: {exc}",
                            headers={"Retry-After": str(exc.retry_after)}) from None  # fmt: skip


@router.get("/edge-link/{edge}/specs")
async def edge_specs(request: Request, st: State, edge: str) -> EdgeSpecs:
    """The documents the edge runs (its EdgeNode, site, devices, scenes, retention, Models)."""
    svc = await _edge_auth(st, request, edge)
    return EdgeSpecs(**svc.desired(edge))


@router.get(
    "/edge-link/{edge}/models/{model}",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {"schema": {"type": "string",
                                                                      "format": "binary"}}}}},
)
async def edge_model(request: Request, st: State, edge: str, model: str) -> FileResponse:
    """The ONNX file of a Model the edge's EdgeNode lists in spec.models (edge AI)."""
    svc = await _edge_auth(st, request, edge)
    doc = svc.edge_doc(edge) or {}
    if model not in ((doc.get("spec") or {}).get("models") or []):
        raise HTTPException(404, f"edge {edge!r} does not deploy model {model!r}")
    mdoc = st.engine.specs.get(("Model", model))
    path = Path(str(((mdoc or {}).get("spec") or {}).get("file", "")))
    if mdoc is None or not await trio.to_thread.run_sync(path.is_file):
        raise HTTPException(404, f"model {model!r} has no file on the cloud engine")
    return FileResponse(path, media_type="application/octet-stream", filename=f"{model}.onnx")


class EdgeCommand(BaseModel):
    id: str
    device: str
    type: str
    params: dict[str, Any]
    deadline: float
    created_at: float
    status: str


class EdgeCommands(BaseModel):
    items: list[EdgeCommand]


@router.get("/edge-link/{edge}/commands")
async def edge_commands(request: Request, st: State, edge: str) -> EdgeCommands:
    """Open commands the cloud holds for the edge's devices (queued while it was offline);
    their outcomes come back as ``command_result`` records of its uploads."""
    svc = await _edge_auth(st, request, edge)
    return EdgeCommands(items=[EdgeCommand(**c) for c in await svc.commands_for(edge)])


def _visible(st: ApiState, p: Any, edge: str, svc: EdgeCloud) -> bool:
    doc = svc.edge_doc(edge)
    site = policy.doc_site(doc) if doc is not None else None
    return policy.allows(p, policy.READ, old=policy.Target.of("EdgeNode", site))


@router.get("/edges")
async def list_edges(st: State, p: Viewer) -> EdgeLinks:
    """Link state of every edge node: online, revision, lag, outbox depth, last sync."""
    svc = st.engine.service_info.get("edge")
    if not isinstance(svc, EdgeCloud):  # an engine without the edge service serves no edges
        return EdgeLinks(items=[])
    return EdgeLinks(items=[EdgeLinkState(**s) for s in svc.states()
                            if _visible(st, p, s["name"], svc)])  # fmt: skip


@router.get("/edges/{edge}")
async def get_edge(st: State, p: Viewer, edge: str) -> EdgeLinkState:
    svc = st.engine.service_info.get("edge")
    if not isinstance(svc, EdgeCloud) or (svc.edge_doc(edge) is None and edge not in svc.links):
        raise HTTPException(404, f"no edge {edge!r}")
    if not _visible(st, p, edge, svc):
        raise HTTPException(404, f"no edge {edge!r}")
    return EdgeLinkState(**svc.link(edge).state(time.time()))
