"""The ``modbus`` binding: Modbus TCP, RTU on a serial port and RTU over TCP, on pymodbus.

```yaml
binding:
  modbus:
    host: 10.0.0.7            # TCP (framing: socket) or RTU over TCP (framing: rtu)
    port: 502
    unit: 1
    # serial: {device: /dev/ttyUSB0, baud: 19200, parity: E, stop_bits: 1, inter_frame_delay: 5ms}
    timeout: 500ms            # per request, for this unit (default 1s)
    retries: 1                # per request (default 1)
    poll: 1s                  # the default group's interval
    groups: {slow: 30s}       # more poll groups
    max_gap: 8                # unused registers a coalesced read may span
    order: CDAB               # default byte order of this device's multi-register values
    points:                   # merged over the DeviceModel's spec.modbus.points
      temperature: {register: 30001, type: float32, scale: 0.1, unit: degC}
      setpoint:    {register: 40010, type: int16, access: readwrite}
      firmware:    {register: 40100, type: string, count: 8, group: slow}
    # a vendor's register layout as a plugin (kind: Plugin, role: codec) instead of points:
    codec: acme-regs          # decode(raw bytes of the frame) -> readings; encode(command) -> frame
    frame: [{register: 40001, count: 4}, {register: 30101, count: 2}]   # read every poll
    command: {register: 40100}                # where encoded command frames are written (FC 16)
```
Point maps are parsed and checked by :mod:`twin.spec.modbus` (the same code ``twin validate``
runs); values are encoded by :mod:`twin.bindings.modbus_codec`.

How it runs
  * Modbus TCP and RTU over TCP are **Trio-native** (:class:`~twin.bindings.modbus_transport.TcpTransport`):
    a ``trio.SocketStream`` and pymodbus' sans-IO parts only — its framers build each frame
    from a request PDU (``ReadHoldingRegistersRequest``…) and split the reply bytes, its
    ``DecodePDU`` decodes them; no thread hop per request. RTU on a serial port keeps
    pymodbus' asyncio serial client on the engine's asyncio thread (:mod:`twin.bindings.aio`,
    one bridge call per request). Both take the same request PDUs, and everything above the
    transport (:class:`Line`) is one code path.
  * Devices reached through the same gateway (host:port:framing) or serial port share **one**
    connection (:class:`Line`, reference-counted): one request in flight at a time, devices
    served in FIFO order (a fair ``trio.Lock``); a device's poll cycle (its coalesced
    requests, :meth:`Line.exchange`) holds the line for its requests, each bounded by the
    unit's ``timeout`` and retried ``retries`` times, with the serial inter-frame delay after
    each request.
  * Transaction ids (Modbus TCP) are matched: a late reply to a request that timed out is
    discarded, never taken as the next reply. RTU has none: bytes left from an earlier request
    are discarded before a request is sent, and a frame from another unit or for another
    function code is ignored.
  * Each poll group runs on its own fixed-rate schedule; its points are coalesced into as few
    requests as possible. A request that fails is retried; a unit that does not answer skips
    the rest of its cycle (its points are reported ``stale``: the last good value
    again; a gateway's exception 10 or 11 — no path / the target did not respond — is the
    same silence), and after ``max_failures`` (3) silent cycles its session ends: the device task
    reconnects it with backoff while the other units on the line keep their schedule (a dead
    unit costs the line at most ``timeout * (retries+1)`` per backoff period). A Modbus
    exception reply (illegal address…) marks that request's points ``bad`` (no value).
  * A connection that fails (the peer closed it, a socket error, a peer that vanished
    mid-request) is reopened at the next request, no sooner than its own backoff (0.5 s
    doubling to 30 s, after a failed connect), so a dead gateway is not hammered.
  * Malformed replies (a frame that does not decode, a wrong CRC, a reply from another unit
    under the request's transaction id, a wrong register count, an undecodable value) are
    logged with the device, counted (``twin_protocol_malformed{binding="modbus"}``) and
    dropped: the points are ``bad`` (after the retries). Bytes that cannot be a Modbus TCP
    header (a garbage stream, or an RTU gateway read with ``framing: socket``) close that one
    connection (it is reopened after the backoff); a malformed frame never stops the engine.
  * Writes (the ledger's desired-state and command deliveries) encode the value, write it
    with the point's write function code (5/6/15/16; a bit field is read-modify-written), and
    read it back: a different read-back fails the command. A command writes what its model's
    ``sets`` declares (``set_speed {value: 40}`` → the ``speed`` point).
  * A codec device: each poll of the default group reads the ``frame`` blocks (one request
    each) and hands their registers as bytes (each register big-endian, as on the wire, blocks
    concatenated in order) to the codec's ``decode`` as one payload; what it returns are the
    readings. A failed decode (trap, fuel, malformed output…) is one ``bad`` reading
    (``payload``), a unit that does not answer repeats the last decoded readings as
    ``stale``, an exception reply makes them ``bad`` — the poll schedule goes on either
    way. A command (with ``command``) is the codec's ``encode`` of ``{id, name, params}``:
    the frame's bytes become registers written from ``command.register`` with FC 16.
"""

