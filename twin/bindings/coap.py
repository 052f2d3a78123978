"""The ``coap`` binding: constrained devices that talk CoAP (RFC 7252) with the engine.

Two modes:

* ``push`` (default): the device is a CoAP *client* of the engine's CoAP server
  (:mod:`twin.runtime.coap_service`, ``twin up --coap-listen``). It POSTs/PUTs readings, fetches
  and observes its commands and desired values, and answers commands.
* ``poll`` / ``observe``: the device is a CoAP *server*; the engine GETs ``url`` every
  ``interval`` (poll) or observes it (RFC 7641: the device pushes every change), PUTs writes to
  ``write_url`` and POSTs commands to ``command_url``. Read quality when polling: a poll
  that fails re-reports the last good values as ``stale`` (then the device reconnects with
  backoff); a value whose own ``ts`` is older than ``interval`` x 3 is ``stale``; a point
  missing from the answer or refused is ``bad``.

```yaml
binding:
  coap: {}                                   # push, device key in the URI query
binding:
  coap: {mode: push, psk: {secret: plant-a/meter-7-psk}}   # + DTLS-PSK (coaps://)
binding:
  coap: {mode: observe, url: "coap://10.0.0.31/sensors", interval: 30s,
         points: {temperature: {path: t}}, write_url: "coap://10.0.0.31/config",
         command_url: "coap://10.0.0.31/cmd", timeout: 5s}
binding:
  coap: {codec: acme-th8}                    # push: the body is the device's own binary frame
binding:
  coap: {mode: observe, url: "coap://10.0.0.31/frame", codec: acme-th8,
         command_url: "coap://10.0.0.31/cmd"}
```

**Codec** (``codec``: a Plugin with role codec, instead of ``format`` and ``points``): the
payload is the device's own format, any Content-Format. Push: each POST/PUT body to
``/d/{device}`` is one payload for the codec's ``decode`` (then the device's transform, then
the write-ahead log, then 2.04). Poll/observe: each answer or notification is one payload;
notifications that arrive together are decoded in one plugin call. Commands to
``command_url`` are the codec's ``encode`` of ``{name, params}`` (Content-Format 42); the
answer is JSON/CBOR if it is, else ``{"payload": hex}``. A codec that fails gives a ``bad``
reading (``payload``), never a stalled binding.

Push protocol (resources of the engine's server; payloads JSON, Content-Format 50, or CBOR, 60;
the answer uses the request's Accept, else its Content-Format, else JSON)::

    POST|PUT /d/{device}?k={device key}     readings -> 2.04 {"accepted": n}
        body: the HTTP ingest body ({"readings": [...], "values": {...}, "events": [...],
        "heartbeat": true, "ts": ...}) or simply {point: value, ..., "ts": ...}
    GET /d/{device}/cmd?k=...  (Observe)    -> 2.05 {"desired": {point: value},
                                                     "commands": [{"id", "name", "params"}]}
                                               a notification whenever that changes
    POST /d/{device}/cmd?k=...              {"id": ..., "status": "success" | "failure" |
                                             "executing", "result": ..., "error": "..."}
    GET /.well-known/core                   every running push device's two resources

**Device auth.** Over plain CoAP the device key (the same ``dk_...`` key as HTTP ingest and
MQTT, ``twin device-key create``) is the URI query ``k=``; it crosses the network in clear
text, so use it on trusted networks only. Over ``coaps://`` (DTLS 1.2 PSK, ``twin up
--coaps-listen``) the PSK identity is the device name and the key is the device's ``psk``
secret: the DTLS session itself authenticates the device, no ``k=`` needed.

Acknowledged means durable: the 2.04 to a POST is sent only after its readings are in the
write-ahead log (5.03 with Max-Age when the log cannot take them). A malformed payload, a
value refused by :mod:`twin.bindings.values`, an unknown content format: 4.00 / 4.15 with a
diagnostic payload, logged with the device and counted (``/metrics``), never passed inward.
Block-wise transfer (RFC 7959) works both ways (aiocoap assembles Block1 uploads and serves
long answers in Block2). Desired values stay in the observed state until the device reports the
same value; a command is answered by the device (``success`` / ``failure``) or fails after
``command_timeout``.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from twin.bindings import aio
from twin.bindings import plugins as plugin_edge
from twin.bindings.base import (
    STALE_AFTER,
    BindingContext,
    Message,
    Quality,
    Reading,
)
from twin.bindings.http import IngestError, IngestHub, parse_ingest
from twin.bindings.payload import extract as _extract
from twin.bindings.polling import PollOptions, poll_forever
from twin.bindings.registry import register_binding
from twin.bindings.values import ValueRefused, check_data, check_shape, check_value
from twin.errors import BindingConnectError, BindingError, BindingTimeout, CommandError
from twin.spec.bindings import binding_schema
from twin.spec.units import parse_duration

log = logging.getLogger(__name__)

COAP_SCHEMA: dict[str, Any] = binding_schema("coap")
"""JSON Schema of ``spec.binding.coap``: specs/binding-coap.schema.json, the one source."""

CT_TEXT = 0
CT_OCTETS = 42
CT_JSON = 50
CT_CBOR = 60
MAX_PAYLOAD = 64 * 1024  # one assembled request body
INGEST_KEYS = frozenset({"readings", "values", "heartbeat", "events", "ts"})
FINAL_OK = {"success", "succeeded", "ok", "done", "completed"}
FINAL_FAIL = {"failure", "failed", "error", "rejected", "timeout"}


class PayloadError(ValueError):
    """A payload that cannot be taken: ``code`` is the CoAP answer (4.00, 4.13, 4.15)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


