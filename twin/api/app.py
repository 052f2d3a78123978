"""The REST + WebSocket API (FastAPI), served by hypercorn's Trio worker inside the engine.

:func:`create_app` composes the parts, each in a module named after it:

- :mod:`twin.api.state` — :class:`ApiSettings` and :class:`ApiState` (engine, secret, limiters,
  caches), one per app (``app.state.api``);
- :mod:`twin.api.gatekeeper` — the ASGI middleware in front of every route (rate limits,
  authentication, metrics, audit) and the HTTP ingest hot path;
- :mod:`twin.api.deps` — what routes share: the principal, role dependencies, query types,
  ``change`` (a spec change as a revision);
- :mod:`twin.api.limits` — request body limits (413) and strict JSON bodies (422), between
  the gatekeeper and the routes;
- :mod:`twin.api.errors` — the error tree mapped to HTTP answers;
- :mod:`twin.api.routes` — the routers, one module per resource.

Every route but ``/api/v1/health``, ``/api/v1/auth/login`` and ``/api/v1/auth/refresh`` needs a
bearer token (``/api/v1/ingest/{device}`` needs that device's key instead).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from twin.api import errors
from twin.api.deps import MUTATING, PREFIX, PUBLIC
from twin.api.gatekeeper import Gatekeeper
from twin.api.limits import BodyLimits
from twin.api.routes import ROUTERS
from twin.api.state import ApiSettings, ApiState
from twin.runtime.engine import Engine


def create_app(engine: Engine, settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or ApiSettings(state_dir=engine.config.state_dir)
    st = ApiState(engine, settings)
    app = FastAPI(
        title="FLUX IoT",
        version="1",
        description="Devices, twins, status, alarms and live data of a FLUX IoT engine.",
    )
    app.state.api = st
    errors.install(app)
    for router in ROUTERS:
        app.include_router(router)
    app.openapi_schema = None
    _add_security(app)
    # the gatekeeper authenticates before BodyLimits reads a body; FastAPI's routes label metrics
    routes = [*app.router.routes, *(r for router in ROUTERS for r in router.routes)]
    return Gatekeeper(BodyLimits(app, settings.body_limits), st, routes)  # type: ignore[return-value]


def _add_security(app: FastAPI) -> None:
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = original()
        comps = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        comps["Bearer"] = {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
        comps["DeviceKey"] = {"type": "apiKey", "in": "header", "name": "X-Device-Key"}
        schema["security"] = [{"Bearer": []}]
        for path in PUBLIC:
            for op in schema.get("paths", {}).get(path, {}).values():
                op["security"] = []
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


__all__ = ["MUTATING", "PREFIX", "PUBLIC", "ApiSettings", "ApiState", "create_app"]
