from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import trio

from twin.mqtt import codec as c
from twin.mqtt.broker import Broker, BrokerConfig

from .conftest import Client, Raw, run_sync


def _start(state: Path) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "twin.mqtt",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            str(state),
            "--sys-interval",
            "0",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("mqtt 127.0.0.1:"), line
    return proc, int(line.rsplit(":", 1)[1])


def test_queued_qos1_survives_kill_9(tmp_path: Path) -> None:
    proc, port = _start(tmp_path)
    try:
        sub = Client(port, "persist", clean=False)
        sub.subscribe("p/#", 1)
        sub.close()
        pub = Client(port, "pub")
        pub.publish("p/1", b"queued", 1)  # PUBACKed => journaled
        pub.publish("keep", b"retained", 1, retain=True)
        pub.close()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    proc, port = _start(tmp_path)
    try:
        sub = Client(port, "persist", clean=False)
        assert sub.connack is not None and sub.connack[0].session_present
        m = sub.get()
        assert (m.topic, m.payload, m.qos) == ("p/1", b"queued", 1)
        sub.subscribe("keep", 1)  # retained survives as well
        assert sub.get().payload == b"retained"
        sub.close()
    finally:
        proc.terminate()
        proc.wait()


async def test_inflight_and_qos2_state_survive_restart(tmp_path: Path) -> None:
    cfg = BrokerConfig(sys_interval=0, state_dir=str(tmp_path))

    async with trio.open_nursery() as nursery:
        b = Broker(cfg)
        await nursery.start(b.run)
        port = b.addresses[0][1]

        def phase1() -> int:
            r = Raw(port, 5)
            r.connect(
                "dev", clean_start=False, properties=c.Properties(session_expiry_interval=3600)
            )
            r.send(
                c.Subscribe(
                    1, (c.Subscription("x/#", 2),), c.Properties(subscription_identifier=(9,))
                )
            )
            assert isinstance(r.recv(), c.Suback)
            r.send(c.Publish("in/2", b"half", 2, packet_id=33))
            ack = r.recv()
            assert isinstance(ack, c.Pubrec) and ack.packet_id == 33
            pub = Client(port, "pub", v5=True)
            pub.publish("x/1", b"flying", 2)
            m = r.recv()
            assert isinstance(m, c.Publish) and m.payload == b"flying"
            r.close()
            pub.close()
            return m.packet_id or 0

        pid = await run_sync(phase1)
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        b = Broker(cfg)
        await nursery.start(b.run)
        port = b.addresses[0][1]

        def phase2() -> None:
            r = Raw(port, 5)
            ack = r.connect(
                "dev", clean_start=False, properties=c.Properties(session_expiry_interval=3600)
            )
            assert ack.session_present
            m = r.recv()
            assert (
                isinstance(m, c.Publish) and m.dup and m.packet_id == pid and m.payload == b"flying"
            )
            assert m.properties.subscription_identifier == (9,)
            r.send(c.Publish("in/2", b"half", 2, dup=True, packet_id=33))
            assert r.recv() == c.Pubrec(33)  # still known: not delivered twice
            r.send(c.Pubrel(33))
            assert r.recv() == c.Pubcomp(33)
            r.close()

        await run_sync(phase2)
        nursery.cancel_scope.cancel()
