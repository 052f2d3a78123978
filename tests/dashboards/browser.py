"""Headless Chromium for the browser tests: Debian's chromium (``apt-get install -y chromium``)
driven by the playwright Python package (``playwright install`` is never run).

A test module sets ``pytestmark = MARKS``: skipped without them, unless
``TWIN_REQUIRE_CHROMIUM=1`` (CI), which makes their absence an error."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip

MISSING = [
    what
    for what, ok in (
        ("Debian's chromium at /usr/bin/chromium", Path(CHROMIUM).exists()),
        ("the playwright package", importlib.util.find_spec("playwright") is not None),
    )
    if not ok
]
if MISSING and os.environ.get("TWIN_REQUIRE_CHROMIUM") == "1":  # CI: never skip silently
    raise RuntimeError(f"TWIN_REQUIRE_CHROMIUM=1 but missing: {', '.join(MISSING)}")
MARKS = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(bool(MISSING), reason=f"needs {' and '.join(MISSING)}"),
]


def until(check: object, limit: float = 30) -> None:
    """Poll ``check`` (an HTTP error counts as not yet) until it is true, at most ``limit`` s."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError("condition not met in time")


def sign_in(page: Any, url: str, user: str, timeout: float = 30_000) -> None:
    """Open the dashboard at ``url`` on ``page`` and sign in as ``user`` (password
    secret123); returns once the overview shows."""
    page.goto(url)
    page.get_by_label("User name").fill(user)
    page.get_by_label("Password", exact=True).fill("secret123")
    page.get_by_role("button", name="Sign in").click()
    page.get_by_text("Devices by status").wait_for(timeout=timeout)
