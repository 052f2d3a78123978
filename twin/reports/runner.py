"""One run of a report: record it, gather and render (in a worker thread), keep the files in
the state directory, deliver them through every channel (each retried on its own), and record
the outcome — ``success``, ``partial`` (files made, some delivery failed after its retries) or
``failed`` (no file could be made, or every delivery failed; ``error`` says why). The files of
a run are kept in any case (downloadable; nothing is lost).
"""

from __future__ import annotations

import logging
import secrets as pysecrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio

from twin.registry.base import Key, Registry
from twin.registry.reports import ReportRun
from twin.reports.channels import Attachment, ChannelContext, Message, RetryPolicy, deliver
from twin.reports.errors import ReportError
from twin.reports.model import ReportData
from twin.reports.render import Artifact, produce
from twin.spec.periods import Period
from twin.spec.secrets import Secrets
from twin.timeseries.base import TimeSeriesStore

log = logging.getLogger(__name__)


def new_run_id() -> str:
    return "rr_" + time.strftime("%Y%m%d%H%M%S", time.gmtime()) + "_" + pysecrets.token_hex(3)


def _message(doc: Mapping[str, Any], data: ReportData, artifacts: Sequence[Artifact],
             run_id: str) -> Message:
    title = data.title
    period = data.period.describe()
    lines = [title, period, ""]
    lines += [f"- {a.filename} ({len(a.data):,} bytes)" for a in artifacts]
    payload = {
        "event": "report",
        "report": data.name,
        "run": run_id,
        "title": title,
        "site": data.site,
        "period": data.period.as_json(),
        "generated_at": data.generated_at,
    }
    return Message(
        subject=f"{title} — {period}",
        text="\n".join(lines) + "\n\nFLUX IoT",
        payload=payload,
        attachments=[Attachment(a.filename, a.data, a.media_type) for a in artifacts],
        name=f"{data.name}-{run_id}",
    )


@dataclass
class ReportRunner:
    registry: Registry | None
    state_dir: Path
    store: TimeSeriesStore | None = None
    context: ChannelContext | None = None
    limiter: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(1))

    def __post_init__(self) -> None:
        if self.context is None:
            self.context = ChannelContext(self.state_dir, Secrets(state_dir=self.state_dir))

    def run_dir(self, run_id: str) -> Path:
        return Path(self.state_dir) / "reports" / run_id

    async def _save(self, run: ReportRun) -> None:
        if self.registry is not None:
            await trio.to_thread.run_sync(self.registry.save_report_run, run)

    def _keep(self, run_id: str, artifacts: Sequence[Artifact]) -> list[dict[str, Any]]:
        from twin.reports.channels import write_atomic

        folder = self.run_dir(run_id)
        out = []
        for a in artifacts:
            path = folder / a.filename
            write_atomic(path, a.data)
            out.append({"format": a.format, "filename": a.filename, "bytes": len(a.data),
                        "media_type": a.media_type, "path": str(path)})
        return out

    async def run(
        self,
        doc: Mapping[str, Any],
        specs: Mapping[Key, Mapping[str, Any]],
        period: Period,
        *,
        trigger: str,
        scheduled_for: float | None = None,
        formats: Sequence[str] | None = None,
        run_id: str | None = None,
    ) -> ReportRun:
        meta = doc.get("metadata") or {}
        run = ReportRun(
            id=run_id or new_run_id(), report=str(meta.get("name")), site=meta.get("site"),
            trigger=trigger, status="running", started_at=time.time(),
            scheduled_for=scheduled_for, period=period.as_json(),
        )
        await self._save(run)
        try:
            data, artifacts = await trio.to_thread.run_sync(
                lambda: produce(doc, specs, period, self.store, self.registry, formats),
                limiter=self.limiter,
            )
        except ReportError as exc:
            run = replace(run, status="failed", finished_at=time.time(), error=str(exc))
            log.warning("report %s: run %s failed: %s", run.report, run.id, exc)
            await self._save(run)
            return run
        except Exception as exc:
            run = replace(run, status="failed", finished_at=time.time(),
                          error=f"{type(exc).__name__}: {exc}")
            log.exception("report %s: run %s failed", run.report, run.id)
            await self._save(run)
            return run
        return await self._deliver(run, doc, data, artifacts)

    async def _deliver(self, run: ReportRun, doc: Mapping[str, Any], data: ReportData,
                       artifacts: Sequence[Artifact]) -> ReportRun:
        kept = await trio.to_thread.run_sync(self._keep, run.id, artifacts)
        run = replace(run, artifacts=tuple(kept))
        await self._save(run)
        spec = doc.get("spec") or {}
        retry = RetryPolicy.of(spec.get("retry"))
        msg = _message(doc, data, artifacts, run.id)
        outcomes: list[dict[str, Any]] = []
        assert self.context is not None
        ctx = self.context

        async def one(i: int, channel: Mapping[str, Any]) -> None:
            outcomes.append({"index": i, **await deliver(channel, msg, ctx, retry)})

        async with trio.open_nursery() as nursery:
            for i, channel in enumerate(spec.get("delivery") or []):
                nursery.start_soon(one, i, channel)
        outcomes.sort(key=lambda o: o["index"])
        failed = [o for o in outcomes if o["status"] != "delivered"]
        status = "success"
        if failed:  # the files are kept either way: downloadable, nothing lost
            status = "failed" if len(failed) == len(outcomes) else "partial"
        run = replace(
            run, deliveries=tuple(outcomes), finished_at=time.time(), status=status,
            error="; ".join(f"{o['target']}: {o['error']}" for o in failed) or None,
        )
        await self._save(run)
        log.info("report %s: run %s %s (%d files, %d deliveries)", run.report, run.id,
                 run.status, len(artifacts), len(outcomes))
        return run

    async def deliver_and_record(self, doc: Mapping[str, Any], data: ReportData,
                                 artifacts: Sequence[Artifact], trigger: str) -> ReportRun:
        """Deliver files made elsewhere (``twin report run --deliver``) and record the run."""
        meta = doc.get("metadata") or {}
        run = ReportRun(
            id=new_run_id(), report=str(meta.get("name")), site=meta.get("site"),
            trigger=trigger, status="running", started_at=time.time(),
            period=data.period.as_json(),
        )
        return await self._deliver(run, doc, data, artifacts)


__all__ = ["ReportRunner", "new_run_id"]
