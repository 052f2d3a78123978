"""The ``twin`` command line: validate, plan, apply, history, diff, rollback, get, describe.

Errors are one readable line plus a hint; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.text import Text

from twin.cli import output as out
from twin.cli.state import author, load, open_timeseries, spinner, state
from twin.errors import NotFoundError, SpecError, TwinError


def _quiet_flag_types() -> None:
    """typer >= 0.2x prints a type on every help line, ``--debug <bool>`` included: a flag
    takes no value, so show none (value options keep theirs: ``--limit <int>``)."""
    try:
        from typer.core import TyperOption
    except ImportError:  # pragma: no cover - an older typer prints no types
        return
    shown = TyperOption.display_type_rich
    if getattr(shown, "_twin_quiet", False):
        return

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        if self.is_flag or self.count:
            return None
        return shown(self, ctx)

    display_type_rich._twin_quiet = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_quiet_flag_types()

app = typer.Typer(
    name="twin",
    help="FLUX IoT: a declarative digital-twin engine driven by YAML.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class Format(StrEnum):
    text = "text"
    json = "json"


class TableFormat(StrEnum):
    table = "table"
    yaml = "yaml"
    json = "json"


@app.callback()
def _global(
    registry: Annotated[str | None, typer.Option(
        "--registry", envvar="TWIN_REGISTRY",
        help="Registry URL: sqlite:///path.db (default: STATE_DIR/registry.db) or postgresql://...")] = None,
    state_dir: Annotated[Path, typer.Option(
        "--state-dir", envvar="TWIN_STATE_DIR", help="Where local state lives.")] = Path(".twin"),
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Show info logs.")] = False,
) -> None:
    state.registry_url = registry
    state.state_dir = state_dir
    state.debug = debug
    configure_logging(logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING)


def configure_logging(level: int) -> None:
    """CLI commands log warnings and errors only (to stderr), unless -v or --debug; ``twin up``
    and ``twin broker`` set their own level with --log-level."""
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("httpx", "httpcore"):  # one INFO line per request otherwise
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


Paths = Annotated[list[Path], typer.Argument(help="YAML files or folders (read recursively).")]


@app.command()
def validate(
    paths: Paths,
    output: Annotated[Format, typer.Option("-o", "--output")] = Format.text,
) -> None:
    """Validate specs: schema, references, values. Exit 2 when invalid.

    Kinds: Site, DeviceGroup, DeviceModel, Device, and those whose schemas ship in specs/.
    """
    try:
        loaded = load(paths)
    except SpecError as exc:
        if output is Format.json:
            out.print_json({"valid": False, "problems": [
                {"file": p.location.file if p.location else None,
                 "line": p.location.line if p.location else None,
                 "col": p.location.col if p.location else None,
                 "kind": p.kind, "name": p.name, "path": p.path, "message": p.message,
                 "hint": p.hint} for p in exc.problems], "suppressed": exc.suppressed})
            raise typer.Exit(2) from None
        raise
    if output is Format.json:
        out.print_json({"valid": True, "documents": len(loaded.documents),
                        "files": len(loaded.files)})
        return
    counts: dict[str, int] = {}
    for kind, _ in loaded.documents:
        counts[kind] = counts.get(kind, 0) + 1
    detail = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    out.console.print(Text(f"✓ {len(loaded.documents)} documents in {len(loaded.files)} files "
                           f"are valid ({detail})", style="green"))


@app.command()
def plan(
    paths: Paths,
    prune: Annotated[bool, typer.Option("--prune", help="Plan deletion of objects not in the files.")] = False,
    output: Annotated[Format, typer.Option("-o", "--output")] = Format.text,
    replay: Annotated[str | None, typer.Option(
        "--replay", metavar="DURATION",
        help="Also replay every created/changed scene over this much stored telemetry "
             "(e.g. 24h) and show what it would have done.")] = None,
    timeseries: Annotated[str | None, typer.Option(
        "--timeseries", envvar="TWIN_TIMESERIES",
        help="Time-series store for --replay (default: the state directory's).")] = None,
) -> None:
    """Show what `apply` would change in the registry."""
    from twin.spec.apply import plan_against

    loaded = load(paths)
    reg = state.registry()
    with spinner("planning"):
        p, base = plan_against(reg, loaded, prune=prune)
    report = _replay(p, reg, replay, timeseries) if replay else None
    replaced = _overrides_replaced(reg, p.result)
    if output is Format.json:
        doc = {"base_revision": base, **out.plan_json(p)}
        if replaced:
            doc["overrides_replaced"] = replaced
        if report is not None:
            from twin.control.replay import replay_json

            doc["replay"] = replay_json(report)
        out.print_json(doc, default=str)
        return
    out.print_plan(p)
    if replaced:
        out.console.print(Text("Runtime desired values this apply replaces (a changed spec value wins):",
                               style="bold"))
        for o in replaced:
            new_value = (f"spec {out.short(o['spec'])}" if "spec" in o
                         else "no declared value" if o["device_kept"] else "device deleted")
            out.console.print(f"  {o['device']}.{o['property']}: {out.short(o['value'])} "
                              f"(set by {o['set_by']}) → {new_value}")
    if report is not None:
        from twin.control.ledger import Catalog
        from twin.control.replay import format_replay

        out.console.print()
        for line in format_replay(report, tz=Catalog(p.result).timezone()):
            out.console.print(Text(line))


def _overrides_replaced(reg: Any, result: Any) -> list[dict[str, Any]]:
    """Runtime overrides (twin/registry/overrides.py) that applying ``result`` would drop."""
    from twin.registry.overrides import spec_desired, stale

    rows = []
    for o in stale(reg.overrides(), result):
        row: dict[str, Any] = {"device": o.device, "property": o.prop, "value": o.value,
                               "set_by": o.set_by, "set_at": o.set_at}
        doc = result.get(("Device", o.device))
        row["device_kept"] = doc is not None
        desired = spec_desired(doc)
        if o.prop in desired:
            row["spec"] = desired[o.prop]
        rows.append(row)
    return rows


def _replay(p: Any, reg: Any, window: str, timeseries: str | None) -> Any:
    """Replay the plan's created/changed scenes over the last ``window`` of stored data."""
    import time

    from twin.control.replay import replay
    from twin.spec.plan import Action
    from twin.spec.units import parse_duration

    try:
        seconds = parse_duration(window)
    except ValueError as exc:
        raise TwinError(f"--replay: {exc}") from exc
    changes = [
        (c.action.value, c.name)
        for c in p.changes
        if c.kind == "Scene" and c.action in (Action.CREATE, Action.UPDATE)
    ]
    current = reg.specs()
    store = open_timeseries(timeseries)
    try:
        end = time.time()
        with spinner(f"replaying {len(changes)} scene(s) over {window} of stored data"):
            return replay(current, p.result, changes, store, end - seconds, end)
    finally:
        store.close()


