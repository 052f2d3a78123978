"""Where a camera's video comes from: one resolver per camera binding, in :data:`SOURCES`.

A camera Device names one protocol in ``spec.binding`` (``rtsp``, ``rtmp``, ``srt``, ``hls``,
``sim``; ``onvif`` and ``gb28181`` plug in the same way). Its resolver turns the Device
document (and the secrets it references) into a :class:`StreamSource`: what the camera's one
ffmpeg process reads (``twin/video/pipeline.py``). Everything after the input (HLS, snapshots,
HTTP-FLV, recording) is the same for every source.

A resolver is any object with ``async resolve(device, secrets) -> StreamSource``. One that can
move its camera also has ``async ptz(device, action, args) -> dict`` (:class:`PtzResolver`);
the camera command ``ptz`` is dispatched to it, and refused with "camera has no PTZ" for
resolvers without it.

To add a source (ONVIF, GB28181)::

    from twin.video.sources import SOURCES, StreamSource

    class OnvifSource:
        async def resolve(self, device, secrets): ...   # -> StreamSource
        async def ptz(self, device, action, args): ...  # optional

    SOURCES["onvif"] = OnvifSource()

and import the module in the camera binding (``twin/bindings/video.py``), which is registered
for every name in :data:`CAMERA_PROTOCOLS`: this module never imports a source module back.
"""

from __future__ import annotations

import shlex
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable
from urllib.parse import quote, urlsplit, urlunsplit

from twin.errors import BindingError, CommandError

CAMERA_PROTOCOLS: tuple[str, ...] = ("rtsp", "rtmp", "srt", "hls", "onvif", "gb28181")
"""Binding keys that make a Device a camera (``sim`` is a camera when it has ``video:``)."""


@dataclass(frozen=True)
class StreamSource:
    """What one camera's ffmpeg reads."""

    url: str
    """ffmpeg input URL, credentials included (never logged: see ``display``)."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """ffmpeg input options, as ffmpeg-python ``ffmpeg.input(url, **options)`` takes them
    (``{"rtsp_transport": "tcp"}`` → ``-rtsp_transport tcp``)."""
    snapshot_url: str | None = None
    """The camera's own JPEG snapshot URL (ONVIF ``GetSnapshotUri``), if it has one."""
    display: str = ""
    """The URL without credentials, for logs, status and errors."""
    listener: bool = False
    """The URL is a listener the camera pushes to (RTMP/SRT push): ffmpeg waits for it."""
    pusher: tuple[str, ...] = ()
    """argv of a process feeding ``url`` (the ``sim`` source's ffmpeg testsrc); run and
    restarted alongside the camera's pipeline."""

    def __post_init__(self) -> None:
        if not self.display:
            object.__setattr__(self, "display", redact(self.url))


class SecretLookup(Protocol):
    """What resolvers get for ``{secret: NAME}``: :class:`twin.spec.secrets.Secrets` fits."""

    def get(self, ref: str) -> str | None: ...


class SourceResolver(Protocol):
    async def resolve(self, device: Mapping[str, Any], secrets: SecretLookup) -> StreamSource: ...


@runtime_checkable
class PtzResolver(Protocol):
    """A resolver whose cameras move: ``action`` is ``move`` (continuous, ``{pan, tilt, zoom}``
    in -1..1), ``stop``, ``goto_preset`` / ``set_preset`` (``{preset}``); returns a result
    for the command ledger."""

    async def resolve(self, device: Mapping[str, Any], secrets: SecretLookup) -> StreamSource: ...

    async def ptz(
        self, device: Mapping[str, Any], action: str, args: Mapping[str, Any]
    ) -> dict[str, Any]: ...


SOURCES: dict[str, SourceResolver] = {}
"""Binding protocol name -> its resolver."""


def register_source(name: str, resolver: SourceResolver) -> None:
    SOURCES[name] = resolver


# -- helpers resolvers share ------------------------------------------------------------------
def device_name(device: Mapping[str, Any]) -> str:
    return str((device.get("metadata") or {}).get("name", "?"))


def binding_options(device: Mapping[str, Any], protocol: str) -> Mapping[str, Any]:
    binding = (device.get("spec") or {}).get("binding") or {}
    options = binding.get(protocol)
    if not isinstance(options, Mapping):
        raise BindingError(f"camera {device_name(device)!r}: spec.binding.{protocol} is missing")
    return options


def secret_value(value: Any, secrets: SecretLookup, what: str) -> str | None:
    """A plain string, or the value of a ``{secret: NAME}`` reference (BindingError if unset)."""
    if value is None:
        return None
    if isinstance(value, Mapping) and set(value) == {"secret"}:
        ref = str(value["secret"])
        got = secrets.get(ref)
        if got is None:
            raise BindingError(f"{what}: secret {ref!r} is not set",
                               hint="export TWIN_SECRET_<NAME>=... or add it to the secrets file")
        return got
    return str(value)