# -- payloads -------------------------------------------------------------------------------
def decode_payload(payload: bytes, content_format: int | None) -> Any:
    """JSON (50, or no Content-Format) or CBOR (60), bounded; PayloadError otherwise."""
    if len(payload) > MAX_PAYLOAD:
        raise PayloadError("4.13", f"payload of {len(payload)} bytes (at most {MAX_PAYLOAD})")
    if not payload:
        return {}
    if content_format in (None, CT_JSON, CT_TEXT):
        try:
            doc = json.loads(payload)
        except RecursionError:
            raise PayloadError("4.00", "JSON nested too deeply") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise PayloadError("4.00", f"not JSON: {exc}") from None
    elif content_format == CT_CBOR:
        import cbor2

        try:
            doc = cbor2.loads(payload)
        except RecursionError:
            raise PayloadError("4.00", "CBOR nested too deeply") from None
        except (cbor2.CBORError, ValueError, EOFError, TypeError, OverflowError, MemoryError) as exc:
            raise PayloadError("4.00", f"not CBOR: {type(exc).__name__}: {exc}") from None
        doc = _plain(doc)
    else:
        raise PayloadError("4.15", f"content format {content_format} (use 50 JSON or 60 CBOR)")
    return doc


def _plain(v: Any, depth: int = 0) -> Any:
    """CBOR's extra types as JSON-like values (tags, byte strings, undefined)."""
    if depth > 64:
        raise PayloadError("4.00", "CBOR nested too deeply")
    if v is None or isinstance(v, bool | int | float | str):
        return v
    if isinstance(v, bytes | bytearray):
        return bytes(v).hex()
    if isinstance(v, list | tuple):
        return [_plain(x, depth + 1) for x in v]
    if isinstance(v, Mapping):
        return {str(k) if not isinstance(k, str) else k: _plain(x, depth + 1) for k, x in v.items()}
    tag_value = getattr(v, "value", None)
    if tag_value is not None and hasattr(v, "tag"):
        return _plain(tag_value, depth + 1)
    return str(v)[:256]


def encode_payload(obj: Any, content_format: int) -> bytes:
    if content_format == CT_CBOR:
        import cbor2

        return bytes(cbor2.dumps(obj))
    return json.dumps(obj, separators=(",", ":"), default=str).encode()


def ingest_messages(device: str, body: Any, now: float) -> list[Message]:
    """The messages of one POST body: the HTTP ingest body, or the shorthand ``{point: value,
    "ts": ...}``. Raises IngestError (4.00) naming the point for anything refused."""
    if isinstance(body, Mapping) and body and not (set(body) - {"ts"}) & INGEST_KEYS:
        try:
            check_shape(body, "body")
        except ValueRefused as exc:
            raise IngestError(str(exc)) from None
        ts = body.get("ts")
        values = {k: v for k, v in body.items() if k != "ts"}
        body = {"values": values} if ts is None else {"values": values, "ts": ts}
    elif not isinstance(body, Mapping):
        raise IngestError("body must be an object (JSON or CBOR map)")
    return parse_ingest(device, body, now)