from __future__ import annotations

import contextlib
import logging
import math
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from twin.bindings import plugins as plugin_edge
from twin.bindings.base import BindingContext, Message, Quality, Reading
from twin.bindings.modbus_codec import Block, EncodeError, decode, encode, plan
from twin.bindings.modbus_transport import (
    ConnectionLost,
    MalformedFrame,
    SerialTransport,
    TcpTransport,
    Transport,
)
from twin.bindings.protostats import stats
from twin.bindings.registry import register_binding
from twin.bindings.values import ValueRefused, check_reading
from twin.errors import BindingConnectError, BindingError, BindingTimeout, CommandError
from twin.spec.commands import command_sets
from twin.spec.modbus import (
    MAX_WRITE_REGISTERS,
    Point,
    PointError,
    line_key,
    merged_options,
    parse_command_register,
    parse_frame_block,
    parse_point,
)
from twin.spec.units import parse_duration

log = logging.getLogger(__name__)

STATS = stats("modbus")
MAX_FAILURES = 3
"""Consecutive silent poll cycles after which a unit's session ends (reconnect with backoff)."""
LATE_TOLERANCE = 0.1
"""A poll that starts more than this fraction of its interval late counts as late."""


class ModbusError(BindingError):
    """The unit answered with a Modbus exception (illegal function/address/value…)."""


class ModbusTimeout(BindingTimeout):
    pass


EXCEPTION_NAMES = {
    1: "illegal function", 2: "illegal data address", 3: "illegal data value",
    4: "server device failure", 5: "acknowledge", 6: "server device busy",
    10: "gateway path unavailable", 11: "gateway target failed to respond",
}
GATEWAY_SILENT = (10, 11)
"""Exceptions a gateway answers for a unit behind it that did not answer: the unit is silent
(ModbusTimeout: stale, its cycle stops, its silent cycles count), not a bad value."""


