"""What every panel gets: the API client, the logged-in user, the site's documents, the devices
(one ``GET /devices`` per rerun) and helpers to turn query answers into DataFrames."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from dashboards.client import FluxClient, Login, Table
from dashboards.live import LiveFeed
from twin.spec.dashboards import as_list, device_matches
from twin.spec.units import parse_duration

STATUS_COLORS: dict[str, tuple[int, int, int]] = {
    "online": (46, 160, 67),
    "offline": (128, 128, 128),
    "fault": (214, 39, 40),
    "maintenance": (255, 165, 0),
    "unknown": (90, 120, 200),
}
STATUS_ICONS = {
    "online": ":green[●]",
    "offline": ":gray[●]",
    "fault": ":red[●]",
    "maintenance": ":orange[●]",
    "unknown": ":blue[●]",
}
MAX_NAMES = 200
"""Above this many devices a type/model selector is not sent as a list of device names."""
NICE_BUCKETS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400)


@dataclass
class Config:
    server: str = "http://127.0.0.1:8080"
    site: str | None = None
    token: str | None = None
    refresh: float | None = None  # overrides the dashboard's refresh; 0 = off

    @classmethod
    def from_env(cls) -> Config:
        refresh = os.environ.get("FLUX_REFRESH")
        return cls(
            server=os.environ.get("FLUX_SERVER", cls.server),
            site=os.environ.get("FLUX_SITE") or None,
            token=os.environ.get("FLUX_TOKEN") or None,
            refresh=parse_duration(refresh) if refresh not in (None, "") else None,
        )


_PRELOADED: dict[str, list[dict[str, Any]]] = {}


def preload_docs(site: str | None) -> None:
    """Read the site's documents now (``dashboards.serve``, before the server starts)."""
    if site:
        _PRELOADED[site] = load_docs(site)


def load_docs(site: str | None) -> list[dict[str, Any]]:
    """The site's documents (for the Dashboard, device models and locations), or []."""
    if not site or not Path(site).exists():
        return []
    if site in _PRELOADED:
        return _PRELOADED.pop(site)
    from twin.spec import load_site

    return [dict(d.body) for d in load_site(site).documents.values()]


def as_doc(summary: Mapping[str, Any]) -> dict[str, Any]:
    """An API device summary shaped like a Device document, for selectors."""
    return {
        "kind": "Device",
        "metadata": {k: summary.get(k) for k in ("name", "site", "group", "tags", "labels")},
        "spec": {"type": summary.get("type"), "model": summary.get("model")},
    }


