"""Report runs: one row per run of a report (``twin report run --deliver``, the API, the
engine's schedule), with its status, the files it produced and each delivery's outcome.

Status: ``running`` → ``success`` | ``partial`` (files produced, some delivery failed after
its retries) | ``failed`` (no files, or every delivery failed: the reason in ``error``). The files themselves live in the
state directory (``reports/<run id>/``); the row names them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ReportRun:
    id: str
    report: str
    site: str | None
    trigger: str  # "schedule" | "missed-schedule" | "api:alice" | "cli"
    status: str  # running | success | partial | failed
    started_at: float
    finished_at: float | None = None
    scheduled_for: float | None = None  # the schedule's fire time (schedule runs)
    period: Mapping[str, Any] = field(default_factory=dict)  # Period.as_json()
    artifacts: tuple[Mapping[str, Any], ...] = ()  # {format, filename, bytes, path}
    deliveries: tuple[Mapping[str, Any], ...] = ()  # {channel, target, status, attempts, error}
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "report": self.report,
            "site": self.site,
            "trigger": self.trigger,
            "status": self.status,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "scheduled_for": self.scheduled_for,
            "period": dict(self.period),
            "artifacts": [
                {k: v for k, v in a.items() if k != "path"} for a in self.artifacts
            ],
            "deliveries": [dict(d) for d in self.deliveries],
            "error": self.error,
        }
