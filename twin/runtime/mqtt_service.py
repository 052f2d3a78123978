"""The engine's MQTT service: the embedded broker, or a client of an external broker.

``Engine(registry, config, services=[MqttService(MqttServiceConfig(...))])``

* **embedded** (default): a :class:`~twin.mqtt.broker.Broker` on ``listen`` (default
  127.0.0.1:1883; port 0 = any free port), with device/user authentication and per-device
  ACLs from the running spec (:class:`~twin.runtime.mqtt_auth.RegistryAuth`), persistence in
  ``<state dir>/mqtt``. The engine itself talks to it **in-process** through a
  :class:`~twin.mqtt.local.LocalClient` (no TCP, no codec, no auth on that path).
* **external**: a paho-mqtt client driven from Trio (:class:`~twin.mqtt.paho_trio.PahoTransport`)
  to ``broker_host:broker_port`` with a persistent session, reconnecting with backoff.
  ``share_group`` makes this engine subscribe through ``$share/<group>/...`` so several engines
  behind one (clustered) broker split device traffic between them.

Acknowledged means durable: on the embedded broker, a device's publish with QoS >= 1 whose
readings the engine stores is acknowledged (PUBACK / PUBREC) only once those readings are in the
time-series service's write-ahead log (:func:`durability_hook`, ``Broker.durability``). With an
external broker the acknowledgement to the device is that broker's business: it acknowledges
before the engine sees the message (the engine's own subscription is a persistent QoS 1
session, so the broker keeps what the engine has not received).

Either way one :class:`~twin.mqtt.hub.MqttHub` serves every ``mqtt`` device binding: it is
attached to the engine's binding context (:func:`twin.bindings.mqtt.attach_hub`) and exposed as
``engine.mqtt``. A device whose status topic / Last Will says ``offline`` is marked offline at
once (the device task's heartbeat deadline is disarmed until the next message).

Broker and hub statistics, failed authentications and denied publishes/subscribes are exported
on the engine's /metrics (``twin_mqtt_*``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from twin.errors import PortInUseError, TwinError
from twin.files import private_dir

log = logging.getLogger(__name__)

MQTT_PORT_HINT = (
    "another MQTT broker (often Mosquitto) holds it: pick another with --mqtt-listen HOST:PORT "
    "(port 0 picks a free one), or use that broker with --mqtt-broker HOST:PORT"
)


def parse_hostport(text: str, default_port: int = 1883) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        return text or "127.0.0.1", default_port
    host = host.strip("[]") or "127.0.0.1"
    try:
        return host, int(port)
    except ValueError:
        raise TwinError(
            f"bad address {text!r}", hint="use HOST:PORT, e.g. 127.0.0.1:1883 (port 0: any free)"
        ) from None


def bind_listener(
    host: str, port: int, what: str = "mqtt", hint: str = MQTT_PORT_HINT
) -> socket.socket:
    """Bind and listen now; a taken port is one :class:`PortInUseError` with an MQTT hint."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            err = PortInUseError(host, port, what)
            err.hint = hint
            raise err from None
        raise TwinError(
            f"{what}: cannot listen on {host}:{port}: {exc.strerror or exc}",
            hint="use an address of this machine, e.g. --mqtt-listen 127.0.0.1:0",
        ) from None
    sock.setblocking(False)
    sock.listen(1024)
    return sock


@dataclass
class MqttServiceConfig:
    mode: str = "embedded"  # embedded | external
    # embedded broker
    listen: list[tuple[str, int]] = field(default_factory=lambda: [("127.0.0.1", 1883)])
    sockets: list[socket.socket] = field(default_factory=list)  # pre-bound (see bind_listener)
    tls_listen: list[tuple[str, int]] = field(default_factory=list)
    wss_listen: list[tuple[str, int]] = field(default_factory=list)  # MQTT over secure WebSocket
    ssl_context: ssl.SSLContext | None = None
    max_keep_alive: int = 0  # cap on clients' keep-alive (0: theirs)
    server_topic_aliases: bool = False  # see BrokerConfig.server_topic_aliases
    state_dir: Path | None = None  # default: <engine state dir>/mqtt; persistence off if False
    persist: bool = True
    allow_anonymous: bool = False
    max_connections_per_address: int = 100_000
    sys_interval: float = 10.0
    revalidate_interval: float = 5.0  # re-check open connections (revoked: closed within 10 s)
    # external broker
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    username: str | None = None
    password: str | None = None
    client_id: str | None = None
    protocol: int = 5
    broker_tls: ssl.SSLContext | None = None
    share_group: str | None = None


