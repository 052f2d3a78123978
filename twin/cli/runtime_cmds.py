"""Runtime commands: ``twin up``, device keys, users (add, list, delete, disable, enable),
tokens (create, list, revoke one or all of a user's), sessions.

Wired into the main typer app by ``twin.cli.main`` through :func:`register`.
"""

from __future__ import annotations

import getpass
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from twin.cli.state import author, load, state
from twin.errors import TwinError


def _registry(registry_url: str | None = None, state_dir: Path | None = None) -> Any:
    st = state
    if registry_url is not None:
        st.registry_url = registry_url
    if state_dir is not None:
        st.state_dir = state_dir
    return st.registry()


def _console() -> Any:
    from twin.cli import output

    return output.console


def _fmt_time(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def up(
    path: Annotated[
        Path | None, typer.Argument(help="Site folder to apply before starting.")
    ] = None,
    listen: Annotated[
        str,
        typer.Option(
            "--listen",
            envvar="TWIN_LISTEN",
            help="API address HOST:PORT (port 0 picks a free one).",
        ),
    ] = "127.0.0.1:8080",
    certfile: Annotated[
        Path | None, typer.Option("--certfile", help="Serve the API over HTTPS: certificate "
                                  "chain (PEM); needs --keyfile.")
    ] = None,
    keyfile: Annotated[
        Path | None, typer.Option("--keyfile", help="The HTTPS certificate's key (PEM).")
    ] = None,
    state_dir: Annotated[
        Path | None, typer.Option("--state-dir", help="Where local state lives.")
    ] = None,
    registry: Annotated[str | None, typer.Option("--registry", help="Registry URL.")] = None,
    message: Annotated[
        str, typer.Option("-m", "--message", help="Revision message for the apply.")
    ] = "",
    log_level: Annotated[
        str, typer.Option("--log-level", help="debug, info, warning, error")
    ] = "info",
    no_api: Annotated[
        bool, typer.Option("--no-api", help="Run the engine without the API.")
    ] = False,
    mqtt_listen: Annotated[
        str,
        typer.Option(
            "--mqtt-listen",
            envvar="TWIN_MQTT_LISTEN",
            help="Embedded MQTT broker HOST:PORT (port 0 picks a free one).",
        ),
    ] = "127.0.0.1:1883",
    mqtt_broker: Annotated[
        str | None,
        typer.Option(
            "--mqtt-broker",
            envvar="TWIN_MQTT_BROKER",
            help="Use an external MQTT broker HOST:PORT instead of the embedded one.",
        ),
    ] = None,
    mqtt_share_group: Annotated[
        str | None,
        typer.Option(
            "--mqtt-share-group",
            help="External broker: share device traffic "
            "with other engines through $share/GROUP/...",
        ),
    ] = None,
    no_mqtt: Annotated[bool, typer.Option("--no-mqtt", help="Run without MQTT.")] = False,
    mqtt_wss_listen: Annotated[
        list[str] | None,
        typer.Option("--mqtt-wss-listen", help="Embedded broker: MQTT over secure WebSocket "
                     "HOST:PORT (repeatable; needs --mqtt-certfile and --mqtt-keyfile)."),
    ] = None,
    mqtt_tls_listen: Annotated[
        list[str] | None,
        typer.Option("--mqtt-tls-listen", help="Embedded broker: MQTT over TLS HOST:PORT "
                     "(repeatable; needs --mqtt-certfile and --mqtt-keyfile)."),
    ] = None,
    mqtt_certfile: Annotated[
        Path | None, typer.Option("--mqtt-certfile", help="Embedded broker's certificate (PEM).")
    ] = None,
    mqtt_keyfile: Annotated[
        Path | None, typer.Option("--mqtt-keyfile", help="Embedded broker's key (PEM).")
    ] = None,
    mqtt_max_keep_alive: Annotated[
        int, typer.Option("--mqtt-max-keep-alive", help="Embedded broker: cap clients' "
                          "keep-alive at this many seconds (0: accept theirs).")
    ] = 0,
    mqtt_server_topic_aliases: Annotated[
        bool, typer.Option("--mqtt-server-topic-aliases", help="Embedded broker: send topic "
                           "aliases to MQTT 5 clients that allow them.")
    ] = False,
    timeseries: Annotated[
        str | None,
        typer.Option(
            "--timeseries",
            envvar="TWIN_TIMESERIES",
            help="Time-series store: postgresql://... (default: LanceDB in the state dir).",
        ),
    ] = None,
    no_timeseries: Annotated[
        bool, typer.Option("--no-timeseries", help="Do not store readings.")
    ] = False,
    dashboard: Annotated[
        bool, typer.Option("--dashboard", help="Also serve the Streamlit dashboard of PATH.")
    ] = False,
    dashboard_listen: Annotated[
        str,
        typer.Option(
            "--dashboard-listen",
            help="Dashboard address HOST:PORT with --dashboard (port 0 picks a free one).",
        ),
    ] = "127.0.0.1:0",
    cluster: Annotated[
        str | None,
        typer.Option(
            "--cluster",
            envvar="TWIN_CLUSTER",
            help="Run as one of several engines sharing this PostgreSQL registry (the cluster's "
            "name): devices and scenes are shared out by leases. See README 'Scaling out'.",
        ),
    ] = None,
    cluster_ttl: Annotated[
        float,
        typer.Option("--cluster-ttl", help="Cluster lease in seconds: a dead engine's devices "
                     "and scenes move to the others within it."),
    ] = 5.0,
    coap_listen: Annotated[
        str,
        typer.Option(
            "--coap-listen",
            help="CoAP server for coap push devices, HOST:PORT (UDP; port 0 picks a free one; "
            "the standard port is 5683).",
        ),
    ] = "127.0.0.1:0",
    coaps_listen: Annotated[
        str | None,
        typer.Option("--coaps-listen", help="Also CoAP over DTLS-PSK (coaps://), HOST:PORT."),
    ] = None,
    no_coap: Annotated[bool, typer.Option("--no-coap", help="Run without CoAP.")] = False,
    opcua_listen: Annotated[
        str | None,
        typer.Option(
            "--opcua-listen",
            help="Also serve the twins as an OPC UA server at HOST:PORT (logins: the engine's "
            "users; methods = commands). Port 0 picks a free one.",
        ),
    ] = None,
    opcua_security: Annotated[
        str,
        typer.Option(
            "--opcua-security",
            help="Security policies the OPC UA server offers, comma-separated: "
            "Basic256Sha256_SignAndEncrypt, Basic256Sha256_Sign, None (None only if listed).",
        ),
    ] = "Basic256Sha256_SignAndEncrypt,Basic256Sha256_Sign",
    opcua_certificate: Annotated[
        str | None,
        typer.Option("--opcua-certificate", help="Secret NAME holding the OPC UA server's "
                     "certificate (PEM); default: a self-signed one in STATE_DIR/opcua."),
    ] = None,
    opcua_private_key: Annotated[
        str | None,
        typer.Option("--opcua-private-key", help="Secret NAME holding its private key (PEM)."),
    ] = None,
    opcua_trust: Annotated[
        Path | None,
        typer.Option("--opcua-trust", help="Directory of trusted OPC UA client certificates "
                     "(PEM/DER); default: any client certificate (a login is still required)."),
    ] = None,
    webhook_allow: Annotated[
        str | None,
        typer.Option(
            "--webhook-allow",
            envvar="TWIN_WEBHOOK_ALLOW",
            help="Hosts scene webhooks may call: names, *.domain, IPs or networks, "
            "comma-separated (default: none; private addresses only if listed).",
        ),
    ] = None,
    gb28181: Annotated[
        str | None,
        typer.Option(
            "--gb28181",
            envvar="TWIN_GB28181",
            help="Run the GB28181 SIP server on HOST:PORT (UDP + TCP) for gb28181 cameras; "
            "registration password: secret 'gb28181'.",
        ),
    ] = None,
    gb28181_id: Annotated[
        str, typer.Option("--gb28181-id", envvar="TWIN_GB28181_ID",
                          help="The platform's 20-digit SIP id; its first 10 digits: the realm.")
    ] = "34020000002000000001",
    gb28181_media_host: Annotated[
        str, typer.Option("--gb28181-media-host", envvar="TWIN_GB28181_MEDIA_HOST",
                          help="Address put in SDP offers: where devices send RTP.")
    ] = "127.0.0.1",
) -> None:
    """Apply PATH (if given), then run the engine and the API until Ctrl-C or SIGTERM.

    Every listen address (API, MQTT, dashboard) is checked before anything is applied: a taken
    port is one line with a hint and leaves the registry untouched.
    """
    from twin.api.app import ApiSettings
    from twin.api.server import ApiService, check_tls
    from twin.runtime.engine import Engine, EngineConfig

    certs = (str(certfile) if certfile else None, str(keyfile) if keyfile else None)
    check_tls(*certs)  # a wrong certificate or key: one line, before anything starts
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        force=True,
    )
    for noisy in ("hypercorn.error", "httpx", "asyncua", "aiocoap"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    console = _console()
    from twin.control.webhooks import WebhookPolicy

    webhooks = WebhookPolicy.parse(webhook_allow)  # a bad entry fails before anything starts
    # 1. every listener first: nothing is applied when one of them cannot start
    mqtt = None
    if not no_mqtt:

        def mqtt() -> Any:
            from twin.cli.broker_cmds import server_ssl_context
            from twin.runtime.mqtt_service import cli_service

            ctx = None
            if mqtt_wss_listen or mqtt_tls_listen:
                ctx = server_ssl_context(mqtt_certfile, mqtt_keyfile, None,
                                         "--mqtt-tls-listen" if mqtt_tls_listen
                                         else "--mqtt-wss-listen")  # fmt: skip
            # binds the embedded broker's port now: a taken port is one line + hint
            return cli_service(
                mqtt_listen, mqtt_broker, share_group=mqtt_share_group,
                wss_listen=mqtt_wss_listen, tls_listen=mqtt_tls_listen, ssl_context=ctx,
                max_keep_alive=mqtt_max_keep_alive,
                server_topic_aliases=mqtt_server_topic_aliases,
            )  # fmt: skip

    listeners = _bind_listeners(
        None if no_api else listen,
        mqtt,
        [] if no_mqtt or mqtt_broker else [*(mqtt_wss_listen or []), *(mqtt_tls_listen or [])],
        dashboard_listen if dashboard and not no_api else None,
    )
    coap_addrs = None
    if not no_coap:
        from twin.runtime.coap_service import reserve_udp

        try:
            coap_addrs = (
                reserve_udp(coap_listen, 5683, "coap", "--coap-listen"),
                reserve_udp(coaps_listen, 5684, "coaps", "--coaps-listen") if coaps_listen else None,
            )
        except BaseException:
            listeners.close()
            raise
    opcua_addr = None
    if opcua_listen:
        from twin.runtime.mqtt_service import parse_hostport

        host, port = parse_hostport(opcua_listen, 4840)
        try:
            from twin.runtime.opcua_security import parse_policies

            parse_policies(opcua_security)  # a typo fails before anything starts
            opcua_addr = (host, _free_or_raise(host, port, "opcua server", "--opcua-listen"))
        except BaseException:
            listeners.close()
            raise
    # 2. then the registry and the apply
    reg = _registry(registry, state_dir)
    st = state
    if cluster is not None and getattr(reg, "dialect", "") != "postgresql":
        reg.close()
        listeners.close()
        from twin.errors import TwinError

        raise TwinError(
            f"--cluster {cluster}: cluster mode needs the PostgreSQL registry (this is {reg.url})",
            hint="run every engine with --registry postgresql://... on the same database",
        )
    try:
        from twin.files import private_dir

        private_dir(st.state_dir)  # 0700 whatever the registry (PostgreSQL: jwt.secret, mqtt/ ...)
        if path is not None:
            from twin.spec.apply import apply_specs

            loaded = load([path])
            result = apply_specs(
                reg, loaded, author=author(), message=message or f"twin up {path}", source="cli"
            )
            if result.revision is None:
                console.print(f"{path}: no changes (revision {result.base})")
            else:
                console.print(f"{path}: applied as revision {result.revision.number}")
    except BaseException:
        listeners.close()
        reg.close()
        raise
    from twin.control.service import ControlService

    services: list[Any] = []
    if cluster is not None:
        from twin.runtime.cluster import ClusterService

        api_addr = ""
        if listeners.api is not None:
            host, _, sock = listeners.api
            api_addr = f"http://{host or '127.0.0.1'}:{sock.getsockname()[1]}"
        # first: the share of devices and scenes is known before the others start
        services.append(ClusterService(cluster=cluster, ttl=cluster_ttl, api=api_addr))
    services.append(ControlService(webhooks=webhooks))  # commands, reconciliation, scenes
    if not no_timeseries:
        from twin.runtime.timeseries_service import TimeSeriesService

        services.append(TimeSeriesService(url=timeseries))
    from twin.edge.cloud import EdgeCloud

    services.append(EdgeCloud())  # edge uploads, link state (twin/edge/cloud.py)
    from twin.reports.service import ReportService

    services.append(ReportService(webhooks=webhooks))  # report schedules, alarm notifications
    if listeners.api is not None:
        host, port, sock = listeners.api
        services.append(ApiService(host, port, ApiSettings(state_dir=st.state_dir), sock=sock,
                                   certfile=certs[0], keyfile=certs[1]))  # fmt: skip
    if coap_addrs is not None:
        from twin.runtime.coap_service import CoapService

        services.append(CoapService(*coap_addrs))
    if opcua_addr is not None:
        from twin.runtime.opcua_service import OpcUaServerService

        services.append(OpcUaServerService(
            opcua_addr, policies=opcua_security.split(","), certificate_secret=opcua_certificate,
            key_secret=opcua_private_key, trust_dir=opcua_trust))
    if listeners.mqtt is not None:
        services.append(listeners.mqtt)
        if path is not None and not mqtt_broker:
            from twin.runtime.simulators import SimulatorService

            # the site's simulated MQTT devices (PATH/simulators/), logging in with device keys
            services.append(SimulatorService(path))
    from twin.runtime.modbus_server import ModbusServerService

    services.append(ModbusServerService())  # slave mode of the Sites that declare it
    if path is not None:
        from twin.runtime.modbus_simulators import ModbusSimulatorService

        # the site's simulated Modbus PLCs (PATH/simulators/*.yaml `modbus:`), polled by the
        # engine's modbus binding like real ones
        services.append(ModbusSimulatorService(path))
    from twin.video.onvif_events import OnvifEventsService

    services.append(OnvifEventsService())  # ONVIF cameras' PullPoint events -> device events
    if gb28181:
        from twin.video.gb28181.server import Gb28181Config
        from twin.video.gb28181.service import Gb28181Service, parse_listen

        gb_host, gb_port = parse_listen(gb28181)
        services.append(Gb28181Service(Gb28181Config(
            host=gb_host, port=gb_port, server_id=gb28181_id, realm=gb28181_id[:10],
            media_host=gb28181_media_host)))
    engine = Engine(reg, EngineConfig(state_dir=st.state_dir), services)
    dash: list[Any] = []
    dash_url = None
    if listeners.api is not None and listeners.dashboard is not None:
        # started before the engine's threads exist (it is forked); it reads the API's
        # address, which is bound already, and waits for it to answer
        from twin.cli.dashboard_cmds import start_dashboard

        host, port, sock = listeners.api
        api_host = "127.0.0.1" if host in ("", "0.0.0.0") else host
        proc, dash_url = start_dashboard(
            path, f"http://{api_host}:{sock.getsockname()[1]}", *listeners.dashboard
        )
        dash.append(proc)

    async def main() -> None:
        import trio

        from twin.runtime.gc_freeze import keep_frozen

        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            # the long-lived heap (modules, specs, stores) out of the collector's way: a full
            # collection scanned all of it, ~0.5 s every few seconds under MQTT load
            nursery.start_soon(keep_frozen, engine)
            info = engine.service_info.get("api")
            lines = _summary(engine, reg, st.state_dir, dash_url)
            if info:
                users = await trio.to_thread.run_sync(reg.users)
                if not users:
                    lines.append("  no users yet: twin user add admin --role admin")
            lines.append("Ctrl-C to stop.")
            console.print("\n".join(lines))

    def on_signal(signum: int) -> None:
        for proc in dash:  # stop the dashboard while the engine shuts down
            proc.send_signal(signal.SIGTERM)

    from twin.cli.signals import exit_now, run_until_signal

    stopped = False
    try:
        stopped = run_until_signal(main, on_signal=on_signal) is not None
    except KeyboardInterrupt:
        stopped = True
    finally:
        for proc in dash:
            proc.terminate()  # waits, kills a lingering streamlit
        reg.close()
    if stopped:
        console.print("stopped.")
        exit_now(0)  # every service has closed its files: skip the interpreter's slow teardown


def _summary(engine: Any, reg: Any, state_dir: Path, dashboard_url: str | None) -> list[str]:
    """The start-up banner: what runs, then where to reach it."""
    head = engine.revision
    lines = [
        f"FLUX IoT engine up — revision {engine.revision_number}"
        f" ({head.hash[:12] if head else 'empty: run twin apply PATH'}),"
        f" {len(engine.controller.tasks)} devices",
        f"  registry   {reg.url}",
        f"  state dir  {state_dir}",
    ]
    ts_info = engine.service_info.get("timeseries")
    if ts_info is not None:
        lines.append(f"  timeseries {ts_info.description}")
    info = engine.service_info.get("api")
    if info:
        lines += [
            f"  api        {info['url']}/api/v1   (docs {info['url']}/docs)",
            f"  openapi    {info['openapi']}",
            f"  websocket  {info['ws']}",
            f"  metrics    {info['metrics']}   (needs a token: Authorization: Bearer ...)",
        ]
    if dashboard_url:
        lines.append(f"  dashboard  {dashboard_url}")
    cl = engine.service_info.get("cluster")
    if cl is not None:
        lines.append(f"  cluster    {cl.cluster}: engine {cl.engine_name} (epoch {cl.epoch}), "
                     f"{len(cl.members)} live, owns {len(cl.held)} devices+scenes")
    mqtt_line = _describe_mqtt(engine.service_info.get("mqtt"))
    if mqtt_line:
        lines.append(f"  mqtt       {mqtt_line}")
    from twin.runtime.coap_service import describe as describe_coap

    coap_line = describe_coap(engine.service_info.get("coap"))
    if coap_line:
        lines.append(f"  coap       {coap_line}")
    from twin.runtime.opcua_service import describe as describe_opcua

    opcua_line = describe_opcua(engine.service_info.get("opcua-server"))
    if opcua_line:
        lines.append(f"  opc ua     {opcua_line}")
    sims = engine.service_info.get("simulators") or {}
    if sims.get("devices"):
        lines.append(f"  simulated  {', '.join(sims['devices'])} (MQTT clients logging in with "
                     f"device keys from {sims['keys']}/)")
    return lines


class _Listeners:
    """The sockets ``twin up`` bound before doing anything else."""

    def __init__(self) -> None:
        self.api: tuple[str, int, Any] | None = None
        self.mqtt: Any = None  # MqttService with its sockets bound
        self.dashboard: tuple[str, int] | None = None

    def close(self) -> None:
        if self.api is not None:
            self.api[2].close()
        for sock in getattr(getattr(self.mqtt, "config", None), "sockets", None) or []:
            sock.close()


def _bind_listeners(
    api: str | None,
    mqtt: Callable[[], Any] | None,
    mqtt_wss: list[str],
    dashboard: str | None,
) -> _Listeners:
    """Bind the API and MQTT listeners and check the ports of the MQTT WebSocket listeners and
    the dashboard (bound a moment later by the broker and streamlit); a taken one raises
    :class:`~twin.errors.PortInUseError` (one line + hint) with everything bound so far closed."""
    from twin.api.server import bind_socket, parse_listen

    out = _Listeners()
    try:
        if api is not None:
            host, port = parse_listen(api)
            out.api = (host, port, bind_socket(host, port))
        if mqtt is not None:
            out.mqtt = mqtt()
        for addr in mqtt_wss:
            from twin.runtime.mqtt_service import parse_hostport

            host, port = parse_hostport(addr, 8084)
            if port:
                _free_or_raise(host, port, "mqtt wss", "--mqtt-wss-listen")
        if dashboard is not None:
            host, port = parse_listen(dashboard)
            out.dashboard = (host, _free_or_raise(host, port, "dashboard", "--dashboard-listen"))
    except BaseException:
        out.close()
        raise
    return out


def _free_or_raise(host: str, port: int, what: str, option: str) -> int:
    """Check that ``host:port`` can be bound now (port 0: pick a free one); the port."""
    import errno
    import socket

    from twin.errors import PortInUseError

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                err = PortInUseError(host, port, what)
                err.hint = f"pick another with {option} HOST:PORT (port 0 picks a free one)"
                raise err from None
            raise TwinError(f"{what}: cannot listen on {host}:{port}: {exc.strerror or exc}",
                            hint=f"use an address of this machine with {option}") from None
        return int(sock.getsockname()[1])


def _describe_mqtt(info: Any) -> str | None:
    from twin.runtime.mqtt_service import describe

    return describe(info)


# -- device keys ---------------------------------------------------------------------------------
device_key = typer.Typer(help="HTTP ingest keys of devices (stored hashed).", no_args_is_help=True)


@device_key.command("create")
def key_create(device: Annotated[str, typer.Argument(help="Device name.")]) -> None:
    """Create (or rotate: create a new one, then revoke the old) a key; it is shown once."""
    from twin.api.auth import create_device_key

    reg = _registry()
    if ("Device", device) not in reg.specs():
        raise TwinError(
            f"no device {device!r} in the registry", hint="apply it first: twin apply PATH"
        )
    rec, key = create_device_key(reg, device)
    c = _console()
    c.print(f"key {rec.id} for {device} (shown once, store it on the device):")
    typer.echo(key)


@device_key.command("list")
def key_list(
    device: Annotated[
        str | None, typer.Argument(help="Device name (default: the keys of every device).")
    ] = None,
) -> None:
    """Keys of DEVICE (or of every device in the registry), revoked ones included."""
    from twin.cli import output

    reg = _registry()
    if device is not None:
        devices = [device]
        if ("Device", device) not in reg.specs() and not reg.device_keys(device):
            raise TwinError(f"no device {device!r} in the registry", hint="twin get devices")
    else:
        devices = sorted(n for (kind, n) in reg.specs() if kind == "Device")
    rows = [
        [k.id, k.device, _fmt_time(k.created_at),
         f"revoked {_fmt_time(k.revoked_at)}" if k.revoked_at else "active"]
        for d in devices
        for k in reg.device_keys(d)
    ]  # fmt: skip
    if not rows:
        _console().print("no device keys yet: twin device-key create DEVICE")
        return
    _console().print(output.rows_table(["key", "device", "created", "state"], rows))


@device_key.command("revoke")
def key_revoke(device: str, key_id: str) -> None:
    reg = _registry()
    if not any(k.id == key_id for k in reg.device_keys(device)):
        raise TwinError(
            f"no key {key_id!r} for device {device!r}", hint=f"twin device-key list {device}"
        )
    reg.revoke_device_key(key_id, time.time())
    _console().print(f"revoked {key_id}")


# -- users ------------------------------------------------------------------------------------------
user_app = typer.Typer(
    help="API users (roles viewer, operator, admin; optional site scopes).", no_args_is_help=True
)


@user_app.command("add")
def user_add(
    name: str,
    role: Annotated[str, typer.Option("--role", help="viewer | operator | admin")] = "viewer",
    site: Annotated[
        list[str] | None, typer.Option("--site", help="Limit to a site (repeatable).")
    ] = None,
    password: Annotated[
        str | None,
        typer.Option(
            "--password",
            envvar="TWIN_PASSWORD",
            help="The password (visible in the process list: prefer --password-stdin).",
        ),
    ] = None,
    password_stdin: Annotated[
        bool,
        typer.Option(
            "--password-stdin", help="Read the password from the first line of stdin (scripts)."
        ),
    ] = False,
) -> None:
    """Create or replace a user. The password is asked for twice on a terminal; scripts pipe
    it in with --password-stdin (at least 8 characters)."""
    import sys

    from twin.api.auth import make_user

    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif password is None:
        if not sys.stdin.isatty():
            raise TwinError(
                "no password given and no terminal to ask for one",
                hint=f"echo \"$PASSWORD\" | twin user add {name} --password-stdin ...",
            )
        password = getpass.getpass(f"password for {name}: ")
        if password != getpass.getpass("again: "):
            raise TwinError("the passwords differ")
    if len(password) < 8:
        raise TwinError("password too short", hint="use at least 8 characters")
    _registry().put_user(make_user(name, password, role, site or ()))
    _console().print(f"user {name} ({role}{', sites ' + ', '.join(site) if site else ''})")


@user_app.command("list")
def user_list() -> None:
    c = _console()
    for u in _registry().users():
        c.print(
            f"{u.name:20} {u.role:9} {','.join(u.sites) or '*':20} created {_fmt_time(u.created_at)}"
            + ("  disabled" if u.disabled else "")
        )


@user_app.command("delete")
def user_delete(name: str) -> None:
    """Delete a user with its sessions and tokens (a user added again later under the same
    name is another user: the old tokens stay dead)."""
    reg = _registry()
    if reg.get_user(name) is None:
        raise TwinError(f"no user {name!r}", hint="twin user list")
    reg.delete_user(name)
    _console().print(f"deleted {name}")


def _set_disabled(name: str, disabled: bool) -> None:
    if not _registry().set_user_disabled(name, disabled):
        raise TwinError(f"no user {name!r}", hint="twin user list")


@user_app.command("disable")
def user_disable(name: str) -> None:
    """Refuse the user's logins, tokens and MQTT connections (open ones close within 10 s)
    until `twin user enable`; its tokens are not revoked (see `twin token revoke --user`)."""
    _set_disabled(name, True)
    _console().print(f"disabled {name}")


@user_app.command("enable")
def user_enable(name: str) -> None:
    """Let a disabled user in again."""
    _set_disabled(name, False)
    _console().print(f"enabled {name}")


# -- tokens, sessions ---------------------------------------------------------------------------------
token_app = typer.Typer(
    help="API access tokens: long-lived ones for scripts (listed, revocable).",
    no_args_is_help=True,
)


@token_app.command("create")
def token_create(
    user: str,
    ttl: Annotated[str, typer.Option("--ttl", help="Lifetime, e.g. 1h, 30d.")] = "30d",
    note: Annotated[str, typer.Option("--note", help="What it is for (shown by list).")] = "",
) -> None:
    """Print an access token for USER (for scripts, TWIN_TOKEN, Prometheus); its id is on
    stderr and in `twin token list`, to revoke it with `twin token revoke ID`."""
    from twin.api.auth import create_api_token, load_secret
    from twin.spec.units import parse_duration

    reg = _registry()
    u = reg.get_user(user)
    if u is None:
        raise TwinError(f"no user {user!r}", hint=f"twin user add {user} --role viewer")
    rec, token = create_api_token(
        reg, load_secret(state.state_dir), u, ttl=parse_duration(ttl), note=note
    )
    typer.echo(f"token {rec.id} for {user}, expires {_fmt_time(rec.expires_at)}", err=True)
    typer.echo(token)


@token_app.command("list")
def token_list(user: Annotated[str | None, typer.Option("--user")] = None) -> None:
    """Long-lived tokens (from `twin token create`) and whether they still work."""
    c = _console()
    now = time.time()
    for t in _registry().api_tokens(user):
        if t.revoked_at:
            state = f"revoked {_fmt_time(t.revoked_at)}"
        elif t.expires_at <= now:
            state = f"expired {_fmt_time(t.expires_at)}"
        else:
            state = f"expires {_fmt_time(t.expires_at)}"
        c.print(f"{t.id}  {t.user:16} created {_fmt_time(t.created_at)}  {state}  {t.note}")


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[str | None, typer.Argument(help="A token id (twin token list).")] = None,
    user: Annotated[
        str | None,
        typer.Option("--user", help="Revoke every token and session of this user at once."),
    ] = None,
) -> None:
    """Revoke one long-lived token, or (--user) every token of a user: its logins' tokens and
    sessions too. A running API refuses them within 5 s, MQTT connections close within 10 s."""
    if (token_id is None) == (user is None):
        raise TwinError("give a token id or --user NAME (one of them)", hint="twin token list")
    reg = _registry()
    if user is not None:
        generation = reg.revoke_user_credentials(user, time.time())
        if generation is None:
            raise TwinError(f"no user {user!r}", hint="twin user list")
        _console().print(f"revoked every token of {user} (generation {generation})")
        return
    assert token_id is not None
    if not reg.revoke_api_token(token_id, time.time()):
        raise TwinError(f"no token {token_id!r}", hint="twin token list")
    _console().print(f"revoked {token_id}")