@dataclass
class Ctx:
    client: FluxClient
    login: Login
    docs: list[dict[str, Any]]
    devices: list[dict[str, Any]] = field(default_factory=list)
    live: LiveFeed | None = None
    """The WebSocket feed (None: REST polling only, e.g. under AppTest)."""
    _index: dict[tuple[str, str], dict[str, Any]] | None = field(default=None, repr=False)
    _selected: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False)

    @property
    def groups(self) -> dict[str, dict[str, Any]]:
        return {str(d["metadata"]["name"]): d for d in self.docs if d.get("kind") == "DeviceGroup"}

    def doc(self, kind: str, name: str | None) -> dict[str, Any] | None:
        if self._index is None:
            self._index = {
                (str(d.get("kind")), str((d.get("metadata") or {}).get("name"))): d
                for d in self.docs
            }
        return self._index.get((kind, str(name)))

    def selected(self, panel: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Device summaries (from the API) that the panel's selector matches."""
        select = panel.get("select")
        memo = repr(select)
        hit = self._selected.get(memo)
        if hit is None:
            if not select:
                hit = list(self.devices)
            else:
                groups = self.groups
                hit = [d for d in self.devices if device_matches(as_doc(d), select, groups)]
            self._selected[memo] = hit
        return hit

    def model_commands(self, model: str | None) -> dict[str, Any]:
        doc = self.doc("DeviceModel", model)
        cmds = ((doc or {}).get("spec") or {}).get("commands") or {}
        return dict(cmds) if isinstance(cmds, dict) else {}

    def unit(self, metric: str) -> str:
        for d in self.docs:
            if d.get("kind") == "DeviceModel":
                spec = d.get("spec") or {}
                for section in ("telemetry", "properties"):
                    decl = (spec.get(section) or {}).get(metric)
                    if isinstance(decl, dict) and decl.get("unit"):
                        return str(decl["unit"])
        return ""

    def metrics(self) -> list[str]:
        out: set[str] = set()
        for d in self.docs:
            if d.get("kind") == "DeviceModel":
                out |= set((d.get("spec") or {}).get("telemetry") or {})
        return sorted(out)


def metric_label(metric: str, unit: str) -> str:
    """``temperature °C``; the unit left out where the name already says it (``motor_rpm``)."""
    if not unit or unit.casefold() in metric.casefold().split("_"):
        return metric
    return f"{metric} {unit}"


def bucket_for(span_s: float, points: int = 120) -> int:
    """A round bucket (seconds) giving about ``points`` buckets over ``span_s``."""
    want = max(1.0, span_s / points)
    for b in NICE_BUCKETS:
        if b >= want:
            return b
    return int(math.ceil(want / 86400) * 86400)


def fmt_seconds(s: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size and s % size == 0:
            return f"{int(s // size)}{unit}"
    return f"{int(s)}s"


def frame(table: Table) -> pd.DataFrame:
    df = pd.DataFrame(table.rows, columns=table.columns)
    if "ts" in df.columns:
        df["ts"] = pd.to_datetime(df["ts"], utc=True, format="ISO8601")
    return df


def series_key(df: pd.DataFrame, value_cols: list[str]) -> pd.Series:
    """One label per row from the columns that are neither time nor values."""
    keys = [c for c in df.columns if c not in ("ts", *value_cols)]
    if not keys:
        return pd.Series(["value"] * len(df), index=df.index)
    varying = [c for c in keys if df[c].nunique(dropna=False) > 1]
    keys = varying or keys[:1]  # a column with one value (one metric) adds nothing to a label
    return df[keys].astype(str).agg(" / ".join, axis=1)


def segments(df: pd.DataFrame, by: str, every_s: float) -> pd.Series:
    """A number per row that grows at every gap within a series (``by``): encoded as a
    chart's ``detail``, a line breaks there instead of bridging an outage with a straight
    line. A gap is longer than 1.5 buckets *and* than 2.5 times the series' usual spacing, so
    a device that reports less often than the bucket (one reading a minute in 30 s buckets)
    still draws a line, not a row of dots."""
    if df.empty:
        return pd.Series([], dtype=int, index=df.index)
    d = df.sort_values([by, "ts"])
    diff = d.groupby(by, sort=False)["ts"].diff().dt.total_seconds()
    usual = diff.groupby(d[by], sort=False).transform("median").fillna(0.0)
    gap = diff > (2.5 * usual).clip(lower=1.5 * every_s)
    return gap.groupby(d[by], sort=False).cumsum().astype(int).reindex(df.index)


def ago(ts: float | None) -> str:
    if ts is None:
        return "never"
    s = max(0.0, datetime.now(UTC).timestamp() - float(ts))
    if s < 60:
        return f"{int(s)} s ago"
    if s < 3600:
        return f"{int(s // 60)} min ago"
    return f"{s / 3600:.1f} h ago"


def select_params(panel: Mapping[str, Any], ctx: Ctx) -> dict[str, Any]:
    """Query parameters picking the panel's devices: site, tag and device pass through, a
    group stands for itself and its nested groups; type and model become device names."""
    select = panel.get("select") or {}
    if not select:
        return {}
    if select.get("type") or select.get("model"):
        names = [d["name"] for d in ctx.selected(panel)]
        if len(names) <= MAX_NAMES:
            return {"device": names or ["__none__"]}
        # too many names for a URL: the other keys narrow the query and the panel's metrics,
        # which belong to the model, do the rest
    out: dict[str, Any] = {}
    for key in ("site", "tag", "device"):
        if select.get(key):
            out[key] = as_list(select[key])
    if select.get("group"):
        wanted = set(as_list(select["group"]))
        groups = ctx.groups
        from twin.spec.dashboards import group_chain

        nested = {g for g in groups if wanted & set(group_chain(groups, g))} | wanted
        out["group"] = sorted(nested)
    return out


__all__ = [
    "STATUS_COLORS",
    "STATUS_ICONS",
    "Config",
    "Ctx",
    "ago",
    "as_doc",
    "as_list",
    "bucket_for",
    "fmt_seconds",
    "frame",
    "load_docs",
    "segments",
    "select_params",
    "series_key",
]
