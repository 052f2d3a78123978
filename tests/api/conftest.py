from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from runtime.helpers import apply, fast_config, group, model, sim_device, site

from twin.api import auth
from twin.api.app import ApiSettings
from twin.api.ratelimit import Rate
from twin.api.server import ApiService
from twin.control.service import ControlService
from twin.registry import open_registry
from twin.registry.base import Registry
from twin.runtime.engine import Engine

USERS = {
    "admin": ("admin", ()),
    "oper": ("operator", ()),
    "viewer": ("viewer", ()),
    "oper_b": ("operator", ("plant-b",)),  # scoped to the other site
    "oper_a": ("operator", ("plant-a",)),
    "admin_a": ("admin", ("plant-a",)),
}
PASSWORD = "correct horse battery"


@dataclass
class Api:
    url: str
    engine: Engine
    registry: Registry
    state_dir: Path
    tokens: dict[str, str] = field(default_factory=dict)

    def client(self, user: str | None = "admin", **kw: Any) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.tokens[user]}"} if user else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30, **kw)


def demo_docs() -> list[dict[str, Any]]:
    return [
        site("plant-a"),
        site("plant-b"),
        model(),
        group("line-1", "plant-a"),
        group("cell-1", "plant-a", parent="line-1"),
        sim_device("t1", group_="line-1", tags=["hvac"], labels={"floor": "2"}),
        sim_device("t2", group_="cell-1", tags=["hvac", "critical"], labels={"floor": "3"}),
        sim_device("b1", site_="plant-b", type_="actuator"),
        sim_device("push1", binding={"http": {}}, heartbeat={"interval": "5s", "timeout": "60s"}),
    ]


async def start_api(
    nursery: trio.Nursery,
    state_dir: Path,
    settings: ApiSettings | None = None,
    docs: list[dict[str, Any]] | None = None,
    services: list[Any] | None = None,
) -> Api:
    reg = open_registry(None, state_dir)
    if docs is None:
        docs = demo_docs()
    if docs and reg.head() is None:
        apply(reg, *docs)
    for name, (role, sites) in USERS.items():
        if reg.get_user(name) is None:
            reg.put_user(auth.make_user(name, PASSWORD, role, sites))
    settings = settings or loose_settings(state_dir)
    engine = Engine(
        reg,
        fast_config(state_dir=state_dir),
        # like `twin up`: the control service reconciles desired values through the ledger
        [
            ControlService(reconcile_interval=0.5),
            *(services or ()),
            ApiService("127.0.0.1", 0, settings),
        ],
    )
    await nursery.start(engine.run)
    info = engine.service_info["api"]
    api = Api(info["url"], engine, reg, state_dir)
    secret = auth.load_secret(state_dir)
    for name in USERS:
        user = reg.get_user(name)
        assert user is not None
        api.tokens[name] = auth.issue_access_token(secret, user)
    return api


def loose_settings(state_dir: Path, **kw: Any) -> ApiSettings:
    """API settings whose rate limits no test reaches by accident, then ``kw``."""
    return ApiSettings(
        state_dir=state_dir,
        rate_per_token=Rate(10_000, 10_000),
        rate_per_client=Rate(10_000, 10_000),
        rate_ingest_per_device=Rate(10_000, 10_000),
        **kw,
    )


@asynccontextmanager
async def serving(
    state_dir: Path, settings: ApiSettings | None = None, **kw: Any
) -> AsyncIterator[Api]:
    """:func:`start_api` (``kw``: its docs, services) for the block; then the engine stops
    and the registry closes."""
    a: Api | None = None
    try:
        async with trio.open_nursery() as nursery:
            a = await start_api(nursery, state_dir, settings, **kw)
            yield a
            nursery.cancel_scope.cancel()
    finally:
        if a is not None:
            a.registry.close()


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    async with serving(tmp_path / "state") as a:
        yield a
