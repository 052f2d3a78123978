"""The engine as an OPC UA server: a plain asyncua client (another process's view: its own
asyncio loop in a thread) logs in with an engine user, browses the twins, reads and
subscribes to live values, and calls a method that becomes a ledger command, allowed or
refused by the policy."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from runtime.helpers import apply, fast_config, model, running_engine, sim_device, site
from twin.control.service import ControlService
from twin.registry import open_registry
from twin.registry.base import User
from twin.registry.credentials import hash_secret
from twin.runtime.opcua_service import OpcUaServerService


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def in_asyncio(coro_fn: Any) -> Any:
    """Run an asyncua client in a thread with its own loop (like a SCADA in another process)."""
    out: dict[str, Any] = {}

    def go() -> None:
        try:
            out["value"] = asyncio.run(coro_fn())
        except BaseException as exc:  # handed back to the test
            out["error"] = exc

    t = threading.Thread(target=go)
    t.start()
    return t, out


async def join(t: threading.Thread, out: dict[str, Any]) -> Any:
    await trio.to_thread.run_sync(t.join, 60)
    if "error" in out:
        raise out["error"]
    return out["value"]


async def test_scada_reads_subscribes_and_calls(tmp_path: Path) -> None:
    from asyncua import Client, ua

    reg = open_registry(None, tmp_path / "state")
    fan = model(
        "fan",
        telemetry={"current": {"type": "number"}},
        properties={"power": {"type": "boolean", "access": "readwrite"}},
        commands={"set_state": {"params": {"type": "object", "required": ["state"],
                                           "properties": {"state": {"type": "boolean"}}}}},
    )
    apply(reg, site(), site("plant-b"), fan,
          sim_device("fan_01", model_="fan", type_="actuator", interval="100ms",
                     points={"current": {"wave": "constant", "value": 1.5}}),
          sim_device("fan_02", site_="plant-b", model_="fan", type_="actuator",
                     interval="100ms", points={"current": {"wave": "constant", "value": 2}}))
    reg.put_user(User("op", hash_secret("pw-op"), "operator", ("plant-a",)))
    reg.put_user(User("viewer", hash_secret("pw-v"), "viewer"))
    port = free_port()
    svc = OpcUaServerService(("127.0.0.1", port))
    control = ControlService(reconcile_interval=0.1)
    url = f"opc.tcp://127.0.0.1:{port}/flux/"
    async with running_engine(reg, fast_config(state_dir=tmp_path), [control, svc]) as engine:
        assert engine.service_info["opcua-server"]["endpoint"] == url

        async def scada() -> dict[str, Any]:
            res: dict[str, Any] = {}
            c = Client(url)
            c.set_user("op")
            c.set_password("pw-op")
            async with c:
                fan1 = await c.nodes.objects.get_child(["2:Sites", "2:plant-a", "2:fan_01"])
                cur = await fan1.get_child("2:current")
                for _ in range(50):  # the first reading arrives within a few ticks
                    dv = await cur.read_data_value(raise_on_bad_status=False)
                    if dv.StatusCode.is_good():
                        break
                    await asyncio.sleep(0.1)
                res["current"] = dv.Value.Value
                res["ts"] = dv.SourceTimestamp
                status = await fan1.get_child("2:_status")
                for _ in range(50):  # statuses are published every half second
                    res["status"] = await status.read_value()
                    if res["status"] == "online":
                        break
                    await asyncio.sleep(0.1)
                got: list[Any] = []

                class H:
                    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
                        got.append(val)

                sub = await c.create_subscription(100, H())
                await sub.subscribe_data_change(cur)
                for _ in range(50):
                    if got:
                        break
                    await asyncio.sleep(0.1)
                res["notified"] = list(got)
                res["call"] = await fan1.call_method("2:set_state", ua.Variant(True))
                fan2 = c.get_node("ns=2;s=fan_02")  # another site: refused by the policy
                try:
                    await fan2.call_method("2:set_state", ua.Variant(True))
                except ua.UaStatusCodeError as exc:
                    res["other_site"] = type(exc).__name__
                try:
                    await cur.write_value(9.9)
                except ua.UaStatusCodeError as exc:
                    res["write"] = type(exc).__name__
            return res

        t, out = in_asyncio(scada)
        res = await join(t, out)
        assert res["current"] == 1.5 and res["ts"] is not None
        assert res["status"] == "online"
        assert 1.5 in res["notified"]
        assert res["call"] == '{"ok": true}'  # the command's result (JSON)
        assert res["other_site"] == "BadUserAccessDenied"
        assert res["write"] == "BadUserAccessDenied"
        ledger = control.ledger
        assert ledger is not None
        cmds = [c for c in ledger.commands.values() if c.source == "opcua:op"]
        assert [(c.device, c.type, c.params, str(c.status)) for c in cmds] == [
            ("fan_01", "set_state", {"state": True}, "success")]

        async def wrong_password() -> str:
            c = Client(url)
            c.set_user("op")
            c.set_password("nope")
            try:
                async with c:
                    return "connected"
            except Exception as exc:
                return type(exc).__name__

        async def anonymous() -> str:
            try:
                async with Client(url):
                    return "connected"
            except Exception as exc:
                return type(exc).__name__

        for fn in (wrong_password, anonymous):
            t, out = in_asyncio(fn)
            assert await join(t, out) != "connected"

        # a new revision without fan_02 and with fan_03: the address space follows
        apply(reg, site(), site("plant-b"), fan,
              sim_device("fan_01", model_="fan", type_="actuator", interval="100ms",
                         points={"current": {"wave": "constant", "value": 1.5}}),
              sim_device("fan_03", model_="fan", type_="actuator", interval="100ms",
                         points={"current": {"wave": "constant", "value": 3}}))

        async def browse() -> list[str]:
            c = Client(url)
            c.set_user("op")
            c.set_password("pw-op")
            async with c:
                names = []
                for folder in await (await c.nodes.objects.get_child("2:Sites")).get_children():
                    for dev in await folder.get_children():
                        names.append((await dev.read_browse_name()).Name)
                return sorted(names)

        with trio.fail_after(20):
            while True:
                t, out = in_asyncio(browse)
                if await join(t, out) == ["fan_01", "fan_03"]:
                    break
                await trio.sleep(0.2)
    reg.close()


@pytest.mark.parametrize("dummy", [0])
def test_describe(dummy: int) -> None:
    from twin.runtime.opcua_service import describe

    assert describe(None) is None
    assert "opc.tcp://h:1/flux/" in str(describe({"endpoint": "opc.tcp://h:1/flux/"}))
