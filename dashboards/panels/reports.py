"""Reports: each report with its schedule and its recent runs (status, period, errors), a
download button per file, and (operators) "Run now" over a chosen period. Uses the reports
API (issue 16)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import streamlit as st

from dashboards.client import ApiError, NotAvailable
from dashboards.core import Ctx

PERIODS = ["yesterday", "today", "last_24h", "last_7d", "last_week", "month_to_date",
           "last_month"]
STATUS = {"success": "✅", "partial": "⚠️", "failed": "❌", "running": "⏳"}


def run_line(run: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(run["started_at"]))
    period = (run.get("period") or {}).get("text") or (run.get("period") or {}).get("label", "")
    return (f"{STATUS.get(run['status'], '')} **{run['status']}** · {started} · {period} · "
            f"{run['trigger']}")


def fetcher(ctx: Ctx, run_id: str, filename: str) -> Callable[[], bytes]:
    """The file's bytes, fetched only when the user clicks the download button."""

    def fetch() -> bytes:
        return ctx.client.report_file(run_id, filename)

    return fetch


def render(ctx: Ctx, panel: dict[str, Any]) -> None:
    st.subheader(panel.get("title") or "Reports")
    try:
        reports = ctx.client.reports()
    except NotAvailable as exc:
        st.caption(f"Reports are not available on this server ({exc.detail}).")
        return
    except ApiError as exc:
        st.error(str(exc))
        return
    if not reports:
        st.caption("No reports: declare one with kind: Report.")
        return
    for rep in reports:
        name = rep["name"]
        sched = (rep.get("schedule") or {}).get("cron")
        with st.expander(f"**{rep['title']}** ({name})", expanded=True):
            st.caption(
                f"period {rep['period']} · formats {', '.join(rep['formats'])}"
                + (f" · schedule `{sched}`" if sched else "")
                + (f" · delivery {', '.join(rep['delivery'])}" if rep.get("delivery") else "")
            )
            if ctx.login.can("operator"):
                c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
                period = c1.selectbox("Period", PERIODS, key=f"report-{name}-period")
                if c2.button("Run now", key=f"report-{name}-run"):
                    try:
                        run = ctx.client.run_report(name, period)
                        st.success(f"started run {run['id']}")
                    except ApiError as exc:
                        st.error(exc.detail)
            try:
                runs = ctx.client.report_runs(name, limit=int(panel.get("limit", 5)))
            except ApiError as exc:
                st.error(exc.detail)
                continue
            if not runs:
                st.caption("No runs yet.")
            for run in runs:
                st.markdown(run_line(run))
                if run.get("error"):
                    st.caption(f"error: {run['error']}")
                cols = st.columns(max(1, len(run.get("artifacts") or [])))
                for col, art in zip(cols, run.get("artifacts") or [], strict=False):
                    col.download_button(
                        f"{art['format'].upper()} · {art['bytes']:,} B",
                        data=fetcher(ctx, str(run["id"]), str(art["filename"])),
                        file_name=art["filename"], mime=art["media_type"],
                        key=f"dl-{run['id']}-{art['filename']}",
                    )
