"""Modbus point maps: parsing, sizes, and the checks ``twin validate`` runs on them.

Pure (no I/O, no trio): the binding (twin/bindings/modbus.py) builds its points from here, so
what validates is what runs. A point names its register either in Modicon notation or by
function code and 0-based PDU address:

```yaml
points:
  temperature: {register: 30001, type: float32, order: CDAB, scale: 0.1, unit: degC}
  running:     {register: 10001}                 # discrete input (FC 2), bool
  alarm:       {register: "40001.3"}             # bit 3 of holding register 40001
  setpoint:    {fc: 3, address: 9, type: int16, access: readwrite}   # = 40010, written by FC 6
  name:        {register: 40100, type: string, count: 8}
```
Tables: ``0xxxx`` coils (read FC 1, write FC 5/15), ``1xxxx`` discrete inputs (FC 2, read
only), ``3xxxx`` input registers (FC 4, read only), ``4xxxx`` holding registers (read FC 3,
write FC 6/16). Five digits address 1-9999 of a table, six digits 1-65536.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# table digit -> read function code
TABLE_FC = {0: 1, 1: 2, 3: 4, 4: 3}
FC_TABLE = {1: "coils", 2: "discrete inputs", 3: "holding registers", 4: "input registers"}
READ_ONLY_FC = {2, 4}
BIT_FC = {1, 2}
WRITE_FC = {1: (5, 15), 3: (6, 16)}  # read FC -> allowed write FCs
SIZES = {
    "int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2,
    "int64": 4, "uint64": 4, "float64": 4, "bool": 1,
}
TYPES = (*SIZES, "string")
ORDERS = ("ABCD", "BADC", "CDAB", "DCBA")
MAX_REGISTERS = 125  # per read request (FC 3/4)
MAX_BITS = 2000  # per read request (FC 1/2)
RTU_UNITS = range(1, 248)

_MODICON = re.compile(r"^([0134])(\d{4,5})(?:\.(\d{1,2}))?$")


@dataclass(frozen=True, slots=True)
class Point:
    name: str
    fc: int  # read function code 1-4
    address: int  # 0-based PDU address
    type: str
    count: int  # registers (or bits for FC 1/2: always 1)
    bit: int | None = None  # bit field of a register
    order: str = "ABCD"
    scale: float = 1.0
    offset: float = 0.0
    unit: str | None = None
    group: str = "default"
    writable: bool = False
    write_fc: int | None = None
    encoding: str = "utf-8"

    @property
    def end(self) -> int:  # one past the last address
        return self.address + self.count

    @property
    def is_bit_table(self) -> bool:
        return self.fc in BIT_FC


class PointError(ValueError):
    """A point declaration that cannot work; ``field`` names the offending key."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def parse_register(value: Any) -> tuple[int, int, int | None]:
    """``(read fc, 0-based address, bit)`` of Modicon notation (``40001``, ``"40001.3"``,
    ``400001``)."""
    text = str(value).strip()
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 10000:
        text = f"{value:05d}"  # YAML reads 00001 as 1: a coil
    m = _MODICON.match(text)
    if not m:
        raise PointError(
            f"{value!r} is not a Modicon register (0xxxx coil, 1xxxx discrete input, "
            "3xxxx input register, 4xxxx holding register; .N for a bit)",
            "register",
        )
    table, digits, bit = int(m.group(1)), m.group(2), m.group(3)
    number = int(digits)
    limit = 9999 if len(digits) == 4 else 65536
    if not 1 <= number <= limit:
        raise PointError(f"{value!r}: register number {number} is out of range 1-{limit}", "register")
    return TABLE_FC[table], number - 1, (int(bit) if bit is not None else None)