# -- the shared connection ------------------------------------------------------------------
class Line:
    """One connection to a gateway or serial port, shared by every device on it: its requests
    go one at a time, devices in FIFO order (``trio.Lock`` is fair). The transport
    (:mod:`twin.bindings.modbus_transport`) is Trio-native for TCP and RTU over TCP, the
    asyncio bridge for a serial port; everything here is the same for both."""

    def __init__(self, key: tuple[str, ...], options: Mapping[str, Any]) -> None:
        self.key = key
        self.options = dict(options)
        self.users = 0
        self.connected = False
        self.lock = trio.Lock()  # connecting and requests, FIFO-fair
        serial = options.get("serial") or {}
        baud = int(serial.get("baud", 19200)) if serial else 0
        delay = serial.get("inter_frame_delay") if serial else None
        # Modbus RTU: 3.5 character times of silence between frames (11 bits a character),
        # 1.75 ms above 19200 baud
        default = (3.5 * 11 / baud if baud <= 19200 else 0.00175) if baud else 0.0
        self.inter_frame = parse_duration(delay) if delay is not None else default
        self.connect_timeout = max(parse_duration(options.get("timeout", "1s")), 1.0)
        self.transport: Transport = (
            SerialTransport(serial) if serial else
            TcpTransport(str(options["host"]), int(options.get("port", 502)),
                         rtu=options.get("framing") == "rtu")
        )
        self.failures = 0  # failed connects (and garbage streams) since the last good reply
        self.next_connect = 0.0
        self.requests = 0
        self.current_device = ""  # whose request is in flight (one at a time per line)
        self.malformed = 0

    def describe(self) -> str:
        return ":".join(self.key[1:3]) if self.key[0] == "tcp" else self.key[1]

    def _backoff(self) -> None:
        self.failures += 1
        self.next_connect = trio.current_time() + min(30.0, 0.5 * 2 ** min(self.failures - 1, 6))

    async def _ensure(self) -> None:
        """Connected, or BindingConnectError (under the lock)."""
        if self.connected:
            return
        now = trio.current_time()
        if now < self.next_connect:
            raise BindingConnectError(
                f"modbus {self.describe()}: unreachable, next attempt in {self.next_connect - now:.1f} s"
            )
        ok = False
        try:
            with trio.move_on_after(self.connect_timeout + 1):
                await self.transport.open()
                ok = True
        except Exception as exc:  # OS / pymodbus errors: the line is unreachable
            log.debug("modbus %s: connect failed: %s", self.describe(), exc)
        if not ok:
            self._backoff()
            with contextlib.suppress(Exception):
                await self.transport.close()
            raise BindingConnectError(f"modbus {self.describe()}: cannot connect")
        self.connected = True
        log.info("modbus %s: connected", self.describe())

    async def _drop(self) -> None:
        self.connected = False
        with trio.CancelScope(shield=True):
            try:
                await self.transport.close()
            except Exception as exc:
                log.debug("modbus %s: close failed: %s", self.describe(), exc)

    def _malformed(self, device: str, exc: MalformedFrame) -> None:
        self.malformed += 1
        STATS.malformed += 1
        if self.malformed == 1 or self.malformed % 100 == 0:
            hint = " (closing the connection; is `framing` right: socket or rtu?)" if exc.fatal else ""
            log.warning(
                "device %s: malformed modbus frame from %s dropped (%d so far): %s: %s%s",
                device, self.describe(), self.malformed, exc.what, exc.data.hex(" "), hint,
            )

    def _reply(self, device: str, response: Any, t0: float) -> Any:
        """A response PDU as the caller gets it: itself, or ModbusError for an exception reply."""
        STATS.observe(time.perf_counter() - t0)
        self.failures = 0
        if not response.isError():
            return response
        STATS.errors += 1
        code = getattr(response, "exception_code", 0)
        what = f"device {device}: exception {code} ({EXCEPTION_NAMES.get(code, 'unknown')})"
        if code in GATEWAY_SILENT:  # a gateway's word for a unit that did not answer it
            STATS.timeouts += 1
            return ModbusTimeout(what)
        return ModbusError(what)

    async def _lost(self, exc: BaseException) -> BindingConnectError:
        STATS.errors += 1
        if isinstance(exc, MalformedFrame):  # fatal: a peer that talks garbage
            self._backoff()  # is not reconnected at once
            await self._drop()
            return BindingConnectError(
                f"modbus {self.describe()}: connection closed: not a Modbus stream ({exc.what})"
            )
        await self._drop()
        return BindingConnectError(f"modbus {self.describe()}: connection lost: {exc}")

    async def _requests(self, device: str, pdus: Sequence[Any], timeout: float, retries: int,  # noqa: ASYNC109
                        out: list[Any]) -> None:
        """Send ``pdus`` in order, appending each one's result to ``out``; stop after one that
        got no answer (its ModbusTimeout appended). Under the lock, connected."""
        tries = 0  # attempts of pdus[len(out)] so far
        failure: Exception | None = None
        while len(out) < len(pdus):
            # one cancel scope for as many requests as go without a timeout, its deadline
            # moved for each: a scope per request costs as much CPU as the request's own I/O
            fresh = True
            with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:
                while len(out) < len(pdus) and not scope.cancel_called:
                    pdu = pdus[len(out)]
                    tries += 1
                    STATS.requests += 1
                    self.requests += 1
                    t0 = time.perf_counter()
                    if not fresh:
                        scope.deadline = trio.current_time() + timeout
                    fresh = False
                    try:
                        response = await self.transport.request(pdu)
                    except MalformedFrame as exc:
                        self._malformed(device, exc)
                        if exc.fatal:
                            raise await self._lost(exc) from None
                        STATS.errors += 1
                        response = None
                        failure = ModbusError(f"device {device}: malformed reply ({exc.what})")
                    except (ConnectionLost, OSError) as exc:
                        raise await self._lost(exc) from exc
                    except (ValueError, struct.error) as exc:  # pymodbus could not encode it (address, count)
                        STATS.errors += 1
                        out.append(ModbusError(f"device {device}: request not sent: {exc}"))
                        tries = 0
                        continue
                    if self.inter_frame:
                        scope.deadline = math.inf
                        await trio.sleep(self.inter_frame)
                    if response is not None:
                        out.append(result := self._reply(device, response, t0))
                        tries = 0
                        if isinstance(result, ModbusTimeout):  # silent behind its gateway
                            return
                    elif tries > retries:  # malformed every time
                        out.append(failure)
                        tries = 0
            if scope.cancelled_caught:  # pdus[len(out)] got no answer in time
                STATS.errors += 1
                STATS.timeouts += 1
                if self.transport.broken:  # cancelled mid-send: the stream is out of step
                    await self._drop()
                    raise BindingConnectError(f"modbus {self.describe()}: request cut off mid-send")
                if self.inter_frame:
                    await trio.sleep(self.inter_frame)
                if tries > retries:
                    out.append(ModbusTimeout(
                        f"device {device}: no answer within {timeout:g} s ({retries + 1} attempts)"
                    ))
                    return  # the unit is silent: do not wait for it again this cycle

    async def exchange(self, device: str, pdus: Sequence[Any], timeout: float, retries: int) -> list[Any]:  # noqa: ASYNC109
        """One device's cycle of requests (pymodbus request PDUs), in order, under the line's
        FIFO lock, each with the unit's ``timeout`` and ``retries`` (and the serial
        inter-frame delay after each). Returns, per request: the response PDU, or the
        ModbusError / ModbusTimeout it ended with; after a request that got no answer the
        unit is silent: the rest are not sent (ModbusTimeout too). Raises
        BindingConnectError (unreachable, or the connection was lost: it is closed and
        reopened at a later request)."""
        out: list[Any] = []
        try:
            self.lock.acquire_nowait()  # free: nobody waits (a release hands it to the next)
        except trio.WouldBlock:
            await self.lock.acquire()
        try:
            if not self.connected:
                await self._ensure()
            self.current_device = device
            await self._requests(device, pdus, timeout, retries, out)
        finally:
            self.lock.release()
        if len(out) < len(pdus):
            silent = ModbusTimeout(f"device {device}: not asked (the unit is silent this cycle)")
            out.extend(silent for _ in range(len(pdus) - len(out)))
        return out

    async def call(self, device: str, pdu: Any, timeout: float, retries: int) -> Any:  # noqa: ASYNC109
        """One request (a pymodbus request PDU) with this unit's timeout and retries. Returns
        the response PDU; raises ModbusTimeout, ModbusError, BindingConnectError."""
        (result,) = await self.exchange(device, [pdu], timeout, retries)
        if isinstance(result, Exception):
            raise result
        return result


