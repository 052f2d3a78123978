"""Media for the GB28181 device the tests play with sipp: an MPEG-2 program stream made by
ffmpeg (H.264 test pattern), cut into PS-over-RTP packets the way devices do
(``twin.video.gb28181.media.packetize_ps``), written as a pcap for sipp's
``play_pcap_video`` or sent directly over RTP/UDP or RTP/TCP (RFC 4571)."""

from __future__ import annotations

import socket
import struct
import subprocess
import time
from pathlib import Path

from twin.video.gb28181.media import frame_rfc4571, packetize_ps, parse_rtp


def make_ps(seconds: float = 3.0, fps: int = 25, size: str = "320x240") -> bytes:
    """An MPEG-2 PS (``-f vob``) with H.264, one keyframe a second, made by ffmpeg."""
    return subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
         f"testsrc2=size={size}:rate={fps}", "-t", str(seconds), "-c:v", "libx264",
         "-preset", "ultrafast", "-tune", "zerolatency", "-g", str(fps), "-bf", "0",
         "-f", "vob", "-"], check=True, capture_output=True, timeout=60).stdout


def rtp_packets(ps: bytes, ssrc: int = 1) -> list[bytes]:
    return packetize_ps(ps, ssrc=ssrc)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def write_pcap(packets: list[bytes], path: Path, src_port: int = 40000,
               dst_port: int = 9) -> Path:
    """An Ethernet pcap of the RTP packets as UDP 127.0.0.1 → 127.0.0.1, timed by their RTP
    timestamps (sipp replaces the destination port with the one from the SDP)."""
    out = bytearray(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
    t0 = None
    for pkt in packets:
        ts = parse_rtp(pkt).timestamp / 90000.0
        t0 = ts if t0 is None else t0
        t = ts - t0
        udp_len = 8 + len(pkt)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0, 0x4000, 64, 17, 0,
                         socket.inet_aton("127.0.0.1"), socket.inet_aton("127.0.0.1"))
        ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
        udp = struct.pack("!HHHH", src_port, dst_port, udp_len, 0)
        frame = b"\0" * 12 + b"\x08\x00" + ip + udp + pkt
        sec = int(t)
        out += struct.pack("<IIII", sec, int((t - sec) * 1e6), len(frame), len(frame))
        out += frame
    path.write_bytes(bytes(out))
    return path


def send_udp(packets: list[bytes], port: int, realtime: bool = True) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        start = time.monotonic()
        t0 = None
        for pkt in packets:
            ts = parse_rtp(pkt).timestamp / 90000.0
            t0 = ts if t0 is None else t0
            if realtime:
                delay = start + (ts - t0) - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            s.sendto(pkt, ("127.0.0.1", port))


def send_tcp(packets: list[bytes], port: int, realtime: bool = True) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        start = time.monotonic()
        t0 = None
        for pkt in packets:
            ts = parse_rtp(pkt).timestamp / 90000.0
            t0 = ts if t0 is None else t0
            if realtime:
                delay = start + (ts - t0) - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            s.sendall(frame_rfc4571(pkt))
