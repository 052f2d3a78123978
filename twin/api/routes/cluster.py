"""``GET /api/v1/cluster``: the engines of a scale-out cluster, their load and what each owns
(twin/runtime/cluster.py); a single engine answers ``{"cluster": null, ...}``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from twin.api.deps import PREFIX, State, Viewer

router = APIRouter(tags=["cluster"])


@router.get(f"{PREFIX}/cluster")
async def cluster_status(st: State, p: Viewer) -> dict[str, Any]:
    """This engine's view of the cluster: live engines (lease, load), what this one owns, and
    its counters (claims, releases, deduplicated scene runs, refused command claims)."""
    svc = st.engine.service_info.get("cluster")
    if svc is None:
        engine = st.engine
        return {
            "cluster": None,
            "engine": None,
            "members": [],
            "owns": {"devices": sorted(engine.controller.tasks), "scenes": []},
            "stats": {},
        }
    out: dict[str, Any] = svc.status()
    out["feed"] = svc.feed.stats()
    return out
