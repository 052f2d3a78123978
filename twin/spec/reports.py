"""Located checks of ``kind: Report`` and ``kind: NotificationRule`` documents.

Called by :func:`twin.spec.refs.reference_problems`, so ``twin validate`` reports, each at its
YAML node: unknown time zones, bad cron expressions, explicit periods that end before they
start, sections whose selectors or metrics name nothing (the Dashboard panel checks), and
report templates that are missing or do not compile — a Jinja2 syntax error is reported at
the *template's* file and line.

A report's template lives in the site folder next to the YAML (``layout.template``). The engine
renders from the registry, not from the folder, so a valid template's text is embedded into
the document here (``layout.source`` and ``layout.source_file``): ``twin apply`` records it in
the revision and ``twin plan`` shows a template change as a change of the report.
"""

from __future__ import annotations

import zoneinfo
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twin.errors import Location, Problem
from twin.spec.dashboards import SELECT_KEYS, _check_panel, as_list
from twin.spec.documents import Document, LoadedSpecs
from twin.spec.units import parse_duration

SECTION_AS_PANEL = {"table": "timeseries", "readings": "timeseries"}


def valid_timezone(name: Any) -> bool:
    if not isinstance(name, str) or not name:
        return False
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    return True


def _valid_cron(expr: Any) -> bool:
    from croniter import croniter

    return isinstance(expr, str) and len(expr.split()) == 5 and croniter.is_valid(expr)


def _tz(doc: Document, path: tuple[str | int, ...], value: Any, problems: list[Problem]) -> None:
    if value is not None and not valid_timezone(value):
        problems.append(
            doc.problem(path, f"unknown time zone {value!r}", "an IANA name, e.g. Europe/Berlin")
        )


def compile_template(source: str, filename: str) -> Problem | None:
    """A Jinja2 syntax error of a template, located at its file and line (None: it compiles)."""
    import jinja2

    env = jinja2.Environment(autoescape=True)
    try:
        env.parse(source, name=filename, filename=filename)
    except jinja2.TemplateSyntaxError as exc:
        return Problem(
            Location(filename, exc.lineno or 1, 1),
            f"template syntax error: {exc.message}",
            "Report",
            None,
            None,
            "see https://jinja.palletsprojects.com/templates/",
        )
    return None


def _template(doc: Document, spec: dict[str, Any], problems: list[Problem]) -> None:
    layout = spec.get("layout")
    if not isinstance(layout, dict) or not isinstance(layout.get("template"), str):
        return
    rel = layout["template"]
    file = doc.source.file
    if file:  # from a file: read the template next to it and embed it
        path = Path(file).parent / rel
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(
                doc.problem(
                    ("spec", "layout", "template"),
                    f"cannot read template {rel!r}: {getattr(exc, 'strerror', None) or exc}",
                    f"the path is relative to {Path(file).parent}",
                )
            )
            return
        shown = str(path)
    else:  # from memory (the API): the text must be embedded already
        source = layout.get("source")
        shown = str(layout.get("source_file") or rel)
        if not isinstance(source, str):
            problems.append(
                doc.problem(
                    ("spec", "layout", "template"),
                    "the template's text is not embedded (layout.source)",
                    "apply reports with templates from the site folder (twin apply PATH)",
                )
            )
            return
    bad = compile_template(source, shown)
    if bad is not None:
        problems.append(
            Problem(bad.location, bad.message, doc.kind, doc.name, "spec.layout.template", bad.hint)
        )
        return
    layout["source"] = source
    layout["source_file"] = shown


def _known(loaded: LoadedSpecs) -> tuple[dict[str, Any], ...]:
    devices = {n: d.body for n, d in loaded.of_kind("Device").items()}
    groups = {n: d.body for n, d in loaded.of_kind("DeviceGroup").items()}
    models = {n: d.body for n, d in loaded.of_kind("DeviceModel").items()}
    tags = {t for d in devices.values() for t in ((d.get("metadata") or {}).get("tags") or ())}
    types = {str((d.get("spec") or {}).get("type")) for d in devices.values()}
    known = {
        "site": set(loaded.of_kind("Site")),
        "group": set(groups),
        "device": set(devices),
        "tag": tags,
        "type": types,
        "model": set(models),
    }
    return devices, groups, models, known


