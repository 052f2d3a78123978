"""Suite-wide hooks.

In CI, ``TWIN_REQUIRE_POSTGRES=1`` / ``TWIN_REQUIRE_MOSQUITTO=1`` turn a skipped test with the
``postgres`` / ``mosquitto`` marker into a failure, so a missing server cannot pass silently.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from twin.registry import open_registry
from twin.registry.base import Registry

_REQUIRED = {"postgres": "TWIN_REQUIRE_POSTGRES", "mosquitto": "TWIN_REQUIRE_MOSQUITTO"}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if not report.skipped:
        return
    for marker, env in _REQUIRED.items():
        if item.get_closest_marker(marker) and os.environ.get(env) == "1":
            report.outcome = "failed"
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
            report.longrepr = f"{env}=1 but this {marker} test was skipped: {reason}"


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    """A fresh SQLite registry in the test's state dir (tests/registry's own fixture runs each
    of its tests on every backend)."""
    reg = open_registry(None, tmp_path / "state")
    try:
        yield reg
    finally:
        reg.close()
