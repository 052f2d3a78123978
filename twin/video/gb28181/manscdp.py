"""MANSCDP: the XML bodies of GB/T 28181 MESSAGEs (Keepalive, Catalog query and response).

Devices declare ``encoding="GB2312"`` (most) or UTF-8; lxml decodes either from the XML
declaration. Parsing never resolves entities or touches the network; text is bounded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CONTENT_TYPE = "Application/MANSCDP+xml"
MAX_TEXT = 256


class ManscdpError(ValueError):
    pass


@dataclass
class Manscdp:
    root: str  # Notify | Query | Response | Control
    cmd: str  # Keepalive | Catalog | ...
    sn: int
    device_id: str
    fields: dict[str, str] = field(default_factory=dict)
    items: list[dict[str, str]] = field(default_factory=list)
    sum_num: int | None = None


def parse(body: bytes) -> Manscdp:
    from lxml import etree

    parser = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False,
                             remove_comments=True, remove_pis=True)
    try:
        root = etree.fromstring(body.strip(), parser)
    except (etree.XMLSyntaxError, ValueError) as exc:
        raise ManscdpError(f"not MANSCDP XML: {exc}") from None
    if root.tag not in ("Notify", "Query", "Response", "Control"):
        raise ManscdpError(f"unknown MANSCDP root {str(root.tag)[:40]!r}")

    def text(el: Any, name: str) -> str:
        return (el.findtext(name) or "").strip()[:MAX_TEXT]

    try:
        sn = int(text(root, "SN") or 0)
    except ValueError:
        raise ManscdpError("SN is not a number") from None
    msg = Manscdp(str(root.tag), text(root, "CmdType"), sn, text(root, "DeviceID"))
    for child in root:
        if isinstance(child.tag, str) and len(child) == 0 and child.tag not in (
                "CmdType", "SN", "DeviceID"):
            msg.fields[child.tag[:64]] = (child.text or "").strip()[:MAX_TEXT]
    if msg.fields.get("SumNum", "").isdigit():
        msg.sum_num = int(msg.fields["SumNum"])
    for item in root.iterfind("DeviceList/Item"):
        entry = {str(c.tag)[:64]: (c.text or "").strip()[:MAX_TEXT] for c in item
                 if isinstance(c.tag, str) and len(c) == 0}
        if entry.get("DeviceID"):
            msg.items.append(entry)
        if len(msg.items) >= 4096:
            break
    return msg


def catalog_query(sn: int, device_id: str) -> bytes:
    return ('<?xml version="1.0" encoding="GB2312"?>\r\n<Query>\r\n<CmdType>Catalog</CmdType>\r\n'
            f"<SN>{sn}</SN>\r\n<DeviceID>{device_id}</DeviceID>\r\n</Query>\r\n").encode("gb2312")


def device_info_query(sn: int, device_id: str) -> bytes:
    return ('<?xml version="1.0" encoding="GB2312"?>\r\n<Query>\r\n<CmdType>DeviceInfo</CmdType>'
            f"\r\n<SN>{sn}</SN>\r\n<DeviceID>{device_id}</DeviceID>\r\n</Query>\r\n"
            ).encode("gb2312")


# PTZ (GB/T 28181-2016 A.3): 8 bytes, A5 0F <addr> <instruction> <data1> <data2> <zoom|addr hi> <sum>
PTZ_RIGHT, PTZ_LEFT, PTZ_DOWN, PTZ_UP, PTZ_ZOOM_IN, PTZ_ZOOM_OUT = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
PTZ_SET_PRESET, PTZ_GOTO_PRESET = 0x81, 0x82


def ptz_cmd(instruction: int, data1: int = 0, data2: int = 0, zoom_speed: int = 0,
            address: int = 1) -> str:
    """The PTZCmd hex string: instruction, pan/tilt speeds (0-255) or preset (data2), zoom speed
    (0-15); the last byte is the sum of the first seven, modulo 256."""
    raw = [0xA5, 0x0F, address & 0xFF, instruction & 0xFF, data1 & 0xFF, data2 & 0xFF,
           ((zoom_speed & 0x0F) << 4) | ((address >> 8) & 0x0F)]
    raw.append(sum(raw) % 256)
    return bytes(raw).hex().upper()


def device_control(sn: int, channel: str, ptz: str) -> bytes:
    return ('<?xml version="1.0" encoding="GB2312"?>\r\n<Control>\r\n'
            f"<CmdType>DeviceControl</CmdType>\r\n<SN>{sn}</SN>\r\n<DeviceID>{channel}</DeviceID>"
            f"\r\n<PTZCmd>{ptz}</PTZCmd>\r\n<Info>\r\n<ControlPriority>5</ControlPriority>\r\n"
            "</Info>\r\n</Control>\r\n").encode("gb2312")


__all__ = ["CONTENT_TYPE", "Manscdp", "ManscdpError", "catalog_query", "device_control",
           "parse", "ptz_cmd"]
