"""The front door (twin/api/frontdoor.py) answers ``POST /api/v1/ingest/{device}`` exactly as
hypercorn + the gatekeeper do: the same status, headers and body for good and bad input (bad
JSON, wrong or missing key, another site's device, a user's JWT, an oversized body, the
per-device rate limit), the write-ahead log before the 2xx, keep-alive, pipelining and
``Connection: close``; anything else on a connection goes to hypercorn with the bytes read.

Each case is sent twice over raw sockets to one engine: on a fresh connection (the door
answers it) and on a connection whose first request is ``GET /api/v1/health`` (hypercorn takes
that connection, so the gatekeeper's ASGI path answers the ingest request after it)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
from runtime.helpers import eventually, sim_device

from twin.api.frontdoor import parse_head
from twin.api.gatekeeper import MAX_INGEST_BODY
from twin.api.ratelimit import Rate
from twin.runtime.timeseries_service import TimeSeriesService

from .conftest import Api, demo_docs, loose_settings, serving

HEALTH = b"GET /api/v1/health HTTP/1.1\r\nHost: t\r\n\r\n"
Response = tuple[int, dict[str, str], bytes]


Door = tuple[Api, dict[str, str], TimeSeriesService]


@pytest.fixture
async def door(tmp_path: Path) -> AsyncIterator[Door]:
    async with open_door(tmp_path) as d:
        yield d


@asynccontextmanager
async def open_door(tmp_path: Path, **settings_kw: Any) -> AsyncIterator[Door]:
    settings = replace(
        loose_settings(tmp_path / "state", **settings_kw),
        rate_ingest_per_device=Rate(0.01, 40),  # 40 requests per device, then 429
    )
    docs = [
        *demo_docs(),
        sim_device("push_b", site_="plant-b", binding={"http": {}}),
        sim_device("limited", binding={"http": {}}),
    ]
    ts = TimeSeriesService()
    async with serving(tmp_path / "state", settings, docs=docs, services=[ts]) as a:
        keys = {}
        async with a.client("admin") as c:
            for device in ("push1", "push_b", "limited"):
                r = await c.post(f"/api/v1/devices/{device}/keys")
                assert r.status_code == 201, r.text
                keys[device] = r.json()["key"]
        engine = a.engine
        await eventually(lambda: all(engine.hub.running(d) for d in keys))
        yield a, keys, ts


def request(device: str, body: bytes, *headers: str, length: int | None = None) -> bytes:
    head = [f"POST /api/v1/ingest/{device} HTTP/1.1", "Host: t", *headers]
    head.append(f"Content-Length: {len(body) if length is None else length}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def read_response(stream: trio.SocketStream, buf: bytearray) -> Response:
    """The next final response (a ``100 Continue`` before it is skipped)."""
    while True:
        response = await _read_one(stream, buf)
        if response[0] >= 200:
            return response


async def _read_one(stream: trio.SocketStream, buf: bytearray) -> Response:
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(65536)
        assert data, f"connection closed after {bytes(buf)!r}"
        buf += data
    end = buf.index(b"\r\n\r\n")
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    stop = end + 4 + int(headers.get("content-length", "0"))
    while len(buf) < stop:
        data = await stream.receive_some(65536)
        assert data
        buf += data
    body = bytes(buf[end + 4 : stop])
    del buf[:stop]
    return status, headers, body


async def exchange(api: Api, data: bytes, count: int = 1, *, via: str) -> list[Response]:
    """Send ``data`` on a new connection (``via="hypercorn"``: after a health check that
    hands the connection over) and read ``count`` responses."""
    port = int(api.url.rsplit(":", 1)[1])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    buf = bytearray()
    async with stream:
        if via == "hypercorn":
            await stream.send_all(HEALTH)
            status, _, _ = await read_response(stream, buf)
            assert status == 200
        async with trio.open_nursery() as nursery:
            # sent alongside the reading: a 413 may come before the whole body is written
            nursery.start_soon(stream.send_all, data)
            return [await read_response(stream, buf) for _ in range(count)]


def door_of(api: Api) -> Any:
    return api.engine.service_info["api"]["app"].state.front_door


async def both(api: Api, data: bytes, count: int = 1) -> tuple[list[Response], list[Response]]:
    """The same request(s) through the door and through hypercorn; checks which answered."""
    fd = door_of(api)
    served, handed = fd.served, fd.handed
    door = await exchange(api, data, count, via="door")
    assert fd.served == served + count and fd.handed == handed
    hyper = await exchange(api, data, count, via="hypercorn")
    assert fd.served == served + count and fd.handed == handed + 1
    return door, hyper


def same(door: list[Response], hyper: list[Response], *, status: int) -> dict[str, Any]:
    """Identical status, headers (but the date) and body; returns the door's JSON body."""
    assert len(door) == len(hyper)
    for (s1, h1, b1), (s2, h2, b2) in zip(door, hyper, strict=True):
        assert s1 == s2 == status, (s1, s2, b1, b2)
        assert {k: v for k, v in h1.items() if k != "date"} == {
            k: v for k, v in h2.items() if k != "date"
        }
        assert "date" in h1 and "date" in h2
        assert b1 == b2
    result: dict[str, Any] = json.loads(door[0][2])
    return result


