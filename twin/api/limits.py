"""Request limits: bounded, well-formed bodies before any route sees them (ASGI middleware).

:class:`BodyLimits` sits between the gatekeeper (so an unauthenticated caller of a protected
route is refused before a byte of its body is read) and FastAPI. For every HTTP request:

* **size** — a body larger than the route's limit is refused with **413** and a one-line
  detail: at once when ``Content-Length`` says so (nothing is read), else as soon as the
  streamed body passes the limit. ``max_body`` (default 1 MiB) applies to every route,
  ``max_apply_body`` (default 64 MiB) to ``POST /api/v1/apply`` (a whole site's documents).
  The HTTP ingest hot path never gets here: it keeps its own limit in the gatekeeper.
  Configure with ``ApiSettings.body_limits`` or the environment (``TWIN_API_MAX_BODY``,
  ``TWIN_API_MAX_APPLY_BODY``, in bytes);
* **JSON** — a JSON body (``application/json``, ``*+json``, or no content type, as FastAPI
  reads it) is parsed strictly first (:func:`twin.spec.inputlimits.loads`): ``NaN``,
  ``Infinity``, numbers that overflow to infinity (``1e999``), lone surrogates (``"\\ud800"``)
  and nesting deeper than :data:`~twin.spec.inputlimits.MAX_DEPTH` are refused with **422** and
  one line naming the path (the value itself is not echoed). Malformed JSON is left to FastAPI
  (its usual 422 ``json_invalid``).

The body is then handed on unchanged. :func:`validation_error_handler` is the other half:
FastAPI's 422 for a body that fails its model carries each error's ``input`` (a submitted
password, a 20 MB string); ours drops it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from twin.spec.inputlimits import InputRefused, loads

APPLY_PATH = "/api/v1/apply"
EDGE_LINK_PATH = "/api/v1/edge-link/"
EDGE_UPLOAD_BODY = 16 << 20
"""Bytes of one edge upload (``twin/edge/uplink.py`` sends at most half of it)."""


def _env_bytes(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip().replace("_", "")
    try:
        value = int(raw) if raw else default
    except ValueError:
        return default
    return value if value > 0 else default


@dataclass(frozen=True)
class Limits:
    """Bytes a request body may have: ``max_body`` everywhere, ``max_apply_body`` for
    ``POST /api/v1/apply``."""

    max_body: int = 1 << 20
    max_apply_body: int = 64 << 20

    @classmethod
    def from_env(cls) -> Limits:
        return cls(_env_bytes("TWIN_API_MAX_BODY", cls.max_body),
                   _env_bytes("TWIN_API_MAX_APPLY_BODY", cls.max_apply_body))

    def for_request(self, method: str, path: str) -> int:
        if method == "POST" and path == APPLY_PATH:
            return self.max_apply_body
        if method == "POST" and path.startswith(EDGE_LINK_PATH):
            return EDGE_UPLOAD_BODY  # an edge's upload: the uplink keeps each under this
        return self.max_body


def _is_json(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"content-type":
            ctype = value.split(b";", 1)[0].strip().lower()
            return ctype == b"application/json" or (
                ctype.startswith(b"application/") and ctype.endswith(b"+json"))
    return True  # FastAPI reads a body without a content type as JSON


async def _answer(send: Callable[..., Any], status: int, detail: str, close: bool = False) -> None:
    payload = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(payload)).encode())]
    if close:  # the rest of the body was not read: the connection cannot be reused
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class BodyLimits:
    """Pure ASGI middleware: see the module docstring."""

    def __init__(self, app: Any, limits: Limits | None = None) -> None:
        self.app = app
        self.limits = limits or Limits.from_env()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.for_request(scope["method"], scope["path"])
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        length = None
        for name, value in headers:
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None
                break
        too_big = f"request body larger than {limit:,} bytes (the limit for this route)"
        # HTTP/1: the unread rest of the body makes the connection unusable (HTTP/2 has no
        # Connection header; see twin.api.server.tolerate_h2_data_after_close)
        close = not str(scope.get("http_version", "1.1")).startswith("2")
        if length is not None and length > limit:
            await _answer(send, 413, too_big, close=close)
            return
        # no shortcut for requests that announce no body: over HTTP/2 a body needs neither
        # Content-Length nor Transfer-Encoding (an empty one is one message, at once)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _answer(send, 413, too_big, close=close)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body and _is_json(headers):
            try:
                loads(body)
            except InputRefused as exc:
                await _answer(send, 422, f"invalid JSON body: {exc}")
                return
            except ValueError:
                pass  # malformed: FastAPI answers 422 json_invalid in its usual shape
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as usual

        await self.app(scope, replay, send)


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 without each error's ``input`` (it echoes what was submitted: passwords,
    tokens, megabytes of text) and without ``ctx`` values that are not plain data."""
    assert isinstance(exc, RequestValidationError)
    errors = []
    for err in exc.errors():
        item = {k: v for k, v in err.items() if k not in ("input", "url")}
        ctx = item.get("ctx")
        if isinstance(ctx, dict):
            item["ctx"] = {k: v if isinstance(v, str | int | float | bool) else str(v)
                           for k, v in ctx.items()}
        errors.append(item)
    return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)


__all__ = ["BodyLimits", "Limits", "validation_error_handler"]
