"""``twin video``: cameras' recordings — list them by time range, cut a clip (and, for
``twin query --recordings``, the recordings of many cameras by time range).

Locally (the state directory `twin up` writes, ``--state-dir``) or through a running engine's
API with ``--server URL`` (``$TWIN_SERVER``, token in ``$TWIN_TOKEN``)::

    twin video recordings cam_gate_01 --from -1h
    twin video clip cam_gate_01 --from -10m --to -5m --out gate.mp4
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from twin.cli.output import progress
from twin.cli.remote import remote
from twin.cli.state import state
from twin.errors import TwinError

video_app = typer.Typer(help="Camera recordings: list by time range, export a clip.",
                        no_args_is_help=True)

From = Annotated[str, typer.Option("--from", help="ISO time, epoch seconds, now or -1h")]
To = Annotated[str, typer.Option("--to", help="ISO time, epoch seconds, now or -5m")]
Server = Annotated[str | None, typer.Option("--server", envvar="TWIN_SERVER",
                                            help="Ask a running engine's API.")]


def _when(text: str) -> float:
    from twin.timeseries.request import parse_time

    try:
        return parse_time(text)
    except ValueError as exc:
        raise TwinError(str(exc)) from None


def _rec_dir(camera: str) -> Path:
    return Path(state.state_dir) / "video" / camera / "rec"


@video_app.command("recordings")
def recordings(
    camera: Annotated[str, typer.Argument(help="The camera (a Device of type camera).")],
    start: From = "-1d",
    end: To = "now",
    server: Server = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines")] = False,
) -> None:
    """List a camera's recording segments overlapping [--from, --to]."""
    import json

    from twin.cli import output
    from twin.video import recordings as rec

    t0, t1 = _when(start), _when(end)
    if server:
        items: list[dict[str, Any]] = remote(
            "GET", server, f"/api/v1/video/cameras/{camera}/recordings",
            params={"start": t0, "end": t1}).json()["items"]
    else:
        items = [s.to_json(camera) for s in rec.in_range(_rec_dir(camera), t0, t1)]
    if as_json:
        for item in items:
            output.console.print(json.dumps(item), soft_wrap=True)
        return
    if not items:
        output.console.print(f"no recordings of {camera} in that range")
        return
    from rich.table import Table

    table = Table("start", "end", "duration", "size", "file")
    for it in items:
        table.add_row(output.fmt_time(it["start"]), output.fmt_time(it["end"]),
                      f"{it['duration']:.0f} s", f"{it['bytes'] / 1e6:.1f} MB", it["file"])
    output.console.print(table)
    total = sum(it["bytes"] for it in items)
    output.console.print(f"{len(items)} segment(s), {total / 1e6:.1f} MB")


@video_app.command("clip")
def clip(
    camera: Annotated[str, typer.Argument(help="The camera.")],
    start: From,
    end: To,
    out: Annotated[Path, typer.Option("--out", "-o", help="The clip (.mp4 or .ts)")],
    server: Server = None,
) -> None:
    """Cut [--from, --to] out of a camera's recordings (stream copy, no re-encoding)."""
    from twin.cli import output
    from twin.video import recordings as rec

    t0, t1 = _when(start), _when(end)
    if t1 <= t0:
        raise TwinError("--to must be after --from")
    fmt = "ts" if out.suffix == ".ts" else "mp4"
    with progress(f"cutting {camera} {output.fmt_time(t0)} … {output.fmt_time(t1)}") as step:
        if server:
            info = remote("POST", server, f"/api/v1/video/cameras/{camera}/clips",
                           json={"start": t0, "end": t1, "format": fmt}).json()
            step("downloading")
            data = remote("GET", server, info["url"]).content
            out.write_bytes(data)
        else:
            if not rec.in_range(_rec_dir(camera), t0, t1):
                raise TwinError(f"no recording of {camera} in that range",
                                hint=f"twin video recordings {camera} --from ... --to ...")
            try:
                rec.export_clip(_rec_dir(camera), t0, t1, out)
            except RuntimeError as exc:
                raise TwinError(str(exc)) from None
    output.console.print(f"{out} ({out.stat().st_size / 1e6:.1f} MB)")


def _local_runs(t0: float, t1: float, cameras: list[str] | None,
                sites: list[str] | None) -> list[dict[str, Any]]:
    """Recordings (merged runs) in the local state dir, sites from the local registry."""
    from twin.video import recordings as rec

    root = Path(state.state_dir) / "video"
    try:
        names = sorted(d.name for d in root.iterdir() if (d / "rec").is_dir())
    except FileNotFoundError:
        names = []
    site_of: dict[str, str | None] = {}
    try:
        specs = state.registry().specs()
    except Exception:  # no registry here: the recordings are listed without their site
        specs = {}
    for key, doc in specs.items():
        if key[0] == "Device" and (doc.get("spec") or {}).get("type") == "camera":
            site_of[key[1]] = (doc.get("metadata") or {}).get("site")
    items: list[dict[str, Any]] = []
    for name in names:
        if cameras and name not in cameras:
            continue
        if sites and site_of.get(name) not in sites:
            continue
        segs = rec.in_range(root / name / "rec", t0, t1)
        items += [r.to_json(name, site_of.get(name)) for r in rec.runs(segs)]
    return items


def query_recordings(start: str, end: str | None, cameras: list[str] | None,
                     sites: list[str] | None, output_format: str, out: Path | None,
                     server: str | None) -> None:
    """``twin query --recordings``: camera recordings by camera and time range (back-to-back
    segments merged into one row), locally or through ``--server``."""
    import csv
    import io
    import json

    from twin.cli import output

    t0, t1 = _when(start), _when(end or "now")
    if server:
        params: list[tuple[str, Any]] = [("start", t0), ("end", t1)]
        params += [("camera", c) for c in cameras or ()]
        params += [("site", s) for s in sites or ()]
        items: list[dict[str, Any]] = remote("GET", server, "/api/v1/video/recordings",
                                              params=params).json()["items"]
    else:
        items = _local_runs(t0, t1, cameras, sites)
    columns = ["camera", "site", "start", "end", "duration", "segments", "bytes", "first"]
    if output_format == "json":
        text = json.dumps({"items": items}, indent=2) + "\n"
    elif output_format == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(items)
        text = buf.getvalue()
    elif output_format == "table":
        if out is not None:
            text = json.dumps({"items": items}, indent=2) + "\n"
        else:
            output.console.print(output.rows_table(
                ["camera", "site", "start", "end", "duration", "segments", "size"],
                ([it["camera"], it["site"] or "", output.fmt_time(it["start"]),
                  output.fmt_time(it["end"]), f"{it['duration']:.0f} s", it["segments"],
                  f"{it['bytes'] / 1e6:.1f} MB"] for it in items)))
            output.err_console.print(f"{len(items)} recording(s)")
            return
    else:
        raise TwinError(f"-o {output_format} is not for recordings", hint="table, json or csv")
    if out is not None:
        out.write_text(text, encoding="utf-8")
        output.err_console.print(f"wrote {len(items)} recording(s) to {out}")
        return
    output.console.print(text, end="", soft_wrap=True, markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(video_app, name="video")


__all__ = ["register"]
