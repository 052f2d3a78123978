"""The modbus binding against a real peer: a pymodbus server in another process
(tests/bindings/modbus_peer.py) with values computed from the clock in all four float orders,
writes read back, a dead unit on a shared gateway, RTU over TCP, RTU through a socat pty pair.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from twin.bindings import aio
from twin.bindings.base import Quality, Reading
from twin.bindings.modbus import POOL, ModbusBinding, ModbusTimeout
from twin.errors import BindingConnectError, CommandError

PEER = Path(__file__).with_name("modbus_peer.py")
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_peer(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(PEER), *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True, env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"modbus peer did not start: {line!r}")
    return proc


def stop(proc: subprocess.Popen[Any]) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def peer_on_a_free_port(units: str) -> Iterator[int]:
    """A modbus peer serving ``units`` (comma-separated ids) for the block: its port."""
    port = free_port()
    proc = start_peer("--port", str(port), "--units", units)
    try:
        yield port
    finally:
        stop(proc)


@pytest.fixture
def peer() -> Iterator[int]:
    with peer_on_a_free_port("1,3") as port:
        yield port


@pytest.fixture(autouse=True)
def _bridge() -> Iterator[None]:
    yield
    assert not POOL.lines, "a line was left open"
    aio.shutdown()


CLOCK_POINTS = {
    "t_abcd": {"register": 30001, "type": "float32", "order": "ABCD"},
    "t_badc": {"register": 30003, "type": "float32", "order": "BADC"},
    "t_cdab": {"register": 30005, "type": "float32", "order": "CDAB"},
    "t_dcba": {"register": 30007, "type": "float32", "order": "DCBA"},
    "now": {"register": 30009, "type": "float64"},
    "now_le": {"register": 30013, "type": "float64", "order": "DCBA"},
    "secs": {"register": 30017, "type": "uint32"},
    "neg": {"register": 30019, "type": "int16"},
    "label": {"register": 30021, "type": "string", "count": 4},
    "unit_hr": {"register": 40001},
    "di": {"register": 10001},
    "setpoint": {"register": 40011, "type": "float32", "order": "CDAB", "access": "readwrite"},
    "speed": {"register": 40013, "type": "int16", "scale": 0.1, "access": "readwrite"},
    "flag": {"register": "40015.3", "access": "readwrite"},
    "relay": {"register": 1, "access": "readwrite"},
    "big": {"register": 40021, "type": "int64", "order": "BADC", "access": "readwrite"},
}


def binding(port: int, unit: int = 1, points: dict[str, Any] | None = None, **extra: Any) -> ModbusBinding:
    opts = {"host": "127.0.0.1", "port": port, "unit": unit, "timeout": "300ms", "retries": 0,
            "points": points or CLOCK_POINTS, **extra}
    return ModbusBinding(f"plc{unit}", opts)


def by_point(readings: list[Reading]) -> dict[str, Reading]:
    return {r.point: r for r in readings}


async def test_reads_clock_values_in_all_four_float_orders(peer: int) -> None:
    b = binding(peer, unit=3)
    await b.connect()
    try:
        before = time.time()
        got = by_point(await b.read())
        after = time.time()
    finally:
        await b.close()
    assert all(r.quality is Quality.GOOD for r in got.values())
    t = [got[k].value for k in ("t_abcd", "t_badc", "t_cdab", "t_dcba")]
    assert t[0] == t[1] == t[2] == t[3]  # one float, four encodings
    assert before % 100000 - 0.02 <= t[0] <= after % 100000 + 0.02  # float32 near 1e5: ±0.008
    assert before <= got["now"].value <= after
    assert got["now_le"].value == got["now"].value
    assert int(before) <= got["secs"].value <= int(after)
    assert got["neg"].value == -3
    assert got["label"].value == "FLUX-U3"
    assert got["unit_hr"].value == 3
    assert got["di"].value is True


def test_read_quality_good_stale_bad() -> None:
    """A peer that stops answering (SIGSTOP) after a good read: the next read re-reports the
    last good values as stale; an address the unit refuses is bad (no value)."""
    import signal

    port = free_port()
    proc = start_peer("--port", str(port), "--units", "1")

    async def main() -> tuple[dict[str, Reading], dict[str, Reading], dict[str, Reading]]:
        pts = {"neg": CLOCK_POINTS["neg"], "unit_hr": CLOCK_POINTS["unit_hr"]}
        b = binding(port, unit=1, points=pts)
        refused = binding(port, unit=1, points={"far": {"register": 49001}})
        await b.connect()
        await refused.connect()
        try:
            good = by_point(await b.read())
            bad = by_point(await refused.read())
            proc.send_signal(signal.SIGSTOP)
            try:
                stale = by_point(await b.read())
            finally:
                proc.send_signal(signal.SIGCONT)
        finally:
            await refused.close()
            await b.close()
        return good, stale, bad

    try:
        good, stale, bad = trio.run(main)
    finally:
        stop(proc)
    assert {r.quality for r in good.values()} == {Quality.GOOD}
    assert {k: (r.value, r.quality) for k, r in stale.items()} == {
        "neg": (-1, Quality.STALE), "unit_hr": (1, Quality.STALE)}
    assert stale["neg"].ts >= good["neg"].ts
    assert bad["far"].quality is Quality.BAD and bad["far"].value is None


async def test_coalesced_into_few_requests(peer: int) -> None:
    b = binding(peer, unit=3)
    await b.connect()
    try:
        assert b.line is not None
        before = b.line.requests
        await b.read()
        # FC 4 0-23, FC 3 0 and 10-23 (a gap of 9 > max_gap 8), FC 2, FC 1: 5 for 16 points
        assert b.line.requests - before == 5
    finally:
        await b.close()


async def test_writes_are_read_back(peer: int) -> None:
    b = binding(peer)
    await b.connect()
    try:
        await b.write("setpoint", 42.5)
        await b.write("speed", 73.4)
        await b.write("flag", True)
        await b.write("relay", True)
        await b.write("big", -(2**62) - 5)
        got = by_point(await b.read())
        assert got["setpoint"].value == 42.5
        assert got["speed"].value == pytest.approx(73.4)
        assert got["flag"].value is True
        assert got["relay"].value is True
        assert got["big"].value == -(2**62) - 5
        await b.write("flag", False)
        assert by_point(await b.read(["flag"]))["flag"].value is False
        with pytest.raises(CommandError, match="read-only"):
            await b.write("now", 1.0)
        with pytest.raises(CommandError, match="out of range"):
            await b.write("speed", 5000)
    finally:
        await b.close()


async def test_command_writes_what_the_model_sets(peer: int) -> None:
    model = {"commands": {"set_speed": {"sets": {"speed": {"param": "value"}}}}}
    b = ModbusBinding("plc1", {"host": "127.0.0.1", "port": peer, "unit": 1, "timeout": "300ms",
                               "points": CLOCK_POINTS}, model)
    await b.connect()
    try:
        assert await b.send_command("set_speed", {"value": 12.5}) == {"ok": True, "written": {"speed": 12.5}}
        assert by_point(await b.read(["speed"]))["speed"].value == pytest.approx(12.5)
        with pytest.raises(CommandError):
            await b.send_command("reboot", {})
    finally:
        await b.close()


async def test_modbus_exception_marks_points_bad(peer: int) -> None:
    b = binding(peer, points={"ok": {"register": 30001, "type": "float32"},
                              "missing": {"register": 39000}})
    await b.connect()
    try:
        got = by_point(await b.read())
    finally:
        await b.close()
    assert got["ok"].quality is Quality.GOOD
    assert got["missing"].quality is Quality.BAD and got["missing"].value is None


async def test_a_dead_unit_on_a_shared_gateway_does_not_stall_the_others(peer: int) -> None:
    """Units 1 and 3 answer, unit 2 is dead. All three share one connection; the live ones keep
    polling every 100 ms while the dead one times out, goes stale, and ends its session."""
    pts = {"t": {"register": 30001, "type": "float32"}}
    live = [binding(peer, unit=u, points=pts, poll="100ms") for u in (1, 3)]
    dead = binding(peer, unit=2, points=pts, poll="100ms")
    received: dict[str, list[Reading]] = {"plc1": [], "plc2": [], "plc3": []}
    dead_error: list[BaseException] = []
    live_when_dead_gave_up: dict[str, int] = {}

    async def run(b: ModbusBinding) -> None:
        send, receive = trio.open_memory_channel[Any](1000)

        async def collect() -> None:
            async for r in receive:
                received[b.device].append(r)

        async with trio.open_nursery() as n:
            n.start_soon(collect)
            try:
                await b.subscribe(send)
            except ModbusTimeout as exc:
                dead_error.append(exc)
                live_when_dead_gave_up.update({k: len(v) for k, v in received.items()})
            finally:
                send.close()

    for b in (*live, dead):
        await b.connect()
    assert live[0].line is dead.line  # one shared connection
    try:
        with trio.fail_after(60):  # until the dead unit gives up (~1 s; generous under load)
            async with trio.open_nursery() as n:
                for b in (*live, dead):
                    n.start_soon(run, b)
                while not dead_error:  # noqa: ASYNC110 - a plain flag set by a sibling
                    await trio.sleep(0.05)
                n.cancel_scope.cancel()
    finally:
        for b in (*live, dead):
            await b.close()
    assert dead_error and "silent for 3 poll cycles" in str(dead_error[0])
    assert received["plc2"] == []  # never a value it did not read
    for name in ("plc1", "plc3"):
        # while the dead unit was being tried (3 cycles of a 300 ms timeout on the shared
        # connection) the live ones kept polling: good readings each (how many depends on how
        # much CPU the machine gives the peer process; a stall would give none)
        assert live_when_dead_gave_up[name] >= 1, live_when_dead_gave_up
        assert all(r.quality is Quality.GOOD for r in received[name])


async def test_unreachable_gateway_backs_off() -> None:
    port = free_port()  # nothing listens
    b = binding(port)
    try:
        with pytest.raises(BindingConnectError, match="cannot connect"):
            await b.connect()
        with pytest.raises(BindingConnectError, match="next attempt in"):
            await b.connect()  # within the line's backoff: not even tried
    finally:
        await b.close()


async def test_peer_restart_reconnects(peer: int) -> None:
    port = free_port()
    proc = start_peer("--port", str(port), "--units", "1")
    b = binding(port, points={"u": {"register": 40001}})
    try:
        await b.connect()
        assert by_point(await b.read())["u"].value == 1
        stop(proc)
        noticed = False  # an error, or the last value marked not good (stale): either says so
        for _ in range(5):
            try:
                got = by_point(await b.read())
            except (BindingConnectError, ModbusTimeout):
                noticed = True
                break
            if got["u"].quality is not Quality.GOOD:
                noticed = True
                break
        assert noticed, "five reads of a stopped peer all came back good"
        proc = start_peer("--port", str(port), "--units", "1")
        assert b.line is not None
        b.line.next_connect = 0  # skip the backoff wait
        await b.connect()
        assert by_point(await b.read())["u"].value == 1
    finally:
        await b.close()
        stop(proc)


async def test_rtu_over_tcp() -> None:
    port = free_port()
    proc = start_peer("--port", str(port), "--framing", "rtu", "--units", "5")
    b = binding(port, unit=5, framing="rtu", points={"u": {"register": 40001}, "neg": {"register": 30019}})
    try:
        await b.connect()
        got = by_point(await b.read())
        assert got["u"].value == 5 and got["neg"].value == -5
    finally:
        await b.close()
        stop(proc)


@pytest.fixture
def pty_pair(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """Two linked pseudo-terminals (a serial cable) from socat."""
    assert shutil.which("socat"), "socat is needed (apt-get install socat)"
    a, z = tmp_path / "ttyA", tmp_path / "ttyZ"
    socat = subprocess.Popen(
        ["socat", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={z}"],
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            if a.exists() and z.exists():
                break
            time.sleep(0.05)
        yield a, z
    finally:
        socat.terminate()
        socat.wait()


async def test_rtu_through_a_socat_pty_pair(pty_pair: tuple[Path, Path]) -> None:
    """Required (not skipped): .ci/run installs socat, pyserial is a dependency."""
    a, z = pty_pair
    proc = None
    try:
        proc = start_peer("--serial", str(z), "--units", "7")
        opts = {"serial": {"device": str(a), "baud": 19200}, "unit": 7, "timeout": "500ms",
                "points": {"u": {"register": 40001}, "t": {"register": 30001, "type": "float32"},
                           "sp": {"register": 40011, "access": "readwrite"}}}
        b = ModbusBinding("rtu7", opts)
        dead = ModbusBinding("rtu8", {**opts, "unit": 8})
        try:
            await b.connect()
            await dead.connect()
            got = by_point(await b.read())
            assert got["u"].value == 7
            assert abs(got["t"].value - time.time() % 100000) < 5
            await b.write("sp", 1234)
            assert by_point(await b.read(["sp"]))["sp"].value == 1234
            stale = by_point(await dead.read())  # unit 8 is not on the line
            assert stale == {}  # nothing read yet: no stale values either
            assert dead.silent_cycles == 1
            assert by_point(await b.read())["u"].value == 7  # the line still works
        finally:
            await b.close()
            await dead.close()
    finally:
        if proc is not None:
            stop(proc)


async def _bad_peer(listeners: list[trio.SocketListener], mode: str) -> None:
    """A raw TCP peer answering every Modbus TCP request wrongly: ``short`` (a well-formed
    reply with one register whatever was asked) or ``garbage`` (bytes that are no frame)."""

    async def handle(stream: trio.SocketStream) -> None:
        buf = b""
        try:
            async for data in stream:
                buf += data
                while len(buf) >= 12:
                    req, buf = buf[:12], buf[12:]
                    tid, unit, fc = req[0:2], req[6], req[7]
                    if mode == "short":
                        pdu = bytes([fc, 2, 0, 42])
                        await stream.send_all(tid + b"\0\0" + (len(pdu) + 1).to_bytes(2, "big") + bytes([unit]) + pdu)
                    else:
                        await stream.send_all(b"\xff\x13\x37garbage\x00\x01" * 3)
        except trio.BrokenResourceError:
            pass

    await trio.serve_listeners(handle, listeners)


@pytest.mark.parametrize("mode", ["short", "garbage"])
async def test_malformed_replies_are_logged_dropped_and_harm_nobody(
    mode: str, peer: int, caplog: pytest.LogCaptureFixture
) -> None:
    """``short``: a well-formed reply of the wrong length marks the points bad. ``garbage``:
    bytes that are no Modbus TCP frame close that one connection (the read fails with a
    connection error; tests/bindings/test_modbus_transport.py shows the reconnect)."""
    from twin.bindings.modbus import STATS

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    bad = ModbusBinding("bad_plc", {"host": "127.0.0.1", "port": port, "unit": 1, "timeout": "200ms",
                                    "retries": 0, "points": {"a": {"register": 40001, "type": "float32"},
                                                             "b": {"register": 40003}}})
    good = binding(peer, points={"u": {"register": 40001}})
    malformed = STATS.malformed
    async with trio.open_nursery() as n:
        n.start_soon(_bad_peer, listeners, mode)
        try:
            await bad.connect()
            await good.connect()
            for _ in range(2):
                if mode == "short":
                    got = by_point(await bad.read())
                    assert all(r.quality is not Quality.GOOD for r in got.values())
                else:
                    assert bad.line is not None
                    bad.line.next_connect = 0  # skip the backoff: garbage again
                    with pytest.raises(BindingConnectError, match="not a Modbus stream"):
                        await bad.read()
                assert by_point(await good.read())["u"].value == 1  # the other device is fine
        finally:
            await bad.close()
            await good.close()
            n.cancel_scope.cancel()
    assert STATS.malformed >= malformed + 2
    if mode == "short":
        assert any("bad_plc" in r.getMessage() and "malformed" in r.getMessage() for r in caplog.records)
    else:
        assert any("bad_plc" in r.getMessage() and "malformed modbus frame" in r.getMessage()
                   for r in caplog.records)
