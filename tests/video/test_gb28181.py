"""GB28181 against real peers: sipp (Debian sip-tester) plays the device (REGISTER with digest,
Catalog, keepalives, INVITE answered with PS over RTP from a pcap of ffmpeg's program stream);
ffmpeg decodes what our feed serves. Plus the codecs on their own, a SIP flood and garbage."""

from __future__ import annotations

import contextlib
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.video import gb_device
from twin.errors import BindingConnectError, CommandError
from twin.video import sources
from twin.video.gb28181 import manscdp, sip
from twin.video.gb28181 import source as gb_source
from twin.video.gb28181.media import (
    Depacketizer,
    PsParser,
    Rfc4571,
    frame_rfc4571,
    packetize_ps,
    parse_rtp,
)
from twin.video.gb28181.server import Gb28181Config, Gb28181Server

HERE = Path(__file__).parent
DEV = "34020000001320000001"
CHAN = "34020000001310000001"
REALM = "3402000000"
SERVER_ID = "34020000002000000001"
pytestmark = pytest.mark.integration


# -- codecs ------------------------------------------------------------------------------------
def test_digest_rfc2617_vector() -> None:
    assert sip.digest_response("Mufasa", "testrealm@host.com", "Circle Of Life", "GET",
                               "/dir/index.html", "dcd98b7102dd2f0e8b11d0f600bfb0c093", "auth",
                               "00000001", "0a4f113b") == "6629fae49393a05397450978507c4ef1"
    auth = sip.parse_auth('Digest username="Mufasa", realm="testrealm@host.com", '
                          'nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", uri="/dir/index.html", '
                          'qop=auth, nc=00000001, cnonce="0a4f113b", '
                          'response="6629fae49393a05397450978507c4ef1"')
    assert sip.check_digest(auth, "Circle Of Life", "GET")
    assert not sip.check_digest(auth, "wrong", "GET")


def test_sip_parse_build_and_tcp_framing() -> None:
    raw = (f"REGISTER sip:{SERVER_ID}@{REALM} SIP/2.0\r\nv: SIP/2.0/UDP 1.2.3.4:5060;branch=z9\r\n"
           f"f: <sip:{DEV}@{REALM}>;tag=a\r\nt: <sip:{DEV}@{REALM}>\r\ni: c1\r\n"
           "CSeq: 1 REGISTER\r\nl: 0\r\n\r\n").encode()
    msg = sip.parse(raw)
    assert msg.method == "REGISTER" and msg.call_id == "c1" and msg.cseq == (1, "REGISTER")
    assert sip.uri_user(msg.header("from") or "") == DEV
    resp = msg.response(401, "Unauthorized", to_tag="x")
    again = sip.parse(resp.encode())
    assert again.status == 401 and sip.tag(again.header("to") or "") == "x"
    assert again.header("via") == "SIP/2.0/UDP 1.2.3.4:5060;branch=z9"
    parser = sip.StreamParser()
    two = raw + b"\r\n" + resp.encode()
    got = [m for i in range(0, len(two), 7) for m in parser.feed(two[i:i + 7])]
    assert [m.method for m in got] == ["REGISTER", "REGISTER"] and got[1].status == 401
    for bad in (b"", b"HELLO\r\n\r\n", b"INVITE x SIP/1.0\r\n\r\n",
                b"SIP/2.0 99x OK\r\n\r\n", raw.replace(b"i: c1\r\n", b""),
                raw.replace(b"l: 0", b"l: 999"), b"A" * 70_000):
        with pytest.raises(sip.SipParseError):
            sip.parse(bad)
    with pytest.raises(sip.SipParseError):
        sip.StreamParser().feed(b"X" * 70_000)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_sip_parser_never_raises_anything_else(data: bytes) -> None:
    for candidate in (data, b"MESSAGE sip:a SIP/2.0\r\n" + data):
        with contextlib.suppress(sip.SipParseError):
            sip.parse(candidate)
        with contextlib.suppress(sip.SipParseError):
            sip.StreamParser().feed(candidate)


