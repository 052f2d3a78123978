"""Control commands: ``twin command send|list|get|cancel``, ``twin scene list|trace|run``,
``twin simulate``.

Reading (list, get, trace) works on the local registry (``--registry``/``--state-dir``) or
through a server (``--server URL`` + ``TWIN_TOKEN``); sending, cancelling and running scenes
need a running engine, so they go through ``--server`` (env ``TWIN_SERVER``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from twin.cli.remote import remote
from twin.cli.state import load, state
from twin.errors import TwinError

command_app = typer.Typer(
    help="Send, list, inspect and cancel device commands.", no_args_is_help=True
)
scene_app = typer.Typer(
    help="List scenes, show their traces, run them by hand.", no_args_is_help=True
)

Server = Annotated[
    str | None,
    typer.Option("--server", envvar="TWIN_SERVER", help="API base URL of a running engine."),
]
JsonOut = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _out() -> Any:
    from twin.cli import output

    return output


def _console() -> Any:
    from twin.cli import output

    return output.console


def _api(server: str | None, method: str, path: str, body: Any = None) -> Any:
    if not server:
        raise TwinError(
            "this needs a running engine", hint="pass --server URL (or set TWIN_SERVER)"
        )
    return remote(method, server, "/api/v1" + path, json=body, timeout=60,
                  what=f"{method} {path}").json()


def _params(param: list[str] | None, params_json: str | None) -> dict[str, Any]:
    from twin.spec.inputlimits import InputRefused, loads

    out: dict[str, Any] = {}
    if params_json:
        try:
            loaded = loads(params_json)
        except InputRefused as exc:
            raise TwinError(f"--params: {exc}") from None
        except ValueError as exc:
            raise TwinError(f"--params: not JSON: {exc}") from None
        if not isinstance(loaded, dict):
            raise TwinError("--params must be a JSON object")
        out.update(loaded)
    for p in param or []:
        key, sep, value = p.partition("=")
        if not sep:
            raise TwinError(f"--param {p!r}: use key=value")
        try:
            out[key] = loads(value)
        except InputRefused as exc:  # NaN, Infinity, 1e400: refused, not sent as a string
            raise TwinError(f"--param {key}: {exc}") from None
        except ValueError:
            out[key] = value
    return out


def _timeout(timeout: float | None) -> float | None:
    if timeout is not None and not math.isfinite(timeout):
        raise TwinError(f"--timeout {timeout}: not a finite number of seconds")
    return timeout


def _print_commands(rows: list[dict[str, Any]], as_json: bool) -> None:
    from twin.cli import output

    con = _console()
    if as_json:
        output.print_json(rows, con)
        return
    table = output.rows_table(
        ["ID", "DEVICE", "TYPE", "STATUS", "CREATED", "SOURCE", "ERROR"],
        [
            [
                r["id"],
                r["device"],
                r["type"],
                r["status"],
                output.fmt_time(r["created_at"]),
                r.get("source") or "",
                output.short(r["error"], 40) if r.get("error") else "-",
            ]
            for r in rows
        ],
    )
    con.print(table)


@command_app.command("send")
def command_send(
    device: Annotated[str, typer.Argument(help="Device name.")],
    type_: Annotated[
        str, typer.Argument(metavar="TYPE", help="Command type (set_state, reboot ...).")
    ],
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="key=value (JSON values).")
    ] = None,
    params_json: Annotated[
        str | None, typer.Option("--params", help="All params as a JSON object.")
    ] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", help="Seconds.")] = None,
    key: Annotated[str | None, typer.Option("--idempotency-key", help="Retry-safe key.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the outcome.")] = False,
    server: Server = None,
    as_json: JsonOut = False,
) -> None:
    """Queue a command for DEVICE (validated against its model first)."""
    body: dict[str, Any] = {"type": type_, "params": _params(param, params_json)}
    if timeout is not None:
        body["timeout"] = _timeout(timeout)
    if key:
        body["idempotency_key"] = key
    path = f"/devices/{device}/commands" + ("?wait=60" if wait else "")
    cmd = _api(server, "POST", path, body)
    if as_json:
        _out().print_json(cmd, _console())
    else:
        _console().print(
            f"{cmd['id']}  {cmd['device']} {cmd['type']}: {cmd['status']}"
            + (f" ({cmd['error']})" if cmd.get("error") else "")
        )


@command_app.command("list")
def command_list(
    device: Annotated[str | None, typer.Argument(help="Only this device.")] = None,
    status: Annotated[
        str | None, typer.Option("--status", help="pending, sent, ... (comma list)")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n")] = 50,
    server: Server = None,
    as_json: JsonOut = False,
) -> None:
    """Commands, newest first."""
    from twin.control.ledger import record_json

    if server:
        if not device:
            raise TwinError("with --server, give a DEVICE")
        rows = _api(server, "GET", f"/devices/{device}/commands?limit={limit}")["commands"]
        if status:
            rows = [r for r in rows if r["status"] in status.split(",")]
    else:
        reg = state.registry()
        recs = reg.commands(
            device=device, statuses=status.split(",") if status else None, limit=limit
        )
        rows = [record_json(r) for r in recs]
    _print_commands(rows, as_json)


@command_app.command("get")
def command_get(
    command_id: Annotated[str, typer.Argument(help="Command id.")],
    server: Server = None,
    as_json: JsonOut = False,
) -> None:
    """One command with every transition."""
    from twin.cli import output
    from twin.control.ledger import record_json

    if server:
        cmd = _api(server, "GET", f"/commands/{command_id}")
    else:
        rec = state.registry().get_command(command_id)
        if rec is None:
            from twin.errors import NotFoundError

            raise NotFoundError(f"no command {command_id!r}")
        cmd = record_json(rec)
    con = _console()
    if as_json:
        _out().print_json(cmd, con)
        return
    head = Text(cmd["id"], style="bold")
    head.append(f"  {cmd['device']} {cmd['type']} {json.dumps(cmd['params'])}")
    con.print(head)
    con.print(f"  status    {cmd['status']}" + (f"  ({cmd['error']})" if cmd.get("error") else ""))
    if cmd.get("result") is not None:
        con.print(f"  result    {json.dumps(cmd['result'])}")
    con.print(
        f"  source    {cmd.get('source') or '-'}   attempts {cmd['attempts']}"
        f"   timeout {cmd['timeout']:g}s"
    )
    for t in cmd["transitions"]:
        con.print(f"    {output.fmt_time(t['at'])}  {t['status']}")


@command_app.command("cancel")
def command_cancel(command_id: Annotated[str, typer.Argument()], server: Server = None) -> None:
    """Cancel a command (pending: at once; sent/executing: the device is asked)."""
    cmd = _api(server, "DELETE", f"/commands/{command_id}")
    _console().print(
        f"{cmd['id']}: {cmd['status']}"
        + (
            " (cancel requested)"
            if cmd.get("cancel_requested") and cmd["status"] not in ("cancelled",)
            else ""
        )
    )


@scene_app.command("list")
def scene_list(server: Server = None, as_json: JsonOut = False) -> None:
    """Scenes of the applied revision."""
    from twin.cli import output

    if server:
        rows = _api(server, "GET", "/scenes")["scenes"]
    else:
        specs = state.registry().specs()
        rows = []
        for (kind, name), doc in sorted(specs.items()):
            if kind != "Scene":
                continue
            spec = doc.get("spec") or {}
            rows.append(
                {
                    "name": name,
                    "enabled": spec.get("enabled", True),
                    "mode": spec.get("mode", "single"),
                    "triggers": [t.get("type") for t in spec.get("triggers") or []],
                    "description": spec.get("description", ""),
                }
            )
    if as_json:
        _out().print_json(rows, _console())
        return
    _console().print(
        output.rows_table(
            ["NAME", "ENABLED", "MODE", "TRIGGERS", "DESCRIPTION"],
            [
                [
                    r["name"],
                    "yes" if r["enabled"] else "no",
                    r["mode"],
                    ",".join(r["triggers"]),
                    output.short(r.get("description") or "", 50),
                ]
                for r in rows
            ],
        )
    )


_STEP_MARK = {"ok": ("✓", "green"), "error": ("✗", "red"), "stop": ("■", "")}


def print_trace(trace: dict[str, Any]) -> None:
    from twin.cli import output

    con = _console()
    head = Text(trace["scene"], style="bold")
    head.append(
        f" run {trace['run_id']}  {trace['status']}"
        f"  {output.fmt_time(trace['started_at'])}  ({(trace.get('duration') or 0) * 1000:.1f} ms)"
    )
    con.print(head)
    trig = {k: v for k, v in (trace.get("trigger") or {}).items() if v is not None}
    con.print(f"  trigger   {json.dumps(trig, default=str)}")
    if trace.get("chain"):
        con.print(f"  chain     {' → '.join(trace['chain'])}")
    for c in trace.get("conditions") or []:
        extra = {k: v for k, v in c.items() if k not in ("path", "type", "result")}
        line = Text("  ")
        line.append(*(("✓", "green") if c["result"] else ("✗", "red")))
        line.append(f" {c['path']} {c['type']} {json.dumps(extra, default=str)}")
        con.print(line)
    for s in trace.get("steps") or []:
        mark = _STEP_MARK.get(s.get("outcome") or "", ("…", ""))
        detail = s.get("error") or json.dumps(s.get("result") or {}, default=str)
        line = Text("  ")
        line.append(*mark)
        line.append(
            f" {s['path']} {s['type']} {s.get('alias') or ''} "
            f"({(s.get('duration') or 0) * 1000:.1f} ms) {output.short(detail, 80)}"
        )
        con.print(line)
    if trace.get("error") or trace.get("reason"):
        con.print(f"  {trace.get('error') or trace.get('reason')}")


@scene_app.command("trace")
def scene_trace(
    name: Annotated[str, typer.Argument(help="Scene name.")],
    limit: Annotated[int, typer.Option("--limit", "-n")] = 5,
    server: Server = None,
    as_json: JsonOut = False,
) -> None:
    """The latest runs of a scene: trigger, conditions, each action's outcome and timing."""
    if server:
        traces = _api(server, "GET", f"/scenes/{name}/traces?limit={limit}")["traces"]
    else:
        traces = [dict(t.trace) for t in state.registry().scene_traces(name, limit=limit)]
    if not traces:  # a deleted scene keeps its traces; a name never applied is a mistake
        _known_scene(name, server)
    if as_json:
        _out().print_json(traces, _console(), default=str)
        return
    if not traces:
        _console().print(f"no runs of {name} recorded yet")
    for t in traces:
        print_trace(t)


