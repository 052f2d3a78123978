"""How a Modbus line's requests reach the wire: one request in flight, a pymodbus PDU in, the
reply's PDU out. :class:`twin.bindings.modbus.Line` (timeouts, retries, fairness, metrics) is
the same above both.

:class:`TcpTransport` — Modbus TCP (``framing: socket``) and RTU over TCP (``framing: rtu``),
**Trio-native**: a non-blocking socket driven by Trio (``trio.lowlevel.wait_readable``) and
pymodbus' sans-IO parts only (the framer builds a frame from the request PDU and splits the
incoming bytes into frames; ``DecodePDU`` turns a frame into a response PDU). No thread hop per
request. The socket is opened with ``trio.open_tcp_stream`` and then used directly: a
``SocketStream``'s ``send_all`` and ``receive_some`` each add a pass of the scheduler, which
made a request cost about twice the CPU (262 vs 136 µs per request, measured interleaved).

* Modbus TCP: each request gets the next transaction id (1-65000 per connection); a frame with
  another id is a late reply to an earlier request the caller gave up on (a timeout): it is
  discarded (``late``) and the wait goes on. After a request given up on, the whole frames
  that came before the next request is sent are discarded too (whatever their id). A frame
  with the request's id from unit 0 or 255 is taken (``TCP_ANY_UNIT``: devices reached by IP
  may answer with the "not significant" unit id). A frame with the request's id but another
  unit or function code, or a PDU that does not decode, is :class:`MalformedFrame` (the frame is
  dropped; the connection stays). A header that cannot start a frame (protocol id not 0, a
  length outside 2-254) means the stream is lost: :class:`MalformedFrame` with ``fatal`` set,
  and the caller closes the connection.
* RTU over TCP has no transaction id: bytes left over from an earlier request (in the buffer
  or already in the socket) are discarded before a request is sent, and a frame from another unit or for another function code is a
  late reply (discarded). Frames are cut out of the stream here (pymodbus' framer gives the
  size and the CRC check): bytes before a frame whose CRC holds are skipped (line noise), a
  frame whose CRC fails with none good behind it is :class:`MalformedFrame` (dropped); 512
  bytes without a frame is ``fatal``.
* A peer that closes the connection, or any socket error: :class:`ConnectionLost`; but a
  connection found closed by the peer before a request is sent, after ``IDLE_PROBE`` without
  a request (gateways close idle connections), is reopened for the request (``reopened``).
* Cancelling ``request`` (the caller's timeout) while it waits for the reply leaves the stream
  usable (the reply, if it comes, is discarded as late); a cancel while the request was being
  sent sets ``broken`` (part of a frame may be on the wire): the caller closes the connection.

:class:`SerialTransport` — RTU on a serial port: pymodbus' ``AsyncModbusSerialClient``
(pyserial) on the engine's asyncio thread (:mod:`twin.bindings.aio`), one bridge call per
request (``client.execute(False, pdu)``); a Trio cancel cancels the asyncio request.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import trio

from twin.bindings import aio

if TYPE_CHECKING:  # pymodbus is imported when a line opens (~90 ms)
    from pymodbus.pdu import ModbusPDU

RTU_HUNT_LIMIT = 512
"""Bytes of an RTU stream without a frame in them after which the stream is given up."""
IDLE_PROBE = 0.25
"""A connection idle this long (s) is checked for a close by the peer before a request."""


TCP_ANY_UNIT = (0, 255)
"""Unit ids a Modbus TCP reply with the request's transaction id is taken from, whatever
unit was asked: the TCP guide has a server reached by IP ignore the unit id (0xFF
recommended), and some devices answer with 0xFF or 0 instead of echoing it."""


class ConnectionLost(ConnectionError):
    """The peer closed the connection, or the socket failed."""


class MalformedFrame(Exception):
    """Bytes from the peer that are no answer to the request. ``fatal``: the stream cannot be
    followed any more (the connection must be closed)."""

    def __init__(self, what: str, data: bytes, *, fatal: bool = False) -> None:
        super().__init__(what)
        self.what = what
        self.data = bytes(data[:24])
        self.fatal = fatal


class Transport(Protocol):
    broken: bool
    late: int

    async def open(self) -> None: ...
    async def request(self, pdu: ModbusPDU) -> ModbusPDU: ...
    async def close(self) -> None: ...


class TcpTransport:
    """One TCP connection to a gateway (see the module docstring). ``open`` raises OSError."""

    def __init__(self, host: str, port: int, *, rtu: bool = False) -> None:
        from pymodbus.exceptions import ModbusException
        from pymodbus.framer import FramerRTU, FramerSocket
        from pymodbus.pdu import DecodePDU

        self.host, self.port, self.rtu = host, port, rtu
        decoder = DecodePDU(False)
        self.decoder = decoder
        self.framer = FramerRTU(decoder) if rtu else FramerSocket(decoder)
        self.check_crc = FramerRTU.check_CRC
        self.modbus_exception = ModbusException
        # the responses to the requests the binding sends (no sub-function codes)
        self.response_classes: dict[int, type[ModbusPDU]] = {
            fc: decoder.pdu_table[fc][1] for fc in (1, 2, 3, 4, 5, 6, 15, 16)
        }
        self.sock: socket.socket | None = None
        self.buf = b""
        self.tid = 0
        self.broken = False
        self.waiting = False  # a request was sent and its reply not taken (it was given up on)
        self.last_reply = 0.0  # trio.current_time() of the last reply
        self.reopened = 0  # connections found closed by the peer while idle, and reopened
        self.late = 0  # replies discarded as late (a request given up on)

    async def open(self) -> None:
        stream = await trio.open_tcp_stream(self.host, self.port)  # DNS, happy eyeballs, TCP_NODELAY
        sock = stream.socket
        self.sock = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())
        self.sock.setblocking(False)
        self.buf, self.tid, self.broken, self.waiting = b"", 0, False, False
        self.last_reply = trio.current_time()

    async def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            trio.lowlevel.notify_closing(sock)
            sock.close()
        await trio.lowlevel.checkpoint()

    async def request(self, pdu: ModbusPDU) -> ModbusPDU:
        sock = self.sock
        if sock is None or self.broken:
            raise ConnectionLost("not connected")
        if trio.current_time() - self.last_reply > IDLE_PROBE:
            sock = await self._reopen_if_closed(sock)
        if self.waiting:  # the last request was given up on: what came since is no reply to this one
            self._drain(sock)
        if self.rtu:
            self.buf = b""  # what an earlier request left: no transaction id to tell it apart
            pdu.transaction_id = 0
        else:
            self.tid = self.tid + 1 if self.tid < 65000 else 1
            pdu.transaction_id = self.tid
        await self._send(sock, self.framer.buildFrame(pdu))
        self.waiting = True
        parse = self._rtu_reply if self.rtu else self._tcp_reply
        while True:
            reply = parse(pdu)
            if reply is not None:
                self.waiting = False
                self.last_reply = trio.current_time()
                return reply
            await trio.lowlevel.wait_readable(sock)  # a cancel here consumes nothing
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                raise ConnectionLost(f"receive failed: {exc}") from exc
            if not data:
                raise ConnectionLost("closed by the peer")
            self.buf += data

    async def _reopen_if_closed(self, sock: socket.socket) -> socket.socket:
        """The socket, or a new connection if the peer closed this one while it was idle
        (gateways close idle connections after some seconds): a request on it would only
        find the close."""
        try:
            if sock.recv(1, socket.MSG_PEEK):
                return sock  # bytes are waiting (a late reply): open
        except (BlockingIOError, InterruptedError):
            return sock
        except OSError:
            pass  # reset
        await self.close()
        try:
            await self.open()
        except OSError as exc:
            raise ConnectionLost(f"closed by the peer while idle; reconnecting failed: {exc}") from exc
        self.reopened += 1
        assert self.sock is not None
        return self.sock

    def _drain(self, sock: socket.socket) -> None:
        """Take what the socket holds, without waiting: replies to a request given up on that
        came before the next request was sent. Whole Modbus TCP frames are dropped as late (a
        frame under the next transaction id is no reply to a request not yet sent); in RTU
        over TCP the request drops all of ``buf``. A closed or failed socket is left to the
        request's own receive to report."""
        got = b""
        while True:
            try:
                data = sock.recv(65536)
            except OSError:  # BlockingIOError: nothing more
                break
            if not data:
                break
            got += data
        if not got:
            return
        self.buf += got
        if self.rtu:
            self.late += 1
            return
        buf = self.buf
        while len(buf) >= 6 and buf[2:4] == b"\0\0" and len(buf) >= 6 + int.from_bytes(buf[4:6], "big"):
            buf = buf[6 + int.from_bytes(buf[4:6], "big"):]
            self.late += 1
        self.buf = buf

    async def _send(self, sock: socket.socket, frame: bytes) -> None:
        """All of ``frame``; at once when the socket takes it (a request always fits, unless
        the peer stopped reading)."""
        view = memoryview(frame)
        while view:
            try:
                view = view[sock.send(view):]
                continue
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                raise ConnectionLost(f"send failed: {exc}") from exc
            try:
                await trio.lowlevel.wait_writable(sock)
            except trio.Cancelled:
                self.broken = len(view) < len(frame)  # part of the frame went out
                raise

    def _tcp_reply(self, request: ModbusPDU) -> ModbusPDU | None:
        """The reply to ``request`` if ``buf`` holds it (late frames discarded), else None."""
        while len(self.buf) >= 6:
            buf = self.buf
            length = int.from_bytes(buf[4:6], "big")
            if buf[2:4] != b"\0\0" or not 2 <= length <= 254:
                self.buf = b""
                raise MalformedFrame("no Modbus TCP header", buf, fatal=True)
            used, dev_id, tid, data = self.framer.decode(buf)
            if not used:
                return None  # the rest of the frame is still on its way
            self.buf = buf[used:]
            if tid != request.transaction_id:
                self.late += 1
                continue
            if dev_id in TCP_ANY_UNIT:
                # the transaction id matched: a device reached directly (not through a
                # gateway) may answer with the unit id the Modbus TCP guide calls "not
                # significant" (0xFF, or 0) whatever it was asked
                dev_id = request.dev_id
            return self._decode(request, dev_id, data, buf[:used])
        return None

    def _rtu_reply(self, request: ModbusPDU) -> ModbusPDU | None:
        while self.buf:
            found = self._rtu_frame()
            if found is None:
                return None
            dev_id, data, frame = found
            if dev_id != request.dev_id or data[0] & 0x7F != request.function_code:
                self.late += 1  # no transaction id: another request's reply
                continue
            return self._decode(request, dev_id, data, frame)
        return None

    def _rtu_frame(self) -> tuple[int, bytes, bytes] | None:
        """The first frame in ``buf`` whose CRC holds, taken out of it with the bytes before
        it (unit, PDU, frame); None: wait for more. pymodbus' ``FramerRTU.decode`` would take
        the whole buffer with a frame, so a reply behind a late one, or behind line noise (a
        candidate frame whose CRC fails), was lost. A frame whose CRC fails with no good one
        behind it is :class:`MalformedFrame`; a candidate not complete yet, before any CRC
        failure, is waited for."""
        buf = self.buf
        lookup = self.decoder.lookupPduClass
        bad = False
        for i in range(len(buf) - 3):  # a frame: unit, function code, ..., CRC (4 bytes at least)
            try:
                cls = lookup(buf[i:])
                size = cls.calculateRtuFrameSize(buf[i:]) if cls is not None else -1
            except Exception:  # a PDU class pymodbus cannot size: not a reply the binding asks for
                size = -1
            if size < 0:
                continue
            if not size or len(buf) < i + size:
                if bad:
                    continue
                break
            crc = buf[i + size - 2 : i + size]
            if self.check_crc(buf[i : i + size - 2], crc[0] << 8 | crc[1]):
                self.buf = buf[i + size :]
                return buf[i], buf[i + 1 : i + size - 2], buf[i : i + size]
            bad = True
        if bad:
            self.buf = b""
            raise MalformedFrame("RTU frame with a wrong CRC", buf)
        if len(buf) > RTU_HUNT_LIMIT:
            self.buf = b""
            raise MalformedFrame(f"no RTU frame in {len(buf)} bytes", buf, fatal=True)
        return None

    def _decode(self, request: ModbusPDU, dev_id: int, data: bytes, frame: bytes) -> ModbusPDU:
        pdu = self._pdu(data)
        if pdu is None:
            raise MalformedFrame("undecodable PDU", frame)
        if dev_id != request.dev_id:
            raise MalformedFrame(f"reply from unit {dev_id} to a request for unit {request.dev_id}", frame)
        if pdu.function_code & 0x7F != request.function_code:
            raise MalformedFrame(
                f"function code {pdu.function_code} in reply to {request.function_code}", frame
            )
        pdu.dev_id, pdu.transaction_id = dev_id, request.transaction_id
        return pdu


    def _pdu(self, data: bytes) -> ModbusPDU | None:
        """``DecodePDU.decode`` for the replies a poll gets, without its debug line (it formats
        every PDU as text whether debug is on or not); anything else goes through it."""
        fc = data[0]
        cls = self.response_classes.get(fc)
        if cls is None:
            return self.decoder.decode(data)
        pdu = cls()
        try:
            pdu.decode(data[1:])
        except (self.modbus_exception, ValueError, IndexError, struct.error):
            return None
        return pdu


