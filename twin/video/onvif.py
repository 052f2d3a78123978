"""ONVIF cameras: a SOAP client (zeep, against the ONVIF WSDLs) and the ``onvif`` video source.

A Device with ``spec.binding.onvif: {host, port, username, password: {secret}, profile}`` is a
camera whose stream and snapshot URIs are asked from the camera itself (device service
``GetCapabilities`` → media service ``GetProfiles``, ``GetStreamUri``, ``GetSnapshotUri``).
The PTZ service moves it (``ContinuousMove``, ``Stop``, ``GotoPreset``, ``SetPreset``,
``GetPresets``) and the event service's PullPoint delivers its events.

Authentication: every request carries a WS-Security UsernameToken with a password digest
(``Base64(SHA1(nonce + created + password))``); a camera that wants HTTP digest instead gets it
on its ``401`` challenge (``requests``' ``HTTPDigestAuth`` answers only challenges).

zeep is synchronous (``requests``): each call runs in a worker thread, bounded by the binding's
``timeout_s``. The WSDLs (shipped by ``onvif-zeep-async``; we use only its files) are parsed
once per process and shared by every camera.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import trio

from twin.errors import (
    BindingConnectError,
    BindingError,
    BindingTimeout,
    CommandError,
    TwinError,
)
from twin.video.sources import (
    SecretLookup,
    StreamSource,
    binding_options,
    device_name,
    redact,
    register_source,
    secret_value,
    with_credentials,
)

log = logging.getLogger(__name__)

NS = {
    "device": "http://www.onvif.org/ver10/device/wsdl",
    "media": "http://www.onvif.org/ver10/media/wsdl",
    "ptz": "http://www.onvif.org/ver20/ptz/wsdl",
    "events": "http://www.onvif.org/ver10/events/wsdl",
}
_SERVICES: dict[str, tuple[str, str]] = {
    # kind -> (wsdl file, binding name)
    "device": ("devicemgmt.wsdl", f"{{{NS['device']}}}DeviceBinding"),
    "media": ("media.wsdl", f"{{{NS['media']}}}MediaBinding"),
    "ptz": ("ptz.wsdl", f"{{{NS['ptz']}}}PTZBinding"),
    "events": ("events.wsdl", f"{{{NS['events']}}}EventBinding"),
    "pullpoint": ("events.wsdl", f"{{{NS['events']}}}PullPointSubscriptionBinding"),
}

_documents: dict[str, Any] = {}
_documents_lock = threading.Lock()


def wsdl_dir() -> str:
    """The ONVIF WSDL/XSD files (from the ``onvif-zeep-async`` package)."""
    import onvif  # onvif-zeep-async: only its WSDL files are used

    return os.path.join(os.path.dirname(onvif.__file__), "wsdl")


def _document(filename: str) -> Any:
    """The parsed WSDL ``filename`` (parsed once per process: ~1 s each)."""
    from zeep.settings import Settings
    from zeep.transports import Transport
    from zeep.wsdl import Document

    with _documents_lock:
        doc = _documents.get(filename)
        if doc is None:
            settings = Settings(strict=False, xml_huge_tree=False)
            doc = Document(os.path.join(wsdl_dir(), filename), Transport(),  # type: ignore[arg-type]
                           settings=settings)
            _documents[filename] = doc
        return doc


class OnvifError(BindingError):
    """The camera refused or failed an ONVIF call (a SOAP fault, HTTP error, bad reply)."""


class OnvifAuthError(OnvifError):
    """The camera refused our credentials."""

    temporary = False


@dataclass
class OnvifCamera:
    """A blocking ONVIF client of one camera (call its methods from a worker thread, or use the
    ``async`` wrappers of :class:`OnvifClient`)."""

    host: str
    port: int = 80
    username: str | None = None
    password: str | None = None
    timeout: float = 5.0
    path: str = "/onvif/device_service"
    _services: dict[str, Any] = field(default_factory=dict, repr=False)
    _xaddrs: dict[str, str] = field(default_factory=dict, repr=False)
    _client: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def device_xaddr(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"

    def _zeep_client(self, filename: str) -> Any:
        client = self._client.get(filename)
        if client is None:
            import requests
            from requests.auth import HTTPDigestAuth
            from zeep import Client
            from zeep.settings import Settings
            from zeep.transports import Transport
            from zeep.wsse.username import UsernameToken

            session = requests.Session()
            session.trust_env = False  # never a proxy from the environment for a LAN camera
            wsse = None
            if self.username:
                session.auth = HTTPDigestAuth(self.username, self.password or "")
                wsse = _camera_clock_token(UsernameToken)(self.username, self.password or "",
                                                          use_digest=True)
                wsse.camera = self
            transport = Transport(session=session, timeout=self.timeout,
                                  operation_timeout=self.timeout)
            client = Client(_document(filename), wsse=wsse, transport=transport,
                            settings=Settings(strict=False, xml_huge_tree=False))
            self._client[filename] = client
        return client

    def service(self, kind: str, xaddr: str | None = None) -> Any:
        key = kind if xaddr is None else f"{kind} {xaddr}"
        svc = self._services.get(key)
        if svc is None:
            filename, binding = _SERVICES[kind]
            address = xaddr or self.xaddr(kind)
            svc = self._zeep_client(filename).create_service(binding, address)
            self._services[key] = svc
        return svc

    def xaddr(self, kind: str) -> str:
        if kind == "device":
            return self.device_xaddr
        if not self._xaddrs:
            self._load_capabilities()
        addr = self._xaddrs.get(kind)
        if not addr:
            raise OnvifError(f"ONVIF camera {self.host}:{self.port} has no {kind} service")
        return addr

    def _load_capabilities(self) -> None:
        caps = self.call("device", "GetCapabilities", Category="All")
        for kind, attr in (("media", "Media"), ("ptz", "PTZ"), ("events", "Events")):
            section = getattr(caps, attr, None)
            addr = getattr(section, "XAddr", None) if section is not None else None
            if addr:
                self._xaddrs[kind] = str(addr)

    clock_offset: float | None = None
    """Camera clock minus ours (s), from ``GetSystemDateAndTime``: WS-Security ``Created``
    times are stamped in the camera's clock (cameras refuse tokens off by minutes)."""

    def sync_clock(self) -> float:
        if self.clock_offset is None:
            self.clock_offset = 0.0  # also if the camera will not say: try our own clock
            try:
                got = self.call("device", "GetSystemDateAndTime")
                utc = got.UTCDateTime
                camera = datetime.datetime(int(utc.Date.Year), int(utc.Date.Month),
                                           int(utc.Date.Day), int(utc.Time.Hour),
                                           int(utc.Time.Minute), int(utc.Time.Second),
                                           tzinfo=datetime.UTC).timestamp()
                self.clock_offset = camera - time.time()
            except (TwinError, AttributeError, TypeError, ValueError) as exc:
                log.info("ONVIF %s:%d: no camera time (%s): using ours", self.host, self.port,
                         exc)
        return self.clock_offset

    def call(self, kind: str, operation: str, _xaddr: str | None = None, **kwargs: Any) -> Any:
        """One SOAP call; library errors mapped to :class:`OnvifError` at this boundary."""
        import requests
        import zeep.exceptions

        if self.clock_offset is None and self.username and operation != "GetSystemDateAndTime":
            self.sync_clock()
        try:
            return getattr(self.service(kind, _xaddr), operation)(**kwargs)
        except zeep.exceptions.Fault as exc:
            text = f"{exc.message or ''} {exc.code or ''} {exc.subcodes or ''}"
            if any(w in text.lower() for w in ("notauthorized", "not authorized",
                                               "failedauthentication")):
                raise OnvifAuthError(f"ONVIF {self.host}:{self.port} {operation}: not authorized "
                                     f"({exc.message})",
                                     hint="check the camera's username and password") from exc
            raise OnvifError(f"ONVIF {self.host}:{self.port} {operation}: {exc.message}") from exc
        except zeep.exceptions.TransportError as exc:
            if exc.status_code in (401, 403):
                raise OnvifAuthError(
                    f"ONVIF {self.host}:{self.port} {operation}: HTTP {exc.status_code}",
                    hint="check the camera's username and password") from exc
            raise OnvifError(f"ONVIF {self.host}:{self.port} {operation}: HTTP {exc.status_code}"
                             ) from exc
        except requests.Timeout as exc:
            raise BindingTimeout(f"ONVIF {self.host}:{self.port} {operation}: no answer in "
                                 f"{self.timeout:g} s") from exc
        except requests.ConnectionError as exc:
            raise BindingConnectError(f"ONVIF {self.host}:{self.port} {operation}: "
                                      "camera unreachable") from exc
        except requests.RequestException as exc:
            raise OnvifError(f"ONVIF {self.host}:{self.port} {operation}: {exc}") from exc
        except (zeep.exceptions.Error, ValueError, AttributeError) as exc:
            raise OnvifError(f"ONVIF {self.host}:{self.port} {operation}: bad reply ({exc})"
                             ) from exc

    # -- device + media ---------------------------------------------------------------------
    def device_information(self) -> dict[str, str]:
        info = self.call("device", "GetDeviceInformation")
        return {k: str(getattr(info, k, "") or "") for k in
                ("Manufacturer", "Model", "FirmwareVersion", "SerialNumber", "HardwareId")}

    def profiles(self) -> list[dict[str, Any]]:
        out = []
        for p in self.call("media", "GetProfiles") or []:
            enc = getattr(p, "VideoEncoderConfiguration", None)
            res = getattr(enc, "Resolution", None) if enc is not None else None
            out.append({
                "token": str(p.token),
                "name": str(getattr(p, "Name", "") or p.token),
                "encoding": str(getattr(enc, "Encoding", "") or "") if enc is not None else "",
                "width": int(getattr(res, "Width", 0) or 0) if res is not None else 0,
                "height": int(getattr(res, "Height", 0) or 0) if res is not None else 0,
                "ptz": getattr(p, "PTZConfiguration", None) is not None,
            })
        return out

    def pick_profile(self, wanted: str | None) -> dict[str, Any]:
        profiles = self.profiles()
        if not profiles:
            raise OnvifError(f"ONVIF camera {self.host}:{self.port} has no media profile")
        if wanted is None:
            return profiles[0]
        for p in profiles:
            if wanted in (p["token"], p["name"]):
                return p
        raise OnvifError(f"ONVIF camera {self.host}:{self.port} has no profile {wanted!r}",
                         hint="profiles: " + ", ".join(p["token"] for p in profiles))

    def stream_uri(self, profile: str, protocol: str = "RTSP") -> str:
        setup = {"Stream": "RTP-Unicast", "Transport": {"Protocol": protocol}}
        got = self.call("media", "GetStreamUri", StreamSetup=setup, ProfileToken=profile)
        return str(got.Uri)

    def snapshot_uri(self, profile: str) -> str | None:
        try:
            got = self.call("media", "GetSnapshotUri", ProfileToken=profile)
        except OnvifAuthError:
            raise
        except OnvifError:
            return None  # optional: not every camera has one
        return str(got.Uri) if got is not None and getattr(got, "Uri", None) else None

    # -- PTZ ----------------------------------------------------------------------------------
    def continuous_move(self, profile: str, pan: float, tilt: float, zoom: float,
                        timeout_s: float | None = None) -> None:
        velocity: dict[str, Any] = {"PanTilt": {"x": pan, "y": tilt}, "Zoom": {"x": zoom}}
        kwargs: dict[str, Any] = {"ProfileToken": profile, "Velocity": velocity}
        if timeout_s is not None:
            kwargs["Timeout"] = f"PT{timeout_s:g}S"
        self.call("ptz", "ContinuousMove", **kwargs)

    def stop(self, profile: str) -> None:
        self.call("ptz", "Stop", ProfileToken=profile, PanTilt=True, Zoom=True)

    def goto_preset(self, profile: str, preset: str) -> None:
        self.call("ptz", "GotoPreset", ProfileToken=profile, PresetToken=preset)

    def set_preset(self, profile: str, name: str | None) -> str:
        kwargs: dict[str, Any] = {"ProfileToken": profile}
        if name:
            kwargs["PresetName"] = name
        return str(self.call("ptz", "SetPreset", **kwargs))

    def presets(self, profile: str) -> list[dict[str, str]]:
        return [{"token": str(p.token), "name": str(getattr(p, "Name", "") or "")}
                for p in (self.call("ptz", "GetPresets", ProfileToken=profile) or [])]

    # -- events (PullPoint) -------------------------------------------------------------------
    def create_pullpoint(self) -> str:
        got = self.call("events", "CreatePullPointSubscription",
                        InitialTerminationTime="PT600S")
        addr = got.SubscriptionReference.Address
        return str(getattr(addr, "_value_1", addr))

    def pull_messages(self, pullpoint: str, wait_s: float = 5.0,
                      limit: int = 32) -> list[dict[str, Any]]:
        got = self.call("pullpoint", "PullMessages", _xaddr=pullpoint,
                        Timeout=f"PT{wait_s:g}S", MessageLimit=limit)
        return [_notification(n) for n in (getattr(got, "NotificationMessage", None) or [])]

    def unsubscribe(self, pullpoint: str) -> None:
        self.call("pullpoint", "Unsubscribe", _xaddr=pullpoint)


