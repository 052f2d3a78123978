"""JSON Schemas of every kind, loaded from ``specs/``, and located schema errors.

Each kind has ``specs/<Kind>.schema.json``; shared pieces live in ``common.schema.json`` and
bindings in ``binding-<protocol>.schema.json``. A schema may carry ``x-error``: the message
shown (after the offending value) when that subschema rejects a value.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import fastjsonschema
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource

from twin.errors import Problem
from twin.spec.paths import format_path
from twin.spec.yamlload import YamlDocument

BASE_URI = "https://flux-iot.dev/specs/"


def specs_dir() -> Path:
    """The folder with the JSON Schemas (the repo's ``specs/``, or a copy shipped in twin)."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "specs", here.parent / "schemas"):
        if (candidate / "common.schema.json").is_file():
            return candidate
    raise FileNotFoundError("cannot find the FLUX IoT JSON Schemas (specs/)")


@cache
def _raw() -> dict[str, dict[str, Any]]:
    """Every schema file by its ``$id``."""
    out = {}
    for path in sorted(specs_dir().glob("*.schema.json")):
        schema = json.loads(path.read_text(encoding="utf-8"))
        out[schema.get("$id") or BASE_URI + path.name] = schema
    return out


@cache
def _fast(kind: str) -> Any:
    """A compiled validator (fastjsonschema, ~30x faster than jsonschema) for the common case.

    It only answers "valid or not"; when a document is invalid, jsonschema (the reference
    implementation) is run on it to report every error, located. A test checks that the two
    agree on the malformed corpus.
    """
    schemas = _raw()
    schema = schemas[BASE_URI + f"{kind}.schema.json"]
    return fastjsonschema.compile(schema, handlers={"https": schemas.__getitem__})


@cache
def _load() -> tuple[dict[str, Draft202012Validator], Registry]:
    resources = []
    kinds: dict[str, dict[str, Any]] = {}
    for path in sorted(specs_dir().glob("*.schema.json")):
        schema = json.loads(path.read_text(encoding="utf-8"))
        uri = schema.get("$id") or BASE_URI + path.name
        resources.append((uri, Resource.from_contents(schema)))
        stem = path.name.removesuffix(".schema.json")
        if stem[:1].isupper():
            kinds[stem] = schema
    registry: Registry = Registry().with_resources(resources)
    validators = {
        kind: Draft202012Validator(schema, registry=registry) for kind, schema in kinds.items()
    }
    return validators, registry


def known_kinds() -> list[str]:
    return sorted(_load()[0])


def validator(kind: str) -> Draft202012Validator | None:
    return _load()[0].get(kind)


def schema_problems(doc: YamlDocument, kind: str, name: str | None) -> list[Problem]:
    """Every schema error of one document, located and readable."""
    v = validator(kind)
    if v is None:
        return []
    try:
        _fast(kind)(doc.data)
        return []
    except fastjsonschema.JsonSchemaException:
        pass
    out: list[Problem] = []
    for err in _leaf_errors(v.iter_errors(doc.data)):
        out.extend(_render(err, doc, kind, name))
    return out


def _leaf_errors(errors: Iterator[ValidationError]) -> Iterator[ValidationError]:
    """Flatten anyOf/oneOf into their most relevant branch errors."""
    for err in errors:
        if err.validator in ("anyOf", "oneOf") and err.context:
            if "x-error" in err.schema:
                yield err
                continue
            best = max(err.context, key=lambda e: len(e.absolute_path))
            yield from _leaf_errors(iter([best]))
        else:
            yield err


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _render(err: ValidationError, doc: YamlDocument, kind: str, name: str | None) -> list[Problem]:
    path = tuple(err.absolute_path)
    schema = err.schema if isinstance(err.schema, dict) else {}
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        allowed = sorted(schema.get("properties", {}))
        pattern_props = schema.get("patternProperties")
        extras = [k for k in err.instance if k not in schema.get("properties", {})]
        if pattern_props:
            import re

            extras = [k for k in extras if not any(re.search(p, k) for p in pattern_props)]
        problems = []
        for key in extras:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"did you mean {close[0]!r}?" if close else (
                f"allowed: {', '.join(allowed)}" if allowed and len(allowed) <= 12 else None
            )
            what = "protocol" if path and path[-1] == "binding" else "field"
            problems.append(
                Problem(doc.key_where((*path, key)), f"unknown {what} {key!r}", kind, name,
                        format_path((*path, key)), hint)
            )
        return problems
    if err.validator == "required":
        missing = err.message.split("'")[1] if "'" in err.message else err.message
        return [Problem(doc.where(path), f"missing required field {missing!r}", kind, name,
                        format_path(path) or None)]
    if "x-error" in schema and err.validator not in ("required",):
        return [Problem(doc.where(path), f"{_short(err.instance)} {schema['x-error']}", kind, name,
                        format_path(path) or None)]
    if err.validator == "const":
        msg = f"must be {err.validator_value!r}, not {_short(err.instance)}"
    elif err.validator == "enum":
        opts = ", ".join(_short(v) for v in err.validator_value)
        close = difflib.get_close_matches(str(err.instance), [str(v) for v in err.validator_value], n=1)
        hint = f"did you mean {close[0]!r}?" if close else None
        return [Problem(doc.where(path), f"{_short(err.instance)} is not one of {opts}", kind, name,
                        format_path(path) or None, hint)]
    elif err.validator == "type":
        expected = err.validator_value
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        msg = f"{_short(err.instance)} is not of type {expected}"
    elif err.validator == "propertyNames":
        msg = f"{_short(err.instance)} is not a valid name"
    else:
        msg = err.message
    return [Problem(doc.where(path), msg, kind, name, format_path(path) or None)]
