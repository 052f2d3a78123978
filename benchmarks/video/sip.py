"""GB28181 SIP server benchmark: REGISTER + keepalive throughput, INVITE-to-first-frame.

    python benchmarks/video/sip.py [--devices 2000] [--rounds 5]

1. Throughput: sipp plays ``--devices`` GB28181 devices (benchmarks/video/sipp/
   register_keepalive.xml: REGISTER, with the digest round trip when the server asks, then 10
   keepalive MESSAGEs each waiting for its 200) against our server, with and without digest
   auth; the peer is sipp itself as a stateless registrar (registrar_peer.xml) on the same
   loopback: the ceiling of the load generator and the machine.
2. INVITE to first frame: a sipp device (tests/video/sipp/) registered with our server, ffmpeg
   opens the channel's feed (INVITE → 200 → ACK → PS over RTP from a pcap → depacketised →
   ``-f mpeg``) and decodes one frame, ``--rounds`` times (each a fresh INVITE and BYE); the
   peer is the same ffmpeg (same probe options) opening GStreamer's RTSP server
   (DESCRIBE/SETUP/PLAY, 1 s GOP like our PS) for one frame.

Figures are wall-clock on this (shared, 2-core) machine; the load average is printed with them.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.video import gb_device  # noqa: E402  (the tests' PS/RTP/pcap helpers)
from twin.video.gb28181.server import Gb28181Config, Gb28181Server  # noqa: E402

HERE = Path(__file__).parent
SIPP_TESTS = ROOT / "tests" / "video" / "sipp"
DEV = "34020000001320000001"
CHAN = "34020000001310000001"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def injection(path: Path, n: int, same: bool = False) -> Path:
    lines = ["SEQUENTIAL"] + [f"34020000001320{0 if same else i:06d};" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


async def run_sipp_load(target_port: int, devices: int, inf: Path) -> float:
    # sipp cannot take the digest user name from the injection file: with auth, every call
    # is the same device re-registering (-au); each REGISTER is still challenged and checked
    argv = ["sipp", f"127.0.0.1:{target_port}", "-sf", str(HERE / "sipp" / "register_keepalive.xml"),
            "-inf", str(inf), "-s", "34020000002000000001", "-i", "127.0.0.1",
            "-p", str(free_port()), "-m", str(devices), "-r", "2000", "-l", "200",
            "-timeout", "300s", "-nostdin", "-recv_timeout", "10000",
            "-au", "34020000001320000000", "-ap", "bench"]
    start = time.perf_counter()
    proc = await trio.run_process(argv, stdout=subprocess.DEVNULL, capture_stderr=True,
                                  check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        print(f"  sipp exited {proc.returncode}: {proc.stderr.decode()[-300:]}")
    return elapsed


async def throughput(devices: int, tmp: Path) -> None:
    inf = injection(tmp / "devices.csv", devices)
    same = injection(tmp / "one-device.csv", devices, same=True)
    requests_per_device = 11  # REGISTER + 10 MESSAGE (+1 REGISTER with digest)
    print(f"== REGISTER + 10 keepalives per device, {devices} devices (sipp, 200 at a time)")
    for label, password in (("ours, no auth", None), ("ours, digest auth", "bench")):
        cfg = Gb28181Config(port=0, password=password, auto_catalog=False, rate=1e9,
                            burst=10**9, keepalive_timeout=3600)
        server = Gb28181Server(cfg)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            elapsed = await run_sipp_load(server.udp_port, devices, same if password else inf)
            nursery.cancel_scope.cancel()
        reqs = devices * (requests_per_device + (1 if password else 0))
        print(f"  {label:20s} {elapsed:6.2f} s  {devices / elapsed:8.0f} registrations/s  "
              f"{10 * devices / elapsed:8.0f} keepalives/s  {reqs / elapsed:8.0f} requests/s  "
              f"(devices {len(server.devices)}, REGISTERs {server.stats.registers}, keepalives "
              f"{server.stats.keepalives}, auth failures {server.stats.auth_failures})")
        if label == "ours, no auth":
            ours = elapsed
    peer_port = free_port()
    peer = await trio.lowlevel.open_process(
        ["sipp", "-sf", str(HERE / "sipp" / "registrar_peer.xml"), "-i", "127.0.0.1",
         "-p", str(peer_port), "-nostdin", "-m", str(devices)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await trio.sleep(0.5)
        elapsed = await run_sipp_load(peer_port, devices, inf)
    finally:
        peer.kill()
        await peer.wait()
    print(f"  {'peer: sipp registrar':20s} {elapsed:6.2f} s  {devices / elapsed:8.0f} "
          f"registrations/s  {10 * devices / elapsed:8.0f} keepalives/s  "
          f"{devices * requests_per_device / elapsed:8.0f} requests/s")
    print(f"  ratio ours (no auth) / peer throughput: {elapsed / ours:.2f}")


async def first_frame(rounds: int, tmp: Path) -> None:
    print(f"== INVITE to first decoded frame, {rounds} rounds")
    ps = gb_device.make_ps(20.0)
    pcap = gb_device.write_pcap(gb_device.rtp_packets(ps), tmp / "ps.pcap")
    (tmp / "uas.xml").write_text(
        (SIPP_TESTS / "gb_device_uas.xml").read_text().replace("@PCAP@", str(pcap)))
    cfg = Gb28181Config(port=0, password="bench", linger=0.2, keepalive_timeout=3600)
    server = Gb28181Server(cfg)
    ours: list[float] = []
    first_bytes: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        device = await trio.lowlevel.open_process(
            ["sipp", f"127.0.0.1:{server.udp_port}", "-sf", str(SIPP_TESTS / "gb_device.xml"),
             "-oocsf", str(tmp / "uas.xml"), "-s", "34020000002000000001", "-i", "127.0.0.1",
             "-p", str(free_port()), "-mp", str(free_port()), "-m", "1", "-au", DEV,
             "-ap", "bench", "-set", "dev", DEV, "-set", "chan", CHAN, "-set", "realm",
             "3402000000", "-set", "kas", "600", "-nostdin"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with trio.fail_after(30):
                while DEV not in server.devices:  # noqa: ASYNC110 - polls the server's state
                    await trio.sleep(0.05)
            feed = await server.open_feed(DEV, CHAN, "udp")
            for _ in range(rounds):
                with trio.fail_after(30):
                    while server.sessions:  # noqa: ASYNC110 - the previous round's BYE
                        await trio.sleep(0.05)
                start = time.perf_counter()
                proc = await trio.run_process(
                    ["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "mpeg",
                     "-probesize", "32768", "-analyzeduration", "500000", "-i", feed.url,
                     "-an", "-frames:v", "1", "-f", "null", "-"], capture_stderr=True,
                    check=False)
                ours.append(time.perf_counter() - start)
                if proc.returncode != 0:
                    print("  ffmpeg:", proc.stderr.decode()[-300:])
                s = feed.session
                if s is not None and s.first_packet_at is not None:
                    first_bytes.append(s.first_packet_at - s.invited_at)
        finally:
            device.kill()
            await device.wait()
            nursery.cancel_scope.cancel()
    print(f"  ours (GB28181 INVITE, PS/RTP/UDP): median {statistics.median(ours) * 1000:6.0f} ms"
          f"  (min {min(ours) * 1000:.0f}, max {max(ours) * 1000:.0f}); INVITE to first RTP "
          f"packet median {statistics.median(first_bytes) * 1000:.0f} ms")
    gst_server = str(ROOT / "tests" / "video" / "gst_rtsp_server.py")
    gst = subprocess.Popen(["/usr/bin/python3", gst_server],  # noqa: ASYNC220 - started once
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peer: list[float] = []
    try:
        line = gst.stdout.readline() if gst.stdout else ""
        url = f"rtsp://127.0.0.1:{int(line.split()[1])}/cam"
        for _ in range(rounds):
            start = time.perf_counter()
            await trio.run_process(["ffmpeg", "-hide_banner", "-loglevel", "error",
                                    "-rtsp_transport", "tcp", "-probesize", "32768",
                                    "-analyzeduration", "500000", "-i", url, "-an", "-frames:v",
                                    "1", "-f", "null", "-"], check=False)
            peer.append(time.perf_counter() - start)
    finally:
        gst.kill()
        gst.wait()
    print(f"  peer (GStreamer RTSP server, ffmpeg over RTSP/TCP): median "
          f"{statistics.median(peer) * 1000:6.0f} ms  (min {min(peer) * 1000:.0f}, "
          f"max {max(peer) * 1000:.0f})")
    print(f"  ratio ours / peer: {statistics.median(ours) / statistics.median(peer):.2f}")


async def main(args: argparse.Namespace) -> None:
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        await throughput(args.devices, Path(tmp))
        await first_frame(args.rounds, Path(tmp))
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    trio.run(main, parser.parse_args())
