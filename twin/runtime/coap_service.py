"""The engine's CoAP server (aiocoap on the asyncio bridge) for ``coap`` push devices.

The protocol (resources, payloads, device auth) is described in :mod:`twin.bindings.coap`.
Here: how it runs.

* aiocoap's server context lives on the bridge's asyncio thread (:mod:`twin.bindings.aio`);
  a resource decodes and bounds the request there, then hands it to Trio through the bridge's
  channel and awaits the answer (a ``concurrent.futures.Future`` the Trio side completes).
* On the Trio side one task per request (at most ``max_inflight`` at once; beyond that the
  request waits in the channel, and when the channel is full aiocoap's request times out
  with 5.03) checks the device key (the same ``DeviceKeyVerifier`` as HTTP ingest and MQTT),
  logs the readings in the write-ahead log, hands them to the device task, and only then
  answers 2.04.
* Observers of ``/d/{device}/cmd`` are notified from the Trio side whenever the device's
  desired values or pending commands change (:class:`twin.bindings.coap.CoapHub`).
* A push device with a ``codec`` (a Plugin): its bodies are not decoded as JSON/CBOR; the
  Trio side hands the raw bytes to the codec (a Starlark one in a thread). Every push body's
  readings then go through the device's transform (its own or its model's) *before* the
  write-ahead log, as HTTP ingest does: what is acknowledged is what is stored.
* ``listen`` is plain UDP (``coap://``); ``dtls_listen`` adds ``coaps://`` with DTLS-PSK
  (aiocoap's tinydtls server; needs the DTLSSocket package). A port that is taken is a
  :class:`~twin.errors.PortInUseError` (one line and a hint) at start.

Metrics (``/metrics``): ``twin_protocol_requests{binding="coap"}`` and friends
(:mod:`twin.bindings.protostats`), plus refusals per device (``twin_ingest_refused``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import trio
from aiocoap.resource import PathCapable

from twin.bindings import aio, protostats
from twin.bindings import plugins as plugin_edge
from twin.bindings.base import Reading
from twin.bindings.coap import (
    CT_CBOR,
    CT_JSON,
    MAX_PAYLOAD,
    CoapHub,
    PayloadError,
    attach_hub,
    decode_payload,
    detach_hub,
    encode_payload,
    ingest_messages,
)
from twin.bindings.http import DeviceNotRunning, IngestBusy, IngestError
from twin.bindings.values import ValueRefused, check_data
from twin.errors import PortInUseError, TwinError
from twin.runtime.timeseries_service import timeseries_of
from twin.timeseries.wal import WalError

if TYPE_CHECKING:
    from twin.runtime.engine import Engine

log = logging.getLogger(__name__)

ANSWER_TIMEOUT = 10.0  # seconds an asyncio-side request waits for the Trio side


@dataclass
class CoapRequest:
    """One request crossing from the asyncio side: what the Trio side needs, and the future
    it completes with ``(code, body)``."""

    kind: str  # "ingest" | "state" | "answer"
    device: str
    key: str | None
    claims: tuple[str, ...]
    body: Any
    future: concurrent.futures.Future[tuple[str, Any]] = field(
        default_factory=concurrent.futures.Future
    )
    size: int = 0
    started: float = field(default_factory=time.perf_counter)
    raw: bytes = b""  # the payload as received (a codec device's body)


@dataclass
class CoapStats:
    requests: int = 0
    errors: int = 0
    malformed: int = 0
    unauthorized: int = 0
    latency_sum: float = 0.0
    latency_count: int = 0


class CoapService:
    """Engine service (``twin up --coap-listen``)."""

    name = "coap"

    def __init__(
        self,
        listen: tuple[str, int] = ("127.0.0.1", 5683),
        dtls_listen: tuple[str, int] | None = None,
        *,
        max_inflight: int = 256,
    ) -> None:
        self.listen = listen
        self.dtls_listen = dtls_listen
        self.max_inflight = max_inflight
        self.hub = CoapHub()
        self.stats = CoapStats()
        self._proto = protostats.stats("coap")  # /metrics: twin_protocol_*{binding="coap"}
        self.server: _Server | None = None
        self.addresses: list[str] = []

    async def __call__(
        self, engine: Engine, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        from twin.registry.credentials import DeviceKeyVerifier

        keys = DeviceKeyVerifier(engine.registry)
        hub = self.hub
        push, receive = aio.channel(4096)
        server = _Server(push, hub.psk)
        self.server = server
        start: Callable[[], Any] = partial(server.start, self.listen, self.dtls_listen)
        stop: Callable[[], Any] = server.stop
        try:
            ports: list[str] = await aio.run(start)
        except OSError as exc:
            await aio.run(stop)
            if exc.errno == errno.EADDRINUSE:
                host, port = self.listen
                raise PortInUseError(host, port, "coap") from exc
            raise TwinError(f"coap: cannot listen on {self.listen}: {exc}") from exc
        self.addresses = ports
        changed: set[str] = set()
        wake = trio.Event()

        def on_change(device: str) -> None:
            nonlocal wake
            changed.add(device)
            wake.set()

        def on_attach() -> None:
            server.devices = hub.devices()  # read by /.well-known/core (a new list each time)
            server.codecs = hub.codecs()  # bodies not to decode as JSON/CBOR (a new dict)

        hub.on_change = on_change
        hub.on_attach = on_attach
        attach_hub(engine.runtime.binding_context, hub)
        limiter = trio.CapacityLimiter(self.max_inflight)
        try:
            async with trio.open_nursery() as nursery:

                async def notifier() -> None:
                    nonlocal wake
                    while True:
                        await wake.wait()
                        wake = trio.Event()
                        devices = list(changed)
                        changed.clear()
                        states = {d: hub.state(d) for d in devices}
                        await aio.run(partial(server.notify, states))

                async def sweeper() -> None:
                    while True:
                        await trio.sleep(keys.ttl / 2)
                        await trio.to_thread.run_sync(keys.sweep)

                async def handle(req: CoapRequest) -> None:
                    async with limiter:
                        answer = await self._handle(engine, keys, req)
                    self._done(req, answer)

                nursery.start_soon(notifier)
                nursery.start_soon(sweeper)
                task_status.started({"addresses": ports, "dtls": self.dtls_listen is not None})
                log.info("coap: listening on %s", ", ".join(ports))
                async with receive:
                    async for req in receive:
                        nursery.start_soon(handle, req)
        finally:
            hub.on_change = hub.on_attach = None
            detach_hub(engine.runtime.binding_context)
            with trio.move_on_after(5) as scope:
                scope.shield = True
                await aio.run(stop)

    def _done(self, req: CoapRequest, answer: tuple[str, Any]) -> None:
        elapsed = time.perf_counter() - req.started
        st = self.stats
        st.requests += 1
        st.latency_sum += elapsed
        st.latency_count += 1
        code = answer[0]
        if not code.startswith("2"):
            st.errors += 1
        proto = self._proto
        proto.requests += 1
        if not code.startswith("2"):
            proto.errors += 1
        proto.observe(elapsed)
        if not req.future.done():
            req.future.set_result(answer)

    def malformed(self) -> None:
        self.stats.malformed += 1
        self._proto.malformed += 1

    async def _authorized(self, keys: Any, req: CoapRequest) -> bool:
        if req.device in req.claims:  # DTLS-PSK: the session is the device's
            return True
        if not req.key:
            return False
        ok = keys.cached(req.device, req.key)
        if ok is None:
            ok = await trio.to_thread.run_sync(keys.verify, req.device, req.key)
        return bool(ok)

    async def _handle(self, engine: Engine, keys: Any, req: CoapRequest) -> tuple[str, Any]:
        """The Trio side of one request: ``(CoAP code, body)``."""
        hub = self.hub
        device = req.device
        codec = hub.codec(device) if req.kind == "ingest" else None
        if codec is not None and len(req.raw) > MAX_PAYLOAD:
            req.body = PayloadError("4.13", f"payload of {len(req.raw)} bytes (at most {MAX_PAYLOAD})")
        elif codec is not None:
            req.body = None  # the codec's business, not JSON's
        if isinstance(req.body, PayloadError):  # undecodable: counted and logged, after auth
            if not await self._authorized(keys, req):
                self.stats.unauthorized += 1
                return "4.01", {"detail": "invalid device key"}
            self.malformed()
            engine.prom.refused(device, "coap")
            log.warning("coap device %s: malformed payload dropped: %s", device, req.body)
            return req.body.code, {"detail": str(req.body)}
        if not await self._authorized(keys, req):
            self.stats.unauthorized += 1
            log.info("coap: request for %s refused: no valid device key", device)
            return "4.01", {"detail": "invalid device key (URI query k=, or coaps:// with the PSK)"}
        if not hub.running(device):
            return "4.04", {"detail": f"device {device!r} is not running with a coap push binding"}
        if req.kind == "state":
            return "2.05", hub.state(device)
        if req.kind == "answer":
            doc = req.body
            if not isinstance(doc, Mapping) or "id" not in doc:
                self.malformed()
                return "4.00", {"detail": "a command answer needs an 'id'"}
            try:
                check_data(doc, "command answer")
            except ValueRefused as exc:
                self.malformed()
                engine.prom.refused(device, "coap")
                return "4.00", {"detail": str(exc)}
            if not hub.respond(device, doc):
                return "4.04", {"detail": f"no pending command {doc.get('id')!r}"}
            return "2.04", {"ok": True}
        # readings
        now = engine.config.clock()
        messages: list[Any]
        try:
            if codec is not None:  # a failed decode is a bad reading, stored as such
                messages = list((await plugin_edge.decode_off_loop(codec, device, [req.raw], now))[0])
            else:
                messages = ingest_messages(device, req.body, now)
        except (IngestError, ValueError) as exc:
            self.malformed()
            engine.prom.refused(device, "coap")
            log.warning("coap device %s: payload refused: %s", device, exc)
            return "4.00", {"detail": str(exc)}
        transform = _transform_of(engine, device)
        if transform is not None:  # before the write-ahead log: what is logged is what is stored
            readings = [m for m in messages if isinstance(m, Reading)]
            if readings:
                rest = [m for m in messages if not isinstance(m, Reading)]
                messages = [*await plugin_edge.transform_off_loop(transform, readings), *rest]
        try:
            accepted = await self._hand_in(engine, device, messages)
        except WalError as exc:
            return "5.03", {"detail": f"readings not accepted, retry later: {exc}",
                            "max_age": exc.retry_after}
        except DeviceNotRunning:
            return "4.04", {"detail": f"device {device!r} is not running"}
        except IngestBusy:
            return "5.03", {"detail": "device queue full", "max_age": 1}
        hub.reported(device, messages)
        twin = engine.twin(device)
        if twin is not None:
            twin.metrics.bytes_in += req.size
        return "2.04", {"accepted": accepted}

    async def _hand_in(self, engine: Engine, device: str, messages: list[Any]) -> int:
        """Write-ahead log first (acknowledged means durable), then the device task.
        The same steps as HTTP ingest's ``twin.api.durable_ingest.hand_in``."""
        ingest = self.hub.ingest
        svc = timeseries_of(engine)
        readings = [m for m in messages if isinstance(m, Reading) and m.value is not None]
        if svc is None or svc.wal is None or not readings:
            return int(ingest.push(device, messages)["accepted"])
        ingest.check(device, len(messages))
        await svc.log_readings(readings)
        logged = [
            Reading(m.device, m.point, m.value, m.ts, m.quality, True)
            if isinstance(m, Reading) and m.value is not None
            else m
            for m in messages
        ]
        return int((await ingest.deliver(device, logged))["accepted"])