@app.command()
def apply(
    paths: Paths,
    prune: Annotated[bool, typer.Option("--prune", help="Delete objects that are not in the files.")] = False,
    message: Annotated[str, typer.Option("-m", "--message", help="Revision message.")] = "",
    server: Annotated[str | None, typer.Option(
        "--server", envvar="TWIN_SERVER", help="Apply through a running engine's REST API.")] = None,
    output: Annotated[Format, typer.Option("-o", "--output")] = Format.text,
) -> None:
    """Apply specs atomically: all of the plan or none of it, as a new revision."""
    loaded = load(paths)
    if server:
        result = _apply_remote(server, loaded, prune=prune, message=message)
        if output is Format.json:
            out.print_json(result)
        else:
            out.console.print(Text(remote_apply_summary(server, result), style="green"))
        return
    from twin.spec.apply import apply_specs

    reg = state.registry()
    with spinner("applying"):
        result_ = apply_specs(reg, loaded, prune=prune, author=author(), message=message)
    if output is Format.json:
        out.print_json({
            "base_revision": result_.base,
            "revision": out.revision_dict(result_.revision) if result_.revision else None,
            **out.plan_json(result_.plan)})
        return
    out.print_plan(result_.plan)
    if result_.revision is not None:
        r = result_.revision
        out.console.print(Text(f"Applied: revision {r.number} ({r.hash[:12]}).", style="bold green"))


