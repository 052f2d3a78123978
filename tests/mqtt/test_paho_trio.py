"""PahoTransport's reconnect loop against real peers: a port nobody listens on, our broker and a
Mosquitto that refuse the credentials, a broker that comes back, two clients taking one client id
over from each other. Bounds are attempt counts in a window, which the backoff's lower bound
(each delay >= half its step) guarantees — not timing thresholds."""

from __future__ import annotations

import getpass
import logging
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.mqtt.conftest import WAIT
from tests.runtime.helpers import eventually
from twin.mqtt.broker import Broker, BrokerConfig
from twin.mqtt.paho_trio import PahoTransport

WINDOW = 3.0
MOSQUITTO = ("127.0.0.1", 1883)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def most_attempts(initial: float, window: float) -> int:
    """Attempts that fit in ``window``: the first at once, then after delays of at least
    initial/2, initial, 2·initial, … (the jitter's lower bound)."""
    n, spent = 1, initial / 2
    while spent <= window:
        n += 1
        spent += initial / 2 * 2 ** (n - 1)
    return n


async def run_for(t: PahoTransport, window: float = WINDOW) -> None:
    with trio.move_on_after(window):
        await t.run()


def records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "twin.mqtt.paho_trio" and r.levelno >= logging.WARNING
    ]


async def test_nobody_listening_is_backed_off(caplog: pytest.LogCaptureFixture) -> None:
    t = PahoTransport("127.0.0.1", free_port(), client_id="flux-test-nobody")
    await run_for(t)
    assert 2 <= t.attempts <= most_attempts(0.5, WINDOW) == 4
    assert t.connects == 0 and "Connection refused" in (t.last_error or "")
    lines = records(caplog)
    assert len(lines) == 1  # the same error again within log_every: no more lines
    assert "retrying in" in lines[0].getMessage()


async def test_refused_credentials_on_our_broker(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str | None] = []

    def authenticate(cid: str, user: str | None, pw: bytes | None, cert: Any) -> Any:
        seen.append(user)
        return user if pw == b"right" else None

    b = Broker(BrokerConfig(sys_interval=0), authenticate=authenticate)
    await nursery.start(b.run)
    port = b.addresses[0][1]
    t = PahoTransport("127.0.0.1", port, client_id="c1", username="dev", password="wrong")
    await run_for(t)
    assert 2 <= t.attempts <= most_attempts(0.5, WINDOW)
    assert len(seen) == t.attempts and t.connects == 0  # every attempt reached the broker
    err = t.last_error or ""
    assert "refused client c1: Bad user name or password (0x86)" in err
    assert "hint: check the user name and password" in err
    (line,) = records(caplog)
    assert line.levelno == logging.ERROR and "\n" not in line.getMessage()

    # MQTT 3.1.1: the return code 4 is reported the same way
    t3 = PahoTransport("127.0.0.1", port, client_id="c3", username="d", password="x", protocol=4)
    await run_for(t3, 1.0)
    assert "Bad user name or password (0x86)" in (t3.last_error or "")

    # the right password: connected at the first attempt
    ok = PahoTransport("127.0.0.1", port, client_id="c2", username="dev", password="right")
    await nursery.start(ok.run)
    assert ok.connected and ok.attempts == 1


@pytest.fixture
def mosquitto_with_passwords(tmp_path: Path) -> Iterator[int]:
    """A Mosquitto of our own on a free port: user flux / password secret, no anonymous."""
    if shutil.which("mosquitto") is None:
        pytest.skip("no mosquitto binary")
    port = free_port()
    pw = tmp_path / "passwords"
    pw.touch(mode=0o600)
    subprocess.run(["mosquitto_passwd", "-b", str(pw), "flux", "secret"], check=True)
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {pw}\n"
        f"persistence false\nuser {getpass.getuser()}\n"  # as root: keep root, it owns pw
    )
    proc = subprocess.Popen(
        ["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(WAIT)


@pytest.mark.mosquitto
async def test_refused_credentials_on_mosquitto(mosquitto_with_passwords: int) -> None:
    port = mosquitto_with_passwords
    await eventually(lambda: _listening(port), within=WAIT)
    t = PahoTransport("127.0.0.1", port, client_id="flux-test-bad", username="flux",
                      password="wrong")  # fmt: skip
    await run_for(t)
    assert 2 <= t.attempts <= most_attempts(0.5, WINDOW) and t.connects == 0
    assert "Not authorized (0x87)" in (t.last_error or "")
    assert "hint: check the credentials" in (t.last_error or "")
    ok = PahoTransport("127.0.0.1", port, client_id="flux-test-ok", username="flux",
                       password="secret")  # fmt: skip
    async with trio.open_nursery() as n:
        await n.start(ok.run)
        assert ok.connected and ok.attempts == 1
        n.cancel_scope.cancel()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


async def test_broker_that_comes_back_is_reconnected(nursery: trio.Nursery) -> None:
    port = free_port()
    t = PahoTransport("127.0.0.1", port, client_id="flux-test-back", backoff_initial=0.1,
                      backoff_max=1.0)  # fmt: skip
    await nursery.start(t.run)  # reports started after the first (failed) attempt
    assert not t.connected
    await eventually(lambda: t.attempts >= 3, within=WAIT)
    b = Broker(BrokerConfig(listen=(("127.0.0.1", port),), sys_interval=0))
    await nursery.start(b.run)
    await eventually(lambda: t.connected, within=WAIT)
    assert t.connects == 1


@pytest.mark.parametrize("peer", ["ours", pytest.param("mosquitto", marks=pytest.mark.mosquitto)])
async def test_client_id_taken_over_backs_off(
    peer: str, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """Two clients with one client id: each CONNACK is followed by a takeover at once, so the
    backoff must not start over after a connect — only after a session that stayed up. Our
    broker says why (DISCONNECT 0x8E); Mosquitto 2.0 just closes the old connection."""
    if peer == "ours":
        b = Broker(BrokerConfig(sys_interval=0))
        await nursery.start(b.run)
        addr = b.addresses[0]
    elif not _listening(MOSQUITTO[1]):
        pytest.skip("no Mosquitto on 127.0.0.1:1883")
    else:
        addr = MOSQUITTO
    cid = f"flux-test-twin-{uuid.uuid4().hex[:8]}"
    ts = [PahoTransport(*addr, client_id=cid, backoff_initial=0.05) for _ in range(2)]
    with trio.move_on_after(WINDOW):
        async with trio.open_nursery() as n:
            for t in ts:
                n.start_soon(t.run)
    bound = most_attempts(0.05, WINDOW)
    assert bound == 7
    for t in ts:
        assert t.attempts <= bound  # a backoff that restarts at each CONNACK: ~40 in 3 s
    assert sum(t.connects for t in ts) >= 3  # they did take it over from each other
    hint = "another client" + (" connected" if peer == "ours" else " with the same client id")
    assert any(hint in (t.last_error or "") for t in ts)
    assert any(hint in r.getMessage() for r in records(caplog))