def _transform_of(engine: Engine, device: str) -> str | None:
    """The transform plugin of a push device (its own ``spec.transform``, else its model's)."""
    doc = engine.device_doc(device) or {}
    mname = (doc.get("spec") or {}).get("model")
    mdoc = engine.specs.get(("DeviceModel", mname)) if isinstance(mname, str) else None
    return plugin_edge.transform_of(doc, (mdoc or {}).get("spec"))


def reserve_udp(text: str, default_port: int, what: str, option: str) -> tuple[str, int]:
    """``HOST:PORT`` checked now (``twin up`` does it before applying anything): a taken port
    is a PortInUseError with a hint; port 0 becomes a free port."""
    import socket

    from twin.runtime.mqtt_service import parse_hostport

    host, port = parse_hostport(text, default_port)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                err = PortInUseError(host, port, what)
                err.hint = f"pick another with {option} HOST:PORT (port 0 picks a free one)"
                raise err from None
            raise TwinError(f"{what}: cannot listen on {host}:{port}: {exc.strerror or exc}",
                            hint=f"use an address of this machine with {option}") from None
        return host, int(sock.getsockname()[1])


def describe(info: Any) -> str | None:
    """The banner line of ``twin up``."""
    if not info:
        return None
    return "   ".join(info.get("addresses") or []) + "   (devices: /d/{device}?k=DEVICE_KEY)"


