"""The ``opcua`` binding: the engine is an OPC UA client of a PLC, gateway or SCADA server.

```yaml
binding:
  opcua:
    endpoint: opc.tcp://10.0.0.20:4840/plc/
    security:                      # default: no security
      policy: Basic256Sha256       # None | Basic256Sha256
      mode: SignAndEncrypt         # Sign | SignAndEncrypt
      certificate: {secret: plc/cert}        # PEM/DER content, or a file path
      private_key: {secret: plc/key}
      server_certificate: {secret: plc/server}   # optional pin (default: the endpoint's)
    username: operator             # optional; anonymous otherwise
    password: {secret: plc/password}
    publishing_interval: 500ms     # the subscription's (default 500ms)
    sampling_interval: 100ms       # default per monitored item (default 0 = the server's fastest)
    points:
      temperature: {node: "ns=2;s=Boiler.Temperature", deadband: 0.2}
      pressure:    {path: "2:Boiler/2:Pressure", sampling_interval: 1s}
      setpoint:    {node: "ns=2;s=Boiler.Setpoint"}           # writable: desired state
      frame:       {node: "ns=2;s=Boiler.Frame", codec: acme-th8}   # a ByteString: a codec decodes it
    methods:                       # commands -> OPC UA methods (through the command ledger)
      reset: {object: "ns=2;s=Boiler", method: "2:Reset"}
      add:   {object: "2:Boiler", method: "ns=2;s=Boiler.Add"}
    history: {backfill: true, max_age: 1d, max_values: 10000}
```

Each point is a monitored item of one subscription (data-change notifications, optional
absolute/percent deadband). A reading's timestamp is the item's SourceTimestamp (else the
server's, else the receipt time); its quality comes from the StatusCode (Good / Uncertain /
Bad). Values become JSON-like values (datetimes ISO text, byte strings hex, localized text its
text, structures objects) and are checked by :mod:`twin.bindings.values` before they enter; a
refused value is logged with the device and becomes a ``bad`` reading without a value.

Writes (desired state, reconciled through the ledger) write the Value attribute with the
variable's own data type. Commands call the configured method on its object; parameters go
by the method's InputArguments names (``{"a": 2, "b": 3}``) or positionally (``{"args": [2,
3]}``), each converted to the argument's declared type; the result is the output argument
(or ``{name: value}`` for several). A Bad status from the method is a failed command.

**Codec points.** A point with ``codec`` (a Plugin with role codec) is a vendor blob — a
ByteString variable (a String is taken as its UTF-8 bytes): each value goes to the codec's
``decode`` as one payload, and the readings it returns (named by the codec) take the value's
timestamp (unless the codec gives one) and an Uncertain status; a Bad status or another type
is a ``bad`` reading of the point, with no codec call. The values of one publish response are
decoded in one plugin call, on the Trio side (a Starlark codec in a thread), never on the
asyncio loop the bindings share; a failing codec is a ``bad`` reading (``payload``). History
backfill and reads go through the codec the same way.

**Backfill.** After a reconnect, and after an engine restart, the points with history read
the server's HistoryRead (raw) from the last value the engine has (this binding's, the twin's,
else the newest in the time-series store, ``BindingContext.last_stored``; at most ``max_age``
back) up to now, oldest first, before the subscription starts: an outage leaves no gap.

The connection is checked every ``heartbeat`` (default 2s; that is also the twin's heartbeat);
a lost connection is a temporary BindingConnectError: the device task reconnects with backoff.
All asyncua objects live on the shared asyncio loop thread (:mod:`twin.bindings.aio`); only
finished :class:`Reading` s cross to Trio.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import enum
import logging
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import trio

from twin.bindings import aio, protostats
from twin.bindings import plugins as plugin_edge
from twin.bindings.base import (
    BindingContext,
    DeviceEvent,
    EventType,
    Message,
    Quality,
    Reading,
)
from twin.bindings.registry import register_binding
from twin.bindings.values import ValueRefused, check_value
from twin.errors import BindingConnectError, BindingError, BindingTimeout, CommandError
from twin.spec.bindings import binding_schema
from twin.spec.units import parse_duration

log = logging.getLogger(__name__)
# asyncua logs a lost connection from inside its publish loop as an ERROR with a traceback
# ("Publish iteration crashed; retrying") — the binding reports the same loss itself, as one
# line with the device and the backoff (a server that stops is not a bug of ours)
# (and "close_session raised during disconnect" with a traceback when the server went first)
for _noisy in ("asyncua.client.ua_session", "asyncua.client.client"):
    logging.getLogger(_noisy).setLevel(logging.CRITICAL)

OPCUA_SCHEMA: dict[str, Any] = binding_schema("opcua")
"""JSON Schema of ``spec.binding.opcua``: specs/binding-opcua.schema.json, the one source."""

STATS = protostats.stats("opcua")
INBOX_MAX = 1_000  # publish responses waiting for the device task (beyond: dropped, counted)


# -- values ---------------------------------------------------------------------------------
def to_json_value(v: Any, depth: int = 0) -> Any:
    """An OPC UA value as a JSON-like value (then checked by twin.bindings.values)."""
    if v is None or isinstance(v, bool | float | str):
        return v
    if isinstance(v, enum.Enum):
        return v.value if isinstance(v.value, int | str) else v.name
    if isinstance(v, int):
        return v
    if depth > 16:
        return str(v)[:256]
    if isinstance(v, dt.datetime):
        if v.tzinfo is None:
            v = v.replace(tzinfo=dt.UTC)
        return v.isoformat()
    if isinstance(v, bytes | bytearray):
        return bytes(v).hex()
    if isinstance(v, list | tuple):
        return [to_json_value(x, depth + 1) for x in v]
    from asyncua import ua

    if isinstance(v, ua.LocalizedText):
        return v.Text
    if isinstance(v, ua.QualifiedName | ua.NodeId):
        return v.to_string()
    if isinstance(v, ua.StatusCode):
        return v.name
    if isinstance(v, ua.Variant):
        return to_json_value(v.Value, depth + 1)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {
            f.name: to_json_value(getattr(v, f.name), depth + 1) for f in dataclasses.fields(v)
        }
    return str(v)[:1024]


_LAST_USABLE = 0x40900000
"""StatusCode ``UncertainLastUsableValue`` (OPC UA Part 4, 7.39; info bits masked off)."""


def status_quality(code: Any) -> Quality:
    """OPC UA StatusCode (top two bits: 00 good, 01 uncertain, 1x bad) as a Quality;
    ``UncertainLastUsableValue`` (the server repeats the last value it had) is stale."""
    value = int(getattr(code, "value", code) or 0)
    severity = (value >> 30) & 0b11
    if severity == 0:
        return Quality.GOOD
    if severity == 1:
        return Quality.STALE if value & 0xFFFF0000 == _LAST_USABLE else Quality.UNCERTAIN
    return Quality.BAD


def _unix(ts: dt.datetime | None) -> float | None:
    if ts is None:
        return None
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=dt.UTC)
    try:
        out = ts.timestamp()
    except (OverflowError, OSError, ValueError):
        return None
    return out if out > 0 else None  # OPC UA's "null" date is 1601-01-01


def _secret(ref: Any, what: str, device: str) -> str:
    if isinstance(ref, Mapping) and "secret" in ref:
        from twin.spec.secrets import Secrets, env_name

        value = Secrets().get(str(ref["secret"]))
        if value is None:
            raise BindingError(
                f"opcua device {device!r}: secret {ref['secret']!r} ({what}) is not set",
                hint=f"export {env_name(str(ref['secret']))}=... or add it to the secrets file",
            )
        return value
    return str(ref)


def _cert_source(value: str) -> tuple[bytes | str, str | None]:
    """A secret holding a certificate/key: PEM text, base64 DER, or a file path."""
    text = value.strip()
    if text.startswith("-----BEGIN"):
        return text.encode(), "pem"
    if Path(text).is_file():
        return text, ("pem" if text.endswith(".pem") else "der")
    try:
        return base64.b64decode(text, validate=True), "der"
    except ValueError:
        return text, None


@dataclasses.dataclass
class _Point:
    name: str
    node: str | None
    path: str | None
    sampling: float
    deadband: float
    deadband_type: int  # 1 absolute, 2 percent
    history: bool
    codec: str | None = None


@dataclasses.dataclass
class RawFrame:
    """A codec point's value before its codec decoded it (never leaves the binding)."""

    point: str
    payload: bytes
    ts: float
    quality: Quality


