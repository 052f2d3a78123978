"""The embedded broker's rules for an edge's MQTT uplink: user ``edge:<name>`` with its uplink
key; it may publish its own requests and read its own replies, nothing else."""

from __future__ import annotations

from pathlib import Path

from twin.edge.cloud import link_device
from twin.mqtt.topics import edge_link_topics
from twin.registry import open_registry
from twin.registry.credentials import create_device_key
from twin.runtime.mqtt_auth import RegistryAuth
from twin.spec import load_site
from twin.spec.apply import apply_specs

SITE = """\
apiVersion: flux.iot/v1
kind: Site
metadata: {name: remote}
---
apiVersion: flux.iot/v1
kind: Device
metadata: {name: meter, site: remote}
spec: {type: sensor, binding: {http: {}}}
---
apiVersion: flux.iot/v1
kind: Device
metadata: {name: valve, site: remote}
spec: {type: sensor, binding: {http: {}}}
---
apiVersion: flux.iot/v1
kind: EdgeNode
metadata: {name: gw-a, site: remote}
spec: {devices: {names: [meter]}, uplink: {url: "mqtt://127.0.0.1:1883"}}
---
apiVersion: flux.iot/v1
kind: EdgeNode
metadata: {name: gw-b, site: remote}
spec: {devices: {names: [valve]}, uplink: {url: "mqtt://127.0.0.1:1883"}}
"""


async def test_edge_key_and_topics(tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "s.yaml").write_text(SITE)
    reg = open_registry(None, tmp_path / "reg")
    try:
        apply_specs(reg, load_site(tmp_path / "site"), author="test")
        _, key_a = create_device_key(reg, link_device("gw-a"))
        _, key_b = create_device_key(reg, link_device("gw-b"))
        specs = reg.specs()
        auth = RegistryAuth(reg, lambda: specs)
        p = await auth.authenticate("c", "edge:gw-a", key_a.encode(), None)
        assert p is not None and p.kind == "edge" and p.name == "gw-a"
        # another edge's key, a made-up key, an edge that does not exist: refused
        assert await auth.authenticate("c", "edge:gw-a", key_b.encode(), None) is None
        assert await auth.authenticate("c", "edge:gw-a", b"dk_aaaaaaaa_" + b"b" * 32, None) is None
        assert await auth.authenticate("c", "edge:gw-z", key_a.encode(), None) is None
        req_a, resp_a = edge_link_topics("gw-a")
        req_b, resp_b = edge_link_topics("gw-b")
        assert auth.authorize(p, "publish", req_a)
        assert auth.authorize(p, "subscribe", resp_a)
        assert not auth.authorize(p, "publish", req_b)  # never in another edge's name
        assert not auth.authorize(p, "subscribe", resp_b)
        assert not auth.authorize(p, "subscribe", "flux/_edge/+/resp")
        assert not auth.authorize(p, "subscribe", "#")
        assert not auth.authorize(p, "publish", resp_a)  # replies come from the cloud only
        assert not auth.authorize(p, "publish", "flux/remote/meter/telemetry")
    finally:
        reg.close()
