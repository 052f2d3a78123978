"""The OpenAPI document, made true: security, every error a route can answer, one error shape.

FastAPI documents what a route returns on success and its 422 for request validation. What it
cannot see is what the rest of the server answers: the gatekeeper's 401 and 429, the policy's
403, a 404 for an unknown path parameter, a 409 on a revision conflict or a reference to an
object that does not exist, the body limit's 413, a malformed JSON body's 400. ``install``
post-processes the generated document so that each operation lists the responses it can give:

========  ===========================================================================
status    documented on
========  ===========================================================================
400       operations with a request body (the body is not JSON)
401       every operation that needs a bearer token (or a device key, for ingest)
403       every operation that needs a token (role or site scope refused)
404       operations with a path parameter (no such object)
409       mutating operations (conflict with the registry's current state)
413       operations with a request body (over the body limit)
422       operations with parameters or a body (invalid input)
429       every operation but ``/health`` (rate limits)
503       operations served by an optional engine service (time series, control)
========  ===========================================================================

Every error body is ``{"detail": ...}``: ``detail`` is one readable line, except for request
validation, where FastAPI's list of located errors is kept (``ValidationError`` items); extra
fields (``hint``, ``problems``) may accompany it. The schema ``Error`` says exactly that, and
replaces FastAPI's ``HTTPValidationError`` wherever it was referenced.

``/metrics`` answers Prometheus' text format, documented as ``text/plain``.

405: Starlette answers a known path with an unknown method from the first route whose path
matches, so ``Allow`` named only that route's methods; ``allow_header_handler`` answers with
every method any route serves at that path.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "required": ["detail"],
    "properties": {
        "detail": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"$ref": "#/components/schemas/ValidationError"}},
                {"type": "object"},
            ],
            "description": "One readable line; for request validation, the located errors.",
        },
        "hint": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "problems": {"type": "array", "items": {"type": "string"}},
    },
}

_DESCRIPTIONS = {
    "400": "Malformed request (the body is not valid JSON)",
    "401": "Missing or invalid credentials",
    "403": "Not allowed for this user (role or site scope)",
    "404": "No such object",
    "409": "Conflicts with the registry's current state (a newer revision, a missing reference)",
    "413": "Request body too large",
    "422": "Invalid input",
    "429": "Rate limited (see Retry-After)",
    "503": "The engine service behind this route is not running",
}

_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def _error_response(code: str) -> dict[str, Any]:
    return {
        "description": _DESCRIPTIONS[code],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def document_schema(kind: str | None) -> dict[str, Any]:
    """A spec document as in YAML: what the route's first check refuses with 422 is here; the
    rest (``specs/<Kind>.schema.json``, references between documents) is checked by the same
    validation as ``twin validate``, whose problems a 422 lists."""
    return {
        "type": "object",
        "required": ["metadata"] if kind else ["kind", "metadata"],
        "properties": {
            "apiVersion": {"type": "string", "enum": ["flux.iot/v1"]},
            "kind": {"type": "string", "enum": [kind]} if kind else {"type": "string"},
            "metadata": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,62}$"},
                    "site": {"type": "string"},
                },
            },
            "spec": {"type": "object"},
        },
        "description": (
            f"A {kind or 'spec'} document, validated like `twin validate` "
            f"(specs/{kind or '<Kind>'}.schema.json, references): 422 lists the problems"
        ),
    }


def _retarget(node: Any) -> Any:
    """Replace every reference to FastAPI's HTTPValidationError by ``Error``."""
    if isinstance(node, dict):
        if node.get("$ref") == "#/components/schemas/HTTPValidationError":
            return {"$ref": "#/components/schemas/Error"}
        return {k: _retarget(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_retarget(v) for v in node]
    return node


def complete(
    schema: dict[str, Any],
    *,
    public: Iterable[str] = (),
    device_key: Iterable[str] = (),
    optional_markers: Iterable[str] = (),
    text_paths: Iterable[str] = (),
    document_bodies: Mapping[tuple[str, str], str] = {},
) -> dict[str, Any]:
    """Return ``schema`` (FastAPI's generated document) with security and error responses.

    ``public``: paths needing no credentials; ``device_key``: path prefixes authenticated by a
    device key instead of a bearer token; ``optional_markers``: path parts that mark routes served by an
    optional service (503 when it is not running); ``text_paths``: paths answering text/plain;
    ``document_bodies``: (path, method) -> kind of the spec document the body is.
    """
    out = _retarget(copy.deepcopy(schema))
    public = set(public)
    device_key = tuple(device_key)
    optional_markers = tuple(optional_markers)
    text_paths = set(text_paths)
    comps = out.setdefault("components", {})
    schemas = comps.setdefault("schemas", {})
    schemas["Error"] = ERROR_SCHEMA
    schemas.pop("HTTPValidationError", None)
    schemas.setdefault(
        "ValidationError",
        {
            "title": "ValidationError",
            "type": "object",
            "required": ["loc", "msg", "type"],
            "properties": {
                "loc": {
                    "type": "array",
                    "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                },
                "msg": {"type": "string"},
                "type": {"type": "string"},
            },
        },
    )
    apply_req = schemas.get("ApplyRequest", {}).get("properties", {})
    if "documents" in apply_req:
        apply_req["documents"]["items"] = document_schema(None)
    sec = comps.setdefault("securitySchemes", {})
    sec["Bearer"] = {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    sec["DeviceKey"] = {"type": "apiKey", "in": "header", "name": "X-Device-Key"}
    out["security"] = [{"Bearer": []}]
    for path, item in out.get("paths", {}).items():
        for method in _METHODS:
            op = item.get(method)
            if op is None:
                continue
            codes: set[str] = set()
            has_body = "requestBody" in op
            params = op.get("parameters") or []
            if (path, method) in document_bodies:
                op["requestBody"] = {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": document_schema(document_bodies[(path, method)])
                        }
                    },
                }
                has_body = True
            if path in public:
                op["security"] = []
                if not path.endswith("/health"):
                    codes.add("401")  # wrong password, invalid refresh token
            elif path.startswith(device_key):
                op["security"] = [{"DeviceKey": []}]
                codes |= {"401", "403"}
            else:
                codes |= {"401", "403"}
            if has_body:
                codes |= {"400", "413", "422"}
            if params:
                codes.add("422")
            if any(p.get("in") == "path" for p in params):
                codes.add("404")
            if method in ("post", "put", "patch", "delete"):
                codes.add("409")
            if not path.endswith("/health"):
                codes.add("429")
            if any(m in path for m in optional_markers):
                codes.add("503")
            responses = op.setdefault("responses", {})
            for code in sorted(codes):
                if code not in responses:
                    responses[code] = _error_response(code)
                else:
                    responses[code].setdefault("content", _error_response(code)["content"])
            if path in text_paths:
                for code, resp in responses.items():
                    if code.startswith("2"):
                        resp["content"] = {"text/plain": {"schema": {"type": "string"}}}
    return out


def install(app: FastAPI, routes: Sequence[Any] = (), **options: Any) -> None:
    """Make ``app.openapi()`` return :func:`complete` of FastAPI's document (cached), and
    answer 405 with a complete ``Allow`` header (over ``routes``: every route of the app)."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if not app.openapi_schema:
            app.openapi_schema = complete(original(), **options)
        return app.openapi_schema

    app.openapi_schema = None
    app.openapi = openapi  # type: ignore[method-assign]
    app.state.allow_routes = list(routes) or list(app.routes)
    app.add_exception_handler(StarletteHTTPException, allow_header_handler)


def allowed_methods(routes: Iterable[Any], scope: Mapping[str, Any]) -> list[str]:
    """Every method served at ``scope``'s path by its most concrete route template: as in
    OpenAPI, ``/devices/batch/commands`` is that path's, not ``/devices/{device}/commands``'s."""
    by_params: dict[int, set[str]] = {}
    probe = dict(scope)
    for route in routes:
        route_methods = getattr(route, "methods", None)
        if not route_methods:
            continue
        probe["method"] = next(iter(route_methods))
        match, _ = route.matches(probe)
        if match is Match.FULL:
            params = len(getattr(route, "param_convertors", {}) or {})
            by_params.setdefault(params, set()).update(route_methods)
    methods = by_params[min(by_params)] if by_params else set()
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


async def allow_header_handler(request: Request, exc: Exception) -> Any:
    """FastAPI's HTTPException handling, with a complete ``Allow`` on 405."""
    from fastapi.exception_handlers import http_exception_handler

    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 405:
        allow = allowed_methods(request.app.state.allow_routes, request.scope)
        return JSONResponse(
            {"detail": f"method {request.method} not allowed here (allowed: {', '.join(allow)})"},
            status_code=405,
            headers={"Allow": ", ".join(allow)},
        )
    return await http_exception_handler(request, exc)