class _MqttCollector(Collector):
    def __init__(self, service: MqttService) -> None:
        self.service = service

    def collect(self) -> Iterator[Any]:
        svc = self.service
        hub = svc.hub
        if hub is not None:
            hs = hub.stats
            c = CounterMetricFamily(
                "twin_mqtt_hub_messages", "Messages through the engine hub", labels=["direction"]
            )
            c.add_metric(["in"], hs.received)
            c.add_metric(["out"], hs.published)
            c.add_metric(["unrouted"], hs.unrouted)
            yield c
            yield GaugeMetricFamily(
                "twin_mqtt_hub_routes", "Topic routes of device bindings", value=hs.routes
            )
            yield CounterMetricFamily(
                "twin_mqtt_offline_events",
                "Devices marked offline by status/Last Will",
                value=hs.offline_events,
            )
        auth = svc.auth
        if auth is not None:
            yield CounterMetricFamily(
                "twin_mqtt_auth_failures",
                "Rejected MQTT connections (bad credentials)",
                value=auth.stats["auth_failed"],
            )
            d = CounterMetricFamily(
                "twin_mqtt_denied", "MQTT operations denied by ACL", labels=["action"]
            )
            d.add_metric(["publish"], auth.stats["denied_publish"])
            d.add_metric(["subscribe"], auth.stats["denied_subscribe"])
            yield d
            yield CounterMetricFamily(
                "twin_mqtt_revoked_disconnects",
                "Open MQTT connections closed because their credentials were revoked",
                value=auth.stats["revoked"],
            )
        b = svc.broker
        if b is not None:
            st = b.stats
            yield GaugeMetricFamily(
                "twin_mqtt_clients_connected", "Connected MQTT clients", value=st.clients_connected
            )
            m = CounterMetricFamily("twin_mqtt_broker_messages", "Broker messages", labels=["kind"])
            m.add_metric(["received"], st.messages_received)
            m.add_metric(["sent"], st.messages_sent)
            m.add_metric(["dropped"], st.messages_dropped)
            yield m
            yield CounterMetricFamily(
                "twin_mqtt_protocol_errors",
                "Connections closed for protocol errors",
                value=st.protocol_errors,
            )
            yield CounterMetricFamily(
                "twin_mqtt_payload_refused",
                "MQTT 5 publishes refused with PUBACK/PUBREC 0x99 (values the engine refuses)",
                value=st.payload_refused,
            )
            yield CounterMetricFamily(
                "twin_mqtt_connections_refused",
                "Connections refused by limits",
                value=st.connections_refused,
            )
        t = svc.transport
        if t is not None and hasattr(t, "connects"):
            yield GaugeMetricFamily(
                "twin_mqtt_external_connected",
                "Connected to the external broker",
                value=1 if t.connected else 0,
            )
            yield CounterMetricFamily(
                "twin_mqtt_external_reconnects",
                "Connections lost to the external broker",
                value=t.disconnects,
            )


def default_client_id(state_dir: Any) -> str:
    """Stable across restarts (the broker keeps our persistent session), distinct for two
    engines on one host (same id = they would keep taking each other's session over)."""
    import zlib

    path = str(Path(state_dir).resolve())
    return f"flux-engine-{socket.gethostname()}-{zlib.crc32(path.encode()):08x}"


def mark_offline(engine: Any, device: str, reason: str) -> None:
    """Mark a device offline now (its Last Will / status topic said so)."""
    from twin.runtime.state import Status

    task = engine.controller.tasks.get(device)
    if task is None:
        return
    twin = task.twin
    task.deadline = math.inf  # the watchdog re-arms on the next message (DeviceTask._seen)
    if twin.maintenance:
        return
    mon = engine.monitor
    setter = getattr(mon, "offline", None)  # a public hook, if the runtime grows one
    if setter is not None:
        setter(twin, reason)
    else:
        mon._set(twin, Status.OFFLINE, reason)


