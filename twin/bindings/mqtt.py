"""The ``mqtt`` binding: devices that talk MQTT (to the embedded broker or an external one).

```yaml
binding:
  mqtt: {}                       # everything by convention (below), JSON payloads
binding:
  mqtt:
    broker: embedded             # default; or the name of an external broker connection
    prefix: "plant/{site}/{device}"
    topics: {telemetry: "sensors/{device}/+", command: "cmd/{device}"}
    format: raw                  # json (default) | raw (a number) | string
    fields: {temperature: data.t}  # json: point -> dotted path (default: every scalar field)
    qos: 1                       # subscriptions and what the engine publishes (default 1)
    retain: false                # retain flag of what the engine publishes (desired values)
    command_timeout: 30s
```

Topic convention (each topic may be overridden in ``topics``; ``{site}`` and ``{device}`` are
substituted, a device without a site uses ``_``)::

    flux/{site}/{device}/telemetry          device → engine   readings (reported state)
    flux/{site}/{device}/state              device → engine   reported state / heartbeat
    flux/{site}/{device}/events             device → engine   {"type": "fault"|"ok"|"event", ...}
    flux/{site}/{device}/status             device → engine   "online" | "offline" (retained;
                                                              set it as the Last Will)
    flux/{site}/{device}/command            engine → device   command requests
    flux/{site}/{device}/command/response   device → engine   command responses
    flux/{site}/{device}/desired            engine → device   {"point": value} writes

Payloads: with ``format: json`` a telemetry/state object gives one reading per scalar field
(nested objects flattened with dots; ``fields`` selects and renames), ``"ts"`` (unix seconds, or
milliseconds) is the timestamp; a bare JSON scalar is one value. ``raw`` is a number (or
true/false), ``string`` is text. Which point a bare value belongs to: the level matched by the
last ``+`` of the telemetry topic (``sensors/{device}/+`` → ``sensors/d1/temperature``), else
``point`` (default ``value``). Retained telemetry is ignored (it may be old) unless
``retained: true``; a retained ``status`` is always used.

Any message from the device counts as a heartbeat; ``status: offline`` (the device's Last Will)
marks it offline at once through the engine's hub.

Commands (``send_command``)::

    request   {"id": "<command id>", "name": "reboot", "params": {...},
               "response_topic": "<topic>"}         + MQTT 5: response topic, correlation data
    response  {"id": "<command id>", "status": "executing" | "success" | "failure",
               "result": ..., "error": "..."}       MQTT 5 devices may instead echo the
                                                    correlation data and omit "id"

``send_command`` returns on ``success`` (the ``result``), raises
:class:`~twin.errors.CommandError` on ``failure`` or when no final answer comes within
``command_timeout``; ``executing`` is reported through the optional ``progress`` callback.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import trio

from twin.bindings import plugins as plugin_edge
from twin.bindings.base import (
    BindingContext,
    DeviceEvent,
    EventType,
    Message,
    Quality,
    Reading,
)
from twin.bindings.payload import extract as _extract
from twin.bindings.registry import register_binding
from twin.bindings.values import (
    INT64_MAX,
    INT64_MIN,
    ValueRefused,
    check_data,
    check_reading,
    check_shape,
    check_ts,
)
from twin.errors import BindingConnectError, BindingError, CommandError
from twin.plugins import registry as plugins_registry

if TYPE_CHECKING:
    from twin.mqtt.hub import InMessage, MqttHub, Route

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "flux/{site}/{device}"
TOPIC_SUFFIX = {
    "telemetry": "telemetry",
    "state": "state",
    "events": "events",
    "status": "status",
    "command": "command",
    "response": "command/response",
    "desired": "desired",
}
DEVICE_PUBLISHES = ("telemetry", "state", "events", "status", "response")
DEVICE_SUBSCRIBES = ("command", "desired")
OFFLINE_WORDS = {"offline", "disconnected", "dead", "lost", "false", "0"}
ONLINE_WORDS = {"online", "connected", "alive", "true", "1"}
FINAL_OK = {"success", "succeeded", "ok", "done", "completed"}
FINAL_FAIL = {"failure", "failed", "error", "rejected", "timeout"}


# -- hubs: how a binding finds the engine's MQTT connection ---------------------------------------
_HUBS: dict[int, tuple[Any, dict[str, MqttHub]]] = {}


def attach_hub(context: Any, hub: MqttHub, name: str = "embedded", *, default: bool = True) -> None:
    """Make ``hub`` reachable for bindings built with ``context`` (done by the engine service)."""
    entry = _HUBS.setdefault(id(context), (context, {}))
    entry[1][name] = hub
    if default:
        entry[1]["default"] = hub


def detach_hubs(context: Any) -> None:
    _HUBS.pop(id(context), None)


def hub_for(context: Any, name: str | None) -> MqttHub | None:
    entry = _HUBS.get(id(context))
    if entry is None or entry[0] is not context:
        return None
    hubs = entry[1]
    if not name or (name == "embedded" and "embedded" not in hubs):
        return hubs.get("default")
    return hubs.get(name)


# -- topics -------------------------------------------------------------------------------------
def device_topics(device: str, site: str | None, options: Mapping[str, Any]) -> dict[str, str]:
    """Every topic of a device after substitution (used by the binding and by the ACLs)."""
    subst = {"site": site or "_", "device": device}
    prefix = str(options.get("prefix") or DEFAULT_PREFIX)
    given = options.get("topics") or {}
    out = {}
    for key, suffix in TOPIC_SUFFIX.items():
        tmpl = given.get(key) or f"{prefix}/{suffix}"
        out[key] = _subst(str(tmpl), subst)
    return out


def _subst(tmpl: str, values: Mapping[str, str]) -> str:
    for k, v in values.items():
        tmpl = tmpl.replace("{" + k + "}", v)
    return tmpl


def doc_site(doc: Mapping[str, Any]) -> str:
    return str((doc.get("metadata") or {}).get("site") or "")


# -- payloads -----------------------------------------------------------------------------------
def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def _flatten(obj: Mapping[str, Any], prefix: str, out: dict[str, Any]) -> None:
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            _flatten(v, key + ".", out)
        elif _scalar(v):
            out[key] = v


def _ts(value: Any, now: float, field: str = "ts") -> float:
    """The message's timestamp (seconds, or milliseconds above 1e11); ``now`` when absent or
    not a number; ValueRefused when it is a number out of range."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return now
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueRefused(field, f"timestamp {value!r} is not finite")
    if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
        raise ValueRefused(field, "timestamp out of range")
    return check_ts(float(value) / 1000.0 if value > 1e11 else float(value), field)


