"""The real engine for the dashboard tests: ``twin up SITE`` on free ports, read back from its
output, and stopped (terminate, then kill)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TWIN = str(Path(sys.executable).with_name("twin"))


def wait_line(proc: subprocess.Popen[str], pattern: str, limit: float = 60) -> str:
    """The first group of ``pattern`` in the process output (the process prints its URL)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + limit
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        m = re.search(pattern, line)
        if m:
            return m.group(1)
    raise AssertionError(f"no {pattern!r} in output:\n{''.join(seen)}")


def demo_copy(tmp: Path, users: Mapping[str, str]) -> tuple[Path, Path, dict[str, str]]:
    """A copy of sites/demo (``tmp/site``), an empty state dir (``tmp/state``), the environment
    of a ``twin`` on that state (password secret123, no FLUX_TOKEN of the caller's), and
    ``users`` (name: role) added."""
    site = tmp / "site"
    shutil.copytree(ROOT / "sites" / "demo", site)
    state = tmp / "state"
    state.mkdir()
    env = {**os.environ, "TWIN_STATE_DIR": str(state), "TWIN_PASSWORD": "secret123"}
    env.pop("FLUX_TOKEN", None)
    for user, role in users.items():
        subprocess.run([TWIN, "user", "add", user, "--role", role], env=env, check=True)
    return site, state, env


def twin_up(site: Path, env: Mapping[str, str]) -> tuple[subprocess.Popen[str], str]:
    """``twin up SITE`` with the API and MQTT on free ports; returns it and the API's URL."""
    proc = subprocess.Popen(
        [TWIN, "up", str(site), "--listen", "127.0.0.1:0", "--mqtt-listen", "127.0.0.1:0"],
        env={**env, "COLUMNS": "200"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        api = wait_line(proc, r"api\s+(http://[0-9.:]+)")
    except BaseException:
        stop(proc)
        raise
    # keep reading its log: a full pipe would block the engine on its next log line
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # type: ignore[union-attr]
    return proc, api


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def dashboard(site: Path, api: str, env: Mapping[str, str]) -> Iterator[str]:
    """``twin dashboard SITE --server API`` on a free port for the block: its URL, once its
    health check answers."""
    import httpx

    from tests.dashboards.browser import until

    dash = subprocess.Popen(
        [TWIN, "dashboard", str(site), "--server", api, "--port", "0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        url = wait_line(dash, r"dashboard\s+(http://[0-9.:]+)")
        until(lambda: httpx.get(f"{url}/_stcore/health").status_code == 200)
        yield url
    finally:
        stop(dash)
