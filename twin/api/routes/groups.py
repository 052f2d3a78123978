"""``/api/v1/device-groups``: list, create, and the devices of a group (nested groups included)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException, Query, Request

from twin import policy
from twin.api.deps import (
    PREFIX,
    Limit,
    Offset,
    Operator,
    State,
    Viewer,
    authorize,
    change,
    metadata_name,
)
from twin.api.routes.devices import Sort, list_devices
from twin.api.specio import Specs

router = APIRouter(prefix=PREFIX, tags=["groups"])


@router.get("/device-groups")
async def get_groups(
    st: State,
    p: Viewer,
    site: Annotated[list[str] | None, Query()] = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> dict[str, Any]:
    sites = policy.visible_sites(p, site)
    rows = [
        {"name": n, "site": (d.get("metadata") or {}).get("site"), **(d.get("spec") or {})}
        for (k, n), d in sorted(st.engine.specs.items())
        if k == "DeviceGroup" and (sites is None or (d.get("metadata") or {}).get("site") in sites)
    ]
    return {
        "items": rows[offset : offset + limit],
        "total": len(rows),
        "limit": limit,
        "offset": offset,
    }


@router.post("/device-groups", status_code=201)
async def post_group(
    request: Request, st: State, p: Operator, doc: Annotated[dict[str, Any], Body()]
) -> dict[str, Any]:
    doc = {"apiVersion": "flux.iot/v1", "kind": "DeviceGroup", "spec": {}, **doc}
    name = metadata_name(doc)
    if doc.get("kind") != "DeviceGroup" or not isinstance(name, str):
        raise HTTPException(422, "body must be a DeviceGroup document with metadata.name")
    authorize(p, policy.WRITE, new=doc)  # before 409: a name in another site stays unknown
    if ("DeviceGroup", name) in st.engine.specs:
        raise HTTPException(409, f"device group {name!r} exists")

    def fn(specs: Specs) -> Specs:
        specs[("DeviceGroup", name)] = doc
        return specs

    return await change(request, p, fn, f"create device group {name}")


@router.get("/device-groups/{name}/devices")
async def group_devices(
    st: State, p: Viewer, name: str, sort: Sort = "name", limit: Limit = 100, offset: Offset = 0
) -> dict[str, Any]:
    doc = st.engine.specs.get(("DeviceGroup", name))
    if doc is None:
        raise HTTPException(404, f"no device group {name!r}")
    authorize(p, policy.READ, doc)
    return list_devices(
        st,
        p,
        site=None,
        group=name,
        tag=None,
        label=None,
        status=None,
        type_=None,
        sort=sort,
        limit=limit,
        offset=offset,
    )