session_app = typer.Typer(help="Login sessions (refresh tokens).", no_args_is_help=True)


@session_app.command("list")
def session_list(user: Annotated[str | None, typer.Option("--user")] = None) -> None:
    c = _console()
    for s in _registry().sessions(user):
        state = (
            f"revoked {_fmt_time(s.revoked_at)}"
            if s.revoked_at
            else f"expires {_fmt_time(s.expires_at)}"
        )
        c.print(f"{s.id}  {s.user:16} {s.client:15} created {_fmt_time(s.created_at)}  {state}")


@session_app.command("revoke")
def session_revoke(session_id: str) -> None:
    reg = _registry()
    if reg.get_session(session_id) is None:
        raise TwinError(f"no session {session_id!r}", hint="twin session list")
    reg.revoke_session(session_id, time.time())
    _console().print(f"revoked {session_id}")


def register(app: typer.Typer) -> None:
    """Add ``up``, ``device-key``, ``user``, ``token`` and ``session`` to the main app."""
    app.command("up")(up)
    app.add_typer(device_key, name="device-key")
    app.add_typer(user_app, name="user")
    app.add_typer(token_app, name="token")
    app.add_typer(session_app, name="session")
    app.add_typer(cluster_app, name="cluster")


__all__ = ["register"]


# -- cluster ------------------------------------------------------------------------------------------
cluster_app = typer.Typer(
    help="Scale-out: engines sharing one PostgreSQL registry (twin up --cluster).",
    no_args_is_help=True,
)


