"""``twin report``: run a report now, list reports and their recorded runs.

``twin report run daily-plant --period yesterday -o out.pdf`` gathers the report's sections
from the state directory's time-series store and registry (or from ``--site PATH``'s specs
instead of the applied revision), renders it and writes the file(s); ``--deliver`` also sends
it through the report's delivery channels and records the run like the engine does.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from twin.cli.state import load, open_timeseries, state
from twin.errors import TwinError

report_app = typer.Typer(help="Reports: run now, list, past runs.", no_args_is_help=True)


def _specs(site: list[Path] | None) -> dict[Any, Any]:
    if site:
        return load(site).specs
    reg = state.registry()
    specs: dict[Any, Any] = reg.specs()
    if not specs:
        raise TwinError("nothing applied yet", hint="run `twin apply PATH`, or pass --site PATH")
    return specs


def _report(specs: dict[Any, Any], name: str) -> dict[str, Any]:
    doc = specs.get(("Report", name))
    if doc is None:
        from difflib import get_close_matches

        names = sorted(n for k, n in specs if k == "Report")
        close = get_close_matches(name, names, n=1)
        raise TwinError(
            f"no report {name!r}",
            hint=f"did you mean {close[0]!r}?" if close else
            (f"reports: {', '.join(names)}" if names else "declare one: kind: Report"),
        )
    return dict(doc)


def _store(timeseries: str | None) -> Any:
    try:
        return open_timeseries(timeseries)
    except TwinError as exc:
        from twin.cli import output as out

        out.err_console.print(Text(f"warning: {exc} — time-series sections will be empty",
                                   style="yellow"))
        return None


def run(
    name: Annotated[str, typer.Argument(help="The Report's name.")],
    period: Annotated[str | None, typer.Option(
        "--period", "-p",
        help="yesterday, today, last_24h, last_7d, this_week, last_week, month_to_date, "
        "last_month, or START..END (2026-03-01..2026-03-08). Default: the report's.")] = None,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="Output file (its extension picks the format) or folder.")] = None,
    fmt: Annotated[list[str] | None, typer.Option(
        "--format", "-f", help="pdf, xlsx, csv (repeatable). Default: from -o, else the report's.")
    ] = None,
    site: Annotated[list[Path] | None, typer.Option(
        "--site", help="Read the specs from these files/folders instead of the registry.")] = None,
    timeseries: Annotated[str | None, typer.Option(
        "--timeseries", envvar="TWIN_TIMESERIES", help="Time-series store URL.")] = None,
    deliver: Annotated[bool, typer.Option(
        "--deliver", help="Also deliver through the report's channels and record the run.")
    ] = False,
) -> None:
    """Run a report now and write its file(s)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from twin.cli import output as out
    from twin.reports.render import FORMATS, period_of, produce

    specs = _specs(site)
    doc = _report(specs, name)
    formats = list(fmt or [])
    if not formats and output is not None and output.suffix.lstrip(".") in FORMATS:
        formats = [output.suffix.lstrip(".")]
    for f in formats:
        if f not in FORMATS:
            raise TwinError(f"unknown format {f!r}", hint=f"one of {', '.join(FORMATS)}")
    now = time.time()
    per = period_of(doc, specs, period, now)
    store = _store(timeseries)
    registry = None
    try:
        registry = state.registry()
    except TwinError:
        registry = None
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=out.err_console, transient=True,
                  disable=not out.err_console.is_terminal) as progress:
        task = progress.add_task(f"report {name}: {per.describe()}", total=None)

        def step(text: str) -> None:
            progress.update(task, description=f"report {name}: {text}")

        started = time.monotonic()
        data, artifacts = produce(doc, specs, per, store, registry, formats or None,
                                  progress=step, now=now)
        if deliver:
            import trio

            from twin.reports.runner import ReportRunner

            step("delivering")
            runner = ReportRunner(registry=registry, state_dir=state.state_dir)
            record = trio.run(runner.deliver_and_record, doc, data, artifacts, "cli")
            if record.status != "success":
                out.err_console.print(Text(f"delivery failed: {record.error}", style="bold red"))
    took = time.monotonic() - started
    written: list[Path] = []
    for art in artifacts:
        if output is None:
            path = Path(art.filename)
        elif output.is_dir() or (len(artifacts) > 1 and not output.suffix):
            output.mkdir(parents=True, exist_ok=True)
            path = output / art.filename
        elif len(artifacts) > 1:
            path = output.with_suffix("." + art.filename.rsplit(".", 1)[-1])
        else:
            path = output
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(art.data)
        written.append(path)
    for path in written:
        out.console.print(f"{path}  ({path.stat().st_size:,} bytes)")
    out.err_console.print(
        Text(f"report {name}: {per.describe()}, {len(data.sections)} sections in {took:.1f}s",
             style="green")
    )
    if deliver and record.status != "success":
        raise typer.Exit(1)


def list_reports(
    site: Annotated[list[Path] | None, typer.Option("--site")] = None,
) -> None:
    """List the reports: schedule, period, formats, delivery."""
    from rich.table import Table

    from twin.cli import output as out

    specs = _specs(site)
    table = Table("name", "site", "title", "period", "schedule", "formats", "delivery")
    for (kind, n), d in sorted(specs.items()):
        if kind != "Report":
            continue
        spec = d.get("spec") or {}
        sched = spec.get("schedule") or {}
        table.add_row(
            n, str((d.get("metadata") or {}).get("site") or ""), str(spec.get("title")),
            str(spec.get("period") or "yesterday"), str(sched.get("cron") or "\u2013"),
            ",".join(spec.get("formats") or ["pdf"]),
            ",".join(c.get("type", "?") for c in spec.get("delivery") or []) or "\u2013",
        )
    out.console.print(table)


def runs(
    name: Annotated[str | None, typer.Argument(help="Only this report's runs.")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n")] = 20,
) -> None:
    """Past runs recorded in the registry (by the engine or `run --deliver`)."""
    from rich.table import Table

    from twin.cli import output as out

    reg = state.registry()
    table = Table("id", "report", "started", "period", "status", "trigger", "files", "error")
    for r in reg.report_runs(name, limit=limit):
        table.add_row(r.id, r.report, out.fmt_time(r.started_at), r.period.get("label", ""),
                      r.status, r.trigger, ", ".join(a["filename"] for a in r.artifacts),
                      (r.error or "")[:80])
    out.console.print(table)


def register(app: typer.Typer) -> None:
    report_app.command("run")(run)
    report_app.command("list")(list_reports)
    report_app.command("runs")(runs)
    app.add_typer(report_app, name="report")


__all__ = ["register"]