# -- the engine's side of push devices --------------------------------------------------------
@dataclass
class _Slot:
    send: trio.MemorySendChannel[Message]
    psk: bytes | None = None
    desired: dict[str, Any] = field(default_factory=dict)
    commands: dict[str, dict[str, Any]] = field(default_factory=dict)
    waiters: dict[str, trio.MemorySendChannel[dict[str, Any]]] = field(default_factory=dict)
    codec: str | None = None


class CoapHub:
    """Push devices' state, on the Trio side: the CoAP service delivers readings and command
    answers here, the bindings queue writes and commands here. ``on_change(device)`` (set by
    the service) is called whenever a device's observed state changed; ``on_attach`` when the
    set of running devices changed."""

    def __init__(self) -> None:
        self.ingest = IngestHub()  # queue / check / deliver of readings to device tasks
        self._slots: dict[str, _Slot] = {}
        self.psk: dict[str, bytes] = {}  # identity (device name) -> key; read by the DTLS side
        self.on_change: Callable[[str], None] | None = None
        self.on_attach: Callable[[], None] | None = None

    def devices(self) -> list[str]:
        return sorted(self._slots)

    def running(self, device: str) -> bool:
        return device in self._slots

    def codecs(self) -> dict[str, str]:
        """Running devices whose payloads a codec decodes (their bodies are not JSON/CBOR)."""
        return {d: s.codec for d, s in self._slots.items() if s.codec is not None}

    def codec(self, device: str) -> str | None:
        slot = self._slots.get(device)
        return slot.codec if slot is not None else None

    def attach(self, device: str, send: trio.MemorySendChannel[Message], psk: bytes | None,
               codec: str | None = None) -> None:
        self._slots[device] = _Slot(send, psk, codec=codec)
        self.ingest.attach(device, send)
        if psk:
            self.psk[device] = psk
        if self.on_attach is not None:
            self.on_attach()

    def detach(self, device: str, send: trio.MemorySendChannel[Message]) -> None:
        slot = self._slots.get(device)
        if slot is None or slot.send is not send:
            return
        del self._slots[device]
        self.psk.pop(device, None)
        self.ingest.detach(device, send)
        for ch in slot.waiters.values():
            ch.close()
        if self.on_attach is not None:
            self.on_attach()

    def state(self, device: str) -> dict[str, Any] | None:
        slot = self._slots.get(device)
        if slot is None:
            return None
        return {"desired": dict(slot.desired), "commands": list(slot.commands.values())}

    def _changed(self, device: str) -> None:
        if self.on_change is not None:
            self.on_change(device)

    def _slot(self, device: str) -> _Slot:
        slot = self._slots.get(device)
        if slot is None:
            raise BindingConnectError(f"coap device {device!r} is not connected")
        return slot

    def queue_write(self, device: str, point: str, value: Any) -> None:
        self._slot(device).desired[point] = value
        self._changed(device)

    def reported(self, device: str, readings: list[Message]) -> None:
        """Readings the device sent: a desired value it now reports is done."""
        slot = self._slots.get(device)
        if slot is None or not slot.desired:
            return
        done = [
            r.point
            for r in readings
            if isinstance(r, Reading)
            and r.point in slot.desired
            and slot.desired[r.point] == r.value
        ]
        for p in done:
            del slot.desired[p]
        if done:
            self._changed(device)

    async def command(
        self,
        device: str,
        name: str,
        params: Mapping[str, Any],
        wait: float,
        command_id: str | None = None,
        progress: Callable[[str, Mapping[str, Any]], None] | None = None,
    ) -> Any:
        slot = self._slot(device)
        cid = command_id or uuid.uuid4().hex[:16]
        send, recv = trio.open_memory_channel[dict[str, Any]](8)
        slot.commands[cid] = {"id": cid, "name": name, "params": dict(params)}
        slot.waiters[cid] = send
        self._changed(device)
        try:
            with trio.move_on_after(wait):
                async for doc in recv:
                    status = str(doc.get("status", "success")).lower()
                    if status in FINAL_OK:
                        return doc.get("result")
                    if status in FINAL_FAIL:
                        err = doc.get("error") or doc.get("message") or status
                        raise CommandError(f"coap device {device!r}: command {name!r} {status}: {err}")
                    if progress is not None:
                        progress(status, doc)
                raise BindingConnectError(f"coap device {device!r} went away during {name!r}")
            raise CommandError(
                f"coap device {device!r}: command {name!r} got no answer within {wait:g}s",
                hint=f"the device should POST its answer to /d/{device}/cmd",
            )
        finally:
            slot.commands.pop(cid, None)
            slot.waiters.pop(cid, None)
            send.close()
            self._changed(device)

    def respond(self, device: str, doc: Mapping[str, Any]) -> bool:
        """A command answer from the device; False when no such command is pending."""
        slot = self._slots.get(device)
        ch = slot.waiters.get(str(doc.get("id"))) if slot is not None else None
        if ch is None:
            return False
        try:
            ch.send_nowait(dict(doc))
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True