def remote_apply_summary(server: str, result: dict[str, Any]) -> str:
    """One line for ``POST /api/v1/apply``'s answer: ``{"revision": N, "changed": bool,
    "created": c, "updated": u, "deleted": d}`` (``revision`` is the head's number)."""
    rev = result.get("revision")
    if isinstance(rev, dict):  # tolerate a revision object
        rev = rev.get("number", rev.get("revision"))
    if not result.get("changed", True):
        return f"applied through {server}: no changes (revision {rev})"
    counts = " ".join(f"{sym}{result[k]}" for sym, k in
                      (("+", "created"), ("~", "updated"), ("-", "deleted")) if k in result)
    return f"applied through {server}: revision {rev}" + (f" ({counts})" if counts else "")


def _apply_remote(server: str, loaded: Any, *, prune: bool, message: str) -> dict[str, Any]:
    import httpx

    token = os.environ.get("TWIN_TOKEN")
    if not token:
        raise TwinError("--server needs an access token",
                        hint="set TWIN_TOKEN (create one with `twin token create USER`)")
    docs = [doc for doc in loaded.specs.values()]
    try:
        resp = httpx.post(server.rstrip("/") + "/api/v1/apply",
                          json={"documents": docs, "prune": prune, "message": message},
                          headers={"Authorization": f"Bearer {token}"}, timeout=60)
    except httpx.HTTPError as exc:
        raise TwinError(f"cannot reach {server}: {exc}",
                        hint="is `twin up` running there? check --server") from exc
    if resp.status_code >= 400:
        try:
            detail = resp.json().get("detail")
        except ValueError:
            detail = resp.text[:200]
        raise TwinError(f"{server} refused the apply: HTTP {resp.status_code}: {detail}")
    return dict(resp.json())


@app.command()
def history(
    limit: Annotated[int, typer.Option("-n", "--limit")] = 20,
    output: Annotated[Format, typer.Option("-o", "--output")] = Format.text,
) -> None:
    """List revisions, newest first."""
    revs = state.registry().history(limit)
    if output is Format.json:
        out.print_json([out.revision_dict(r) for r in revs])
        return
    if not revs:
        out.console.print("No revisions yet: run `twin apply PATH`.")
        return
    out.console.print(out.history_table(revs))


@app.command()
def diff(
    rev: Annotated[int, typer.Argument(help="Older revision.")],
    rev2: Annotated[int | None, typer.Argument(help="Newer revision (default: head).")] = None,
    output: Annotated[Format, typer.Option("-o", "--output")] = Format.text,
) -> None:
    """Show what changed between two revisions."""
    from twin.spec.plan import make_plan

    reg = state.registry()
    head = reg.head()
    if head is None:
        raise NotFoundError("the registry has no revisions yet", hint="run `twin apply PATH` first")
    newer = rev2 if rev2 is not None else head.number
    reg.revision(rev)
    reg.revision(newer)
    p = make_plan(reg.specs(rev), reg.specs(newer), prune=True)
    if output is Format.json:
        out.print_json({"from": rev, "to": newer, **out.plan_json(p)})
        return
    out.console.print(Text(f"revision {rev} → {newer}", style="bold"))
    if p.empty:
        out.console.print("identical content")
        return
    for line in out.plan_lines(p):
        out.console.print(line)


