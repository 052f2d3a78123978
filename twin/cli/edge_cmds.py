"""``twin edge SITE_DIR --cloud URL``: run the engine in edge mode; ``twin edge-key NAME``: an
edge's uplink key (on the cloud).

The edge keeps everything local in its own state dir (default ``.twin-edge/<name>``): a
registry with the revisions it applied, a time-series store, the outbox. ``SITE_DIR`` is
applied only on the first start (an empty local registry); afterwards the edge runs its last
applied revision — the one the cloud sent down, when it was reachable — so an edge restarted
with the uplink down comes back exactly as it was.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from twin.cli.state import author, load, state
from twin.errors import TwinError


def edge(
    site: Annotated[Path, typer.Argument(help="Site folder (applied on the first start).")],
    cloud: Annotated[str | None, typer.Option(
        "--cloud", envvar="TWIN_EDGE_CLOUD",
        help="The cloud: its API URL (http(s)://HOST:PORT) or an MQTT broker it is connected "
        "to (mqtt(s)://HOST:PORT); default the EdgeNode's uplink.url.")] = None,
    name: Annotated[str | None, typer.Option("--name", help="The EdgeNode to run "
                                             "(default: the only one in SITE_DIR).")] = None,
    key: Annotated[str | None, typer.Option("--key", envvar="TWIN_EDGE_KEY",
                                            help="Uplink key (default: the EdgeNode's "
                                            "uplink.key secret).")] = None,
    listen: Annotated[str, typer.Option("--listen", help="Local API HOST:PORT (port 0: a free "
                                        "one) for local devices and operators.")] = "127.0.0.1:8081",
    no_api: Annotated[bool, typer.Option("--no-api", help="No local API.")] = False,
    state_dir: Annotated[Path | None, typer.Option("--state-dir", help="Local state "
                                                   "(default .twin-edge/NAME).")] = None,
    ca: Annotated[Path | None, typer.Option("--ca", help="CA bundle to verify the cloud.")] = None,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    """Run the engine in edge mode: local registry, store, scenes and commands; a durable
    outbox drained to the cloud; specs from the cloud as local revisions."""
    from twin.spec.edge_check import owned_devices

    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", force=True)
    for noisy in ("hypercorn.error", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    loaded = load([site])
    edges = loaded.of_kind("EdgeNode")
    if name is None:
        if len(edges) != 1:
            raise TwinError(f"{site} has {len(edges)} EdgeNode documents",
                            hint="name the one to run with --name")
        name = next(iter(edges))
    if name not in edges:
        raise TwinError(f"no EdgeNode {name!r} in {site}",
                        hint=f"known: {', '.join(sorted(edges)) or 'none'}")
    doc = edges[name].body
    uplink = (doc.get("spec") or {}).get("uplink") or {}
    cloud = cloud or uplink.get("url")
    if not cloud:
        raise TwinError("no cloud to connect to", hint="--cloud URL or the EdgeNode's uplink.url")
    if ca is None and uplink.get("ca"):
        ca = Path(str(uplink["ca"]))
    st = state
    st.state_dir = state_dir or Path(".twin-edge") / name
    st.registry_url = None
    if key is None:
        ref = ((doc.get("spec") or {}).get("uplink") or {}).get("key")
        if isinstance(ref, dict) and "secret" in ref:
            from twin.spec.secrets import Secrets, env_name

            key = Secrets(state_dir=st.state_dir).get(ref["secret"])
            if key is None:
                raise TwinError(f"the uplink key secret {ref['secret']!r} is not set",
                                hint=f"export {env_name(ref['secret'])}=KEY (from twin "
                                f"edge-key {name} on the cloud) or pass --key")
    if not key:
        raise TwinError("no uplink key", hint=f"twin edge-key {name} on the cloud, then --key")
    from twin.cli.runtime_cmds import _bind_listeners

    listeners = _bind_listeners(None if no_api else listen, None, [], None)
    reg = st.registry()
    from twin.files import private_dir

    private_dir(st.state_dir)
    if reg.head() is None:
        from twin.spec.apply import apply_specs

        apply_specs(reg, loaded, author=author(), message=f"twin edge {site}", source="cli")
    from twin.api.app import ApiSettings
    from twin.api.server import ApiService
    from twin.control.service import ControlService
    from twin.edge.agent import EdgeAgent
    from twin.runtime.engine import Engine, EngineConfig
    from twin.runtime.timeseries_service import TimeSeriesService

    agent = EdgeAgent(name, cloud, key, verify=str(ca) if ca else True)
    services: list[Any] = [ControlService(), TimeSeriesService(), agent]
    if listeners.api is not None:
        host, port, sock = listeners.api
        services.append(ApiService(host, port, ApiSettings(state_dir=st.state_dir), sock=sock))
    engine = Engine(reg, EngineConfig(state_dir=st.state_dir, edge=name), services)
    from twin.cli import output

    console = output.console

    async def main() -> None:
        import trio

        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            owned = sorted(owned_devices(engine.specs.get(("EdgeNode", name)) or doc,
                                         engine.specs))  # fmt: skip
            api = engine.service_info.get("api")
            lines = [
                f"FLUX IoT edge {name} up — local revision {engine.revision_number}"
                f" (cloud revision {agent.cloud_revision or '-'}), {len(owned)} devices",
                f"  devices    {', '.join(owned) or '-'}",
                f"  cloud      {cloud}",
                f"  state dir  {st.state_dir}",
                f"  outbox     {len(agent.outbox or [])} records to send",
            ]
            if api:
                lines.append(f"  api        {api['url']}/api/v1")
            lines.append("Ctrl-C to stop.")
            console.print("\n".join(lines))

    from twin.cli.signals import exit_now, run_until_signal

    stopped = False
    try:
        stopped = run_until_signal(main) is not None
    except KeyboardInterrupt:
        stopped = True
    finally:
        reg.close()
    if stopped:
        console.print("stopped.")
        exit_now(0)


def edge_key(name: Annotated[str, typer.Argument(help="EdgeNode name.")]) -> None:
    """Create an uplink key for edge NAME (on the cloud's registry); it is shown once."""
    from twin.edge.cloud import link_device
    from twin.registry.credentials import create_device_key

    reg = state.registry()
    try:
        if ("EdgeNode", name) not in reg.specs():
            raise TwinError(f"no EdgeNode {name!r} in the registry",
                            hint="apply it first: twin apply PATH")
        rec, secret = create_device_key(reg, link_device(name))
    finally:
        reg.close()
    from twin.cli import output

    output.console.print(f"uplink key {rec.id} for edge {name} (shown once; on the edge: "
                         f"--key, or the EdgeNode's uplink.key secret):", highlight=False)
    typer.echo(secret)


def edge_status(
    server: Annotated[str | None, typer.Option("--server", envvar="TWIN_SERVER",
                                               help="The cloud engine's API URL.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Link state of every edge node, from the cloud engine: online, the revision it runs,
    lag, outbox depth, records dropped by its overflow policy, last sync."""
    import json
    import time

    from twin.cli.control_cmds import _api

    items = _api(server, "GET", "/edges").get("items") or []
    if as_json:
        typer.echo(json.dumps(items, indent=2))
        return
    from rich.table import Table

    from twin.cli import output

    if not items:
        output.console.print("no edge nodes (kind: EdgeNode) on this engine")
        return
    table = Table("edge", "link", "revision", "acked seq", "outbox", "lag", "dropped",
                  "duplicates", "last sync")  # fmt: skip
    now = time.time()
    for e in items:
        lag = e.get("lag_s")
        last = e.get("last_sync")
        table.add_row(
            e["name"], "online" if e["online"] else "[red]offline[/red]",
            str(e.get("revision") or "-"), str(e.get("acked")), str(e.get("outbox_depth")),
            "-" if lag is None else f"{lag:.1f}s",
            str(sum((e.get("dropped_at_edge") or {}).values())), str(e.get("duplicates")),
            "never" if last is None else f"{now - last:.1f}s ago",
        )  # fmt: skip
    output.console.print(table)


def register(app: typer.Typer) -> None:
    app.command("edge")(edge)
    app.command("edge-key")(edge_key)
    app.command("edge-status")(edge_status)


__all__ = ["register"]