@cluster_app.command("status")
def cluster_status(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The engines of the cluster (lease, load, epoch) and what each owns, read from the
    registry (works with every engine down)."""
    import json as _json

    from twin.registry.cluster import ClusterStore

    reg = _registry()
    store = ClusterStore(reg)
    store.ensure()
    members = store.members(include_dead=True)
    owners = store.owners()
    counts: dict[str, dict[str, int]] = {}
    for (kind, _name), (engine, _epoch) in owners.items():
        per = counts.setdefault(engine, {"Device": 0, "Scene": 0})
        per[kind] = per.get(kind, 0) + 1
    if as_json:
        doc = {
            "members": [m.to_json() | {"owns": counts.get(m.id, {})} for m in members],
            "owners": [
                {"kind": k, "name": n, "engine": e, "epoch": ep}
                for (k, n), (e, ep) in sorted(owners.items())
            ],
        }
        typer.echo(_json.dumps(doc, indent=2))
        return
    c = _console()
    if not members:
        c.print("no engines (start some with: twin up --cluster NAME --registry postgresql://...)")
        return
    now = time.time()
    from rich.table import Table

    table = Table("engine", "id", "epoch", "state", "lease", "devices", "scenes", "api")
    for m in members:
        own = counts.get(m.id, {})
        state = "live" if m.alive else "dead"
        table.add_row(
            m.name, m.id, str(m.epoch), state, f"{m.lease_until - now:+.1f}s",
            str(own.get("Device", 0)), str(own.get("Scene", 0)), m.api or "-",
        )  # fmt: skip
    c.print(table)
    free = [f"{k}/{n}" for (k, n), (e, _) in owners.items() if e not in {m.id for m in members}]
    if free:
        c.print(f"{len(free)} owned by engines gone from the table")
