"""Scale-out: a request about a device that another engine of the cluster runs goes to that
engine (twin/runtime/cluster.py). Live twin state and runtime desired values live with the
owner; any engine behind the load balancer answers them by forwarding the caller's request
(its own ``Authorization``: the engines share one JWT secret, ``TWIN_JWT_SECRET_FILE``).

``await to_owner(st, request, device)`` returns the owner's response, or None when this engine
runs the device (or there is no cluster). An owner that does not answer is a 503 with a hint.
"""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import HTTPException, Request
from fastapi.responses import Response

from twin.api.state import ApiState

FORWARDED = "x-twin-forwarded"  # a forwarded request is never forwarded again (no loops)


async def to_owner(st: ApiState, request: Request, device: str) -> Response | None:
    cluster: Any = st.engine.service_info.get("cluster")
    if cluster is None or cluster.owns("Device", device) or request.headers.get(FORWARDED):
        return None
    owner = cluster.owner_of("Device", device)
    if owner is None or not owner.api or owner.id == cluster.engine_id:
        raise HTTPException(
            503, f"device {device!r} has no running owner in the cluster right now (try again)"
        )
    headers = {FORWARDED: cluster.engine_id, "content-type": request.headers.get("content-type", "application/json")}
    if "authorization" in request.headers:
        headers["authorization"] = request.headers["authorization"]
    url = owner.api + request.url.path + (f"?{request.url.query}" if request.url.query else "")
    try:
        async with httpx.AsyncClient(timeout=10.0) as client:
            resp = await client.request(
                request.method, url, headers=headers, content=await request.body()
            )
    except httpx.HTTPError as exc:
        raise HTTPException(
            503, f"device {device!r} runs on engine {owner.name}, which did not answer: {exc}"
        ) from exc
    return Response(
        resp.content,
        status_code=resp.status_code,
        media_type=resp.headers.get("content-type", "application/json"),
        headers={"x-twin-engine": owner.name},
    )
