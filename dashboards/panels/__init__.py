"""One module per panel type, each with ``render(ctx, panel)``; :data:`PANELS` maps types."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dashboards.core import Ctx
from dashboards.panels import (
    alarms,
    cluster,
    commands,
    devices,
    edges,
    history,
    map,
    markdown,
    reports,
    scenes,
    stat,
    timeseries,
    video,
)

Render = Callable[[Ctx, dict[str, Any]], None]

PANELS: dict[str, Render] = {
    "map": map.render,
    "stat": stat.render,
    "timeseries": timeseries.render,
    "alarms": alarms.render,
    "devices": devices.render,
    "commands": commands.render,
    "scenes": scenes.render,
    "history": history.render,
    "markdown": markdown.render,
    "video": video.render,
    "cluster": cluster.render,
    "edges": edges.render,
    "reports": reports.render,
}

LIVE = {"map", "stat", "timeseries", "alarms", "devices", "commands", "scenes", "cluster", "edges"}
"""Panels that refresh on the dashboard's ``refresh`` interval (history waits for the user)."""
