"""The API's routes, one module per resource; :func:`twin.api.app.create_app` includes
:data:`ROUTERS` in this order.

========== ===================================================================
auth       login, refresh, logout
devices    devices, their status, metrics, twin and desired state, device keys
groups     device groups
alarms     alarms: list, acknowledge, clear
specs      ``/apply`` and revisions
admin      users, sessions, audit log
credentials API tokens; disable, enable a user, revoke all its tokens
system     health, ``/metrics``, the documented ingest route
ws         the live WebSocket feed
timeseries queries, storage, retention
commands   commands to devices, batches, the devices' HTTP long-poll
scenes     scenes, running them, their traces
cluster    the engines of a scale-out cluster and what each owns
reports    reports: list, run now, past runs, download their files; recent notifications
video      cameras: status, signed links, HLS, HTTP-FLV, snapshots, recordings, clips
edge       edge nodes: their uplink (edge keys), link state
plugins    loaded plugins, refused modules, their counters
========== ===================================================================
"""

from __future__ import annotations

from fastapi import APIRouter

from twin.api.routes import (
    admin,
    alarms,
    auth,
    cluster,
    commands,
    credentials,
    devices,
    edge,
    groups,
    plugins,
    reports,
    scenes,
    specs,
    system,
    timeseries,
    video,
    ws,
)

ROUTERS: tuple[APIRouter, ...] = (
    system.health_router,
    auth.router,
    devices.router,
    groups.router,
    alarms.router,
    specs.router,
    admin.router,
    credentials.router,
    system.router,
    ws.router,
    timeseries.router,
    commands.router,
    scenes.router,
    cluster.router,
    reports.router,
    reports.notifications_router,
    video.router,
    edge.router,
    plugins.router,
)

__all__ = ["ROUTERS"]
