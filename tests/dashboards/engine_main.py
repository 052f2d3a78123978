"""Run the engine + API + time-series service on a site, for the dashboard's browser tests
and benchmark while ``twin up`` does not start the time-series service yet.

``python tests/dashboards/engine_main.py SITE STATE_DIR`` applies SITE, serves the API on a free
port and prints ``api http://127.0.0.1:PORT`` once it is up. The state directory must hold users.
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

from twin.api.app import ApiSettings
from twin.api.server import ApiService, bind_socket
from twin.registry import open_registry
from twin.runtime.engine import Engine, EngineConfig
from twin.runtime.timeseries_service import TimeSeriesService
from twin.spec import load_site
from twin.spec.apply import apply_specs


def main(site: str, state_dir: str) -> None:
    state = Path(state_dir)
    reg = open_registry(None, state)
    if site != "-":
        apply_specs(reg, load_site(site), author="test", message="dashboard test", source="cli")
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    services = [
        TimeSeriesService(),
        ApiService("127.0.0.1", port, ApiSettings(state_dir=state), sock=sock),
    ]
    engine = Engine(reg, EngineConfig(state_dir=state), services)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            print(f"api http://127.0.0.1:{port}", flush=True)

    trio.run(run)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
