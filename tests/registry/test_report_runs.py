"""Report runs in the registry (migration 5), both backends: saved, updated by id, listed newest
first per report, read back with their files and deliveries, and the newest schedule time
(what a restarted engine catches up from)."""

from __future__ import annotations

from dataclasses import replace

from twin.registry.reports import ReportRun

from .conftest import Opener


def test_report_runs_round_trip(open_reg: Opener) -> None:
    reg = open_reg()
    assert reg.report_runs() == [] and reg.last_scheduled_run("daily") is None
    a = ReportRun("rr_a", "daily", "plant-a", "schedule", "running", 100.0,
                  scheduled_for=90.0, period={"label": "yesterday", "start": 0, "end": 86400})
    reg.save_report_run(a)
    done = replace(
        a, status="partial", finished_at=130.5,
        artifacts=({"format": "pdf", "filename": "daily-1970-01-01.pdf", "bytes": 10,
                    "media_type": "application/pdf", "path": "/x/y.pdf"},),
        deliveries=({"channel": "email", "target": "email:ops@example.com",
                     "status": "failed", "attempts": 3, "error": "SMTP: refused"},),
        error="email:ops@example.com: SMTP: refused",
    )
    reg.save_report_run(done)
    reg.save_report_run(ReportRun("rr_b", "daily", "plant-a", "api:alice", "success", 200.0))
    reg.save_report_run(ReportRun("rr_c", "weekly", None, "cli", "failed", 150.0,
                                  error="x.html.j2:3: template error"))
    again = open_reg()  # another connection: an engine restart
    assert [r.id for r in again.report_runs("daily")] == ["rr_b", "rr_a"]
    assert [r.id for r in again.report_runs(limit=2)] == ["rr_b", "rr_c"]
    got = again.report_run("rr_a")
    assert got == done
    assert got is not None and got.to_json()["artifacts"][0] == {
        "format": "pdf", "filename": "daily-1970-01-01.pdf", "bytes": 10,
        "media_type": "application/pdf"}  # the server-side path is not shown
    assert again.report_run("nope") is None
    assert again.last_scheduled_run("daily") == 90.0
    assert again.last_scheduled_run("weekly") is None
