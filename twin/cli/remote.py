"""A call to a running server's HTTP API (``--server URL``) with the access token in
``TWIN_TOKEN``; an unreachable server or an HTTP error is a TwinError with a hint."""

from __future__ import annotations

import os
from typing import Any

from twin.errors import TwinError


def _token() -> str:
    token = os.environ.get("TWIN_TOKEN")
    if not token:
        raise TwinError(
            "--server needs an access token",
            hint="set TWIN_TOKEN (create one with `twin token create USER`)",
        )
    return token


def remote(method: str, server: str, path: str, *, timeout: float = 300, what: str | None = None,
           **kw: Any) -> Any:
    """``method server+path`` (httpx keywords in ``kw``): the response, or a TwinError naming
    ``what`` (default: the server) with the API's ``detail``."""
    import httpx

    try:
        resp = httpx.request(
            method,
            server.rstrip("/") + path,
            headers={"Authorization": f"Bearer {_token()}"},
            timeout=timeout,
            **kw,
        )
    except httpx.HTTPError as exc:
        raise TwinError(
            f"cannot reach {server}: {exc}", hint="is `twin up` running there? check --server"
        ) from exc
    if resp.status_code >= 400:
        try:
            detail = resp.json().get("detail", resp.text)
        except ValueError:
            detail = resp.text
        raise TwinError(f"{what or server}: HTTP {resp.status_code}: {detail}")
    return resp