# -- the asyncio side ---------------------------------------------------------------------------
class _PskStore:
    """aiocoap's server credentials for DTLS-PSK: identity (device name) -> its key."""

    def __init__(self, psk: Mapping[str, bytes]) -> None:
        self.psk = psk

    def find_dtls_psk(self, identity: bytes) -> tuple[bytes, str]:
        name = identity.decode("utf-8", "replace")
        key = self.psk.get(name)
        if key is None:
            raise KeyError(name)
        return key, name

    def find_oscore(self, *args: Any) -> Any:  # aiocoap's interface
        raise KeyError("no OSCORE")

    def find_edhoc_by_id_cred_peer(self, *args: Any) -> Any:
        raise KeyError("no EDHOC")


class _Server:
    """Everything here runs on the asyncio thread."""

    def __init__(self, push: aio.Push[Any], psk: Mapping[str, bytes]) -> None:
        self.push = push
        self.psk = psk
        self.contexts: list[Any] = []
        self.devices: list[str] = []
        self.codecs: dict[str, str] = {}  # push devices whose bodies a codec decodes
        self.observers: dict[str, set[Any]] = {}
        self.states: dict[str, Any] = {}

    async def start(self, listen: tuple[str, int], dtls: tuple[str, int] | None) -> list[str]:
        from aiocoap import Context
        from aiocoap import resource as r

        site = r.Site()
        site.add_resource([".well-known", "core"], r.WKCResource(site.get_resources_as_linkheader))
        site.add_resource(["d"], _DeviceSite(self))
        out = []
        ctx = await Context.create_server_context(site, bind=listen, transports=["udp6"])
        self.contexts.append(ctx)
        out.append(f"coap://{_fmt(listen)}")
        if dtls is not None:
            # aiocoap's DTLS server adds (5684 - 5683) to the port it is given: undo that
            host, port = dtls
            ctx = await Context.create_server_context(
                site, bind=(host, port - 1), transports=["tinydtls_server"],
                server_credentials=_PskStore(self.psk),
            )  # fmt: skip
            self.contexts.append(ctx)
            out.append(f"coaps://{_fmt(dtls)}")
        return out

    async def stop(self) -> None:
        contexts, self.contexts = self.contexts, []
        for ctx in contexts:
            try:
                await asyncio.wait_for(ctx.shutdown(), 3)
            except (Exception, asyncio.CancelledError) as exc:
                log.debug("coap: shutdown: %s", exc)

    def notify(self, states: Mapping[str, Any]) -> None:
        for device, state in states.items():
            self.states[device] = state
            for obs in list(self.observers.get(device, ())):
                obs.trigger()


