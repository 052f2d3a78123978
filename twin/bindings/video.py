"""Camera bindings: ``rtsp``, ``rtmp``, ``srt``, ``hls`` (and ``onvif`` / ``gb28181`` once
their sources are registered), and ``sim`` with a ``video:`` block (a simulated camera).

```yaml
spec:
  type: camera
  model: ip-camera
  binding:
    rtsp:
      url: rtsp://10.0.0.21:554/stream1
      transport: tcp                    # or udp
      username: admin
      password: {secret: plant-a/cam-gate}
      record: {enabled: true, segment: 10s, pre_roll: 5s, retention: {days: 7, size_gb: 20}}
      substream: {scale: 640x360, bitrate: 500k}   # optional H.264 rendition (transcoded)
      stall_timeout: 10s
```
The binding resolves the camera's input (``twin/video/sources.py``), runs its one ffmpeg
(``twin/video/pipeline.py``) under the engine's supervisor, and reports stream health as
telemetry every ``health_interval``: ``fps``, ``bitrate`` (kbit/s), ``frame_age`` (s),
``restarts``, ``viewers``, ``streaming``, ``recording``. A camera whose stream goes dark (ffmpeg
cannot open it, it stalls, it sends garbage) reports a fault with the reason (``camera dark:
…``): status ``fault`` and an alarm, like any device, cleared when frames flow again.

Commands (through the command ledger): ``start_stream``, ``stop_stream``, ``take_snapshot``
(result: the saved image's reference), ``start_recording``, ``stop_recording`` (ffmpeg runs on:
recording keeps the spool's segments, ``twin/video/spool.py``), ``ptz`` (dispatched to the
source; "camera has no PTZ" otherwise).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from functools import partial
from typing import Any

import trio

from twin.bindings.base import (
    BindingContext,
    DeviceEvent,
    EventType,
    Message,
    Quality,
    Reading,
)
from twin.bindings.registry import register_binding
from twin.bindings.sim import SimBinding, register_sim_variant
from twin.bindings.values import check_reading
from twin.errors import BindingError, CommandError, RegistryError, StorageError
from twin.video import onvif as _onvif  # noqa: F401  (registers the onvif source)
from twin.video import recordings, snapshots, sources
from twin.video.gb28181 import source as _gb28181  # noqa: F401  (registers the gb28181 source)
from twin.video.pipeline import CameraPipeline, VideoOptions, run_pusher
from twin.video.service import VideoService

log = logging.getLogger(__name__)

RETENTION_EVERY = 60.0
"""Seconds between two retention passes over a camera's recordings."""