def _select_problems(
    doc: Document, path: tuple[str | int, ...], select: Any, known: Mapping[str, set[str]],
    problems: list[Problem],
) -> None:
    if not isinstance(select, dict):
        return
    for key in SELECT_KEYS:
        for k, value in enumerate(as_list(select.get(key))):
            if value not in known[key]:
                where = (*path, key, k) if isinstance(select.get(key), list) else (*path, key)
                problems.append(doc.problem(where, f"unknown {key} {value!r}"))


def report_problems(loaded: LoadedSpecs) -> list[Problem]:
    problems: list[Problem] = []
    reports = loaded.of_kind("Report")
    rules = loaded.of_kind("NotificationRule")
    if not reports and not rules:
        return problems
    devices, groups, models, known = _known(loaded)
    for doc in reports.values():
        if doc.key in loaded.invalid:
            continue
        spec = doc.body.get("spec")
        if not isinstance(spec, dict):
            continue
        site = (doc.body.get("metadata") or {}).get("site")
        if site is not None and site not in known["site"]:
            problems.append(doc.problem(("metadata", "site"), f"unknown site {site!r}"))
        _tz(doc, ("spec", "timezone"), spec.get("timezone"), problems)
        schedule = spec.get("schedule")
        if isinstance(schedule, dict):
            if not _valid_cron(schedule.get("cron")):
                problems.append(
                    doc.problem(
                        ("spec", "schedule", "cron"),
                        f"{schedule.get('cron')!r} is not a cron expression",
                        "five fields: minute hour day-of-month month day-of-week, e.g. '0 6 * * *'",
                    )
                )
            _tz(doc, ("spec", "schedule", "timezone"), schedule.get("timezone"), problems)
        period = spec.get("period")
        if isinstance(period, dict):
            from twin.spec.periods import parse_instant

            tz = str(spec["timezone"]) if valid_timezone(spec.get("timezone")) else "UTC"
            try:
                if parse_instant(period["end"], tz) <= parse_instant(period["start"], tz):
                    problems.append(
                        doc.problem(("spec", "period", "end"), "the period ends before it starts")
                    )
            except (ValueError, KeyError, TypeError):
                pass  # the schema reported it
        _template(doc, spec, problems)
        for i, section in enumerate(spec.get("sections") or []):
            if not isinstance(section, dict):
                continue
            stype = str(section.get("type"))
            panel = dict(section)
            panel["type"] = SECTION_AS_PANEL.get(stype, stype)
            if stype in ("table", "readings") and not panel.get("metric") and not panel.get(
                "metrics"
            ):
                problems.append(
                    doc.problem(
                        ("spec", "sections", i),
                        f"a {stype} section needs metrics",
                        "add metrics: naming telemetry of the selected devices",
                    )
                )
                continue
            panel.pop("every", None)
            _check_panel(doc, ("spec", "sections", i), panel, devices, groups, models, known,
                         problems)
            if "every" in section:
                try:
                    if parse_duration(section["every"]) <= 0:
                        problems.append(
                            doc.problem(("spec", "sections", i, "every"), "must be longer than zero")
                        )
                except (ValueError, TypeError):
                    pass
    for doc in rules.values():
        if doc.key in loaded.invalid:
            continue
        spec = doc.body.get("spec")
        if not isinstance(spec, dict):
            continue
        site = (doc.body.get("metadata") or {}).get("site")
        if site is not None and site not in known["site"]:
            problems.append(doc.problem(("metadata", "site"), f"unknown site {site!r}"))
        match = spec.get("match")
        if isinstance(match, dict):
            _select_problems(doc, ("spec", "match", "select"), match.get("select"), known,
                             problems)
        quiet = spec.get("quiet_hours")
        if isinstance(quiet, dict):
            _tz(doc, ("spec", "quiet_hours", "timezone"), quiet.get("timezone"), problems)
        esc = spec.get("escalate")
        if isinstance(esc, dict):
            try:
                if parse_duration(esc["after"]) <= 0:
                    problems.append(
                        doc.problem(("spec", "escalate", "after"), "must be longer than zero")
                    )
            except (ValueError, TypeError, KeyError):
                pass
    return problems


__all__ = ["compile_template", "report_problems", "valid_timezone"]
