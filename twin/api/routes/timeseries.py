"""Time-series routes: queries with export, storage stats, a retention pass on demand.

Included by ``create_app`` (:data:`twin.api.routes.ROUTERS`); they need the
engine's :class:`~twin.runtime.timeseries_service.TimeSeriesService` and answer 503 without it.

* ``GET /api/v1/timeseries/query`` — ``metric``, ``device``, ``site``, ``group``, ``tag``
  (repeatable or comma-separated), ``from``/``to`` (ISO, epoch, ``now``, ``-1d``, ``now-2h``;
  default the last hour), ``every`` (bucket, e.g. ``1m``; raw points without it), ``agg``
  (avg, min, max, sum, count, first, last), ``fill`` (none, null, zero, previous, linear),
  ``group_by`` (device, site, group, metric, none, tag:KEY), ``tier``, ``limit``,
  ``compare`` (e.g. ``7d``: this range vs the same range a week earlier), ``trend`` (slope per
  series), ``format`` (json, csv, parquet, xlsx; the latter three as a download). A bucketed
  answer says what it read in ``X-Twin-Tier`` (``raw``, ``agg_3600s``, ``agg_3600s+raw``).
  Site-scoped users only see their sites.
* ``GET /api/v1/timeseries/storage`` — points, bytes, bytes/point per tier and in total,
  growth rate, free disk, ``disk_nearly_full``, writer counters, policies, last retention pass.
* ``POST /api/v1/timeseries/retention/run`` (admin) — one retention pass now.
* :func:`device_series` — latest value and count per metric of one device over a range, for
  ``GET /api/v1/devices/{id}/metrics``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote

import trio
from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import Response

from twin import policy
from twin.api.deps import PREFIX, Admin, State, Viewer
from twin.runtime.timeseries_service import TimeSeriesService, timeseries_of
from twin.timeseries.base import RAW, Selector, TimeSeriesStore
from twin.timeseries.query import choose_tier
from twin.timeseries.request import FORMATS, MEDIA_TYPES, QueryRequest, render

if TYPE_CHECKING:
    from twin.api import auth
    from twin.runtime.engine import Engine

Many = Annotated[list[str] | None, Query()]

router = APIRouter(prefix=f"{PREFIX}/timeseries", tags=["timeseries"])


def _service(engine: Engine) -> TimeSeriesService:
    svc = timeseries_of(engine)
    if svc is None or svc.store is None:
        raise HTTPException(503, "the time-series service is not running on this engine")
    return svc


def _scoped_sites(p: auth.Principal, sites: list[str] | None) -> list[str] | None:
    for s in sites or ():
        policy.check(p, policy.READ, old=policy.Target.of("Device", s))
    visible = policy.visible_sites(p, sites)
    return None if visible is None else sorted(visible)


async def device_series(
    engine: Engine, device: str, since: float | None = None, until: float | None = None
) -> list[dict[str, Any]] | None:
    """Per metric of ``device`` over ``[since, until)`` (default the last day): count, first
    and last time, last/min/max/avg value; None when no time-series store is running."""
    svc = timeseries_of(engine)
    if svc is None or svc.store is None:
        return None
    store: TimeSeriesStore = svc.store
    end = time.time() + 1 if until is None else until
    start = end - 86400 if since is None else since

    def run() -> list[dict[str, Any]]:
        part = store.aggregate("raw", Selector.of(devices=device), start, end, end - start + 1)
        out = []
        for r in part.to_pylist():
            out.append(
                {
                    "metric": r["metric"],
                    "count": r["count"],
                    "first_ts": r["first_ts"].timestamp() if r["first_ts"] else None,
                    "last_ts": r["last_ts"].timestamp() if r["last_ts"] else None,
                    "last": r["last"] if r["last"] is not None else r["last_str"],
                    "min": r["min"],
                    "max": r["max"],
                    "avg": r["sum"] / r["count"] if r["count"] and r["sum"] is not None else None,
                }
            )
        return sorted(out, key=lambda x: x["metric"])

    return await trio.to_thread.run_sync(run)


def tier_used(store: TimeSeriesStore, req: QueryRequest) -> str | None:
    """What a bucketed query reads (the ``X-Twin-Tier`` header): the tier asked for, ``raw``,
    the tier the engine chose (``agg_3600s``), or ``agg_3600s+raw`` when the range goes past
    the tier's last roll-up. None for raw points (no bucket)."""
    q = req.query()
    bucket = q.bucket_s
    if bucket is None:
        return None
    if q.tier is not None:
        return q.tier
    tier, wm = choose_tier(store, q.selector, q.start_s, bucket)
    if tier == RAW or wm is None:
        return RAW
    return tier if wm >= q.end_s else f"{tier}+{RAW}"


@router.get("/query")
async def query(
    st: State,
    p: Viewer,
    metric: Many = None,
    device: Many = None,
    site: Many = None,
    group: Many = None,
    tag: Many = None,
    from_: Annotated[str | None, Query(alias="from")] = "-1h",
    to: str | None = None,
    every: str | None = None,
    agg: Many = None,
    fill: str = "none",
    group_by: str = "device",
    tier: str | None = None,
    limit: Annotated[int | None, Query(ge=1, le=10_000_000)] = None,
    compare: str | None = None,
    trend: bool = False,
    format: str = "json",
) -> Response:
    svc = _service(st.engine)
    if format not in FORMATS:
        raise HTTPException(422, f"format {format!r}: use one of {', '.join(FORMATS)}")
    try:
        req = QueryRequest.build(
            metrics=metric,
            devices=device,
            sites=_scoped_sites(p, site),
            groups=group,
            tags=tag,
            start=from_,
            end=to,
            every=every,
            aggregates=agg,
            fill=fill,
            group_by=group_by,
            tier=tier,
            limit=limit,
            compare=compare,
            trend=trend,
        )
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    store = svc.store
    assert store is not None

    def run() -> tuple[bytes, str | None]:
        return render(req.run(store), format), tier_used(store, req)

    try:
        body, used = await trio.to_thread.run_sync(run)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    headers = {}
    if used is not None:
        headers["X-Twin-Tier"] = used
    if format != "json":
        name = "-".join(req.metrics) or "timeseries"
        headers["Content-Disposition"] = attachment(f"{name}.{format}")
    return Response(body, media_type=MEDIA_TYPES[format], headers=headers)


def attachment(filename: str) -> str:
    """``Content-Disposition`` for a download named ``filename`` (RFC 6266): an ASCII fallback
    with every character outside ``[A-Za-z0-9 ._-]`` replaced by ``_`` (no quote, CR or LF
    can end the parameter or the header), and the exact name as ``filename*=UTF-8''...``."""
    name = filename[:200]
    fallback = "".join(c if c.isascii() and (c.isalnum() or c in " ._-") else "_" for c in name)
    exact = quote(name, safe="", errors="replace")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{exact}"


@router.get("/storage")
async def storage(st: State, p: Viewer) -> dict[str, Any]:
    return await _service(st.engine).refresh_stats()


@router.post("/retention/run")
async def retention_run(st: State, p: Admin) -> dict[str, Any]:
    """One pass of every site's retention policies (so an unscoped admin's)."""
    policy.check(p, policy.OPERATE, old=policy.Target("RetentionPolicy", None))
    svc = _service(st.engine)
    report = await svc.run_retention()
    return {"ran": report is not None, "report": report, "policies": sorted(svc.policies)}


__all__ = ["attachment", "device_series", "router", "tier_used"]
