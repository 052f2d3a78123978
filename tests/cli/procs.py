"""``twin`` as a user runs it: subprocesses with their own state dir, ``twin up`` on free ports."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "twin.cli"]


def cli_env(state_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a user with their own state dir (nothing of the caller's twin vars)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWIN_")}
    env.update({"TWIN_STATE_DIR": str(state_dir), "TWIN_AUTHOR": "tester", "COLUMNS": "200"})
    env.update(extra)
    return env


def run(
    env: dict[str, str], *args: str, input: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=env, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
        input=input if input is not None else "",
    )  # fmt: skip


class Up:
    """A running ``twin up``: its process, API URL and every line it printed so far."""

    def __init__(self, proc: subprocess.Popen[str], url: str, lines: list[str]) -> None:
        self.proc = proc
        self.url = url
        self.lines = lines
        threading.Thread(target=self._drain, daemon=True).start()  # a full pipe blocks it

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60) -> int:
        """Send ``sig``; the exit code (killed and AssertionError if it does not stop)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"twin up did not stop within {timeout} s of {sig!r}") from None


def start_up(env: dict[str, str], *args: str, limit: float = 180) -> Up:
    """``twin up ARGS`` (add --listen/--mqtt-listen yourself); returns once the banner is out."""
    proc = subprocess.Popen(
        [*CLI, "up", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    url = None
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"^\s*api\s+(http://[0-9.:\[\]]+)/api/v1", line)
        if m:
            url = m.group(1)
        if line.startswith("Ctrl-C to stop"):
            break
    if url is None:
        proc.kill()
        proc.wait()
        raise AssertionError("twin up printed no API URL:\n" + "".join(lines))
    return Up(proc, url, lines)


def alive(pid: int) -> bool:
    """Whether ``pid`` is a process that is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def wait_for(fn, what: str, within: float = 60.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)
