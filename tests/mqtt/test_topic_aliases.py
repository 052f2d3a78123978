"""Server → client topic aliases are a broker option, off by default.

libmosquitto (mosquitto_sub 2.0.11) announces a topic alias maximum when asked to, then drops
the connection with "protocol error" on the first PUBLISH that uses one (it received 1 of 5).
"""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
import trio

from twin.mqtt.broker import Broker, BrokerConfig

from .conftest import WAIT, Client, port_of, props, run_sync


async def _broker(nursery: trio.Nursery, **kw: bool) -> Broker:
    b = Broker(BrokerConfig(sys_interval=0, **kw))
    await nursery.start(b.run)
    return b


def _paho_aliases(port: int) -> list[tuple[str, int | None]]:
    """Topic and TopicAlias property of 5 messages on 2 topics, to a paho v5 client that
    allows 10 aliases."""
    sub = Client(port, "paho-alias", v5=True, connect_props=props("CONNECT", TopicAliasMaximum=10))
    sub.subscribe("al/#", 1)
    pub = Client(port, "paho-pub", v5=True)
    for i in range(5):
        pub.publish(f"al/{i % 2}", str(i).encode(), 1)
    got = [sub.get() for _ in range(5)]
    sub.close()
    pub.close()
    return [(m.topic, getattr(m.properties, "TopicAlias", None)) for m in got]


async def test_no_server_aliases_by_default(nursery: trio.Nursery) -> None:
    b = await _broker(nursery)
    got = await run_sync(_paho_aliases, port_of(b))
    assert got == [(f"al/{i % 2}", None) for i in range(5)]


async def test_server_aliases_when_enabled(nursery: trio.Nursery) -> None:
    b = await _broker(nursery, server_topic_aliases=True)
    got = await run_sync(_paho_aliases, port_of(b))
    # the topic once per alias, then the alias alone (paho 2.2 does not map it back either:
    # another client that aliases would confuse, so they stay opt-in)
    assert got == [("al/0", 1), ("al/1", 2), ("", 1), ("", 2), ("", 1)]


@pytest.mark.mosquitto  # CI (TWIN_REQUIRE_MOSQUITTO=1): a missing mosquitto_sub fails, not skips
@pytest.mark.skipif(shutil.which("mosquitto_sub") is None, reason="mosquitto-clients not installed")
async def test_mosquitto_sub_receives_every_message(nursery: trio.Nursery) -> None:
    b = await _broker(nursery)
    port = port_of(b)

    def scenario() -> subprocess.CompletedProcess[str]:
        proc = subprocess.Popen(
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-V", "mqttv5", "-i", "msub",
             "-D", "connect", "topic-alias-maximum", "10", "-t", "al/#", "-q", "1", "-C", "5",
             "-v", "-W", str(int(WAIT))],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        pub = Client(port, "pub", v5=True)
        for _ in range(int(WAIT * 20)):  # until mosquitto_sub's subscription is in place
            s = b.sessions.get("msub")
            if s is not None and s.subs:
                break
            time.sleep(0.05)
        for i in range(5):
            pub.publish("al/t", f"m{i}".encode(), 1)
        out, err = proc.communicate(timeout=WAIT * 2)
        pub.close()
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    res = await run_sync(scenario)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [f"al/t m{i}" for i in range(5)], res.stderr