def _fmt(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _answer(code: str, body: Any, accept: int) -> Any:
    from aiocoap import Code, Message

    major, minor = (int(x) for x in code.split("."))
    msg = Message(code=Code((major << 5) | minor))
    if body is not None:
        if isinstance(body, dict) and "max_age" in body:
            msg.opt.max_age = int(body.pop("max_age"))
        if code.startswith("2"):
            msg.payload = encode_payload(body, accept)
            msg.opt.content_format = accept
        else:  # diagnostic payload (RFC 7252 5.5.2): text
            msg.payload = str(body.get("detail", body) if isinstance(body, dict) else body).encode()[:512]
    return msg


class _DeviceSite(PathCapable):
    """``/d/{device}`` and ``/d/{device}/cmd`` for every running push device."""

    def __init__(self, server: _Server) -> None:
        from aiocoap.blockwise import Block1Spool, Block2Cache

        self.server = server
        self._block1 = Block1Spool()  # RFC 7959: uploads assembled, long answers in blocks
        self._block2 = Block2Cache()

    # aiocoap's resource interface (PathCapable + ObservableResource)
    async def needs_blockwise_assembly(self, request: Any) -> bool:
        return True

    def get_resources_as_linkheader(self) -> Any:
        from aiocoap.util.linkformat import Link, LinkFormat

        links = []
        for device in self.server.devices:
            links.append(Link(f"/{device}", rt="flux.readings", ct="50 60", title=device))
            links.append(Link(f"/{device}/cmd", rt="flux.commands", ct="50 60", obs=None))
        return LinkFormat(links)

    async def render_to_pipe(self, pipe: Any) -> Any:
        from aiocoap import interfaces

        return await interfaces.ObservableResource._render_to_pipe(self, pipe)

    @staticmethod
    def _route(request: Any) -> tuple[str, str] | None:
        path = tuple(request.opt.uri_path)
        if len(path) == 1 and path[0]:
            return path[0], "device"
        if len(path) == 2 and path[0] and path[1] == "cmd":
            return path[0], "cmd"
        return None

    async def add_observation(self, request: Any, serverobservation: Any) -> None:
        route = self._route(request)
        if route is None or route[1] != "cmd":
            return
        device = route[0]
        observers = self.server.observers.setdefault(device, set())
        observers.add(serverobservation)

        def cancel() -> None:
            observers.discard(serverobservation)

        serverobservation.accept(cancel)

    async def render(self, request: Any) -> Any:
        from aiocoap import Code, error

        route = self._route(request)
        if route is None:
            raise error.NotFound()
        device, what = route
        method = request.code
        if what == "device" and method in (Code.POST, Code.PUT):
            kind = "ingest"
        elif what == "cmd" and method in (Code.GET, Code.FETCH):
            kind = "state"
        elif what == "cmd" and method in (Code.POST, Code.PUT):
            kind = "answer"
        else:
            raise error.UnallowedMethod()
        key = None
        for q in request.opt.uri_query:
            if q.startswith("k="):
                key = q[2:]
        claims: tuple[str, ...] = ()
        with contextlib.suppress(AttributeError, NotImplementedError):
            claims = tuple(str(c) for c in (request.remote.authenticated_claims or ()))
        ct = request.opt.content_format
        accept = request.opt.accept
        if accept not in (CT_JSON, CT_CBOR):
            accept = CT_CBOR if ct == CT_CBOR and accept is None else CT_JSON
        body: Any = None
        if kind != "state" and not (kind == "ingest" and device in self.server.codecs):
            try:
                body = decode_payload(request.payload, None if ct is None else int(ct))
            except PayloadError as exc:
                body = exc  # decided on the Trio side (after the key check)
        req = CoapRequest(kind, device, key, claims, body, size=len(request.payload),
                          raw=bytes(request.payload))
        self.server.push(req)
        try:
            code, answer = await asyncio.wait_for(asyncio.wrap_future(req.future), ANSWER_TIMEOUT)
        except TimeoutError:
            req.future.cancel()
            return _answer("5.03", {"detail": "engine busy", "max_age": 1}, accept)
        return _answer(code, answer, accept)
