"""GB28181 media: PS-over-RTP → an MPEG-PS byte stream.

A device streams MPEG-2 Program Stream (ISO 13818-1 §2.5) cut into RTP packets (RFC 3550,
payload type 96 ``PS/90000``), over UDP or over TCP with RFC 4571 framing (a 2-byte length
before each packet). :class:`Depacketizer` puts packets back in sequence order (a small reorder
window; losses and duplicates counted) and yields their payloads: concatenated, they are the
program stream ffmpeg reads (``-f mpeg``). :class:`PsParser` walks that stream (pack headers,
system header, stream map, PES packets) to count frames and keyframes and to find pack
boundaries, where a new reader can join.

All of it is bounded: a datagram or frame that is not RTP, a version other than 2, a header
longer than the packet, a PES length beyond reason are counted as ``bad`` and dropped.
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass

PACK_START = b"\x00\x00\x01\xba"
MAX_RTP = 65_535


class RtpError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class RtpPacket:
    marker: bool
    payload_type: int
    seq: int
    timestamp: int
    ssrc: int
    payload: bytes


def parse_rtp(data: bytes) -> RtpPacket:
    if len(data) < 12:
        raise RtpError("shorter than an RTP header")
    b0, b1, seq, ts, ssrc = struct.unpack_from("!BBHII", data)
    if b0 >> 6 != 2:
        raise RtpError("not RTP version 2")
    offset = 12 + 4 * (b0 & 0x0F)
    if b0 & 0x10:  # header extension
        if len(data) < offset + 4:
            raise RtpError("truncated header extension")
        (words,) = struct.unpack_from("!H", data, offset + 2)
        offset += 4 + 4 * words
    end = len(data)
    if b0 & 0x20:  # padding
        pad = data[-1]
        if pad == 0 or pad > end - offset:
            raise RtpError("bad padding")
        end -= pad
    if offset > end:
        raise RtpError("header longer than the packet")
    return RtpPacket(bool(b1 & 0x80), b1 & 0x7F, seq, ts, ssrc, data[offset:end])


def build_rtp(payload: bytes, seq: int, timestamp: int, ssrc: int, *, marker: bool = False,
              payload_type: int = 96) -> bytes:
    return struct.pack("!BBHII", 0x80, (0x80 if marker else 0) | payload_type, seq & 0xFFFF,
                       timestamp & 0xFFFFFFFF, ssrc & 0xFFFFFFFF) + payload


class Rfc4571:
    """RTP over TCP (RFC 4571): ``len(2, big endian) + packet``, repeated."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self.buf += data
        out = []
        while len(self.buf) >= 2:
            (n,) = struct.unpack_from("!H", self.buf)
            if len(self.buf) < 2 + n:
                break
            out.append(bytes(self.buf[2:2 + n]))
            del self.buf[:2 + n]
        return out


def frame_rfc4571(packet: bytes) -> bytes:
    return struct.pack("!H", len(packet)) + packet


class Depacketizer:
    """RTP packets (of one SSRC, the first seen unless given) → payloads in sequence order."""

    def __init__(self, ssrc: int | None = None, window: int = 64, payload_type: int | None = None
                 ) -> None:
        self.ssrc = ssrc
        self.window = window
        self.payload_type = payload_type
        self.expected: int | None = None
        self.pending: dict[int, bytes] = {}
        self.received = 0
        self.lost = 0
        self.reordered = 0
        self.duplicates = 0
        self.bad = 0
        self.foreign = 0

    def push_bytes(self, data: bytes) -> list[bytes]:
        try:
            pkt = parse_rtp(data)
        except RtpError:
            self.bad += 1
            return []
        return self.push(pkt)

    def push(self, pkt: RtpPacket) -> list[bytes]:
        if self.ssrc is None:
            self.ssrc = pkt.ssrc
        elif pkt.ssrc != self.ssrc:
            self.foreign += 1
            return []
        if self.payload_type is not None and pkt.payload_type != self.payload_type:
            self.foreign += 1
            return []
        self.received += 1
        if self.expected is None:
            self.expected = pkt.seq
        delta = (pkt.seq - self.expected) & 0xFFFF
        if delta >= 0x8000:  # behind what we already gave out: late or duplicate
            self.duplicates += 1
            return []
        if delta > 0:
            if pkt.seq in self.pending:
                self.duplicates += 1
                return []
            self.reordered += 1
            self.pending[pkt.seq] = pkt.payload
            if len(self.pending) <= self.window:
                return []
            # the gap is not coming: skip to the oldest packet we hold
            oldest = min(self.pending, key=lambda s: (s - self.expected) & 0xFFFF)  # type: ignore[operator]
            self.lost += (oldest - self.expected) & 0xFFFF
            self.expected = oldest
            return self._drain()
        out = [pkt.payload]
        self.expected = (pkt.seq + 1) & 0xFFFF
        return out + self._drain()

    def _drain(self) -> list[bytes]:
        out = []
        while self.expected is not None and self.expected in self.pending:
            out.append(self.pending.pop(self.expected))
            self.expected = (self.expected + 1) & 0xFFFF
        return out


class PsError(ValueError):
    pass