@app.command()
def rollback(
    rev: Annotated[int, typer.Argument(help="Revision whose content to restore.")],
    message: Annotated[str, typer.Option("-m", "--message")] = "",
) -> None:
    """Make a new revision equal to REV's content."""
    from twin.spec.apply import rollback as do_rollback

    reg = state.registry()
    with spinner(f"rolling back to revision {rev}"):
        result = do_rollback(reg, rev, author=author(), message=message)
    out.print_plan(result.plan)
    if result.revision is not None:
        out.console.print(Text(f"Rolled back: revision {result.revision.number} has the content "
                               f"of revision {rev}.", style="bold green"))


KINDS = {
    "devices": "Device", "device": "Device", "dev": "Device",
    "groups": "DeviceGroup", "group": "DeviceGroup", "devicegroups": "DeviceGroup",
    "models": "DeviceModel", "model": "DeviceModel", "devicemodels": "DeviceModel",
    "sites": "Site", "site": "Site",
}


def _kind(word: str) -> str:
    from twin.spec.schema import known_kinds

    k = KINDS.get(word.lower())
    if k:
        return k
    for kind in known_kinds():
        if word.lower() in (kind.lower(), kind.lower() + "s"):
            return kind
    raise TwinError(f"unknown kind {word!r}",
                    hint="use devices, groups, models or sites (or any kind: " + ", ".join(known_kinds()) + ")")


@app.command()
def get(
    kind: Annotated[str, typer.Argument(help="devices | groups | models | sites | <Kind>")],
    name: Annotated[str | None, typer.Argument()] = None,
    selector: Annotated[str | None, typer.Option(
        "-l", "--selector", help="e.g. tag=hvac,site=plant-a,floor=2 (group= includes subgroups)")] = None,
    output: Annotated[TableFormat, typer.Option("-o", "--output")] = TableFormat.table,
) -> None:
    """List objects from the registry."""
    from twin.spec.select import matches, parse_selector

    k = _kind(kind)
    try:
        terms = parse_selector(selector)
    except ValueError as exc:
        raise TwinError(str(exc), hint="selectors look like tag=hvac,floor=2") from None
    reg = state.registry()
    specs = reg.specs()
    groups = {n: d for (kk, n), d in specs.items() if kk == "DeviceGroup"}
    rows = {r["id"]: r for r in reg.device_rows()} if k == "Device" else {}
    docs = []
    for (kk, n), d in sorted(specs.items()):
        if kk != k or (name and n != name):
            continue
        status = rows.get(n, {}).get("status")
        if matches(d, terms, groups=groups, status=status):
            docs.append((d, rows.get(n)))
    if name and not docs:
        raise NotFoundError(f"{k} {name!r} not found", hint=f"`twin get {kind}` lists them")
    if output is TableFormat.json:
        out.print_json([_with_status(d, r) for d, r in docs])
        return
    if output is TableFormat.yaml:
        out.console.print(yaml.safe_dump_all([_with_status(d, r) for d, r in docs],
                                             sort_keys=False, allow_unicode=True), end="")
        return
    out.console.print(out.rows_table(*_table(k, docs)))


def _with_status(doc: dict[str, Any], row: dict[str, Any] | None) -> dict[str, Any]:
    if row is None:
        return doc
    return {**doc, "status": {"status": row.get("status"), "updated_at": row.get("updated_at")}}


def _table(kind: str, docs: list[tuple[dict[str, Any], dict[str, Any] | None]]) -> tuple[list[str], list[list[Any]]]:
    if kind == "Device":
        cols = ["name", "type", "model", "site", "group", "protocol", "status", "tags"]
        rows = []
        for d, r in docs:
            m, s = d["metadata"], d.get("spec") or {}
            rows.append([m["name"], s.get("type"), s.get("model"), m.get("site"), m.get("group"),
                         next(iter(s.get("binding") or {}), None), (r or {}).get("status"),
                         ",".join(m.get("tags") or [])])
        return cols, rows
    if kind == "DeviceGroup":
        return ["name", "site", "parent", "description"], [
            [d["metadata"]["name"], d["metadata"].get("site"), (d.get("spec") or {}).get("parent"),
             (d.get("spec") or {}).get("description")] for d, _ in docs]
    if kind == "DeviceModel":
        return ["name", "properties", "telemetry", "commands"], [
            [d["metadata"]["name"], ",".join((d.get("spec") or {}).get("properties") or {}),
             ",".join((d.get("spec") or {}).get("telemetry") or {}),
             ",".join((d.get("spec") or {}).get("commands") or {})] for d, _ in docs]
    if kind == "Site":
        return ["name", "title", "timezone", "location"], [
            [d["metadata"]["name"], (d.get("spec") or {}).get("title"),
             (d.get("spec") or {}).get("timezone"),
             _loc((d.get("spec") or {}).get("location"))] for d, _ in docs]
    return ["name", "site", "tags"], [
        [d["metadata"]["name"], d["metadata"].get("site"), ",".join(d["metadata"].get("tags") or [])]
        for d, _ in docs]