class LinePool:
    """Lines by key, reference-counted (closed when their last device leaves)."""

    def __init__(self) -> None:
        self.lines: dict[tuple[str, ...], Line] = {}

    def acquire(self, options: Mapping[str, Any]) -> Line:
        key = line_key(options)
        line = self.lines.get(key)
        if line is None:
            line = self.lines[key] = Line(key, options)
        line.users += 1
        return line

    async def release(self, line: Line) -> None:
        line.users -= 1
        if line.users <= 0 and self.lines.get(line.key) is line:
            del self.lines[line.key]
            await line._drop()


POOL = LinePool()


# -- the binding -----------------------------------------------------------------------------
@dataclass
class Group:
    name: str
    interval: float
    blocks: list[Block]
    polls: int = 0
    late: int = 0  # polls that started more than LATE_TOLERANCE x interval late
    missed: int = 0  # scheduled polls skipped because the previous one overran
    frame: bool = False  # this group also reads the codec's frame


_PDU: dict[int, Any] = {}
"""Request PDU classes by function code (pymodbus is imported when the first is built)."""


def _pdu_class(fc: int) -> Any:
    cls = _PDU.get(fc)
    if cls is None:
        from pymodbus.pdu import bit_message as bits
        from pymodbus.pdu import register_message as regs

        _PDU.update({
            1: bits.ReadCoilsRequest, 2: bits.ReadDiscreteInputsRequest,
            3: regs.ReadHoldingRegistersRequest, 4: regs.ReadInputRegistersRequest,
            5: bits.WriteSingleCoilRequest, 15: bits.WriteMultipleCoilsRequest,
            6: regs.WriteSingleRegisterRequest, 16: regs.WriteMultipleRegistersRequest,
        })
        cls = _PDU[fc]
    return cls


