"""A fake ONVIF camera for the tests: an HTTP SOAP server answering the ONVIF device, media,
PTZ and event (PullPoint) operations the way the WSDLs define them, with WS-Security
UsernameToken (password digest) or HTTP digest authentication, a JPEG snapshot URL, and a
WS-Discovery responder on a UDP port.

It runs in threads (``http.server`` + a UDP socket), independent of the Trio code under test;
what the client did is recorded in ``calls`` / ``ptz`` / ``presets`` for assertions. The stream
URI it hands out is whatever the test gives it (a GStreamer RTSP server, an ffmpeg source).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote

from lxml import etree

NS = {
    "s": "http://www.w3.org/2003/05/soap-envelope",
    "wsse": "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd",
    "wsu": "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd",
    "tds": "http://www.onvif.org/ver10/device/wsdl",
    "trt": "http://www.onvif.org/ver10/media/wsdl",
    "tptz": "http://www.onvif.org/ver20/ptz/wsdl",
    "tev": "http://www.onvif.org/ver10/events/wsdl",
    "tt": "http://www.onvif.org/ver10/schema",
    "wsnt": "http://docs.oasis-open.org/wsn/b-2",
    "wsa5": "http://www.w3.org/2005/08/addressing",
    "tns1": "http://www.onvif.org/ver10/topics",
    "ter": "http://www.onvif.org/ver10/error",
    "a": "http://schemas.xmlsoap.org/ws/2004/08/addressing",
    "d": "http://schemas.xmlsoap.org/ws/2005/04/discovery",
    "dn": "http://www.onvif.org/ver10/network/wsdl",
}
_XMLNS = " ".join(f'xmlns:{k}="{v}"' for k, v in NS.items())
PUBLIC = {"GetSystemDateAndTime"}
"""Operations a camera answers without authentication (ONVIF core spec §5.9.1)."""


def envelope(body: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?><s:Envelope {_XMLNS}><s:Body>{body}'
            "</s:Body></s:Envelope>").encode()


def fault(subcode: str, reason: str) -> bytes:
    return envelope(
        "<s:Fault><s:Code><s:Value>s:Sender</s:Value><s:Subcode>"
        f"<s:Value>{subcode}</s:Value></s:Subcode></s:Code><s:Reason>"
        f'<s:Text xml:lang="en">{reason}</s:Text></s:Reason></s:Fault>')


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _md5(s: str) -> str:
    return hashlib.md5(s.encode()).hexdigest()


@dataclass
class FakeOnvifCamera:
    username: str = "admin"
    password: str = "secret"
    auth: str = "wsse"  # "wsse" | "digest"
    stream_uri: str = "rtsp://127.0.0.1:554/cam"
    snapshot: bytes = b""
    name: str = "FakeCam"
    hardware: str = "FC-1"
    ptz_enabled: bool = True
    host: str = "127.0.0.1"
    calls: list[str] = field(default_factory=list)
    ptz: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    presets: dict[str, str] = field(default_factory=lambda: {"1": "home"})
    events: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    clock_offset: float = 0.0
    """The camera's clock minus the real one (s): WS-Security tokens must be stamped in it."""
    auth_failures: int = 0
    probes: int = 0
    endpoint: str = field(default_factory=lambda: f"urn:uuid:{uuid.uuid4()}")

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._nonce = base64.b64encode(os.urandom(12)).decode()
        self._http: ThreadingHTTPServer | None = None
        self._udp: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self.port = 0
        self.discovery_port = 0

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> FakeOnvifCamera:
        cam = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # the snapshot: HTTP basic or digest auth
                if self.path != "/snapshot.jpg":
                    self._send(404, b"", "text/plain")
                    return
                basic = base64.b64encode(f"{cam.username}:{cam.password}".encode()).decode()
                if self.headers.get("Authorization") != f"Basic {basic}" and \
                        not cam._check_digest(self, "GET"):
                    return
                self._send(200, cam.snapshot, "image/jpeg")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                status, reply = cam._soap(self, body)
                if status:
                    self._send(status, reply, "application/soap+xml; charset=utf-8")

            def _send(self, status: int, data: bytes, ctype: str,
                      headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self._http = ThreadingHTTPServer((self.host, 0), Handler)
        self._http.daemon_threads = True
        self.port = self._http.server_address[1]
        self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._udp.bind((self.host, 0))
        self._udp.settimeout(0.2)
        self.discovery_port = self._udp.getsockname()[1]
        for target in (self._http.serve_forever, self._discovery):
            t = threading.Thread(target=target, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._udp is not None:
            udp, self._udp = self._udp, None
            udp.close()
        for t in self._threads:
            t.join(timeout=2)

    def __enter__(self) -> FakeOnvifCamera:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    def push_event(self, topic: str, data: dict[str, str]) -> None:
        with self._lock:
            self.events.append((topic, data))

    # -- WS-Discovery ----------------------------------------------------------------------
    def _discovery(self) -> None:
        while self._udp is not None:
            udp = self._udp
            try:
                data, sender = udp.recvfrom(65535)
            except (TimeoutError, OSError):
                continue
            try:
                root = etree.fromstring(data, etree.XMLParser(resolve_entities=False,
                                                              no_network=True))
            except etree.XMLSyntaxError:
                continue
            if root.find(".//d:Probe", NS) is None:
                continue
            self.probes += 1
            msg_id = root.findtext(".//a:MessageID", namespaces=NS) or ""
            scopes = " ".join([
                f"onvif://www.onvif.org/name/{quote(self.name)}",
                f"onvif://www.onvif.org/hardware/{self.hardware}",
                "onvif://www.onvif.org/type/video_encoder",
                "onvif://www.onvif.org/Profile/Streaming",
            ] + (["onvif://www.onvif.org/type/ptz"] if self.ptz_enabled else []))
            reply = (
                f'<?xml version="1.0" encoding="UTF-8"?><s:Envelope {_XMLNS}><s:Header>'
                f"<a:MessageID>uuid:{uuid.uuid4()}</a:MessageID><a:RelatesTo>{msg_id}"
                "</a:RelatesTo><a:To>http://schemas.xmlsoap.org/ws/2004/08/addressing/role/"
                "anonymous</a:To><a:Action>http://schemas.xmlsoap.org/ws/2005/04/discovery/"
                "ProbeMatches</a:Action></s:Header><s:Body><d:ProbeMatches><d:ProbeMatch>"
                f"<a:EndpointReference><a:Address>{self.endpoint}</a:Address>"
                "</a:EndpointReference><d:Types>dn:NetworkVideoTransmitter</d:Types>"
                f"<d:Scopes>{scopes}</d:Scopes>"
                f"<d:XAddrs>{self.base}/onvif/device_service</d:XAddrs>"
                "<d:MetadataVersion>1</d:MetadataVersion></d:ProbeMatch></d:ProbeMatches>"
                "</s:Body></s:Envelope>").encode()
            with contextlib.suppress(OSError):
                udp.sendto(reply, sender)

    # -- authentication --------------------------------------------------------------------
    def _check_digest(self, handler: BaseHTTPRequestHandler, method: str) -> bool:
        """HTTP digest (RFC 2617, MD5, qop=auth); answers 401 with a challenge if missing."""
        header = handler.headers.get("Authorization", "")
        if header.startswith("Digest "):
            fields: dict[str, str] = {}
            for part in header[7:].split(","):
                k, _, v = part.strip().partition("=")
                fields[k] = v.strip('"')
            ha1 = _md5(f"{self.username}:onvif:{self.password}")
            ha2 = _md5(f"{method}:{fields.get('uri', '')}")
            want = _md5(f"{ha1}:{fields.get('nonce')}:{fields.get('nc')}:{fields.get('cnonce')}:"
                        f"{fields.get('qop')}:{ha2}")
            if fields.get("username") == self.username and fields.get("response") == want:
                return True
            self.auth_failures += 1
        challenge = f'Digest realm="onvif", qop="auth", nonce="{self._nonce}", algorithm=MD5'
        handler.send_response(401)
        handler.send_header("WWW-Authenticate", challenge)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
        return False

    def _check_wsse(self, root: Any) -> bool:
        token = root.find(".//wsse:Security/wsse:UsernameToken", NS)
        if token is None:
            return False
        user = token.findtext("wsse:Username", namespaces=NS)
        password = token.find("wsse:Password", NS)
        nonce = token.findtext("wsse:Nonce", namespaces=NS) or ""
        created = token.findtext("wsu:Created", namespaces=NS) or ""
        if user != self.username or password is None:
            return False
        try:  # a token not created within a minute of the camera's clock is refused
            stamp = datetime.datetime.fromisoformat(created.replace("Z", "+00:00"))
        except ValueError:
            return False
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=datetime.UTC)
        if abs(stamp.timestamp() - (time.time() + self.clock_offset)) > 60:
            return False
        if (password.get("Type") or "").endswith("#PasswordDigest"):
            digest = base64.b64encode(hashlib.sha1(
                base64.b64decode(nonce) + created.encode() + self.password.encode()
            ).digest()).decode()
            return (password.text or "") == digest
        return (password.text or "") == self.password

    # -- SOAP ------------------------------------------------------------------------------
    def _soap(self, handler: BaseHTTPRequestHandler, data: bytes) -> tuple[int, bytes]:
        try:
            root = etree.fromstring(data, etree.XMLParser(resolve_entities=False,
                                                          no_network=True))
        except etree.XMLSyntaxError:
            return 400, fault("ter:WellFormed", "not XML")
        body = root.find("s:Body", NS)
        if body is None or len(body) == 0:
            return 400, fault("ter:WellFormed", "no SOAP body")
        request = body[0]
        op = etree.QName(request).localname
        if op not in PUBLIC:
            if self.auth == "digest":
                if not self._check_digest(handler, "POST"):
                    return 0, b""
            elif not self._check_wsse(root):
                self.auth_failures += 1
                return 400, fault("ter:NotAuthorized", "Sender not Authorized")
        with self._lock:
            self.calls.append(op)
        handler_fn = getattr(self, f"op_{op}", None)
        if handler_fn is None:
            return 400, fault("ter:ActionNotSupported", f"{op} is not supported")
        try:
            return 200, envelope(handler_fn(request))
        except KeyError as exc:
            return 400, fault("ter:NoEntity", f"no such entity {exc}")

    def _text(self, el: Any, path: str) -> str:
        found = el.find(path, NS)
        return (found.text or "") if found is not None else ""

    def op_GetSystemDateAndTime(self, req: Any) -> str:
        t = time.gmtime(time.time() + self.clock_offset)
        return ("<tds:GetSystemDateAndTimeResponse><tds:SystemDateAndTime>"
                "<tt:DateTimeType>NTP</tt:DateTimeType><tt:DaylightSavings>false"
                "</tt:DaylightSavings><tt:UTCDateTime><tt:Time>"
                f"<tt:Hour>{t.tm_hour}</tt:Hour><tt:Minute>{t.tm_min}</tt:Minute>"
                f"<tt:Second>{t.tm_sec}</tt:Second></tt:Time><tt:Date><tt:Year>{t.tm_year}"
                f"</tt:Year><tt:Month>{t.tm_mon}</tt:Month><tt:Day>{t.tm_mday}</tt:Day>"
                "</tt:Date></tt:UTCDateTime></tds:SystemDateAndTime>"
                "</tds:GetSystemDateAndTimeResponse>")

    def op_GetDeviceInformation(self, req: Any) -> str:
        return ("<tds:GetDeviceInformationResponse><tds:Manufacturer>FLUX</tds:Manufacturer>"
                f"<tds:Model>{self.hardware}</tds:Model><tds:FirmwareVersion>1.0"
                "</tds:FirmwareVersion><tds:SerialNumber>SN0001</tds:SerialNumber>"
                "<tds:HardwareId>fake</tds:HardwareId></tds:GetDeviceInformationResponse>")

    def op_GetCapabilities(self, req: Any) -> str:
        b = self.base
        ptz = f"<tt:PTZ><tt:XAddr>{b}/onvif/ptz_service</tt:XAddr></tt:PTZ>" \
            if self.ptz_enabled else ""
        return (
            "<tds:GetCapabilitiesResponse><tds:Capabilities>"
            f"<tt:Device><tt:XAddr>{b}/onvif/device_service</tt:XAddr></tt:Device>"
            f"<tt:Events><tt:XAddr>{b}/onvif/event_service</tt:XAddr>"
            "<tt:WSSubscriptionPolicySupport>false</tt:WSSubscriptionPolicySupport>"
            "<tt:WSPullPointSupport>true</tt:WSPullPointSupport>"
            "<tt:WSPausableSubscriptionManagerInterfaceSupport>false"
            "</tt:WSPausableSubscriptionManagerInterfaceSupport></tt:Events>"
            f"<tt:Media><tt:XAddr>{b}/onvif/media_service</tt:XAddr>"
            "<tt:StreamingCapabilities><tt:RTPMulticast>false</tt:RTPMulticast>"
            "<tt:RTP_TCP>true</tt:RTP_TCP><tt:RTP_RTSP_TCP>true</tt:RTP_RTSP_TCP>"
            f"</tt:StreamingCapabilities></tt:Media>{ptz}"
            "</tds:Capabilities></tds:GetCapabilitiesResponse>")

    def _profile(self, token: str, name: str, w: int, h: int) -> str:
        ptz = ('<tt:PTZConfiguration token="ptz0"><tt:Name>ptz</tt:Name><tt:UseCount>2'
               "</tt:UseCount><tt:NodeToken>node0</tt:NodeToken></tt:PTZConfiguration>"
               if self.ptz_enabled else "")
        return (
            f'<trt:Profiles token="{token}" fixed="true"><tt:Name>{name}</tt:Name>'
            f'<tt:VideoEncoderConfiguration token="venc_{token}"><tt:Name>{name}</tt:Name>'
            "<tt:UseCount>1</tt:UseCount><tt:Encoding>H264</tt:Encoding><tt:Resolution>"
            f"<tt:Width>{w}</tt:Width><tt:Height>{h}</tt:Height></tt:Resolution>"
            "<tt:Quality>5</tt:Quality><tt:SessionTimeout>PT60S</tt:SessionTimeout>"
            f"</tt:VideoEncoderConfiguration>{ptz}</trt:Profiles>")

    def op_GetProfiles(self, req: Any) -> str:
        return ("<trt:GetProfilesResponse>" + self._profile("main", "mainStream", 1280, 720)
                + self._profile("sub", "subStream", 320, 240) + "</trt:GetProfilesResponse>")

    def op_GetStreamUri(self, req: Any) -> str:
        token = self._text(req, "trt:ProfileToken")
        uri = self.stream_uri if token == "main" else self.stream_uri + "_sub"
        return ("<trt:GetStreamUriResponse><trt:MediaUri>"
                f"<tt:Uri>{uri}</tt:Uri><tt:InvalidAfterConnect>false</tt:InvalidAfterConnect>"
                "<tt:InvalidAfterReboot>false</tt:InvalidAfterReboot><tt:Timeout>PT0S"
                "</tt:Timeout></trt:MediaUri></trt:GetStreamUriResponse>")

    def op_GetSnapshotUri(self, req: Any) -> str:
        return ("<trt:GetSnapshotUriResponse><trt:MediaUri>"
                f"<tt:Uri>{self.base}/snapshot.jpg</tt:Uri><tt:InvalidAfterConnect>false"
                "</tt:InvalidAfterConnect><tt:InvalidAfterReboot>false</tt:InvalidAfterReboot>"
                "<tt:Timeout>PT0S</tt:Timeout></trt:MediaUri></trt:GetSnapshotUriResponse>")

    # PTZ
    def _ptz(self, op: str, args: dict[str, str]) -> None:
        with self._lock:
            self.ptz.append((op, args))

    def op_ContinuousMove(self, req: Any) -> str:
        pt = req.find("tptz:Velocity/tt:PanTilt", NS)
        zoom = req.find("tptz:Velocity/tt:Zoom", NS)
        args = {"profile": self._text(req, "tptz:ProfileToken"),
                "x": pt.get("x") if pt is not None else "",
                "y": pt.get("y") if pt is not None else "",
                "zoom": zoom.get("x") if zoom is not None else "",
                "timeout": self._text(req, "tptz:Timeout")}
        self._ptz("ContinuousMove", args)
        return "<tptz:ContinuousMoveResponse/>"

    def op_Stop(self, req: Any) -> str:
        self._ptz("Stop", {"profile": self._text(req, "tptz:ProfileToken")})
        return "<tptz:StopResponse/>"

    def op_GotoPreset(self, req: Any) -> str:
        token = self._text(req, "tptz:PresetToken")
        if token not in self.presets:
            raise KeyError(token)
        self._ptz("GotoPreset", {"preset": token})
        return "<tptz:GotoPresetResponse/>"

    def op_SetPreset(self, req: Any) -> str:
        with self._lock:
            token = str(len(self.presets) + 1)
            self.presets[token] = self._text(req, "tptz:PresetName") or f"preset{token}"
        self._ptz("SetPreset", {"preset": token})
        return f"<tptz:SetPresetResponse><tptz:PresetToken>{token}</tptz:PresetToken>" \
            "</tptz:SetPresetResponse>"

    def op_GetPresets(self, req: Any) -> str:
        items = "".join(f'<tptz:Preset token="{t}"><tt:Name>{n}</tt:Name></tptz:Preset>'
                        for t, n in self.presets.items())
        return f"<tptz:GetPresetsResponse>{items}</tptz:GetPresetsResponse>"

    # events
    def op_CreatePullPointSubscription(self, req: Any) -> str:
        return ("<tev:CreatePullPointSubscriptionResponse><tev:SubscriptionReference>"
                f"<wsa5:Address>{self.base}/onvif/pullpoint/1</wsa5:Address>"
                f"</tev:SubscriptionReference><wsnt:CurrentTime>{_now()}</wsnt:CurrentTime>"
                f"<wsnt:TerminationTime>{_now()}</wsnt:TerminationTime>"
                "</tev:CreatePullPointSubscriptionResponse>")

    def op_PullMessages(self, req: Any) -> str:
        deadline = time.monotonic() + 1.0
        while True:
            with self._lock:
                pending, self.events = self.events, []
            if pending or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        msgs = "".join(
            '<wsnt:NotificationMessage><wsnt:Topic Dialect="http://www.onvif.org/ver10/tev/'
            f'topicExpression/ConcreteSet">{topic}</wsnt:Topic><wsnt:Message>'
            f'<tt:Message UtcTime="{_now()}" PropertyOperation="Changed"><tt:Source>'
            '<tt:SimpleItem Name="VideoSourceConfigurationToken" Value="vsc0"/></tt:Source>'
            "<tt:Data>"
            + "".join(f'<tt:SimpleItem Name="{k}" Value="{v}"/>' for k, v in data.items())
            + "</tt:Data></tt:Message></wsnt:Message></wsnt:NotificationMessage>"
            for topic, data in pending)
        return (f"<tev:PullMessagesResponse><tev:CurrentTime>{_now()}</tev:CurrentTime>"
                f"<tev:TerminationTime>{_now()}</tev:TerminationTime>{msgs}"
                "</tev:PullMessagesResponse>")

    def op_Unsubscribe(self, req: Any) -> str:
        return "<wsnt:UnsubscribeResponse/>"