async def test_good_readings_are_logged_before_the_same_200(door: Any) -> None:
    api, keys, ts = door
    assert ts.wal is not None
    before = ts.wal.stats()["records"]
    body = b'{"values": {"temperature": 21.5}}'
    d, h = await both(api, request("push1", body, f"X-Device-Key: {keys['push1']}"))
    assert same(d, h, status=200) == {"accepted": 1}
    assert ts.wal.stats()["records"] == before + 2  # each 200 came after its WAL record
    # the key as a bearer token, as the gatekeeper takes it
    d, h = await both(api, request("push1", body, f"Authorization: Bearer {keys['push1']}"))
    assert same(d, h, status=200) == {"accepted": 1}


@pytest.mark.parametrize(
    ("case", "status"),
    [
        ("malformed JSON", 422),
        ("not an object", 422),
        ("wrong shape", 422),
        ("wrong key", 401),
        ("no key", 401),
        ("other site's device", 401),
        ("a user's JWT", 401),
    ],
)
async def test_bad_input_gets_the_same_answer(door: Any, case: str, status: int) -> None:
    api, keys, _ = door
    good = f"X-Device-Key: {keys['push1']}"
    data = {
        "malformed JSON": request("push1", b'{"values": {', good),
        "not an object": request("push1", b"[1, 2]", good),
        "wrong shape": request("push1", b'{"readings": "nope"}', good),
        "wrong key": request("push1", b"{}", f"X-Device-Key: {keys['push1'][:-2]}xx"),
        "no key": request("push1", b"{}"),
        "other site's device": request("push_b", b"{}", good),
        "a user's JWT": request("push1", b"{}", f"Authorization: Bearer {api.tokens['admin']}"),
    }[case]
    d, h = await both(api, data)
    detail = same(d, h, status=status)["detail"]
    assert isinstance(detail, str) and detail
    if status == 401:
        assert d[0][1]["www-authenticate"] == "DeviceKey"


