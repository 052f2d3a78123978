"""Time-series commands: ``twin query`` and ``twin storage``.

``twin query temperature --device temp_sensor_01 --from -1d --every 1m -o csv`` reads the
state directory's store directly (LanceDB, or PostgreSQL with ``--timeseries URL`` /
``$TWIN_TIMESERIES``), or a running engine with ``--server URL`` (``$TWIN_SERVER``, token in
``$TWIN_TOKEN``). ``twin storage`` shows points, bytes and free disk per tier;
``twin storage retention`` runs a retention pass now with the registry's RetentionPolicy
documents (or through ``--server``).
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from twin.cli.output import progress
from twin.cli.remote import remote
from twin.cli.state import open_timeseries, state
from twin.errors import TwinError


class Output(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"
    parquet = "parquet"
    xlsx = "xlsx"


BINARY = (Output.parquet, Output.xlsx)


def _out() -> Any:
    from twin.cli import output

    return output


def _cell(column: str, v: Any) -> Any:
    o = _out()
    if column == "tags":
        return o.fmt_tags(v)
    if isinstance(v, datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(v, float):
        return o.fmt_number(v)
    return v


def query(
    metric: Annotated[
        list[str] | None, typer.Argument(help="Metric(s), e.g. temperature (default: all).")
    ] = None,
    device: Annotated[
        list[str] | None, typer.Option("--device", "-d", help="Device (repeatable).")
    ] = None,
    site: Annotated[list[str] | None, typer.Option("--site", help="Site (repeatable).")] = None,
    group: Annotated[
        list[str] | None, typer.Option("--group", help="Device group (repeatable).")
    ] = None,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="Tag or label key=value (all must match).")
    ] = None,
    start: Annotated[
        str, typer.Option("--from", help="Start: -1d, now-2h, ISO 8601 or epoch seconds.")
    ] = "-1h",
    end: Annotated[str | None, typer.Option("--to", help="End (default now).")] = None,
    every: Annotated[
        str | None, typer.Option("--every", help="Bucket size, e.g. 1m (default: raw points).")
    ] = None,
    agg: Annotated[
        list[str] | None,
        typer.Option("--agg", help="avg, min, max, sum, count, first, last (repeatable)."),
    ] = None,
    fill: Annotated[
        str, typer.Option("--fill", help="none, null, zero, previous, linear.")
    ] = "none",
    group_by: Annotated[
        str, typer.Option("--group-by", help="device, site, group, metric, none or tag:KEY.")
    ] = "device",
    compare: Annotated[
        str | None, typer.Option("--compare", help="Compare with the range this much earlier (7d).")
    ] = None,
    trend: Annotated[bool, typer.Option("--trend", help="Slope per series.")] = False,
    limit: Annotated[int | None, typer.Option("--limit", help="At most this many rows.")] = None,
    output: Annotated[Output, typer.Option("-o", "--output", help="Output format.")] = Output.table,
    out: Annotated[
        Path | None, typer.Option("--out", help="Write to FILE (needed for parquet/xlsx on a tty).")
    ] = None,
    server: Annotated[
        str | None,
        typer.Option("--server", envvar="TWIN_SERVER", help="Query a running engine's API."),
    ] = None,
    timeseries: Annotated[
        str | None,
        typer.Option(
            "--timeseries",
            envvar="TWIN_TIMESERIES",
            help="Store URL: postgresql://... (default: LanceDB in the state dir).",
        ),
    ] = None,
    recordings: Annotated[
        bool,
        typer.Option(
            "--recordings",
            help="Camera recordings in the range instead (per camera; --device/--site filter).",
        ),
    ] = False,
) -> None:
    """Query the time series: raw points, or aggregates per --every bucket; export them.
    With --recordings: the cameras' recordings overlapping the range."""
    if recordings:
        if metric or group or tag or every or agg or compare or trend:
            raise TwinError(
                "--recordings lists camera recordings: no metrics, --group, --tag, --every, "
                "--agg, --compare or --trend",
                hint="twin query --recordings --device CAM --from -1d",
            )
        from twin.cli.video_cmds import query_recordings

        query_recordings(start, end, device, site, str(output), out, server)
        return
    from twin.timeseries.request import QueryRequest, render, table_json

    if output in BINARY and out is None and sys.stdout.isatty():
        raise TwinError(f"-o {output} writes binary data", hint=f"add --out FILE.{output}")
    try:
        req = QueryRequest.build(
            metrics=metric,
            devices=device,
            sites=site,
            groups=group,
            tags=tag,
            start=start,
            end=end,
            every=every,
            aggregates=agg,
            fill=fill,
            group_by=group_by,
            compare=compare,
            trend=trend,
            limit=limit,
        )
    except ValueError as exc:
        raise TwinError(str(exc), hint="see twin query --help") from None

    fmt = "json" if output is Output.table else str(output)
    data: bytes
    with progress("querying") as step:
        if server:
            params: list[tuple[str, Any]] = [("from", str(start)), ("fill", fill)]
            params += [("group_by", group_by), ("format", fmt)]
            for key, values in (
                ("metric", metric),
                ("device", device),
                ("site", site),
                ("group", group),
                ("tag", tag),
                ("agg", agg),
            ):
                params += [(key, v) for v in values or ()]
            for key, value in (("to", end), ("every", every), ("compare", compare)):
                if value is not None:
                    params.append((key, value))
            if trend:
                params.append(("trend", "true"))
            if limit is not None:
                params.append(("limit", limit))
            step(f"querying {server}")
            data = remote("GET", server, "/api/v1/timeseries/query", params=params).content
            table_doc = json.loads(data) if fmt == "json" else None
        else:
            store = open_timeseries(timeseries)
            try:
                table = req.run(store)
            finally:
                store.close()
            step(f"rendering {table.num_rows:,} rows as {fmt}", 1, 2)
            if output is Output.table:
                table_doc = table_json(table)
                data = b""
            else:
                data = render(table, fmt)
                table_doc = None
        if out is not None:
            step(f"writing {out}", 2, 2)
            if output is Output.table:
                assert table_doc is not None
                data = _out().json_text(table_doc).encode()
            out.write_bytes(data)
    if out is not None:
        _out().err_console.print(f"wrote {len(data):,} bytes to {out}")
        return
    if output is Output.table:
        assert table_doc is not None
        o = _out()
        o.console.print(
            o.rows_table(
                table_doc["columns"],
                (
                    [_cell(c, v) for c, v in zip(table_doc["columns"], row, strict=False)]
                    for row in table_doc["rows"]
                ),
            )
        )
        o.err_console.print(f"{table_doc['count']} rows")
        return
    sys.stdout.buffer.write(data)
    sys.stdout.flush()


