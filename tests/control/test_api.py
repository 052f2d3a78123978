"""The control API against a served engine (hypercorn on port 0, httpx): commands, batch,
cancel, the HTTP long-poll of a device with the http binding, scenes as registry revisions,
manual runs and traces, roles."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.lowlevel
from runtime.helpers import apply, fast_config, model, sim_device, site

from twin.api import auth
from twin.api.app import ApiSettings
from twin.api.ratelimit import Rate
from twin.api.server import ApiService
from twin.control.service import ControlService
from twin.registry import open_registry
from twin.runtime.engine import Engine

from .helpers import fan_model, fan_on

USERS = {"admin": "admin", "oper": "operator", "viewer": "viewer"}


class Served:
    def __init__(self, url: str, engine: Engine, control: ControlService, tokens: dict[str, str]):
        self.url, self.engine, self.control, self.tokens = url, engine, control, tokens

    def client(self, user: str | None = "admin") -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.tokens[user]}"} if user else {}
        return httpx.AsyncClient(base_url=self.url + "/api/v1", headers=headers, timeout=30)


def docs() -> list[dict[str, Any]]:
    return [
        site(),
        model(),
        fan_model(reboot={}),
        sim_device("t1", interval="200ms", tags=["hvac"]),
        sim_device(
            "fan_01",
            model_="fan",
            type_="actuator",
            tags=["hvac"],
            points={"current": {"wave": "constant", "value": 1}},
        ),
        sim_device(
            "fan_02",
            model_="fan",
            type_="actuator",
            tags=["hvac"],
            points={"current": {"wave": "constant", "value": 1}},
        ),
        sim_device(
            "door",
            model_="fan",
            type_="actuator",
            binding={"http": {}},
            heartbeat={"interval": "5s", "timeout": "60s"},
        ),
    ]


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    state = tmp_path / "state"
    reg = open_registry(None, state)
    apply(reg, *docs())
    for name, role in USERS.items():
        reg.put_user(auth.make_user(name, "correct horse battery", role))
    settings = ApiSettings(
        state_dir=state,
        rate_per_token=Rate(10_000, 10_000),
        rate_per_client=Rate(10_000, 10_000),
        rate_ingest_per_device=Rate(10_000, 10_000),
    )
    control = ControlService(reconcile_interval=0.2)
    engine = Engine(
        reg, fast_config(state_dir=state), [control, ApiService("127.0.0.1", 0, settings)]
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            secret = auth.load_secret(state)
            tokens = {n: auth.issue_access_token(secret, reg.get_user(n)) for n in USERS}  # type: ignore[arg-type]
            yield Served(engine.service_info["api"]["url"], engine, control, tokens)
            nursery.cancel_scope.cancel()
    finally:
        reg.close()


async def _until(fn: Any, seconds: float = 20) -> Any:
    with trio.fail_after(seconds):
        while True:
            value = await fn()
            if value:
                return value
            await trio.sleep(0.05)


async def test_commands_lifecycle(served: Served) -> None:
    async with served.client("oper") as c:
        r = await c.post(
            "/devices/fan_01/commands",
            json={"type": "set_state", "params": {"state": True}},
            params={"wait": 10},
        )
        assert r.status_code == 201, r.text
        cmd = r.json()
        assert cmd["status"] == "success"
        assert [t["status"] for t in cmd["transitions"]] == ["pending", "sent", "success"]
        r = await c.post(
            "/devices/fan_01/commands", json={"type": "set_state", "params": {"state": "x"}}
        )
        assert r.status_code == 422 and "params.state" in r.json()["detail"]
        assert (await c.post("/devices/nope/commands", json={"type": "reboot"})).status_code == 404
        r = await c.get(f"/commands/{cmd['id']}")
        assert r.json()["id"] == cmd["id"]
        r = await c.get("/devices/fan_01/commands")
        assert [x["id"] for x in r.json()["commands"]] == [cmd["id"]]
        # idempotency
        a = (
            await c.post(
                "/devices/fan_02/commands", json={"type": "reboot", "idempotency_key": "k1"}
            )
        ).json()
        b = (
            await c.post(
                "/devices/fan_02/commands", json={"type": "reboot", "idempotency_key": "k1"}
            )
        ).json()
        assert a["id"] == b["id"]
        # finished commands cannot be cancelled
        r = await c.delete(f"/commands/{cmd['id']}")
        assert r.status_code == 409
        assert (await c.get("/commands/cmd_nope")).status_code == 404
    async with served.client("viewer") as c:
        r = await c.post("/devices/fan_01/commands", json={"type": "reboot"})
        assert r.status_code == 403
        assert (await c.get("/devices/fan_01/commands")).status_code == 200


async def test_batch(served: Served) -> None:
    async with served.client("oper") as c:
        r = await c.post("/devices/batch/commands", json={"type": "reboot", "selector": "tag=hvac"})
        assert r.status_code == 201, r.text
        body = r.json()
        by = {x["device"]: x for x in body["results"]}
        assert set(by) == {"t1", "fan_01", "fan_02"}
        assert by["fan_01"]["accepted"] and not by["t1"]["accepted"]
        assert body["status"] == "partial"
        r = await c.post(
            "/devices/batch/commands", json={"type": "reboot", "devices": ["fan_01", "fan_02"]}
        )
        assert r.json()["status"] == "accepted"


async def test_http_long_poll_device(served: Served) -> None:
    async with served.client("admin") as c:
        key = (await c.post("/devices/door/keys")).json()["key"]
    dev = httpx.AsyncClient(
        base_url=served.url + "/api/v1", headers={"X-Device-Key": key}, timeout=30
    )
    async with dev, served.client("oper") as c:
        await dev.post("/ingest/door", json={"values": {"current": 1.0}})
        polled: list[dict[str, Any]] = []

        async def device() -> None:
            r = await dev.get("/ingest/door/commands", params={"wait": 20})
            assert r.status_code == 200, r.text
            polled.append(r.json())

        async with trio.open_nursery() as n:
            n.start_soon(device)
            await trio.sleep(0.3)
            cmd = (
                await c.post(
                    "/devices/door/commands", json={"type": "set_state", "params": {"state": True}}
                )
            ).json()
        assert polled[0]["commands"][0]["id"] == cmd["id"]
        assert (await c.get(f"/commands/{cmd['id']}")).json()["status"] == "sent"
        r = await dev.post(f"/ingest/door/commands/{cmd['id']}", json={"status": "executing"})
        assert r.json()["status"] == "executing"
        # a result the engine cannot hold (NaN, a 400-digit int) is refused, the command waits
        for bad_result in (b'{"x": NaN}', b"1" + b"0" * 400):
            r = await dev.post(
                f"/ingest/door/commands/{cmd['id']}",
                content=b'{"status": "success", "result": ' + bad_result + b"}",
                headers={"Content-Type": "application/json"},
            )
            assert r.status_code in (400, 422), r.text
        assert (await c.get(f"/commands/{cmd['id']}")).json()["status"] == "executing"
        r = await dev.post(
            f"/ingest/door/commands/{cmd['id']}",
            json={"status": "success", "result": {"power": True}},
        )
        assert r.json()["status"] == "success"
        r = await dev.post(f"/ingest/door/commands/{cmd['id']}", json={"status": "failed"})
        assert r.status_code == 409
        # cancel: pending at once; sent → handed to the device on its next poll
        c2 = (await c.post("/devices/door/commands", json={"type": "reboot"})).json()
        assert (await c.delete(f"/commands/{c2['id']}")).json()["status"] == "cancelled"
        c3 = (await c.post("/devices/door/commands", json={"type": "reboot"})).json()
        await dev.get("/ingest/door/commands", params={"wait": 0})
        assert (await c.delete(f"/commands/{c3['id']}")).json()["cancel_requested"]
        r = await dev.get("/ingest/door/commands", params={"wait": 0})
        assert r.json()["cancel"] == [c3["id"]]
        await dev.post(f"/ingest/door/commands/{c3['id']}", json={"status": "cancelled"})
        assert (await c.get(f"/commands/{c3['id']}")).json()["status"] == "cancelled"
        # a wrong key
        bad = await dev.get(
            "/ingest/door/commands", params={"wait": 0}, headers={"X-Device-Key": "dk_bad"}
        )
        assert bad.status_code == 401


SCENE = {
    "metadata": {"name": "hot", "site": "plant-a"},
    "spec": {
        "mode": "single",
        "triggers": [{"type": "manual"}],
        "conditions": [{"type": "state", "device": "fan_01", "status": "online"}],
        "actions": [fan_on(), {"type": "delay", "duration": "100ms"}],
    },
}


async def test_scenes_are_revisions_and_run_with_traces(served: Served) -> None:
    async with served.client("viewer") as c:  # operators write scenes (twin.policy)
        assert (await c.post("/scenes", json=SCENE)).status_code == 403
    async with served.client("admin") as c:
        rev0 = served.engine.revision_number
        r = await c.post("/scenes", json=SCENE)
        assert r.status_code == 201, r.text
        assert r.json()["revision"] == rev0 + 1
        assert (await c.post("/scenes", json=SCENE)).status_code == 409
        bad = {
            "metadata": {"name": "bad"},
            "spec": {
                "triggers": [{"type": "manual"}],
                "actions": [{"type": "command", "device": "fan_01", "command": "explode"}],
            },
        }
        r = await c.post("/scenes", json=bad)
        assert r.status_code == 422 and "explode" in r.text
        await _until(lambda: _loaded(served, "hot"))
        scenes = (await c.get("/scenes")).json()["scenes"]
        assert [s["name"] for s in scenes] == ["hot"]
    async with served.client("oper") as c:
        await _until(lambda: _online(served, "fan_01"))
        r = await c.post("/scenes/hot/execute", params={"wait": True})
        assert r.status_code == 202, r.text
        trace = r.json()["trace"]
        assert trace["status"] == "success"
        assert trace["conditions"][0]["result"] is True
        assert [s["outcome"] for s in trace["steps"]] == ["ok", "ok"]
        traces = (await c.get("/scenes/hot/traces")).json()["traces"]
        assert traces[0]["run_id"] == trace["run_id"]
        one = (await c.get(f"/scene-traces/{trace['run_id']}")).json()
        assert one["scene"] == "hot"
    async with served.client("admin") as c:
        changed = {**SCENE, "spec": {**SCENE["spec"], "enabled": False}}
        r = await c.put("/scenes/hot", json=changed)
        assert r.json()["changed"] is True
        r = await c.delete("/scenes/hot")
        assert r.status_code == 200
        assert (await c.delete("/scenes/hot")).status_code == 404
        hist = served.engine.registry.history(5)
        assert [h.message for h in hist[:3]] == [
            "delete scene hot",
            "update scene hot",
            "create scene hot",
        ]
        assert all(h.source == "api" for h in hist[:3])


async def _loaded(served: Served, name: str) -> bool:
    await trio.lowlevel.checkpoint()
    return name in served.control.scenes.scenes


async def _online(served: Served, name: str) -> bool:
    await trio.lowlevel.checkpoint()
    t = served.engine.twin(name)
    return t is not None and str(t.status) == "online"