def _loc(loc: dict[str, Any] | None) -> str | None:
    return f"{loc['lat']:.4f},{loc['lon']:.4f}" if loc else None


@app.command()
def describe(
    kind: Annotated[str, typer.Argument(help="device | group | model | site | <Kind>")],
    name: Annotated[str, typer.Argument()],
    output: Annotated[TableFormat, typer.Option("-o", "--output")] = TableFormat.table,
    server: Annotated[str | None, typer.Option(
        "--server", envvar="TWIN_SERVER",
        help="A running engine: adds live twin state (reported, desired, delta) and commands.")] = None,
) -> None:
    """Show one object: its spec, model, group path, status and the revision that last changed it."""
    from twin.spec.select import group_ancestry

    k = _kind(kind)
    reg = state.registry()
    specs = reg.specs()
    doc = specs.get((k, name))
    if doc is None:
        from difflib import get_close_matches

        names = [n for kk, n in specs if kk == k]
        close = get_close_matches(name, names, n=1)
        raise NotFoundError(f"{k} {name!r} not found",
                            hint=f"did you mean {close[0]!r}?" if close else f"`twin get {kind}` lists them")
    info: dict[str, Any] = {"kind": k, "name": name, "last_changed_revision": reg.last_changed(k, name)}
    groups = {n: d for (kk, n), d in specs.items() if kk == "DeviceGroup"}
    meta, spec = doc.get("metadata") or {}, doc.get("spec") or {}
    if k in ("Device", "DeviceGroup"):
        start = meta.get("group") if k == "Device" else name
        info["group_path"] = list(reversed(group_ancestry(groups, start)))
    if k == "Device":
        rows = reg.device_rows([name])
        if rows:
            info["status"] = rows[0].get("status")
            info["status_since"] = rows[0].get("updated_at")
        model = specs.get(("DeviceModel", spec.get("model") or ""))
        if model:
            info["model"] = {"name": spec["model"], **(model.get("spec") or {})}
        history = reg.status_history(name, limit=10)
        info["status_history"] = [{"status": h.status, "at": h.timestamp, **dict(h.metadata)} for h in history]
        alarms = reg.alarms(device=name, limit=10)
        info["alarms"] = [{"id": a.id, "type": a.type, "severity": a.severity, "state": a.state,
                           "raised_at": a.raised_at, "message": a.message} for a in alarms]
        from twin.control.ledger import record_json

        info["commands"] = [record_json(r) for r in reg.commands(device=name, limit=10)]
        # runtime desired values (scenes, commands, operators) over spec.desired; never in a
        # revision (twin/registry/overrides.py)
        info["overrides"] = {o.prop: o.to_json() for o in reg.overrides(name)}
        if server:
            info.update(_live_device(server, name))
    info["spec"] = doc
    if output is TableFormat.json:
        out.print_json(info, default=str)
        return
    if output is TableFormat.yaml:
        out.console.print(yaml.safe_dump(info, sort_keys=False, allow_unicode=True), end="")
        return
    _print_description(info)


