"""401/403 matrix for every mutating route, HTTP ingest with device keys, the WebSocket feed."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import trio
from runtime.helpers import eventually, group
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from twin.api.app import MUTATING
from twin.runtime.state import Status

from .conftest import Api

# the smallest role each mutating route needs
MIN_ROLE = {
    "/api/v1/auth/logout": "viewer",
    "/api/v1/devices/{device}/keys": "admin",
    "/api/v1/devices/{device}/keys/{key_id}": "admin",
    "/api/v1/users": "admin",
    "/api/v1/users/{name}": "admin",
    "/api/v1/users/{name}/disable": "admin",
    "/api/v1/users/{name}/enable": "admin",
    "/api/v1/users/{name}/revoke-tokens": "admin",
    "/api/v1/tokens/{token_id}": "admin",
    "/api/v1/sessions/{session_id}": "admin",
    "/api/v1/timeseries/retention/run": "admin",
}
# answered without a bearer token (device routes take the device's key instead)
PUBLIC = {
    "/api/v1/auth/login",
    "/api/v1/auth/refresh",
    "/api/v1/ingest/{device}",
    "/api/v1/ingest/{device}/commands/{command_id}",
    # edge nodes authenticate with their own edge key (tests/edge)
    "/api/v1/edge-link/{edge}/batch",
}
BELOW = {"operator": "viewer", "admin": "oper"}
# objects of site plant-a (oper_b is scoped to plant-b)
FILL = {
    "device": "t1",
    "key_id": "k",
    "name": "line-1",
    "session_id": "s",
    "token_id": "t",
    "alarm_id": "1",
    "command_id": "c",
    "edge": "edge-1",
    "camera": "cam-1",
}


async def mutating_routes(api: Api) -> list[tuple[str, str]]:
    """Every mutating route, from the OpenAPI document (routers included)."""
    async with api.client(None) as c:
        paths = (await c.get("/openapi.json")).json()["paths"]
    return [
        (method.upper(), path)
        for path, ops in sorted(paths.items())
        for method in sorted(ops)
        if method.upper() in MUTATING and path not in PUBLIC
    ]


def body_for(path: str) -> Any:
    if path == "/api/v1/devices":
        return {"kind": "Device", "metadata": {"name": "zz", "site": "plant-a"}, "spec": {}}
    if path == "/api/v1/device-groups":
        return {"metadata": {"name": "g9", "site": "plant-a"}}
    if path == "/api/v1/apply":  # a change in plant-a
        return {"documents": [group("g8", "plant-a")]}
    if path == "/api/v1/users":
        return {"name": "x", "password": "12345678x", "role": "viewer"}
    if path.endswith("/maintenance"):
        return {"on": True}
    if path.endswith("/commands"):
        return {"type": "set_state"}
    if path.endswith("/desired"):
        return {"sampling_rate": 1}
    if path.startswith("/api/v1/devices/{device}") and path.count("/") == 4:
        return {"kind": "Device", "metadata": {"name": "t1", "site": "plant-a"}, "spec": {}}
    return None


async def test_every_mutating_route_401_without_token_403_below_role_or_site(api: Api) -> None:
    routes = await mutating_routes(api)
    assert len(routes) >= 24
    checked = 0
    async with (
        api.client(None) as anon,
        api.client("viewer") as viewer,
        api.client("oper") as oper,
        api.client("oper_b") as oper_b,
    ):
        clients = {"viewer": viewer, "oper": oper}
        for method, path in routes:
            url = re.sub(r"\{(\w+)\}", lambda m: FILL[m.group(1)], path)
            body = body_for(path)
            kw = {"json": body} if body is not None else {}
            r = await anon.request(method, url, **kw)
            assert r.status_code == 401, (method, path, r.status_code)
            need = MIN_ROLE.get(path, "operator")
            if need in BELOW:
                r = await clients[BELOW[need]].request(method, url, **kw)
                assert r.status_code == 403, (method, path, r.status_code, r.text)
            if (need == "operator" and "{device}" in path) or path in (
                "/api/v1/devices",
                "/api/v1/device-groups",
                "/api/v1/apply",
            ):
                r = await oper_b.request(method, url, **kw)
                assert r.status_code == 403, ("site", method, path, r.status_code, r.text)
            checked += 1
    assert checked == len(routes)


async def test_http_ingest_with_device_key(api: Api) -> None:
    async with api.client("admin") as c:
        r = await c.post("/api/v1/devices/push1/keys")
        assert r.status_code == 201
        key, kid = r.json()["key"], r.json()["id"]
    await eventually(lambda: api.engine.hub.running("push1"))
    async with api.client(None) as dev:
        url = "/api/v1/ingest/push1"
        assert (await dev.post(url, json={"values": {"temperature": 1}})).status_code == 401
        bad = {"X-Device-Key": key[:-2] + "xx"}
        assert (
            await dev.post(url, json={"values": {"temperature": 1}}, headers=bad)
        ).status_code == 401
        h = {"X-Device-Key": key}
        r = await dev.post(
            url,
            headers=h,
            json={
                "readings": [{"point": "temperature", "value": 21.5, "ts": 1_700_000_000.0}],
                "values": {"humidity": 40},
                "events": [{"type": "fault", "data": {"message": "fan"}}],
            },
        )
        assert r.status_code == 200 and r.json()["accepted"] == 3
        twin = api.engine.twin("push1")
        assert twin is not None
        await eventually(lambda: twin.status == Status.FAULT)
        assert twin.reported["temperature"].value == 21.5 and twin.reported["humidity"].value == 40
        r = await dev.post(url, headers=h, json={"events": [{"type": "ok"}]})
        await eventually(lambda: twin.status == Status.ONLINE)
        assert (await dev.post(url, headers=h, json={"readings": "nope"})).status_code == 422
        # another device's key is not this device's key
        assert (await dev.post("/api/v1/ingest/t1", headers=h, json={})).status_code == 401
    # desired values reach a push device as a `set` command of the ledger (the reconciler's),
    # fetched by the device's long-poll
    async with api.client("oper") as c:
        await c.patch("/api/v1/devices/push1/twin/desired", json={"sampling_rate": 3})
    async with api.client(None) as dev:
        r = await dev.get("/api/v1/ingest/push1/commands?wait=30", headers=h)
        assert r.status_code == 200, r.text
        cmds = r.json()["commands"]
        assert [(c["type"], c["params"]) for c in cmds] == [
            ("set", {"property": "sampling_rate", "value": 3})
        ]
        r = await dev.get("/api/v1/ingest/push1/commands?wait=0", headers={"X-Device-Key": "x"})
        assert r.status_code == 401
    # revoke through the API: the cached key is refused at once
    async with api.client("admin") as c:
        assert (await c.delete(f"/api/v1/devices/push1/keys/{kid}")).status_code == 200
    async with api.client(None) as dev:
        assert (await dev.post("/api/v1/ingest/push1", headers=h, json={})).status_code == 401
    # revoked by another process (the CLI writes the registry): refused after the next sweep
    async with api.client("admin") as c:
        r = await c.post("/api/v1/devices/push1/keys")
        kid2, key2 = r.json()["id"], r.json()["key"]
    h2 = {"X-Device-Key": key2}
    async with api.client(None) as dev:
        assert (await dev.post("/api/v1/ingest/push1", headers=h2, json={})).status_code == 200
        st = api.engine.service_info["api"]["app"].state
        checks = st.keys.argon2_checks
        assert (await dev.post("/api/v1/ingest/push1", headers=h2, json={})).status_code == 200
        assert st.keys.argon2_checks == checks  # served from the cache
        api.registry.revoke_device_key(kid2, time.time())
        assert await st.call(st.keys.sweep) == 1
        assert (await dev.post("/api/v1/ingest/push1", headers=h2, json={})).status_code == 401


async def test_websocket_feed_filtered_and_authorised(api: Api) -> None:
    ws_url = api.engine.service_info["api"]["ws"]
    try:
        async with open_websocket_url(f"{ws_url}?token=bad") as ws:
            await ws.get_message()
        raise AssertionError("unauthorised websocket stayed open")
    except ConnectionRejected as exc:
        assert exc.status_code == 403
    except ConnectionClosed as exc:
        assert exc.reason.code == 1008
    token = api.tokens["viewer"]
    async with open_websocket_url(f"{ws_url}?token={token}&devices=t2&kinds=reading") as ws:
        hello = json.loads(await ws.get_message())
        assert hello["kind"] == "hello"
        with trio.fail_after(10):
            for _ in range(3):
                ev = json.loads(await ws.get_message())
                assert ev["kind"] == "reading" and ev["device"] == "t2"
        await ws.send_message(
            json.dumps({"subscribe": {"devices": "t1", "kinds": "reading,status"}})
        )
        with trio.fail_after(10):
            while True:
                ev = json.loads(await ws.get_message())
                if ev.get("device") == "t1":
                    break
    # the token in the Sec-WebSocket-Protocol header (browsers) or in a first message
    async with open_websocket_url(
        f"{ws_url}?devices=t2&kinds=reading", subprotocols=["bearer", token]
    ) as ws:
        assert ws.subprotocol == "bearer"
        assert json.loads(await ws.get_message())["kind"] == "hello"
        with trio.fail_after(10):
            assert json.loads(await ws.get_message())["device"] == "t2"
    # ?batch=N: every frame is a JSON array of the events waiting (at least one)
    async with open_websocket_url(
        f"{ws_url}?devices=t2&kinds=reading&batch=50", subprotocols=["bearer", token]
    ) as ws:
        assert json.loads(await ws.get_message())["kind"] == "hello"
        with trio.fail_after(10):
            frame = json.loads(await ws.get_message())
        assert isinstance(frame, list) and 1 <= len(frame) <= 50
        assert all(ev["kind"] == "reading" and ev["device"] == "t2" for ev in frame)
    async with open_websocket_url(f"{ws_url}?devices=t2&kinds=reading") as ws:
        await ws.send_message(json.dumps({"type": "auth", "token": token}))
        assert json.loads(await ws.get_message())["kind"] == "hello"
        with trio.fail_after(10):
            assert json.loads(await ws.get_message())["device"] == "t2"
    for bad in (["bearer", "nope"], None):
        try:
            async with open_websocket_url(ws_url, subprotocols=bad or []) as ws:
                if bad is None:
                    await ws.send_message(json.dumps({"type": "auth", "token": "nope"}))
                await ws.get_message()
            raise AssertionError("unauthorised websocket stayed open")
        except ConnectionRejected as exc:
            assert exc.status_code == 403
        except ConnectionClosed as exc:
            assert exc.reason.code == 1008
    # a scoped user never sees another site's events
    token_b = api.tokens["oper_b"]
    async with open_websocket_url(f"{ws_url}?token={token_b}&devices=t1,b1") as ws:
        await ws.get_message()
        with trio.fail_after(10):
            for _ in range(2):
                assert json.loads(await ws.get_message())["site"] == "plant-b"


async def test_slow_websocket_client_is_dropped(api: Api) -> None:
    st = api.engine.service_info["api"]["app"].state
    st.settings.ws_buffer = 2
    ws_url = api.engine.service_info["api"]["ws"]
    async with open_websocket_url(
        f"{ws_url}?token={api.tokens['viewer']}", message_queue_size=1
    ) as ws:
        await ws.get_message()
        # do not read; publish a burst: the engine must not block
        for i in range(10_000):
            api.engine.bus.publish(
                {
                    "kind": "event",
                    "device": "t1",
                    "site": "plant-a",
                    "groups": (),
                    "ts": 0,
                    "i": i,
                    "pad": "x" * 200,
                }
            )
        await eventually(lambda: api.engine.bus.dropped_subscribers >= 1, within=10)
