"""Dashboards: located checks of ``kind: Dashboard`` panels and the default dashboard of a site.

Pure functions over plain documents (no Streamlit, no I/O): the Streamlit app in
``dashboards/`` uses them to lay out pages, and :func:`twin.spec.refs.reference_problems`
calls :func:`dashboard_problems` so ``twin validate`` reports unknown panel metrics and
selectors as ``file:line:col`` errors.

Layout: a page has ``panels`` (stacked; consecutive panels with a ``width`` share a row while
their widths fit in 12) and/or ``rows`` (``{panels: [...]}``, side by side, each panel taking
``width`` of 12 columns; without widths they share the row equally).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from twin.errors import Problem
from twin.spec.documents import Document, LoadedSpecs
from twin.spec.units import parse_duration

Path = tuple[str | int, ...]
Doc = Mapping[str, Any]

PANEL_TYPES = (
    "map",
    "stat",
    "timeseries",
    "alarms",
    "devices",
    "commands",
    "scenes",
    "history",
    "markdown",
    "video",
    "cluster",
    "reports",
    "edges",
)
SELECT_KEYS = ("site", "group", "tag", "device", "type", "model")
NEEDS_METRIC = {"stat": "metric", "timeseries": "metrics"}
DEFAULT_REFRESH = "2s"


def as_list(value: Any) -> list[str]:
    """``'a'`` → ``['a']``, ``['a', 'b']`` unchanged, None → ``[]``."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def panel_metrics(panel: Mapping[str, Any]) -> list[str]:
    """Metrics a panel names (``metric`` then ``metrics``, without repeats)."""
    out: list[str] = []
    for m in [*as_list(panel.get("metric")), *as_list(panel.get("metrics"))]:
        if m not in out:
            out.append(m)
    return out


def group_chain(groups: Mapping[str, Doc], group: str | None) -> list[str]:
    out: list[str] = []
    while group and group not in out:
        out.append(group)
        g = groups.get(group)
        group = ((g or {}).get("spec") or {}).get("parent")
    return out


def device_matches(
    device: Doc, select: Mapping[str, Any] | None, groups: Mapping[str, Doc] | None = None
) -> bool:
    """Does a Device document match a panel selector? A group matches its nested groups."""
    if not select:
        return True
    meta = device.get("metadata") or {}
    spec = device.get("spec") or {}
    for key in SELECT_KEYS:
        wanted = as_list(select.get(key))
        if not wanted:
            continue
        if key == "site":
            ok = meta.get("site") in wanted
        elif key == "device":
            ok = meta.get("name") in wanted
        elif key == "group":
            ok = bool(set(group_chain(groups or {}, meta.get("group"))) & set(wanted))
        elif key == "tag":
            ok = bool(set(meta.get("tags") or ()) & set(wanted))
        else:
            ok = spec.get(key) in wanted
        if not ok:
            return False
    return True


def select_devices(
    devices: Iterable[Doc],
    select: Mapping[str, Any] | None,
    groups: Mapping[str, Doc] | None = None,
) -> list[str]:
    """Names of the selected Device documents, sorted."""
    return sorted(
        str((d.get("metadata") or {}).get("name"))
        for d in devices
        if device_matches(d, select, groups)
    )


def page_rows(page: Mapping[str, Any]) -> list[list[dict[str, Any]]]:
    """A page's panels as rows of panels (see the module docstring), in YAML key order."""
    rows: list[list[dict[str, Any]]] = []
    for key in page:
        if key == "rows":
            for row in page.get("rows") or []:
                rows.append([dict(p) for p in row.get("panels") or []])
        elif key == "panels":
            current: list[dict[str, Any]] = []
            used = 0
            for panel in page.get("panels") or []:
                width = panel.get("width")
                if current and (width is None or used + int(width) > 12):
                    rows.append(current)
                    current, used = [], 0
                current.append(dict(panel))
                used += int(width) if width is not None else 12
            if current:
                rows.append(current)
    return rows