class SerialTransport:
    """RTU on a serial port through pymodbus' asyncio serial client (see the module
    docstring). ``open`` raises OSError."""

    def __init__(self, serial: Mapping[str, Any]) -> None:
        self.serial = dict(serial)
        self.client: Any = None  # touched only on the asyncio thread
        self.broken = False
        self.late = 0

    def _make_client(self) -> Any:  # asyncio thread
        from pymodbus import FramerType
        from pymodbus.client import AsyncModbusSerialClient

        s = self.serial
        return AsyncModbusSerialClient(
            str(s["device"]),
            framer=FramerType.RTU,
            baudrate=int(s.get("baud", 19200)),
            parity=str(s.get("parity", "N")),
            stopbits=int(s.get("stop_bits", 1)),
            bytesize=int(s.get("data_bits", 8)),
            timeout=3600,  # per-request timeouts are the Line's (Trio cancel scopes)
            retries=0,
            reconnect_delay=0,  # the Line reconnects, with its own backoff
        )

    async def open(self) -> None:
        def open_() -> Any:
            if self.client is None:
                self.client = self._make_client()
            return self.client.connect()

        if not await aio.run(open_):
            raise OSError(f"cannot open {self.serial['device']}")
        self.broken = False

    async def request(self, pdu: ModbusPDU) -> ModbusPDU:
        from pymodbus.exceptions import ConnectionException, ModbusException

        client = self.client
        make: Callable[[], Any] = lambda: client.execute(False, pdu)  # noqa: E731
        try:
            return await aio.run(make)
        except (ConnectionException, OSError) as exc:
            raise ConnectionLost(str(exc)) from exc
        except ModbusException as exc:  # a reply pymodbus could not take (another unit...)
            raise MalformedFrame(str(exc), b"") from exc

    async def close(self) -> None:
        client = self.client
        if client is not None:
            await aio.run(client.close)