async def test_oversized_and_unusual_requests_go_to_hypercorn(door: Any) -> None:
    api, keys, _ = door
    fd = door_of(api)
    key = f"X-Device-Key: {keys['push1']}"
    big = b"{" + b" " * MAX_INGEST_BODY + b"}"
    for data, status in (
        (request("push1", big, key), 413),
        # chunked, Expect: 100-continue: hypercorn's framing
        (
            b"POST /api/v1/ingest/push1 HTTP/1.1\r\nHost: t\r\n" + key.encode()
            + b"\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            200,
        ),
        (request("push1", b"{}", key, "Expect: 100-continue"), 200),
    ):
        handed = fd.handed
        served = fd.served
        [(got, _, body)] = await exchange(api, data, via="door")
        assert got == status, body
        if status == 413:
            assert json.loads(body) == {"detail": "body too large"}
        assert fd.handed == handed + 1 and fd.served == served
    # bare LF line ends (h11 takes them), in two writes: hypercorn's, answered alike
    lf = request("push1", b"{}", key).replace(b"\r\n", b"\n")
    port = int(api.url.rsplit(":", 1)[1])
    handed = fd.handed
    async with await trio.open_tcp_stream("127.0.0.1", port) as s:
        cut = lf.index(b"\n") + 3
        await s.send_all(lf[:cut])
        # the door hands it over before the head is complete
        await eventually(lambda: fd.handed > handed)
        await s.send_all(lf[cut:])
        assert (await read_response(s, bytearray()))[0] == 200
    # a malformed request: hypercorn's own 400
    [(got, _, _)] = await exchange(api, b"POST /api/v1/ingest/push1 HTTP/1.1\r\n\r\n", via="door")
    assert got == 400


async def test_rate_limit_answers_alike(door: Any) -> None:
    api, keys, _ = door
    data = request("limited", b"{}", f"X-Device-Key: {keys['limited']}")
    answers = await exchange(api, data * 41, 41, via="door")  # pipelined, in order
    assert [s for s, _, _ in answers] == [200] * 40 + [429]
    d, h = await both(api, data)
    (s1, h1, b1), (s2, h2, b2) = d[0], h[0]
    assert s1 == s2 == 429 and b1 == b2 == b'{"detail":"too many requests for this device"}'
    # Retry-After counts down with the clock between the two requests
    assert abs(int(h1.pop("retry-after")) - int(h2.pop("retry-after"))) <= 1
    same([(s1, h1, b1)], [(s2, h2, b2)], status=429)


async def test_keep_alive_pipelining_and_close(door: Any) -> None:
    api, keys, _ = door
    key = f"X-Device-Key: {keys['push1']}"
    good = request("push1", b'{"values": {"temperature": 1}}', key)
    # two ingest calls and a health check in one write: the door answers the first two, then
    # hands the connection (with the health check already read) to hypercorn
    fd = door_of(api)
    served, handed = fd.served, fd.handed
    answers = await exchange(api, good + good + HEALTH, 3, via="door")
    assert [s for s, _, _ in answers] == [200, 200, 200]
    assert json.loads(answers[2][2])["status"] == "ok"
    assert (fd.served, fd.handed) == (served + 2, handed + 1)
    d, h = await both(api, request("push1", b"{}", key, "Connection: close"))
    same(d, h, status=200)
    assert d[0][1]["connection"] == "close"
    port = int(api.url.rsplit(":", 1)[1])
    async with await trio.open_tcp_stream("127.0.0.1", port) as s:
        await s.send_all(request("push1", b"{}", key, "Connection: close"))
        buf = bytearray()
        await read_response(s, buf)
        with trio.fail_after(5):
            assert await s.receive_some(100) == b""  # closed after the answer


async def test_route_stays_documented(door: Any) -> None:
    api, _, _ = door
    async with api.client(None) as c:
        doc = (await c.get("/openapi.json")).json()
    op = doc["paths"]["/api/v1/ingest/{device}"]["post"]
    assert op["security"] == [{"DeviceKey": []}]


