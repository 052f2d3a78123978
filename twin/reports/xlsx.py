"""XLSX with xlsxwriter in constant-memory mode: a summary sheet, then a sheet per section
(``per_device: true`` — the default for readings of up to 100 devices — a sheet per device),
native Excel charts for time-series sections.

Excel has no time zones: times are written as the report's *local* wall time (the time zone
named in each time column's header and on the summary sheet), formatted as date-times, so a
reader sees what the PDF shows. Constant-memory mode writes each row as it goes: a sheet is
filled top to bottom, before the next one starts.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any

from twin.reports.model import NUMBER, TIME, ReportData, SectionData, Table

PER_DEVICE_MAX = 100
_BAD = re.compile(r"[\[\]:*?/\\]")


class _Names:
    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, want: str) -> str:
        base = _BAD.sub("-", want).strip("'")[:31] or "sheet"
        name, n = base, 2
        while name.lower() in self.used:
            suffix = f" ({n})"
            name = base[: 31 - len(suffix)] + suffix
            n += 1
        self.used.add(name.lower())
        return name


def _local(data: ReportData) -> Callable[[float], datetime]:
    def conv(ts: float) -> datetime:
        return data.period.local(ts).replace(tzinfo=None)

    return conv


def excel_serial(timezone: str) -> Callable[[float], float]:
    """Unix seconds -> Excel's serial date of the local wall time (days since 1899-12-30).

    The UTC offset is looked up once per 15-minute slot (zone transitions fall on quarter
    hours), which makes 100k timestamps cheap; xlsxwriter's ``write_datetime`` would build a
    datetime per cell."""
    import zoneinfo

    zone = zoneinfo.ZoneInfo(timezone)
    offsets: dict[int, float] = {}

    def serial(ts: float) -> float:
        slot = int(ts // 900)
        off = offsets.get(slot)
        if off is None:
            delta = datetime.fromtimestamp(slot * 900, zone).utcoffset()
            off = offsets[slot] = delta.total_seconds() if delta is not None else 0.0
        return (ts + off) / 86400.0 + 25569.0

    return serial


def _write_table(
    ws: Any, table: Table, rows: list[list[Any]], start_row: int, fmts: dict[str, Any],
    local: Callable[[float], datetime], tz: str,
) -> int:
    headers = [f"{c} ({tz})" if k == TIME else c for c, k in zip(table.columns, table.kinds,
                                                                 strict=True)]
    ws.write_row(start_row, 0, headers, fmts["head"])
    for j, (c, k) in enumerate(zip(table.columns, table.kinds, strict=True)):
        ws.set_column(j, j, 20 if k == TIME else max(10, min(40, len(c) + 4)))
    r = start_row + 1
    serial = excel_serial(tz)
    write_number, write_string = ws.write_number, ws.write_string
    tfmt, nfmt = fmts["time"], fmts["num"]
    kinds = list(enumerate(table.kinds))
    for row in rows:
        for j, kind in kinds:
            cell = row[j]
            if cell is None:
                continue
            if kind == TIME:
                write_number(r, j, serial(float(cell)), tfmt)
            elif kind == NUMBER and isinstance(cell, int | float) and not isinstance(cell, bool):
                write_number(r, j, cell, nfmt)
            else:
                write_string(r, j, str(cell))
        r += 1
    return r


def _chart(wb: Any, ws: Any, sheet: str, s: SectionData, table: Table, first: int,
           col: int) -> None:
    """A scatter-with-lines chart of each (device, metric) block of the long table."""
    if not table.rows:
        return
    chart = wb.add_chart({"type": "scatter", "subtype": "straight"})
    blocks: list[tuple[str, int, int]] = []
    if "device" in table.columns:
        di, mi = table.columns.index("device"), table.columns.index("metric")
        start = 0
        for i in range(1, len(table.rows) + 1):
            if i == len(table.rows) or table.rows[i][di] != table.rows[start][di] or \
                    table.rows[i][mi] != table.rows[start][mi]:
                label = str(table.rows[start][di])
                if len({r[mi] for r in table.rows}) > 1:
                    label += f" · {table.rows[start][mi]}"
                blocks.append((label, start, i - 1))
                start = i
        vcol = len(table.columns) - 1
    else:  # the mean of many devices: avg column per metric
        mi = table.columns.index("metric")
        start = 0
        for i in range(1, len(table.rows) + 1):
            if i == len(table.rows) or table.rows[i][mi] != table.rows[start][mi]:
                blocks.append((f"{table.rows[start][mi]} (mean)", start, i - 1))
                start = i
        vcol = table.columns.index("avg")
    for label, a, b in blocks[:16]:
        chart.add_series({
            "name": label,
            "categories": [sheet, first + a, 0, first + b, 0],
            "values": [sheet, first + a, vcol, first + b, vcol],
            "line": {"width": 1.5},
            "marker": {"type": "none"},
        })
    chart.set_title({"name": s.title})
    chart.set_x_axis({"date_axis": True, "num_format": "hh:mm", "major_gridlines": {"visible": False}})
    chart.set_y_axis({"name": s.unit or "", "major_gridlines": {"visible": True, "line": {"color": "#e3e8ee"}}})
    chart.set_legend({"position": "bottom"})
    chart.set_size({"width": 760, "height": 320})
    ws.insert_chart(1, col, chart)


def render_xlsx(data: ReportData) -> bytes:
    import xlsxwriter

    buf = io.BytesIO()
    wb = xlsxwriter.Workbook(buf, {"constant_memory": True, "in_memory": False,
                                   "default_date_format": "yyyy-mm-dd hh:mm:ss"})
    try:
        fmts = {
            "head": wb.add_format({"bold": True, "bg_color": "#E9EEF5", "bottom": 1}),
            "time": wb.add_format({"num_format": "yyyy-mm-dd hh:mm:ss"}),
            "num": wb.add_format({"num_format": "#,##0.###"}),
            "title": wb.add_format({"bold": True, "font_size": 16, "font_color": "#0F2D52"}),
            "label": wb.add_format({"bold": True, "font_color": "#5B6674"}),
        }
        names = _Names()
        local = _local(data)
        tz = data.period.timezone
        # summary
        ws = wb.add_worksheet(names("Summary"))
        ws.set_column(0, 0, 26)
        ws.set_column(1, 1, 44)
        ws.write_string(0, 0, data.title, fmts["title"])
        meta = [
            ("Site", data.site_title or data.site or ""),
            ("Period", data.period.describe()),
            ("Period start", local(data.period.start)),
            ("Period end", local(data.period.end)),
            ("Time zone", tz),
            ("Generated", local(data.generated_at)),
        ]
        r = 2
        for label, value in meta:
            ws.write_string(r, 0, label, fmts["label"])
            if isinstance(value, datetime):
                ws.write_datetime(r, 1, value, fmts["time"])
            else:
                ws.write_string(r, 1, str(value))
            r += 1
        r += 1
        stats = [s for s in data.sections if s.type == "stat"]
        if stats:
            ws.write_row(r, 0, ["Statistic", "Value", "Unit", "Aggregate", "Devices"], fmts["head"])
            for s in stats:
                r += 1
                ws.write_string(r, 0, s.title)
                if s.value is not None:
                    ws.write_number(r, 1, s.value, fmts["num"])
                ws.write_string(r, 2, s.unit or "")
                ws.write_string(r, 3, str(s.spec.get("aggregate") or "avg"))
                ws.write_number(r, 4, len(s.devices))
        # one sheet per section (or device)
        for s in data.sections:
            if s.type in ("stat", "markdown") or s.table is None:
                continue
            table = s.table
            per_device = s.spec.get("per_device")
            if per_device is None:
                per_device = s.type == "readings" and len(s.devices) <= PER_DEVICE_MAX
            if per_device and "device" in table.columns:
                di = table.columns.index("device")
                by: dict[str, list[list[Any]]] = {}
                for row in table.rows:
                    by.setdefault(str(row[di]), []).append(row)
                for dev in sorted(by):
                    ws = wb.add_worksheet(names(f"{s.index + 1:02d} {dev}"))
                    _write_table(ws, table, by[dev], 0, fmts, local, tz)
                continue
            sheet = names(f"{s.index + 1:02d} {s.title}")
            ws = wb.add_worksheet(sheet)
            _write_table(ws, table, table.rows, 0, fmts, local, tz)
            if s.type == "timeseries":
                _chart(wb, ws, sheet, s, table, 1, len(table.columns) + 1)
    finally:
        wb.close()
    return buf.getvalue()


__all__ = ["render_xlsx"]
