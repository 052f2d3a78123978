"""CSV: one file per table section (raw readings, aggregates, alarms, commands, scene runs),
times as ISO 8601 with the report's UTC offset (``2026-03-01T06:00:00+01:00``), so a reader
never has to guess the zone. Several sections: a zip of one CSV each."""

from __future__ import annotations

import csv
import io
import zipfile

from twin.reports.model import TIME, ReportData, SectionData


def section_csv(data: ReportData, s: SectionData) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    assert s.table is not None
    w.writerow(s.table.columns)
    times = [i for i, k in enumerate(s.table.kinds) if k == TIME]
    for row in s.table.rows:
        out = list(row)
        for i in times:
            if out[i] is not None:
                out[i] = data.period.local(float(out[i])).isoformat()
        w.writerow(["" if v is None else v for v in out])
    return buf.getvalue().encode("utf-8")


def render_csv(data: ReportData) -> tuple[bytes, str]:
    """``(bytes, extension)``: a CSV when the report has one table, else a zip of them."""
    tables = [s for s in data.sections if s.table is not None]
    if len(tables) == 1:
        return section_csv(data, tables[0]), "csv"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for s in tables:
            z.writestr(f"{data.name}-{s.slug}.csv", section_csv(data, s))
    return buf.getvalue(), "zip"


__all__ = ["render_csv", "section_csv"]