def with_credentials(url: str, username: str | None, password: str | None) -> str:
    """``url`` with ``user:password@`` (percent-encoded) unless it already carries some."""
    if not username:
        return url
    parts = urlsplit(url)
    if "@" in parts.netloc:
        return url
    auth = quote(username, safe="")
    if password is not None:
        auth += ":" + quote(password, safe="")
    return urlunsplit(parts._replace(netloc=f"{auth}@{parts.netloc}"))


def redact(url: str) -> str:
    """The URL with its password (and any ``passphrase=`` query) replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<bad url>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo else f"{user}@{host}"
    query = "&".join(
        (p.split("=", 1)[0] + "=***") if p.lower().startswith("passphrase=") else p
        for p in parts.query.split("&")
    ) if parts.query else ""
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def free_udp_port() -> int:
    """A loopback UDP port nobody uses now (a simulated camera's pusher → pipeline hop)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the built-in sources -------------------------------------------------------------------
class RtspSource:
    """``rtsp: {url, transport: tcp|udp, username, password: {secret}, timeout}``"""

    async def resolve(self, device: Mapping[str, Any], secrets: SecretLookup) -> StreamSource:
        name = device_name(device)
        o = binding_options(device, "rtsp")
        url = str(o["url"])
        user = secret_value(o.get("username"), secrets, f"camera {name!r}: username")
        password = secret_value(o.get("password"), secrets, f"camera {name!r}: password")
        options: dict[str, Any] = {"rtsp_transport": str(o.get("transport", "tcp"))}
        # socket I/O timeout (µs): a camera that stops answering ends ffmpeg, not hangs it
        options["timeout"] = str(int(float(o.get("timeout_s", 5)) * 1_000_000))
        return StreamSource(with_credentials(url, user, password), options,
                            snapshot_url=o.get("snapshot_url"), display=redact(url))


class RtmpSource:
    """``rtmp: {url}`` pulls; ``rtmp: {listen: 1935, path: live/cam1}`` waits for a push."""

    async def resolve(self, device: Mapping[str, Any], secrets: SecretLookup) -> StreamSource:
        o = binding_options(device, "rtmp")
        if "listen" in o:
            host = str(o.get("host", "127.0.0.1"))
            path = str(o.get("path", "live/" + device_name(device)))
            url = f"rtmp://{host}:{int(o['listen'])}/{path}"
            return StreamSource(url, {"listen": "1", "timeout": "-1"}, listener=True)
        return StreamSource(str(o["url"]), {"rw_timeout": "5000000"})


class SrtSource:
    """``srt: {url}`` pulls (caller); ``srt: {listen: 9000}`` waits for a push (listener);
    ``passphrase: {secret}`` optional."""

    async def resolve(self, device: Mapping[str, Any], secrets: SecretLookup) -> StreamSource:
        name = device_name(device)
        o = binding_options(device, "srt")
        passphrase = secret_value(o.get("passphrase"), secrets, f"camera {name!r}: passphrase")
        if "listen" in o:
            host = str(o.get("host", "127.0.0.1"))
            url = f"srt://{host}:{int(o['listen'])}?mode=listener"
            listener = True
        else:
            url = str(o["url"])
            listener = False
        if passphrase:
            url += ("&" if "?" in url else "?") + "passphrase=" + quote(passphrase, safe="")
        # SRT timeouts are in µs; the listener waits for its pusher as long as it takes
        options = {} if listener else {"rw_timeout": "5000000"}
        return StreamSource(url, options, listener=listener)


class HlsSource:
    """``hls: {url}`` pulls an HLS playlist."""

    async def resolve(self, device: Mapping[str, Any], secrets: SecretLookup) -> StreamSource:
        o = binding_options(device, "hls")
        return StreamSource(str(o["url"]), {"rw_timeout": "10000000"})


class SimSource:
    """A simulated camera (``sim: {video: {pattern, size, fps, bitrate}}``): an ffmpeg testsrc
    pusher encodes H.264 into MPEG-TS over loopback UDP; the camera's pipeline reads it like any
    network camera. UDP keeps the two independent: either restarts without the other."""

    async def resolve(self, device: Mapping[str, Any], secrets: SecretLookup) -> StreamSource:
        name = device_name(device)
        video = binding_options(device, "sim").get("video") or {}
        if not isinstance(video, Mapping):
            video = {}
        port = int(video.get("port") or free_udp_port())
        size = str(video.get("size", "640x360"))
        fps = int(video.get("fps", 15))
        bitrate = str(video.get("bitrate", "500k"))
        pattern = str(video.get("pattern", "testsrc2"))
        gop = int(video.get("gop", fps))  # one keyframe a second: short HLS segments
        label = name.replace(":", " ").replace("'", "")
        text = (f"drawtext=text='{label} %{{localtime}}':x=10:y=10:fontsize=20:"
                "fontcolor=white:box=1:boxcolor=black@0.5")
        out = f"udp://127.0.0.1:{port}?pkt_size=1316"
        if video.get("file"):  # a recorded H.264 stream, looped as is (no encoding: cheap)
            pusher: tuple[str, ...] = (
                "ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-re",
                "-stream_loop", "-1", "-i", str(video["file"]), "-map", "0:v:0", "-map", "0:a:0?",
                "-c", "copy",
                "-f", "mpegts", out)
            display = f"sim:{name} (file {video['file']})"
            url = f"udp://127.0.0.1:{port}?overrun_nonfatal=1&fifo_size=50000"
            return StreamSource(url, {"analyzeduration": "500000", "probesize": "500000"},
                                display=display, listener=True, pusher=pusher)
        pusher = (
            "ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-re",
            "-f", "lavfi", "-i", f"{pattern}=size={size}:rate={fps}",
            "-vf", text,
            "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency",
            "-pix_fmt", "yuv420p", "-g", str(gop), "-keyint_min", str(gop), "-sc_threshold", "0",
            "-b:v", bitrate, "-maxrate", bitrate, "-bufsize", bitrate,
            "-f", "mpegts", out,
        )
        url = f"udp://127.0.0.1:{port}?overrun_nonfatal=1&fifo_size=50000"
        # the pusher sends a keyframe a second: a second of probing finds the stream
        probe = {"analyzeduration": "500000", "probesize": "500000"}
        return StreamSource(url, probe, display=f"sim:{name} ({shlex.quote(pattern)} {size}@{fps})",
                            listener=True, pusher=pusher)


class SimPtz:
    """The simulated camera's PTZ head: it keeps a position (pan/tilt in degrees, zoom 1-20)
    and presets; ``move`` adds to the position, ``goto`` sets it."""

    def __init__(self) -> None:
        self.position: dict[str, dict[str, float]] = {}
        self.presets: dict[tuple[str, str], dict[str, float]] = {}

    async def ptz(self, device: Mapping[str, Any], action: str,
                  args: Mapping[str, Any]) -> dict[str, Any]:
        name = device_name(device)
        pos = self.position.setdefault(name, {"pan": 0.0, "tilt": 0.0, "zoom": 1.0})
        axes = {k: float(args[k]) for k in ("pan", "tilt", "zoom")
                if isinstance(args.get(k), int | float)}
        if action == "move":
            for k, v in axes.items():
                pos[k] += v
        elif action == "goto":
            pos.update(axes)
        elif action == "set_preset":
            self.presets[(name, str(args.get("preset")))] = dict(pos)
        elif action == "goto_preset":
            preset = self.presets.get((name, str(args.get("preset"))))
            if preset is None:
                raise CommandError(f"camera {name!r}: no preset {args.get('preset')!r}")
            pos.update(preset)
        elif action != "stop":
            raise CommandError(f"camera {name!r}: unknown ptz action {action!r}",
                               hint="move, stop, goto, goto_preset, set_preset")
        pos["pan"] = (pos["pan"] + 180.0) % 360.0 - 180.0
        pos["tilt"] = min(90.0, max(-90.0, pos["tilt"]))
        pos["zoom"] = min(20.0, max(1.0, pos["zoom"]))
        return {"ok": True, "action": action, **{k: round(v, 3) for k, v in pos.items()}}


class SimCameraSource(SimSource, SimPtz):
    def __init__(self) -> None:
        SimPtz.__init__(self)


register_source("rtsp", RtspSource())
register_source("rtmp", RtmpSource())
register_source("srt", SrtSource())
register_source("hls", HlsSource())
register_source("sim", SimCameraSource())

async def resolve_source(device: Mapping[str, Any], protocol: str,
                         secrets: SecretLookup) -> StreamSource:
    resolver = SOURCES.get(protocol)
    if resolver is None:
        raise BindingError(f"camera {device_name(device)!r}: no video source {protocol!r}",
                           hint=f"available: {', '.join(sorted(SOURCES))}")
    return await resolver.resolve(device, secrets)


async def ptz(device: Mapping[str, Any], protocol: str, action: str,
              args: Mapping[str, Any]) -> dict[str, Any]:
    """Dispatch a ``ptz`` command to the camera's resolver (CommandError "camera has no PTZ")."""
    resolver = SOURCES.get(protocol)
    if not isinstance(resolver, PtzResolver):
        raise CommandError(f"camera {device_name(device)!r}: camera has no PTZ "
                           f"({protocol} source)")
    return await resolver.ptz(device, action, args)


__all__ = [
    "CAMERA_PROTOCOLS",
    "SOURCES",
    "PtzResolver",
    "SecretLookup",
    "SourceResolver",
    "StreamSource",
    "binding_options",
    "device_name",
    "ptz",
    "redact",
    "register_source",
    "resolve_source",
    "secret_value",
    "with_credentials",
]
