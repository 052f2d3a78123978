"""WS-Discovery (the ONVIF flavour): send a ``Probe`` for ``NetworkVideoTransmitter``s and
collect the ``ProbeMatches`` that answer it.

By default the probe goes to the multicast group ``239.255.255.250:3702`` (what cameras on the
LAN listen to); ``targets`` sends it unicast to given ``host:port`` s instead (a camera on
another subnet, or the fake camera of the tests on loopback). Replies are parsed with lxml
without entities or network access, bounded in size, and matched to our ``MessageID``; anything
else arriving on the socket is ignored.
"""

from __future__ import annotations

import logging
import socket
import uuid
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import trio

log = logging.getLogger(__name__)

MULTICAST = ("239.255.255.250", 3702)
NS = {
    "s": "http://www.w3.org/2003/05/soap-envelope",
    "a": "http://schemas.xmlsoap.org/ws/2004/08/addressing",
    "d": "http://schemas.xmlsoap.org/ws/2005/04/discovery",
    "dn": "http://www.onvif.org/ver10/network/wsdl",
}
PROBE_ACTION = "http://schemas.xmlsoap.org/ws/2005/04/discovery/Probe"
MATCHES_ACTION = "http://schemas.xmlsoap.org/ws/2005/04/discovery/ProbeMatches"
MAX_REPLY = 65_507


def probe_message(message_id: str, types: str = "dn:NetworkVideoTransmitter") -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<s:Envelope xmlns:s="{NS["s"]}" xmlns:a="{NS["a"]}" xmlns:d="{NS["d"]}" '
        f'xmlns:dn="{NS["dn"]}"><s:Header>'
        f"<a:MessageID>{message_id}</a:MessageID>"
        '<a:To s:mustUnderstand="true">urn:schemas-xmlsoap-org:ws:2005:04:discovery</a:To>'
        f'<a:Action s:mustUnderstand="true">{PROBE_ACTION}</a:Action>'
        f"</s:Header><s:Body><d:Probe><d:Types>{types}</d:Types></d:Probe></s:Body></s:Envelope>"
    ).encode()


@dataclass(frozen=True)
class ProbeMatch:
    """One device that answered."""

    endpoint: str
    xaddrs: tuple[str, ...]
    types: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    sender: tuple[str, int] = ("", 0)
    extra: dict[str, str] = field(default_factory=dict)

    def scope(self, key: str) -> str | None:
        """The value of ``onvif://www.onvif.org/<key>/<value>`` (``name``, ``hardware``)."""
        prefix = f"onvif://www.onvif.org/{key}/"
        for s in self.scopes:
            if s.startswith(prefix):
                return unquote(s[len(prefix):])
        return None

    @property
    def host_port(self) -> tuple[str, int, str]:
        """``(host, port, path)`` of the first HTTP XAddr."""
        for x in self.xaddrs:
            parts = urlsplit(x)
            if parts.scheme in ("http", "https") and parts.hostname:
                port = parts.port or (443 if parts.scheme == "https" else 80)
                return parts.hostname, port, parts.path or "/onvif/device_service"
        raise ValueError(f"device {self.endpoint} has no HTTP XAddr")


def _parser() -> object:
    from lxml import etree

    return etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False,
                           remove_comments=True, remove_pis=True)


def parse_probe_matches(data: bytes, message_id: str | None,
                        sender: tuple[str, int] = ("", 0)) -> list[ProbeMatch]:
    """The ProbeMatch entries of a reply (``[]`` for anything else or a malformed reply)."""
    from lxml import etree

    if len(data) > MAX_REPLY:
        return []
    try:
        root = etree.fromstring(data, _parser())
    except etree.XMLSyntaxError:
        return []
    if message_id is not None:
        relates = root.findtext(".//a:RelatesTo", namespaces=NS)
        if (relates or "").strip() != message_id:
            return []
    out = []
    for m in root.iterfind(".//d:ProbeMatches/d:ProbeMatch", namespaces=NS):
        endpoint = (m.findtext("a:EndpointReference/a:Address", namespaces=NS) or "").strip()
        xaddrs = tuple((m.findtext("d:XAddrs", namespaces=NS) or "").split())
        if not xaddrs:
            continue
        out.append(ProbeMatch(
            endpoint=endpoint or xaddrs[0],
            xaddrs=xaddrs,
            types=tuple((m.findtext("d:Types", namespaces=NS) or "").split()),
            scopes=tuple((m.findtext("d:Scopes", namespaces=NS) or "").split()),
            sender=sender,
        ))
    return out


def parse_target(target: str, default_port: int = 3702) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    if not host:
        return target, default_port
    return host.strip("[]"), int(port)


async def probe(targets: list[tuple[str, int]] | None = None, *, wait: float = 2.0,
                types: str = "dn:NetworkVideoTransmitter") -> list[ProbeMatch]:
    """Probe ``targets`` (unicast) or the multicast group; every distinct device that answers
    within ``wait`` seconds, in arrival order."""
    message_id = f"uuid:{uuid.uuid4()}"
    message = probe_message(message_id, types)
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    found: dict[str, ProbeMatch] = {}
    with sock:
        await sock.bind(("0.0.0.0", 0))
        dests = targets or [MULTICAST]
        if not targets:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)
        for dest in dests:
            # UDP may drop one: say it twice, as the spec's retransmission does
            for _ in range(2):
                try:
                    await sock.sendto(message, dest)
                except OSError as exc:
                    log.warning("ws-discovery: probe to %s:%d failed: %s", dest[0], dest[1], exc)
        with trio.move_on_after(wait):
            while True:
                try:
                    data, sender = await sock.recvfrom(MAX_REPLY + 1)
                except OSError:
                    continue  # ICMP unreachable of a silent target: keep listening
                for match in parse_probe_matches(data, message_id, sender):
                    found.setdefault(match.endpoint, match)
    return list(found.values())


__all__ = ["MULTICAST", "ProbeMatch", "parse_probe_matches", "parse_target", "probe",
           "probe_message"]
