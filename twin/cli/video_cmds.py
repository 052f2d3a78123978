"""``twin video``: cameras' recordings — list them by time range, cut a clip.

Locally (the state directory `twin up` writes, ``--state-dir``) or through a running engine's
API with ``--server URL`` (``$TWIN_SERVER``, token in ``$TWIN_TOKEN``)::

    twin video recordings cam_gate_01 --from -1h
    twin video clip cam_gate_01 --from -10m --to -5m --out gate.mp4
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

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
    from twin.cli.main import state

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
    from twin.cli.timeseries_cmds import _remote
    from twin.video import recordings as rec

    t0, t1 = _when(start), _when(end)
    if server:
        items: list[dict[str, Any]] = _remote(
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
    from twin.cli.timeseries_cmds import _progress, _remote
    from twin.video import recordings as rec

    t0, t1 = _when(start), _when(end)
    if t1 <= t0:
        raise TwinError("--to must be after --from")
    fmt = "ts" if out.suffix == ".ts" else "mp4"
    with _progress(f"cutting {camera} {output.fmt_time(t0)} … {output.fmt_time(t1)}") as step:
        if server:
            info = _remote("POST", server, f"/api/v1/video/cameras/{camera}/clips",
                           json={"start": t0, "end": t1, "format": fmt}).json()
            step("downloading")
            data = _remote("GET", server, info["url"]).content
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


def register(app: typer.Typer) -> None:
    app.add_typer(video_app, name="video")


__all__ = ["register"]
