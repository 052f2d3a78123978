"""``twin discover opcua://host:port`` (or ``twin discover opcua ENDPOINT``): browse an OPC UA server and write Device/DeviceModel YAML.

``ENDPOINT`` is ``opcua://host:port[/path]`` or ``opc.tcp://host:port/path``. Each object under
``Objects`` becomes a DeviceModel (variables: telemetry, or ``readwrite`` properties when
writable; methods: commands with their InputArguments as parameters) and a Device with an
``opcua`` binding (points by NodeId, methods). Login and security as in the binding:
``--username`` with ``--password-secret NAME``; the password itself is never written, only
the reference (twin/bindings/opcua_browse.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import trio
import typer
import yaml

from twin.cli import output as out
from twin.cli.discover_cmds import discover_app
from twin.errors import TwinError


@discover_app.command("opcua")
def opcua_cmd(
    endpoint: Annotated[str, typer.Argument(help="opcua://HOST:PORT[/PATH] or opc.tcp://...")],
    username: Annotated[str | None, typer.Option(help="user name (default: anonymous)")] = None,
    password_secret: Annotated[str | None, typer.Option(
        "--password-secret", help="NAME of the secret holding the password "
        "(TWIN_SECRET_<NAME> or the secrets file)")] = None,
    depth: Annotated[int, typer.Option(help="levels of sub-objects/folders to browse")] = 4,
    max_nodes: Annotated[int, typer.Option("--max-nodes", help="stop browsing after this many "
                                           "nodes")] = 5000,
    site: Annotated[str | None, typer.Option(help="metadata.site of the devices")] = None,
    prefix: Annotated[str, typer.Option(help="prefix of the device names")] = "",
    output: Annotated[Path | None, typer.Option(
        "--out", "-o", help="write the YAML here (default: print it)")] = None,
) -> None:
    """Browse an OPC UA server; one Device + DeviceModel per object under Objects."""
    from twin.bindings.opcua_browse import discover, documents, normalize_endpoint

    try:
        url = normalize_endpoint(endpoint)
    except ValueError:
        raise TwinError(f"{endpoint!r} is not an OPC UA endpoint",
                        hint="e.g. opcua://10.0.0.20:4840 or opc.tcp://10.0.0.20:4840/plc/"
                        ) from None
    options: dict[str, Any] = {"timeout": "10s"}
    if username:
        options["username"] = username
        if password_secret:
            options["password"] = {"secret": password_secret}

    async def run() -> Any:
        return await discover(url, options, depth=depth, max_nodes=max_nodes)

    with out.err_console.status(f"browsing {url} ..."):
        objects = trio.run(run)
    extra = {k: v for k, v in options.items() if k in ("username", "password")}
    docs = documents(objects, url, site=site, prefix=prefix, binding_extra=extra)
    if not docs:
        raise TwinError(f"{url}: no objects with variables or methods under Objects",
                        hint="try a larger --depth")
    text = yaml.safe_dump_all(docs, sort_keys=False, allow_unicode=True)
    n = sum(1 for d in docs if d["kind"] == "Device")
    if output is None:
        out.console.print(text, markup=False, highlight=False, end="")
    else:
        output.write_text(text, encoding="utf-8")
        out.err_console.print(f"wrote {n} device(s) and their models to {output}")


def url_shorthand(args: list[str]) -> list[str]:
    """``twin discover opcua://host:port ...`` means ``twin discover opcua opcua://...``."""
    for i, a in enumerate(args):
        if a == "discover" and i + 1 < len(args):
            nxt = args[i + 1]
            if nxt.startswith(("opcua://", "opc.tcp://")):
                return [*args[: i + 1], "opcua", *args[i + 1 :]]
            return args
    return args


def register(app: typer.Typer) -> None:
    """The command is on ``discover_app`` (registered by twin.cli.discover_cmds)."""