def _api_get(server: str, path: str, *, optional: bool = False) -> Any:
    """GET a JSON document; None for 404 (and, when ``optional``, for a service not running)."""
    import httpx

    token = os.environ.get("TWIN_TOKEN")
    if not token:
        raise TwinError("--server needs an access token",
                        hint="set TWIN_TOKEN (create one with `twin token create USER`)")
    try:
        resp = httpx.get(server.rstrip("/") + path, headers={"Authorization": f"Bearer {token}"},
                         timeout=10)
    except httpx.HTTPError as exc:
        raise TwinError(f"cannot reach {server}: {exc}",
                        hint="is `twin up` running there? check --server") from exc
    if resp.status_code == 404 or (optional and resp.status_code == 503):
        return None
    if resp.status_code >= 400:
        raise TwinError(f"{server}{path}: HTTP {resp.status_code}: {resp.text[:200]}")
    return resp.json()


def _live_device(server: str, name: str) -> dict[str, Any]:
    """Twin state and recent commands from a running engine (what the registry cannot know)."""
    live: dict[str, Any] = {}
    twin = _api_get(server, f"/api/v1/devices/{name}/twin")
    if twin is not None:
        live["twin"] = twin
    commands = _api_get(server, f"/api/v1/devices/{name}/commands?limit=10", optional=True)
    if commands is not None:
        live["commands"] = commands["commands"]
    return live


def _precision(model: dict[str, Any] | None, name: str) -> int | None:
    """The decimals a model declares for a property or telemetry point (``precision: 1``)."""
    for section in ("properties", "telemetry"):
        decl = ((model or {}).get(section) or {}).get(name)
        if isinstance(decl, dict) and isinstance(decl.get("precision"), int):
            return int(decl["precision"])
    return None


def _print_description(info: dict[str, Any]) -> None:
    c = out.console
    c.print(Text(f"{info['kind']} {info['name']}", style="bold"))
    if "group_path" in info:
        c.print(f"  group path:   {' → '.join(info['group_path']) or '-'}")
    if "status" in info:
        c.print(f"  status:       {info['status']} (since {out.fmt_time(info.get('status_since'))})")
    c.print(f"  last changed: revision {info['last_changed_revision']}")
    model = info.get("model")
    if model:
        c.print(Text(f"  model {model['name']}:", style="bold"))
        for section in ("properties", "telemetry"):
            for p, d in (model.get(section) or {}).items():
                unit = f" [{d['unit']}]" if d.get("unit") else ""
                rng = ""
                if d.get("min") is not None or d.get("max") is not None:
                    rng = f" {d.get('min', '')}..{d.get('max', '')}"
                access = f" {d.get('access', 'read')}" if section == "properties" else " telemetry"
                c.print(f"    {p}: {d['type']}{unit}{rng}{access}")
        cmds = ", ".join(model.get("commands") or {})
        if cmds:
            c.print(f"    commands: {cmds}")
    twin = info.get("twin")
    if twin:
        c.print(Text(f"  twin (live, last seen {out.fmt_time(twin.get('last_seen'))}):", style="bold"))
        names = sorted(set(twin.get("reported") or {}) | set(twin.get("desired") or {}))
        for p in names:
            rep = (twin.get("reported") or {}).get(p)
            des = (twin.get("desired") or {}).get(p)
            prec = _precision(model, p)
            line = f"    {p}: reported {out.fmt_value(rep['value'], prec) if rep else '-'}"
            if p in (twin.get("desired") or {}):
                line += f", desired {out.fmt_value(des, prec)}"
            if p in (twin.get("overrides") or {}):
                line += " (runtime override)"
            if p in (twin.get("delta") or {}):
                line += "  (delta)"
            c.print(line)
    overrides = (twin or {}).get("overrides", info.get("overrides"))
    if overrides:
        c.print(Text("  runtime desired values (override spec.desired until it changes):", style="bold"))
        for p, o in sorted(overrides.items()):
            spec = f" (spec {out.short(o['spec_value'])})" if "spec_value" in o else " (not in the spec)"
            c.print(f"    {p} = {out.short(o['value'])}{spec}  set by {o['set_by']} at {out.fmt_time(o['set_at'])}")
    if info.get("commands"):
        c.print(Text("  commands (newest first):", style="bold"))
    for cmd in info.get("commands") or []:
        err = f": {cmd['error']}" if cmd.get("error") else ""
        c.print(f"    {out.fmt_time(cmd.get('created_at'))}  {cmd.get('type', '')} "
                f"{out.short(cmd.get('params') or {}, 40)} → {cmd.get('status', '')}{err}  ({cmd.get('id', '')})")
    if info.get("alarms"):
        c.print(Text("  alarms:", style="bold"))
        for a in info["alarms"]:
            c.print(f"    #{a['id']} {a['severity']} {a['type']} {a['state']} {out.fmt_time(a['raised_at'])}: {a['message']}")
    if info.get("status_history"):
        c.print(Text("  status history:", style="bold"))
        for h in info["status_history"]:
            c.print(f"    {out.fmt_time(h['at'])}  {h['status']}")
    c.print(Text("  spec:", style="bold"))
    for line in yaml.safe_dump(info["spec"], sort_keys=False, allow_unicode=True).splitlines():
        c.print("    " + line)