def test_manscdp_gb2312_and_utf8() -> None:
    body = ('<?xml version="1.0" encoding="GB2312"?>\r\n<Response><CmdType>Catalog</CmdType>'
            f"<SN>7</SN><DeviceID>{DEV}</DeviceID><SumNum>1</SumNum><DeviceList Num=\"1\"><Item>"
            f"<DeviceID>{CHAN}</DeviceID><Name>大门摄像机</Name><Status>ON</Status></Item>"
            "</DeviceList></Response>").encode("gb2312")
    msg = manscdp.parse(body)
    assert (msg.root, msg.cmd, msg.sn, msg.device_id, msg.sum_num) == (
        "Response", "Catalog", 7, DEV, 1)
    assert msg.items == [{"DeviceID": CHAN, "Name": "大门摄像机", "Status": "ON"}]
    ka = manscdp.parse(f"<Notify><CmdType>Keepalive</CmdType><SN>1</SN><DeviceID>{DEV}"
                       "</DeviceID><Status>OK</Status></Notify>".encode())
    assert ka.cmd == "Keepalive" and ka.fields["Status"] == "OK"
    for bad in (b"<x/>", b"not xml", b"<Notify><SN>x</SN></Notify>"):
        with pytest.raises(manscdp.ManscdpError):
            manscdp.parse(bad)
    xxe = manscdp.parse(b'<!DOCTYPE a [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
                        b"<Notify><CmdType>&e;</CmdType></Notify>")
    assert "root:" not in repr(xxe)  # external entities are never resolved
    assert manscdp.parse(manscdp.catalog_query(3, DEV)).cmd == "Catalog"


@pytest.fixture(scope="module")
def ffmpeg_ps() -> bytes:
    return gb_device.make_ps(4.0)


def test_ps_parser_on_ffmpeg_program_stream(ffmpeg_ps: bytes) -> None:
    whole = PsParser()
    whole.feed(ffmpeg_ps)
    assert whole.packs > 50 and whole.video_pes >= whole.packs - 2
    assert whole.keyframes >= 4  # -g 25 over 4 s
    chunked = PsParser()
    for i in range(0, len(ffmpeg_ps), 333):  # any cut gives the same walk
        chunked.feed(ffmpeg_ps[i:i + 333])
    assert (chunked.packs, chunked.video_pes, chunked.keyframes) == (
        whole.packs, whole.video_pes, whole.keyframes)
    junk = PsParser()  # garbage before and inside: resynchronises on the next start code
    junk.feed(b"\xff" * 1000 + ffmpeg_ps[:20000] + b"\x00\x00\x01\x07garbage" + ffmpeg_ps[20000:])
    assert junk.skipped >= 1000 and junk.packs >= whole.packs - 2


def test_rtp_depacketizer_reorder_loss_and_rfc4571(ffmpeg_ps: bytes) -> None:
    packets = packetize_ps(ffmpeg_ps, ssrc=7)
    assert all(parse_rtp(p).payload_type == 96 for p in packets)
    shuffled = packets[:]
    for k in range(3, len(shuffled) - 3, 7):
        shuffled[k], shuffled[k + 2] = shuffled[k + 2], shuffled[k]
    d = Depacketizer()
    out = [payload for p in [*shuffled, packets[10]] for payload in d.push_bytes(p)]
    assert b"".join(out) == ffmpeg_ps and d.reordered > 0 and d.duplicates == 1 and d.lost == 0
    d = Depacketizer(window=8)  # a lost packet: skipped once the window is full
    out = [payload for i, p in enumerate(packets[:40]) if i != 5 for payload in d.push_bytes(p)]
    assert d.lost == 1 and len(out) == 39
    d = Depacketizer()
    for bad in (b"", b"\x00" * 12, b"\x80" * 5, bytes([0x8F]) + b"\x00" * 11):
        assert d.push_bytes(bad) == []
    assert d.bad == 4
    framer = Rfc4571()
    stream = b"".join(frame_rfc4571(p) for p in packets[:30])
    got = [f for i in range(0, len(stream), 1000) for f in framer.feed(stream[i:i + 1000])]
    assert got == packets[:30]


# -- the server against sipp --------------------------------------------------------------------
def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Gb28181Server]:
    cfg = Gb28181Config(port=0, password="pw-28181", keepalive_timeout=2.5,
                        discovered_file=tmp_path / "gb28181-discovered.yaml", linger=0.5)
    srv = Gb28181Server(cfg)
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        gb_source.set_server(srv)
        try:
            yield srv
        finally:
            gb_source.set_server(None)
            nursery.cancel_scope.cancel()


