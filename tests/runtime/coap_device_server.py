"""A constrained device that is a CoAP *server* (aiocoap, its own process): the peer of the
coap binding's poll/observe modes.

    python tests/runtime/coap_device_server.py PORT

    GET  /sensors   (observable) {"t": 21.5 + n/10, "rh": 40, "ts": <now>} every 0.2 s
    PUT  /config    {point: value} -> remembered, reported in /sensors
    POST /cmd       {"name", "params"} -> 2.04 {"done": name}; name "fail" -> 4.00
    GET  /junk      invalid JSON (a malformed answer)
    GET  /th8       (observable) an 8-byte ACME TH-8 frame (binary, Content-Format 42):
                    a5 01, int16 BE temperature 21.5 + n/10 (0.01 degC), humidity 40 %, 3000 mV
    POST /th8/cmd   any bytes -> 2.04 with the same bytes reversed (binary)
    GET  /th8/junk  b"junk" (not a TH-8 frame)
"""

from __future__ import annotations

import asyncio
import json
import struct
import sys
import time
from typing import Any

import aiocoap
from aiocoap import resource


class Sensors(resource.ObservableResource):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0
        self.config: dict[str, Any] = {}
        self.th8: Any = None

    async def tick(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            self.n += 1
            self.updated_state()
            if self.th8 is not None:
                self.th8.updated_state()

    async def render_get(self, request: Any) -> Any:
        doc = {"t": 21.5 + self.n / 10, "rh": 40, "ts": time.time(), **self.config}
        return aiocoap.Message(payload=json.dumps(doc).encode(), content_format=50)


class Config(resource.Resource):
    def __init__(self, sensors: Sensors) -> None:
        super().__init__()
        self.sensors = sensors

    async def render_put(self, request: Any) -> Any:
        self.sensors.config.update(json.loads(request.payload))
        return aiocoap.Message(code=aiocoap.CHANGED)


class Cmd(resource.Resource):
    async def render_post(self, request: Any) -> Any:
        doc = json.loads(request.payload)
        if doc["name"] == "fail":
            return aiocoap.Message(code=aiocoap.BAD_REQUEST, payload=b"refused")
        return aiocoap.Message(code=aiocoap.CHANGED, content_format=50,
                               payload=json.dumps({"done": doc["name"]}).encode())


class Th8(resource.ObservableResource):
    def __init__(self, sensors: Sensors) -> None:
        super().__init__()
        self.sensors = sensors

    async def render_get(self, request: Any) -> Any:
        t = 21.5 + self.sensors.n / 10
        frame = b"\xa5\x01" + struct.pack(">hHH", round(t * 100), 4000, 3000)
        return aiocoap.Message(payload=frame, content_format=42)


class Th8Cmd(resource.Resource):
    async def render_post(self, request: Any) -> Any:
        return aiocoap.Message(code=aiocoap.CHANGED, payload=bytes(request.payload)[::-1],
                               content_format=42)


class Th8Junk(resource.Resource):
    async def render_get(self, request: Any) -> Any:
        return aiocoap.Message(payload=b"junk", content_format=42)


class Junk(resource.Resource):
    async def render_get(self, request: Any) -> Any:
        return aiocoap.Message(payload=b"{oops", content_format=50)


async def main(port: int) -> None:
    site = resource.Site()
    sensors = Sensors()
    site.add_resource(["sensors"], sensors)
    site.add_resource(["config"], Config(sensors))
    site.add_resource(["cmd"], Cmd())
    site.add_resource(["junk"], Junk())
    th8 = Th8(sensors)
    sensors.th8 = th8
    site.add_resource(["th8"], th8)
    site.add_resource(["th8", "cmd"], Th8Cmd())
    site.add_resource(["th8", "junk"], Th8Junk())
    await aiocoap.Context.create_server_context(site, bind=("127.0.0.1", port))
    print("ready", flush=True)
    await sensors.tick()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
