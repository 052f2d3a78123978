"""Runtime desired-state overrides: the line between the spec (git) and what happens at run time.

A device's desired state has two sources with two owners:

* **Declared** desired state is ``spec.desired`` in the site's YAML. Git owns it; ``twin apply``
  records it as a revision; ``twin plan`` diffs it. It is the *default*.
* **Runtime** desired state is written while the plant runs: a scene's ``set_desired``, a
  command whose model declares that it sets a property (``commands.set_state.sets: {power:
  {param: state}}``), an operator's ``PATCH /devices/{d}/twin/desired``. The registry owns it
  as an *override* per (device, property): value, who set it (``scene:NAME``, ``command:ID by
  USER``, ``api:USER``), when, and the spec value it overrides. Overrides are never revisions:
  they do not show in ``twin plan`` / ``twin history`` and re-applying unchanged YAML leaves
  them alone.

The engine's effective desired value is the override if there is one, else the spec value.
An override lives **until the spec value itself changes**: every override remembers the spec
value it was written over (``spec_json``, canonical JSON, ``None`` when the spec had none);
once the spec says something else (a new value, the property removed or added, the device
deleted) the new spec wins and the override is dropped. ``Registry.apply`` drops such
overrides in the same transaction as the revision (:func:`stale`), so an apply from the CLI
and one through the API behave alike, and the engine drops them from memory at its next reload.
Writing a value equal to the spec value clears the override (the device is back on its spec).

Overrides are rows of ``desired_overrides`` (both backends), so they survive an engine restart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .base import canonical_json

Key = tuple[str, str]


@dataclass(frozen=True)
class DesiredOverride:
    device: str
    prop: str
    value: Any
    set_by: str  # "scene:fan-on-when-hot", "command:cmd_… by alice", "api:alice"
    set_at: float  # unix seconds
    spec_json: str | None  # canonical JSON of the spec value overridden (None: not in the spec)

    @property
    def spec_value(self) -> Any:
        import json

        return None if self.spec_json is None else json.loads(self.spec_json)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"value": self.value, "set_by": self.set_by, "set_at": self.set_at}
        if self.spec_json is not None:
            out["spec_value"] = self.spec_value
        return out


def spec_desired(doc: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """A Device document's declared ``spec.desired`` (empty when none)."""
    if not doc:
        return {}
    desired = (doc.get("spec") or {}).get("desired") or {}
    return desired if isinstance(desired, Mapping) else {}


def spec_json(doc: Mapping[str, Any] | None, prop: str) -> str | None:
    """What an override of ``prop`` on this Device document remembers as the spec value."""
    desired = spec_desired(doc)
    return canonical_json(desired[prop]) if prop in desired else None


def is_current(o: DesiredOverride, specs: Mapping[Key, Mapping[str, Any]]) -> bool:
    """True while the device exists and its spec value is still the one overridden."""
    doc = specs.get(("Device", o.device))
    return doc is not None and spec_json(doc, o.prop) == o.spec_json


def stale(
    overrides: Iterable[DesiredOverride], specs: Mapping[Key, Mapping[str, Any]]
) -> list[DesiredOverride]:
    """The overrides a spec set supersedes (drop them: the new spec value wins)."""
    return [o for o in overrides if not is_current(o, specs)]