class Device:
    """sipp as a GB28181 device (tests/video/sipp/gb_device*.xml)."""

    def __init__(self, server: Gb28181Server, tmp_path: Path, pcap: Path, *,
                 password: str = "pw-28181", keepalives: int = 30, tcp: bool = False,
                 uas_file: str = "gb_device_uas.xml") -> None:
        uas = (HERE / "sipp" / uas_file).read_text().replace("@PCAP@", str(pcap))
        (tmp_path / "uas.xml").write_text(uas)
        self.port = free_port()
        self.argv = [
            "sipp", f"127.0.0.1:{server.udp_port}", "-sf", str(HERE / "sipp" / "gb_device.xml"),
            "-oocsf", str(tmp_path / "uas.xml"), "-s", SERVER_ID, "-i", "127.0.0.1",
            "-p", str(self.port), "-mp", str(free_port()), "-m", "1", "-au", DEV, "-ap", password,
            "-set", "dev", DEV, "-set", "chan", CHAN, "-set", "realm", REALM,
            "-set", "kas", str(keepalives), "-timeout", "60s", "-nostdin",
            "-trace_err", "-error_file", str(tmp_path / "sipp_errors.log"),
            "-trace_msg", "-message_file", str(tmp_path / "sipp_messages.log"),
        ]
        self.messages = tmp_path / "sipp_messages.log"
        if tcp:  # SIP over TCP: one connection, our requests come back over it
            self.argv[1] = f"127.0.0.1:{server.tcp_port}"
            self.argv += ["-t", "t1", "-max_socket", "10"]
        self.proc: trio.Process | None = None

    async def __aenter__(self) -> Device:
        self.proc = await trio.lowlevel.open_process(self.argv, stdout=subprocess.DEVNULL,
                                                     stderr=subprocess.DEVNULL)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.kill()
            with trio.move_on_after(5) as scope:
                scope.shield = True
                await self.proc.wait()


