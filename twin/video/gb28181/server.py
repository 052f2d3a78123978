"""The GB/T 28181 platform side: a SIP server (UDP + TCP) that devices register with, and the
media sessions that bring their video to the camera pipelines.

```
devices ──REGISTER (digest)──▶ registrar ── online state from keepalive MESSAGEs
        ◀─MESSAGE Catalog────  catalog: the device's channels (proposed as Device YAML)
        ◀─INVITE (SDP offer)─  session: PS over RTP/UDP or RTP/TCP (RFC 4571, we listen)
        ──RTP──▶ Depacketizer ─▶ MPEG-PS bytes ─▶ feed (127.0.0.1 TCP) ─▶ ffmpeg -f mpeg
        ◀─BYE────────────────  when the last reader of the feed leaves
```

A *feed* is a loopback TCP listener per (device, channel): the camera's ffmpeg reads
``tcp://127.0.0.1:PORT`` (``-f mpeg``). When a reader connects and no session is up, the server
INVITEs the channel; the PS stream goes to every reader (each joins at a pack boundary; a reader
that cannot keep up is dropped, never waited for); when the last reader has been gone for
``linger`` seconds the session ends with a BYE. An ffmpeg restart therefore re-INVITEs by
itself, and a camera nobody watches costs nothing.

Robustness: every datagram / TCP frame is parsed within bounds (``sip.py``); a malformed
message is dropped (UDP) or closes that connection (TCP); each peer (UDP source address or TCP
connection) has a token bucket: past it, a UDP source is ignored for ``block_for`` seconds and
a TCP connection is closed. Nothing a peer sends can end the server.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from twin.errors import BindingConnectError, BindingError, BindingTimeout
from twin.video.gb28181 import manscdp, sip
from twin.video.gb28181.media import PACK_START, Depacketizer, PsParser, Rfc4571

log = logging.getLogger(__name__)


@dataclass
class Gb28181Config:
    host: str = "127.0.0.1"
    port: int = 5060
    server_id: str = "34020000002000000001"
    realm: str = "3402000000"
    password: str | None = None
    """The registration password (digest); ``None``: devices register without one."""
    media_host: str = "127.0.0.1"
    """The address put in SDP offers (where devices send RTP)."""
    keepalive_timeout: float = 180.0
    """A device is offline when it sent nothing for this long (3 x the usual 60 s keepalive)."""
    max_expires: int = 3600
    rate: float = 200.0
    """Messages per second a peer may send (token bucket)..."""
    burst: int = 400
    """... with this burst."""
    block_for: float = 10.0
    invite_timeout: float = 10.0
    linger: float = 3.0
    max_devices: int = 100_000
    """Registrations beyond this are refused (503): memory stays bounded."""
    auto_catalog: bool = True
    discovered_file: Path | None = None
    """Where channels learnt from Catalog responses are written as Device YAML proposals."""


@dataclass
class Channel:
    id: str
    name: str = ""
    manufacturer: str = ""
    model: str = ""
    status: str = ""
    parent: str = ""


@dataclass
class GbDevice:
    id: str
    transport: str
    addr: tuple[str, int]
    contact: str
    expires_at: float
    last_seen: float
    online: bool = True
    keepalives: int = 0
    registered_at: float = 0.0
    channels: dict[str, Channel] = field(default_factory=dict)
    conn: Any = None  # _TcpPeer for devices registered over TCP

    def status(self) -> dict[str, Any]:
        return {"id": self.id, "transport": self.transport, "addr": f"{self.addr[0]}:{self.addr[1]}",
                "online": self.online, "last_seen": self.last_seen, "keepalives": self.keepalives,
                "expires_at": self.expires_at,
                "channels": {c.id: {"name": c.name, "status": c.status}
                             for c in self.channels.values()}}


@dataclass
class Stats:
    received: int = 0
    malformed: int = 0
    rate_limited: int = 0
    blocked_peers: int = 0
    closed_connections: int = 0
    registers: int = 0
    auth_failures: int = 0
    keepalives: int = 0
    invites: int = 0
    byes: int = 0


class _Bucket:
    __slots__ = ("blocked_until", "last", "tokens")

    def __init__(self, burst: int) -> None:
        self.tokens = float(burst)
        self.last = time.monotonic()
        self.blocked_until = 0.0

    def take(self, rate: float, burst: int) -> bool:
        now = time.monotonic()
        self.tokens = min(float(burst), self.tokens + (now - self.last) * rate)
        self.last = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class _TcpPeer:
    def __init__(self, stream: trio.SocketStream, addr: tuple[str, int]) -> None:
        self.stream = stream
        self.addr = addr
        self.lock = trio.Lock()

    async def send(self, data: bytes) -> None:
        async with self.lock:
            await self.stream.send_all(data)


@dataclass
class _Pending:
    event: trio.Event = field(default_factory=trio.Event)
    response: sip.SipMessage | None = None
    provisional: bool = False


class Session:
    """One live-view dialog: INVITE → RTP → BYE."""

    def __init__(self, device: GbDevice, channel: str, ssrc: str, transport: str) -> None:
        self.device = device
        self.channel = channel
        self.ssrc = ssrc
        self.transport = transport
        self.call_id = f"{secrets.token_hex(8)}@flux"
        self.from_tag = sip.new_tag()
        self.to_tag: str | None = None
        self.cseq = 1
        self.remote_target = ""
        self.rtp_port = 0
        self.readers: list[_Reader] = []
        self.depack = Depacketizer()
        self.ps = PsParser()
        self.invited_at = 0.0
        self.answered_at: float | None = None
        self.first_packet_at: float | None = None
        self.first_keyframe_at: float | None = None
        self.bytes = 0
        self.ended = trio.Event()
        self.scope = trio.CancelScope()
        self.last_reader_left: float | None = None
        self.rtp_sources: set[tuple[str, int]] = set()
        self.gop: list[bytes] = []
        """Payloads since the last pack carrying a sequence header (SPS/VPS): a reader that
        joins gets these first, so its decoder starts at once instead of at the next GOP."""
        self.gop_bytes = 0

    def status(self) -> dict[str, Any]:
        return {"channel": self.channel, "ssrc": self.ssrc, "transport": self.transport,
                "rtp_port": self.rtp_port, "readers": len(self.readers), "bytes": self.bytes,
                "packets": self.depack.received, "lost": self.depack.lost,
                "bad_packets": self.depack.bad, "packs": self.ps.packs,
                "video_pes": self.ps.video_pes, "keyframes": self.ps.keyframes}

    def deliver(self, payload: bytes) -> None:
        self.bytes += len(payload)
        self.ps.feed(payload)
        if self.first_keyframe_at is None and self.ps.keyframes:
            self.first_keyframe_at = time.monotonic()
        if payload.startswith(PACK_START) and has_sequence_header(payload):
            self.gop, self.gop_bytes = [payload], len(payload)
        elif self.gop and self.gop_bytes + len(payload) <= GOP_CACHE:
            self.gop.append(payload)
            self.gop_bytes += len(payload)
        else:
            self.gop, self.gop_bytes = [], 0
        for reader in list(self.readers):
            if not reader.aligned:
                if not payload.startswith(PACK_START):
                    continue
                reader.aligned = True
            try:
                reader.send.send_nowait(payload)
            except trio.WouldBlock:  # too slow: drop that reader (ffmpeg restarts), never wait
                log.warning("gb28181 %s/%s: a reader fell behind, dropped", self.device.id,
                            self.channel)
                self.readers.remove(reader)
                reader.send.close()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                if reader in self.readers:
                    self.readers.remove(reader)


GOP_CACHE = 4 * 1024 * 1024


def has_sequence_header(payload: bytes) -> bool:
    """Whether an H.264 SPS (NAL 7) or H.265 VPS (NAL 32) starts inside ``payload``."""
    k = payload.find(b"\x00\x00\x01")
    while 0 <= k < len(payload) - 3:
        nal = payload[k + 3]
        if (nal & 0x1F == 7 and not nal & 0x80) or (nal >> 1) & 0x3F == 32:
            return True
        k = payload.find(b"\x00\x00\x01", k + 3)
    return False


@dataclass(eq=False)
class _Reader:
    send: trio.MemorySendChannel[bytes]
    aligned: bool = False


class Feed:
    """The loopback TCP listener ffmpeg reads one channel's program stream from."""

    def __init__(self, device_id: str, channel: str, transport: str) -> None:
        self.device_id = device_id
        self.channel = channel
        self.transport = transport
        self.port = 0
        self.last_error: str | None = None
        self.session: Session | None = None
        self.lock = trio.Lock()  # readers connecting together share one INVITE

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"