@pytest.mark.parametrize(
    "head",
    [
        b"POST /api/v1/ingest/a/b HTTP/1.1\r\nHost: t\r\nContent-Length: 0",
        b"POST /api/v1/ingest/a%20b HTTP/1.1\r\nHost: t\r\nContent-Length: 0",
        b"POST /api/v1/ingest/a?x=1 HTTP/1.1\r\nHost: t\r\nContent-Length: 0",
        b"POST /api/v1/ingest/a HTTP/1.0\r\nHost: t\r\nContent-Length: 0",
        b"PUT /api/v1/ingest/a HTTP/1.1\r\nHost: t\r\nContent-Length: 0",
        b"POST /api/v1/ingest/a HTTP/1.1\r\nContent-Length: 0",
        b"POST /api/v1/ingest/a HTTP/1.1\r\nHost: t\r\nHost: u\r\nContent-Length: 0",
        b"POST /api/v1/ingest/a HTTP/1.1\r\nHost: t",
        b"POST /api/v1/ingest/a HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 1",
        b"POST /api/v1/ingest/a HTTP/1.1\r\nHost: t\r\nContent-Length: -1",
        b"POST /api/v1/ingest/a HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: upgrade",
        b"POST /api/v1/ingest/a HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nUpgrade: h2c",
        b"POST /api/v1/ingest/a HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n folded",
        b"POST /api/v1/ingest/a HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nBad Name: x",
        b"POST /api/v1/ingest/a HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nX: \x01",
        b"POST /api/v1/ingest/a HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nX: caf\xc3\xa9",
        b"POST /api/v1/ingest/a HTTP/1.1\r\nHost: t\r\nContent-Length: %d" % (MAX_INGEST_BODY + 1),
    ],
)
def test_what_the_door_leaves_to_hypercorn(head: bytes) -> None:
    assert parse_head(head) is None


def test_what_the_door_serves() -> None:
    head = (
        b"POST /api/v1/ingest/dev-1.x_y HTTP/1.1\r\nHost: t\r\nX-Device-Key:  k1 \r\n"
        b"connection: Keep-Alive, close\r\nContent-Length: 12"
    )
    assert parse_head(head) == (
        "dev-1.x_y",
        [(b"host", b"t"), (b"x-device-key", b"k1"), (b"connection", b"Keep-Alive, close"),
         (b"content-length", b"12")],
        12,
        True,
    )


# --- slow and too many clients, bad requests: only that connection ---------------------------

@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[Door]:
    async with open_door(
        tmp_path, request_head_timeout=0.5, request_body_timeout=0.5, max_connections=4
    ) as d:
        yield d


def port_of(api: Api) -> int:
    return int(api.url.rsplit(":", 1)[1])


async def closed_after(stream: trio.SocketStream, buf: bytearray) -> Response:
    """The one answer left on a connection the server closes after it."""
    answer = await read_response(stream, buf)
    assert answer[1]["connection"] == "close"
    with trio.fail_after(30):  # a bound on a hang, not a timing assertion
        assert buf == b"" and await stream.receive_some(100) == b""
    return answer


async def test_half_sent_requests_get_408_and_only_theirs_close(guarded: Door) -> None:
    api, keys, _ = guarded
    fd = door_of(api)
    key = f"X-Device-Key: {keys['push1']}"
    good = request("push1", b'{"values": {"temperature": 2}}', key)
    port = port_of(api)
    async with await trio.open_tcp_stream("127.0.0.1", port) as keeper:
        kbuf = bytearray()
        await keeper.send_all(good)
        assert (await read_response(keeper, kbuf))[0] == 200
        cases = [
            (good[: good.index(b"\r\n\r\n")], "head"),  # the head never ends
            (good[:-5], "body"),  # the body stops 5 bytes short of its Content-Length
            (good + good[:40], "head"),  # a pipelined second request stops half-way
        ]
        for data, what in cases:
            timed_out = fd.timed_out
            async with await trio.open_tcp_stream("127.0.0.1", port) as s:
                await s.send_all(data)
                buf = bytearray()
                if what == "head" and data.startswith(good):
                    assert (await read_response(s, buf))[0] == 200
                status, headers, body = await closed_after(s, buf)
                assert status == 408, body
                assert json.loads(body) == {
                    "detail": f"request {what} not received within 0.5 s"
                }
                assert "date" in headers and headers["content-type"] == "application/json"
            assert fd.timed_out == timed_out + 1
            # the other connection was never disturbed
            await keeper.send_all(good)
            assert (await read_response(keeper, kbuf))[0] == 200


