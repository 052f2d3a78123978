"""The ``http`` binding: devices that talk HTTP.

Two modes:

* ``push`` (default): the device POSTs readings, heartbeats and events to
  ``/api/v1/ingest/{device}`` authenticated by its device key (``X-Device-Key`` header or
  ``Authorization: Bearer dk_...``). Writes and commands for the device are queued and returned
  in the response of its next ingest call (``{"writes": {...}, "commands": [...]}``).
* ``poll``: the engine GETs ``url`` every ``interval`` and extracts points by dotted ``path``;
  writes and commands are POSTed to ``write_url`` / ``command_url`` when given.

```yaml
binding:
  http: {mode: push}
binding:
  http: {mode: poll, url: "http://10.0.0.9/status", interval: 5s,
         points: {temperature: {path: sensors.t}}}
```
Ingest body (every field optional)::

    {"readings": [{"point": "temperature", "value": 21.5, "ts": 1718000000.0, "quality": "good"}],
     "values": {"humidity": 40},          # shorthand: point -> value, ts = now
     "heartbeat": true,
     "events": [{"type": "fault", "data": {"message": "fan stuck"}}]}
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from twin.bindings.base import (
    BindingContext,
    DeviceEvent,
    EventType,
    Message,
    Quality,
    Reading,
)
from twin.bindings.payload import extract as _extract
from twin.bindings.polling import PollOptions, poll_forever
from twin.bindings.registry import register_binding
from twin.bindings.values import (
    ValueRefused,
    check_data,
    check_reading,
    check_ts,
    check_value,
)
from twin.errors import BindingConnectError, BindingError, BindingTimeout, CommandError
from twin.spec.bindings import binding_schema

log = logging.getLogger(__name__)

HTTP_SCHEMA: dict[str, Any] = binding_schema("http")
"""JSON Schema of ``spec.binding.http``: specs/binding-http.schema.json, the one source."""


class IngestError(ValueError):
    """An ingest body is malformed (mapped to HTTP 422)."""


def _ts(value: Any, now: float, where: str, point: str | None = None) -> float:
    if value is None:
        return now
    try:
        return check_ts(value, point or where)
    except ValueRefused as exc:
        of = f" (point {point!r})" if point else ""
        raise IngestError(f"{where} {exc.reason}{of}") from None


def parse_ingest(device: str, body: Any, now: float) -> list[Message]:
    """Turn an ingest body into messages. Raises IngestError (one readable line naming the
    point) for a malformed body or any value :mod:`twin.bindings.values` refuses: nothing of a
    refused body is passed on."""
    if not isinstance(body, Mapping):
        raise IngestError("body must be a JSON object")
    unknown = set(body) - {"readings", "values", "heartbeat", "events", "ts"}
    if unknown:
        raise IngestError(f"unknown field(s): {', '.join(sorted(map(repr, unknown)))[:200]}")
    base_ts = _ts(body.get("ts"), now, "ts")
    out: list[Message] = []
    readings = body.get("readings")
    readings = [] if readings is None else readings
    if not isinstance(readings, list):
        raise IngestError("readings must be a list")
    for i, r in enumerate(readings):
        if not isinstance(r, Mapping) or not isinstance(r.get("point"), str) or "value" not in r:
            raise IngestError(f"readings[{i}] needs a string 'point' and a 'value'")
        try:
            quality = Quality(r.get("quality", "good"))
        except (ValueError, TypeError):
            raise IngestError(f"readings[{i}].quality must be good, uncertain or bad") from None
        try:
            point, value, _ = check_reading(r["point"], r["value"])
        except ValueRefused as exc:
            raise IngestError(f"readings[{i}]: {exc}") from None
        out.append(
            Reading(
                device, point, value, _ts(r.get("ts"), base_ts, f"readings[{i}].ts", point), quality
            )
        )
    values = body.get("values")
    values = {} if values is None else values
    if not isinstance(values, Mapping):
        raise IngestError("values must be an object")
    for point, value in values.items():
        try:
            point, value, _ = check_reading(point, value)
        except ValueRefused as exc:
            raise IngestError(f"values: {exc}") from None
        out.append(Reading(device, point, value, base_ts, Quality.GOOD))
    events = body.get("events")
    events = [] if events is None else events
    if not isinstance(events, list):
        raise IngestError("events must be a list")
    for i, e in enumerate(events):
        if not isinstance(e, Mapping):
            raise IngestError(f"events[{i}] must be an object")
        try:
            etype = EventType(e.get("type", "event"))
        except (ValueError, TypeError):
            raise IngestError(f"events[{i}].type must be heartbeat, fault, ok or event") from None
        data = e.get("data")
        data = {} if data is None else data
        if not isinstance(data, Mapping):
            raise IngestError(f"events[{i}].data must be an object")
        try:
            check_data(data, f"events[{i}].data")
        except ValueRefused as exc:
            raise IngestError(str(exc)) from None
        out.append(DeviceEvent(device, etype, _ts(e.get("ts"), base_ts, f"events[{i}].ts"), data))
    if body.get("heartbeat") or not out:
        out.append(DeviceEvent(device, EventType.HEARTBEAT, base_ts))
    return out


@dataclass
class _Slot:
    send: trio.MemorySendChannel[Message]
    writes: dict[str, Any] = field(default_factory=dict)
    commands: list[dict[str, Any]] = field(default_factory=list)


class DeviceNotRunning(LookupError):
    pass


class IngestBusy(RuntimeError):
    pass


class IngestHub:
    """Routes ingest POSTs to the running device task of each push-mode http device."""

    def __init__(self) -> None:
        self._slots: dict[str, _Slot] = {}
        self.accepted = 0
        self.rejected = 0

    def attach(self, device: str, send: trio.MemorySendChannel[Message]) -> None:
        self._slots[device] = _Slot(send)

    def detach(self, device: str, send: trio.MemorySendChannel[Message]) -> None:
        slot = self._slots.get(device)
        if slot is not None and slot.send is send:
            del self._slots[device]

    def running(self, device: str) -> bool:
        return device in self._slots

    def push(self, device: str, messages: list[Message]) -> dict[str, Any]:
        """Deliver messages without blocking; return pending writes/commands for the device.

        Raises DeviceNotRunning (no such push device running) or IngestBusy (its queue is full;
        the caller answers 429 and the device retries).
        """
        slot = self._slots.get(device)
        if slot is None:
            raise DeviceNotRunning(device)
        sent = 0
        try:
            for m in messages:
                slot.send.send_nowait(m)
                sent += 1
        except trio.WouldBlock:
            self.rejected += len(messages) - sent
            self.accepted += sent
            raise IngestBusy(device) from None
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise DeviceNotRunning(device) from None
        self.accepted += sent
        reply: dict[str, Any] = {"accepted": sent}
        if slot.writes:
            reply["writes"], slot.writes = slot.writes, {}
        if slot.commands:
            reply["commands"], slot.commands = slot.commands, []
        return reply

    def check(self, device: str, count: int) -> None:
        """Raise what ``push`` would raise for ``count`` messages now (DeviceNotRunning,
        IngestBusy), without sending: the ingest edge checks before it logs readings."""
        slot = self._slots.get(device)
        if slot is None:
            raise DeviceNotRunning(device)
        stats = slot.send.statistics()
        if stats.current_buffer_used + count > stats.max_buffer_size:
            raise IngestBusy(device)

    async def deliver(self, device: str, messages: list[Message]) -> dict[str, Any]:
        """Like ``push`` but waits for room in the device's queue (``check`` said there was
        some): for messages already logged and about to be acknowledged."""
        slot = self._slots.get(device)
        if slot is None:
            raise DeviceNotRunning(device)
        try:
            for m in messages:
                await slot.send.send(m)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise DeviceNotRunning(device) from None
        self.accepted += len(messages)
        reply: dict[str, Any] = {"accepted": len(messages)}
        if slot.writes:
            reply["writes"], slot.writes = slot.writes, {}
        if slot.commands:
            reply["commands"], slot.commands = slot.commands, []
        return reply

    def queue_write(self, device: str, point: str, value: Any) -> None:
        slot = self._slots.get(device)
        if slot is None:
            raise BindingError(f"http device {device!r} is not connected")
        slot.writes[point] = value

    def queue_command(self, device: str, name: str, params: Mapping[str, Any]) -> None:
        slot = self._slots.get(device)
        if slot is None:
            raise BindingError(f"http device {device!r} is not connected")
        slot.commands.append({"name": name, "params": dict(params)})


class HttpBinding:
    protocol = "http"

    def __init__(self, device: str, options: Mapping[str, Any], context: BindingContext) -> None:
        self.device = device
        o = PollOptions.parse(options, zero_interval=1.0)
        self.mode, self.url, self.write_url, self.command_url = (
            o.mode, o.url, o.write_url, o.command_url)  # fmt: skip
        self.interval, self.timeout, self.points = o.interval, o.timeout, o.points
        self.headers = dict(options.get("headers") or {})
        self.hub: IngestHub | None = context.ingest
        self._clock = context.clock or time.time
        self._client: httpx.AsyncClient | None = None
        self.refused = 0  # poll mode: values refused by twin.bindings.values
        if self.mode == "push" and self.hub is None:
            raise BindingError(f"http device {device!r}: push mode needs the engine's ingest hub")

    async def connect(self) -> None:
        if self.mode == "poll":
            self._client = httpx.AsyncClient(timeout=self.timeout, headers=self.headers)
        await trio.lowlevel.checkpoint()

    async def _request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        if self._client is None:
            raise BindingConnectError(f"http device {self.device!r}: not connected")
        try:
            resp = await self._client.request(method, url, **kw)
            resp.raise_for_status()
            return resp
        except httpx.TimeoutException as exc:
            raise BindingTimeout(f"http device {self.device!r}: {method} {url} timed out") from exc
        except httpx.HTTPStatusError as exc:
            raise BindingError(
                f"http device {self.device!r}: {method} {url} -> {exc.response.status_code}"
            ) from exc
        except httpx.HTTPError as exc:
            raise BindingConnectError(
                f"http device {self.device!r}: {method} {url}: {exc}"
            ) from exc

    async def read(self, points: list[str] | None = None) -> list[Reading]:
        if self.mode != "poll":
            await trio.lowlevel.checkpoint()
            return []
        assert self.url is not None
        resp = await self._request("GET", self.url)
        try:
            doc = resp.json()
        except (ValueError, RecursionError) as exc:
            raise BindingError(f"http device {self.device!r}: response is not JSON") from exc
        now = self._clock()
        out = []
        wanted = points if points is not None else list(self.points)
        for p in wanted:
            try:
                value = check_value(_extract(doc, self.points.get(p, p)), p)
            except KeyError:
                out.append(Reading(self.device, p, None, now, Quality.BAD))
                continue
            except ValueRefused as exc:  # refused at the edge: a bad-quality reading, no value
                self.refused += 1
                log.warning("http device %s: %s", self.device, exc)
                out.append(Reading(self.device, p, None, now, Quality.BAD))
                continue
            out.append(Reading(self.device, p, value, now))
        return out

    async def subscribe(self, send: trio.MemorySendChannel[Message]) -> None:
        if self.mode == "push":
            assert self.hub is not None
            self.hub.attach(self.device, send)
            try:
                await trio.sleep_forever()
            finally:
                self.hub.detach(self.device, send)
        await poll_forever(self.device, self.read, send, self.interval, self._clock)

    async def write(self, point: str, value: Any) -> None:
        if self.mode == "push":
            assert self.hub is not None
            self.hub.queue_write(self.device, point, value)
            await trio.lowlevel.checkpoint()
            return
        if not self.write_url:
            raise BindingError(f"http device {self.device!r}: no write_url configured")
        await self._request("POST", self.write_url, json={point: value})

    async def send_command(self, name: str, params: Mapping[str, Any]) -> Any:
        if self.mode == "push":
            assert self.hub is not None
            self.hub.queue_command(self.device, name, params)
            await trio.lowlevel.checkpoint()
            return {"queued": True}
        if not self.command_url:
            raise CommandError(f"http device {self.device!r}: no command_url configured")
        resp = await self._request(
            "POST", self.command_url, json={"name": name, "params": dict(params)}
        )
        try:
            return resp.json()
        except ValueError:
            return {"status": resp.status_code}

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            with trio.move_on_after(2) as scope:
                scope.shield = True
                await client.aclose()


def _factory(
    device: str, options: Mapping[str, Any], doc: Mapping[str, Any], context: BindingContext
) -> HttpBinding:
    return HttpBinding(device, options, context)


register_binding("http", _factory)
