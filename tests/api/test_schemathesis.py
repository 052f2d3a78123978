"""Schemathesis against the live /openapi.json with every check (issue 11 item 6).

The CLI runs every phase (examples, coverage, fuzzing, stateful) with ``--checks all`` against
the real server of the ``api`` fixture as the admin user, a bounded number of examples and a
fixed seed (deterministic). Zero failures means: no 5xx, every status code and content type
answered is documented, every response matches its schema, schema-valid requests are accepted
(except where tests/api/schemathesis.toml says why not) and schema-violating ones refused, and
405 answers carry a complete ``Allow``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import trio

from twin.reports.service import ReportService
from twin.runtime.timeseries_service import TimeSeriesService

from .conftest import start_api

pytest.importorskip("schemathesis")

CONFIG = Path(__file__).with_name("schemathesis.toml")
EXAMPLES = os.environ.get("TWIN_SCHEMATHESIS_EXAMPLES", "10")


async def test_openapi_contract_all_checks(tmp_path: Path) -> None:
    api = None
    try:
        async with trio.open_nursery() as nursery:
            # with the time-series and report services, as `twin up` runs them (their routes
            # answer 503 without)
            api = await start_api(nursery, tmp_path / "state",
                                  services=[TimeSeriesService(), ReportService()])
            await _contract(api.url, api.tokens["admin"], tmp_path)
            nursery.cancel_scope.cancel()
    finally:
        if api is not None:
            api.registry.close()


async def _contract(url: str, token: str, tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(CONFIG),
        "run",
        f"{url}/openapi.json",
        "--checks",
        "all",
        "-H",
        f"Authorization: Bearer {token}",
        "--max-examples",
        EXAMPLES,
        "--seed",
        "1",
        "--generation-deterministic",
        "--request-timeout",
        "30",
        # logout would revoke the admin's token for the rest of the run; the feed is a WebSocket
        "--exclude-path-regex",
        "/auth/logout$|/ws$",
        "--no-color",
    ]
    result = await trio.run_process(
        cmd, capture_stdout=True, capture_stderr=True, check=False, cwd=tmp_path
    )
    out = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    assert result.returncode == 0, out[-20_000:]