async def test_a_trickled_head_is_cut_off(guarded: Door) -> None:
    """Slowloris: a byte every 50 ms keeps every read short, the head never completes; the
    deadline runs from the head's first byte."""
    api, keys, _ = guarded
    fd = door_of(api)
    data = request("push1", b"{}", f"X-Device-Key: {keys['push1']}", "X-Pad: " + "a" * 2000)
    async with await trio.open_tcp_stream("127.0.0.1", port_of(api)) as s:

        async def trickle() -> None:
            try:
                for i in range(len(data)):
                    await s.send_all(data[i : i + 1])
                    await trio.sleep(0.05)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            buf = bytearray()
            status, _, body = await read_response(s, buf)
            nursery.cancel_scope.cancel()
        assert status == 408, body
        assert fd.timed_out == 1 and fd.served == 0


async def test_connections_above_the_cap_get_503(guarded: Door) -> None:
    api, keys, _ = guarded
    fd = door_of(api)
    port = port_of(api)
    good = request("push1", b"{}", f"X-Device-Key: {keys['push1']}")
    await eventually(lambda: fd.connections == 0)  # the fixture's own HTTP client is gone
    held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(4)]
    try:
        await held[0].send_all(HEALTH)  # one of them handed to hypercorn: it counts too
        assert (await read_response(held[0], bytearray()))[0] == 200
        await eventually(lambda: fd.connections == 4)
        async with await trio.open_tcp_stream("127.0.0.1", port) as s:
            await s.send_all(good)
            status, headers, body = await closed_after(s, bytearray())
        assert status == 503 and headers["retry-after"] == "1"
        assert json.loads(body) == {
            "detail": "too many open connections (limit 4); try again"
        }
        assert fd.refused == 1
        # a flood: while max_refusing refusals linger, the next are closed unanswered
        fd.max_refusing = 0
        async with await trio.open_tcp_stream("127.0.0.1", port) as s:
            with trio.fail_after(30), suppress(trio.BrokenResourceError):  # EOF or reset
                assert await s.receive_some(100) == b""
        assert fd.refused == 2 and fd.refusing == 0
        # the held connections still work
        for h in held[1:]:
            await h.send_all(good)
            assert (await read_response(h, bytearray()))[0] == 200
    finally:
        for h in held:
            await h.aclose()
    await eventually(lambda: fd.connections == 0)
    [(status, _, _)] = await exchange(api, good, via="door")
    assert status == 200


async def test_bad_requests_close_only_their_connection(door: Door) -> None:
    api, keys, _ = door
    key = f"X-Device-Key: {keys['push1']}"
    good = request("push1", b'{"values": {"temperature": 3}}', key)
    bad = [
        (b"POST /api/v1/ingest/push1 HTTP/1.1\r\nHost t\r\n\r\n", 400),  # malformed field
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, None),  # TLS hello
        (b"BREW /pot HTTP/1.1\r\n\r\n", 400),
        (request("push1", b"{}", key, "X-Pad: " + "a" * 100_000), 431),  # a 100 KB head
        (request("push1", b"{}", key, length=-5), 400),
    ]
    port = port_of(api)
    async with await trio.open_tcp_stream("127.0.0.1", port) as keeper:
        kbuf = bytearray()
        for data, status in bad:
            s = await trio.open_tcp_stream("127.0.0.1", port)
            async with s, trio.open_nursery() as nursery:
                nursery.start_soon(s.send_all, data)
                buf = bytearray()
                if status is not None:
                    got, _, body = await read_response(s, buf)
                    assert got == status, (data[:40], body)
                with trio.fail_after(30):  # then the connection ends (a bound on a hang)
                    try:
                        while await s.receive_some(65536):
                            pass
                    except trio.BrokenResourceError:
                        pass  # reset: the server closed with bytes of ours unread
                nursery.cancel_scope.cancel()
            await keeper.send_all(good)
            assert (await read_response(keeper, kbuf))[0] == 200
        # a body above the limit: 413, and this connection goes on (hypercorn reads the body)
        big = request("push1", b"{" + b" " * MAX_INGEST_BODY + b"}", key)
        [(s413, _, _), (s200, _, _)] = await exchange(api, big + good, 2, via="door")
        assert (s413, s200) == (413, 200)
        await keeper.send_all(good)
        assert (await read_response(keeper, kbuf))[0] == 200
