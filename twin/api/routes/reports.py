"""Reports: list them, run one now, list its past runs, read a run, download a run's files.

``POST /api/v1/reports/{name}/run`` answers 202 with the recorded run (``status: running``);
poll ``GET /api/v1/reports/runs/{id}`` until it is ``success``, ``partial`` (files made, a
delivery failed) or ``failed`` (``error`` says why). Reading needs the viewer role on the
report's site, running one the operator role (:mod:`twin.policy`, kind ``Report``). Needs the
engine's report service (503 otherwise).
"""

from __future__ import annotations

from typing import Annotated, Any

import trio
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel

from twin import policy
from twin.api.deps import PREFIX, Limit, Operator, Viewer, api_state
from twin.api.routes.timeseries import attachment
from twin.registry.reports import ReportRun
from twin.reports.errors import ReportError
from twin.reports.render import FORMATS, MEDIA_TYPES
from twin.reports.service import ReportService, reports_of

router = APIRouter(prefix=f"{PREFIX}/reports", tags=["reports"])


class ReportInfo(BaseModel):
    name: str
    site: str | None
    title: str
    period: Any
    formats: list[str]
    schedule: dict[str, Any] | None
    next_run: float | None
    delivery: list[str]


class ReportList(BaseModel):
    items: list[ReportInfo]


class Artifact(BaseModel):
    format: str
    filename: str
    bytes: int
    media_type: str


class Delivery(BaseModel):
    channel: str | None
    target: str
    status: str
    attempts: int
    error: str | None
    index: int | None = None
    at: float | None = None


class RunModel(BaseModel):
    id: str
    report: str
    site: str | None
    trigger: str
    status: str
    started_at: float
    finished_at: float | None
    scheduled_for: float | None
    period: dict[str, Any]
    artifacts: list[Artifact]
    deliveries: list[Delivery]
    error: str | None


class RunList(BaseModel):
    items: list[RunModel]


def _service(request: Request) -> ReportService:
    svc = reports_of(api_state(request).engine)
    if svc is None or svc.runner is None:
        raise HTTPException(503, "the report service is not running on this engine")
    return svc


def _target(site: str | None) -> policy.Target:
    return policy.Target.of("Report", site)


def _doc(svc: ReportService, name: str) -> dict[str, Any]:
    doc = svc.reports().get(name)
    if doc is None:
        raise HTTPException(404, f"no report {name!r}")
    return dict(doc)


def _run_json(run: ReportRun) -> RunModel:
    return RunModel.model_validate(run.to_json())


@router.get("")
async def list_reports(request: Request, p: Viewer) -> ReportList:
    svc = _service(request)
    items = []
    for name, doc in sorted(svc.reports().items()):
        site = (doc.get("metadata") or {}).get("site")
        if not policy.allows(p, policy.READ, old=_target(site)):
            continue
        spec = doc.get("spec") or {}
        items.append(ReportInfo(
            name=name, site=site, title=str(spec.get("title") or name),
            period=spec.get("period", "yesterday"), formats=list(spec.get("formats") or ["pdf"]),
            schedule=spec.get("schedule"), next_run=svc.next_fire.get(name),
            delivery=[str(c.get("type")) for c in spec.get("delivery") or []],
        ))
    return ReportList(items=items)


@router.post("/{name}/run", status_code=202)
async def run_report(
    request: Request,
    p: Operator,
    name: str,
    period: Annotated[str | None, Query(
        max_length=200, description="yesterday, last_week, month_to_date, ... or START..END")
    ] = None,
    format: Annotated[list[str] | None, Query(description="pdf, xlsx, csv")] = None,
) -> RunModel:
    svc = _service(request)
    doc = _doc(svc, name)
    policy.check(p, policy.OPERATE, old=_target((doc.get("metadata") or {}).get("site")))
    for f in format or ():
        if f not in FORMATS:
            raise HTTPException(422, f"unknown format {f!r} (one of {', '.join(FORMATS)})")
    try:
        run = await svc.start_run(name, period=period, trigger=f"api:{p.subject}",
                                  formats=format or None)
    except ReportError as exc:
        raise HTTPException(422, str(exc)) from None
    return _run_json(run)


@router.get("/{name}/runs")
async def report_runs(request: Request, p: Viewer, name: str, limit: Limit = 50) -> RunList:
    svc = _service(request)
    st = api_state(request)
    runs = await st.call(st.engine.registry.report_runs, name, limit=limit)
    doc = svc.reports().get(name)
    if doc is None and not runs:
        raise HTTPException(404, f"no report {name!r}")
    return RunList(items=[_run_json(r) for r in runs
                          if policy.allows(p, policy.READ, old=_target(r.site))])


async def _run(request: Request, p: Any, run_id: str) -> ReportRun:
    _service(request)
    st = api_state(request)
    run: ReportRun | None = await st.call(st.engine.registry.report_run, run_id)
    if run is None or not policy.allows(p, policy.READ, old=_target(run.site)):
        raise HTTPException(404, f"no report run {run_id!r}")
    return run


@router.get("/runs/{run_id}")
async def report_run(request: Request, p: Viewer, run_id: str) -> RunModel:
    return _run_json(await _run(request, p, run_id))


@router.get(
    "/runs/{run_id}/files/{filename}",
    response_class=Response,
    responses={200: {"content": {m: {"schema": {"type": "string", "format": "binary"}}
                                 for m in sorted(set(MEDIA_TYPES.values()))},
                     "description": "the file"}},
)
async def download(request: Request, p: Viewer, run_id: str, filename: str) -> Response:
    run = await _run(request, p, run_id)
    art = next((a for a in run.artifacts if a.get("filename") == filename), None)
    if art is None or not art.get("path"):
        raise HTTPException(404, f"run {run_id} has no file {filename!r}")
    try:
        data = await trio.Path(str(art["path"])).read_bytes()
    except OSError:
        raise HTTPException(404, f"the file {filename!r} of run {run_id} is gone") from None
    return Response(data, media_type=str(art.get("media_type") or "application/octet-stream"),
                    headers={"Content-Disposition": attachment(filename)})


notifications_router = APIRouter(prefix=f"{PREFIX}/notifications", tags=["reports"])


class NotificationEntry(BaseModel):
    rule: str
    event: str  # raised | escalated | resolved | suppressed | throttled
    at: float
    alarms: list[dict[str, Any]]
    deliveries: list[Delivery]


class NotificationList(BaseModel):
    items: list[NotificationEntry]
    counts: dict[str, int]


@notifications_router.get("")
async def recent_notifications(request: Request, p: Viewer, limit: Limit = 50
                               ) -> NotificationList:
    """The latest notification messages of this engine (newest first, in memory: the last
    200), each with what every channel answered: retries and failures are visible here."""
    svc = _service(request)
    notifier = svc.notifier
    if notifier is None:
        raise HTTPException(503, "notifications are not running on this engine")
    rules = notifier.rules
    items = []
    for entry in reversed(notifier.recent):
        rule = rules.get(str(entry["rule"]))
        site = rule.site if rule is not None else None
        if not policy.allows(p, policy.READ, old=policy.Target.of("NotificationRule", site)):
            continue
        items.append(NotificationEntry.model_validate(entry))
        if len(items) >= limit:
            break
    return NotificationList(items=items, counts=dict(notifier.counts))
