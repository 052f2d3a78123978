"""The REST + WebSocket API (FastAPI), served by hypercorn on Trio inside the engine, behind
the front door that answers ``POST /api/v1/ingest/{device}`` itself (twin/api/frontdoor.py).

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
- :mod:`twin.api.openapi` — the OpenAPI document made true (every error response, one error
  shape, security) and complete ``Allow`` headers on 405;
- :mod:`twin.api.routes` — the routers, one module per resource.

Every route but ``/api/v1/health``, ``/api/v1/auth/login`` and ``/api/v1/auth/refresh`` needs a
bearer token (``/api/v1/ingest/{device}`` needs that device's key instead).
"""

from __future__ import annotations

from fastapi import FastAPI

from twin.api import errors, openapi
from twin.api.deps import MUTATING, PREFIX, PUBLIC
from twin.api.gatekeeper import Gatekeeper
from twin.api.limits import BodyLimits
from twin.api.routes import ROUTERS, video
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
    # FastAPI keeps an included router's routes out of app.routes: the gatekeeper (metric
    # labels) and the 405 handler (Allow) see them through this list
    routes = [*app.router.routes, *(r for router in ROUTERS for r in router.routes)]
    openapi.install(
        app,
        routes=routes,
        public=PUBLIC | set(video.SIGNED_PATHS),
        device_key=(f"{PREFIX}/ingest/", f"{PREFIX}/edge-link/"),
        optional_markers=(
            "/commands", "/scene", "/timeseries", "/reports", "/notifications", "/edge"
        ),
        text_paths=("/metrics",),
        document_bodies={
            (f"{PREFIX}/devices", "post"): "Device",
            (f"{PREFIX}/device-groups", "post"): "DeviceGroup",
            (f"{PREFIX}/scenes", "post"): "Scene",
        },
    )
    # the gatekeeper authenticates before BodyLimits reads a body
    return Gatekeeper(BodyLimits(app, settings.body_limits), st, routes)  # type: ignore[return-value]


__all__ = ["MUTATING", "PREFIX", "PUBLIC", "ApiSettings", "ApiState", "create_app"]