def _scene_names(server: str | None) -> list[str]:
    if server:
        return [r["name"] for r in _api(server, "GET", "/scenes")["scenes"]]
    return sorted(n for (kind, n) in state.registry().specs() if kind == "Scene")


def _known_scene(name: str, server: str | None) -> None:
    """Raise NotFoundError (with a did-you-mean) when the applied revision has no scene NAME."""
    from difflib import get_close_matches

    from twin.errors import NotFoundError

    names = _scene_names(server)
    if name in names:
        return
    close = get_close_matches(name, names, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise NotFoundError(
        f"no scene {name!r} in the applied revision",
        hint=hint + ("`twin scene list` lists them" if names else "no scenes are applied"),
    )


@scene_app.command("run")
def scene_run(
    name: Annotated[str, typer.Argument(help="Scene name.")],
    wait: Annotated[bool, typer.Option("--wait", help="Wait and print the trace.")] = False,
    server: Server = None,
) -> None:
    """Run a scene by hand on a running engine."""
    res = _api(server, "POST", f"/scenes/{name}/execute" + ("?wait=true" if wait else ""), {})
    if res.get("trace"):
        print_trace(res["trace"])
    else:
        _console().print(f"{name}: run {res.get('run_id') or '(dropped: already running)'}")


def simulate_cmd(
    path: Annotated[Path, typer.Argument(help="Site folder (or files).")],
    scenario: Annotated[Path, typer.Option("--scenario", "-s", help="Telemetry: CSV or YAML.")],
    window: Annotated[float, typer.Option("--window", help="Conflict window, seconds.")] = 60.0,
    as_json: JsonOut = False,
) -> None:
    """Run the scenes of PATH over a scenario on a virtual clock: which fire, what they check,
    what they would send; conflicts and trigger loops. No device is touched."""
    from twin.control.ledger import Catalog
    from twin.control.simulate import format_report, load_scenario, simulate

    loaded = load([path])
    report = simulate(loaded.specs, load_scenario(scenario), window=window)
    con = _console()
    if as_json:
        _out().print_json(report.to_json(), con, default=str)
    else:
        tz = Catalog(loaded.specs).timezone()
        for line in format_report(report, tz):
            con.print(line, markup=False, highlight=False)
    if report.conflicts or report.loops:
        raise typer.Exit(3)


def register(app: typer.Typer) -> None:
    app.add_typer(command_app, name="command")
    app.add_typer(scene_app, name="scene")
    app.command("simulate")(simulate_cmd)