def row_widths(row: Sequence[Mapping[str, Any]]) -> list[int]:
    """Relative widths of a row's panels (missing widths share what is left of 12)."""
    given = sum(int(p["width"]) for p in row if p.get("width") is not None)
    missing = [p for p in row if p.get("width") is None]
    share = (
        max(1, (12 - given) // len(missing)) if missing and given < 12 else 12 // max(1, len(row))
    )
    return [int(p["width"]) if p.get("width") is not None else share for p in row]


def iter_panels(spec: Mapping[str, Any]) -> Iterator[tuple[Path, dict[str, Any]]]:
    """``(path in the document, panel)`` for every panel of a Dashboard spec."""
    pages = spec.get("pages")
    if not isinstance(pages, list):
        return
    for i, page in enumerate(pages):
        if not isinstance(page, dict):
            continue
        panels = page.get("panels")
        if isinstance(panels, list):
            for j, panel in enumerate(panels):
                if isinstance(panel, dict):
                    yield ("spec", "pages", i, "panels", j), panel
        rows = page.get("rows")
        if isinstance(rows, list):
            for r, row in enumerate(rows):
                rpanels = row.get("panels") if isinstance(row, dict) else None
                if isinstance(rpanels, list):
                    for j, panel in enumerate(rpanels):
                        if isinstance(panel, dict):
                            yield ("spec", "pages", i, "rows", r, "panels", j), panel


def _hint(name: str, candidates: Iterable[str]) -> str | None:
    cands = sorted(set(candidates))
    close = difflib.get_close_matches(name, cands, n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    if cands and len(cands) <= 8:
        return f"known: {', '.join(cands)}"
    return None


def model_points(model: Doc | None) -> dict[str, dict[str, Any]]:
    """Telemetry and properties of a DeviceModel document, by name."""
    spec = (model or {}).get("spec") or {}
    out: dict[str, dict[str, Any]] = {}
    for section in ("properties", "telemetry"):
        decls = spec.get(section)
        if isinstance(decls, dict):
            out.update({k: v for k, v in decls.items() if isinstance(v, dict)})
    return out


def dashboard_problems(loaded: LoadedSpecs) -> list[Problem]:
    """Unknown panel selectors and metrics, selectors that match nothing, missing metrics and
    bad durations of every Dashboard document, each located at its YAML node."""
    problems: list[Problem] = []
    dashboards = loaded.of_kind("Dashboard")
    if not dashboards:
        return problems
    devices = {n: d.body for n, d in loaded.of_kind("Device").items()}
    groups = {n: d.body for n, d in loaded.of_kind("DeviceGroup").items()}
    models = {n: d.body for n, d in loaded.of_kind("DeviceModel").items()}
    sites = set(loaded.of_kind("Site"))
    tags = {t for d in devices.values() for t in ((d.get("metadata") or {}).get("tags") or ())}
    types = {str((d.get("spec") or {}).get("type")) for d in devices.values()}
    known: dict[str, set[str]] = {
        "site": sites,
        "group": set(groups),
        "device": set(devices),
        "tag": tags,
        "type": types,
        "model": set(models),
    }
    for doc in dashboards.values():
        spec = doc.body.get("spec")
        if not isinstance(spec, dict):
            continue
        refresh = spec.get("refresh")
        if isinstance(refresh, str | int | float):
            _duration(doc, ("spec", "refresh"), refresh, problems)
        for path, panel in iter_panels(spec):
            _check_panel(doc, path, panel, devices, groups, models, known, problems)
    return problems


def _duration(doc: Document, path: Path, value: Any, problems: list[Problem]) -> None:
    try:
        if parse_duration(value) <= 0:
            problems.append(doc.problem(path, f"{value!r} must be longer than zero"))
    except (ValueError, TypeError):
        pass  # the schema reported it


def _check_panel(
    doc: Document,
    path: Path,
    panel: dict[str, Any],
    devices: Mapping[str, Doc],
    groups: Mapping[str, Doc],
    models: Mapping[str, Doc],
    known: dict[str, set[str]],
    problems: list[Problem],
) -> None:
    ptype = panel.get("type")
    if ptype not in PANEL_TYPES:
        return  # the schema reported it (with the list of types)
    select = panel.get("select")
    select_ok = True
    if isinstance(select, dict):
        for key in SELECT_KEYS:
            for k, value in enumerate(as_list(select.get(key))):
                if value not in known[key]:
                    select_ok = False
                    where: Path = (*path, "select", key)
                    if isinstance(select.get(key), list):
                        where = (*where, k)
                    problems.append(
                        doc.problem(where, f"unknown {key} {value!r}", _hint(value, known[key]))
                    )
    chosen = [devices[n] for n in select_devices(devices.values(), select, groups)]
    if select_ok and isinstance(select, dict) and select and not chosen:
        problems.append(
            doc.problem(
                (*path, "select"),
                "selects no device",
                "the selector keys must all match one device",
            )
        )
    for key in ("range", "every"):
        if key in panel:
            _duration(doc, (*path, key), panel[key], problems)
    metrics = panel_metrics(panel)
    need = NEEDS_METRIC.get(str(ptype))
    if need and not metrics:
        problems.append(
            doc.problem(
                path,
                f"a {ptype} panel needs {need}",
                f"add {need}: naming telemetry of the selected devices",
            )
        )
    if not metrics or not select_ok:
        return
    pool = chosen if chosen else list(devices.values())
    if any(
        str((d.get("spec") or {}).get("model")) not in models
        for d in pool
        if (d.get("spec") or {}).get("model") is not None
    ):
        return  # a device's model is missing: reported at the device, not repeated here
    available: set[str] = set()
    for d in pool:
        available |= set(model_points(models.get(str((d.get("spec") or {}).get("model")))))
    for m in metrics:
        if m in available:
            continue
        if isinstance(panel.get("metrics"), list) and m in panel["metrics"]:
            where = (*path, "metrics", panel["metrics"].index(m))
        else:
            where = (*path, "metric")
        scope = "the selected devices" if select else "any device model"
        problems.append(
            doc.problem(
                where,
                f"unknown metric {m!r}: not telemetry or a property of {scope}",
                _hint(m, available),
            )
        )


# -- the default dashboard ----------------------------------------------------------------------
def default_dashboard(docs: Iterable[Doc], site: str | None = None) -> dict[str, Any]:
    """The dashboard of a site that declares none: status map, device and alarm tables, one
    chart per device model's numeric telemetry, scenes, and a history page."""
    docs = list(docs)
    devices = [d for d in docs if d.get("kind") == "Device"]
    models = {
        str((d.get("metadata") or {}).get("name")): d
        for d in docs
        if d.get("kind") == "DeviceModel"
    }
    sites = [d for d in docs if d.get("kind") == "Site"]
    if site is None and sites:
        site = str((sites[0].get("metadata") or {}).get("name"))
    sel: dict[str, Any] = {"site": site} if site else {}
    if site:
        devices = [d for d in devices if (d.get("metadata") or {}).get("site") == site]
    title = next(
        (
            str((s.get("spec") or {}).get("title") or (s.get("metadata") or {}).get("name"))
            for s in sites
            if (s.get("metadata") or {}).get("name") == site
        ),
        site or "FLUX IoT",
    )
    used_models = sorted(
        {
            str((d.get("spec") or {}).get("model"))
            for d in devices
            if (d.get("spec") or {}).get("model") in models
        }
    )
    charts: list[dict[str, Any]] = []
    for mname in used_models:
        tele = (models[mname].get("spec") or {}).get("telemetry") or {}
        numeric = [
            k
            for k, v in tele.items()
            if isinstance(v, dict) and v.get("type") in ("number", "integer")
        ]
        if numeric:
            charts.append(
                {
                    "type": "timeseries",
                    "title": f"{mname}",
                    "metrics": numeric[:4],
                    "select": {**sel, "model": mname},
                    "range": "15m",
                    "width": 6,
                }
            )
    stats: list[dict[str, Any]] = []
    for chart in charts[:4]:
        metric = chart["metrics"][0]
        stats.append(
            {
                "type": "stat",
                "title": f"{metric} (avg)",
                "metric": metric,
                "aggregate": "avg",
                "select": chart["select"],
                "width": 3,
            }
        )
    status_row = [
        {"type": "map", "title": "Devices by status", "select": sel, "width": 7},
        {
            "type": "alarms",
            "title": "Active alarms",
            "select": sel,
            "states": ["active", "acknowledged"],
            "width": 5,
        },
    ]
    rows = [{"panels": stats}] if stats else []
    rows.append({"panels": status_row})
    table = {
        "type": "devices",
        "title": "Devices",
        "select": sel,
        "columns": ["name", "type", "group", "status", "last_seen"],
    }
    pages: list[dict[str, Any]] = [{"title": "Overview", "rows": rows, "panels": [table]}]
    if charts:
        pages.append({"title": "Telemetry", "panels": charts})
    pages.append(
        {
            "title": "Control",
            "panels": [
                {"type": "commands", "title": "Commands", "select": sel, "width": 6},
                {"type": "scenes", "title": "Scenes", "width": 6},
            ],
        }
    )
    pages.append({"title": "History", "panels": [{"type": "history", "select": sel}]})
    return {
        "apiVersion": "flux.iot/v1",
        "kind": "Dashboard",
        "metadata": {
            "name": f"{site or 'site'}-default",
            **({"site": site} if site else {}),
            "labels": {"generated": "true"},
        },
        "spec": {"title": title, "refresh": DEFAULT_REFRESH, "pages": pages},
    }


def dashboards_of(docs: Iterable[Doc]) -> list[dict[str, Any]]:
    """The declared Dashboard documents (sorted by name), or the generated default."""
    docs = list(docs)
    declared = sorted(
        (dict(d) for d in docs if d.get("kind") == "Dashboard"),
        key=lambda d: str((d.get("metadata") or {}).get("name")),
    )
    return declared or [default_dashboard(docs)]


__all__ = [
    "PANEL_TYPES",
    "dashboard_problems",
    "dashboards_of",
    "default_dashboard",
    "device_matches",
    "iter_panels",
    "model_points",
    "page_rows",
    "panel_metrics",
    "row_widths",
    "select_devices",
]
