"""The http binding's poll mode against a real HTTP server (stdlib, in a thread): points by
dotted path, a heartbeat when nothing is configured and the answer is empty, writes and
commands POSTed, an error status ending the subscription (the device task reconnects)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import trio

from twin.bindings.base import BindingContext, DeviceEvent, EventType, Message, Quality, Reading
from twin.bindings.http import HttpBinding
from twin.errors import BindingError


class Device(BaseHTTPRequestHandler):
    state: dict[str, Any] = {}

    def _answer(self, code: int, doc: Any) -> None:
        body = json.dumps(doc).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        st = self.server.state  # type: ignore[attr-defined]
        st["gets"] += 1
        if st["gets"] > st["good"]:
            self._answer(503, {"error": "busy"})
        else:
            self._answer(200, st["doc"])

    def do_POST(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        self.server.state["posted"].append((self.path, json.loads(self.rfile.read(n))))  # type: ignore[attr-defined]
        self._answer(200, {"ok": True})

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def device() -> Iterator[tuple[str, dict[str, Any]]]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Device)
    srv.state = {"doc": {"sensors": {"t": 21.5}, "rh": 40}, "posted": [], "gets": 0, "good": 2}  # type: ignore[attr-defined]
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", srv.state  # type: ignore[attr-defined]
    finally:
        srv.shutdown()
        srv.server_close()


async def test_poll_mode(device: tuple[str, dict[str, Any]]) -> None:
    base, state = device
    opts = {"mode": "poll", "url": f"{base}/status", "interval": "50ms",
            "write_url": f"{base}/write", "command_url": f"{base}/cmd",
            "points": {"temperature": {"path": "sensors.t"}, "rh": {}, "missing": {}}}  # fmt: skip
    b = HttpBinding("h1", opts, BindingContext())
    assert (b.mode, b.interval, b.timeout) == ("poll", 0.05, 5.0)
    assert b.points == {"temperature": "sensors.t", "rh": "rh", "missing": "missing"}
    await b.connect()
    send, receive = trio.open_memory_channel[Message](100)
    with pytest.raises(BindingError, match="503"):  # the third GET: the device is busy
        await b.subscribe(send)
    got = [receive.receive_nowait() for _ in range(6)]
    assert state["gets"] == 3
    first = {r.point: r for r in got[:3] if isinstance(r, Reading)}
    assert first["temperature"].value == 21.5 and first["rh"].value == 40
    assert first["missing"].quality is Quality.BAD
    await b.write("setpoint", 20)
    assert await b.send_command("reboot", {"delay": 1}) == {"ok": True}
    assert state["posted"] == [("/write", {"setpoint": 20}),
                               ("/cmd", {"name": "reboot", "params": {"delay": 1}})]  # fmt: skip


async def test_poll_heartbeat_when_nothing_read(device: tuple[str, dict[str, Any]]) -> None:
    base, state = device
    state["doc"] = {}
    b = HttpBinding("h2", {"mode": "poll", "url": base, "interval": "0s"}, BindingContext())
    assert b.interval == 1.0  # an interval of 0 polls once a second
    await b.connect()
    send, receive = trio.open_memory_channel[Message](10)
    async with trio.open_nursery() as n:
        n.start_soon(b.subscribe, send)
        m = await receive.receive()
        n.cancel_scope.cancel()
    assert isinstance(m, DeviceEvent) and m.type is EventType.HEARTBEAT