def _register_extensions() -> None:
    """Command groups that live in their own modules (runtime, control, time series ...)."""
    import importlib

    for mod in (
        "twin.cli.runtime_cmds",  # up, user, token, session, device-key
        "twin.cli.broker_cmds",  # broker
        "twin.cli.control_cmds",  # command, scene, simulate
        "twin.cli.timeseries_cmds",  # query, storage
        "twin.cli.dashboard_cmds",  # dashboard
        "twin.cli.report_cmds",  # report
        "twin.cli.discover_cmds",  # discover onvif
        "twin.cli.edge_cmds",  # edge, edge-key
        "twin.cli.discover_opcua",  # discover opcua
        "twin.cli.plugin_cmds",  # plugin test, plugin build
        "twin.cli.video_cmds",  # video recordings, video clip
    ):
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name == mod:
                continue
            raise
        module.register(app)


def _is_usage_error(exc: BaseException) -> bool:
    """A click usage error (missing argument, bad value, no such command): typer >= 0.22 raises
    those of its own vendored copy of click, older ones click's."""
    import click

    kinds: tuple[type[BaseException], ...] = (click.ClickException,)
    try:
        from typer._click.exceptions import ClickException as TyperClickException

        kinds += (TyperClickException,)
    except ImportError:  # a typer that uses click itself
        pass
    return isinstance(exc, kinds)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning errors into one line plus a hint."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    _register_extensions()
    from twin.cli.discover_opcua import url_shorthand

    argv = url_shorthand(list(argv if argv is not None else sys.argv[1:]))
    try:
        rc = app(args=argv, standalone_mode=False)
        if isinstance(rc, int) and rc:  # click returns typer.Exit's code in this mode
            sys.exit(rc)
    except SpecError as exc:
        if debug:
            traceback.print_exc()
        out.print_problems(exc.problems)
        out.err_console.print(out.problems_summary(exc))
        sys.exit(2)
    except TwinError as exc:
        if debug:
            traceback.print_exc()
        out.err_console.print(Text(f"error: {exc}", style="bold red"))
        if exc.hint:
            out.err_console.print(Text(f"hint: {exc.hint}", style="cyan"))
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        out.err_console.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        out.err_console.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # click usage errors and the unexpected
        if _is_usage_error(exc):
            exc.show()  # type: ignore[attr-defined]
            sys.exit(exc.exit_code)  # type: ignore[attr-defined]
        if debug:
            traceback.print_exc()
        out.err_console.print(Text(f"error: {type(exc).__name__}: {exc}", style="bold red"))
        out.err_console.print(Text("hint: this is a bug or an unexpected condition; "
                                   "run again with --debug for the traceback", style="cyan"))
        sys.exit(1)


if __name__ == "__main__":
    main()
