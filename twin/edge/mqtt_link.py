"""The edge's MQTT transport (``uplink.url: mqtt://HOST:PORT`` or ``mqtts://HOST:PORT``): the
operations of ``twin/edge/transport.py`` as requests and replies through a broker — the
cloud's embedded one or an external one (Mosquitto) that the cloud engine is connected to.

::

    edge ──PUBLISH QoS 1 flux/_edge/<edge>/req  {"id", "op", "key", "body"}──▶ broker ──▶ cloud
    edge ◀─PUBLISH QoS 1 flux/_edge/<edge>/resp {"id", "status", "body", "retry_after"}── cloud

The edge connects as user ``edge:<edge>`` with its uplink key as the password (the embedded
broker checks it and lets the edge publish and subscribe on its own two topics only,
``twin/runtime/mqtt_auth.py``); the key also rides in every request, so the cloud checks it
whichever broker carried the request. MQTT 5, a persistent session (client id
``flux-edge-<edge>``): a reply published while the edge was away is delivered when it is back.

QoS 1 only gets a request to the broker; what makes an upload delivered is the cloud's reply,
sent once the records are durably stored: the edge deletes records only on that reply, as over
HTTPS (the outbox, the sequence numbers and the cloud's dedup are the same). No reply within
the timeout is :class:`~twin.edge.transport.LinkDown`: the uplink retries, and a request
delivered twice (QoS 1 re-sends it after a reconnect) is skipped by the cloud's dedup.
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
from typing import Any

import trio

from twin.edge.transport import LinkDown, Reply, client_tls
from twin.mqtt.hub import InMessage, MqttHub
from twin.mqtt.paho_trio import PahoTransport
from twin.mqtt.topics import edge_link_topics
from twin.runtime.mqtt_service import parse_hostport

log = logging.getLogger(__name__)


class MqttTransport:
    def __init__(self, url: str, edge: str, key: str, *, verify: Any = True,
                 backoff: tuple[float, float] = (0.5, 30.0), keepalive: int = 10) -> None:  # fmt: skip
        scheme, _, rest = url.partition("://")
        host, port = parse_hostport(rest.rstrip("/"), 8883 if scheme == "mqtts" else 1883)
        self.description = f"{scheme}://{host}:{port}"
        self.edge, self.key = edge, key
        self.req_topic, self.resp_topic = edge_link_topics(edge)
        self.client = PahoTransport(
            host, port, client_id=f"flux-edge-{edge}", username=f"edge:{edge}", password=key,
            tls=client_tls(verify) if scheme == "mqtts" else None, protocol=5,
            keepalive=keepalive, backoff_initial=backoff[0], backoff_max=backoff[1],
        )  # fmt: skip
        self.hub = MqttHub(self.client)
        self.client.hub = self.hub
        self._waiting: dict[str, tuple[trio.Event, list[Reply]]] = {}
        self.replies = 0
        self.stray = 0

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.client.run)
            await self.hub.route(self.resp_topic, self._on_reply, qos=1)
            task_status.started(self)

    def _on_reply(self, msg: InMessage) -> None:
        try:
            data = json.loads(msg.payload)
            rid = str(data["id"])
            status = int(data["status"])
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("edge mqtt: a reply that is not one (%s) skipped", exc)
            return
        waiter = self._waiting.pop(rid, None)
        if waiter is None:
            self.stray += 1  # the answer to a request that timed out (or from a past session)
            return
        body = data.get("body")
        if data.get("encoding") == "base64" and isinstance(body, str):
            body = base64.b64decode(body)
        waiter[1].append(Reply(status, body, float(data.get("retry_after") or 0)))
        waiter[0].set()
        self.replies += 1

    async def request(self, op: str, body: bytes | None = None, *, limit: float) -> Reply:
        if not self.client.connected:
            why = self.client.last_error or "connecting"
            raise LinkDown(f"MQTT broker {self.description} not connected ({why})")
        rid = uuid.uuid4().hex
        head = json.dumps({"id": rid, "op": op, "key": self.key}, separators=(",", ":"))
        payload = head[:-1].encode() + (b',"body":' + body + b"}" if body is not None else b"}")
        ev, box = trio.Event(), list[Reply]()
        self._waiting[rid] = (ev, box)
        try:
            try:
                await self.hub.publish(self.req_topic, payload, qos=1)
            except Exception as exc:  # BindingConnectError: the connection went away
                raise LinkDown(str(exc)) from exc
            with trio.move_on_after(limit * 2):
                await ev.wait()
        finally:
            self._waiting.pop(rid, None)
        if not box:
            raise LinkDown(f"no reply from the cloud through {self.description} in "
                           f"{limit * 2:.0f}s")  # fmt: skip
        return box[0]


__all__ = ["MqttTransport"]
