"""What a report holds once its data is gathered: sections of stats, series and tables.

Times are unix seconds (UTC) throughout; renderers show them in the report's time zone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twin.spec.periods import Period

TIME, NUMBER, TEXT = "time", "number", "text"


@dataclass
class Table:
    columns: list[str]
    kinds: list[str]  # TIME | NUMBER | TEXT per column
    rows: list[list[Any]] = field(default_factory=list)
    truncated: bool = False  # more rows exist than the section's limit

    def column(self, name: str) -> list[Any]:
        i = self.columns.index(name)
        return [r[i] for r in self.rows]


@dataclass
class Series:
    label: str  # "temp_sensor_01 · temperature" or "temperature (avg of 1,000 devices)"
    ts: list[float]
    values: list[float | None]
    low: list[float | None] | None = None  # a min-max band (many devices summarised)
    high: list[float | None] | None = None


@dataclass
class SectionData:
    index: int
    type: str
    title: str
    spec: dict[str, Any]
    devices: list[str] = field(default_factory=list)
    value: float | None = None  # stat
    unit: str | None = None
    series: list[Series] = field(default_factory=list)  # timeseries
    table: Table | None = None
    text: str | None = None  # markdown
    note: str | None = None  # e.g. "averaged over 1,000 devices"
    bucket: float | None = None

    @property
    def slug(self) -> str:
        base = "".join(c if c.isalnum() else "-" for c in self.title.lower()).strip("-")
        while "--" in base:
            base = base.replace("--", "-")
        return f"{self.index + 1:02d}-{base or self.type}"[:40]


@dataclass
class ReportData:
    name: str
    title: str
    site: str | None
    site_title: str | None
    period: Period
    generated_at: float
    language: str
    description: str
    sections: list[SectionData]
    spec: dict[str, Any]

    def as_context(self) -> dict[str, Any]:
        """What a Jinja2 template sees besides the helpers (see twin.reports.pdf)."""
        return {
            "name": self.name,
            "title": self.title,
            "site": self.site,
            "site_title": self.site_title,
            "period": self.period,
            "generated_at": self.generated_at,
            "language": self.language,
            "description": self.description,
            "sections": self.sections,
        }
