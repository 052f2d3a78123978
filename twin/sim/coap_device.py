"""A simulated constrained device that talks CoAP to the engine, as a real one would.

It is *not* part of the engine's data path: an aiocoap client (on the asyncio bridge) of the
engine's CoAP server (:mod:`twin.runtime.coap_service`), authenticated by its device key in the
URI query. It

* POSTs its points as one CBOR map to ``/d/{device}?k=KEY`` every ``interval``
  (``{"power_kw": 112.4, "ts": 1733140000.1}``);
* observes ``/d/{device}/cmd`` and applies what it gets: desired values are written to its
  points (reported with the next POST, which clears them on the engine's side), commands are
  run on its physics and answered with a POST to ``/d/{device}/cmd``
  (``{"id", "status": "success" | "failure", "result" | "error"}``); a command named ``fail``
  fails.

What it measures comes from the ``sim`` binding's generators (:class:`twin.bindings.sim.SimBinding`
is its "physics"), like :class:`twin.sim.mqtt_device.MqttDeviceSim`. ``twin up`` runs the
devices of ``SITE/simulators/coap.yaml`` (twin/runtime/simulators.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import trio

from twin.bindings import aio
from twin.bindings.base import BindingContext
from twin.bindings.coap import CT_CBOR, CT_JSON, decode_payload, encode_payload
from twin.bindings.sim import SimBinding
from twin.errors import CommandError
from twin.spec.units import parse_duration

log = logging.getLogger(__name__)


class _NotYet(Exception):
    """The engine does not serve this device (yet)."""


class CoapDeviceSim:
    def __init__(
        self,
        device: str,
        key: str,
        host: str,
        port: int,
        options: Mapping[str, Any],
        *,
        model: Mapping[str, Any] | None = None,
    ) -> None:
        self.device = device
        self.key = key
        self.base = f"coap://{host}:{port}/d/{device}"
        self.interval = parse_duration(options.get("interval", "5s")) or 1.0
        self.format = CT_JSON if options.get("format") == "json" else CT_CBOR
        self.physics = SimBinding(device, options, BindingContext(models={device: model or {}}))
        self.posted = 0
        self.commands: list[tuple[str, dict[str, Any]]] = []
        self._answered: set[str] = set()
        self._wake = trio.Event()
        self._ctx: Any = None

    def url(self, suffix: str = "") -> str:
        return f"{self.base}{suffix}?k={self.key}"

    async def _request(self, method: str, url: str, body: Any = None, observe: bool = False) -> Any:
        from aiocoap import Code, Message

        ctx = self._ctx
        msg = Message(code=getattr(Code, method), uri=url)
        if body is not None:
            msg.payload = encode_payload(body, self.format)
            msg.opt.content_format = self.format

        async def go() -> Any:
            return await asyncio.wait_for(ctx.request(msg).response, 10)

        factory: Callable[[], Any] = go
        return await aio.run(factory)

    async def _post(self) -> None:
        values = {r.point: r.value for r in await self.physics.read() if r.value is not None}
        resp = await self._request("POST", self.url(), {**values, "ts": time.time()})
        if resp.code.is_successful():
            self.posted += 1
        else:
            log.warning("sim %s: POST -> %s %s", self.device, resp.code, resp.payload[:200])

    async def _apply(self, state: Mapping[str, Any]) -> None:
        for point, value in (state.get("desired") or {}).items():
            await self.physics.write(str(point), value)
        for cmd in state.get("commands") or []:
            cid = str(cmd.get("id"))
            if cid in self._answered:
                continue
            self._answered.add(cid)
            name, params = str(cmd.get("name")), dict(cmd.get("params") or {})
            self.commands.append((name, params))
            try:
                result = await self.physics.send_command(name, params)
                answer: dict[str, Any] = {"id": cid, "status": "success", "result": result}
            except CommandError as exc:
                answer = {"id": cid, "status": "failure", "error": str(exc)}
            await self._request("POST", self.url("/cmd"), answer)
        self._wake.set()  # report what changed at once

    async def _observe(self) -> None:
        """Observe the device's command resource; 4.04 (the engine has not started this
        device's task yet: simulators start before the devices) is retried quietly."""
        while True:
            try:
                await self._observe_once()
            except _NotYet as exc:
                log.debug("sim %s: %s; observing again in 1 s", self.device, exc)
                await trio.sleep(1.0)

    async def _observe_once(self) -> None:
        from aiocoap import Code, Message

        push, receive = aio.channel(64)
        ctx = self._ctx
        url = self.url("/cmd")

        async def a_observe() -> None:
            req = ctx.request(Message(code=Code.GET, uri=url, observe=0, accept=self.format))
            push(await req.response)
            async for resp in req.observation:
                push(resp)

        async def pump() -> None:
            factory: Callable[[], Any] = a_observe
            try:
                await aio.run(factory)
            finally:
                push.close()

        missing = None
        async with trio.open_nursery() as nursery, receive:
            nursery.start_soon(pump)
            async for resp in receive:
                if resp.code == Code.NOT_FOUND:
                    missing = f"observation of {self.base}/cmd: {resp.code}"
                    nursery.cancel_scope.cancel()
                    break
                if not resp.code.is_successful():
                    raise RuntimeError(f"observation of {self.base}/cmd: {resp.code}")
                state = decode_payload(resp.payload, resp.opt.content_format)
                if isinstance(state, Mapping):
                    await self._apply(state)
        if missing is not None:
            raise _NotYet(missing)
        raise RuntimeError(f"observation of {self.base}/cmd ended")

    async def run(self, *, task_status: trio.TaskStatus[CoapDeviceSim] = trio.TASK_STATUS_IGNORED) -> None:
        from aiocoap import Context

        create: Callable[[], Any] = Context.create_client_context
        self._ctx = await aio.run(create)
        try:
            await self.physics.connect()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._observe)
                task_status.started(self)
                while True:
                    try:
                        await self._post()
                    except (OSError, TimeoutError) as exc:
                        log.debug("sim %s: %s", self.device, exc)
                    with trio.move_on_after(self.interval):
                        await self._wake.wait()
                    self._wake = trio.Event()
        finally:
            ctx, self._ctx = self._ctx, None
            with trio.move_on_after(3) as scope:
                scope.shield = True
                shutdown: Callable[[], Any] = ctx.shutdown
                await aio.run(shutdown)