StatusCallback = Callable[[str, bool, str], None]
"""``(device_id, online, reason)``: a device came online / went offline."""


class Gb28181Server:
    def __init__(self, config: Gb28181Config) -> None:
        self.config = config
        self.devices: dict[str, GbDevice] = {}
        self.sessions: dict[str, Session] = {}  # call-id -> session
        self.feeds: dict[tuple[str, str], Feed] = {}
        self.stats = Stats()
        self.on_status: list[StatusCallback] = []
        self._buckets: dict[Any, _Bucket] = {}
        self._pending: dict[tuple[str, int], _Pending] = {}
        self._nonces: dict[str, float] = {}
        self._sn = 0
        self._ssrc_seq = 0
        self._udp: trio.socket.SocketType | None = None
        self._nursery: trio.Nursery | None = None
        self.udp_port = 0
        self.tcp_port = 0

    # -- lifecycle ---------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[Gb28181Server] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        cfg = self.config
        udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            await udp.bind((cfg.host, cfg.port))
        except OSError as exc:
            udp.close()
            raise BindingConnectError(f"gb28181: cannot bind UDP {cfg.host}:{cfg.port}: {exc}"
                                      ) from exc
        self.udp_port = udp.getsockname()[1]
        try:  # TCP on the same port number as UDP (devices are configured with one)
            listeners = await trio.open_tcp_listeners(self.udp_port, host=cfg.host)
        except OSError as exc:
            if cfg.port:
                udp.close()
                raise BindingConnectError(f"gb28181: cannot listen on TCP {cfg.host}:{cfg.port}: "
                                          f"{exc}") from exc
            listeners = await trio.open_tcp_listeners(0, host=cfg.host)  # port 0: any free one
        self.tcp_port = listeners[0].socket.getsockname()[1]
        self._udp = udp
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._udp_loop, udp)
                nursery.start_soon(trio.serve_listeners, self._tcp_conn, listeners)
                nursery.start_soon(self._watchdog)
                log.info("gb28181: SIP server on %s udp/%d tcp/%d (id %s, realm %s)", cfg.host,
                         self.udp_port, self.tcp_port, cfg.server_id, cfg.realm)
                task_status.started(self)
        finally:
            self._nursery = None
            udp.close()

    @property
    def address(self) -> str:
        host = self.config.host if self.config.host not in ("0.0.0.0", "") else \
            self.config.media_host
        return f"{host}:{self.udp_port}"

    def status(self) -> dict[str, Any]:
        return {"devices": {d.id: d.status() for d in self.devices.values()},
                "sessions": {s.call_id: s.status() for s in self.sessions.values()},
                "stats": vars(self.stats).copy()}

    # -- receiving --------------------------------------------------------------------------
    def _admit(self, key: Any) -> bool:
        """Rate limit per peer; a UDP source past its budget is ignored for ``block_for``."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) > 10_000:  # bounded memory under a spoofed-source flood
                self._buckets.clear()
            bucket = self._buckets[key] = _Bucket(self.config.burst)
        now = time.monotonic()
        if bucket.blocked_until > now:
            self.stats.rate_limited += 1
            return False
        if not bucket.take(self.config.rate, self.config.burst):
            self.stats.rate_limited += 1
            self.stats.blocked_peers += 1
            bucket.blocked_until = now + self.config.block_for
            log.warning("gb28181: peer %s floods (> %g msg/s): ignored for %g s", key,
                        self.config.rate, self.config.block_for)
            return False
        return True

    async def _udp_loop(self, udp: trio.socket.SocketType) -> None:
        while True:
            try:
                data, addr = await udp.recvfrom(sip.MAX_MESSAGE + 1)
            except OSError:
                await trio.lowlevel.checkpoint()  # e.g. ICMP port unreachable of an earlier send
                continue
            addr = (addr[0], addr[1])
            if not self._admit(("udp", addr)):
                continue
            self.stats.received += 1
            if data.strip() == b"":
                continue  # keep-alive
            try:
                msg = sip.parse(data)
            except sip.SipParseError as exc:
                self.stats.malformed += 1
                # counted; logged once per 100 (a garbage flood must not become a log flood)
                if self.stats.malformed % 100 == 1:
                    log.info("gb28181: dropped a malformed datagram from %s:%d: %s (%d so far)",
                             *addr, exc, self.stats.malformed)
                continue
            await self._handle(msg, "udp", addr, None)

    async def _tcp_conn(self, stream: trio.SocketStream) -> None:
        peer_addr = stream.socket.getpeername()
        addr = (peer_addr[0], peer_addr[1])
        peer = _TcpPeer(stream, addr)
        parser = sip.StreamParser()
        bucket = _Bucket(self.config.burst)
        try:
            async with stream:
                async for data in stream:
                    try:
                        messages = parser.feed(bytes(data))
                    except sip.SipParseError as exc:
                        self.stats.malformed += 1
                        log.info("gb28181: closing %s:%d (TCP): malformed SIP: %s", *addr, exc)
                        return
                    for msg in messages:
                        if not bucket.take(self.config.rate, self.config.burst):
                            self.stats.rate_limited += 1
                            log.warning("gb28181: closing %s:%d (TCP): flood", *addr)
                            return
                        self.stats.received += 1
                        await self._handle(msg, "tcp", addr, peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self.stats.closed_connections += 1
            for dev in self.devices.values():
                if dev.conn is peer:
                    dev.conn = None

    async def _send(self, data: bytes, transport: str, addr: tuple[str, int],
                    peer: _TcpPeer | None) -> None:
        try:
            if transport == "tcp":
                if peer is None:
                    raise BindingConnectError(f"gb28181: no TCP connection to {addr[0]}:{addr[1]}")
                await peer.send(data)
            else:
                assert self._udp is not None
                try:
                    await self._udp.sendto(data, addr)
                except ConnectionRefusedError:
                    # an ICMP "port unreachable" of an earlier datagram (to another peer) is
                    # reported on the next call on the socket: that one was not sent, resend
                    await self._udp.sendto(data, addr)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise BindingConnectError(f"gb28181: cannot send to {addr[0]}:{addr[1]}: {exc}"
                                      ) from exc

    async def _reply(self, msg: sip.SipMessage, transport: str, addr: tuple[str, int],
                     peer: _TcpPeer | None) -> None:
        try:
            await self._send(msg.encode(), transport, addr, peer)
        except BindingConnectError as exc:
            log.info("%s", exc)

    async def _handle(self, msg: sip.SipMessage, transport: str, addr: tuple[str, int],
                      peer: _TcpPeer | None) -> None:
        if not msg.is_request:
            key = (msg.call_id, msg.cseq[0])
            pending = self._pending.get(key)
            if pending is not None:
                if msg.status < 200:
                    pending.provisional = True
                else:
                    pending.response = msg
                    pending.event.set()
            return
        handler = {"REGISTER": self._register, "MESSAGE": self._message, "BYE": self._bye,
                   "OPTIONS": self._options}.get(msg.method)
        if msg.method == "ACK":
            return
        if handler is None:
            await self._reply(msg.response(501, "Not Implemented", to_tag=sip.new_tag()),
                              transport, addr, peer)
            return
        try:
            reply = await handler(msg, transport, addr, peer)
        except (ValueError, KeyError) as exc:  # a request we could not make sense of
            self.stats.malformed += 1
            log.info("gb28181: bad %s from %s:%d: %s", msg.method, *addr, exc)
            reply = msg.response(400, "Bad Request", to_tag=sip.new_tag())
        except Exception:  # a bug met by one peer's request: that request fails, not the server
            self.stats.malformed += 1
            log.exception("gb28181: %s from %s:%d failed", msg.method, *addr)
            reply = msg.response(500, "Server Internal Error", to_tag=sip.new_tag())
        if reply is not None:
            await self._reply(reply, transport, addr, peer)

    # -- REGISTER ---------------------------------------------------------------------------
    def _challenge(self, msg: sip.SipMessage, stale: bool = False) -> sip.SipMessage:
        nonce = secrets.token_hex(16)
        now = time.monotonic()
        self._nonces[nonce] = now
        if len(self._nonces) > 10_000:  # bounded: keep the newest half
            self._nonces = dict(list(self._nonces.items())[-5_000:])
        value = f'Digest realm="{self.config.realm}", nonce="{nonce}", algorithm=MD5'
        if stale:
            value += ", stale=true"
        return msg.response(401, "Unauthorized", to_tag=sip.new_tag(),
                            extra=[("WWW-Authenticate", value)])

    async def _register(self, msg: sip.SipMessage, transport: str, addr: tuple[str, int],
                        peer: _TcpPeer | None) -> sip.SipMessage:
        device_id = sip.uri_user(msg.header("from") or "")
        if not device_id or not device_id.isdigit() or len(device_id) > 32:
            raise ValueError(f"REGISTER without a device id ({(msg.header('from') or '')[:60]})")
        if self.config.password is not None:
            raw = msg.header("authorization")
            if raw is None:
                return self._challenge(msg)
            auth = sip.parse_auth(raw)
            issued = self._nonces.get(auth.get("nonce", ""))
            if issued is None or time.monotonic() - issued > 300:
                return self._challenge(msg, stale=issued is not None)
            if auth.get("username") != device_id or not sip.check_digest(
                    auth, self.config.password, "REGISTER"):
                self.stats.auth_failures += 1
                log.warning("gb28181: device %s (%s:%d): wrong registration password",
                            device_id, *addr)
                return msg.response(403, "Forbidden", to_tag=sip.new_tag())
        expires_raw = msg.header("expires")
        contact = msg.header("contact") or ""
        for part in contact.split(";")[1:]:
            k, _, v = part.strip().partition("=")
            if k.lower() == "expires":
                expires_raw = v
        try:
            expires = int(expires_raw) if expires_raw is not None else 3600
        except ValueError:
            raise ValueError(f"bad Expires {expires_raw!r}") from None
        expires = max(0, min(expires, self.config.max_expires))
        now = time.time()
        self.stats.registers += 1
        if expires == 0:
            dev = self.devices.get(device_id)
            if dev is not None:
                self._set_online(dev, False, "unregistered")
                del self.devices[device_id]
            log.info("gb28181: device %s unregistered", device_id)
        else:
            dev = self.devices.get(device_id)
            fresh = dev is None or not dev.online
            if dev is None and len(self.devices) >= self.config.max_devices:
                log.warning("gb28181: device %s refused: %d devices registered already",
                            device_id, len(self.devices))
                return msg.response(503, "Service Unavailable", to_tag=sip.new_tag())
            if dev is None:
                dev = self.devices[device_id] = GbDevice(
                    device_id, transport, addr, contact, now + expires, now, registered_at=now)
            dev.transport, dev.addr, dev.contact = transport, addr, contact
            dev.expires_at, dev.last_seen = now + expires, now
            dev.conn = peer
            self._set_online(dev, True, "registered")
            if fresh:
                log.info("gb28181: device %s registered from %s:%d (%s, expires %d s)",
                         device_id, addr[0], addr[1], transport, expires)
                if self.config.auto_catalog and self._nursery is not None:
                    self._nursery.start_soon(self._catalog_quietly, device_id)
        date = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now))
        return msg.response(200, "OK", to_tag=sip.new_tag(),
                            extra=[("Date", date), ("Expires", str(expires))])

    def _set_online(self, dev: GbDevice, online: bool, reason: str) -> None:
        if dev.online == online and reason != "registered":
            return
        changed = dev.online != online
        dev.online = online
        if changed or reason == "registered":
            for cb in list(self.on_status):
                try:
                    cb(dev.id, online, reason)
                except Exception:  # a callback must not stop the server
                    log.exception("gb28181: status callback failed")

    # -- MESSAGE ----------------------------------------------------------------------------
    def _owner(self, sender: str) -> GbDevice | None:
        dev = self.devices.get(sender)
        if dev is not None:
            return dev
        for d in self.devices.values():
            if sender in d.channels:
                return d
        return None

    async def _message(self, msg: sip.SipMessage, transport: str, addr: tuple[str, int],
                       peer: _TcpPeer | None) -> sip.SipMessage:
        sender = sip.uri_user(msg.header("from") or "")
        dev = self._owner(sender)
        if dev is None:
            return msg.response(403, "Forbidden", to_tag=sip.new_tag())
        try:
            body = manscdp.parse(msg.body)
        except manscdp.ManscdpError as exc:
            self.stats.malformed += 1
            log.info("gb28181: device %s: bad MANSCDP body: %s", dev.id, exc)
            return msg.response(400, "Bad Request", to_tag=sip.new_tag())
        dev.last_seen = time.time()
        if transport == "udp":
            dev.addr = addr
        if body.cmd == "Keepalive":
            self.stats.keepalives += 1
            dev.keepalives += 1
            if not dev.online:
                log.info("gb28181: device %s is back (keepalive)", dev.id)
            self._set_online(dev, True, "keepalive")
        elif body.cmd == "Catalog" and body.root == "Response":
            for item in body.items:
                ch = Channel(item["DeviceID"], item.get("Name", ""), item.get("Manufacturer", ""),
                             item.get("Model", ""), item.get("Status", ""),
                             item.get("ParentID", dev.id))
                new = ch.id not in dev.channels
                dev.channels[ch.id] = ch
                if new:
                    log.info("gb28181: device %s channel %s (%s) %s", dev.id, ch.id, ch.name,
                             ch.status)
            self._write_discovered()
        return msg.response(200, "OK", to_tag=sip.new_tag())

    async def _options(self, msg: sip.SipMessage, transport: str, addr: tuple[str, int],
                       peer: _TcpPeer | None) -> sip.SipMessage:
        return msg.response(200, "OK", to_tag=sip.new_tag(),
                            extra=[("Allow", "REGISTER, MESSAGE, INVITE, ACK, BYE, OPTIONS")])

    async def _bye(self, msg: sip.SipMessage, transport: str, addr: tuple[str, int],
                   peer: _TcpPeer | None) -> sip.SipMessage:
        session = self.sessions.get(msg.call_id)
        if session is None:
            return msg.response(481, "Call/Transaction Does Not Exist")
        log.info("gb28181: device %s ended the session of channel %s", session.device.id,
                 session.channel)
        session.scope.cancel()
        return msg.response(200, "OK")

    # -- requests we send -------------------------------------------------------------------
    def _headers(self, transport: str, to: str, from_tag: str, call_id: str, cseq: int,
                 method: str) -> list[tuple[str, str]]:
        proto = "TCP" if transport == "tcp" else "UDP"
        me = self.address
        return [("Via", f"SIP/2.0/{proto} {me};rport;branch={sip.new_branch()}"),
                ("From", f"<sip:{self.config.server_id}@{self.config.realm}>;tag={from_tag}"),
                ("To", to), ("Call-ID", call_id), ("CSeq", f"{cseq} {method}"),
                ("Max-Forwards", "70"), ("User-Agent", "FLUX IoT")]

    async def _transaction(self, dev: GbDevice, request: sip.SipMessage,
                           within: float) -> sip.SipMessage:
        key = (request.call_id, request.cseq[0])
        pending = self._pending[key] = _Pending()
        data = request.encode()
        try:
            with trio.move_on_after(within):
                interval = 0.5
                while True:
                    await self._send(data, dev.transport, dev.addr, dev.conn)
                    if dev.transport == "tcp":  # reliable: no retransmission
                        await pending.event.wait()
                        break
                    with trio.move_on_after(interval):
                        await pending.event.wait()
                    if pending.event.is_set():
                        break
                    if not pending.provisional:
                        interval = min(interval * 2, 4.0)
                    else:
                        await pending.event.wait()
                        break
        finally:
            del self._pending[key]
        if pending.response is None:
            raise BindingTimeout(f"gb28181 device {dev.id}: no answer to {request.method} in "
                                 f"{within:g} s")
        return pending.response

    async def request_message(self, device_id: str, body: bytes, within: float = 5.0,
                              target: str | None = None) -> sip.SipMessage:
        """A MANSCDP MESSAGE to ``target`` (a channel; default: the device) of ``device_id``."""
        dev = self._online(device_id)
        target = target or device_id
        headers = self._headers(dev.transport, f"<sip:{target}@{self.config.realm}>",
                                sip.new_tag(), f"{secrets.token_hex(8)}@flux", 1, "MESSAGE")
        headers.append(("Content-Type", manscdp.CONTENT_TYPE))
        req = sip.SipMessage(f"MESSAGE sip:{target}@{dev.addr[0]}:{dev.addr[1]} SIP/2.0",
                             headers, body)
        return await self._transaction(dev, req, within)

    def _online(self, device_id: str) -> GbDevice:
        dev = self.devices.get(device_id)
        if dev is None:
            raise BindingConnectError(f"gb28181 device {device_id} is not registered",
                                      hint="the device must REGISTER with this server first")
        if not dev.online:
            raise BindingConnectError(f"gb28181 device {device_id} is offline (no keepalive)")
        return dev

    def next_sn(self) -> int:
        self._sn += 1
        return self._sn

    async def query_catalog(self, device_id: str, within: float = 5.0) -> None:
        resp = await self.request_message(
            device_id, manscdp.catalog_query(self.next_sn(), device_id), within)
        if resp.status != 200:
            raise BindingError(f"gb28181 device {device_id}: Catalog query refused "
                               f"({resp.start[8:]})")

    async def ptz(self, device_id: str, channel: str, ptz_cmd: str, within: float = 5.0) -> None:
        """A DeviceControl PTZCmd to ``channel`` (BindingError unless the device answers 200)."""
        resp = await self.request_message(
            device_id, manscdp.device_control(self.next_sn(), channel, ptz_cmd), within,
            target=channel)
        if resp.status != 200:
            raise BindingError(f"gb28181 device {device_id}: PTZ refused ({resp.start[8:]})")

    async def _catalog_quietly(self, device_id: str) -> None:
        try:
            await self.query_catalog(device_id)
        except BindingError as exc:
            log.info("gb28181: %s", exc)

    def _write_discovered(self) -> None:
        path = self.config.discovered_file
        if path is None:
            return
        import yaml

        docs = []
        for dev in sorted(self.devices.values(), key=lambda d: d.id):
            for ch in sorted(dev.channels.values(), key=lambda c: c.id):
                binding: dict[str, Any] = {"device_id": dev.id}
                if ch.id != dev.id:
                    binding["channel"] = ch.id
                docs.append({"apiVersion": "flux.iot/v1", "kind": "Device",
                             "metadata": {"name": f"gb_{ch.id}",
                                          "labels": {"gb28181_name": ch.name[:63]}
                                          if ch.name else {}},
                             "spec": {"type": "camera",
                                      "description": f"GB28181 {ch.name or ch.id} "
                                                     f"({ch.manufacturer} {ch.model})".strip(),
                                      "binding": {"gb28181": binding}}})
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(yaml.safe_dump_all(docs, sort_keys=False, allow_unicode=True),
                           encoding="utf-8")
            tmp.replace(path)
        except OSError as exc:
            log.warning("gb28181: cannot write %s: %s", path, exc)

    # -- live view ---------------------------------------------------------------------------
    def _new_ssrc(self) -> str:
        self._ssrc_seq = (self._ssrc_seq + 1) % 10_000
        return "0" + self.config.realm[3:8].rjust(5, "0") + f"{self._ssrc_seq:04d}"

    def _sdp(self, session: Session, port: int) -> bytes:
        host = self.config.media_host
        proto = "TCP/RTP/AVP" if session.transport == "tcp" else "RTP/AVP"
        lines = ["v=0", f"o={self.config.server_id} 0 0 IN IP4 {host}", "s=Play",
                 f"c=IN IP4 {host}", "t=0 0", f"m=video {port} {proto} 96 97 98", "a=recvonly",
                 "a=rtpmap:96 PS/90000", "a=rtpmap:97 MPEG4/90000", "a=rtpmap:98 H264/90000"]
        if session.transport == "tcp":
            lines += ["a=setup:passive", "a=connection:new"]
        lines.append(f"y={session.ssrc}")
        return ("\r\n".join(lines) + "\r\n").encode()

    async def play(self, device_id: str, channel: str, transport: str, *,
                   task_status: trio.TaskStatus[Session] = trio.TASK_STATUS_IGNORED) -> None:
        """INVITE ``channel`` of ``device_id``, receive its media until cancelled (or the device
        says BYE), then BYE. Reports the session once the device answered 200."""
        dev = self._online(device_id)
        session = Session(dev, channel, self._new_ssrc(), transport)
        self.stats.invites += 1
        with session.scope:
            try:
                if transport == "tcp":
                    listeners = await trio.open_tcp_listeners(0, host=self.config.media_host)
                    session.rtp_port = listeners[0].socket.getsockname()[1]
                    receiver: Any = partial_tcp(self, session, listeners)
                else:
                    udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    await udp.bind((self.config.media_host, 0))
                    session.rtp_port = udp.getsockname()[1]
                    receiver = partial_udp(self, session, udp)
                self.sessions[session.call_id] = session
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(receiver)
                    await self._invite(session)
                    task_status.started(session)
                    await trio.sleep_forever()
            finally:
                self.sessions.pop(session.call_id, None)
                for r in session.readers:
                    r.send.close()
                session.ended.set()
                with trio.move_on_after(2) as cleanup:
                    cleanup.shield = True
                    if session.to_tag is not None:
                        await self._send_bye(session)

    async def _invite(self, session: Session) -> None:
        dev = session.device
        to = f"<sip:{session.channel}@{self.config.realm}>"
        headers = self._headers(dev.transport, to, session.from_tag, session.call_id,
                                session.cseq, "INVITE")
        headers += [("Contact", f"<sip:{self.config.server_id}@{self.address}>"),
                    ("Subject", f"{session.channel}:{session.ssrc},{self.config.server_id}:0"),
                    ("Content-Type", "APPLICATION/SDP")]
        target = f"sip:{session.channel}@{dev.addr[0]}:{dev.addr[1]}"
        req = sip.SipMessage(f"INVITE {target} SIP/2.0", headers,
                             self._sdp(session, session.rtp_port))
        session.invited_at = time.monotonic()
        resp = await self._transaction(dev, req, self.config.invite_timeout)
        if resp.status >= 300:  # a failure is ACKed too (RFC 3261 17.1.1.3), in its transaction
            ack = sip.SipMessage(f"ACK {target} SIP/2.0", [
                (k, v) for k, v in req.headers if k.lower() in ("via", "from", "call-id",
                                                                "max-forwards")]
                + [("To", resp.header("to") or to), ("CSeq", f"{session.cseq} ACK")])
            with contextlib.suppress(BindingConnectError):
                await self._send(ack.encode(), dev.transport, dev.addr, dev.conn)
        if resp.status != 200:
            raise BindingConnectError(f"gb28181 device {dev.id}: INVITE of channel "
                                      f"{session.channel} refused ({resp.start[8:]})")
        session.answered_at = time.monotonic()
        session.to_tag = sip.tag(resp.header("to") or "")
        contact = resp.header("contact") or ""
        session.remote_target = contact[contact.find("sip:"):].split(">")[0] if "sip:" in \
            contact else target
        ack_headers = self._headers(dev.transport, resp.header("to") or to, session.from_tag,
                                    session.call_id, session.cseq, "ACK")
        ack = sip.SipMessage(f"ACK {session.remote_target} SIP/2.0", ack_headers)
        await self._send(ack.encode(), dev.transport, dev.addr, dev.conn)
        log.info("gb28181: live view of %s/%s (%s, rtp port %d, ssrc %s)", dev.id,
                 session.channel, session.transport, session.rtp_port, session.ssrc)

    async def _send_bye(self, session: Session) -> None:
        dev = session.device
        session.cseq += 1
        to = f"<sip:{session.channel}@{self.config.realm}>;tag={session.to_tag}"
        headers = self._headers(dev.transport, to, session.from_tag, session.call_id,
                                session.cseq, "BYE")
        req = sip.SipMessage(f"BYE {session.remote_target} SIP/2.0", headers)
        self.stats.byes += 1
        try:
            await self._transaction(dev, req, 1.5)
        except BindingError as exc:
            log.info("gb28181: BYE to %s/%s: %s", dev.id, session.channel, exc)

    # -- feeds (what ffmpeg reads) -----------------------------------------------------------
    async def open_feed(self, device_id: str, channel: str, transport: str = "udp") -> Feed:
        key = (device_id, channel)
        feed = self.feeds.get(key)
        if feed is not None:
            feed.transport = transport
            return feed
        if self._nursery is None:
            raise BindingConnectError("gb28181: the SIP server is not running")
        feed = Feed(device_id, channel, transport)
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        feed.port = listeners[0].socket.getsockname()[1]
        self.feeds[key] = feed
        self._nursery.start_soon(self._serve_feed, feed, listeners)
        return feed

    async def _serve_feed(self, feed: Feed, listeners: list[trio.SocketListener]) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._feed_session_keeper, feed)
            await trio.serve_listeners(partial_reader(self, feed), listeners)

    async def _feed_session_keeper(self, feed: Feed) -> None:
        """Ends the session once no reader has been there for ``linger`` seconds."""
        while True:
            await trio.sleep(0.25)
            s = feed.session
            if s is None or s.readers:
                continue
            if s.last_reader_left is not None and \
                    time.monotonic() - s.last_reader_left > self.config.linger:
                s.scope.cancel()
                feed.session = None

    async def _feed_reader(self, feed: Feed, stream: trio.SocketStream) -> None:
        async with stream:
            async with feed.lock:
                session = feed.session
                if session is None or session.ended.is_set():
                    try:
                        session = await self._nursery_start(feed)
                    except BindingError as exc:
                        feed.last_error = str(exc)
                        log.warning("gb28181: %s", exc)
                        return
                    feed.session = session
            feed.last_error = None
            send, recv = trio.open_memory_channel[bytes](512 + 4096)
            reader = _Reader(send)
            for payload in session.gop:  # start at the last sequence header: decodes at once
                send.send_nowait(payload)
                reader.aligned = True
            session.readers.append(reader)
            session.last_reader_left = None
            try:
                async with recv:
                    async for chunk in recv:
                        await stream.send_all(chunk)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            finally:
                if reader in session.readers:
                    session.readers.remove(reader)
                if not session.readers:
                    session.last_reader_left = time.monotonic()

    async def _nursery_start(self, feed: Feed) -> Session:
        assert self._nursery is not None
        try:
            session: Session = await self._nursery.start(
                _play_guarded, self, feed.device_id, feed.channel, feed.transport)
        except BaseExceptionGroup as group:
            first = group.exceptions[0]
            raise first if isinstance(first, BindingError) else BindingError(str(first)) \
                from None
        return session

    # -- offline detection -------------------------------------------------------------------
    async def _watchdog(self) -> None:
        while True:
            await trio.sleep(min(1.0, self.config.keepalive_timeout / 4))
            now = time.time()
            for dev in list(self.devices.values()):
                if not dev.online:
                    continue
                if now - dev.last_seen > self.config.keepalive_timeout:
                    log.warning("gb28181: device %s offline: nothing for %.0f s (keepalives "
                                "missed)", dev.id, now - dev.last_seen)
                    self._set_online(dev, False, "keepalive timeout")
                elif now > dev.expires_at:
                    log.warning("gb28181: device %s offline: registration expired", dev.id)
                    self._set_online(dev, False, "registration expired")
                else:
                    continue
                for s in list(self.sessions.values()):
                    if s.device is dev:
                        s.scope.cancel()


async def _play_guarded(server: Gb28181Server, device_id: str, channel: str, transport: str, *,
                        task_status: trio.TaskStatus[Session] = trio.TASK_STATUS_IGNORED
                        ) -> None:
    """``server.play`` as a child of the server's nursery: a failure before the device answered
    goes to the caller (``open_feed``'s reader); one after it (the device vanished, a socket
    error) ends that session only, never the server."""
    started = False

    class _Status:
        def started(self, value: Session) -> None:
            nonlocal started
            started = True
            task_status.started(value)

    try:
        await server.play(device_id, channel, transport,
                          task_status=_Status())  # type: ignore[arg-type]
    except (BindingError, OSError) as exc:
        if not started:
            raise
        log.info("gb28181: session %s/%s ended: %s", device_id, channel, exc)


def partial_udp(server: Gb28181Server, session: Session, udp: trio.socket.SocketType) -> Any:
    async def receive() -> None:
        with udp:
            while True:
                try:
                    data, addr = await udp.recvfrom(65_536)
                except OSError:
                    await trio.lowlevel.checkpoint()
                    continue
                if addr[0] != session.device.addr[0]:
                    continue  # RTP only from the device's host
                if session.first_packet_at is None:
                    session.first_packet_at = time.monotonic()
                for payload in session.depack.push_bytes(data):
                    session.deliver(payload)
    return receive


def partial_tcp(server: Gb28181Server, session: Session,
                listeners: list[trio.SocketListener]) -> Any:
    async def receive() -> None:
        async def conn(stream: trio.SocketStream) -> None:
            framer = Rfc4571()
            async with stream:
                try:
                    async for data in stream:
                        if session.first_packet_at is None:
                            session.first_packet_at = time.monotonic()
                        for packet in framer.feed(bytes(data)):
                            for payload in session.depack.push_bytes(packet):
                                session.deliver(payload)
                except (trio.BrokenResourceError, OSError):
                    pass

        try:
            await trio.serve_listeners(conn, listeners)
        finally:
            for listener in listeners:
                listener.socket.close()
    return receive


def partial_reader(server: Gb28181Server, feed: Feed) -> Any:
    async def handler(stream: trio.SocketStream) -> None:
        await server._feed_reader(feed, stream)
    return handler


__all__ = ["Channel", "Feed", "Gb28181Config", "Gb28181Server", "GbDevice", "Session"]