_token_classes: dict[type, type] = {}


def _camera_clock_token(base: type) -> Any:
    """zeep's UsernameToken stamping ``Created`` in the camera's clock (see ``sync_clock``)."""
    cls = _token_classes.get(base)
    if cls is None:
        class CameraClockToken(base):
            camera: OnvifCamera | None = None

            def _create_password_digest(self) -> Any:
                offset = self.camera.clock_offset if self.camera is not None else None
                self.created = datetime.datetime.now(datetime.UTC).replace(tzinfo=None) + \
                    datetime.timedelta(seconds=offset or 0.0)
                return super()._create_password_digest()

        cls = _token_classes[base] = CameraClockToken
    return cls


def _notification(msg: Any) -> dict[str, Any]:
    """A NotificationMessage → ``{topic, time, source: {...}, data: {...}}`` (bounded)."""
    topic = getattr(msg, "Topic", None)
    topic = getattr(topic, "_value_1", topic)
    out: dict[str, Any] = {"topic": str(topic or "")[:256], "source": {}, "data": {}}
    message = getattr(getattr(msg, "Message", None), "_value_1", None)
    if message is None:
        return out
    if hasattr(message, "tag"):  # an lxml element (an xsd:any zeep did not type)
        out["time"] = str(message.get("UtcTime", ""))
        for child in message:
            part = str(child.tag).rsplit("}", 1)[-1].lower()
            if part in ("source", "data"):
                for item in child:
                    if item.get("Name") is not None:
                        out[part][str(item.get("Name"))[:64]] = str(item.get("Value"))[:256]
        return out
    out["time"] = str(getattr(message, "UtcTime", "") or "")
    for part in ("Source", "Data"):
        section = getattr(message, part, None)
        for item in (getattr(section, "SimpleItem", None) or []) if section is not None else []:
            out[part.lower()][str(item.Name)[:64]] = str(item.Value)[:256]
    return out


