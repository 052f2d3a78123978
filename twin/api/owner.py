"""Scale-out: a request about a device that another engine of the cluster runs goes to that
engine (twin/runtime/cluster.py). Live twin state and runtime desired values live with the
owner; any engine behind the load balancer answers them by forwarding the caller's request
(its own ``Authorization``: the engines share one JWT secret, ``TWIN_JWT_SECRET_FILE``).

A route that forwards takes the :data:`ToOwner` dependency and, after its own checks, does
``if (r := await owner(device)) is not None: return r``: the owner's response, or None when
this engine runs the device (or there is no cluster). An owner that does not answer is a 503
with a hint. Requests to other engines share the API's client (:meth:`ApiState.peers`,
connections kept per engine, closed at the API's shutdown).
"""

from __future__ import annotations

from typing import Annotated, Any

import httpx
from fastapi import Depends, HTTPException, Request
from fastapi.responses import Response

from twin.api.deps import State
from twin.api.state import ApiState

FORWARDED = "x-twin-forwarded"  # a forwarded request is never forwarded again (no loops)


def owner_api(st: ApiState, device: str) -> tuple[str, str] | None:
    """(owner's API base URL, its name) when another engine of the cluster runs ``device``;
    None when this engine does (or there is no cluster)."""
    cluster: Any = st.engine.service_info.get("cluster")
    if cluster is None or cluster.owns("Device", device):
        return None
    owner = cluster.owner_of("Device", device)
    if owner is None or not owner.api or owner.id == cluster.engine_id:
        return None
    return owner.api, owner.name


async def forward_ingest(
    st: ApiState, device: str, key: str, raw: bytes, base: str, name: str
) -> tuple[int, dict[str, Any], dict[str, str] | None]:
    """Hand one ingest call to the device's owner (its answer is the ack: the owner logged the
    readings durably before it)."""
    try:
        resp = await st.peers().post(
            f"{base}/api/v1/ingest/{device}",
            content=raw,
            headers={"x-device-key": key, "content-type": "application/json", FORWARDED: "1"},
        )
    except httpx.HTTPError as exc:
        return 503, {"detail": f"device {device!r} runs on engine {name}, which did not answer: {exc}"}, {"Retry-After": "1"}
    try:
        body = resp.json()
    except ValueError:
        body = {"detail": resp.text[:300]}
    extra = {k: v for k, v in resp.headers.items() if k.lower() == "retry-after"}
    extra["x-twin-engine"] = name
    return resp.status_code, body if isinstance(body, dict) else {"result": body}, extra


async def to_owner(st: ApiState, request: Request, device: str) -> Response | None:
    """The owner engine's answer to ``request`` about ``device``; None: this engine runs it."""
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
        resp = await st.peers().request(
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


class Owner:
    """A route's way to its device's owner engine (the :data:`ToOwner` dependency): ``await
    owner(device)`` is the owner's answer to this request, or None when this engine runs it."""

    def __init__(self, request: Request, st: State) -> None:
        self.request = request
        self.st = st

    async def __call__(self, device: str) -> Response | None:
        return await to_owner(self.st, self.request, device)


ToOwner = Annotated[Owner, Depends(Owner)]
