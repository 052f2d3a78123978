"""The Trio-native Modbus TCP / RTU-over-TCP transport (twin/bindings/modbus_transport.py)
under the binding's Line, against real peers: a pymodbus server in another process
(tests/bindings/modbus_peer.py), a raw Trio proxy in front of it that holds back a reply, a
raw Trio peer that talks garbage, and a peer process killed while a request waits."""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest
import trio

from tests.bindings.test_modbus_binding import (
    CLOCK_POINTS,
    binding,
    by_point,
    free_port,
    peer_on_a_free_port,
    start_peer,
    stop,
)
from twin.bindings import aio
from twin.bindings.base import Quality
from twin.bindings.modbus import (
    POOL,
    STATS,
    LinePool,
    ModbusError,
    ModbusTimeout,
    _request,
    _write_request,
)
from twin.bindings.modbus_codec import Block
from twin.bindings.modbus_transport import TcpTransport
from twin.errors import BindingConnectError


@pytest.fixture(autouse=True)
def _no_lines_left() -> Any:
    yield
    assert not POOL.lines, "a line was left open"
    aio.shutdown()


FLOATS = {k: CLOCK_POINTS[k] for k in ("t_abcd", "t_badc", "t_cdab", "t_dcba", "now", "now_le", "label")}


@pytest.mark.parametrize("framing", ["socket", "rtu"])
async def test_all_four_float_orders_over_trio(framing: str) -> None:
    port = free_port()
    proc = start_peer("--port", str(port), "--framing", framing, "--units", "3")
    b = binding(port, unit=3, points=FLOATS, framing=framing)
    try:
        await b.connect()
        assert b.line is not None and isinstance(b.line.transport, TcpTransport)
        before = time.time()
        got = by_point(await b.read())
        after = time.time()
    finally:
        await b.close()
        stop(proc)
    assert {r.quality for r in got.values()} == {Quality.GOOD}
    t = [got[k].value for k in ("t_abcd", "t_badc", "t_cdab", "t_dcba")]
    assert t[0] == t[1] == t[2] == t[3]
    assert before % 100000 - 0.02 <= t[0] <= after % 100000 + 0.02
    assert before <= got["now"].value == got["now_le"].value <= after
    assert got["label"].value == "FLUX-U3"


