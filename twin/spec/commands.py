"""What a command does to a device's properties, declared in its DeviceModel.

```yaml
commands:
  set_state:
    params: {type: object, required: [state], properties: {state: {type: boolean}}}
    sets: {power: {param: state}}      # success means: power is now params.state
  start_stream:
    sets: {streaming: true}            # a constant
```
``sets`` is the one statement of a command's effect. The engine uses it twice: a successful
command records a runtime desired-state override of those properties (so the reconciler keeps
them rather than reverting to ``spec.desired``; twin/registry/overrides.py), and the ``sim``
binding applies it to the simulated device (its reported values change like a real device's).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def command_sets(
    model: Mapping[str, Any] | None, command: str, params: Mapping[str, Any] | None
) -> dict[str, Any]:
    """``{property: value}`` a successful ``command`` with ``params`` sets (empty: none).
    A ``{param: NAME}`` whose parameter is absent sets nothing."""
    decl = ((model or {}).get("commands") or {}).get(command) or {}
    sets = decl.get("sets") or {}
    out: dict[str, Any] = {}
    if not isinstance(sets, Mapping):
        return out
    params = params or {}
    for prop, how in sets.items():
        if isinstance(how, Mapping) and set(how) == {"param"}:
            if how["param"] in params:
                out[str(prop)] = params[how["param"]]
        else:
            out[str(prop)] = how
    return out
