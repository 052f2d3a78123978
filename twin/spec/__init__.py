"""Specs: line-annotated YAML loading, JSON Schema validation, references, the plan.

This layer is pure: no Trio, no I/O beyond reading the files it is given.
"""

from __future__ import annotations

from twin.spec.load import Document, LoadedSpecs, load_site, validate_specs
from twin.spec.plan import Action, Change, FieldChange, Plan, diff_fields, make_plan
from twin.spec.units import format_duration, parse_duration

__all__ = [
    "Action",
    "Change",
    "Document",
    "FieldChange",
    "LoadedSpecs",
    "Plan",
    "diff_fields",
    "format_duration",
    "load_site",
    "make_plan",
    "parse_duration",
    "validate_specs",
]