def parse_point(name: str, spec: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> Point:
    """A :class:`Point` from its YAML (schema-valid or not: every problem is a PointError)."""
    defaults = defaults or {}
    if "register" in spec:
        if "fc" in spec or "address" in spec:
            raise PointError("give either register or fc + address, not both", "register")
        fc, address, bit = parse_register(spec["register"])
    elif "fc" in spec and "address" in spec:
        fc, address = int(spec["fc"]), int(spec["address"])
        bit = spec.get("bit")
        if fc not in FC_TABLE:
            raise PointError(f"function code {fc} does not read (use 1, 2, 3 or 4)", "fc")
        if not 0 <= address <= 65535:
            raise PointError(f"address {address} is out of range 0-65535", "address")
    else:
        raise PointError("needs register (e.g. 40001) or fc and address", "register")
    if "bit" in spec and "register" in spec:
        bit = int(spec["bit"])
    bit_table = fc in BIT_FC
    typ = str(spec.get("type", "bool" if bit_table or bit is not None else "int16"))
    if typ not in TYPES:
        raise PointError(f"unknown type {typ!r} (one of {', '.join(TYPES)})", "type")
    if bit_table and typ != "bool":
        raise PointError(f"{FC_TABLE[fc]} hold single bits: type must be bool, not {typ}", "type")
    if bit is not None:
        if bit_table:
            raise PointError(f"{FC_TABLE[fc]} are bits already: no .bit field", "register")
        if not 0 <= int(bit) <= 15:
            raise PointError(f"bit {bit} is out of range 0-15", "register")
        if typ != "bool":
            raise PointError(f"a bit field is a bool, not {typ}", "type")
    if typ == "string":
        if "count" not in spec:
            raise PointError("a string needs count (registers, 2 characters each)", "count")
        count = int(spec["count"])
        if count < 1:
            raise PointError("count must be at least 1", "count")
    else:
        count = SIZES[typ]
        if "count" in spec and int(spec["count"]) != count:
            raise PointError(
                f"count {spec['count']} does not fit {typ} ({count} register"
                f"{'s' if count != 1 else ''})",
                "count",
            )
    if count > (MAX_BITS if bit_table else MAX_REGISTERS):
        raise PointError(f"count {count} exceeds one request ({MAX_REGISTERS} registers)", "count")
    if address + count - 1 > 65535:
        raise PointError(
            f"address {address} + {count} register(s) runs past 65535", "register" if "register" in spec else "address"
        )
    order = str(spec.get("order", defaults.get("order", "ABCD")))
    if order not in ORDERS:
        raise PointError(f"order {order!r} is not one of {', '.join(ORDERS)}", "order")
    scale = float(spec.get("scale", 1.0))
    offset = float(spec.get("offset", 0.0))
    if ("scale" in spec or "offset" in spec) and typ in ("bool", "string"):
        raise PointError(f"scale/offset do not apply to {typ}", "scale" if "scale" in spec else "offset")
    if scale == 0 or not math.isfinite(scale) or not math.isfinite(offset):
        raise PointError("scale must be a finite non-zero number", "scale")
    access = str(spec.get("access", "readwrite" if "write_fc" in spec else "read"))
    writable = access in ("write", "readwrite")
    write_fc = spec.get("write_fc")
    if writable:
        if fc in READ_ONLY_FC:
            raise PointError(
                f"{FC_TABLE[fc]} are read-only (function code {fc}): cannot be written",
                "access" if "access" in spec else "write_fc",
            )
        allowed = WRITE_FC[fc]
        if write_fc is None:
            write_fc = allowed[0] if count == 1 else allowed[1]
        write_fc = int(write_fc)
        if write_fc not in allowed:
            raise PointError(
                f"function code {write_fc} does not write {FC_TABLE[fc]} (use "
                f"{' or '.join(map(str, allowed))})",
                "write_fc",
            )
        if write_fc in (5, 6) and count != 1:
            raise PointError(
                f"function code {write_fc} writes one {'coil' if write_fc == 5 else 'register'}; "
                f"{typ} needs {count} (use {allowed[1]})",
                "write_fc",
            )
    elif write_fc is not None:
        raise PointError("write_fc on a read-only point (access: read)", "write_fc")
    group = str(spec.get("group", "default"))
    return Point(
        name=name, fc=fc, address=address, type=typ, count=count,
        bit=int(bit) if bit is not None else None, order=order, scale=scale, offset=offset,
        unit=spec.get("unit"), group=group, writable=writable, write_fc=write_fc,
        encoding=str(spec.get("encoding", "utf-8")),
    )


MAX_WRITE_REGISTERS = 123  # per write request (FC 16)


def parse_frame_block(spec: Mapping[str, Any]) -> tuple[int, int, int]:
    """``(read fc, 0-based address, count)`` of one block of a codec's frame
    (``{register: 40001, count: 4}``): registers only (FC 3/4), no bit fields."""
    fc, address, bit = parse_register(spec.get("register"))
    if fc in BIT_FC:
        raise PointError(f"{FC_TABLE[fc]} are bits: a codec's frame is registers "
                         "(3xxxx input, 4xxxx holding)", "register")
    if bit is not None:
        raise PointError("a frame block is whole registers, not a bit field", "register")
    count = spec.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_REGISTERS:
        raise PointError(f"count must be 1-{MAX_REGISTERS} registers (one request)", "count")
    if address + count - 1 > 65535:
        raise PointError(f"address {address} + {count} registers runs past 65535", "count")
    return fc, address, count


def parse_command_register(spec: Mapping[str, Any]) -> int:
    """The 0-based holding register where a codec's encoded command frames are written."""
    fc, address, bit = parse_register(spec.get("register"))
    if fc != 3 or bit is not None:
        raise PointError("commands are written to holding registers (4xxxx, whole registers)",
                         "register")
    if address + MAX_WRITE_REGISTERS - 1 > 65535:
        raise PointError(f"a command frame of up to {MAX_WRITE_REGISTERS} registers from here "
                         "runs past 65535", "register")
    return address


def overlaps(points: Iterable[Point]) -> list[tuple[Point, Point]]:
    """``(later, earlier)`` pairs of points (in the given order) whose addresses overlap in the
    same table. Bit fields of one register overlap only when they name the same bit; a bit
    field over a whole-register point is the usual status word + its bits and is allowed."""
    seen: list[Point] = []
    out = []
    for p in points:
        for q in seen:
            if p.fc != q.fc or p.address >= q.end or q.address >= p.end:
                continue
            if p.bit is not None or q.bit is not None:
                if p.bit is not None and q.bit is not None and p.bit == q.bit:
                    out.append((p, q))
                continue
            out.append((p, q))
            break
        seen.append(p)
    return out


def merged_options(model_map: Mapping[str, Any] | None, options: Mapping[str, Any]) -> dict[str, Any]:
    """The device's binding options over its DeviceModel's ``spec.modbus`` map: keys of the
    device win, ``points`` and ``groups`` are merged by name."""
    base = dict(model_map or {})
    out = {**base, **options}
    for key in ("points", "groups"):
        out[key] = {**(base.get(key) or {}), **(options.get(key) or {})}
    return out


def line_key(options: Mapping[str, Any]) -> tuple[str, ...]:
    """The physical line or gateway a device is reached through (devices sharing it share
    one connection)."""
    serial = options.get("serial")
    if isinstance(serial, Mapping):
        return ("rtu", str(serial.get("device")), "", "")
    return ("tcp", str(options.get("host")), str(options.get("port", 502)), str(options.get("framing", "socket")))


MODEL_TYPES = {
    "bool": {"boolean"},
    "string": {"string"},
    "float32": {"number"},
    "float64": {"number"},
}


def model_type_problem(point: Point, declared: str | None) -> str | None:
    """Why a point of ``point.type`` cannot feed a model property of type ``declared``."""
    if declared is None:
        return None
    ok = MODEL_TYPES.get(point.type)
    if ok is None:  # integers
        integral = float(point.scale).is_integer() and float(point.offset).is_integer()
        ok = {"number", "integer"} if integral else {"number"}
    if declared not in ok:
        return (
            f"modbus {point.type}"
            + (f" with scale {point.scale:g}" if point.scale != 1 else "")
            + f" cannot feed a {declared} property"
        )
    return None


__all__ = [
    "FC_TABLE", "MAX_BITS", "MAX_REGISTERS", "ORDERS", "SIZES", "TYPES", "Point", "PointError",
    "line_key", "merged_options", "model_type_problem", "overlaps", "parse_command_register",
    "parse_frame_block", "parse_point", "parse_register",
]


# -- twin validate ----------------------------------------------------------------------------
def _parsed(doc: Any, base: tuple[str | int, ...], points: Mapping[str, Any],
            defaults: Mapping[str, Any], groups: set[str], problems: list[Any]) -> dict[str, Point]:
    out: dict[str, Point] = {}
    for name, spec in points.items():
        if not isinstance(spec, Mapping):
            continue
        try:
            point = parse_point(name, spec, defaults)
        except (PointError, ValueError, TypeError) as exc:
            field = getattr(exc, "field", None)
            path = (*base, name, field) if field and field in spec else (*base, name)
            problems.append(doc.problem(path, str(exc)))
            continue
        if point.group != "default" and point.group not in groups:
            problems.append(doc.problem((*base, name, "group"), f"unknown poll group {point.group!r}",
                                        f"declare it under groups: {{{point.group}: 1s}}"))
        out[name] = point
    return out


def _model_decls(model: Any) -> dict[str, Mapping[str, Any]]:
    spec = model.body.get("spec") if model is not None else None
    if not isinstance(spec, Mapping):
        return {}
    return {**(spec.get("telemetry") or {}), **(spec.get("properties") or {})}


def modbus_problems(loaded: Any) -> list[Any]:
    """Located problems of every Modbus point map (DeviceModel ``spec.modbus`` and Device
    ``spec.binding.modbus``): register notation and ranges, register count vs type,
    overlapping addresses, writes to read-only tables, bad write function codes, unknown poll
    groups, unit ids (range on serial lines, duplicates on one line or gateway), serial
    settings that disagree on one port, and point types vs the model's property types."""
    problems: list[Any] = []
    invalid = loaded.invalid
    models = loaded.of_kind("DeviceModel")
    model_points: dict[str, dict[str, Point]] = {}
    for mname, mdoc in models.items():
        if mdoc.key in invalid:
            continue
        mmap = (mdoc.body.get("spec") or {}).get("modbus")
        if not isinstance(mmap, Mapping):
            continue
        base: tuple[str, ...] = ("spec", "modbus", "points")
        pts = _parsed(mdoc, base, mmap.get("points") or {}, mmap, set(mmap.get("groups") or {}), problems)
        decls = _model_decls(mdoc)
        for name, p in pts.items():
            if name not in decls:
                problems.append(mdoc.problem((*base, name), f"{name!r} is not a property or telemetry point of this model"))
            elif (msg := model_type_problem(p, decls[name].get("type"))) is not None:
                problems.append(mdoc.problem((*base, name, "type"), msg))
        for later, earlier in overlaps(pts.values()):
            problems.append(mdoc.problem((*base, later.name), _overlap_message(later, earlier)))
        model_points[mname] = pts

    lines: dict[tuple[str, ...], list[tuple[int, Any, Mapping[str, Any]]]] = {}
    for doc in sorted(loaded.of_kind("Device").values(), key=lambda d: (d.source.file, d.source.index)):
        if doc.key in invalid:
            continue
        spec = doc.body.get("spec") or {}
        opts = (spec.get("binding") or {}).get("modbus") if isinstance(spec.get("binding"), Mapping) else None
        if not isinstance(opts, Mapping):
            continue
        model = models.get(str(spec.get("model"))) if spec.get("model") else None
        mmap = ((model.body.get("spec") or {}).get("modbus") if model is not None else None)
        if opts.get("model") is False or model is None or model.key in invalid:
            mmap = None
        merged = merged_options(mmap if isinstance(mmap, Mapping) else None, opts)
        base = ("spec", "binding", "modbus", "points")
        own = _parsed(doc, base, opts.get("points") or {}, merged, set(merged.get("groups") or {}), problems)
        inherited = {n: p for n, p in model_points.get(str(spec.get("model")), {}).items()
                     if mmap is not None and n not in own}
        model_missing = bool(spec.get("model")) and (model is None or model.key in invalid)
        has_frame = _frame_problems(doc, opts, problems)
        if not own and not inherited and not model_missing and not has_frame:  # else: the model's
            problems.append(doc.problem(("spec", "binding", "modbus"), "no points to poll",
                                        "add points here or under the DeviceModel's spec.modbus"))
        decls = _model_decls(model)
        for name, p in own.items():
            if name in decls and (msg := model_type_problem(p, decls[name].get("type"))) is not None:
                problems.append(doc.problem((*base, name, "type"), msg))
        allp = [*inherited.values(), *own.values()]
        for later, earlier in overlaps(allp):
            if later.name not in own and earlier.name not in own:
                continue  # the model's own overlap: reported on the model
            where = (*base, later.name) if later.name in own else ("spec", "binding", "modbus")
            problems.append(doc.problem(where, _overlap_message(later, earlier)
                                        + ("" if earlier.name in own else " (from the model's map)")))
        unit = opts.get("unit", 1)
        key = line_key(opts)
        if isinstance(unit, int):
            if key[0] == "rtu" and unit not in RTU_UNITS:
                problems.append(doc.problem(("spec", "binding", "modbus", "unit"),
                                            f"unit id {unit} is not a device address on a serial line (1-247)",
                                            "0 is broadcast (no replies), 248-255 are reserved"))
            lines.setdefault(key, []).append((unit, doc, opts))
    for key, members in lines.items():
        seen: dict[int, Any] = {}
        serial0: Mapping[str, Any] | None = None
        for unit, doc, opts in members:
            if unit in seen:
                other = seen[unit]
                where = other.location
                problems.append(doc.problem(
                    ("spec", "binding", "modbus", "unit"),
                    f"unit id {unit} is already used by Device {other.name!r} on the same "
                    f"{'serial line' if key[0] == 'rtu' else 'gateway'} {':'.join(key[1:3])}",
                    f"{other.name!r} is defined at {where}" if where else None))
            else:
                seen[unit] = doc
            serial = opts.get("serial")
            if isinstance(serial, Mapping):
                settings = {k: serial.get(k) for k in ("baud", "parity", "stop_bits", "data_bits")}
                if serial0 is None:
                    serial0 = settings
                elif settings != serial0:
                    problems.append(doc.problem(
                        ("spec", "binding", "modbus", "serial"),
                        f"serial settings {settings} differ from another device on {key[1]} "
                        f"{dict(serial0)}: one port has one baud rate, parity and framing"))
    problems.extend(server_problems(loaded))
    return problems


def _frame_problems(doc: Any, opts: Mapping[str, Any], problems: list[Any]) -> bool:
    """A codec's frame (``codec``, ``frame``, ``command``): each block parses, and they come
    together. True when the device has a frame to poll."""
    base = ("spec", "binding", "modbus")
    frame = opts.get("frame")
    codec = opts.get("codec")
    if codec is not None and not frame:
        problems.append(doc.problem((*base, "codec"), "a codec needs frame: the registers it decodes",
                                    "e.g. frame: [{register: 40001, count: 4}]"))
    if frame and codec is None:
        problems.append(doc.problem((*base, "frame"), "frame without a codec: nothing decodes it",
                                    "name a Plugin with role: codec in codec:"))
    if opts.get("command") is not None and codec is None:
        problems.append(doc.problem((*base, "command"), "command without a codec: nothing encodes it"))
    for i, block in enumerate(frame if isinstance(frame, list) else []):
        if not isinstance(block, Mapping):
            continue
        try:
            parse_frame_block(block)
        except PointError as exc:
            path = (*base, "frame", i, exc.field) if exc.field in block else (*base, "frame", i)
            problems.append(doc.problem(path, str(exc)))
    cmd = opts.get("command")
    if isinstance(cmd, Mapping):
        try:
            parse_command_register(cmd)
        except PointError as exc:
            problems.append(doc.problem((*base, "command", "register"), str(exc)))
    return bool(frame) or codec is not None  # a codec without frame is reported above


def _overlap_message(later: Point, earlier: Point) -> str:
    def span(p: Point) -> str:
        if p.bit is not None:
            return f"address {p.address} bit {p.bit}"
        return f"address {p.address}" + (f"-{p.end - 1}" if p.count > 1 else "")
    return (f"{span(later)} ({FC_TABLE[later.fc]}) overlaps point {earlier.name!r} "
            f"({span(earlier)})")


def server_problems(loaded: Any) -> list[Any]:
    """Located problems of every Site's ``spec.modbus_server`` (slave mode): point maps as for
    a device, each unit's device in this site, points that are the device model's properties
    or telemetry, writable points only on writable properties, duplicate unit ids."""
    problems: list[Any] = []
    devices = loaded.of_kind("Device")
    models = loaded.of_kind("DeviceModel")
    for sdoc in loaded.of_kind("Site").values():
        if sdoc.key in loaded.invalid:
            continue
        server = (sdoc.body.get("spec") or {}).get("modbus_server")
        if not isinstance(server, Mapping):
            continue
        seen: set[int] = set()
        for i, u in enumerate(server.get("units") or []):
            if not isinstance(u, Mapping):
                continue
            base: tuple[str | int, ...] = ("spec", "modbus_server", "units", i)
            if u.get("unit") in seen:
                problems.append(sdoc.problem((*base, "unit"), f"unit id {u.get('unit')} is served twice"))
            seen.add(u.get("unit"))  # type: ignore[arg-type]
            ddoc = devices.get(str(u.get("device")))
            if ddoc is None:
                problems.append(sdoc.problem((*base, "device"), f"unknown Device {u.get('device')!r}"))
                continue
            dsite = (ddoc.body.get("metadata") or {}).get("site")
            if dsite != sdoc.name:
                problems.append(sdoc.problem((*base, "device"),
                                             f"Device {ddoc.name!r} belongs to site {dsite!r}, not {sdoc.name!r}",
                                             "a site's SCADA server exposes only its own devices"))
            mname = (ddoc.body.get("spec") or {}).get("model")
            mdoc = models.get(str(mname)) if mname else None
            spec = (mdoc.body.get("spec") or {}) if mdoc is not None else {}
            props = spec.get("properties") or {}
            decls = {**(spec.get("telemetry") or {}), **props}
            pts = _parsed(sdoc, (*base, "points"), u.get("points") or {}, u, {"default"}, problems)
            for name, p in pts.items():
                if mdoc is not None and name not in decls:
                    problems.append(sdoc.problem((*base, "points", name),
                                                 f"{name!r} is not a property or telemetry point of model {mdoc.name!r}"))
                    continue
                if p.writable and mdoc is not None and (props.get(name) or {}).get("access") not in ("write", "readwrite"):
                    problems.append(sdoc.problem((*base, "points", name, "access"),
                                                 f"{name!r} is not a writable property of model {mdoc.name!r}",
                                                 "a SCADA may write only properties with access: readwrite"))
                elif name in decls and (msg := model_type_problem(p, decls[name].get("type"))) is not None:
                    problems.append(sdoc.problem((*base, "points", name, "type"), msg))
            for later, earlier in overlaps(pts.values()):
                problems.append(sdoc.problem((*base, "points", later.name), _overlap_message(later, earlier)))
    return problems