async def _holding_proxy(listeners: list[trio.SocketListener], upstream: int) -> None:
    """Forwards to the pymodbus peer; the peer's first reply is held back until its second
    comes, then both go out in one write (a late reply right before the current one)."""

    async def handle(client: trio.SocketStream) -> None:
        async with await trio.open_tcp_stream("127.0.0.1", upstream) as server:
            held: list[bytes] = []
            try:
                async with trio.open_nursery() as n:

                    async def up() -> None:
                        async for data in client:
                            await server.send_all(data)
                        n.cancel_scope.cancel()

                    async def down() -> None:
                        first = True
                        async for data in server:
                            if first:
                                first = False
                                held.append(data)
                                continue
                            await client.send_all(b"".join(held) + data)
                            held.clear()

                    n.start_soon(up)
                    n.start_soon(down)
            except* (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    await trio.serve_listeners(handle, listeners)


async def test_a_late_reply_after_a_timeout_is_not_taken_as_the_next_reply() -> None:
    """Request 1 (holding register 0 = the unit id, 1) times out; its reply then arrives
    just before the reply to request 2 (register 1 = 0). The transaction id tells them apart:
    request 2 gets 0, and the late reply is counted as late."""
    with peer_on_a_free_port("1") as upstream:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        pool = LinePool()
        async with trio.open_nursery() as n:
            n.start_soon(_holding_proxy, listeners, upstream)
            line = pool.acquire({"host": "127.0.0.1", "port": port, "timeout": "300ms"})
            try:
                async with line.lock:
                    await line._ensure()
                with pytest.raises(ModbusTimeout):
                    await line.call("plc1", _request(Block(3, 0, 1, []), 1), 0.3, 0)
                reply = await line.call("plc1", _request(Block(3, 1, 1, []), 1), 2.0, 0)
                assert list(reply.registers) == [0]
                assert line.transport.late == 1
                reply = await line.call("plc1", _request(Block(3, 0, 1, []), 1), 2.0, 0)
                assert list(reply.registers) == [1]  # the line goes on in step
                with pytest.raises(ModbusError, match="request not sent"):  # pymodbus refuses to encode it
                    await line.call("plc1", _write_request(16, 70000, 1, [1]), 2.0, 0)
                reply = await line.call("plc1", _request(Block(3, 0, 1, []), 1), 2.0, 0)
                assert list(reply.registers) == [1]
            finally:
                await pool.release(line)
                n.cancel_scope.cancel()


async def _peer_garbage_first(listeners: list[trio.SocketListener], connections: list[int]) -> None:
    """A raw Modbus TCP peer: on its first connection every request is answered with bytes
    that are no frame; on later ones, with a well-formed reply of registers 42, 43, ..."""

    async def handle(stream: trio.SocketStream) -> None:
        connections.append(1)
        garbage = len(connections) == 1
        buf = b""
        try:
            async for data in stream:
                buf += data
                while len(buf) >= 12:
                    req, buf = buf[:12], buf[12:]
                    if garbage:
                        await stream.send_all(b"\xff\x13\x37 not modbus \x00\x01" * 3)
                        continue
                    count = int.from_bytes(req[10:12], "big")
                    pdu = bytes([req[7], 2 * count]) + b"".join((42 + i).to_bytes(2, "big") for i in range(count))
                    await stream.send_all(req[0:4] + (len(pdu) + 1).to_bytes(2, "big") + req[6:7] + pdu)
        except trio.BrokenResourceError:
            pass

    await trio.serve_listeners(handle, listeners)


async def test_a_garbage_stream_is_counted_closed_and_reconnected(caplog: pytest.LogCaptureFixture) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    connections: list[int] = []
    pool = LinePool()
    b = binding(port, points={"a": {"register": 40001}, "b": {"register": 40002}})
    b.pool = pool
    malformed = STATS.malformed
    async with trio.open_nursery() as n:
        n.start_soon(_peer_garbage_first, listeners, connections)
        try:
            await b.connect()
            assert b.line is not None
            with pytest.raises(BindingConnectError, match="not a Modbus stream"):
                await b.read()
            assert not b.line.connected  # that connection is closed
            with trio.fail_after(10):  # reconnects once its backoff (0.5 s) has passed
                while True:
                    try:
                        got = by_point(await b.read())
                        break
                    except BindingConnectError as exc:
                        assert "next attempt" in str(exc)
                        await trio.sleep(0.1)
        finally:
            await b.close()
            n.cancel_scope.cancel()
    assert {k: (r.value, r.quality) for k, r in got.items()} == {"a": (42, Quality.GOOD), "b": (43, Quality.GOOD)}
    assert len(connections) == 2
    assert STATS.malformed == malformed + 1
    warned = [r.getMessage() for r in caplog.records if "malformed modbus frame" in r.getMessage()]
    assert len(warned) == 1 and "device plc1" in warned[0] and "socket or rtu" in warned[0]


async def test_a_peer_that_vanishes_mid_request() -> None:
    """The pymodbus peer is stopped (SIGSTOP) so a request waits, then killed: the request
    ends with a connection error at once (not after its 30 s timeout), and the line
    reconnects to a new peer on the same port."""
    port = free_port()
    proc = start_peer("--port", str(port), "--units", "1")
    b = binding(port, points={"u": {"register": 40001}}, timeout="30s")
    errors: list[BaseException] = []
    try:
        await b.connect()
        assert by_point(await b.read())["u"].value == 1

        async def read() -> None:
            try:
                await b.read()
            except BindingConnectError as exc:
                errors.append(exc)

        proc.send_signal(signal.SIGSTOP)
        with trio.fail_after(20):
            async with trio.open_nursery() as n:
                n.start_soon(read)
                assert b.line is not None
                while b.line.requests < 2:  # noqa: ASYNC110 - a counter the read task bumps
                    await trio.sleep(0.01)
                await trio.sleep(0.2)  # the request is on the wire, waiting
                proc.kill()
                proc.wait()
        assert len(errors) == 1 and "connection lost" in str(errors[0]), errors
        assert not b.line.connected
        proc = start_peer("--port", str(port), "--units", "1")
        got = by_point(await b.read())  # reopened at the next request
        assert got["u"].value == 1 and got["u"].quality is Quality.GOOD
    finally:
        await b.close()
        stop(proc)