class RefusalReporter:
    """``hub.on_refused``: a device's message was refused at the edge (bad values). Counted per
    device on /metrics (``twin_ingest_refused_total{edge,device}``) and in the device's error
    count, logged at most once per device every ``log_every`` seconds (a device sending garbage
    in a loop must not flood the log)."""

    def __init__(self, engine: Any, edge: str, log_every: float = 60.0) -> None:
        self.engine = engine
        self.edge = edge
        self.log_every = log_every
        self._logged: dict[str, tuple[float, int]] = {}

    def __call__(self, device: str, reason: str) -> None:
        self.engine.prom.refused(device, self.edge)
        twin = self.engine.twin(device)
        if twin is not None:
            twin.metrics.errors += 1
        now = time.monotonic()
        last, skipped = self._logged.get(device, (-math.inf, 0))
        if now - last < self.log_every:
            self._logged[device] = (last, skipped + 1)
            return
        self._logged[device] = (now, 0)
        more = f" (+{skipped} more since the last report)" if skipped else ""
        site = twin.site if twin is not None else ""
        log.warning(
            "device %s (site %s): %s message refused: %s%s", device, site, self.edge, reason, more
        )


class MqttService:
    """An engine service (``async def service(engine, *, task_status)``)."""

    name = "mqtt"

    def __init__(self, config: MqttServiceConfig | None = None) -> None:
        self.config = config or MqttServiceConfig()
        self.broker: Any = None
        self.hub: Any = None
        self.auth: Any = None
        self.transport: Any = None

    async def __call__(
        self,
        engine: Any,
        *,
        task_status: trio.TaskStatus[dict[str, Any]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        from twin.bindings.mqtt import attach_hub, detach_hubs
        from twin.mqtt.hub import EmbeddedTransport, MqttHub, in_message

        cfg = self.config
        context = engine.runtime.binding_context
        collector = _MqttCollector(self)
        engine.prom.registry.register(collector)
        try:
            async with trio.open_nursery() as nursery:
                info: dict[str, Any] = {"mode": cfg.mode}
                if cfg.mode == "external":
                    from twin.mqtt.paho_trio import PahoTransport

                    transport: Any = PahoTransport(
                        cfg.broker_host,
                        cfg.broker_port,
                        client_id=cfg.client_id or default_client_id(engine.config.state_dir),
                        username=cfg.username,
                        password=cfg.password,
                        tls=cfg.broker_tls,
                        protocol=cfg.protocol,
                    )
                    info["broker"] = f"{cfg.broker_host}:{cfg.broker_port}"
                    info["share_group"] = cfg.share_group
                else:
                    self.broker = self._make_broker(engine)
                    addrs = await nursery.start(self.broker.run)
                    if cfg.sockets:  # closed with this run: a restart binds the same ports
                        cfg.sockets, cfg.listen = [], list(addrs)
                    nursery.start_soon(self.auth.revalidate, self.broker, cfg.revalidate_interval)
                    info["addresses"] = [f"{h}:{p}" for h, p in addrs]
                    info["url"] = f"mqtt://{addrs[0][0]}:{addrs[0][1]}" if addrs else None
                    info["tls"] = [f"{h}:{p}" for h, p in self.broker.tls_addresses]
                    info["wss"] = [f"wss://{h}:{p}" for h, p in self.broker.wss_addresses]
                    transport = EmbeddedTransport(self.broker)
                self.transport = transport
                self.hub = hub = MqttHub(transport, share_group=cfg.share_group)
                transport.hub = hub
                hub.on_offline = lambda device, reason: mark_offline(engine, device, reason)
                hub.on_refused = RefusalReporter(engine, "mqtt")
                if self.broker is not None:  # MQTT 5 QoS >= 1: refuse in the PUBACK (0x99)
                    self.broker.payload_check = lambda _principal, msg: hub.check(in_message(msg))
                    # QoS >= 1: PUBACK / PUBREC only once the readings are in the WAL
                    self.broker.durability = durability_hook(engine, hub)
                    # what arrived together is decoded together (codec plugins: one call)
                    self.broker.prefetch = prefetch_hook(self.broker, hub, partial(_logs, engine))
                await nursery.start(transport.run)
                if cfg.mode == "external":
                    info["connected"] = transport.connected
                attach_hub(context, hub, "external" if cfg.mode == "external" else "embedded")
                engine.mqtt = hub
                log.info("mqtt: %s", info)
                task_status.started(info)
        finally:
            detach_hubs(context)
            with contextlib.suppress(KeyError):
                engine.prom.registry.unregister(collector)

    def _make_broker(self, engine: Any) -> Any:
        from twin.mqtt.broker import Broker, BrokerConfig
        from twin.runtime.mqtt_auth import RegistryAuth

        cfg = self.config
        state_dir = None
        if cfg.persist:
            state_dir = str(cfg.state_dir or Path(engine.config.state_dir) / "mqtt")
            private_dir(state_dir)
        self.auth = RegistryAuth(
            engine.registry, lambda: engine.specs, allow_anonymous=cfg.allow_anonymous
        )
        bconf = BrokerConfig(
            listen=cfg.listen,
            tls_listen=cfg.tls_listen,
            wss_listen=cfg.wss_listen,
            ssl_context=cfg.ssl_context,
            max_keep_alive=cfg.max_keep_alive,
            server_topic_aliases=cfg.server_topic_aliases,
            state_dir=state_dir,
            sys_interval=cfg.sys_interval,
            max_connections_per_address=cfg.max_connections_per_address,
            port_hint=MQTT_PORT_HINT,
        )
        broker = Broker(
            bconf,
            authenticate=self.auth.authenticate,
            authorize=self.auth.authorize,
            sockets=cfg.sockets,
        )
        return broker


def durability_hook(engine: Any, hub: Any) -> Any:
    """The embedded broker's ``Broker.durability`` for this engine: a publish with QoS >= 1
    whose readings the engine stores is put into the time-series service's write-ahead log
    before the broker acknowledges it (PUBACK / PUBREC wait for the group commit). Refused
    with 0x97 (quota exceeded) when the log's disk is full or too much is waiting for the
    store, 0x80 on other write errors (an MQTT 3.1.1 client is disconnected instead, and
    publishes again). With an external broker the acknowledgement to the device is that
    broker's business (it has already acknowledged when the engine sees the message)."""
    import dataclasses

    from twin.bindings.base import Reading
    from twin.mqtt.hub import in_message
    from twin.runtime.timeseries_service import timeseries_of
    from twin.timeseries.wal import WalBusy, WalError, WalFull

    _set_logged = object.__setattr__  # Reading is frozen (see the hook)

    def code(exc: WalError) -> int:
        return 0x97 if isinstance(exc, WalFull | WalBusy) else 0x80

    class Durable:
        """The held acknowledgement's gate: ``poll`` answers at once once the group commit
        settled (the broker then needs no Trio checkpoint per acknowledgement); awaiting it
        waits for the commit, then — back-pressure — while the store is behind the log
        (``TimeSeriesService.caught_up``): the device's window of un-acked messages fills
        and it publishes no faster than the store takes readings, so the publish →
        queryable lag stays bounded instead of growing under saturation."""

        __slots__ = ("batch", "svc")

        def __init__(self, svc: Any, batch: Any) -> None:
            self.svc, self.batch = svc, batch

        def poll(self) -> int | None:
            batch = self.batch
            if not batch.done.is_set():
                return None
            if batch.error is not None:
                return code(batch.error)
            return None if self.svc.behind() else 0

        async def __call__(self) -> int:
            svc = self.svc
            try:
                await svc.wal.commit(self.batch)
            except WalError as exc:
                return code(exc)
            await svc.caught_up()
            return 0

    def hook(_principal: Any, msg: Any) -> Any:
        svc = timeseries_of(engine)
        if svc is None or svc.wal is None:
            return None
        readings = hub.readings(in_message(msg))
        try:
            batch = svc.append_readings(readings)
        except WalError as exc:
            log.warning("mqtt: publish on %s refused: %s", msg.topic, exc)
            return code(exc)
        if batch is None:
            return None
        # marked as logged (the store takes them from the log, not from the bus). In place:
        # these readings were made for this publish and are now in the log's batch, so the
        # mark is true wherever they are referenced; building a frozen Reading again per
        # reading cost ~0.9 us (a few % of the engine at 40k readings/s)
        logged = []
        for r in readings:
            if r.value is not None:
                if type(r) is Reading:
                    _set_logged(r, "logged", True)
                else:
                    r = dataclasses.replace(r, logged=True)
            logged.append(r)
        return dataclasses.replace(msg, logged=logged), Durable(svc, batch)

    return hook


def _logs(engine: Any) -> bool:
    """Whether the durability hook logs readings (decodes payloads) before the ack."""
    from twin.runtime.timeseries_service import timeseries_of

    svc = timeseries_of(engine)
    return svc is not None and svc.wal is not None


def prefetch_hook(broker: Any, hub: Any, reader_decodes: Callable[[], bool]) -> Any:
    """The embedded broker's ``Broker.prefetch``: the QoS >= 1 publishes of one socket read
    that this connection may publish are decoded together by their devices' codecs
    (:meth:`MqttHub.prefetch`) before the durability hook asks for their readings one by one
    — when it does (``reader_decodes``: a write-ahead log; without one they are decoded where
    they are delivered). QoS 0 ones are batched where they are delivered (the engine's
    LocalClient drains its queue in one turn)."""
    from twin.mqtt.hub import InMessage

    def hook(principal: Any, pubs: list[Any]) -> Any:
        if not reader_decodes():
            return None
        msgs = [InMessage(p.topic, p.payload, p.qos, bool(p.retain)) for p in pubs
                if broker.authorize(principal, "publish", p.topic)]
        pairs = hub.prefetch(msgs) if len(msgs) > 1 else []
        return partial(hub.forget, pairs) if pairs else None

    return hook


def cli_service(
    listen: str = "127.0.0.1:1883",
    broker: str | None = None,
    *,
    share_group: str | None = None,
    username: str | None = None,
    password: str | None = None,
    wss_listen: list[str] | None = None,
    tls_listen: list[str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    max_keep_alive: int = 0,
    server_topic_aliases: bool = False,
) -> MqttService:
    """The MQTT service for ``twin up``: the embedded broker on ``listen`` (bound now, so a
    taken port fails before anything starts), or a client of the external ``broker``.
    ``wss_listen`` needs ``ssl_context``."""
    if broker:
        host, port = parse_hostport(broker)
        return MqttService(
            MqttServiceConfig(
                mode="external",
                broker_host=host,
                broker_port=port,
                share_group=share_group,
                username=username,
                password=password,
            )
        )
    host, port = parse_hostport(listen)
    wss = [parse_hostport(x, 8084) for x in wss_listen or []]
    tls = [parse_hostport(x, 8883) for x in tls_listen or []]
    if (wss or tls) and ssl_context is None:
        raise TwinError("--mqtt-wss-listen and --mqtt-tls-listen need --mqtt-certfile and "
                        "--mqtt-keyfile")  # fmt: skip
    sock = bind_listener(host, port)
    return MqttService(MqttServiceConfig(
        listen=[(host, port)], sockets=[sock], wss_listen=wss, tls_listen=tls,
        ssl_context=ssl_context,
        max_keep_alive=max_keep_alive, server_topic_aliases=server_topic_aliases))


def describe(info: dict[str, Any] | None) -> str | None:
    """One line for the ``twin up`` banner."""
    if not info:
        return None
    wss = "".join(f", {u}" for u in info.get("wss") or [])
    wss += "".join(f", mqtts://{a}" for a in info.get("tls") or [])
    if info.get("mode") == "external":
        state = "connected" if info.get("connected") else "connecting (retrying with backoff)"
        share = f", shared group {info['share_group']}" if info.get("share_group") else ""
        return f"external broker {info.get('broker')} ({state}{share})"
    return (
        f"{info.get('url')}{wss}   (embedded broker; devices: user = device name, "
        "password = device key)"
    )
