"""``/api/v1/devices``: list (filters, sort, pages), create, read, replace, delete; status and
its history, metrics, the twin and its desired state, maintenance, device keys.

Every change is a registry revision (``deps.change``) the engine reloads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException, Query, Request
from pydantic import BaseModel, StringConstraints

from twin import policy
from twin.api import auth
from twin.api.deps import (
    PREFIX,
    Admin,
    Limit,
    Offset,
    Operator,
    Since,
    State,
    Viewer,
    authorize,
    change,
    metadata_name,
)
from twin.api.owner import ToOwner
from twin.api.routes.timeseries import device_series
from twin.api.specio import Specs
from twin.api.state import ApiState
from twin.control.ledger import SET, Catalog
from twin.errors import CommandError, ConflictError, NotFoundError

LabelFilter = Annotated[str, StringConstraints(pattern="^[^=]+=")]
"""A label selector, ``key=value``."""

router = APIRouter(prefix=PREFIX)

SORT_FIELDS = ("name", "site", "group", "type", "model", "status", "last_seen", "protocol")
Sort = Annotated[
    str,
    Query(
        pattern=f"^-?({'|'.join(SORT_FIELDS)})$",
        description="a field to sort by, prefixed with - to reverse",
    ),
]


class MaintenanceRequest(BaseModel):
    on: bool = True


# -- views shared with the groups routes ------------------------------------------------------
def device_or_404(st: ApiState, name: str) -> dict[str, Any]:
    doc = st.engine.device_doc(name)
    if doc is None:
        raise HTTPException(404, f"no device {name!r}")
    return doc


def summary(st: ApiState, name: str, doc: Mapping[str, Any]) -> dict[str, Any]:
    meta = doc.get("metadata") or {}
    spec = doc.get("spec") or {}
    twin = st.engine.twin(name)
    binding = spec.get("binding") or {}
    return {
        "name": name,
        "site": meta.get("site"),
        "group": meta.get("group"),
        "tags": list(meta.get("tags") or []),
        "labels": dict(meta.get("labels") or {}),
        "type": spec.get("type"),
        "model": spec.get("model"),
        "protocol": next(iter(binding), None) if isinstance(binding, Mapping) else None,
        "status": str(twin.status) if twin else "unknown",
        "last_seen": twin.last_seen if twin else None,
        "maintenance": bool(spec.get("maintenance", False)),
    }


def group_members(st: ApiState, group: str) -> set[str]:
    """``group`` and every group nested under it (through ``spec.parent``)."""
    groups = {n: d for (k, n), d in st.engine.specs.items() if k == "DeviceGroup"}
    members = {group}
    grew = True
    while grew:
        grew = False
        for n, d in groups.items():
            if n not in members and (d.get("spec") or {}).get("parent") in members:
                members.add(n)
                grew = True
    return members


def list_devices(
    st: ApiState,
    p: auth.Principal,
    *,
    site: list[str] | None,
    group: str | None,
    tag: list[str] | None,
    label: list[str] | None,
    status: list[str] | None,
    type_: list[str] | None,
    sort: str,
    limit: int,
    offset: int,
    names: set[str] | None = None,
) -> dict[str, Any]:
    engine = st.engine
    sites = policy.visible_sites(p, site)
    groups = group_members(st, group) if group else None
    labels = []
    for item in label or []:
        k, sep, v = item.partition("=")
        if not sep:
            raise HTTPException(422, f"label filter {item!r} must be key=value")
        labels.append((k, v))
    key = sort.lstrip("-")
    every = st.devices_sorted()
    if (
        key == "name"
        and names is None
        and sites is None
        and groups is None
        and not (tag or labels or type_ or status)
    ):
        # no filter, by name: a slice of the cached sorted list (no pass over every device)
        n = len(every)
        if sort.startswith("-"):
            lo, hi = max(0, n - offset - limit), max(0, n - offset)
            chosen = every[lo:hi][::-1]
        else:
            chosen = every[offset : offset + limit]
        return {
            "items": [summary(st, name, doc) for name, doc in chosen],
            "total": n,
            "limit": limit,
            "offset": offset,
            "revision": engine.revision_number,
        }
    items = []
    for name, doc in every:
        if names is not None and name not in names:
            continue
        meta = doc.get("metadata") or {}
        if sites is not None and meta.get("site") not in sites:
            continue
        if groups is not None and meta.get("group") not in groups:
            continue
        if tag and not set(tag) <= set(meta.get("tags") or ()):
            continue
        if labels and any((meta.get("labels") or {}).get(k) != v for k, v in labels):
            continue
        if type_ and (doc.get("spec") or {}).get("type") not in type_:
            continue
        if status:
            twin = engine.twin(name)
            if (str(twin.status) if twin else "unknown") not in status:
                continue
        items.append((name, doc))
    if key not in SORT_FIELDS:
        raise HTTPException(
            422, f"sort must be one of {', '.join(SORT_FIELDS)} (prefix - to reverse)"
        )
    rows = [summary(st, n, d) for n, d in items] if key != "name" else None
    if rows is None:
        if sort.startswith("-"):
            items.reverse()
        page = [summary(st, n, d) for n, d in items[offset : offset + limit]]
    else:
        rows.sort(
            key=lambda r: (r[key] is None, r[key] if r[key] is not None else 0, r["name"]),
            reverse=sort.startswith("-"),
        )
        page = rows[offset : offset + limit]
    return {
        "items": page,
        "total": len(items),
        "limit": limit,
        "offset": offset,
        "revision": engine.revision_number,
    }


def _set_spec_field(device: str, key: str, value: Any) -> Callable[[Specs], Specs]:
    def fn(specs: Specs) -> Specs:
        doc = specs.get(("Device", device))
        if doc is None:
            raise NotFoundError(f"no device {device!r}")
        spec = dict(doc.get("spec") or {})
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
        specs[("Device", device)] = {**doc, "spec": spec}
        return specs

    return fn


# -- devices ------------------------------------------------------------------------------------
@router.get("/devices", tags=["devices"])
async def get_devices(
    st: State,
    p: Viewer,
    site: Annotated[list[str] | None, Query()] = None,
    group: str | None = None,
    tag: Annotated[list[str] | None, Query()] = None,
    label: Annotated[list[LabelFilter] | None, Query(description="key=value")] = None,
    status: Annotated[list[str] | None, Query()] = None,
    type: Annotated[list[str] | None, Query()] = None,
    sort: Sort = "name",
    limit: Limit = 100,
    offset: Offset = 0,
) -> dict[str, Any]:
    return list_devices(
        st,
        p,
        site=site,
        group=group,
        tag=tag,
        label=label,
        status=status,
        type_=type,
        sort=sort,
        limit=limit,
        offset=offset,
    )


@router.post("/devices", tags=["devices"], status_code=201)
async def post_device(
    request: Request, st: State, p: Operator, doc: Annotated[dict[str, Any], Body()]
) -> dict[str, Any]:
    doc = {"apiVersion": "flux.iot/v1", "kind": "Device", **doc}
    name = metadata_name(doc)
    if doc.get("kind") != "Device" or not isinstance(name, str):
        raise HTTPException(422, "body must be a Device document with metadata.name")
    authorize(p, policy.WRITE, new=doc)  # before 409: a name in another site stays unknown
    if st.engine.device_doc(name) is not None:
        raise HTTPException(409, f"device {name!r} exists; use PUT to change it")

    def fn(specs: Specs) -> Specs:
        if ("Device", name) in specs:
            raise ConflictError(f"device {name!r} exists")
        specs[("Device", name)] = doc
        return specs

    out = await change(request, p, fn, f"create device {name}")
    return {**out, "device": summary(st, name, st.engine.device_doc(name) or doc)}


@router.get("/devices/{device}", tags=["devices"])
async def get_device(st: State, p: Viewer, device: str) -> dict[str, Any]:
    doc = device_or_404(st, device)
    authorize(p, policy.READ, doc)
    twin = st.engine.twin(device)
    last = await st.call(st.engine.registry.last_changed, "Device", device)
    return {
        **summary(st, device, doc),
        "document": doc,
        "last_changed": last,
        "twin": twin.to_json() if twin else None,
    }


@router.put("/devices/{device}", tags=["devices"])
async def put_device(
    request: Request,
    st: State,
    p: Operator,
    device: str,
    doc: Annotated[dict[str, Any], Body()],
) -> dict[str, Any]:
    # the stored device first (403 before any validation problem); change() judges both
    authorize(p, policy.WRITE, old=device_or_404(st, device))
    doc = {"apiVersion": "flux.iot/v1", "kind": "Device", **doc}
    metadata_name(doc)  # 422 unless metadata is an object
    doc["metadata"] = {**(doc.get("metadata") or {}), "name": device}

    def fn(specs: Specs) -> Specs:
        if ("Device", device) not in specs:
            raise NotFoundError(f"no device {device!r}")
        specs[("Device", device)] = doc
        return specs

    out = await change(request, p, fn, f"update device {device}")
    return {**out, "device": summary(st, device, st.engine.device_doc(device) or doc)}


@router.delete("/devices/{device}", tags=["devices"])
async def delete_device(request: Request, st: State, p: Operator, device: str) -> dict[str, Any]:
    authorize(p, policy.WRITE, old=device_or_404(st, device))

    def fn(specs: Specs) -> Specs:
        if specs.pop(("Device", device), None) is None:
            raise NotFoundError(f"no device {device!r}")
        return specs

    return await change(request, p, fn, f"delete device {device}")


@router.post("/devices/{device}/activate", tags=["devices"])
async def activate(request: Request, st: State, p: Operator, device: str) -> dict[str, Any]:
    """End maintenance: the device is monitored (and alarms raised) again."""
    authorize(p, policy.OPERATE, device_or_404(st, device))
    return await change(
        request, p, _set_spec_field(device, "maintenance", None), f"activate device {device}"
    )


@router.post("/devices/{device}/maintenance", tags=["devices"])
async def maintenance(
    request: Request, st: State, p: Operator, device: str, body: MaintenanceRequest
) -> dict[str, Any]:
    """Put a device into (or out of) maintenance: suppresses its alarms."""
    authorize(p, policy.OPERATE, device_or_404(st, device))
    return await change(
        request,
        p,
        _set_spec_field(device, "maintenance", True if body.on else None),
        f"maintenance {'on' if body.on else 'off'} for {device}",
    )


# -- status, metrics, twin ------------------------------------------------------------------------
@router.get("/devices/{device}/status", tags=["status"])
async def device_status(st: State, p: Viewer, device: str) -> dict[str, Any]:
    doc = device_or_404(st, device)
    authorize(p, policy.READ, doc)
    twin = st.engine.twin(device)
    return {
        "device": device,
        "status": str(twin.status) if twin else "unknown",
        "since": twin.status_since if twin else None,
        "last_seen": twin.last_seen if twin else None,
        "fault": twin.fault if twin else None,
        "maintenance": bool((doc.get("spec") or {}).get("maintenance", False)),
    }


@router.get("/devices/{device}/status/history", tags=["status"])
async def device_status_history(
    st: State, p: Viewer, device: str, since: Since = None, limit: Limit = 100
) -> dict[str, Any]:
    authorize(p, policy.READ, device_or_404(st, device))
    rows = await st.call(st.engine.registry.status_history, device, since=since, limit=limit)
    return {
        "device": device,
        "items": [
            {"status": r.status, "timestamp": r.timestamp, "metadata": dict(r.metadata)}
            for r in rows
        ],
    }


@router.get("/devices/{device}/metrics", tags=["status"])
async def device_metrics(
    st: State,
    p: Viewer,
    device: str,
    name: Annotated[list[str] | None, Query()] = None,
    since: Since = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
) -> dict[str, Any]:
    authorize(p, policy.READ, device_or_404(st, device))
    rows = await st.call(st.engine.registry.metrics, device, names=name, since=since, limit=limit)
    ratios = [r.value for r in rows if r.name == "uptime_ratio"]
    twin = st.engine.twin(device)
    return {
        "device": device,
        "live": twin.metrics.to_json() if twin else None,
        "uptime_ratio": sum(ratios) / len(ratios) if ratios else None,
        "samples": [{"name": r.name, "value": r.value, "timestamp": r.timestamp} for r in rows],
        # per telemetry metric from the time-series store (None without one)
        "series": await device_series(st.engine, device, since=since),
    }


@router.get("/devices/{device}/twin", tags=["twin"], response_model=dict[str, Any])
async def device_twin(st: State, p: Viewer, device: str, owner: ToOwner) -> Any:
    authorize(p, policy.READ, device_or_404(st, device))
    forwarded = await owner(device)  # scale-out: the owner has the live twin
    if forwarded is not None:
        return forwarded
    twin = st.engine.twin(device)
    if twin is None:
        raise HTTPException(404, f"device {device!r} is not running")
    return twin.to_json()


@router.patch("/devices/{device}/twin/desired", tags=["twin"], response_model=dict[str, Any])
async def patch_desired(
    st: State,
    p: Operator,
    device: str,
    patch: Annotated[dict[str, Any], Body()],
    owner: ToOwner,
) -> Any:
    """An operator's runtime desired values: ``{property: value}`` (``null`` removes the
    override, so the spec value applies again). Each value is checked like a ``set`` command (a
    writable property of the model, in range) and becomes a runtime override set by
    ``api:USER`` (twin/registry/overrides.py): in effect at once, durable when the response is
    sent, never a revision. To change the declared default, edit ``spec.desired`` and apply."""
    authorize(p, policy.OPERATE, device_or_404(st, device))
    if not patch:
        raise HTTPException(422, "the body must map at least one property to a value (or null)")
    forwarded = await owner(device)  # scale-out: its owner reconciles it
    if forwarded is not None:
        return forwarded
    catalog = Catalog(st.engine.specs)
    for prop, value in patch.items():
        if value is not None:
            try:
                catalog.validate(device, SET, {"property": prop, "value": value}, None)
            except CommandError as exc:
                raise HTTPException(422, str(exc)) from None
    overrides = st.engine.overrides
    for prop, value in patch.items():
        if value is None:
            await overrides.clear(device, prop)
        else:
            await overrides.set(device, prop, value, f"api:{p.subject}")
    twin = st.engine.twin(device)
    return {
        "device": device,
        "overrides": {k: o.to_json() for k, o in sorted(overrides.of(device).items())},
        "twin": twin.to_json() if twin else None,
    }


# -- device keys --------------------------------------------------------------------------------
def key_target(st: ApiState, device: str) -> policy.Target:
    """A device's keys live in the device's site; keys of a device no longer in the spec
    belong to no site a scoped admin holds (only an unscoped admin reaches them)."""
    doc = st.engine.device_doc(device)
    return policy.Target.of("DeviceKey", policy.doc_site(doc) if doc is not None else None)


@router.post("/devices/{device}/keys", tags=["devices"], status_code=201)
async def create_key(st: State, p: Admin, device: str) -> dict[str, Any]:
    device_or_404(st, device)
    policy.check(p, policy.WRITE, new=key_target(st, device))
    rec, key = await st.call(auth.create_device_key, st.engine.registry, device)
    return {"id": rec.id, "device": device, "key": key, "created_at": rec.created_at}


@router.get("/devices/{device}/keys", tags=["devices"])
async def list_keys(st: State, p: Admin, device: str) -> dict[str, Any]:
    policy.check(p, policy.READ, old=key_target(st, device))
    keys = await st.call(st.engine.registry.device_keys, device)
    return {
        "items": [
            {"id": k.id, "created_at": k.created_at, "revoked_at": k.revoked_at} for k in keys
        ]
    }


@router.delete("/devices/{device}/keys/{key_id}", tags=["devices"])
async def revoke_key(st: State, p: Admin, device: str, key_id: str) -> dict[str, Any]:
    policy.check(p, policy.WRITE, old=key_target(st, device))
    keys = await st.call(st.engine.registry.device_keys, device)
    if not any(k.id == key_id for k in keys):
        raise HTTPException(404, f"no key {key_id!r} for device {device!r}")
    await st.call(st.engine.registry.revoke_device_key, key_id, time.time())
    st.keys.invalidate(key_id)
    return {"revoked": key_id}