async def wait_for(cond, what: str, limit: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    with trio.move_on_after(limit):
        while not cond():  # noqa: ASYNC110 - polls state of a server in the same process
            await trio.sleep(0.05)
        return
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def pcap(tmp_path_factory: pytest.TempPathFactory, ffmpeg_ps: bytes) -> Path:
    path = tmp_path_factory.mktemp("gb") / "ps.pcap"
    return gb_device.write_pcap(gb_device.rtp_packets(ffmpeg_ps), path)


async def test_sipp_device_registers_catalog_keepalive_live_view_bye(
        server: Gb28181Server, tmp_path: Path, pcap: Path) -> None:
    events: list[tuple[str, bool, str]] = []
    server.on_status.append(lambda dev, online, why: events.append((dev, online, why)))
    async with Device(server, tmp_path, pcap, keepalives=600) as device:
        await wait_for(lambda: DEV in server.devices and server.devices[DEV].keepalives >= 1,
                       "REGISTER (digest) + keepalive")
        dev = server.devices[DEV]
        assert dev.online and server.stats.registers == 1 and server.stats.auth_failures == 0
        # the Catalog (asked right after registration): the channel, proposed as Device YAML
        await wait_for(lambda: CHAN in dev.channels, "Catalog response")
        assert dev.channels[CHAN].name == "Gate camera"
        (doc,) = yaml.safe_load_all((tmp_path / "gb28181-discovered.yaml").read_text())
        assert doc["spec"]["binding"] == {"gb28181": {"device_id": DEV, "channel": CHAN}}
        # the camera's source: a feed ffmpeg reads; reading it INVITEs the channel
        camera = {"metadata": {"name": "gate"}, "spec": {"binding": {"gb28181": {
            "device_id": DEV, "channel": CHAN}}}}
        src = await sources.resolve_source(camera, "gb28181", _NoSecrets())
        assert src.url.startswith("tcp://127.0.0.1:") and src.options["f"] == "mpeg"
        argv = ["ffmpeg", "-hide_banner", "-loglevel", "error"]
        for k, v in src.options.items():
            argv += [f"-{k}", str(v)]
        argv += ["-i", src.url, "-an", "-frames:v", "20", "-f", "framemd5", "-"]
        procs: list[subprocess.CompletedProcess[bytes]] = []

        async def view() -> None:
            procs.append(await trio.run_process(argv, capture_stdout=True,
                                                capture_stderr=True, check=False))

        async with trio.open_nursery() as nursery:  # two viewers at once: one INVITE
            nursery.start_soon(view)
            nursery.start_soon(view)
        for proc in procs:
            assert proc.returncode == 0, proc.stderr.decode()[-400:]
            frames = [ln for ln in proc.stdout.decode().splitlines() if not ln.startswith("#")]
            assert len(frames) == 20  # decoded video from sipp's RTP
        assert server.stats.invites == 1
        session = next(iter(server.sessions.values()))
        assert session.depack.received > 0 and session.ps.keyframes >= 1
        assert session.depack.bad == 0
        # the reader left: BYE after the linger, answered by the device
        await wait_for(lambda: not server.sessions, "BYE")
        assert server.stats.byes == 1
        assert device.proc is not None and device.proc.returncode is None
    # the device is gone (sipp killed): no keepalives, offline after keepalive_timeout
    await wait_for(lambda: not dev.online, "offline after missed keepalives")
    assert (DEV, False, "keepalive timeout") in events
    with pytest.raises(BindingConnectError, match="offline"):
        await sources.resolve_source(camera, "gb28181", _NoSecrets())


class _NoSecrets:
    def get(self, ref: str) -> str | None:
        return None


async def test_wrong_password_is_refused(server: Gb28181Server, tmp_path: Path,
                                         pcap: Path) -> None:
    async with Device(server, tmp_path, pcap, password="wrong") as device:
        assert device.proc is not None
        with trio.fail_after(20):
            rc = await device.proc.wait()
    assert rc != 0  # sipp expected 200, got 403
    assert server.stats.auth_failures >= 1 and DEV not in server.devices
    camera = {"metadata": {"name": "gate"}, "spec": {"binding": {"gb28181": {
        "device_id": DEV}}}}
    with pytest.raises(BindingConnectError, match="not registered"):
        await sources.resolve_source(camera, "gb28181", _NoSecrets())


async def test_rtp_over_tcp_rfc4571(server: Gb28181Server, tmp_path: Path, pcap: Path,
                                    ffmpeg_ps: bytes) -> None:
    async with Device(server, tmp_path, pcap):
        await wait_for(lambda: DEV in server.devices, "REGISTER")
        feed = await server.open_feed(DEV, CHAN, "tcp")
        packets = gb_device.rtp_packets(ffmpeg_ps)
        async with trio.open_nursery() as nursery:
            async def read() -> bytes:
                stream = await trio.open_tcp_stream("127.0.0.1", feed.port)
                got = bytearray()
                async with stream:
                    with trio.move_on_after(20):
                        async for data in stream:
                            got += data
                            if len(got) >= len(ffmpeg_ps) // 2:
                                break
                return bytes(got)

            result: list[bytes] = []

            async def reader() -> None:
                result.append(await read())

            nursery.start_soon(reader)
            await wait_for(lambda: bool(server.sessions), "INVITE answered")
            session = next(iter(server.sessions.values()))
            assert session.transport == "tcp"
            # the device connects to our passive port: RFC 4571 framed RTP
            await trio.to_thread.run_sync(gb_device.send_tcp, packets, session.rtp_port, False)
        data = result[0]
        assert data.startswith(b"\x00\x00\x01\xba")
        ps = PsParser()
        ps.feed(data)
        assert ps.keyframes >= 1 and session.depack.lost == 0


async def test_flood_and_garbage_do_not_stop_the_server(server: Gb28181Server, tmp_path: Path,
                                                        pcap: Path) -> None:
    server.config.rate, server.config.burst = 100.0, 100
    async with Device(server, tmp_path, pcap, keepalives=40) as device:
        await wait_for(lambda: DEV in server.devices and server.devices[DEV].keepalives >= 1,
                       "REGISTER")
        before = server.devices[DEV].keepalives
        # sipp's own UAC scenario as a flood: 2000 INVITEs at 1000/s from one source
        flood = await trio.run_process(
            ["sipp", f"127.0.0.1:{server.udp_port}", "-sn", "uac", "-i", "127.0.0.1",
             "-p", str(free_port()), "-r", "1000", "-m", "2000", "-timeout", "8s", "-nostdin",
             "-recv_timeout", "500"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            check=False)
        assert flood.returncode != 0  # the flood was refused / ignored
        # garbage over UDP and TCP
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for i in range(150):
                s.sendto(b"\x00\xffgarbage" * (i % 50), ("127.0.0.1", server.udp_port))
        stream = await trio.open_tcp_stream("127.0.0.1", server.tcp_port)
        await stream.send_all(b"NOT SIP AT ALL\r\n\r\n")
        with trio.fail_after(5):
            assert await stream.receive_some() == b""  # that connection closed
        await stream.aclose()
        assert server.stats.rate_limited > 0 and server.stats.blocked_peers >= 1
        assert server.stats.malformed >= 1
        # the registered device is still served: its keepalives keep being answered
        await wait_for(lambda: server.devices[DEV].keepalives >= before + 2,
                       "keepalives after the flood")
        assert server.devices[DEV].online
        # and a new peer is answered
        options = (f"OPTIONS sip:{SERVER_ID}@{REALM} SIP/2.0\r\nVia: SIP/2.0/UDP "
                   "127.0.0.1:9;branch=z9hG4bKx\r\nFrom: <sip:1@x>;tag=1\r\nTo: <sip:2@x>\r\n"
                   "Call-ID: o1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n").encode()
        udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with udp:
            await udp.bind(("127.0.0.1", 0))
            await udp.sendto(options, ("127.0.0.1", server.udp_port))
            with trio.fail_after(30):  # a bound, not a threshold: the backlog comes first
                reply = sip.parse((await udp.recvfrom(65536))[0])
        assert reply.status == 200
        assert device.proc is not None and device.proc.returncode is None


async def test_sip_over_tcp_register_keepalive_catalog_ptz(server: Gb28181Server, tmp_path: Path,
                                                       pcap: Path) -> None:
    async with Device(server, tmp_path, pcap, keepalives=3, tcp=True) as device:
        await wait_for(lambda: DEV in server.devices and server.devices[DEV].keepalives >= 2,
                       "REGISTER + keepalives over TCP")
        dev = server.devices[DEV]
        assert dev.transport == "tcp" and dev.conn is not None
        await wait_for(lambda: CHAN in dev.channels, "Catalog response over TCP")
        # a request of ours goes back over the device's connection and is answered (200)
        with trio.fail_after(20):
            await server.query_catalog(DEV, within=10)
        # PTZ: MANSCDP DeviceControl to the channel, answered 200 by the device
        camera = {"metadata": {"name": "gate"}, "spec": {"binding": {"gb28181": {
            "device_id": DEV, "channel": CHAN}}}}
        got = await sources.ptz(camera, "gb28181", "move", {"pan": 0.5, "tilt": 0, "zoom": 0})
        assert got["ptz_cmd"] == "A50F010180000036"  # right at speed 128
        got = await sources.ptz(camera, "gb28181", "stop", {})
        assert got["ptz_cmd"] == "A50F0100000000B5"
        got = await sources.ptz(camera, "gb28181", "goto_preset", {"preset": 3})
        assert got["ptz_cmd"] == "A50F01820003003A"
        with pytest.raises(CommandError, match="1-255"):
            await sources.ptz(camera, "gb28181", "set_preset", {"preset": 0})
        log = device.messages.read_text(errors="replace")
        for cmd in ("A50F010180000036", "A50F0100000000B5", "A50F01820003003A"):
            assert f"<PTZCmd>{cmd}</PTZCmd>" in log  # what the device received
        assert server.stats.malformed == 0


async def test_refused_invite_closes_the_feed_with_the_reason(server: Gb28181Server,
                                                             tmp_path: Path, pcap: Path) -> None:
    async with Device(server, tmp_path, pcap, uas_file="gb_device_busy.xml"):
        await wait_for(lambda: DEV in server.devices, "REGISTER")
        feed = await server.open_feed(DEV, CHAN, "udp")
        stream = await trio.open_tcp_stream("127.0.0.1", feed.port)
        with trio.fail_after(20):
            assert await stream.receive_some() == b""  # closed: ffmpeg ends, is restarted
        await stream.aclose()
        assert feed.last_error is not None and "486 Busy Here" in feed.last_error
        assert not server.sessions and server.devices[DEV].online

