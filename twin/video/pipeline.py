"""One ffmpeg per camera: the command line (built with ffmpeg-python) and its run.

The camera's input (``twin/video/sources.py``) is read once and written to several outputs
(stream copy unless ``transcode`` is set, so a pipeline costs little CPU):

====================  ======================================================================
FLV                   ``pipe`` (stdout) → the in-process HTTP-FLV hub (``flvhub.py``)
audio                 the camera's audio, if it has one, copied into FLV, HLS and the spool
                      (``audio: false`` drops it; FLV drops an audio codec it cannot carry)
HLS                   ``<camera dir>/hls/index.m3u8``: short segments (default 1 s), a live
                      window of 6, sequence numbers from the epoch (monotonic over restarts)
snapshot              keyframes only (``-skip_frame nokey``) as MJPEG to a pipe: the newest
                      JPEG is kept in memory (served in microseconds)
spool                 ``<camera dir>/spool/<UTC start>.ts``: MPEG-TS segments (readable after
                      a SIGKILL, unlike a plain MP4), always; recording keeps them by linking
                      them into ``rec/`` (``spool.py``): no restart to start or stop it; the
                      camera's own stream (copy, even with ``transcode``)
sub-stream            optional ``substream: {scale, bitrate}``: an H.264 HLS rendition in
                      ``hls-sub/``
progress              ``-progress`` to a pipe every 0.5 s: frames, bytes (health + watchdog)
====================  ======================================================================

:meth:`CameraPipeline.run` runs ffmpeg again and again: it returns nothing and raises
:class:`PipelineError` when ffmpeg ends by itself or stalls (no new frame for
``stall_timeout``), so the engine's supervisor (``twin/runtime/supervisor.py``, handed in by the
binding) restarts it with backoff. Turning the stream off ends ffmpeg deliberately (not a
failure); recording on/off only changes which spool segments are kept.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ffmpeg
import trio

from twin.errors import BindingError
from twin.video import spool
from twin.video.flvhub import FlvError, FlvHub
from twin.video.recordings import NAME_FORMAT
from twin.video.sources import StreamSource

log = logging.getLogger(__name__)

FFMPEG = os.environ.get("TWIN_FFMPEG", "ffmpeg")


SETPRIV = shutil.which("setpriv")


def die_with_parent(argv: list[str]) -> list[str]:
    """``argv`` run so the child gets SIGKILL when the engine dies (even by SIGKILL), and no
    ffmpeg outlives its engine: util-linux ``setpriv --pdeathsig KILL`` (PR_SET_PDEATHSIG, kept
    across exec). Not a Python ``preexec_fn``: that forces a plain fork (and runs every
    library's at-fork hooks, e.g. lancedb's) where the exec is otherwise a vfork. The signal
    follows the *thread* that forked: :class:`Child` forks from the Trio thread, which lives as
    long as the engine."""
    if SETPRIV is None:  # not Linux: the FLV pipe breaking still ends the camera's ffmpeg
        return argv
    return [SETPRIV, "--pdeathsig", "KILL", "--", *argv]


class Child:
    """A child process spawned from the calling (Trio) thread — not from a worker thread as
    ``trio.lowlevel.open_process`` does, whose exit would fire the parent-death signal — and
    waited for through a pidfd. Pipes are the caller's (FdStream)."""

    def __init__(self, argv: list[str], *, pass_fds: tuple[int, ...] = (),
                 env: dict[str, str] | None = None, stdout: int | None = None,
                 stderr: int | None = None) -> None:
        self.popen = subprocess.Popen(
            die_with_parent(argv), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
            pass_fds=pass_fds, env=env, start_new_session=True, close_fds=True,
        )
        self.pid = self.popen.pid
        self._pidfd = os.pidfd_open(self.pid)

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    async def wait(self) -> int:
        if self.popen.poll() is None:
            await trio.lowlevel.wait_readable(self._pidfd)
        code = self.popen.wait()
        return code

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def close(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

    async def stop(self, grace: float = 2.0) -> None:
        """SIGTERM (ffmpeg closes its outputs), SIGKILL after ``grace`` s; always reaped."""
        self.signal(signal.SIGTERM)
        with trio.move_on_after(grace):
            await self.wait()
        if self.popen.poll() is None:
            self.kill()
            await self.wait()


QUICK_OPEN = {"analyzeduration": "1", "probesize": "32"}
"""Input options of the snapshot paths (one-shot grab, warm session): stop probing at the first
packet — the SDP tells the codec, the decoder takes the picture size from the keyframe. The
0.1 s / 32 KiB probe used before went on ~0.1 s past the keyframe (frames for a rate estimate);
``analyzeduration 0`` means ffmpeg's default, 5 s. Measured in benchmarks/README.md
("Session 6: video")."""

KEYFRAME_FILE = "keyframe.bin"
"""``snapshot.warm: always``: the session's newest keyframe, as the camera sent it (copy, with
its parameter sets), replaced atomically in ``<camera dir>/snapshots/``."""

KEYFRAMES_ONLY = "noise=drop=not(key),dump_extra=freq=keyframe"
"""Bitstream filters of the always-warm session: drop every packet but keyframes, and put the
codec's parameter sets (SPS/PPS, VPS for H.265) in front of each so one file decodes alone."""

KEEP_EVERY = 0.5
"""Seconds between two passes of the spool keeper (a segment is linked within this of its
start; what ffmpeg wrote before the link is in it all the same)."""


class PipelineError(BindingError):
    """ffmpeg ended or stalled; the message says why (credentials redacted)."""

    temporary = True


def _seconds(value: Any, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, int | float):
        return float(value)
    from twin.spec.units import parse_duration

    return float(parse_duration(str(value)))


def _warm(value: Any, snapshots: bool) -> float:
    """``snapshot.warm``: ``always`` (inf) by default — unless the camera's snapshots are off,
    where a copy-only session kept for them would read the camera for nothing: 60 s then (a
    session only when a snapshot is asked for)."""
    if value is None:
        return math.inf if snapshots else 60.0
    return math.inf if value == "always" else _seconds(value, 60.0)


def _size_bytes(gb: Any) -> int | None:
    return None if gb is None else int(float(gb) * 1024**3)


@dataclass(frozen=True)
class VideoOptions:
    """The options every camera binding shares (``specs/video.schema.json``)."""

    hls_time: float = 1.0
    hls_window: int = 6
    snapshot: bool = True
    # stream off: inf ("always", the default): a copy-only session keeps the newest keyframe on
    # disk all the time, decoded when asked; a duration: an on-demand snapshot keeps a session
    # this long (0: a one-shot grab each time)
    snapshot_warm: float = math.inf
    audio: bool = True  # copy the camera's audio stream (if any) to FLV, HLS and recordings
    record: bool = False
    segment: float = 10.0  # spool/recording segment length (cut at the next keyframe)
    pre_roll: float = 0.0  # seconds before start_recording that are kept (from the spool)
    retention_days: float | None = None
    retention_bytes: int | None = None
    stall_timeout: float = 10.0
    transcode: Mapping[str, Any] | None = None  # {bitrate, scale}: re-encode to H.264
    substream: Mapping[str, Any] | None = None  # {bitrate, scale}: an extra H.264 rendition
    health_interval: float = 2.0

    @property
    def first_frame_timeout(self) -> float:
        """Opening a camera (connect, describe, probe) may take longer than a frame gap."""
        return max(self.stall_timeout, 10.0)

    @classmethod
    def parse(cls, options: Mapping[str, Any]) -> VideoOptions:
        hls = options.get("hls_output") or {}
        rec = options.get("record") or {}
        retention = rec.get("retention") or {}
        snap = options.get("snapshot", True)
        snapshots = bool(snap.get("enabled", True) if isinstance(snap, Mapping) else snap)
        transcode = options.get("transcode")
        return cls(
            hls_time=_seconds(hls.get("segment"), 1.0),
            hls_window=int(hls.get("window", 6)),
            snapshot=snapshots,
            snapshot_warm=_warm(snap.get("warm") if isinstance(snap, Mapping) else None, snapshots),
            audio=bool(options.get("audio", True)),
            record=bool(rec.get("enabled", False)),
            segment=_seconds(rec.get("segment"), 10.0),
            pre_roll=_seconds(rec.get("pre_roll"), 0.0),
            retention_days=(float(retention["days"]) if retention.get("days") is not None
                            else None),
            retention_bytes=_size_bytes(retention.get("size_gb")),
            stall_timeout=_seconds(options.get("stall_timeout"), 10.0),
            transcode=(transcode if isinstance(transcode, Mapping)
                       else ({} if transcode else None)),
            substream=options.get("substream"),
            health_interval=_seconds(options.get("health_interval"), 2.0),
        )


def _scale(value: Any) -> str:
    """``640x360`` / ``640`` → an ffmpeg scale argument (``640:360`` / ``640:-2``)."""
    text = str(value)
    if "x" in text:
        w, h = text.split("x", 1)
        return f"{w}:{h}"
    return f"{text}:-2"


def _h264(bitrate: Any) -> dict[str, Any]:
    rate = str(bitrate or "1M")
    return {"c:v": "libx264", "preset": "veryfast", "tune": "zerolatency",
            "pix_fmt": "yuv420p", "b:v": rate, "maxrate": rate, "bufsize": rate,
            "force_key_frames": "expr:gte(t,n_forced*1)"}


def build_command(
    source: StreamSource,
    opts: VideoOptions,
    out_dir: Path,
    *,
    flv_fd: int | str = 1,
    jpeg_fd: int | None = None,
    progress_fd: int | None = None,
    snapshot_only: bool = False,
    keyframe_file: Path | None = None,
    flv_with_audio: bool = True,
) -> list[str]:
    """The camera's ffmpeg argv (see the module docstring for the outputs); ``snapshot_only``:
    the keyframe JPEGs alone (the warm snapshot session of a camera whose stream is off), or
    with ``keyframe_file`` no decoding at all: the newest keyframe copied to that file
    (``snapshot.warm: always``)."""
    in_opts: dict[str, Any] = {**QUICK_OPEN, **source.options} if snapshot_only else dict(
        source.options)
    if snapshot_only:
        opts = replace(opts, snapshot=True, transcode=None, substream=None)
    if keyframe_file is not None:  # copy: no decoder, no encoder, one file write per GOP
        return _argv([ffmpeg.input(source.url, **in_opts)["v:0"].output(
            str(keyframe_file), format="image2", update=1, atomic_writing=1,
            **{"c:v": "copy", "bsf:v": KEYFRAMES_ONLY})], progress_fd)
    decode_all = opts.transcode is not None or opts.substream is not None
    if opts.snapshot and not decode_all:
        in_opts["skip_frame"] = "nokey"  # decode keyframes only: the snapshots are nearly free
        # one decoder thread (no thread pool per keyframe), no deblocking: half the decode cost
        in_opts.setdefault("threads", "1")
        in_opts.setdefault("skip_loop_filter", "all")
    inp = ffmpeg.input(source.url, **in_opts)
    video: Any = inp["v:0"]
    uses = 2  # FLV, HLS (the spool copies the camera's own stream, transcoded or not)
    if opts.transcode is not None:
        # each output encodes its own copy (ffmpeg-python has no tee): transcoding costs
        # ``uses`` encoders; it is meant for the odd camera a browser cannot play
        main_codec = _h264(opts.transcode.get("bitrate"))
        if opts.transcode.get("scale"):
            scaled = video.filter("scale", *_scale(opts.transcode["scale"]).split(":"))
            split = scaled.filter_multi_output("split", uses)
            streams = [split.stream(i) for i in range(uses)]
        else:
            streams = [video] * uses
    else:
        main_codec = {"c:v": "copy"}
        streams = [video] * uses
    # the camera's audio (if it has any: the map is optional) is copied as it is
    audio: list[Any] = [inp["a:0?"]] if opts.audio else []
    copy_audio = {"c:a": "copy"} if opts.audio else {}
    flv_audio = audio if flv_with_audio else []
    outputs: list[Any] = [] if snapshot_only else [
        ffmpeg.output(streams[0], *flv_audio, f"pipe:{flv_fd}", format="flv",
                      flvflags="no_duration_filesize", **main_codec,
                      **(copy_audio if flv_audio else {})),
        ffmpeg.output(
            streams[1], *audio, str(out_dir / "hls" / "index.m3u8"), format="hls",
            hls_time=f"{opts.hls_time:g}", hls_list_size=opts.hls_window,
            hls_flags="delete_segments+omit_endlist+program_date_time+temp_file"
                      "+independent_segments",
            hls_start_number_source="epoch",
            hls_segment_filename=str(out_dir / "hls" / "%d.ts"), **main_codec, **copy_audio,
        ),
    ]
    if opts.snapshot and jpeg_fd is not None:
        snap: dict[str, Any] = {"format": "image2pipe", "c:v": "mjpeg", "q:v": 5,
                                "fps_mode": "vfr", "threads": 1}
        if decode_all:
            snap["r"] = 1
        outputs.append(ffmpeg.output(inp["v:0"], f"pipe:{jpeg_fd}", **snap))
    if opts.substream is not None:
        sub = inp["v:0"]
        if opts.substream.get("scale"):
            sub = sub.filter("scale", *_scale(opts.substream["scale"]).split(":"))
        outputs.append(ffmpeg.output(
            sub, str(out_dir / "hls-sub" / "index.m3u8"), format="hls",
            hls_time=f"{opts.hls_time:g}", hls_list_size=opts.hls_window,
            hls_flags="delete_segments+omit_endlist+temp_file", hls_start_number_source="epoch",
            hls_segment_filename=str(out_dir / "hls-sub" / "%d.ts"),
            **_h264(opts.substream.get("bitrate", "500k")),
        ))
    if not snapshot_only:
        outputs.append(ffmpeg.output(
            inp["v:0"], *audio, str(out_dir / "spool" / f"{NAME_FORMAT}.ts"), format="segment",
            segment_time=f"{opts.segment:g}", segment_format="mpegts", strftime=1,
            reset_timestamps=1, **{"c:v": "copy"}, **copy_audio,
        ))
    return _argv(outputs, progress_fd)


def _argv(outputs: list[Any], progress_fd: int | None) -> list[str]:
    argv = ffmpeg.merge_outputs(*outputs).compile(cmd=FFMPEG)
    head = [argv[0], "-hide_banner", "-nostdin", "-nostats", "-loglevel", "error", "-y"]
    if progress_fd is not None:
        head += ["-progress", f"pipe:{progress_fd}", "-stats_period", "0.5"]
    return [*head, *argv[1:]]


# -- run-time state ------------------------------------------------------------------------
@dataclass
class StreamHealth:
    state: str = "starting"  # starting | live | dark | stopped
    frames: int = 0  # frames this run (from -progress)
    bytes: int = 0  # bytes written to the FLV output this run
    fps: float = 0.0
    bitrate_kbps: float = 0.0
    last_frame_at: float | None = None  # trio.current_time()
    last_frame_wall: float | None = None  # time.time()
    restarts: int = 0
    runs: int = 0
    last_error: str | None = None
    started_at: float = 0.0
    _window: deque[tuple[float, int, int]] = field(default_factory=lambda: deque(maxlen=20))

    def frame_age(self, now: float | None = None) -> float | None:
        if self.last_frame_at is None:
            return None
        return max(0.0, (trio.current_time() if now is None else now) - self.last_frame_at)

    def sample(self, now: float) -> None:
        """Update fps / bitrate from the progress counters (over the last ~5 s)."""
        self._window.append((now, self.frames, self.bytes))
        while len(self._window) > 2 and now - self._window[0][0] > 5.0:
            self._window.popleft()
        t0, f0, b0 = self._window[0]
        dt = now - t0
        if dt >= 0.4:
            self.fps = round(max(0, self.frames - f0) / dt, 2)
            self.bitrate_kbps = round(max(0, self.bytes - b0) * 8 / dt / 1000, 1)


_FLV_REFUSES = re.compile(r"^\[flv @ [^\]]+\] (Audio codec .* not compatible|FLV does not "
                          r"support sample rate)")

_NOISE = re.compile(r"^(Input|Output) #|^\s|Last message repeated|^Conversion failed")


def explain(lines: list[str], source: StreamSource) -> str:
    """The most telling of ffmpeg's last error lines, with the credentials redacted."""
    useful = [ln for ln in lines if ln.strip() and not _NOISE.search(ln)]
    # "[h264 @ 0x…] non-existing PPS" and the like are decoder chatter: the cause is the
    # last line that names the input or the failure itself
    plain = [ln for ln in useful if not re.match(r"^\[[\w:. -]+ @ 0x[0-9a-f]+\]", ln)]
    text = (plain or useful or lines or [""])[-1]
    text = text.replace(source.url, source.display)
    # a URL with credentials ffmpeg printed in another spelling
    text = re.sub(r"(\w+://[^:/@\s]+):[^@\s]*@", r"\1:***@", text)
    return text.strip()[:300]


class CameraPipeline:
    """One camera's ffmpeg, its outputs and its health (see the module docstring)."""

    def __init__(self, name: str, source: StreamSource, opts: VideoOptions, out_dir: Path,
                 *, site: str = "", streaming: bool = True) -> None:
        self.name = name
        self.site = site
        self.source = source
        self.opts = opts
        self.out_dir = out_dir
        self.hub = FlvHub()
        self.health = StreamHealth()
        self.streaming = streaming
        self.recording = opts.record
        self.keep_since = time.time() - opts.pre_roll  # spool segments ending later are kept
        self.snapshot: bytes | None = None
        self.snapshot_wall: float | None = None
        self.snapshot_event = trio.Event()
        # the warm snapshot session (stream off): its own health, kept until _warm_until
        self.session = StreamHealth(state="stopped")
        self._warm_until = 0.0  # trio.current_time()
        self._session_wall = 0.0  # time.time() the current/last session started
        self._session_error: tuple[float, str] | None = None  # (time.time(), why it failed)
        self._mode: str | None = None  # "stream" | "snapshot" while ffmpeg runs
        self._waiting = 0  # requests waiting for the session's first keyframe
        # snapshot.warm: always — the session runs whenever the stream is off, copy only
        self.always_warm = math.isinf(opts.snapshot_warm)
        if self.always_warm:
            self._warm_until = math.inf
        self._decoded: tuple[float, int] | None = None  # the keyframe file decoded last
        self._decoding = trio.Lock()
        self._h = self.health  # the health the running ffmpeg updates
        # FLV takes AAC (and G.711, or MP3 at its rates) only: a camera whose audio FLV refuses
        # streams FLV without it (HLS and recordings keep it), decided by ffmpeg's own refusal
        self.flv_audio = opts.audio
        self.stderr: deque[str] = deque(maxlen=30)
        self._changed = trio.Event()
        self.process: Child | None = None
        self.argv: list[str] = []

    # -- control ------------------------------------------------------------------------
    def set_streaming(self, on: bool) -> None:
        if on != self.streaming:
            self.streaming = on
            self._changed.set()

    def set_recording(self, on: bool) -> None:
        """Keep spool segments from now (minus the pre-roll) on, or stop keeping them; ffmpeg
        runs on. The segment being written is linked at once: it is recorded when this
        returns."""
        if on == self.recording:
            return
        self.recording = on
        if on:
            self.keep_since = time.time() - self.opts.pre_roll
            self._keep()

    def _keep(self) -> None:
        try:
            spool.keep(self.out_dir / "spool", self.out_dir / "rec", self.keep_since,
                       ongoing=self._mode == "stream")
        except OSError as exc:
            log.warning("camera %s (site %s): keeping recording segments failed: %s", self.name,
                        self.site, exc)

    async def _keeper(self) -> None:
        """While ffmpeg runs: link new spool segments while recording (every KEEP_EVERY s),
        prune the spool (every half segment). Linking comes first: nothing to keep is pruned."""
        prune_every = max(1.0, self.opts.segment / 2)
        pruned = -prune_every
        while True:
            if self.recording:
                await trio.to_thread.run_sync(self._keep)
            if trio.current_time() - pruned >= prune_every:
                pruned = trio.current_time()
                try:
                    await trio.to_thread.run_sync(spool.prune, self.out_dir / "spool",
                                                  self.opts.pre_roll, time.time())
                except OSError as exc:
                    log.warning("camera %s (site %s): pruning the spool failed: %s", self.name,
                                self.site, exc)
            await trio.sleep(KEEP_EVERY if self.recording else prune_every)

    def kill(self) -> None:
        """SIGKILL the running ffmpeg (tests, benchmarks: a crash)."""
        if self.process is not None:
            self.process.kill()

    # -- the loop the supervisor runs ---------------------------------------------------
    async def run(self) -> None:
        while True:
            if self.streaming:
                await self.run_once()
                continue
            self.health.state = "stopped"
            self.health.fps = self.health.bitrate_kbps = 0.0
            if trio.current_time() < self._warm_until:
                await self.run_once(snapshot_only=True)
                continue
            self._changed = trio.Event()
            await self._changed.wait()

    def _prepare_dirs(self) -> None:
        for sub in ("hls", "rec", "spool", "snapshots", "hls-sub"):
            (self.out_dir / sub).mkdir(parents=True, exist_ok=True)
        spool.release_kept(self.out_dir / "spool")
        for old in (self.out_dir / "hls").iterdir():  # a previous run's live window
            if old.suffix in (".ts", ".m3u8", ".tmp"):
                old.unlink(missing_ok=True)

    async def run_once(self, *, snapshot_only: bool = False) -> None:
        """One ffmpeg run: returns after a deliberate restart, PipelineError otherwise.
        ``snapshot_only``: the warm snapshot session (keyframe JPEGs alone) of a camera whose
        stream is off, until ``_warm_until``; its failure goes to the snapshot's requester
        (:meth:`session_snapshot`), not to the supervisor."""
        await trio.to_thread.run_sync(self._prepare_dirs)
        self._changed = trio.Event()
        h = self.session if snapshot_only else self.health
        self._h = h
        if h.runs and not snapshot_only:
            h.restarts += 1
        h.runs += 1
        h.frames = h.bytes = 0
        h._window.clear()
        h.state = "starting"
        h.started_at = trio.current_time()
        keyframe = self.out_dir / "snapshots" / KEYFRAME_FILE
        if snapshot_only:
            self._session_wall = time.time()
            keyframe.unlink(missing_ok=True)  # the file there is this session's keyframe
        else:
            self.hub.restart()
        self.stderr.clear()
        jpeg_r, jpeg_w = os.pipe()
        prog_r, prog_w = os.pipe()
        self.argv = build_command(self.source, self.opts, self.out_dir, flv_fd=1,
                                  jpeg_fd=jpeg_w, progress_fd=prog_w,
                                  snapshot_only=snapshot_only, flv_with_audio=self.flv_audio,
                                  keyframe_file=(keyframe if snapshot_only and self.always_warm
                                                 else None))
        env = {**os.environ, "TZ": "UTC"}
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            process = Child(self.argv, pass_fds=(jpeg_w, prog_w), env=env, stdout=out_w,
                            stderr=err_w)
        except OSError as exc:
            for fd in (jpeg_r, prog_r, out_r, err_r):
                os.close(fd)
            raise PipelineError(f"camera {self.name}: cannot start ffmpeg: {exc}") from exc
        finally:
            for fd in (jpeg_w, prog_w, out_w, err_w):
                os.close(fd)
        self.process = process
        self._mode = "snapshot" if snapshot_only else "stream"
        jpeg = trio.lowlevel.FdStream(jpeg_r)
        prog = trio.lowlevel.FdStream(prog_r)
        out = trio.lowlevel.FdStream(out_r)
        err = trio.lowlevel.FdStream(err_r)
        reason: str | None = None
        deliberate = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_flv, out)
                nursery.start_soon(self._read_jpeg, jpeg)
                nursery.start_soon(self._read_progress, prog)
                nursery.start_soon(self._read_stderr, err)
                if not snapshot_only:
                    nursery.start_soon(self._keeper)

                async def expire() -> None:  # the warm session ends when nobody asked for long
                    nonlocal deliberate
                    # extended by each request; never while a request waits for its keyframe
                    while trio.current_time() < self._warm_until or self._waiting:  # noqa: ASYNC110
                        await trio.sleep(max(0.01, min(0.25, self._warm_until
                                                       - trio.current_time())))
                    deliberate = True
                    nursery.cancel_scope.cancel()

                if snapshot_only and not self.always_warm:
                    nursery.start_soon(expire)

                async def changed() -> None:
                    nonlocal deliberate
                    await self._changed.wait()
                    deliberate = True
                    nursery.cancel_scope.cancel()

                async def watchdog() -> None:
                    nonlocal reason
                    reason = await self._watchdog()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(changed)
                nursery.start_soon(watchdog)
                await process.wait()
                await trio.sleep(0.05)  # let the readers take the last lines
                nursery.cancel_scope.cancel()
        finally:
            with trio.move_on_after(3) as cleanup:
                cleanup.shield = True
                await process.stop()
            process.close()
            self.process = None
            self._mode = None
            self._h = self.health
            for stream in (jpeg, prog, out, err):
                with trio.move_on_after(1) as s:
                    s.shield = True
                    await stream.aclose()
            if h.state != "stopped":
                h.state = "dark" if not deliberate else h.state
        if deliberate:
            return
        refused = [ln for ln in self.stderr if _FLV_REFUSES.search(ln)]
        if reason is None and self.flv_audio and not snapshot_only and refused:
            self.flv_audio = False
            log.warning("camera %s (site %s): FLV cannot carry this camera's audio (%s): "
                        "HTTP-FLV without audio; HLS and recordings keep it", self.name,
                        self.site, refused[-1].split("] ", 1)[-1])
            return  # run() starts it again at once (one restart), not a failure
        if reason is None:
            code = process.returncode
            if code is not None and code < 0:
                reason = f"ffmpeg killed by signal {-code}"
            else:
                detail = explain(list(self.stderr), self.source) or f"exit status {code}"
                reason = f"ffmpeg ended: {detail}"
        h.last_error = reason
        h.state = "dark"
        if snapshot_only:  # the requester hears it; no retry until someone asks again
            self._session_error = (time.time(), reason)
            self._wake_snapshot()
            if self.always_warm:  # always on: restarted with backoff like a stream
                raise PipelineError(f"camera {self.name}: snapshot session: {reason}")
            self._warm_until = 0.0
            return
        raise PipelineError(f"camera {self.name}: {reason}")

    async def _watchdog(self) -> str:
        """Returns why the stream is considered stalled (the run is then ended)."""
        h = self._h
        while True:
            await trio.sleep(0.5)
            now = trio.current_time()
            h.sample(now)
            if h.last_frame_at is not None and h.last_frame_at >= h.started_at:
                if now - h.last_frame_at > self.opts.stall_timeout:
                    return f"stream stalled: no frame for {now - h.last_frame_at:.0f}s"
            elif not self.source.listener and now - h.started_at > self.opts.first_frame_timeout:
                return (f"no video from {self.source.display} within "
                        f"{self.opts.first_frame_timeout:g}s")

    def _frame(self) -> None:
        h = self._h
        h.last_frame_at = trio.current_time()
        h.last_frame_wall = time.time()
        if h.state != "live":
            h.state = "live"
            h.last_error = None

    async def _read_flv(self, stream: trio.lowlevel.FdStream) -> None:
        async for chunk in stream:
            self.health.bytes += len(chunk)
            try:
                self.hub.feed(bytes(chunk))
            except FlvError as exc:  # our own ffmpeg wrote it: a bug, never silently ignored
                log.error("camera %s: FLV output unreadable: %s", self.name, exc)
                raise PipelineError(f"camera {self.name}: FLV output unreadable: {exc}") from exc
            if self.hub.stats.last_tag_at is not None and self.hub.gop:
                self._frame()

    async def _read_jpeg(self, stream: trio.lowlevel.FdStream) -> None:
        buf = bytearray()
        async for chunk in stream:
            buf += chunk
            while True:
                start = buf.find(b"\xff\xd8")
                if start < 0:
                    buf.clear()
                    break
                end = buf.find(b"\xff\xd9", start + 2)
                if end < 0:
                    if start:
                        del buf[:start]
                    if len(buf) > 20 * 1024 * 1024:
                        buf.clear()
                    break
                self.snapshot = bytes(buf[start:end + 2])
                self.snapshot_wall = time.time()
                self._wake_snapshot()
                del buf[:end + 2]

    async def _read_progress(self, stream: trio.lowlevel.FdStream) -> None:
        h = self._h
        buf = b""
        async for chunk in stream:
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                key, _, value = line.decode("ascii", "replace").partition("=")
                if key == "frame":
                    try:
                        frames = int(value)
                    except ValueError:
                        continue
                    if frames > h.frames:
                        h.frames = frames
                        self._frame()

    async def _read_stderr(self, stream: trio.lowlevel.FdStream) -> None:
        buf = b""
        async for chunk in stream:
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                text = line.decode("utf-8", "replace").rstrip()
                if text:
                    self.stderr.append(text)
            if len(buf) > 8192:
                buf = b""

    # -- snapshots ----------------------------------------------------------------------
    def _wake_snapshot(self) -> None:
        event, self.snapshot_event = self.snapshot_event, trio.Event()
        event.set()

    async def session_snapshot(self, wait: float) -> bytes:
        """A keyframe of a camera whose stream is off, from its warm snapshot session: the
        newest one at once while the session runs; otherwise the session is started (ffmpeg,
        connect, the first keyframe: what a one-shot grab costs) and kept
        ``snapshot_warm`` s after this request, so the next snapshots are instant."""
        if self.always_warm:
            return await self._keyframe_snapshot(wait)
        self._warm_until = max(self._warm_until, trio.current_time() + self.opts.snapshot_warm)
        # a keyframe of the running session (not a stalled one: its watchdog ends it then)
        if (self._mode == "snapshot" and self.snapshot is not None
                and (self.snapshot_wall or 0) >= self._session_wall
                and time.time() - (self.snapshot_wall or 0) < self.opts.stall_timeout):
            return self.snapshot
        asked = time.time()
        if self._mode is None:
            self._changed.set()  # run() is idle: start the session
        self._waiting += 1
        try:
            with trio.move_on_after(wait):
                while True:
                    await self.snapshot_event.wait()
                    if self._session_error is not None and self._session_error[0] >= asked:
                        raise PipelineError(f"snapshot from {self.source.display} failed: "
                                            f"{self._session_error[1]}")
                    fresh = max(asked if self._mode != "snapshot" else 0.0, self._session_wall)
                    if self.snapshot is not None and (self.snapshot_wall or 0) >= fresh:
                        # kept ``snapshot_warm`` s from the answer on
                        self._warm_until = max(self._warm_until,
                                               trio.current_time() + self.opts.snapshot_warm)
                        return self.snapshot
        finally:
            self._waiting -= 1
        raise PipelineError(f"no frame from {self.source.display} within {wait:g}s")

    async def _keyframe_snapshot(self, wait: float) -> bytes:
        """``snapshot.warm: always``: the always-on session's newest keyframe (at most one GOP
        old), decoded now (a short ffmpeg, ~0.1 s) or, for the same keyframe, the JPEG decoded
        before. Before the session's first keyframe: waits for it."""
        asked = time.time()
        path = self.out_dir / "snapshots" / KEYFRAME_FILE
        with trio.move_on_after(wait):
            while True:
                if self._session_error is not None and self._session_error[0] >= asked:
                    raise PipelineError(f"snapshot from {self.source.display} failed: "
                                        f"{self._session_error[1]}")
                try:
                    st = path.stat() if self._mode == "snapshot" else None
                except FileNotFoundError:
                    st = None
                # not a stalled session's (its watchdog ends it after stall_timeout)
                if st is not None and time.time() - st.st_mtime < self.opts.stall_timeout:
                    async with self._decoding:  # one decode for requests that come together
                        if self._decoded != (st.st_mtime, st.st_ino) or self.snapshot is None:
                            data = await trio.to_thread.run_sync(path.read_bytes)
                            self.snapshot = await decode_keyframe(data, self.source, wait)
                            self.snapshot_wall = st.st_mtime
                            self._decoded = (st.st_mtime, st.st_ino)
                        return self.snapshot
                await trio.sleep(0.05)
        raise PipelineError(f"no frame from {self.source.display} within {wait:g}s")

    async def wait_snapshot(self, wait: float) -> bytes | None:
        """The rolling snapshot, or the next one within ``wait`` s."""
        if self.snapshot is not None:
            return self.snapshot
        with trio.move_on_after(wait):
            await self.snapshot_event.wait()
        return self.snapshot

    def status(self) -> dict[str, Any]:
        h = self.health
        age = h.frame_age()
        return {
            "camera": self.name,
            "state": h.state,
            "streaming": self.streaming,
            "recording": self.recording,
            "source": self.source.display,
            "fps": h.fps,
            "bitrate_kbps": h.bitrate_kbps,
            "frame_age_s": None if age is None else round(age, 3),
            "restarts": h.restarts,
            "last_error": h.last_error,
            "viewers": len(self.hub.viewers),
            "snapshot_at": self.snapshot_wall,
        }


