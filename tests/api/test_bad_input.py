"""Bad input through the real API (hypercorn + FastAPI on a free port): a clear 4xx with a
one-line detail, never a 500, a hang, an echo of a secret, an injected header or a new
Prometheus series per URL."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from runtime.helpers import site
from trio_websocket import open_websocket_url

from twin.api.limits import Limits

from .conftest import PASSWORD, Api, loose_settings, serving

NAN_SITE = '{"documents": [{"apiVersion": "flux.iot/v1", "kind": "Site", "metadata": {"name": "nan-site"}, "spec": {"title": "x", "location": {"lat": %s, "lon": 1}}}]}'


def one_line_4xx(r: httpx.Response, status: int = 422) -> str:
    assert r.status_code == status, (r.status_code, r.text[:500])
    detail = r.json()["detail"]
    text = detail if isinstance(detail, str) else json.dumps(detail)
    assert "\n" not in text and len(text) < 500, text
    return text


@pytest.fixture
async def small(tmp_path: Path) -> AsyncIterator[Api]:
    """An API whose body limit is 64 KiB (apply 256 KiB), to show the setting is used."""
    settings = loose_settings(
        tmp_path / "state", body_limits=Limits(max_body=64 << 10, max_apply_body=256 << 10)
    )
    async with serving(tmp_path / "state", settings) as a:
        yield a


async def test_a_20mb_login_body_is_refused_unread(api: Api) -> None:
    big = json.dumps({"username": "admin", "password": "x" * (20 << 20)})
    async with api.client(None) as c:
        r = await c.post("/api/v1/auth/login", content=big,
                         headers={"content-type": "application/json"})
        text = one_line_4xx(r, 413)
        assert "request body larger than 1,048,576 bytes" in text
        assert "xxxx" not in r.text

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
            for i in range(0, len(big), 1 << 16):
                yield big[i : i + (1 << 16)].encode()

        r = await c.post("/api/v1/auth/login", content=chunks(),
                         headers={"content-type": "application/json"})
        one_line_4xx(r, 413)
        # HTTP/2 (cleartext, prior knowledge): a streamed body carries no length header at all
        async with httpx.AsyncClient(base_url=api.url, http1=False, http2=True, timeout=30) as h2:
            r = await h2.post("/api/v1/auth/login", content=chunks(),
                              headers={"content-type": "application/json"})
            assert r.http_version == "HTTP/2"
            one_line_4xx(r, 413)
            r = await h2.post("/api/v1/auth/login", content=big,  # with a content-length
                              headers={"content-type": "application/json"})
            one_line_4xx(r, 413)
        # answered before the body is in (401, the ingest path's own 413): hypercorn's HTTP/2
        # raised KeyError on the late DATA frames and the whole API went down
        async with httpx.AsyncClient(base_url=api.url, http1=False, http2=True, timeout=30) as h2:
            for path, status in (("/api/v1/devices", 401), ("/api/v1/ingest/push1", 413)):
                r = await h2.post(path, content=b"x" * (20 << 20))
                assert r.status_code == status
                assert (await h2.get("/api/v1/health")).status_code == 200
        # the API still answers, and a normal login works
        r = await c.post("/api/v1/auth/login", json={"username": "admin", "password": PASSWORD})
        assert r.status_code == 200


async def test_body_limits_are_configurable_and_apply_has_its_own(small: Api) -> None:
    async with small.client("admin") as c:
        r = await c.post("/api/v1/auth/login", json={"username": "a", "password": "p" * (70 << 10)})
        assert "larger than 65,536 bytes" in one_line_4xx(r, 413)
        filler = {"apiVersion": "flux.iot/v1", "kind": "Site", "metadata": {"name": "big"},
                  "spec": {"title": "t", "description": "d" * (100 << 10)}}
        r = await c.post("/api/v1/apply", json={"documents": [filler]})
        assert r.status_code == 200, r.text  # 100 KiB: over the default, under the apply limit
        filler["spec"]["description"] = "d" * (300 << 10)
        r = await c.post("/api/v1/apply", json={"documents": [filler]})
        assert "larger than 262,144 bytes" in one_line_4xx(r, 413)


async def test_422_never_echoes_the_input(api: Api) -> None:
    secret = "hunter2-" + "s" * 1000  # too long for a password: a validation error
    async with api.client(None) as c:
        r = await c.post("/api/v1/auth/login", json={"username": "admin", "password": secret})
        assert r.status_code == 422
        assert "hunter2" not in r.text
        (err,) = r.json()["detail"]
        assert err["loc"] == ["body", "password"] and "input" not in err
    async with api.client("admin") as c:
        r = await c.post("/api/v1/users", json={"name": "bad name!", "password": "pw-secret-123",
                                                 "role": "viewer"})
        assert r.status_code == 422 and "pw-secret-123" not in r.text and "bad name!" not in r.text


@pytest.mark.parametrize("lat", ["NaN", "Infinity", "-Infinity", "1e999"])
async def test_non_finite_numbers_are_refused_at_apply(api: Api, lat: str) -> None:
    async with api.client("admin") as c:
        r = await c.post("/api/v1/apply", content=NAN_SITE % lat,
                         headers={"content-type": "application/json"})
        text = one_line_4xx(r)
        assert "not a finite number" in text
        assert ("Site", "nan-site") not in api.engine.specs
        r = await c.get("/api/v1/revisions")
        assert r.status_code == 200


async def test_non_finite_numbers_in_commands_are_refused(api: Api) -> None:
    async with api.client("oper") as c:
        for body in ('{"type": "reboot", "timeout": NaN}',
                     '{"type": "reboot", "timeout": 1e999}',
                     '{"type": "set_sampling_rate", "params": {"rate": NaN}}'):
            r = await c.post("/api/v1/devices/t1/commands", content=body,
                             headers={"content-type": "application/json"})
            assert "not a finite number" in one_line_4xx(r), body
        r = await c.post("/api/v1/devices/t1/commands", params={"wait": "nan"},
                         json={"type": "reboot"})
        one_line_4xx(r)
        r = await c.patch("/api/v1/devices/t1/twin/desired", content='{"sampling_rate": NaN}',
                          headers={"content-type": "application/json"})
        one_line_4xx(r)
        for path in ("/api/v1/devices/t1/status/history", "/api/v1/devices/t1/metrics"):
            for since in ("nan", "inf", "-inf"):
                r = await c.get(path, params={"since": since})
                assert r.status_code == 422, (path, since, r.text)


async def test_deep_json_and_lone_surrogates_are_4xx(api: Api) -> None:
    async with api.client("admin") as c:
        deep = '{"documents": [' + "[" * 1000 + "]" * 1000 + "]}"
        r = await c.post("/api/v1/apply", content=deep, headers={"content-type": "application/json"})
        assert "nested more than" in one_line_4xx(r)
        deep = '{"type": "reboot", "params": {"x": ' + "[" * 5000 + "]" * 5000 + "}}"
        r = await c.post("/api/v1/devices/t1/commands", content=deep,
                         headers={"content-type": "application/json"})
        assert "nested more than" in one_line_4xx(r)
        doc = site("plant-c")
        doc["spec"]["title"] = "PLANT_C_TITLE"
        body = json.dumps({"documents": [doc]}).replace("PLANT_C_TITLE", "a\\ud800b")
        r = await c.post("/api/v1/apply", content=body, headers={"content-type": "application/json"})
        assert "lone surrogate" in one_line_4xx(r)
        # encoded in the bytes themselves (json.loads would decode it with 'surrogatepass')
        raw = b'{"type": "reboot", "params": {"x": "a\xed\xa0\x80b"}}'
        r = await c.post("/api/v1/devices/t1/commands", content=raw,
                         headers={"content-type": "application/json"})
        assert "not valid Unicode" in one_line_4xx(r)
        assert ("Site", "plant-c") not in api.engine.specs


async def test_metrics_label_by_route_template_not_raw_path(api: Api) -> None:
    async with api.client(None) as c:
        for i in range(5):
            assert (await c.get(f"/api/v1/devices/probe-{i}")).status_code == 401
            assert (await c.get(f"/no/such/path-{i}")).status_code in (401, 404)
    async with api.client("admin") as c:
        text = (await c.get("/metrics")).text
    assert "probe-" not in text and "path-" not in text
    assert 'route="/api/v1/devices/{device}"' in text
    assert 'route="unmatched"' in text


async def test_websocket_refuses_bad_messages_and_stays_up(api: Api) -> None:
    ws_url = api.engine.service_info["api"]["ws"]
    token = api.tokens["viewer"]
    async with open_websocket_url(f"{ws_url}?devices=t2&kinds=reading",
                                  subprotocols=["bearer", token]) as ws:
        assert json.loads(await ws.get_message())["kind"] == "hello"
        bad: list[Any] = ['{"subscribe": {"devices": NaN}}',
                          '{"subscribe": ' + "[" * 3000 + "]" * 3000 + "}",
                          '{"subscribe": {"devices": "\\ud800"}}']
        for msg in bad:
            await ws.send_message(msg)
            with trio.fail_after(10):
                while True:
                    ev = json.loads(await ws.get_message())
                    if ev["kind"] == "error":
                        break
            assert "\n" not in ev["detail"]
        await ws.send_message(json.dumps({"subscribe": {"devices": "t1", "kinds": "reading"}}))
        with trio.fail_after(10):
            while True:
                ev = json.loads(await ws.get_message())
                if ev.get("device") == "t1":
                    break