class OpcUaBinding:
    protocol = "opcua"

    def __init__(
        self,
        device: str,
        options: Mapping[str, Any],
        doc: Mapping[str, Any] | None = None,
        context: BindingContext | None = None,
    ) -> None:
        self.device = device
        self.options = options
        self.context = context or BindingContext()
        self.endpoint = str(options["endpoint"])
        self.timeout = parse_duration(options.get("timeout", "5s")) or 5.0
        self.publishing = parse_duration(options.get("publishing_interval", "500ms")) or 0.5
        default_sampling = parse_duration(options.get("sampling_interval", 0)) or 0.0
        self.heartbeat = parse_duration(options.get("heartbeat", "2s")) or 2.0
        self.namespace = options.get("namespace")
        hist = options.get("history") or {}
        self.backfill = bool(hist.get("backfill", True))
        self.history_max_age = parse_duration(hist.get("max_age", "1d")) or 86400.0
        self.history_max_values = int(hist.get("max_values", 10_000))
        self.points: dict[str, _Point] = {}
        for name, p in (options.get("points") or {}).items():
            p = p or {}
            self.points[str(name)] = _Point(
                str(name),
                p.get("node"),
                p.get("path"),
                parse_duration(p["sampling_interval"]) or 0.0
                if "sampling_interval" in p
                else default_sampling,
                float(p.get("deadband", 0.0)),
                2 if p.get("deadband_type") == "percent" else 1,
                bool(p.get("history", self.backfill)),
                p.get("codec") if isinstance(p.get("codec"), str) else None,
            )
        self.methods: dict[str, Mapping[str, Any]] = dict(options.get("methods") or {})
        self._clock: Callable[[], float] = self.context.clock or time.time
        # asyncio side (touched only on the bridge's loop thread)
        self._client: Any = None
        self._sub: Any = None
        self._nodes: dict[str, Any] = {}
        self._by_handle: dict[Any, str] = {}
        self._vtypes: dict[str, Any] = {}
        self._method_nodes: dict[str, tuple[Any, Any, list[Any], list[str]]] = {}
        self._lost: str | None = None  # set by the status-change callback
        # notifications cross to Trio through the bridge's channel (pushed on the loop thread)
        self._push: aio.Push[list[Reading | RawFrame] | str] | None = None
        self._batch: list[Reading | RawFrame] = []  # notifications of the publish response being handled
        # Trio side
        self.last_ts: dict[str, float] = {}  # newest reading per point (survives reconnects)
        self.last_good: dict[str, Any] = {}  # last good value per point (re-reported stale)
        self.sessions = 0
        self.refused = 0
        self.dropped = 0
        self.backfilled = 0
        self.notifications = 0

    # -- the asyncio side ------------------------------------------------------------------------
    async def _a_connect(self) -> None:
        from asyncua import Client, ua
        from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

        client = Client(self.endpoint, timeout=self.timeout)
        client.session_timeout = max(10_000, int(self.heartbeat * 5_000))
        if self.options.get("username"):
            client.set_user(str(self.options["username"]))
            if self.options.get("password") is not None:
                client.set_password(_secret(self.options["password"], "password", self.device))
        sec = self.options.get("security") or {}
        if sec.get("policy") == "Basic256Sha256":
            cert, cext = _cert_source(_secret(sec["certificate"], "certificate", self.device))
            key, kext = _cert_source(_secret(sec["private_key"], "private_key", self.device))
            from asyncua.crypto.uacrypto import CertProperties

            server_cert = None
            if sec.get("server_certificate") is not None:
                sc, sext = _cert_source(
                    _secret(sec["server_certificate"], "server_certificate", self.device)
                )
                server_cert = CertProperties(sc, sext)
            mode = getattr(ua.MessageSecurityMode, str(sec.get("mode", "SignAndEncrypt")))
            await client.set_security(
                SecurityPolicyBasic256Sha256,
                CertProperties(cert, cext),
                CertProperties(key, kext),
                server_certificate=server_cert,
                mode=mode,
            )
        await client.connect()
        self._client = client
        self._lost = None
        try:
            for name, p in self.points.items():
                self._nodes[name] = await self._a_node(p.node, p.path)
        except BaseException:
            await self._a_close()
            raise

    async def _a_node(self, node: str | None, path: str | None) -> Any:
        client = self._client
        if node:
            return client.get_node(node)
        assert path is not None
        parts = [x for x in str(path).split("/") if x]
        if parts and parts[0] in ("Objects", "0:Objects"):
            parts = parts[1:]
        if self.namespace:
            idx = await client.get_namespace_index(str(self.namespace))
            parts = [x if ":" in x else f"{idx}:{x}" for x in parts]
        return await client.nodes.objects.get_child(parts)

    async def _a_close(self) -> None:
        client, self._client = self._client, None
        self._sub = None
        self._nodes.clear()
        self._by_handle.clear()
        self._vtypes.clear()
        self._method_nodes.clear()
        if client is not None:
            try:
                await asyncio.wait_for(client.disconnect(), 2.0)
            except (Exception, asyncio.CancelledError) as exc:  # the peer may be gone already
                log.debug("opcua device %s: disconnect: %s", self.device, exc)

    def _reading(self, point: str, dv: Any, now: float) -> Reading | RawFrame:
        """A DataValue as a Reading, its value checked by twin.bindings.values (a refused one
        is a bad reading without a value, logged with the device); a codec point's bytes as a
        RawFrame (see :meth:`_decoded`)."""
        quality = status_quality(dv.StatusCode)
        ts = _unix(dv.SourceTimestamp) or _unix(dv.ServerTimestamp) or now
        raw = dv.Value.Value if dv.Value is not None else None
        p = self.points.get(point)
        if p is not None and p.codec is not None:
            if quality is Quality.BAD or raw is None:
                return Reading(self.device, point, None, ts, Quality.BAD)
            if isinstance(raw, str):
                raw = raw.encode("utf-8")
            if not isinstance(raw, bytes | bytearray):
                self.refused += 1
                STATS.malformed += 1
                log.warning("opcua device %s: point %s has codec %s but its value is a %s, not a "
                            "ByteString (bad)", self.device, point, p.codec, type(raw).__name__)
                return Reading(self.device, point, None, ts, Quality.BAD)
            return RawFrame(point, bytes(raw), ts, quality)
        try:
            value = check_value(to_json_value(raw), point)
        except ValueRefused as exc:
            self.refused += 1
            STATS.malformed += 1
            log.warning("opcua device %s: %s (dropped)", self.device, exc)
            return Reading(self.device, point, None, ts, Quality.BAD)
        if quality is Quality.BAD and raw is None:
            value = None
        return Reading(self.device, point, value, ts, quality)

    async def _a_history(self, since: dict[str, float]) -> list[Reading | RawFrame]:
        out: list[Reading | RawFrame] = []
        now = self._clock()
        end = dt.datetime.now(dt.UTC)
        for name, start_ts in since.items():
            node = self._nodes.get(name)
            if node is None:
                continue
            start = dt.datetime.fromtimestamp(
                max(start_ts, now - self.history_max_age), dt.UTC
            ) + dt.timedelta(microseconds=1)
            try:
                values = await node.read_raw_history(start, end, self.history_max_values)
            except Exception as exc:  # the server may not historize this node
                log.info("opcua device %s: no history for %s: %s", self.device, name, exc)
                continue
            for dv in values:
                r = self._reading(name, dv, now)
                if r.ts > start_ts:
                    out.append(r)
        out.sort(key=lambda r: r.ts)
        return out

    async def _a_subscribe(self) -> None:
        from asyncua import ua

        binding = self

        class Handler:
            def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
                binding._notified(data)

            def status_change_notification(self, status: Any) -> None:
                binding._lost = f"subscription status {status.Status}"
                if binding._push is not None:
                    binding._push(binding._lost)

        params = ua.CreateSubscriptionParameters()
        params.RequestedPublishingInterval = self.publishing * 1000.0
        params.RequestedLifetimeCount = 10_000
        params.RequestedMaxKeepAliveCount = max(3, int(self.heartbeat / self.publishing))
        params.MaxNotificationsPerPublish = 10_000
        params.PublishingEnabled = True
        params.Priority = 0
        sub = await self._client.create_subscription(params, Handler())
        self._sub = sub
        requests = []
        names = []
        for name, p in self.points.items():
            mfilter = None
            if p.deadband > 0:
                mfilter = ua.DataChangeFilter()
                mfilter.Trigger = ua.DataChangeTrigger(1)
                mfilter.DeadbandType = p.deadband_type
                mfilter.DeadbandValue = p.deadband
            req = sub._make_monitored_item_request(
                self._nodes[name],
                ua.AttributeIds.Value,
                mfilter,
                0,
                ua.MonitoringMode.Reporting,
                p.sampling * 1000.0,
            )
            requests.append(req)
            names.append(name)
            self._by_handle[req.RequestedParameters.ClientHandle] = name
        if requests:
            results = await sub.create_monitored_items(requests)
            for name, res in zip(names, results, strict=True):
                if isinstance(res, ua.StatusCode):
                    log.warning(
                        "opcua device %s: point %s not monitored: %s", self.device, name, res
                    )

    def _notified(self, data: Any) -> None:
        """On the loop thread: one data change -> the inbox (never raises)."""
        try:
            item = data.monitored_item
            name = self._by_handle.get(item.ClientHandle) or self._by_handle.get(
                data.subscription_data.client_handle
            )
            if name is None:
                return
            reading = self._reading(name, item.Value, self._clock())
        except Exception as exc:  # a malformed notification: drop it, keep the others
            self.refused += 1
            STATS.malformed += 1
            log.warning("opcua device %s: notification dropped: %s", self.device, exc)
            return
        # one crossing per publish response, not per notification: asyncua calls this for
        # every item of a response in one go, the flush runs right after
        self._batch.append(reading)
        if len(self._batch) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        batch, self._batch = self._batch, []
        if batch and self._push is not None:
            self._push(batch)

    async def _a_check(self) -> None:
        if self._client is None:
            raise ConnectionError("not connected")
        await self._client.check_connection()

    async def _a_write(self, point: str, value: Any) -> None:
        from asyncua import ua

        node = self._nodes[point]
        vtype = self._vtypes.get(point)
        if vtype is None:
            vtype = await node.read_data_type_as_variant_type()
            self._vtypes[point] = vtype
        await node.write_value(ua.DataValue(ua.Variant(_cast(value, vtype), vtype)))

    async def _a_method(self, name: str) -> tuple[Any, Any, list[Any], list[str]]:
        cached = self._method_nodes.get(name)
        if cached is not None:
            return cached
        spec = self.methods[name]
        obj_ref = str(spec["object"])
        obj = (
            self._client.get_node(obj_ref)
            if is_node_id(obj_ref)
            else await self._a_node(None, obj_ref)
        )
        m_ref = str(spec["method"])
        if is_node_id(m_ref):
            method = self._client.get_node(m_ref)
        else:
            if ":" not in m_ref and self.namespace:
                idx = await self._client.get_namespace_index(str(self.namespace))
                m_ref = f"{idx}:{m_ref}"
            method = await obj.get_child(m_ref)
        inputs: list[Any] = []
        outputs: list[str] = []
        for child in await method.get_properties():
            bname = (await child.read_browse_name()).Name
            if bname == "InputArguments":
                inputs = list(await child.read_value() or [])
            elif bname == "OutputArguments":
                outputs = [a.Name for a in (await child.read_value() or [])]
        cached = (obj, method, inputs, outputs)
        self._method_nodes[name] = cached
        return cached

    async def _a_call(self, name: str, params: Mapping[str, Any]) -> Any:
        from asyncua import ua

        obj, method, inputs, outputs = await self._a_method(name)
        if isinstance(params.get("args"), list):
            given = list(params["args"])
        else:
            given = []
            for a in inputs:
                if a.Name not in params:
                    raise CommandError(
                        f"opcua device {self.device!r}: command {name!r} needs parameter "
                        f"{a.Name!r}",
                        hint=f"parameters: {', '.join(x.Name for x in inputs) or 'none'}",
                    )
                given.append(params[a.Name])
        if inputs and len(given) != len(inputs):
            raise CommandError(
                f"opcua device {self.device!r}: command {name!r} takes {len(inputs)} "
                f"argument(s), got {len(given)}"
            )
        args = []
        for i, value in enumerate(given):
            vtype = _vtype_of(inputs[i].DataType) if i < len(inputs) else None
            args.append(ua.Variant(_cast(value, vtype), vtype) if vtype else ua.Variant(value))
        result = await obj.call_method(method.nodeid, *args)
        if isinstance(result, list) and len(outputs) == len(result) and len(result) > 1:
            return {k: to_json_value(v) for k, v in zip(outputs, result, strict=True)}
        return to_json_value(result)

    # -- the Trio side ---------------------------------------------------------------------------
    async def _run(self, fn: Callable[..., Any], *args: Any, what: str) -> Any:
        """Run ``fn`` on the asyncio loop; map library errors at this boundary; count it in
        ``/metrics`` (``twin_protocol_*{binding="opcua"}``)."""
        from asyncua import ua

        st = STATS
        st.requests += 1
        started = time.perf_counter()
        try:
            with trio.fail_after(self.timeout * 3):
                out = await aio.run(lambda: fn(*args))
            st.observe(time.perf_counter() - started)
            return out
        except trio.TooSlowError as exc:
            st.errors += 1
            st.timeouts += 1
            raise BindingTimeout(f"opcua device {self.device!r}: {what} timed out") from exc
        except (BindingError, CommandError):
            st.errors += 1
            raise
        except ua.UaStatusCodeError as exc:
            st.errors += 1
            raise BindingError(f"opcua device {self.device!r}: {what}: {exc}") from exc
        except TimeoutError as exc:
            st.errors += 1
            st.timeouts += 1
            raise BindingTimeout(f"opcua device {self.device!r}: {what} timed out") from exc
        except (OSError, ConnectionError, ua.UaError) as exc:
            st.errors += 1
            raise BindingConnectError(
                f"opcua device {self.device!r}: {what}: {type(exc).__name__}: {exc}"
            ) from exc

    async def connect(self) -> None:
        await self._run(self._a_connect, what=f"connect to {self.endpoint}")
        self.sessions += 1

    async def close(self) -> None:
        with trio.move_on_after(5) as scope:
            scope.shield = True
            await self._run(self._a_close, what="close")
        self._push = None

    async def _decoded(self, items: list[Reading | RawFrame]) -> list[Reading]:
        """Readings, with every codec point's frame replaced by what its codec decoded (one
        plugin call per codec for all the frames of ``items``), in order."""
        frames: dict[str, list[RawFrame]] = {}
        for item in items:
            if isinstance(item, RawFrame):
                codec = self.points[item.point].codec
                assert codec is not None
                frames.setdefault(codec, []).append(item)
        if not frames:
            return [r for r in items if isinstance(r, Reading)]
        decoded: dict[int, list[Reading]] = {}
        for codec, batch in frames.items():
            out = await plugin_edge.decode_off_loop(codec, self.device, [f.payload for f in batch],
                                                    [f.ts for f in batch])
            for f, readings in zip(batch, out, strict=True):
                decoded[id(f)] = plugin_edge.frame_quality(readings, f.quality)
                prev = self.last_ts.get(f.point)
                if prev is None or f.ts > prev:  # backfill resumes from the frame's time
                    self.last_ts[f.point] = f.ts
        result: list[Reading] = []
        for item in items:
            if isinstance(item, RawFrame):
                result.extend(decoded[id(item)])
            else:
                result.append(item)
        return result

    async def read(self, points: list[str] | None = None) -> list[Reading]:
        names = list(self.points) if points is None else [p for p in points if p in self.points]

        async def a_read() -> list[Reading | RawFrame]:
            now = self._clock()
            return [self._reading(n, await self._nodes[n].read_data_value(), now) for n in names]

        return await self._decoded(list(await self._run(a_read, what="read")))

    async def _since(self) -> dict[str, float]:
        """Per historized point: the newest timestamp the engine has (in this binding, else the
        twin's reported value, else the time-series store: after an engine restart)."""
        out = {}
        last_ts = self.context.last_ts
        missing = []
        for name, p in self.points.items():
            if not p.history:
                continue
            ts = self.last_ts.get(name)
            if ts is None and last_ts is not None:
                ts = last_ts(self.device, name)
            if ts is not None:
                out[name] = float(ts)
            else:
                missing.append(name)
        if missing and self.context.last_stored is not None:
            since = self._clock() - self.history_max_age
            out.update(await self.context.last_stored(self.device, missing, since))
        return out

    async def subscribe(self, send: trio.MemorySendChannel[Message]) -> None:
        since = await self._since()
        if since:
            backlog = await self._decoded(await self._run(self._a_history, since, what="history read"))
            if backlog:
                log.info(
                    "opcua device %s: backfilling %d value(s) from history", self.device, len(backlog)
                )
            for r in backlog:
                await self._send(send, r)
                self.backfilled += 1
        push, receive = aio.channel(INBOX_MAX)
        self._push = push
        try:
            await self._run(self._a_subscribe, what="subscribe")
            async with trio.open_nursery() as nursery, receive:
                nursery.start_soon(self._watch, send)
                async for item in receive:
                    if isinstance(item, str):  # the subscription's status went bad
                        raise BindingConnectError(f"opcua device {self.device!r}: {item}")
                    for r in await self._decoded(item):
                        await self._send(send, r)
        except BaseException as exc:
            leaf = exc
            while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
                leaf = leaf.exceptions[0]
            if isinstance(leaf, BindingError):  # the server is gone: what we had is stale now
                now = self._clock()
                for point, value in self.last_good.items():
                    await send.send(Reading(self.device, point, value, now, Quality.STALE))
            raise
        finally:
            self.dropped += push.dropped
            self._push = None

    async def _send(self, send: trio.MemorySendChannel[Message], r: Reading) -> None:
        self.notifications += 1
        if r.quality is Quality.GOOD:
            self.last_good[r.point] = r.value
        prev = self.last_ts.get(r.point)
        if prev is None or r.ts > prev:
            self.last_ts[r.point] = r.ts
        await send.send(r)

    async def _watch(self, send: trio.MemorySendChannel[Message]) -> None:
        while True:
            await trio.sleep(self.heartbeat)
            await self._run(self._a_check, what="connection check")
            await send.send(DeviceEvent(self.device, EventType.HEARTBEAT, self._clock()))

    async def write(self, point: str, value: Any) -> None:
        if point not in self.points:
            raise BindingError(f"opcua device {self.device!r}: no point {point!r} to write")
        if self._client is None:
            raise BindingConnectError(f"opcua device {self.device!r}: not connected")
        await self._run(self._a_write, point, value, what=f"write {point}")

    async def send_command(self, name: str, params: Mapping[str, Any]) -> Any:
        if name not in self.methods:
            raise CommandError(
                f"opcua device {self.device!r}: no method for command {name!r}",
                hint=f"methods: {', '.join(sorted(self.methods)) or 'none configured'}",
            )
        if self._client is None:
            raise BindingConnectError(f"opcua device {self.device!r}: not connected")
        try:
            return await self._run(self._a_call, name, params, what=f"command {name}")
        except CommandError:
            raise
        except BindingError as exc:
            raise CommandError(str(exc)) from exc