# -- the async side --------------------------------------------------------------------------
@dataclass(frozen=True)
class OnvifOptions:
    host: str
    port: int
    username: str | None
    password: str | None
    profile: str | None
    transport: str
    timeout: float
    path: str


def onvif_options(device: Mapping[str, Any], secrets: SecretLookup) -> OnvifOptions:
    name = device_name(device)
    o = binding_options(device, "onvif")
    return OnvifOptions(
        host=str(o["host"]),
        port=int(o.get("port", 80)),
        username=secret_value(o.get("username"), secrets, f"camera {name!r}: username"),
        password=secret_value(o.get("password"), secrets, f"camera {name!r}: password"),
        profile=str(o["profile"]) if o.get("profile") is not None else None,
        transport=str(o.get("transport", "tcp")),
        timeout=float(o.get("timeout_s", 5)),
        path=str(o.get("path", "/onvif/device_service")),
    )


async def in_thread(fn: Any, *args: Any) -> Any:
    """Run a blocking zeep call in a worker thread (abandoned on cancel; requests has its own
    socket timeouts, so the thread ends soon after)."""
    with trio.fail_after(60):  # a backstop: every call has its own (shorter) socket timeout
        return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)


class OnvifSource:
    """The ``onvif`` video source: asks the camera for its URIs; moves it (PTZ)."""

    def __init__(self) -> None:
        self._cameras: dict[tuple[Any, ...], OnvifCamera] = {}
        self._profiles: dict[tuple[Any, ...], str] = {}
        self._secrets: dict[str, SecretLookup] = {}

    def camera(self, opts: OnvifOptions) -> OnvifCamera:
        key = (opts.host, opts.port, opts.path, opts.username, opts.password, opts.timeout)
        cam = self._cameras.get(key)
        if cam is None:
            cam = OnvifCamera(opts.host, opts.port, opts.username, opts.password,
                              timeout=opts.timeout, path=opts.path)
            self._cameras[key] = cam
        return cam

    async def _profile(self, cam: OnvifCamera, opts: OnvifOptions) -> str:
        key = (opts.host, opts.port, opts.path, opts.profile)
        token = self._profiles.get(key)
        if token is None:
            picked = await in_thread(cam.pick_profile, opts.profile)
            token = self._profiles[key] = str(picked["token"])
        return token

    async def resolve(self, device: Mapping[str, Any], secrets: SecretLookup) -> StreamSource:
        name = device_name(device)
        opts = onvif_options(device, secrets)
        self._secrets[name] = secrets  # the ptz hook gets no secrets: keep this camera's
        cam = self.camera(opts)
        token = await self._profile(cam, opts)
        uri = await in_thread(cam.stream_uri, token)
        snapshot = await in_thread(cam.snapshot_uri, token)
        url = with_credentials(uri, opts.username, opts.password)
        scheme = urlsplit(uri).scheme.lower()
        options: dict[str, Any] = {}
        if scheme in ("rtsp", "rtsps"):
            options = {"rtsp_transport": opts.transport,
                       "timeout": str(int(opts.timeout * 1_000_000))}
        elif scheme in ("rtmp", "http", "https"):
            options = {"rw_timeout": str(int(opts.timeout * 1_000_000))}
        if snapshot:
            snapshot = with_credentials(snapshot, opts.username, opts.password)
        log.info("camera %s: ONVIF %s:%d profile %s -> %s", name, opts.host, opts.port, token,
                 redact(uri))
        return StreamSource(url, options, snapshot_url=snapshot, display=redact(uri))

    async def ptz(self, device: Mapping[str, Any], action: str,
                  args: Mapping[str, Any]) -> dict[str, Any]:
        name = device_name(device)
        secrets = self._secrets.get(name)
        if secrets is None:
            from twin.spec.secrets import Secrets

            secrets = Secrets()
        opts = onvif_options(device, secrets)
        cam = self.camera(opts)
        token = await self._profile(cam, opts)
        return await ptz_action(cam, token, action, args)