_HUBS: dict[int, tuple[Any, CoapHub]] = {}


def attach_hub(context: Any, hub: CoapHub) -> None:
    """Make ``hub`` reachable for bindings built with ``context`` (the CoAP service does it)."""
    _HUBS[id(context)] = (context, hub)


def detach_hub(context: Any) -> None:
    _HUBS.pop(id(context), None)


def hub_for(context: Any) -> CoapHub | None:
    entry = _HUBS.get(id(context))
    return entry[1] if entry is not None and entry[0] is context else None


# -- the binding ---------------------------------------------------------------------------
class CoapBinding:
    protocol = "coap"

    def __init__(
        self,
        device: str,
        options: Mapping[str, Any],
        context: BindingContext | None = None,
    ) -> None:
        self.device = device
        self.options = options
        self.context = context or BindingContext()
        o = PollOptions.parse(options, zero_interval=10.0)
        self.mode, self.url, self.write_url, self.command_url = (
            o.mode, o.url, o.write_url, o.command_url)  # fmt: skip
        self.interval, self.timeout, self.points = o.interval, o.timeout, o.points
        self.command_timeout = parse_duration(options.get("command_timeout", "30s")) or 30.0
        self.format = CT_CBOR if options.get("format") == "cbor" else CT_JSON
        self.codec: str | None = options.get("codec")  # a Plugin (role codec) decodes payloads
        self._clock: Callable[[], float] = self.context.clock or time.time
        self._ctx: Any = None  # aiocoap client context (asyncio thread)
        self.refused = 0
        self.requests = 0
        self.last: dict[str, Any] = {}  # point -> last good value (re-reported stale)

    # -- push ------------------------------------------------------------------------------
    def _hub(self) -> CoapHub:
        hub = hub_for(self.context)
        if hub is None:
            raise BindingConnectError(
                f"coap device {self.device!r}: no CoAP server in this engine",
                hint="twin up starts it (--coap-listen HOST:PORT)",
            )
        return hub

    def _psk(self) -> bytes | None:
        ref = self.options.get("psk")
        if ref is None:
            return None
        from twin.spec.secrets import Secrets, env_name

        name = str(ref.get("secret")) if isinstance(ref, Mapping) else str(ref)
        value = Secrets().get(name)
        if value is None:
            raise BindingError(
                f"coap device {self.device!r}: secret {name!r} (psk) is not set",
                hint=f"export {env_name(name)}=... or add it to the secrets file",
            )
        return value.encode()

    async def connect(self) -> None:
        if self.mode == "push":
            with trio.move_on_after(15):
                while hub_for(self.context) is None:  # noqa: ASYNC110 - set by another service
                    await trio.sleep(0.02)
            self._hub()
            return
        from aiocoap import Context

        self._ctx = await self._run(Context.create_client_context, what="client context")

    async def close(self) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            with trio.move_on_after(3) as scope:
                scope.shield = True
                await aio.run(ctx.shutdown)

    async def subscribe(self, send: trio.MemorySendChannel[Message]) -> None:
        if self.mode == "push":
            hub = self._hub()
            hub.attach(self.device, send, self._psk(), self.codec)
            try:
                await trio.sleep_forever()
            finally:
                hub.detach(self.device, send)
        if self.mode == "observe":
            await self._observe(send)
        await poll_forever(self.device, self.read, send, self.interval, self._clock,
                           on_error=self._stale)  # fmt: skip

    async def write(self, point: str, value: Any) -> None:
        if self.mode == "push":
            self._hub().queue_write(self.device, point, value)
            await trio.lowlevel.checkpoint()
            return
        if not self.write_url:
            raise BindingError(f"coap device {self.device!r}: no write_url configured")
        await self._request("PUT", str(self.write_url), {point: value})

    async def send_command(
        self,
        name: str,
        params: Mapping[str, Any],
        *,
        command_id: str | None = None,
        progress: Callable[[str, Mapping[str, Any]], None] | None = None,
    ) -> Any:
        if self.mode == "push":
            return await self._hub().command(
                self.device, name, params, self.command_timeout, command_id, progress
            )
        if not self.command_url:
            raise CommandError(f"coap device {self.device!r}: no command_url configured")
        if self.codec is not None and plugin_edge.can_encode(self.codec):
            frame = await plugin_edge.encode_off_loop(self.codec, {"name": name, "params": dict(params)})
            if frame is None:
                raise CommandError(f"coap device {self.device!r}: codec {self.codec!r} could not "
                                   f"encode command {name!r}")
            try:
                _, answer = await self._request("POST", str(self.command_url), frame=frame)
            except BindingError as exc:
                raise CommandError(str(exc)) from exc
            return answer
        try:
            _, doc = await self._request(
                "POST", str(self.command_url), {"name": name, "params": dict(params)}
            )
        except BindingError as exc:
            raise CommandError(str(exc)) from exc
        return doc

    # -- client modes (the device is a CoAP server) ----------------------------------------
    async def _run(self, factory: Callable[[], Any], *, what: str) -> Any:
        from aiocoap import error as coap_error

        try:
            with trio.fail_after(self.timeout * 2 + 1):
                return await aio.run(factory)
        except trio.TooSlowError as exc:
            raise BindingTimeout(f"coap device {self.device!r}: {what} timed out") from exc
        except (coap_error.NetworkError, OSError) as exc:
            raise BindingConnectError(f"coap device {self.device!r}: {what}: {exc}") from exc
        except coap_error.Error as exc:
            raise BindingError(f"coap device {self.device!r}: {what}: {exc}") from exc

    async def _request(self, method: str, url: str, body: Any = None, *,
                       frame: bytes | None = None, raw: bool = False) -> tuple[str, Any]:
        """``(code, answer)``: the answer decoded (JSON/CBOR), or its bytes with ``raw``.
        ``frame``: a codec's bytes to send as they are (Content-Format 42)."""
        import asyncio

        from aiocoap import Code
        from aiocoap import Message as CoapMessage

        ctx = self._ctx
        if ctx is None:
            raise BindingConnectError(f"coap device {self.device!r}: not connected")
        if frame is not None:
            payload = frame
        else:
            payload = b"" if body is None else encode_payload(body, self.format)
        msg = CoapMessage(code=getattr(Code, method), uri=url, payload=payload)
        if frame is not None:
            msg.opt.content_format = CT_OCTETS
        elif body is not None:
            msg.opt.content_format = self.format
        self.requests += 1

        async def go() -> Any:
            return await asyncio.wait_for(ctx.request(msg).response, self.timeout)

        resp = await self._run(go, what=f"{method} {url}")
        code = str(resp.code)
        if not resp.code.is_successful():
            text = resp.payload.decode("utf-8", "replace")[:200]
            raise BindingError(f"coap device {self.device!r}: {method} {url} -> {code} {text}")
        if raw:
            return code, bytes(resp.payload)
        try:
            return code, decode_payload(resp.payload, resp.opt.content_format)
        except PayloadError as exc:
            if frame is not None:  # a codec device's answer to a command: its own bytes
                return code, {"payload": bytes(resp.payload).hex()}
            self.refused += 1
            raise BindingError(f"coap device {self.device!r}: {method} {url}: {exc}") from exc

    def _readings(self, doc: Any, now: float) -> list[Reading]:
        if not isinstance(doc, Mapping):
            doc = {"value": doc}
        out = []
        wanted = self.points or {k: k for k, v in doc.items() if k != "ts"}
        ts = now
        raw_ts = doc.get("ts")
        if isinstance(raw_ts, int | float) and not isinstance(raw_ts, bool) and math.isfinite(raw_ts):
            ts = float(raw_ts) / 1000.0 if raw_ts > 1e11 else float(raw_ts)
        # a polled device that answers with a value older than a few poll intervals is
        # repeating what it had, not observing
        quality = (Quality.STALE if self.mode == "poll" and now - ts > STALE_AFTER * self.interval
                   else Quality.GOOD)  # fmt: skip
        for point, path in wanted.items():
            try:
                value = check_value(_extract(doc, path), point)
            except KeyError:
                out.append(Reading(self.device, point, None, now, Quality.BAD))
                continue
            except ValueRefused as exc:
                self.refused += 1
                log.warning("coap device %s: %s (dropped)", self.device, exc)
                out.append(Reading(self.device, point, None, now, Quality.BAD))
                continue
            if isinstance(value, dict | list):
                try:
                    check_data({"v": value}, point)
                except ValueRefused:
                    continue
            if quality is Quality.GOOD:
                self.last[point] = value
            out.append(Reading(self.device, point, value, ts, quality))
        return out

    def _stale(self) -> list[Reading]:
        """The last good values again, flagged stale (a poll failed)."""
        now = self._clock()
        return [Reading(self.device, p, v, now, Quality.STALE) for p, v in self.last.items()]

    async def read(self, points: list[str] | None = None) -> list[Reading]:
        if self.mode == "push":
            await trio.lowlevel.checkpoint()
            return []
        assert self.url is not None
        if self.codec is not None:
            _, payload = await self._request("GET", str(self.url), raw=True)
            (readings,) = await plugin_edge.decode_off_loop(self.codec, self.device, [payload],
                                                            self._clock())
            return readings if points is None else [r for r in readings if r.point in points]
        _, doc = await self._request("GET", str(self.url))
        readings = self._readings(doc, self._clock())
        return readings if points is None else [r for r in readings if r.point in points]

    async def _observe(self, send: trio.MemorySendChannel[Message]) -> None:
        """Observe ``url``; each notification is a set of readings. The observation ending
        (the server dropped it, a non-2.xx notification) is a temporary error."""
        from aiocoap import Code
        from aiocoap import Message as CoapMessage

        ctx = self._ctx
        url = str(self.url)
        push, receive = aio.channel(1024)

        async def a_observe() -> None:
            req = ctx.request(CoapMessage(code=Code.GET, uri=url, observe=0))
            first = await req.response
            push(first)
            async for resp in req.observation:
                push(resp)

        async def pump() -> None:
            observe: Callable[[], Any] = a_observe
            try:
                await aio.run(observe)
            finally:
                push.close()

        async with trio.open_nursery() as nursery, receive:
            nursery.start_soon(pump)
            async for resp in receive:
                if not resp.code.is_successful():
                    raise BindingConnectError(
                        f"coap device {self.device!r}: observation of {url} ended: {resp.code}"
                    )
                if self.codec is not None:  # what arrived together: one plugin call
                    await self._decode_notifications(resp, receive, send)
                    continue
                try:
                    doc = decode_payload(resp.payload, resp.opt.content_format)
                except PayloadError as exc:
                    self.refused += 1
                    log.warning("coap device %s: notification dropped: %s", self.device, exc)
                    continue
                readings = self._readings(doc, self._clock())
                for r in readings:
                    await send.send(r)
            raise BindingConnectError(f"coap device {self.device!r}: observation of {url} ended")

    async def _decode_notifications(self, first: Any, receive: trio.MemoryReceiveChannel[Any],
                                    send: trio.MemorySendChannel[Message]) -> None:
        """``first`` and the notifications queued behind it, decoded by the codec in one call
        (a non-2.xx one ends the observation after the ones before it are passed on)."""
        assert self.codec is not None
        payloads = [bytes(first.payload)]
        ended = None
        while len(payloads) < 1000:
            try:
                resp = receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            if not resp.code.is_successful():
                ended = resp
                break
            payloads.append(bytes(resp.payload))
        decoded = await plugin_edge.decode_off_loop(self.codec, self.device, payloads, self._clock())
        for readings in decoded:
            for r in readings:
                await send.send(r)
        if ended is not None:
            raise BindingConnectError(
                f"coap device {self.device!r}: observation of {self.url} ended: {ended.code}"
            )


def _factory(
    device: str, options: Mapping[str, Any], doc: Mapping[str, Any], context: BindingContext
) -> CoapBinding:
    return CoapBinding(device, options, context)


register_binding("coap", _factory)