NODE_ID_RE = re.compile(r"(ns=\d+;|nsu=[^;]+;)?[isgb]=.+")


def is_node_id(ref: str) -> bool:
    """``ns=2;s=Boiler.Temperature`` (a NodeId), not ``2:Boiler/2:Temperature`` (a path)."""
    return NODE_ID_RE.fullmatch(ref) is not None


def _vtype_of(datatype: Any) -> Any:
    """The VariantType of a built-in DataType NodeId (ns=0;i=1..25), else None."""
    from asyncua import ua

    if getattr(datatype, "NamespaceIndex", 1) == 0:
        try:
            return ua.VariantType(int(datatype.Identifier))
        except (ValueError, TypeError):
            return None
    return None


def _cast(value: Any, vtype: Any) -> Any:
    """``value`` in the Python type asyncua expects for ``vtype``."""
    from asyncua import ua

    if vtype is None:
        return value
    try:
        if vtype in (ua.VariantType.Float, ua.VariantType.Double):
            return float(value)
        if vtype is ua.VariantType.Boolean:
            if isinstance(value, str):
                return value.strip().lower() in ("true", "1", "on", "yes")
            return bool(value)
        if vtype is ua.VariantType.String:
            return str(value)
        if vtype in (
            ua.VariantType.SByte,
            ua.VariantType.Byte,
            ua.VariantType.Int16,
            ua.VariantType.UInt16,
            ua.VariantType.Int32,
            ua.VariantType.UInt32,
            ua.VariantType.Int64,
            ua.VariantType.UInt64,
        ):
            if isinstance(value, float) and not value.is_integer():
                raise CommandError(f"{value!r} is not an integer ({vtype.name})")
            return int(value)
    except (TypeError, ValueError) as exc:
        raise CommandError(f"{value!r} cannot be sent as {vtype.name}: {exc}") from exc
    return value


def _factory(
    device: str, options: Mapping[str, Any], doc: Mapping[str, Any], context: BindingContext
) -> OpcUaBinding:
    return OpcUaBinding(device, options, doc, context)


register_binding("opcua", _factory)
