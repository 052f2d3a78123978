"""Build a Device document's binding: its ``spec.binding`` protocol looked up in the registry
(twin/bindings/registry.py), where the built-in bindings register on import.

The built-in binding modules are imported on the first ``create_binding``, not at import of
this module: their client libraries (asyncua, pymodbus, aiocoap, paho) are heavy and a CLI
command that builds no binding should not pay for them. They import the registry, never this
module, so the lazy import is no cycle.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twin.bindings.base import Binding, BindingContext
from twin.bindings.registry import BINDINGS
from twin.errors import BindingError


def binding_protocol(device_doc: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """``(protocol, options)`` of a Device document's single ``spec.binding`` key."""
    binding = (device_doc.get("spec") or {}).get("binding") or {}
    if not isinstance(binding, Mapping) or len(binding) != 1:
        raise BindingError(
            f"device {device_doc.get('metadata', {}).get('name')!r}: spec.binding must have "
            "exactly one protocol key"
        )
    ((protocol, options),) = binding.items()
    return str(protocol), options or {}


def create_binding(device_doc: Mapping[str, Any], context: BindingContext | None = None) -> Binding:
    """Build the binding of a Device document. Raises BindingError for unknown protocols."""
    _load_builtin()
    name = str(device_doc["metadata"]["name"])
    protocol, options = binding_protocol(device_doc)
    if context is not None and name in context.endpoints:
        options = {**options, **context.endpoints[name]}
    factory = BINDINGS.get(protocol)
    if factory is None:
        raise BindingError(
            f"device {name!r}: no runtime binding for protocol {protocol!r}",
            hint=f"available: {', '.join(sorted(BINDINGS))}",
        )
    return factory(name, options, device_doc, context or BindingContext())


_loaded = False


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    # Importing registers them (each module calls register_binding at import).
    from twin.bindings import coap, http, modbus, mqtt, opcua, sim, video  # noqa: F401
