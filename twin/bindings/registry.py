"""The binding registry: protocol name -> factory. Each binding module registers its own
(``register_binding("mqtt", _factory)`` at import); twin/bindings/factory.py builds a Device's
binding from it. Nothing here imports a binding, so a binding imports this without a cycle."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twin.bindings.base import Binding, BindingContext

BindingFactory = Callable[[str, Mapping[str, Any], Mapping[str, Any], BindingContext], Binding]
"""``factory(device_name, options, device_doc, context) -> Binding``"""

BINDINGS: dict[str, BindingFactory] = {}


def register_binding(protocol: str, factory: BindingFactory) -> None:
    BINDINGS[protocol] = factory
