"""``GET /api/v1/plugins``: the loaded plugins (twin/plugins), their module hash, load errors and
counters — calls, items, failures by kind, fuel / steps, time, suspension."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from twin.api.deps import PREFIX, State, Viewer

router = APIRouter(tags=["plugins"])


class PluginStatus(BaseModel):
    name: str
    kind: str | None  # wasm | starlark (None: never loaded)
    role: str | None
    sha256: str | None
    load_error: str | None  # the last refused module (the running one, if any, is kept)
    calls: int
    items: int
    failures: dict[str, int]  # trap, fuel, steps, timeout, memory, output, abi, load, suspended
    failures_in_a_row: int
    fuel: int
    steps: int
    micros: float
    last_error: str
    suspended: bool


@router.get(f"{PREFIX}/plugins")
async def list_plugins(st: State, p: Viewer) -> list[PluginStatus]:
    """Every plugin the engine knows: what runs, what was refused, what failed."""
    return [PluginStatus(**row) for row in st.engine.plugins.status()]
