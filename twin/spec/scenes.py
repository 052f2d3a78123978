"""Reference checks of Scene documents, located with file:line.

Missing devices, points, properties, commands and scenes; writes to read-only properties;
values and command parameters that do not fit the DeviceModel; numeric tests on non-numeric
points; invalid cron expressions; actions on devices outside the scene's site and its
``spec.reach`` (:func:`twin.policy.scene_may_act`). Called from :func:`twin.spec.refs.reference_problems`.
"""

from __future__ import annotations

import difflib
from typing import Any

from twin.errors import Problem
from twin.policy import doc_site, scene_may_act, scene_reach
from twin.spec.documents import Document, LoadedSpecs
from twin.spec.properties import value_problem

Path = tuple[str | int, ...]


def _hint(name: str, candidates: list[str]) -> str | None:
    close = difflib.get_close_matches(name, candidates, n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    if candidates and len(candidates) <= 8:
        return f"known: {', '.join(sorted(candidates))}"
    return None


class _Checker:
    def __init__(self, loaded: LoadedSpecs, doc: Document, problems: list[Problem]) -> None:
        self.doc = doc
        self.problems = problems
        self.devices = loaded.of_kind("Device")
        self.models = loaded.of_kind("DeviceModel")
        self.scenes = loaded.of_kind("Scene")
        self.plugins = loaded.of_kind("Plugin")
        self.invalid = loaded.invalid
        self.site = doc_site(doc.body)
        self.reach = scene_reach(doc.body)

    def in_reach(self, path: Path, device: Any) -> None:
        """An action's device must be in the scene's site or its ``spec.reach``."""
        ddoc = self.devices.get(device) if isinstance(device, str) else None
        if ddoc is None:
            return
        where = doc_site(ddoc.body)
        if not scene_may_act(self.site, self.reach, where):
            self.add(
                (*path, "device"),
                f"device {device!r} is in site {where}, outside the scene's site {self.site}",
                f"scene actions stay in their site; an admin of {where} may add {where} to "
                "spec.reach",
            )

    def add(self, path: Path, message: str, hint: str | None = None) -> None:
        self.problems.append(self.doc.problem(path, message, hint))

    def model(self, path: Path, device: Any) -> dict[str, Any] | None:
        """The device's model spec ({} when it has none); None if the device is unknown."""
        if not isinstance(device, str):
            return None
        ddoc = self.devices.get(device)
        if ddoc is None:
            self.add(
                (*path, "device"), f"unknown Device {device!r}", _hint(device, list(self.devices))
            )
            return None
        mname = (ddoc.body.get("spec") or {}).get("model")
        mdoc = self.models.get(mname) if isinstance(mname, str) else None
        if mdoc is None or mdoc.key in self.invalid:
            return {}
        spec = mdoc.body.get("spec")
        return spec if isinstance(spec, dict) else {}

    def point(self, path: Path, node: dict[str, Any], key: str = "point") -> dict[str, Any] | None:
        model = self.model(path, node.get("device"))
        name = node.get(key)
        if not model or not isinstance(name, str):
            return None
        decls = {**(model.get("telemetry") or {}), **(model.get("properties") or {})}
        decl = decls.get(name)
        if decl is None:
            self.add(
                (*path, key),
                f"device {node['device']!r} has no point {name!r}",
                _hint(name, list(decls)),
            )
        return decl

    # -- triggers ---------------------------------------------------------------------------
    def trigger(self, path: Path, t: Any) -> None:
        if not isinstance(t, dict):
            return
        kind = t.get("type")
        if kind == "device_data":
            decl = self.point(path, t)
            op = t.get("operator", "changed")
            if (
                decl
                and op in (">", ">=", "<", "<=")
                and decl.get("type") not in ("number", "integer")
            ):
                self.add(
                    (*path, "operator"),
                    f"{op} needs a numeric point; {t['point']!r} is {decl.get('type')}",
                )
        elif kind in ("status", "alarm") and "device" in t:
            self.model(path, t.get("device"))
        elif kind == "schedule" and isinstance(t.get("cron"), str):
            from croniter import croniter

            if len(t["cron"].split()) != 5 or not croniter.is_valid(t["cron"]):
                self.add(
                    (*path, "cron"),
                    f"{t['cron']!r} is not a valid cron expression",
                    "5 fields: minute hour day-of-month month day-of-week, e.g. '30 6 * * 1-5'",
                )

    # -- conditions -------------------------------------------------------------------------
    def conditions(self, path: Path, conds: Any) -> None:
        if isinstance(conds, dict):
            conds = [conds]
        if not isinstance(conds, list):
            return
        for i, c in enumerate(conds):
            self.condition((*path, i), c)

    def condition(self, path: Path, c: Any) -> None:
        if not isinstance(c, dict):
            return
        kind = c.get("type")
        if kind in ("and", "or", "not"):
            self.conditions((*path, "conditions"), c.get("conditions"))
        elif kind == "numeric":
            decl = self.point(path, c)
            if decl and decl.get("type") not in ("number", "integer"):
                self.add(
                    (*path, "point"),
                    f"numeric condition on {c['point']!r}, which is {decl.get('type')}",
                )
        elif kind == "state":
            if "point" in c:
                self.point(path, c)
            else:
                self.model(path, c.get("device"))
        elif kind == "plugin":
            self.plugin(path, c, "condition")

    def plugin(self, path: Path, node: dict[str, Any], role: str) -> None:
        """A plugin step: the Plugin exists with this role; its inputs name known points."""
        name = node.get("plugin")
        if isinstance(name, str):
            target = self.plugins.get(name)
            if target is None:
                self.add((*path, "plugin"), f"unknown Plugin {name!r}", _hint(name, list(self.plugins)))
            elif not isinstance(target.body.get("spec"), dict) or target.body["spec"].get("role") != role:
                got = target.body["spec"].get("role") if isinstance(target.body.get("spec"), dict) else None
                self.add((*path, "plugin"), f"Plugin {name!r} has role {got!r}, not {role!r}")
        inputs = node.get("inputs")
        if isinstance(inputs, dict):
            for alias, ref in inputs.items():
                if isinstance(ref, dict):
                    self.point((*path, "inputs", alias), ref)

    # -- actions ---------------------------------------------------------------------------
    def actions(self, path: Path, actions: Any) -> None:
        if not isinstance(actions, list):
            return
        for i, a in enumerate(actions):
            self.action((*path, i), a)

    def action(self, path: Path, a: Any) -> None:
        if not isinstance(a, dict):
            return
        kind = a.get("type")
        if kind in ("command", "set_desired", "alarm"):
            self.in_reach(path, a.get("device"))
        if kind == "command":
            self.command(path, a)
        elif kind == "set_desired":
            self.set_desired(path, a)
        elif kind == "alarm":
            self.model(path, a.get("device"))
        elif kind == "scene":
            name = a.get("scene")
            if isinstance(name, str) and name not in self.scenes:
                self.add(
                    (*path, "scene"), f"unknown Scene {name!r}", _hint(name, list(self.scenes))
                )
        elif kind == "wait_for":
            self.conditions((*path, "conditions"), a.get("conditions"))
        elif kind == "if":
            self.conditions((*path, "conditions"), a.get("conditions"))
            self.actions((*path, "then"), a.get("then"))
            self.actions((*path, "else"), a.get("else"))
        elif kind == "choose":
            for i, o in enumerate(a.get("options") or []):
                if isinstance(o, dict):
                    self.conditions((*path, "options", i, "conditions"), o.get("conditions"))
                    self.actions((*path, "options", i, "actions"), o.get("actions"))
            self.actions((*path, "default"), a.get("default"))
        elif kind in ("parallel", "sequence"):
            self.actions((*path, "actions"), a.get("actions"))
        elif kind == "plugin":
            self.plugin(path, a, "action")
        elif kind == "repeat":
            self.actions((*path, "actions"), a.get("actions"))
            for key in ("while", "until"):
                self.conditions((*path, key), a.get(key))

    def command(self, path: Path, a: dict[str, Any]) -> None:
        model = self.model(path, a.get("device"))
        name = a.get("command")
        if not model or not isinstance(name, str):
            return
        commands = model.get("commands") or {}
        decl = commands.get(name)
        if decl is None:
            self.add(
                (*path, "command"),
                f"device {a['device']!r} has no command {name!r}",
                _hint(name, list(commands)),
            )
            return
        schema = (decl or {}).get("params")
        if isinstance(schema, dict):
            from jsonschema import Draft202012Validator
            from jsonschema.exceptions import SchemaError

            try:
                errors = list(Draft202012Validator(schema).iter_errors(a.get("params") or {}))
            except SchemaError:
                return  # the model's own check reports it
            for err in errors:
                self.add((*path, "params", *err.path), f"{name}: {err.message}")

    def set_desired(self, path: Path, a: dict[str, Any]) -> None:
        model = self.model(path, a.get("device"))
        prop = a.get("property")
        if not model or not isinstance(prop, str):
            return
        props = model.get("properties") or {}
        decl = props.get(prop)
        if decl is None:
            if prop in (model.get("telemetry") or {}):
                self.add(
                    (*path, "property"),
                    f"{prop!r} is telemetry of device {a['device']!r} and cannot be set",
                )
            else:
                self.add(
                    (*path, "property"),
                    f"device {a['device']!r} has no property {prop!r}",
                    _hint(prop, list(props)),
                )
            return
        if decl.get("access", "read") == "read":
            self.add(
                (*path, "property"),
                f"property {prop!r} of device {a['device']!r} is read-only",
                "scenes can only set properties with access: write or readwrite",
            )
            return
        if "value" in a:
            why = value_problem(a["value"], decl)
            if why:
                self.add((*path, "value"), why)


def scene_problems(loaded: LoadedSpecs) -> list[Problem]:
    problems: list[Problem] = []
    for doc in loaded.of_kind("Scene").values():
        spec = doc.body.get("spec")
        if not isinstance(spec, dict):
            continue
        c = _Checker(loaded, doc, problems)
        for i, t in enumerate(spec.get("triggers") or []):
            c.trigger(("spec", "triggers", i), t)
        c.conditions(("spec", "conditions"), spec.get("conditions"))
        c.actions(("spec", "actions"), spec.get("actions"))
    return problems
