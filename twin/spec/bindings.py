"""The JSON Schemas of binding options, for code that validates a binding block on its own.

``specs/binding-<protocol>.schema.json`` is the single source of truth: the Device schema
references it (so `twin validate` checks it, located), and the binding modules take their
schema from here instead of keeping a copy.
"""

from __future__ import annotations

from typing import Any

from twin.spec.schema import BASE_URI, _raw


def binding_schema(protocol: str) -> dict[str, Any]:
    """The schema of ``spec.binding.<protocol>`` (KeyError if there is none)."""
    return _raw()[BASE_URI + f"binding-{protocol}.schema.json"]