def _request(block: Block, unit: int) -> Any:
    """The pymodbus request PDU that reads ``block`` from ``unit`` (a fresh one: a transport
    sets its transaction id)."""
    return _pdu_class(block.fc)(address=block.start, count=block.count, dev_id=unit)


def _write_request(fc: int, address: int, unit: int, values: Sequence[Any]) -> Any:
    """The pymodbus request PDU that writes ``values`` (bits for 5/15, registers for 6/16)."""
    if fc in (5, 15):
        bits = [bool(v) for v in values[:1]] if fc == 5 else [bool(v) for v in values]
        return _pdu_class(fc)(address=address, bits=bits, dev_id=unit)
    regs = [int(v) for v in values[:1]] if fc == 6 else [int(v) for v in values]
    return _pdu_class(16 if fc != 6 else 6)(address=address, registers=regs, dev_id=unit)


class ModbusBinding:
    protocol = "modbus"

    def __init__(
        self,
        device: str,
        options: Mapping[str, Any],
        model: Mapping[str, Any] | None = None,
        context: BindingContext | None = None,
        pool: LinePool = POOL,
    ) -> None:
        self.device = device
        self.model = model or {}
        mmap = self.model.get("modbus") if options.get("model", True) is not False else None
        self.options = merged_options(mmap if isinstance(mmap, Mapping) else None, options)
        self.pool = pool
        self.unit = int(options.get("unit", 1))
        self.timeout = parse_duration(options.get("timeout", "1s"))
        self.retries = int(options.get("retries", 1))
        self._clock = (context.clock if context else None) or time.time
        try:
            self.points: dict[str, Point] = {
                name: parse_point(name, spec, self.options)
                for name, spec in (self.options.get("points") or {}).items()
            }
            # a codec's frame: raw register blocks, decoded by a plugin (twin/bindings/plugins.py)
            self.codec: str | None = options.get("codec")
            self.frame = [Block(*parse_frame_block(b), []) for b in (options.get("frame") or [])]
            cmd = options.get("command")
            self.command_address = parse_command_register(cmd) if isinstance(cmd, Mapping) else None
        except PointError as exc:
            raise BindingError(f"device {device!r}: modbus point map: {exc}") from exc
        if self.frame and self.codec is None:
            raise BindingError(f"device {device!r}: modbus: frame without a codec")
        if not self.frame:
            self.codec = None
        if not self.points and not self.frame:
            raise BindingError(f"device {device!r}: modbus: no points to poll")
        intervals = {"default": parse_duration(self.options.get("poll", "1s"))}
        for gname, every in (self.options.get("groups") or {}).items():
            intervals[str(gname)] = parse_duration(every)
        self.max_gap = max_gap = int(self.options.get("max_gap", 8))
        self.max_count = max_count = int(self.options.get("max_count", 125))
        self.groups: list[Group] = []
        names = {p.group for p in self.points.values()} | ({"default"} if self.frame else set())
        for gname in sorted(names):
            members = [p for p in self.points.values() if p.group == gname]
            if gname not in intervals:
                raise BindingError(f"device {device!r}: modbus: unknown poll group {gname!r}")
            self.groups.append(
                Group(gname, max(0.01, intervals[gname]), plan(members, max_gap=max_gap, max_count=max_count),
                      frame=gname == "default" and bool(self.frame))
            )
        self.frame_last: list[Reading] = []  # the codec's last good readings (re-reported stale)
        self.decode_failures = 0
        self.line: Line | None = None
        self.last: dict[str, Any] = {}
        self.silent_cycles = 0
        self.malformed = 0
        self._send: trio.MemorySendChannel[Message] | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    async def connect(self) -> None:
        if self.line is None:
            self.line = self.pool.acquire(self.options)
        async with self.line.lock:
            await self.line._ensure()

    async def close(self) -> None:
        line, self.line = self.line, None
        self._send = None
        if line is not None:
            await self.pool.release(line)

    # -- reading --------------------------------------------------------------------------------
    async def _read_block(self, block: Block) -> list[int] | list[bool]:
        assert self.line is not None
        response = await self.line.call(self.device, _request(block, self.unit), self.timeout, self.retries)
        return self._values(block, response)

    def _values(self, block: Block, response: Any) -> list[int] | list[bool]:
        values = list(response.bits if block.fc in (1, 2) else response.registers)
        # registers: exactly what was asked; bits come padded to whole bytes. Anything else is
        # not the answer to this request (e.g. a late reply to an earlier, timed-out one)
        wrong = len(values) < block.count if block.fc in (1, 2) else len(values) != block.count
        if wrong:
            STATS.malformed += 1
            self.malformed += 1
            log.warning(
                "device %s: malformed modbus reply: %d values, %d requested (fc %d @%d); dropped",
                self.device, len(values), block.count, block.fc, block.start,
            )
            raise ModbusError(f"device {self.device}: reply of the wrong length")
        return values

    def _readings(self, block: Block, values: Sequence[Any], ts: float) -> list[Reading]:
        out = []
        for p in block.points:
            try:
                raw = block.slice(p, [int(v) for v in values])
                name, value, _ = check_reading(p.name, decode(p, raw))
            except (ValueError, ValueRefused) as exc:
                STATS.malformed += 1
                self.malformed += 1
                log.warning("device %s: point %s: undecodable modbus value dropped: %s", self.device, p.name, exc)
                continue
            self.last[name] = value
            out.append(Reading(self.device, name, value, ts))
        return out

    def _stale(self, block: Block, ts: float) -> list[Reading]:
        return [
            Reading(self.device, p.name, self.last[p.name], ts, Quality.STALE)
            for p in block.points
            if p.name in self.last
        ]

    async def poll(self, blocks: Sequence[Block], *, frame: bool = False) -> list[Reading]:
        """One cycle over ``blocks`` (and the codec's frame): readings of every point (good,
        stale or bad)."""
        out: list[Reading] = []
        silent = False
        answered = False
        if frame and self.frame:
            silent, answered = await self._poll_frame(out)
        results: list[Any] = []
        if blocks and not silent:  # the cycle's requests, one after the other under the line's lock
            assert self.line is not None
            results = await self.line.exchange(
                self.device, [_request(b, self.unit) for b in blocks], self.timeout, self.retries
            )
        for block, result in zip(blocks, results or [None] * len(blocks), strict=True):
            ts = self._clock()
            if silent:
                out.extend(self._stale(block, ts))
                continue
            try:
                if isinstance(result, Exception):
                    raise result
                values = self._values(block, result)
            except ModbusTimeout as exc:
                log.info("device %s: %s", self.device, exc)
                silent = True  # the unit does not answer: do not wait for it again this cycle
                out.extend(self._stale(block, ts))
                continue
            except ModbusError as exc:
                answered = True
                log.warning("device %s: fc %d @%d: %s", self.device, block.fc, block.start, exc)
                out.extend(Reading(self.device, p.name, None, ts, Quality.BAD) for p in block.points)
                continue
            answered = True
            out.extend(self._readings(block, values, ts))
        if answered:
            self.silent_cycles = 0
        elif silent:
            self.silent_cycles += 1
        return out

    async def _poll_frame(self, out: list[Reading]) -> tuple[bool, bool]:
        """Read the frame's blocks and decode them with the codec (appended to ``out``).
        Returns (silent, answered) like a block of points."""
        assert self.codec is not None
        ts = self._clock()
        regs: list[int] = []
        for block in self.frame:
            try:
                regs.extend(int(v) for v in await self._read_block(block))
            except ModbusTimeout as exc:
                log.info("device %s: %s", self.device, exc)
                out.extend(Reading(r.device, r.point, r.value, ts, Quality.STALE)
                           for r in self.frame_last)
                return True, False
            except ModbusError as exc:
                log.warning("device %s: frame fc %d @%d: %s", self.device, block.fc, block.start, exc)
                out.extend(Reading(self.device, r.point, None, ts, Quality.BAD) for r in self.frame_last)
                if not self.frame_last:
                    out.append(Reading(self.device, plugin_edge.BAD_POINT, None, ts, Quality.BAD))
                return False, True
        payload = b"".join((r & 0xFFFF).to_bytes(2, "big") for r in regs)
        (readings,) = await plugin_edge.decode_off_loop(self.codec, self.device, [payload], ts)
        good = [r for r in readings if r.quality is Quality.GOOD]
        if good:
            self.frame_last = good
        if len(good) < len(readings):
            self.decode_failures += 1
        out.extend(readings)
        return False, True

    async def read(self, points: list[str] | None = None) -> list[Reading]:
        wanted = set(points or self.points)
        blocks = plan(
            [p for n, p in self.points.items() if n in wanted],
            max_gap=self.max_gap,
            max_count=self.max_count,
        )
        # the codec's points are known only once decoded: any name that is not a mapped point
        # (or no names at all) reads the frame too
        frame = bool(self.frame) and (points is None or any(p not in self.points for p in points))
        readings = await self.poll(blocks, frame=frame)
        if points is None:
            return readings
        return [r for r in readings if r.point in set(points)]

    async def _run_group(self, group: Group, send: trio.MemorySendChannel[Message]) -> None:
        next_at = trio.current_time()
        while True:
            now = trio.current_time()
            if now - next_at > LATE_TOLERANCE * group.interval:
                group.late += 1
            group.polls += 1
            for reading in await self.poll(group.blocks, frame=group.frame):
                await send.send(reading)
            if self.silent_cycles >= MAX_FAILURES:
                raise ModbusTimeout(
                    f"device {self.device}: unit {self.unit} silent for {self.silent_cycles} "
                    "poll cycles; reconnecting with backoff"
                )
            next_at += group.interval
            now = trio.current_time()
            if next_at < now:  # overran: skip the missed slots, keep the phase
                missed = int((now - next_at) // group.interval) + 1
                group.missed += missed
                next_at += missed * group.interval
            await trio.sleep_until(next_at)

    async def subscribe(self, send: trio.MemorySendChannel[Message]) -> None:
        self._send = send
        if len(self.groups) == 1:  # the common case: errors come out unwrapped
            await self._run_group(self.groups[0], send)
            return
        async with trio.open_nursery() as nursery:
            for group in self.groups:
                nursery.start_soon(self._run_group, group, send)

    # -- writing --------------------------------------------------------------------------------
    async def write(self, point: str, value: Any) -> None:
        p = self.points.get(point)
        if p is None:
            raise CommandError(f"device {self.device}: no modbus point {point!r}")
        if not p.writable:
            raise CommandError(f"device {self.device}: point {point!r} is read-only")
        try:
            regs = encode(p, value)
        except EncodeError as exc:
            raise CommandError(str(exc)) from exc
        assert self.line is not None
        addr = p.address
        if p.fc != 1 and p.bit is not None:  # read-modify-write of one bit of a register
            current = (await self._read_block(Block(3, addr, 1, [p])))[0]
            mask = 1 << p.bit
            regs = [(int(current) & ~mask) | (mask if regs[0] else 0)]
        write_fc = p.write_fc or (15 if p.fc == 1 else 16)
        await self.line.call(self.device, _write_request(write_fc, addr, self.unit, regs[:1] if p.fc == 1 else regs),
                             self.timeout, self.retries)
        # read back to confirm
        block = Block(p.fc, p.address, p.count, [p])
        readings = self._readings(block, await self._read_block(block), self._clock())
        got = readings[0].value if readings else None
        if not _same(got, value, p):
            raise CommandError(f"device {self.device}: wrote {point}={value!r}, read back {got!r}")
        if self._send is not None:
            with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                self._send.send_nowait(readings[0])  # else the next poll reports it

    async def send_command(self, name: str, params: Mapping[str, Any]) -> Any:
        if self.codec is not None and self.command_address is not None:
            return await self._codec_command(name, params)
        sets = command_sets(self.model, name, params)
        if not sets:
            raise CommandError(
                f"device {self.device}: command {name!r} sets no property (declare `sets` in the model)"
            )
        for prop, value in sets.items():
            await self.write(prop, value)
        return {"ok": True, "written": sets}


    async def _codec_command(self, name: str, params: Mapping[str, Any]) -> Any:
        """The codec's ``encode`` of the command, written as registers (FC 16)."""
        assert self.codec is not None and self.command_address is not None
        if not plugin_edge.can_encode(self.codec):
            raise CommandError(f"device {self.device}: codec {self.codec!r} has no encode")
        frame = await plugin_edge.encode_off_loop(self.codec, {"name": name, "params": dict(params)})
        if frame is None:
            raise CommandError(f"device {self.device}: codec {self.codec!r} could not encode "
                               f"command {name!r}")
        if not frame or len(frame) > 2 * MAX_WRITE_REGISTERS:
            raise CommandError(f"device {self.device}: codec {self.codec!r} made a {len(frame)}-byte "
                               f"frame for {name!r} (1-{2 * MAX_WRITE_REGISTERS} bytes fit one write)")
        if len(frame) % 2:
            frame += b"\x00"
        regs = [int.from_bytes(frame[i:i + 2], "big") for i in range(0, len(frame), 2)]
        if self.line is None:
            raise BindingConnectError(f"device {self.device}: not connected")
        await self.line.call(self.device, _write_request(16, self.command_address, self.unit, regs),
                             self.timeout, self.retries)
        return {"ok": True, "registers": len(regs), "address": self.command_address}


def _same(got: Any, want: Any, p: Point) -> bool:
    if isinstance(want, bool) or isinstance(got, bool) or isinstance(want, str):
        return bool(got == want)
    if isinstance(got, int | float) and isinstance(want, int | float):
        tol = abs(p.scale) / 2 if p.type not in ("float32", "float64") else 1e-6 * max(1.0, abs(want))
        if p.type == "float32":
            tol = max(tol, 1e-6 * max(1.0, abs(want)), abs(p.scale) * 1e-7)
        return abs(got - want) <= tol + 1e-12
    return False


def _factory(device: str, options: Mapping[str, Any], doc: Mapping[str, Any], context: BindingContext) -> ModbusBinding:
    return ModbusBinding(device, options, context.models.get(device), context)


register_binding("modbus", _factory)