class CameraBinding:
    def __init__(self, device: str, protocol: str, options: Mapping[str, Any],
                 doc: Mapping[str, Any], context: BindingContext) -> None:
        self.device = device
        self.protocol = protocol
        self.options = options
        self.doc = doc
        self.site = str((doc.get("metadata") or {}).get("site") or "")
        self.context = context
        self.opts = VideoOptions.parse(options)
        self.pipeline: CameraPipeline | None = None
        self._send: trio.MemorySendChannel[Message] | None = None
        self._dark = False
        self.extra: dict[str, Any] = {}  # reported properties the camera only echoes
        self._streaming = True
        self._recording: bool | None = None  # None: as the YAML says (record.enabled)
        # a simulated camera may simulate data points too (motion, ...): twin/bindings/sim.py
        self.points: Any = None
        if protocol == "sim" and options.get("points"):
            self.points = SimBinding(device, {k: options[k] for k in ("interval", "seed",
                                                                     "points") if k in options},
                                     context)

    @property
    def video(self) -> VideoService:
        video = self.context.video
        if video is None:
            raise BindingError(f"camera {self.device}: the video service is not running")
        assert isinstance(video, VideoService)
        return video

    async def connect(self) -> None:
        video = self.video
        if self.points is not None:
            await self.points.connect()
        source = await sources.resolve_source(self.doc, self.protocol, video.secrets)
        if self.pipeline is None:  # what the operator commanded last outlives a restart
            await self._resume_commands()
        if self.pipeline is None or self.pipeline.source != source:
            recording = self.pipeline.recording if self.pipeline else self._recording
            self.pipeline = CameraPipeline(self.device, source, self.opts,
                                           video.camera_dir(self.device), site=self.site,
                                           streaming=self._streaming)
            if recording is not None:
                self.pipeline.set_recording(recording)
        video.cameras[self.device] = self.pipeline

    async def _resume_commands(self) -> None:
        """The newest successful start/stop_recording and start/stop_stream commands in the
        ledger win over the YAML's defaults: an engine restart (or a rebuilt binding) resumes
        a command-started recording and keeps a stopped stream stopped."""
        last = self.context.last_command
        if last is None:
            return
        try:
            rec = await last(self.device, ("start_recording", "stop_recording"))
            stream = await last(self.device, ("start_stream", "stop_stream"))
        except (RegistryError, StorageError, OSError) as exc:  # start as declared
            log.warning("camera %s (site %s): the command ledger could not be read (%s): "
                        "recording and streaming as declared", self.device, self.site, exc)
            return
        if rec is not None:
            self._recording = rec == "start_recording"
        if stream is not None:
            self._streaming = stream == "start_stream"

    # -- readings -----------------------------------------------------------------------
    def _readings(self) -> list[Reading]:
        p = self.pipeline
        if p is None:
            return []
        h = p.health
        ts = time.time()
        values: dict[str, Any] = {
            "fps": h.fps if p.streaming else 0.0,
            "bitrate": h.bitrate_kbps if p.streaming else 0.0,
            "restarts": h.restarts,
            "viewers": len(p.hub.viewers),
            "streaming": p.streaming,
            "recording": p.recording,
        }
        age = h.frame_age()
        if age is not None:
            values["frame_age"] = round(age, 3)
        values.update(self.extra)
        out = []
        for point, value in values.items():
            name, checked, _ = check_reading(point, value)
            out.append(Reading(self.device, name, checked, ts, Quality.GOOD if (
                p.health.state == "live" or not p.streaming) else Quality.UNCERTAIN))
        return out

    async def read(self, points: list[str] | None = None) -> list[Reading]:
        await trio.lowlevel.checkpoint()
        return [r for r in self._readings() if points is None or r.point in points]

    async def _report(self) -> None:
        send = self._send
        if send is None:
            return
        p = self.pipeline
        assert p is not None
        h = p.health
        starting_too_long = (h.state == "starting" and h.runs > 0 and not p.source.listener
                             and trio.current_time() - h.started_at > self.opts.first_frame_timeout)
        # dark from the first failure until frames flow again (a restart in between is not
        # a recovery)
        dark = p.streaming and (h.state == "dark" or starting_too_long
                                or (self._dark and h.state == "starting"))
        if dark and not self._dark:
            reason = h.last_error or f"no video from {p.source.display}"
            await send.send(DeviceEvent(self.device, EventType.FAULT, time.time(),
                                        {"message": f"camera dark: {reason}"}))
        elif self._dark and not dark and (h.state == "live" or not p.streaming):
            await send.send(DeviceEvent(self.device, EventType.OK, time.time()))
        self._dark = dark
        for reading in self._readings():
            await send.send(reading)

    async def subscribe(self, send: trio.MemorySendChannel[Message]) -> None:
        p = self.pipeline
        if p is None:
            raise BindingError(f"camera {self.device}: not connected")
        video = self.video
        self._send = send
        try:
            async with trio.open_nursery() as nursery:
                if p.source.pusher:
                    nursery.start_soon(partial(
                        video.supervise, partial(run_pusher, self.device, p.source.pusher),
                        kind="camera_pusher", name=self.device, site=self.site))
                nursery.start_soon(partial(
                    video.supervise, p.run, kind="camera", name=self.device, site=self.site))
                nursery.start_soon(self._retention)
                if self.points is not None:
                    nursery.start_soon(self.points.subscribe, send)
                while True:
                    await self._report()
                    await trio.sleep(self.opts.health_interval)
        finally:
            self._send = None

    async def _retention(self) -> None:
        days, size = self.opts.retention_days, self.opts.retention_bytes
        if days is None and size is None:
            return
        rec = self.video.camera_dir(self.device) / "rec"
        while True:
            try:
                removed = await trio.to_thread.run_sync(
                    partial(recordings.enforce, rec, days=days, max_bytes=size))
            except OSError as exc:
                log.warning("camera %s (site %s): retention failed: %s", self.device, self.site,
                            exc)
            else:
                if removed:
                    log.info("camera %s (site %s): retention removed %d segment(s)",
                             self.device, self.site, len(removed))
            await trio.sleep(RETENTION_EVERY)

    # -- writes and commands ------------------------------------------------------------
    async def write(self, point: str, value: Any) -> None:
        await trio.lowlevel.checkpoint()
        p = self.pipeline
        if point == "streaming":
            self._streaming = bool(value)
            if p is not None:
                p.set_streaming(bool(value))
        elif point == "recording":
            if p is not None:
                p.set_recording(bool(value))
        else:
            self.extra[point] = value  # e.g. resolution: echoed (the stream is copied as is)
        await self._report()

    async def send_command(self, name: str, params: Mapping[str, Any]) -> Any:
        p = self.pipeline
        if p is None:
            raise CommandError(f"camera {self.device}: not connected")
        if name in ("start_stream", "stop_stream"):
            await self.write("streaming", name == "start_stream")
            return {"streaming": p.streaming}
        if name in ("start_recording", "stop_recording"):
            p.set_recording(name == "start_recording")
            await self._report()
            return {"recording": p.recording}
        if name == "take_snapshot":
            return await self.take_snapshot(float(params.get("wait", 5)))
        if name == "ptz":
            action = str(params.get("action", "move"))
            args = {k: v for k, v in params.items() if k != "action"}
            try:
                result = await sources.ptz(self.doc, self.protocol, action, args)
            except BindingError as exc:
                raise CommandError(str(exc)) from exc
            for key in ("pan", "tilt", "zoom", "preset"):
                if key in result and isinstance(result[key], int | float | str):
                    self.extra[key] = result[key]
            await self._report()
            return result
        raise CommandError(f"camera {self.device}: unknown command {name!r}",
                           hint="start_stream, stop_stream, take_snapshot, start_recording, "
                                "stop_recording, ptz")

    async def take_snapshot(self, wait: float = 5.0) -> dict[str, Any]:
        """Save a picture (``twin/video/snapshots.py``: the rolling keyframe, the camera's
        snapshot URL, the warm snapshot session or a one-shot grab) and return its reference:
        ``{image, url, bytes, ts, source}``."""
        p = self.pipeline
        assert p is not None
        try:
            shot = await snapshots.take(p, wait)
        except BindingError as exc:
            raise CommandError(f"camera {self.device}: {exc}") from exc
        image, ts, origin = shot.image, shot.ts, shot.source
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(ts)) + f"{ts % 1:.3f}"[1:] + "Z"
        name = f"{stamp}.jpg"
        folder = p.out_dir / "snapshots"
        data = image

        def save() -> None:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / (name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(folder / name)

        await trio.to_thread.run_sync(save)
        return {"image": f"snapshots/{name}",
                "url": f"/api/v1/video/cameras/{self.device}/snapshots/{name}",
                "bytes": len(image), "ts": ts, "source": origin}

    async def close(self) -> None:
        await trio.lowlevel.checkpoint()
        video = self.context.video
        if isinstance(video, VideoService) and video.cameras.get(self.device) is self.pipeline:
            del video.cameras[self.device]


def _factory(protocol: str) -> Any:
    def make(device: str, options: Mapping[str, Any], doc: Mapping[str, Any],
             context: BindingContext) -> CameraBinding:
        return CameraBinding(device, protocol, options, doc, context)

    return make


def camera_binding(device: str, options: Mapping[str, Any], doc: Mapping[str, Any],
                   context: BindingContext) -> CameraBinding:
    """A simulated camera (``sim: {video: ...}``; the sim binding hands over to this)."""
    return CameraBinding(device, "sim", options, doc, context)


for _protocol in sources.CAMERA_PROTOCOLS:
    register_binding(_protocol, _factory(_protocol))
register_sim_variant("video", camera_binding)