storage_app = typer.Typer(
    help="Time-series storage: stats (the default), retention now.",
    invoke_without_command=True,
)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@storage_app.callback()
def storage(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    server: Annotated[str | None, typer.Option("--server", envvar="TWIN_SERVER")] = None,
    timeseries: Annotated[
        str | None, typer.Option("--timeseries", envvar="TWIN_TIMESERIES", help="Store URL.")
    ] = None,
) -> None:
    """Points, bytes, bytes/point per tier and in total, free disk."""
    ctx.obj = {"server": server, "timeseries": timeseries, "json": as_json}
    if ctx.invoked_subcommand is not None:
        return
    if server:
        report = remote("GET", server, "/api/v1/timeseries/storage").json()
    else:
        from twin.timeseries.factory import describe
        from twin.timeseries.retention import RetentionPolicy, StorageMonitor, stored_lags

        store = open_timeseries(timeseries)
        try:
            report = StorageMonitor(store).report()
            report["store"] = describe(timeseries, state.state_dir)
            docs = [
                d
                for (k, _n), d in sorted(state.registry().specs().items())
                if k == "RetentionPolicy"
            ]
            policies = [RetentionPolicy.from_doc(d) for d in docs]
            report["rollup"] = {"tiers": [t.as_dict() for t in stored_lags(store, policies)]}
        finally:
            store.close()
    if as_json:
        typer.echo(_out().json_text(report, indent=2))
        return
    o = _out()
    o.console.print(f"store  {report.get('store', '?')}")
    o.console.print(
        o.rows_table(
            ["tier", "points", "bytes", "bytes/point"],
            [
                [t["tier"], f"{t['points']:,}", _fmt_bytes(t["bytes"]), t["bytes_per_point"]]
                for t in report["tiers"]
            ]
            + [
                [
                    "total",
                    f"{report['points']:,}",
                    _fmt_bytes(report["bytes"]),
                    report["bytes_per_point"],
                ]
            ],
        )
    )
    free = report["free_bytes"]
    o.console.print(f"free disk  {'unknown' if free < 0 else _fmt_bytes(free)}")
    if report.get("disk_nearly_full"):
        line = Text("disk nearly full", style="bold red")
        line.append(": writes stop below the safety margin")
        o.console.print(line)
    lags = (report.get("rollup") or {}).get("tiers") or []
    if lags:
        o.console.print(
            o.rows_table(
                ["policy", "tier", "rolled up to", "rollup lag"],
                [
                    [
                        t["policy"],
                        t["tier"],
                        "never" if t["watermark"] is None else _when(t["watermark"]),
                        "-" if t["lag_s"] is None else f"{t['lag_s']:.0f}s",
                    ]
                    for t in lags
                ],
            )
        )


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


@storage_app.command("retention")
def retention(ctx: typer.Context) -> None:
    """Run a retention pass now: roll up closed windows, expire, reclaim space."""
    opts = ctx.obj or {}
    o = _out()
    if opts.get("server"):
        result = remote("POST", opts["server"], "/api/v1/timeseries/retention/run").json()
        report = result.get("report")
    else:
        from twin.timeseries.retention import RetentionManager, RetentionPolicy

        reg = state.registry()
        docs = [d for (k, _n), d in sorted(reg.specs().items()) if k == "RetentionPolicy"]
        if not docs:
            o.console.print("no RetentionPolicy in the registry: nothing to do")
            return
        store = open_timeseries(opts.get("timeseries"))
        try:
            mgr = RetentionManager(store, [RetentionPolicy.from_doc(d) for d in docs])
            with progress(f"retention pass over {len(docs)} policies"):
                r = mgr.run_once()
            report = {
                "rolled_up": r.rolled_up,
                "expired": r.expired,
                "reclaimed_bytes": r.reclaimed_bytes,
                "seconds": r.seconds,
            }
        finally:
            store.close()
    if opts.get("json"):
        typer.echo(_out().json_text(report, indent=2))
        return
    if report is None:
        o.console.print("no RetentionPolicy on the server: nothing to do")
        return
    o.console.print(
        f"rolled up {report['rolled_up'] or 'nothing'}, expired {report['expired'] or 'nothing'},"
        f" reclaimed {_fmt_bytes(report['reclaimed_bytes'])} in {report['seconds']:.2f}s"
    )


def register(app: typer.Typer) -> None:
    """Add ``query`` and ``storage`` to the main app."""
    app.command("query")(query)
    app.add_typer(storage_app, name="storage")


__all__ = ["register"]