def parse_raw(payload: bytes) -> Any:
    text = payload.decode("utf-8").strip()
    low = text.lower()
    if low in ("true", "on"):
        return True
    if low in ("false", "off"):
        return False
    try:
        return int(text)
    except ValueError:
        return float(text)  # ValueError for anything else


class MqttBinding:
    protocol = "mqtt"

    def __init__(
        self,
        device: str,
        options: Mapping[str, Any],
        doc: Mapping[str, Any] | None = None,
        context: BindingContext | None = None,
        *,
        hub: MqttHub | None = None,
    ) -> None:
        from twin.spec.units import parse_duration

        self.device = device
        self.options = options
        self.site = doc_site(doc or {})
        self.topics = device_topics(device, self.site, options)
        self.format = str(options.get("format", "json"))
        self.fields: dict[str, str] = dict(options.get("fields") or {})
        self.point = str(options.get("point", "value"))
        self.ts_field = str(options.get("ts_field", "ts"))
        self.qos = int(options.get("qos", 1))
        self.retain = bool(options.get("retain", False))
        self.accept_retained = bool(options.get("retained", False))
        self.command_timeout = parse_duration(options.get("command_timeout", "30s")) or 30.0
        self.broker_name = options.get("broker")
        self.codec: str | None = options.get("codec")  # a Plugin (role codec) decodes payloads
        self.doc = doc or {}
        self._memo: tuple[Any, list[Reading]] | None = None  # the last message a codec decoded
        # what the broker's payload check (MQTT 5, QoS >= 1) parsed, for the durability hook
        # asked right after it about the same publish: (payload, topic, readings)
        self._checked: tuple[bytes, str, list[Reading]] | None = None
        # decoded ahead, with others that arrived together (prefetch_many): payload id ->
        # (payload, readings); the payload object is kept, so an id is never reused meanwhile
        self._prefetched: dict[int, tuple[bytes, list[Reading]]] = {}
        self.context = context
        self._hub = hub
        self._clock: Callable[[], float] = (context.clock if context else None) or time.time
        self._send: trio.MemorySendChannel[Message] | None = None
        self._pending: dict[str, trio.MemorySendChannel[tuple[str, dict[str, Any]]]] = {}
        self.last: dict[str, Reading] = {}
        self.dropped = 0
        self.refused = 0  # messages refused by twin.bindings.values
        self.subscribed = False  # every topic routed (commands can be answered)
        # the level of the telemetry topic that names the point (last '+'), if any
        levels = self.topics["telemetry"].split("/")
        self._point_level = max((i for i, x in enumerate(levels) if x == "+"), default=None)

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def hub(self) -> MqttHub:
        hub = self._hub or hub_for(self.context, self.broker_name)
        if hub is None:
            name = self.broker_name or "embedded"
            raise BindingConnectError(
                f"mqtt device {self.device!r}: no MQTT connection {name!r} in this engine",
                hint="run the engine with its MQTT service (twin up starts the embedded broker; "
                "--mqtt-broker HOST:PORT for an external one)",
            )
        return hub

    async def connect(self) -> None:
        # The engine starts its services before device tasks, so the hub is normally there;
        # when it is not (no MQTT service yet, or it is restarting) give it a moment, then
        # fail (temporary: retried with backoff) until it is up.
        with trio.move_on_after(15):
            while self._hub is None and hub_for(self.context, self.broker_name) is None:  # noqa: ASYNC110 - the hub appears in another module's registry
                await trio.sleep(0.02)
        _ = self.hub
        await trio.lowlevel.checkpoint()

    async def close(self) -> None:
        for ch in list(self._pending.values()):
            ch.close()
        self._pending.clear()
        self._send = None
        await trio.lowlevel.checkpoint()

    async def read(self, points: list[str] | None = None) -> list[Reading]:
        """The last value received for each point (MQTT is push: nothing to poll)."""
        await trio.lowlevel.checkpoint()
        if points is None:
            return list(self.last.values())
        return [self.last[p] for p in points if p in self.last]

    async def subscribe(self, send: trio.MemorySendChannel[Message]) -> None:
        hub = self.hub
        self._send = send
        t = self.topics
        routes: list[Route] = []
        try:
            routes.append(await hub.route(t["status"], self._on_status, self.qos))
            routes.append(await hub.route(t["response"], self._on_response, self.qos))
            routes.append(
                await hub.route(
                    t["telemetry"],
                    self._on_telemetry,
                    self.qos,
                    check=self._check_readings,
                    readings=self._durable_readings,
                    prefetch=self if self.codec is not None else None,
                )
            )
            if t["state"] != t["telemetry"]:
                routes.append(
                    await hub.route(
                        t["state"],
                        self._on_state,
                        self.qos,
                        check=self._check_readings,
                        readings=self._durable_readings,
                        prefetch=self if self.codec is not None else None,
                    )
                )
            routes.append(
                await hub.route(t["events"], self._on_event, self.qos, check=self._check_event)
            )
            self.subscribed = True
            await trio.sleep_forever()
        finally:
            self.subscribed = False
            self._send = None
            with trio.CancelScope(shield=True):
                for r in routes:
                    await hub.unroute(r)

    # -- incoming ---------------------------------------------------------------------------
    def _push(self, m: Message) -> None:
        send = self._send
        if send is None:
            return
        try:
            send.send_nowait(m)
        except trio.WouldBlock:
            self.dropped += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def _heartbeat(self) -> None:
        self._push(DeviceEvent(self.device, EventType.HEARTBEAT, self._clock()))

    def _readings(self, msg: InMessage) -> list[Reading]:
        """The readings of one telemetry/state message, every value checked by
        :mod:`twin.bindings.values`: raises ValueRefused (the whole message is refused) when
        one is not acceptable. An undecodable payload is one ``bad``-quality reading."""
        now = self._clock()
        point = self.point
        if self._point_level is not None:
            levels = msg.topic.split("/")
            if len(levels) > self._point_level:
                point = levels[self._point_level]
        if not msg.payload:
            return []
        if self.codec is not None:  # the payload is the codec plugin's business
            ahead = self._prefetched.get(id(msg.payload))
            if ahead is not None and ahead[0] is msg.payload:  # decoded with others
                return list(ahead[1])
            memo = self._memo
            if memo is not None and memo[0] is msg:  # checked, logged and routed: decode once
                return list(memo[1])
            (readings,) = plugin_edge.decode(self.codec, self.device, [msg.payload], now)
            self._memo = (msg, readings)
            return list(readings)
        if self.format == "string":
            try:
                text = msg.payload.decode("utf-8")
            except UnicodeDecodeError:
                return [Reading(self.device, point, None, now, Quality.BAD)]
            return [self._reading(point, text, now)]
        if self.format == "raw":
            try:
                value = parse_raw(msg.payload)
            except (ValueError, UnicodeDecodeError):
                return [Reading(self.device, point, None, now, Quality.BAD)]
            return [self._reading(point, value, now)]
        try:
            doc = json.loads(msg.payload)
        except RecursionError:
            raise ValueRefused(point, "JSON nested too deeply") from None
        except (ValueError, UnicodeDecodeError):
            return [Reading(self.device, point, None, now, Quality.BAD)]
        if not isinstance(doc, Mapping):
            return [self._reading(point, doc, now)] if _scalar(doc) else []
        check_shape(doc, point)  # bounded nesting and sizes before walking it
        ts = _ts(doc.get(self.ts_field), now, self.ts_field)
        out = []
        if self.fields:
            for p, path in self.fields.items():
                try:
                    value = _extract(doc, path)
                except KeyError:
                    continue
                out.append(self._reading(p, value, ts))
            return out
        flat: dict[str, Any] = {}
        _flatten(doc, "", flat)
        flat.pop(self.ts_field, None)
        if self._point_level is not None and set(flat) == {"value"}:
            return [self._reading(point, flat["value"], ts)]
        return [self._reading(p, v, ts) for p, v in flat.items()]

    # -- decoding what arrived together (twin.mqtt.hub.Prefetcher) ----------------------------
    def prefetch_key(self, msg: InMessage) -> str | None:
        """The codec, for a message this binding will decode (not one the broker's durability
        hook already decoded and logged, nor an empty one)."""
        if self.codec is None or msg.logged is not None or not msg.payload:
            return None
        return self.codec

    @staticmethod
    def prefetch_many(items: Sequence[tuple[Any, InMessage]]) -> None:
        """One codec call for the messages of several devices (``items`` share the codec);
        each binding remembers its messages' readings until :meth:`forget`."""
        first = items[0][0]
        codec = first.codec
        now = first._clock()
        payloads = [msg.payload for _, msg in items]
        rows: list[list[tuple[str, Any, float, bool]]] = [[] for _ in payloads]
        decoded = plugins_registry.decode_batch_or_none(codec, payloads)
        if decoded is None:  # a payload broke the call: each is decoded alone when handled,
            return           # so one device's poisonous frame does not spoil the others'
        for index, point, value, ts, good in decoded:
            if 0 <= index < len(rows):
                rows[index].append((point, value, ts, good))
        for (owner, msg), mine in zip(items, rows, strict=True):
            readings = plugin_edge.readings_of(owner.device, mine, now)
            owner._prefetched[id(msg.payload)] = (msg.payload, readings)

    def forget(self, msg: InMessage) -> None:
        entry = self._prefetched.get(id(msg.payload))
        if entry is not None and entry[0] is msg.payload:
            del self._prefetched[id(msg.payload)]

    def _reading(self, point: str, value: Any, ts: float) -> Reading:
        point, value, _ = check_reading(point, value)
        return Reading(self.device, point, value, ts)

    # the embedded broker asks these (through the hub) before it acknowledges a publish, so an
    # MQTT 5 device gets PUBACK 0x99 (payload format invalid) for what would be refused here
    def _check_readings(self, msg: InMessage) -> str | None:
        try:
            readings = self._readings(msg)
        except ValueRefused as exc:
            self._checked = None
            return str(exc)
        self._checked = (msg.payload, msg.topic, readings)
        return None

    def _durable_readings(self, msg: InMessage) -> list[Reading]:
        """For the write-ahead log: the readings ``_on_telemetry`` would pass on (none when
        it would refuse or ignore the message)."""
        checked, self._checked = self._checked, None
        if msg.retain and not self.accept_retained:
            return []
        if checked is not None and checked[0] is msg.payload and checked[1] == msg.topic:
            readings = checked[2]  # the same publish, just checked: parsed once, not twice
        else:
            try:
                readings = self._readings(msg)
            except ValueRefused:
                return []
        # the device's transform runs here, before the log (what is logged is what is stored)
        models = self.context.models if self.context is not None else {}
        transform = plugin_edge.transform_of(self.doc, models.get(self.device))
        if transform is not None and readings:
            readings = plugin_edge.transform(transform, readings)
        return readings

    def _check_event(self, msg: InMessage) -> str | None:
        try:
            self._event(msg)
        except ValueRefused as exc:
            return str(exc)
        return None

    def _refused(self, msg: InMessage, exc: ValueRefused) -> None:
        self.refused += 1
        hub = self._hub or hub_for(self.context, self.broker_name)
        if hub is not None:
            hub.refused(self.device, f"{msg.topic}: {exc}")

    def _on_telemetry(self, msg: InMessage) -> None:
        if msg.retain and not self.accept_retained:
            return
        if msg.logged is not None:  # parsed and logged by the broker's durability hook
            readings = [r for r in msg.logged if r.device == self.device]
        else:
            try:
                readings = self._readings(msg)
            except ValueRefused as exc:
                self._refused(msg, exc)
                return
        for r in readings:
            self.last[r.point] = r
            self._push(r)
        if not readings:
            self._heartbeat()

    def _on_state(self, msg: InMessage) -> None:
        self._on_telemetry(msg)

    def _event(self, msg: InMessage) -> DeviceEvent:
        now = self._clock()
        try:
            doc = json.loads(msg.payload) if msg.payload else {}
        except RecursionError:
            raise ValueRefused("events", "JSON nested too deeply") from None
        except (ValueError, UnicodeDecodeError):
            doc = {"message": msg.payload.decode("utf-8", "replace")}
        if not isinstance(doc, Mapping):
            doc = {"message": doc}
        check_data(doc, "events")
        try:
            etype = EventType(str(doc.get("type", "event")))
        except ValueError:
            etype = EventType.EVENT
        data = doc.get("data")
        if not isinstance(data, Mapping):
            data = {k: v for k, v in doc.items() if k not in ("type", "ts")}
        return DeviceEvent(self.device, etype, _ts(doc.get("ts"), now), data)

    def _on_event(self, msg: InMessage) -> None:
        if msg.retain:
            return
        try:
            event = self._event(msg)
        except ValueRefused as exc:
            self._refused(msg, exc)
            return
        self._push(event)

    def _on_status(self, msg: InMessage) -> None:
        if not msg.payload:
            return  # a retained status being cleared: says nothing about the device
        text = msg.payload.decode("utf-8", "replace").strip()
        word = text.lower()
        if text.startswith("{"):
            try:
                doc = json.loads(text)
                word = str(doc.get("status", doc.get("state", ""))).lower()
            except (ValueError, AttributeError):
                word = ""
        if word in OFFLINE_WORDS:
            self.hub.device_offline(self.device, f"mqtt status {text!r} on {msg.topic}")
        else:
            self._heartbeat()

    def _on_response(self, msg: InMessage) -> None:
        try:
            doc = json.loads(msg.payload) if msg.payload else {}
        except (ValueError, UnicodeDecodeError):
            doc = {"status": "success", "result": msg.payload.decode("utf-8", "replace")}
        except RecursionError:
            doc = {"status": "failure", "error": "response JSON nested too deeply"}
        if not isinstance(doc, Mapping):
            doc = {"status": "success", "result": doc}
        try:
            check_data(doc, "command response")
        except ValueRefused as exc:
            self._refused(msg, exc)
            doc = {"id": doc.get("id"), "status": "failure", "error": f"refused: {exc}"}
        cid = doc.get("id")
        if cid is None and msg.correlation_data is not None:
            cid = msg.correlation_data.decode("utf-8", "replace")
        self._heartbeat()
        ch = self._pending.get(str(cid)) if cid is not None else None
        if ch is None:
            log.debug("mqtt device %s: response for unknown command %r", self.device, cid)
            return
        status = str(doc.get("status", "success")).lower()
        with _suppress_channel_errors():
            ch.send_nowait((status, dict(doc)))

    # -- outgoing ---------------------------------------------------------------------------
    async def write(self, point: str, value: Any) -> None:
        payload = json.dumps({point: value}, separators=(",", ":")).encode()
        try:
            await self.hub.publish(self.topics["desired"], payload, self.qos, self.retain)
        except BindingError:
            raise
        except Exception as exc:
            raise BindingConnectError(f"mqtt device {self.device!r}: write failed: {exc}") from exc

    async def send_command(
        self,
        name: str,
        params: Mapping[str, Any],
        *,
        command_id: str | None = None,
        progress: Callable[[str, Mapping[str, Any]], None] | None = None,
    ) -> Any:
        hub = self.hub
        if not self.subscribed:  # responses are routed only while the binding is subscribed
            raise BindingConnectError(f"mqtt device {self.device!r}: not connected")
        cid = command_id or uuid.uuid4().hex
        request = {
            "id": cid,
            "name": name,
            "params": dict(params),
            "response_topic": self.topics["response"],
        }
        payload = json.dumps(request, separators=(",", ":"), default=str).encode()
        if self.codec is not None and plugin_edge.can_encode(self.codec):
            frame = plugin_edge.encode(self.codec, {"id": cid, "name": name, "params": dict(params)})
            if frame is None:
                raise CommandError(f"mqtt device {self.device!r}: codec {self.codec!r} could not "
                                   f"encode command {name!r}")
            payload = frame
        send, recv = trio.open_memory_channel[tuple[str, dict[str, Any]]](16)
        self._pending[cid] = send
        try:
            await hub.publish(
                self.topics["command"],
                payload,
                self.qos,
                False,
                response_topic=self.topics["response"],
                correlation_data=cid.encode(),
            )
            with trio.move_on_after(self.command_timeout):
                async for status, doc in recv:
                    if status in FINAL_OK:
                        return doc.get("result", {k: v for k, v in doc.items() if k != "id"})
                    if status in FINAL_FAIL:
                        err = doc.get("error") or doc.get("message") or status
                        raise CommandError(
                            f"mqtt device {self.device!r}: command {name!r} {status}: {err}"
                        )
                    if progress is not None:
                        progress(status, doc)
            raise CommandError(
                f"mqtt device {self.device!r}: command {name!r} got no answer within "
                f"{self.command_timeout:g}s",
                hint=f"the device should answer on {self.topics['response']}",
            )
        finally:
            self._pending.pop(cid, None)
            send.close()


class _suppress_channel_errors:
    def __enter__(self) -> None:
        return None

    def __exit__(self, et: Any, ev: Any, tb: Any) -> bool:
        return et is not None and issubclass(
            et, trio.WouldBlock | trio.ClosedResourceError | trio.BrokenResourceError
        )


def _factory(
    device: str, options: Mapping[str, Any], doc: Mapping[str, Any], context: BindingContext
) -> MqttBinding:
    return MqttBinding(device, options, doc, context)


register_binding("mqtt", _factory)