class PsParser:
    """Walks an MPEG-PS byte stream fed in any chunks: counts packs, PES packets by stream,
    H.264/H.265 keyframes, and resynchronises on the next start code after garbage."""

    MAX_PES = 65_535 + 6

    def __init__(self) -> None:
        self.buf = bytearray()
        self.packs = 0
        self.system_headers = 0
        self.stream_maps = 0
        self.video_pes = 0
        self.audio_pes = 0
        self.keyframes = 0
        self.skipped = 0
        self.video_types: dict[int, int] = {}  # stream id -> stream_type from the PSM

    def feed(self, data: bytes) -> None:
        self.buf += data
        buf = self.buf
        i = 0
        n = len(buf)
        while True:
            j = buf.find(b"\x00\x00\x01", i)
            if j < 0:
                self.skipped += max(0, n - 2 - i)
                i = max(i, n - 2)
                break
            self.skipped += j - i
            i = j
            if n - i < 4:
                break
            code = buf[i + 3]
            if code == 0xBA:  # pack header
                if n - i < 14:
                    break
                # MPEG-2 pack header (+ stuffing), or MPEG-1's
                size = 14 + (buf[i + 13] & 0x07) if buf[i + 4] & 0xC0 == 0x40 else 12
                if n - i < size:
                    break
                self.packs += 1
                i += size
            elif code == 0xB9:  # program end
                i += 4
            elif code >= 0xBB:  # system header, PSM, PES: 2-byte length
                if n - i < 6:
                    break
                length = (buf[i + 4] << 8) | buf[i + 5]
                if n - i < 6 + length:
                    break
                packet = bytes(buf[i:i + 6 + length])
                if code == 0xBB:
                    self.system_headers += 1
                elif code == 0xBC:
                    self.stream_maps += 1
                    self._psm(packet)
                elif 0xE0 <= code <= 0xEF:
                    self.video_pes += 1
                    if self._is_keyframe(packet):
                        self.keyframes += 1
                elif 0xC0 <= code <= 0xDF:
                    self.audio_pes += 1
                i += 6 + length
            else:  # a start code inside ES data we skipped into: move on
                i += 3
        del buf[:i]

    def _psm(self, packet: bytes) -> None:
        if len(packet) < 12:
            return
        info_len = (packet[8] << 8) | packet[9]
        pos = 10 + info_len
        if pos + 2 > len(packet):
            return
        es_len = (packet[pos] << 8) | packet[pos + 1]
        pos += 2
        end = min(len(packet) - 4, pos + es_len)
        while pos + 4 <= end:
            stream_type, stream_id = packet[pos], packet[pos + 1]
            info = (packet[pos + 2] << 8) | packet[pos + 3]
            if 0xE0 <= stream_id <= 0xEF:
                self.video_types[stream_id] = stream_type
            pos += 4 + info

    def _is_keyframe(self, packet: bytes) -> bool:
        if len(packet) < 9:
            return False
        payload = packet[9 + packet[8]:]
        stream_type = self.video_types.get(packet[3], 0x1B)
        k = payload.find(b"\x00\x00\x01")
        while 0 <= k < len(payload) - 3:
            nal = payload[k + 3]
            if stream_type == 0x24:  # H.265: IDR_W_RADL / IDR_N_LP / CRA
                if (nal >> 1) & 0x3F in (19, 20, 21):
                    return True
            elif nal & 0x1F == 5:  # H.264 IDR
                return True
            k = payload.find(b"\x00\x00\x01", k + 3)
        return False


def pack_scr(pack: bytes) -> int | None:
    """The system clock reference (90 kHz) of a pack header (MPEG-2 or MPEG-1)."""
    if len(pack) < 12 or not pack.startswith(PACK_START):
        return None
    b = pack
    if b[4] & 0xC0 == 0x40:  # MPEG-2
        return (((b[4] >> 3) & 0x07) << 30 | ((b[4] & 0x03) << 28) | (b[5] << 20)
                | ((b[6] >> 3) << 15) | ((b[6] & 0x03) << 13) | (b[7] << 5) | (b[8] >> 3))
    return ((((b[4] >> 1) & 0x07) << 30) | (b[5] << 22) | ((b[6] >> 1) << 15) | (b[7] << 7)
            | (b[8] >> 1))


def pack_pts(pack: bytes) -> int | None:
    """The PTS (90 kHz) of the first video PES in a pack that carries one."""
    k = pack.find(b"\x00\x00\x01", 4)
    while 0 <= k <= len(pack) - 14:
        code = pack[k + 3]
        if 0xE0 <= code <= 0xEF:
            if pack[k + 7] & 0x80:  # PTS present
                p = pack[k + 9:k + 14]
                return (((p[0] >> 1) & 0x07) << 30 | p[1] << 22 | (p[2] >> 1) << 15
                        | p[3] << 7 | p[4] >> 1)
            return None
        if code in (0xBB, 0xBC) or 0xC0 <= code <= 0xDF or code >= 0xBD:
            k += 6 + ((pack[k + 4] << 8) | pack[k + 5])
        else:
            k = pack.find(b"\x00\x00\x01", k + 3)
    return None


def packetize_ps(ps: bytes, *, ssrc: int, mtu: int = 1400, first_seq: int = 0) -> list[bytes]:
    """Split a program stream into RTP packets the way GB28181 devices do: each pack (from one
    pack header to the next) in MTU-sized pieces, the last piece marked, the RTP timestamp from
    the pack's clock reference. What the tests and the benchmark send; a device does the same."""
    starts = []
    i = ps.find(PACK_START)
    while i >= 0:
        starts.append(i)
        i = ps.find(PACK_START, i + 4)
    starts.append(len(ps))
    out = []
    seq = first_seq
    ts = 0
    for a, b in itertools.pairwise(starts):
        chunk = ps[a:b]
        clock = pack_pts(chunk)
        if clock is None:
            clock = pack_scr(chunk) if ts == 0 else None
        ts = clock if clock is not None else ts
        for off in range(0, len(chunk), mtu):
            piece = chunk[off:off + mtu]
            out.append(build_rtp(piece, seq, ts, ssrc, marker=off + mtu >= len(chunk)))
            seq += 1
    return out


__all__ = ["Depacketizer", "PsParser", "Rfc4571", "RtpError", "RtpPacket", "build_rtp",
           "frame_rfc4571", "packetize_ps", "parse_rtp"]
