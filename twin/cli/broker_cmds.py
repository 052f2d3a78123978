"""``twin broker``: run the MQTT broker alone (no engine).

Authentication is the engine's (device keys and users of the registry, per-device ACLs from the
registry's head revision, refreshed every 2 s) unless ``--no-auth``; as in ``twin up``, open
connections are re-checked every 5 s, so a revoked key, a deleted device, a deleted or disabled
user is refused and disconnected within 10 s. Listeners are bound
before anything starts, so a taken port is one line with a hint; port 0 picks a free port and
the real address is printed (``mqtt 127.0.0.1:PORT``, one line per listener).
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Annotated, Any

import typer

from twin.cli.state import state
from twin.errors import TwinError


def broker(
    listen: Annotated[
        list[str] | None,
        typer.Option("--listen", help="MQTT listener HOST:PORT (repeatable; port 0: any free)."),
    ] = None,
    tls_listen: Annotated[
        list[str] | None, typer.Option("--tls-listen", help="MQTT over TLS HOST:PORT.")
    ] = None,
    ws_listen: Annotated[
        list[str] | None, typer.Option("--ws-listen", help="MQTT over WebSocket HOST:PORT.")
    ] = None,
    wss_listen: Annotated[
        list[str] | None,
        typer.Option("--wss-listen", help="MQTT over secure WebSocket HOST:PORT (needs --certfile)."),
    ] = None,
    certfile: Annotated[
        Path | None, typer.Option("--certfile", help="Server certificate (PEM).")
    ] = None,
    keyfile: Annotated[Path | None, typer.Option("--keyfile", help="Server key (PEM).")] = None,
    cafile: Annotated[
        Path | None,
        typer.Option("--cafile", help="Require client certificates from this CA (mutual TLS)."),
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option("--state-dir", help="Persistence (default: <twin state dir>/mqtt)."),
    ] = None,
    no_persist: Annotated[bool, typer.Option("--no-persist", help="Keep nothing on disk.")] = False,
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="Accept anyone, allow everything (testing only).")
    ] = False,
    allow_anonymous: Annotated[
        bool, typer.Option("--allow-anonymous", help="Accept clients without credentials.")
    ] = False,
    fsync_interval: Annotated[float, typer.Option("--fsync-interval")] = 1.0,
    max_connections: Annotated[
        int, typer.Option("--max-connections", help="Connections overall.")
    ] = 100_000,
    max_per_address: Annotated[
        int,
        typer.Option("--max-connections-per-address", help="Connections per client address."),
    ] = 100_000,
    max_queued: Annotated[
        int, typer.Option("--max-queued", help="Per-session queue bound.")
    ] = 1000,
    sys_interval: Annotated[
        float, typer.Option("--sys-interval", help="$SYS period, 0: off.")
    ] = 10.0,
    max_keep_alive: Annotated[
        int,
        typer.Option("--max-keep-alive", help="Cap clients' keep-alive at this many seconds "
                     "(MQTT 5 clients are told: server keep alive); 0: accept theirs."),
    ] = 0,
    server_topic_aliases: Annotated[
        bool,
        typer.Option("--server-topic-aliases", help="Send topic aliases to MQTT 5 clients that "
                     "allow them (libmosquitto clients fail on them)."),
    ] = False,
    log_level: Annotated[str, typer.Option("--log-level")] = "warning",
) -> None:
    """Run the MQTT 3.1.1/5.0 broker alone until Ctrl-C or SIGTERM."""
    import trio

    from twin.mqtt.broker import Broker, BrokerConfig
    from twin.runtime.mqtt_service import bind_listener, parse_hostport

    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.WARNING),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        force=True,
    )
    plain = [parse_hostport(x) for x in (listen or ["127.0.0.1:1883"])]
    hint = (
        "another MQTT broker (often Mosquitto) holds it: pick another with --listen HOST:PORT "
        "(port 0 picks a free one)"
    )
    tls = [parse_hostport(x, 8883) for x in (tls_listen or [])]
    ws = [parse_hostport(x, 8083) for x in (ws_listen or [])]
    wss = [parse_hostport(x, 8084) for x in (wss_listen or [])]
    ctx = None
    if tls or wss:
        ctx = server_ssl_context(certfile, keyfile, cafile, "--tls-listen / --wss-listen")
    sockets = [bind_listener(h, p, hint=hint) for h, p in plain]  # taken: one line + hint
    persist_dir = None if no_persist else str(state_dir or state.state_dir / "mqtt")
    if persist_dir:
        from twin.files import private_dir

        private_dir(persist_dir)
    config = BrokerConfig(
        listen=plain,
        tls_listen=tls,
        ws_listen=ws,
        wss_listen=wss,
        ssl_context=ctx,
        max_keep_alive=max_keep_alive,
        server_topic_aliases=server_topic_aliases,
        state_dir=persist_dir,
        fsync_interval=fsync_interval,
        max_queued=max_queued,
        sys_interval=sys_interval,
        max_connections=max_connections,
        max_connections_per_address=max_per_address,
        port_hint=hint.replace("--listen", "--tls-listen / --ws-listen / --wss-listen"),
    )
    kw: dict[str, Any] = {}
    reg = None
    auth = None
    holder: dict[str, Any] = {"specs": {}}
    if not no_auth:
        from twin.runtime.mqtt_auth import RegistryAuth

        reg = state.registry()
        auth = RegistryAuth(reg, lambda: holder["specs"], allow_anonymous=allow_anonymous)
        kw = {"authenticate": auth.authenticate, "authorize": auth.authorize}
    b = Broker(config, sockets=sockets, **kw)

    async def refresh_specs() -> None:
        last = None
        while True:
            head = await trio.to_thread.run_sync(reg.head)  # type: ignore[union-attr]
            if head is not None and head.number != last:
                holder["specs"] = await trio.to_thread.run_sync(reg.specs, head.number)  # type: ignore[union-attr]
                last = head.number
            await trio.sleep(2)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            if reg is not None:
                holder["specs"] = await trio.to_thread.run_sync(reg.specs)
                nursery.start_soon(refresh_specs)
            addrs = await nursery.start(b.run)
            if auth is not None:
                nursery.start_soon(auth.revalidate, b)
            for h, p in addrs:
                typer.echo(f"mqtt {h}:{p}")
            for h, p in b.tls_addresses:
                typer.echo(f"mqtts {h}:{p}")
            for h, p in b.ws_addresses:
                typer.echo(f"{'wss' if config.ws_tls else 'ws'} {h}:{p}")
            for h, p in b.wss_addresses:
                typer.echo(f"wss {h}:{p}")
            typer.echo(
                "auth: " + ("none (--no-auth)" if no_auth else "registry device keys and users")
            )

    from twin.cli.signals import run_until_signal

    try:
        if run_until_signal(main) is not None:  # Ctrl-C or SIGTERM: a clean stop, exit 0
            typer.echo("stopped.")
    except KeyboardInterrupt:
        typer.echo("stopped.")
    finally:
        if reg is not None:
            reg.close()


def server_ssl_context(
    certfile: Path | None, keyfile: Path | None, cafile: Path | None, what: str
) -> ssl.SSLContext:
    """The broker's TLS context (for TLS and secure WebSocket listeners); ``cafile``: mutual TLS."""
    if certfile is None or keyfile is None:
        raise TwinError(f"{what} needs a certificate and its key (--certfile and --keyfile)")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(str(certfile), str(keyfile))
        if cafile is not None:
            ctx.load_verify_locations(str(cafile))
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise TwinError(f"cannot load the TLS certificate: {exc}") from exc
    return ctx


def register(app: typer.Typer) -> None:
    app.command("broker")(broker)


__all__ = ["register"]
