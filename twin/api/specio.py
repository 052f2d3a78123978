"""Validate and apply spec documents that arrive through the API.

Validation is the spec layer's ``validate_specs``: the same schema and reference checks as
``twin validate``; problems name the kind, name and path inside the document. The functions
live in :mod:`twin.spec.apply` (scenes persist desired values through them too).
"""

from __future__ import annotations

from twin.spec.apply import Specs, apply_change
from twin.spec.apply import validate_set as validate

__all__ = ["Specs", "apply_change", "validate"]