async def grab_frame(source: StreamSource, wait: float = 5.0) -> bytes:
    """One JPEG straight from the source (a camera whose pipeline is not running): ffmpeg
    opens the input, decodes the first keyframe and exits."""
    opts = {**QUICK_OPEN, "skip_frame": "nokey", "threads": "1", **dict(source.options)}
    return await _to_jpeg(source.url, opts, source, wait)


async def decode_keyframe(data: bytes, source: StreamSource, wait: float = 5.0) -> bytes:
    """A JPEG of one keyframe as the camera sent it (``KEYFRAME_FILE``: raw H.264/H.265 with
    its parameter sets, or a JPEG), piped to a short-lived ffmpeg."""
    return await _to_jpeg("pipe:0", {"threads": "1"}, source, wait, stdin=data)


async def _to_jpeg(url: str, in_opts: dict[str, Any], source: StreamSource, wait: float,
                   stdin: bytes | None = None) -> bytes:
    argv = (ffmpeg.input(url, **in_opts)
            .output("pipe:1", format="image2pipe", vframes=1, **{"c:v": "mjpeg", "q:v": 5})
            .compile(cmd=FFMPEG))
    argv = [argv[0], "-hide_banner", "-nostdin", "-loglevel", "error", *argv[1:]]
    with trio.move_on_after(wait) as scope:
        result = await trio.run_process(
            argv, capture_stdout=True, capture_stderr=True, check=False,
            stdin=subprocess.DEVNULL if stdin is None else stdin)
    if scope.cancelled_caught:
        raise PipelineError(f"no frame from {source.display} within {wait:g}s")
    if result.returncode != 0 or not result.stdout.startswith(b"\xff\xd8"):
        lines = result.stderr.decode("utf-8", "replace").splitlines()
        raise PipelineError(f"snapshot from {source.display} failed: "
                            f"{explain(lines, source) or result.returncode}")
    return bytes(result.stdout)


async def run_pusher(name: str, argv: tuple[str, ...]) -> None:
    """A simulated camera's testsrc pusher: raises when it ends (its supervisor restarts it)."""
    err_r, err_w = os.pipe()
    try:
        child = Child(list(argv), stderr=err_w)
    finally:
        os.close(err_w)
    tail: deque[str] = deque(maxlen=3)
    try:
        async with trio.lowlevel.FdStream(err_r) as err:
            async for chunk in err:
                tail.extend(chunk.decode("utf-8", "replace").strip().splitlines())
        code = await child.wait()
    finally:
        with trio.move_on_after(3) as cleanup:
            cleanup.shield = True
            await child.stop()
        child.close()
    raise PipelineError(f"camera {name}: test-pattern pusher ended ({code}): "
                        f"{(tail[-1] if tail else 'no output')[:200]}")


__all__ = ["CameraPipeline", "PipelineError", "StreamHealth", "VideoOptions", "build_command",
           "decode_keyframe", "explain", "grab_frame", "run_pusher"]