def _unit(args: Mapping[str, Any], key: str) -> float:
    value = args.get(key, 0.0)
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise CommandError(f"ptz: {key} must be a number in -1..1, not {value!r}") from None
    if not -1.0 <= v <= 1.0:
        raise CommandError(f"ptz: {key} must be in -1..1, not {v:g}")
    return v


async def ptz_action(cam: OnvifCamera, token: str, action: str,
                     args: Mapping[str, Any]) -> dict[str, Any]:
    """``move`` {pan, tilt, zoom, timeout_s?} | ``stop`` | ``goto_preset`` {preset} |
    ``set_preset`` {name?} | ``presets`` → a result for the command ledger."""
    if action == "move":
        pan, tilt, zoom = _unit(args, "pan"), _unit(args, "tilt"), _unit(args, "zoom")
        timeout_s = args.get("timeout_s")
        await in_thread(cam.continuous_move, token, pan, tilt, zoom,
                        float(timeout_s) if timeout_s is not None else None)
        return {"action": "move", "pan": pan, "tilt": tilt, "zoom": zoom}
    if action == "stop":
        await in_thread(cam.stop, token)
        return {"action": "stop"}
    if action == "goto_preset":
        preset = args.get("preset")
        if preset in (None, ""):
            raise CommandError("ptz goto_preset: needs {preset: TOKEN}")
        await in_thread(cam.goto_preset, token, str(preset))
        return {"action": "goto_preset", "preset": str(preset)}
    if action == "set_preset":
        name = args.get("name", args.get("preset"))
        got = await in_thread(cam.set_preset, token, str(name) if name else None)
        return {"action": "set_preset", "preset": got}
    if action == "presets":
        return {"action": "presets", "presets": await in_thread(cam.presets, token)}
    raise CommandError(f"ptz: unknown action {action!r}",
                       hint="move, stop, goto_preset, set_preset, presets")


SOURCE = OnvifSource()
register_source("onvif", SOURCE)

__all__ = ["OnvifAuthError", "OnvifCamera", "OnvifError", "OnvifSource", "ptz_action"]
