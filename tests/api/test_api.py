"""Real HTTP against a running engine (hypercorn + FastAPI on a free port)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import trio
from runtime.helpers import eventually, sim_device

from twin.runtime.state import Status

from .conftest import PASSWORD, Api


async def test_health_needs_no_token_everything_else_does(api: Api) -> None:
    async with api.client(None) as c:
        r = await c.get("/api/v1/health")
        assert r.status_code == 200 and r.json()["status"] == "ok"
        for path in ("/api/v1/devices", "/metrics", "/api/v1/alarms", "/api/v1/devices/t1"):
            r = await c.get(path)
            assert r.status_code == 401, path
            assert r.headers["www-authenticate"] == "Bearer"
        r = await c.get("/api/v1/devices", headers={"Authorization": "Bearer nonsense"})
        assert r.status_code == 401


async def test_list_filter_sort_paginate(api: Api) -> None:
    async with api.client("viewer") as c:
        r = await c.get("/api/v1/devices")
        body = r.json()
        assert r.status_code == 200 and body["total"] == 4
        assert [d["name"] for d in body["items"]] == ["b1", "push1", "t1", "t2"]
        r = await c.get("/api/v1/devices", params={"site": "plant-a", "sort": "-name", "limit": 2})
        assert [d["name"] for d in r.json()["items"]] == ["t2", "t1"] and r.json()["total"] == 3
        r = await c.get("/api/v1/devices", params={"tag": "critical"})
        assert [d["name"] for d in r.json()["items"]] == ["t2"]
        r = await c.get("/api/v1/devices", params={"label": "floor=2"})
        assert [d["name"] for d in r.json()["items"]] == ["t1"]
        r = await c.get("/api/v1/devices", params={"group": "line-1"})  # includes sub-groups
        assert [d["name"] for d in r.json()["items"]] == ["t1", "t2"]
        r = await c.get("/api/v1/devices", params={"type": "actuator"})
        assert [d["name"] for d in r.json()["items"]] == ["b1"]
        r = await c.get("/api/v1/devices", params={"offset": 3, "limit": 10})
        assert [d["name"] for d in r.json()["items"]] == ["t2"]
        r = await c.get("/api/v1/devices", params={"sort": "bogus"})
        assert r.status_code == 422
        r = await c.get("/api/v1/device-groups/line-1/devices")
        assert [d["name"] for d in r.json()["items"]] == ["t1", "t2"]
        await eventually(lambda: api.engine.twin("t1").status == Status.ONLINE)  # type: ignore[union-attr]
        r = await c.get("/api/v1/devices", params={"status": "online", "site": "plant-a"})
        assert "t1" in [d["name"] for d in r.json()["items"]]


async def test_scoped_user_sees_only_its_sites(api: Api) -> None:
    async with api.client("oper_b") as c:
        r = await c.get("/api/v1/devices")
        assert [d["name"] for d in r.json()["items"]] == ["b1"]
        assert (await c.get("/api/v1/devices/t1")).status_code == 403
        assert (await c.get("/api/v1/devices/b1")).status_code == 200


async def test_device_crud_makes_revisions_by_the_token_subject(api: Api) -> None:
    async with api.client("oper") as c:
        doc = sim_device("new1")
        r = await c.post("/api/v1/devices", json=doc)
        assert r.status_code == 201, r.text
        rev = r.json()["revision"]
        assert api.engine.revision_number >= rev
        assert "new1" in api.engine.controller.tasks
        head = api.registry.history(1)[0]
        assert (head.author, head.source) == ("oper", "api")
        assert (await c.post("/api/v1/devices", json=doc)).status_code == 409
        r = await c.put("/api/v1/devices/new1", json=sim_device("new1", tags=["x"]))
        assert r.status_code == 200 and r.json()["device"]["tags"] == ["x"]
        bad = sim_device("new1", model_="no-such-model")
        r = await c.put("/api/v1/devices/new1", json=bad)
        assert r.status_code == 422 and "no-such-model" in json.dumps(r.json())
        r = await c.get("/api/v1/devices/new1")
        assert r.json()["document"]["metadata"]["tags"] == ["x"]
        r = await c.delete("/api/v1/devices/new1")
        assert r.status_code == 200
        assert (await c.get("/api/v1/devices/new1")).status_code == 404
        assert "new1" not in api.engine.controller.tasks
        assert (await c.delete("/api/v1/devices/new1")).status_code == 404


async def test_status_twin_desired_maintenance(api: Api) -> None:
    async with api.client("oper") as c:
        await eventually(lambda: api.engine.twin("t1").status == Status.ONLINE)  # type: ignore[union-attr]
        r = await c.get("/api/v1/devices/t1/status")
        assert r.json()["status"] == "online"
        head = api.engine.revision_number
        r = await c.patch("/api/v1/devices/t1/twin/desired", json={"sampling_rate": 4})
        assert r.status_code == 200, r.text
        assert r.json()["twin"]["desired"] == {"sampling_rate": 4}
        # an operator's desired value is a runtime override (who, when), not a revision
        override = r.json()["overrides"]["sampling_rate"]
        assert override["value"] == 4 and override["set_by"] == "api:oper"
        assert api.engine.registry.head().number == head  # type: ignore[union-attr]
        assert [o.prop for o in api.engine.registry.overrides("t1")] == ["sampling_rate"]
        await eventually(lambda: api.engine.twin("t1").delta() == {}, within=10)  # type: ignore[union-attr]
        r = await c.get("/api/v1/devices/t1/twin")
        assert r.json()["reported"]["sampling_rate"]["value"] == 4
        assert r.json()["overrides"]["sampling_rate"]["set_by"] == "api:oper"
        bad = await c.patch("/api/v1/devices/t1/twin/desired", json={"temperature": 4})
        assert bad.status_code == 422, bad.text
        r = await c.patch("/api/v1/devices/t1/twin/desired", json={"sampling_rate": None})
        assert r.status_code == 200 and r.json()["overrides"] == {}
        assert api.engine.registry.overrides("t1") == []
        r = await c.post("/api/v1/devices/t1/maintenance", json={"on": True})
        assert r.status_code == 200
        assert (await c.get("/api/v1/devices/t1/status")).json()["status"] == "maintenance"
        r = await c.post("/api/v1/devices/t1/activate")
        assert r.status_code == 200
        assert (await c.get("/api/v1/devices/t1/status")).json()["status"] == "online"
        await api.engine.writer.flushed()
        r = await c.get("/api/v1/devices/t1/status/history")
        assert [h["status"] for h in r.json()["items"]][:3] == ["online", "maintenance", "online"]
        api.engine.flush_metrics()
        await api.engine.writer.flushed()
        r = await c.get("/api/v1/devices/t1/metrics")
        body = r.json()
        assert body["live"]["messages_in"] > 0 and body["uptime_ratio"] is not None


async def test_alarms_ack_and_clear(api: Api) -> None:
    await trio.to_thread.run_sync(api.registry.raise_alarm, "t1", "fault", "critical", "boom", 1.0)
    async with api.client("viewer") as c:
        items = (await c.get("/api/v1/alarms", params={"state": "active"})).json()["items"]
        assert [(a["device"], a["type"]) for a in items] == [("t1", "fault")]
        assert (await c.post(f"/api/v1/alarms/{items[0]['id']}/ack")).status_code == 403
    async with api.client("oper_b") as c:
        assert (await c.post(f"/api/v1/alarms/{items[0]['id']}/ack")).status_code == 403
    async with api.client("oper") as c:
        r = await c.post(f"/api/v1/alarms/{items[0]['id']}/ack")
        assert r.json()["state"] == "acknowledged" and r.json()["acked_by"] == "oper"
        r = await c.post(f"/api/v1/alarms/{items[0]['id']}/clear")
        assert r.json()["state"] == "cleared"
        assert (await c.post("/api/v1/alarms/99999/clear")).status_code == 404


async def test_login_refresh_logout_sessions(api: Api) -> None:
    async with api.client(None) as c:
        r = await c.post("/api/v1/auth/login", json={"username": "oper", "password": "wrong"})
        assert r.status_code == 401
        r = await c.post("/api/v1/auth/login", json={"username": "oper", "password": PASSWORD})
        assert r.status_code == 200
        tokens = r.json()
        h = {"Authorization": f"Bearer {tokens['access_token']}"}
        assert (await c.get("/api/v1/devices", headers=h)).status_code == 200
        r = await c.post("/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
        assert r.status_code == 200
        h2 = {"Authorization": f"Bearer {r.json()['access_token']}"}
    async with api.client("admin") as admin:
        sessions = (await admin.get("/api/v1/sessions", params={"user": "oper"})).json()["items"]
        assert len(sessions) == 1
        assert (await admin.delete(f"/api/v1/sessions/{sessions[0]['id']}")).status_code == 200
    async with api.client(None) as c:
        assert (await c.get("/api/v1/devices", headers=h2)).status_code == 401
        r = await c.post("/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
        assert r.status_code == 401


async def test_users_and_audit(api: Api) -> None:
    async with api.client("admin") as c:
        r = await c.post(
            "/api/v1/users", json={"name": "eve", "password": "12345678x", "role": "viewer"}
        )
        assert r.status_code == 201
        assert "eve" in [u["name"] for u in (await c.get("/api/v1/users")).json()["items"]]
        assert (await c.delete("/api/v1/users/eve")).status_code == 200
    async with api.client("viewer") as c:
        assert (
            await c.post(
                "/api/v1/users", json={"name": "x", "password": "12345678x", "role": "admin"}
            )
        ).status_code == 403
    # the gatekeeper queues the audit entry after the response went out: wait for it
    triples: list[tuple[str, str, str]] = []
    async with api.client("admin") as c:
        with trio.fail_after(30):
            while ("viewer", "POST /api/v1/users", "403") not in triples:
                await api.engine.writer.flushed()
                items = (await c.get("/api/v1/audit")).json()["items"]
                triples = [(a["actor"], a["action"], a["result"]) for a in items]
                await trio.sleep(0.05)
    assert ("admin", "POST /api/v1/users", "201") in triples
    assert ("admin", "DELETE /api/v1/users/eve", "200") in triples
    assert ("viewer", "POST /api/v1/users", "403") in triples


async def test_apply_endpoint_and_hot_reload(api: Api) -> None:
    docs = [json.loads(json.dumps(d)) for _, d in sorted(api.engine.specs.items())]
    docs.append(sim_device("via_apply"))
    async with api.client("oper") as c:
        r = await c.post("/api/v1/apply", json={"documents": docs, "message": "add one"})
        assert r.status_code == 200, r.text
        assert r.json()["created"] == 1 and r.json()["changed"]
        assert "via_apply" in api.engine.controller.tasks
        r = await c.post("/api/v1/apply", json={"documents": docs})
        assert r.json()["changed"] is False
        r = await c.post("/api/v1/apply", json={"documents": [{"kind": "Device"}]})
        assert r.status_code == 422
    async with api.client("oper_b") as c:
        # unchanged documents of other sites are not judged: re-applying them is a no-op
        r = await c.post("/api/v1/apply", json={"documents": docs})
        assert r.status_code == 200 and r.json()["changed"] is False
        # changing one of them is refused
        docs[-1] = sim_device("via_apply", labels={"floor": "9"})
        r = await c.post("/api/v1/apply", json={"documents": docs})
        assert r.status_code == 403, r.text


async def test_rate_limit_429_with_retry_after(tmp_path: Any) -> None:
    from twin.api.app import ApiSettings
    from twin.api.ratelimit import Rate

    from .conftest import start_api

    settings = ApiSettings(
        state_dir=tmp_path / "s", rate_per_token=Rate(1, 3), rate_per_client=Rate(1000, 1000)
    )
    async with trio.open_nursery() as nursery:
        api = await start_api(nursery, tmp_path / "s", settings)
        async with api.client("viewer") as c:
            codes = [(await c.get("/api/v1/devices")).status_code for _ in range(5)]
            assert codes[:3] == [200, 200, 200] and codes[3] == 429
            r = await c.get("/api/v1/devices")
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        nursery.cancel_scope.cancel()


async def test_metrics_and_openapi(api: Api) -> None:
    async with api.client("viewer") as c:
        await c.get("/api/v1/devices")
        r = await c.get("/metrics")
        assert r.status_code == 200
        text = r.text
        for name in (
            "twin_readings_total",
            "twin_devices",
            "twin_api_requests_total",
            "twin_api_request_seconds_bucket",
        ):
            assert name in text
        assert 'route="/api/v1/devices"' in text
    async with api.client(None) as c:
        spec = (await c.get("/openapi.json")).json()
    paths = spec["paths"]
    for p in (
        "/api/v1/devices",
        "/api/v1/devices/{device}",
        "/api/v1/devices/{device}/activate",
        "/api/v1/devices/{device}/status",
        "/api/v1/devices/{device}/metrics",
        "/api/v1/device-groups",
        "/api/v1/device-groups/{name}/devices",
        "/api/v1/alarms",
        "/api/v1/apply",
        "/api/v1/ingest/{device}",
        "/api/v1/devices/{device}/twin",
    ):
        assert p in paths, p


async def test_port_in_use_is_one_clear_error(api: Api) -> None:
    import pytest

    from twin.api.server import bind_socket
    from twin.errors import PortInUseError

    port = api.engine.service_info["api"]["port"]
    with pytest.raises(PortInUseError) as exc:
        bind_socket("127.0.0.1", port)
    assert str(exc.value) == f"api: address 127.0.0.1:{port} is already in use"
    assert exc.value.hint and "--listen" in exc.value.hint


def _unused(x: Any) -> httpx.Response:  # keep httpx import for typing
    raise NotImplementedError


async def test_device_list_unfiltered_pages_by_name(api: Api) -> None:
    names = sorted(n for (k, n) in api.engine.specs if k == "Device")
    async with api.client("viewer") as c:
        for sort, expect in (("name", names), ("-name", names[::-1])):
            for offset, limit in ((0, 2), (1, 3), (len(names) - 1, 5), (len(names) + 3, 2)):
                r = await c.get(
                    "/api/v1/devices", params={"sort": sort, "offset": offset, "limit": limit}
                )
                assert r.status_code == 200, r.text
                body = r.json()
                assert [d["name"] for d in body["items"]] == expect[offset : offset + limit]
                assert body["total"] == len(names)


async def test_the_client_to_other_engines_is_closed_with_the_api(tmp_path: Any) -> None:
    from .conftest import serving

    async with serving(tmp_path / "state") as a:
        st = a.engine.service_info["api"]["app"].state
        peers = st.peers()
        assert st.peers() is peers and not peers.is_closed  # one client, kept
    assert peers.is_closed
