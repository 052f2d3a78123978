"""Produce a report's files: gather its data once, render each format.

Shared by ``twin report run`` (in the foreground) and the engine's report service (in a
worker thread).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twin.registry.base import Key, Registry
from twin.reports.data import gather
from twin.reports.errors import ReportError
from twin.reports.model import ReportData
from twin.spec.periods import Period, resolve_period
from twin.timeseries.base import TimeSeriesStore

FORMATS = ("pdf", "xlsx", "csv")
MEDIA_TYPES = {
    "pdf": "application/pdf",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "csv": "text/csv",
    "zip": "application/zip",
}


@dataclass(frozen=True)
class Artifact:
    format: str  # pdf | xlsx | csv
    filename: str  # daily-plant-2026-03-01.pdf
    data: bytes

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.filename.rsplit(".", 1)[-1]]


def report_timezone(doc: Mapping[str, Any], specs: Mapping[Key, Mapping[str, Any]]) -> str:
    """The report's ``timezone``, else its site's, else UTC."""
    spec = doc.get("spec") or {}
    if spec.get("timezone"):
        return str(spec["timezone"])
    site = (doc.get("metadata") or {}).get("site")
    site_doc = specs.get(("Site", str(site))) if site else None
    return str(((site_doc or {}).get("spec") or {}).get("timezone") or "UTC")


def period_of(
    doc: Mapping[str, Any], specs: Mapping[Key, Mapping[str, Any]], period: Any, now: float
) -> Period:
    spec = doc.get("spec") or {}
    try:
        return resolve_period(period if period is not None else spec.get("period", "yesterday"),
                              report_timezone(doc, specs), now)
    except (ValueError, KeyError) as exc:
        raise ReportError(str(exc), hint="e.g. --period yesterday or 2026-03-01..2026-03-08") \
            from None


def file_stem(data: ReportData) -> str:
    start = data.period.local(data.period.start)
    return f"{data.name}-{start:%Y-%m-%d}"


def render(data: ReportData, formats: Sequence[str],
           progress: Callable[[str], None] | None = None) -> list[Artifact]:
    out: list[Artifact] = []
    stem = file_stem(data)
    for fmt in formats:
        if progress is not None:
            progress(f"rendering {fmt.upper()}")
        if fmt == "pdf":
            from twin.reports.pdf import render_pdf

            out.append(Artifact("pdf", f"{stem}.pdf", render_pdf(data)))
        elif fmt == "xlsx":
            from twin.reports.xlsx import render_xlsx

            out.append(Artifact("xlsx", f"{stem}.xlsx", render_xlsx(data)))
        elif fmt == "csv":
            from twin.reports.csvout import render_csv

            blob, ext = render_csv(data)
            out.append(Artifact("csv", f"{stem}.{ext}", blob))
        else:
            raise ReportError(f"unknown format {fmt!r}", hint=f"one of {', '.join(FORMATS)}")
    return out


def produce(
    doc: Mapping[str, Any],
    specs: Mapping[Key, Mapping[str, Any]],
    period: Period,
    store: TimeSeriesStore | None,
    registry: Registry | None,
    formats: Sequence[str] | None = None,
    *,
    progress: Callable[[str], None] | None = None,
    now: float | None = None,
) -> tuple[ReportData, list[Artifact]]:
    """Gather and render (synchronous; call it in a worker thread from Trio)."""
    spec = doc.get("spec") or {}
    fmts = list(formats or spec.get("formats") or ["pdf"])

    def step(done: int, total: int, text: str) -> None:
        if progress is not None:
            progress(f"{text} ({done}/{total})")

    data = gather(doc, specs, period, store, registry, progress=step,
                  now=time.time() if now is None else now)
    return data, render(data, fmts, progress)


__all__ = ["FORMATS", "MEDIA_TYPES", "Artifact", "period_of", "produce", "render",
           "report_timezone"]
