"""Checks across documents: references, cycles, desired values against models."""

from __future__ import annotations

import difflib
import re
import zoneinfo
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from twin.errors import Problem
from twin.spec.dashboards import dashboard_problems
from twin.spec.documents import Document, LoadedSpecs
from twin.spec.edge_check import edge_problems
from twin.spec.modbus import modbus_problems
from twin.spec.plugins import plugin_problems
from twin.spec.properties import value_problem
from twin.spec.reports import report_problems
from twin.spec.retention_check import retention_problems
from twin.spec.scenes import scene_problems
from twin.spec.units import parse_duration


def _did_you_mean(name: str, candidates: list[str]) -> str | None:
    close = difflib.get_close_matches(name, candidates, n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    if not candidates:
        return None
    if len(candidates) <= 8:
        return f"known: {', '.join(sorted(candidates))}"
    return None


def _ref(doc: Document, path: tuple[str | int, ...], target_kind: str, name: Any,
         targets: dict[str, Document], problems: list[Problem]) -> Document | None:
    if not isinstance(name, str):
        return None
    target = targets.get(name)
    if target is None:
        problems.append(doc.problem(path, f"unknown {target_kind} {name!r}",
                                    _did_you_mean(name, list(targets))))
    return target


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


_QUOTED = re.compile(r"'([^']+)'")
_WORD = re.compile(r"[\w.-]+")


def split_follow_ons(problems: list[Problem], broken: list[str]) -> tuple[list[Problem], int]:
    """Keep the cross-document problems that are not echoes of a file that could not be parsed.

    ``broken`` holds the text of each such file. Its documents are missing, so every
    reference to a model, device, property ... that it defines reports as unknown. A problem
    naming (in quotes) a word that appears in a broken file is taken for such an echo and
    left out; returns the problems kept and how many were left out. With no broken file,
    every problem is kept.
    """
    if not broken:
        return problems, 0
    words: set[str] = set()
    for text in broken:
        words.update(_WORD.findall(text))
    kept = [p for p in problems if not any(q in words for q in _QUOTED.findall(p.message))]
    return kept, len(problems) - len(kept)


def reference_problems(loaded: LoadedSpecs) -> list[Problem]:
    problems: list[Problem] = []
    sites = loaded.of_kind("Site")
    groups = loaded.of_kind("DeviceGroup")
    models = loaded.of_kind("DeviceModel")
    devices = loaded.of_kind("Device")
    invalid = loaded.invalid

    for doc in loaded.documents.values():
        site = _mapping(doc.body.get("metadata")).get("site")
        if site is not None and doc.kind != "Site":
            _ref(doc, ("metadata", "site"), "Site", site, sites, problems)

    for doc in sites.values():
        if doc.key in invalid:
            continue
        tz = doc.body.get("spec", {}).get("timezone")
        if isinstance(tz, str):
            try:
                zoneinfo.ZoneInfo(tz)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                problems.append(doc.problem(("spec", "timezone"), f"unknown time zone {tz!r}",
                                            "use an IANA name such as Europe/Berlin or UTC"))

    # Documents that failed their schema are still checked here (every problem in one run);
    # each check looks at the types it needs and skips what the schema already reported.
    for doc in groups.values():
        spec = _mapping(doc.body.get("spec"))
        parent = _ref(doc, ("spec", "parent"), "DeviceGroup", spec.get("parent"), groups, problems)
        if parent is not None:
            s1 = _mapping(doc.body.get("metadata")).get("site")
            s2 = _mapping(parent.body.get("metadata")).get("site")
            if s1 and s2 and s1 != s2:
                problems.append(doc.problem(("spec", "parent"),
                                            f"parent group {parent.name!r} belongs to site {s2!r}, not {s1!r}"))
        _heartbeat(doc, spec.get("heartbeat"), ("spec", "heartbeat"), problems)
    problems.extend(_group_cycles(groups))
    problems.extend(plugin_problems(loaded))  # modules compile/parse; codec/transform refs

    for doc in models.values():
        if doc.key not in invalid:  # a model's own checks need its schema to hold
            _check_model(doc, problems)

    for doc in devices.values():
        meta = _mapping(doc.body.get("metadata"))
        spec = _mapping(doc.body.get("spec"))
        group = _ref(doc, ("metadata", "group"), "DeviceGroup", meta.get("group"), groups, problems)
        if group is not None:
            gs = _mapping(group.body.get("metadata")).get("site")
            if gs and meta.get("site") and gs != meta["site"]:
                problems.append(doc.problem(("metadata", "group"),
                                            f"group {group.name!r} belongs to site {gs!r}, not {meta['site']!r}"))
        model = _ref(doc, ("spec", "model"), "DeviceModel", spec.get("model"), models, problems)
        _heartbeat(doc, spec.get("heartbeat"), ("spec", "heartbeat"), problems)
        model_ok = model is not None and model.key not in invalid
        desired = _mapping(spec.get("desired"))
        if desired and spec.get("model") is None:
            problems.append(doc.problem(("spec", "desired"), "desired properties need a model",
                                        "add spec.model naming a DeviceModel that declares them"))
        if model_ok and model is not None:
            _check_desired(doc, model, desired, problems)
            _check_points(doc, model, _mapping(spec.get("binding")), problems)
    problems.extend(scene_problems(loaded))
    problems.extend(dashboard_problems(loaded))
    problems.extend(report_problems(loaded))
    problems.extend(modbus_problems(loaded))
    problems.extend(retention_problems(loaded))
    problems.extend(edge_problems(loaded))
    return problems


def _heartbeat(doc: Document, hb: Any, path: tuple[str, ...], problems: list[Problem]) -> None:
    if not isinstance(hb, dict) or "interval" not in hb or "timeout" not in hb:
        return
    try:
        interval = parse_duration(hb["interval"])
        timeout = parse_duration(hb["timeout"])
    except ValueError:
        return  # the schema reported it
    if timeout < interval:
        problems.append(doc.problem((*path, "timeout"),
                                    f"timeout {hb['timeout']} is shorter than the interval {hb['interval']}",
                                    "a device would be declared offline between two heartbeats"))


def _group_cycles(groups: dict[str, Document]) -> list[Problem]:
    problems = []
    reported: set[str] = set()
    for start in sorted(groups):
        seen: list[str] = []
        cur: str | None = start
        while isinstance(cur, str) and cur in groups and cur not in seen:
            seen.append(cur)
            cur = _mapping(groups[cur].body.get("spec")).get("parent")
        if cur is not None and cur in seen:
            cycle = seen[seen.index(cur):]
            if not reported.intersection(cycle):
                reported.update(cycle)
                first = min(cycle)
                path = " → ".join([*cycle[cycle.index(first):], *cycle[:cycle.index(first)], first])
                problems.append(groups[first].problem(("spec", "parent"), f"group cycle: {path}",
                                                      "a group cannot be its own ancestor"))
    return problems


def _check_model(doc: Document, problems: list[Problem]) -> None:
    spec = doc.body.get("spec") or {}
    props = spec.get("properties") or {}
    tele = spec.get("telemetry") or {}
    for section, decls in (("properties", props), ("telemetry", tele)):
        for pname, decl in decls.items():
            path = ("spec", section, pname)
            lo, hi = decl.get("min"), decl.get("max")
            if lo is not None and hi is not None and lo > hi:
                problems.append(doc.problem((*path, "min"), f"min {lo} is greater than max {hi}"))
            if decl.get("type") in ("boolean", "string") and (lo is not None or hi is not None):
                problems.append(doc.problem(path, f"min/max make no sense for a {decl['type']}"))
            for i, v in enumerate(decl.get("enum") or []):
                why = value_problem(v, {"type": decl.get("type")})
                if why:
                    problems.append(doc.problem((*path, "enum", i), why))
            if "default" in decl:
                why = value_problem(decl["default"], decl)
                if why:
                    problems.append(doc.problem((*path, "default"), why))
    for pname in set(props) & set(tele):
        problems.append(doc.problem(("spec", "telemetry", pname),
                                    f"{pname!r} is declared both as a property and as telemetry"))
    for cname, cmd in (spec.get("commands") or {}).items():
        params = cmd.get("params")
        if params is not None:
            try:
                Draft202012Validator.check_schema(params)
            except SchemaError as exc:
                problems.append(doc.problem(("spec", "commands", cname, "params", *exc.path),
                                            f"not a valid JSON Schema: {exc.message}"))
        for pname, how in _mapping(cmd.get("sets")).items():
            spath: tuple[str, ...] = ("spec", "commands", cname, "sets", pname)
            decl = props.get(pname)
            if decl is None:
                problems.append(doc.problem(spath, f"no property {pname!r} to set",
                                            _did_you_mean(pname, list(props))))
            elif decl.get("access", "read") == "read":
                problems.append(doc.problem(spath, f"property {pname!r} is read-only"))
            elif isinstance(how, dict) and set(how) == {"param"}:
                declared = _mapping((params or {}).get("properties"))
                if declared and how["param"] not in declared:
                    problems.append(doc.problem((*spath, "param"),
                                                f"command {cname!r} has no parameter {how['param']!r}",
                                                _did_you_mean(str(how["param"]), list(declared))))
            else:
                why = value_problem(how, decl)
                if why:
                    problems.append(doc.problem(spath, why))


def _check_desired(doc: Document, model: Document, desired: dict[str, Any],
                   problems: list[Problem]) -> None:
    mspec = model.body.get("spec") or {}
    props = mspec.get("properties") or {}
    tele = mspec.get("telemetry") or {}
    for pname, value in desired.items():
        path: tuple[str | int, ...] = ("spec", "desired", pname)
        decl = props.get(pname)
        if decl is None:
            if pname in tele:
                problems.append(doc.problem(path, f"{pname!r} is telemetry of model {model.name!r} and cannot be set"))
            else:
                problems.append(doc.problem(path, f"model {model.name!r} has no property {pname!r}",
                                            _did_you_mean(pname, list(props))))
            continue
        if decl.get("access", "read") == "read":
            problems.append(doc.problem(path, f"property {pname!r} of model {model.name!r} is read-only",
                                        "only properties with access: write or readwrite can be desired"))
            continue
        why = value_problem(value, decl)
        if why:
            problems.append(doc.problem(path, why))


def _check_points(doc: Document, model: Document, binding: dict[str, Any],
                  problems: list[Problem]) -> None:
    mspec = model.body.get("spec") or {}
    known = list(mspec.get("properties") or {}) + list(mspec.get("telemetry") or {})
    for proto, opts in binding.items():
        if not isinstance(opts, dict):
            continue
        for section in ("points", "fields"):
            for point in _mapping(opts.get(section)):
                if point not in known:
                    problems.append(doc.problem(
                        ("spec", "binding", proto, section, point),
                        f"{point!r} is not a property or telemetry point of model {model.name!r}",
                        _did_you_mean(point, known)))
