"""A simulated MQTT device: a client that talks to the broker exactly as a real device would.

It is *not* part of the engine's data path: it connects over TCP with paho-mqtt (driven from
Trio, :class:`twin.mqtt.paho_trio.PahoTransport`) as user = its device name, password = its
device key, so the broker authenticates and authorises it like any field device (its own
topics only; a revoked key is refused and its connection closed). Then it

* publishes ``online`` (retained) on ``flux/{site}/{device}/status``;
* publishes its points as one JSON object every ``interval`` on ``.../telemetry``
  (``{"co2": 612.4, "ts": 1733140000.1}``), or a binary frame with ``frame:`` (a vendor
  format a codec plugin decodes, see :func:`binary_frame`);
* answers commands on ``.../command`` with ``{"id", "status": "success", "result"}`` on the
  request's response topic (or ``.../command/response``), a command named ``fail`` with
  ``failure``;
* applies writes on ``.../desired`` (``{"point": value}``) and reports them with the next
  telemetry.

What it measures comes from the same generators, effects and model-declared command effects as
the ``sim`` binding (:class:`twin.bindings.sim.SimBinding` is its "physics"), so a command
acts here too. ``twin up`` runs the demo's simulated MQTT devices (twin/runtime/simulators.py).
"""

from __future__ import annotations

import json
import logging
import struct
import time
from collections.abc import Mapping
from typing import Any

import trio

from twin.bindings.base import BindingContext
from twin.bindings.mqtt import device_topics
from twin.bindings.sim import SimBinding
from twin.errors import CommandError
from twin.mqtt.hub import InMessage, MqttHub
from twin.mqtt.paho_trio import PahoTransport
from twin.spec.units import parse_duration

log = logging.getLogger(__name__)


def binary_frame(frame: Mapping[str, Any], values: Mapping[str, Any]) -> bytes:
    """``frame: {prefix: HEX, fields: [{point, type, scale}]}``: the prefix bytes, then each
    point's value times ``scale`` packed big-endian as struct ``type`` (h, H, i, I, b, B, f, d),
    clamped to the type's range."""
    out = bytearray(bytes.fromhex(str(frame.get("prefix", ""))))
    for f in frame.get("fields") or []:
        code = str(f.get("type", "h"))
        raw = float(values.get(str(f["point"])) or 0) * float(f.get("scale", 1))
        if code in "fd":
            out += struct.pack(">" + code, raw)
            continue
        bits = struct.calcsize(code) * 8
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if code.islower() else (0, (1 << bits) - 1)
        out += struct.pack(">" + code, max(lo, min(hi, round(raw))))
    return bytes(out)


class MqttDeviceSim:
    def __init__(
        self,
        device: str,
        site: str,
        key: str,
        host: str,
        port: int,
        options: Mapping[str, Any],
        *,
        model: Mapping[str, Any] | None = None,
        binding: Mapping[str, Any] | None = None,
        protocol: int = 5,
    ) -> None:
        self.device = device
        self.interval = parse_duration(options.get("interval", "5s")) or 1.0
        self.topics = device_topics(device, site, binding or {})
        self.physics = SimBinding(device, options, BindingContext(models={device: model or {}}))
        self.transport = PahoTransport(
            host,
            port,
            client_id=f"sim-{device}",
            username=device,
            password=key,
            protocol=protocol,
            backoff_max=10.0,
        )
        self.hub = MqttHub(self.transport)
        self.transport.hub = self.hub
        self.frame: Mapping[str, Any] | None = options.get("frame")
        self.published = 0
        self.commands: list[tuple[str, dict[str, Any]]] = []
        self._wake = trio.Event()

    @property
    def connected(self) -> bool:
        return bool(self.transport.connected)

    async def _publish(self, topic: str, doc: Any, *, retain: bool = False) -> bool:
        payload = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        try:
            await self.hub.publish(topic, payload, 1, retain)
        except Exception as exc:  # not connected (yet): the next round tries again
            log.debug("sim %s: publish %s: %s", self.device, topic, exc)
            return False
        return True

    async def _on_command(self, msg: InMessage) -> None:
        try:
            req = json.loads(msg.payload)
            cid, name, params = req.get("id"), str(req["name"]), dict(req.get("params") or {})
            reply_to = msg.response_topic or req.get("response_topic") or self.topics["response"]
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("sim %s: unreadable command %r", self.device, msg.payload[:200])
            return
        self.commands.append((name, params))
        try:
            result = await self.physics.send_command(name, params)
            answer: dict[str, Any] = {"id": cid, "status": "success", "result": result}
        except CommandError as exc:
            answer = {"id": cid, "status": "failure", "error": str(exc)}
        await self._publish(str(reply_to), answer)
        self._wake.set()  # report what the command changed at once

    async def _on_desired(self, msg: InMessage) -> None:
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            return
        if isinstance(doc, Mapping):
            for point, value in doc.items():
                await self.physics.write(str(point), value)
            self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[MqttDeviceSim] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await self.physics.connect()
            await nursery.start(self.transport.run)
            inbox_send, inbox = trio.open_memory_channel[tuple[str, InMessage]](64)

            def handler(kind: str) -> Any:
                def on(msg: InMessage) -> None:
                    try:
                        inbox_send.send_nowait((kind, msg))
                    except trio.WouldBlock:
                        log.warning("sim %s: %s dropped (busy)", self.device, kind)

                return on

            await self.hub.route(self.topics["command"], handler("command"), 1)
            await self.hub.route(self.topics["desired"], handler("desired"), 1)
            nursery.start_soon(self._handle, inbox)
            task_status.started(self)
            online = False
            while True:
                if self.connected and not online:
                    online = await self._publish(self.topics["status"], b"online", retain=True)
                elif not self.connected:
                    online = False
                if self.connected:
                    values = {r.point: r.value for r in await self.physics.read()}
                    doc: Any = {**values, "ts": time.time()}
                    if self.frame is not None:  # a vendor's binary payload (a codec plugin decodes it)
                        doc = binary_frame(self.frame, values)
                    if await self._publish(self.topics["telemetry"], doc):
                        self.published += 1
                with trio.move_on_after(self.interval):
                    await self._wake.wait()
                self._wake = trio.Event()

    async def _handle(self, inbox: trio.MemoryReceiveChannel[tuple[str, InMessage]]) -> None:
        async for kind, msg in inbox:
            if kind == "command":
                await self._on_command(msg)
            else:
                await self._on_desired(msg)
