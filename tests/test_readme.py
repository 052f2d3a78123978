"""The README, walked as a newcomer walks it: every command of its ``bash`` blocks in "Two
commands", "Working with specs" and "Running it", in order, in a fresh directory (``./.twin``
state, ``sites`` linked in), against real ``twin up`` processes on free ports.

Each command must exit 0 and print what it is there to show (``CHECKS``). The few commands that
cannot simply run are handled explicitly, each with its reason (``SKIPPED``, ``LONG_RUNNING``,
``NEEDS_INPUT``, ``EXIT_CODES``); a README command that none of these rules knows just runs and
must exit 0. So the README cannot rot: a renamed command, a changed output, a scene the demo
lost or a step that stopped working fails here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cli.procs import Up, wait_for

pytestmark = pytest.mark.slow  # two engines, a dashboard and ~25 commands: about a minute

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SECTIONS = ("Two commands", "Working with specs", "Running it")
PASSWORD = "a long enough passphrase"

# Parts of README commands this test does not run, and why.
SKIPPED = {
    "python3 -m venv .venv": "CI (.ci/run) creates exactly this venv; the test runs inside it",
    ". .venv/bin/activate": "the same: the test already runs in the activated venv",
    "pip install -e '.[dev]'": "the same: CI installs the project exactly this way first",
    "pytest": "the test suite itself, which is running this test",
}
# Commands that run until stopped: started in the background, checked, stopped by SIGINT
# (which must end them with exit 0 within a few seconds).
LONG_RUNNING = ("twin up", "twin broker")
# Commands that ask on the terminal: run as a script would, with the flag the README names.
NEEDS_INPUT = {
    "twin user add": ("--password-stdin", PASSWORD + "\n"),  # README: "asks for a password twice"
}
# Exit codes other than 0 that the README documents.
EXIT_CODES = {
    "twin simulate": {0, 3},  # README: "exit 3: conflicts" (then the output names them)
}


@dataclass
class Step:
    section: str
    line: str  # as in the README (comments included: bash drops them)

    @property
    def command(self) -> str:
        return self.line.split("  #", 1)[0].split(" # ", 1)[0].strip()


def readme_steps(text: str) -> list[Step]:
    """The commands of the ``bash`` blocks of SECTIONS, in README order, ``&&`` chains split."""
    steps = []
    section = None
    in_block = False
    for line in text.splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        elif line.startswith("### "):  # a subsection is reference (placeholders like ID), not the walk
            section = f"{section} / {line[4:].strip()}"
        elif line.strip() == "```bash" and section in SECTIONS:
            in_block = True
        elif line.strip() == "```":
            in_block = False
        elif in_block and line.strip() and not line.lstrip().startswith("#"):
            assert section is not None
            code = line.partition("   #")[0]
            parts = [p.strip() for p in code.split(" && ")]
            if len(parts) > 1 and not all(p.startswith("twin ") for p in parts):
                steps += [Step(section, p) for p in parts]  # an install chain: its parts
            else:
                steps.append(Step(section, line))
    return steps


def test_readme_steps_are_found() -> None:
    steps = readme_steps(README.read_text())
    sections = {s.section for s in steps}
    assert sections == set(SECTIONS), sections
    commands = [s.command for s in steps]
    assert any(c.startswith("twin up") for c in commands)
    assert any(c.startswith("twin apply sites/demo --server") for c in commands)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Walk:
    """The newcomer's shell: a directory, an environment that `export` changes, engines."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TWIN_")}
        venv_bin = str(Path(sys.executable).parent)  # `twin` of this install
        self.env["PATH"] = venv_bin + os.pathsep + self.env.get("PATH", "")
        self.env["COLUMNS"] = "200"
        self.env["TWIN_AUTHOR"] = "newcomer"
        self.port = free_port()  # stands for the README's 127.0.0.1:8080
        self.env["TWIN_LISTEN"] = f"127.0.0.1:{free_port()}"  # `twin up` without --listen
        self.running: list[Up] = []
        self.log: list[str] = []

    def localize(self, line: str) -> str:
        return line.replace("127.0.0.1:8080", f"127.0.0.1:{self.port}")

    def run(self, line: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        """Run ``line`` in bash; keep what it exported for the next lines."""
        env_file = self.home / ".env0"
        script = f"{line}\n__rc=$?\nenv -0 > {shlex.quote(str(env_file))}\nexit $__rc\n"
        proc = subprocess.run(["bash", "-c", script], env=self.env, cwd=self.home, text=True,
                              capture_output=True, input=stdin, timeout=180)  # fmt: skip
        if env_file.exists():
            pairs = env_file.read_text().split("\0")
            self.env = dict(p.split("=", 1) for p in pairs if "=" in p)
            env_file.unlink()
        self.log.append(f"$ {line}\n[exit {proc.returncode}]\n{proc.stdout}{proc.stderr}")
        return proc

    def start(self, line: str) -> Up:
        proc = subprocess.Popen(["bash", "-c", "exec " + line], env=self.env, cwd=self.home,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        assert proc.stdout is not None
        lines: list[str] = []
        url = ""
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            out = proc.stdout.readline()
            if not out:
                break
            lines.append(out)
            m = re.search(r"^\s*api\s+(http://\S+)/api/v1", out) or re.match(r"(mqtt \S+)", out)
            if m:
                url = m.group(1)
            if out.startswith(("Ctrl-C to stop", "auth: ")):
                break
        self.log.append(f"$ {line} &\n{''.join(lines)}")
        if not url:
            proc.kill()
            raise AssertionError(f"{line!r} did not start:\n{''.join(lines)}")
        up = Up(proc, url, lines)
        self.running.append(up)
        return up

    def stop(self, up: Up) -> None:
        code = up.stop(signal.SIGINT, timeout=30)
        self.running.remove(up)
        assert code == 0, f"exit {code} after Ctrl-C:\n{up.output}"
        assert "Traceback" not in up.output, up.output

    def transcript(self) -> str:
        return "\n".join(self.log)


def _data_rows(csv_text: str) -> list[str]:
    lines = [line for line in csv_text.splitlines() if line.strip()]
    return lines[1:] if lines and lines[0].startswith('"ts"') else []


def _fan_power(walk: Walk) -> bool:
    proc = walk.run("twin describe device fan_01 -o json")
    twin = json.loads(proc.stdout).get("twin") or {}
    return (twin.get("reported") or {}).get("power", {}).get("value") is True


# What each command must print (beyond exit 0); the key is the command's start.
CHECKS: dict[str, Callable[[Walk, str], object]] = {
    "twin validate sites/demo": lambda w, out: "are valid" in out,
    "twin plan sites/demo --replay": lambda w, out: "Replay over" in out,
    "twin plan sites/demo": lambda w, out: "Plan:" in out or "No changes" in out,
    "twin apply sites/demo --server": lambda w, out: re.search(r"applied through http://\S+: ", out),
    "twin apply sites/demo": lambda w, out: "Applied: revision" in out or "No changes" in out,
    "twin get devices -l tag=hvac": lambda w, out: "fan_01" in out and "cam_gate_01" not in out,
    "twin describe device temp_sensor_01": lambda w, out: "Device temp_sensor_01" in out,
    "twin describe device fan_01": lambda w, out: "twin (live" in out,
    "twin history": lambda w, out: re.search(r"^\s*REV\s+WHEN", out, re.M),
    "twin diff 1": lambda w, out: "revision 1 →" in out,
    "twin rollback 1": lambda w, out: True,
    "twin user add": lambda w, out: "alice (operator, sites plant-a)" in out,
    "export TWIN_SERVER": lambda w, out: len(w.env.get("TWIN_TOKEN", "")) > 20,
    # README: "the command ledger: pending → … → success", and the fan really turns on
    "twin command send fan_01 set_state": lambda w, out: (
        re.search(r"fan_01 set_state: success", out)
        and wait_for(lambda: _fan_power(w), "fan_01 to report power on", within=30)
    ),
    "twin scene list": lambda w, out: "fan-on-when-hot" in out
    and re.search(r"fan-on-when-hot run |no runs of fan-on-when-hot recorded", out),
    "twin simulate": lambda w, out: "fired:" in out,
    "twin query temperature": lambda w, out: True,  # checked with a wait for data, below
}


def _check(step: Step, walk: Walk, out: str) -> None:
    for prefix, check in CHECKS.items():
        if step.command.startswith(prefix):
            assert check(walk, out), f"{step.command!r} printed:\n{out}"
            return
    raise AssertionError(f"no check for README command {step.command!r}: add one to CHECKS")


@pytest.fixture
def walk(tmp_path: Path) -> Iterator[Walk]:
    (tmp_path / "sites").symlink_to(ROOT / "sites")
    w = Walk(tmp_path)
    try:
        yield w
    finally:
        for up in list(w.running):
            up.stop(signal.SIGINT, timeout=30)


def test_readme_walkthrough(walk: Walk) -> None:
    steps = readme_steps(README.read_text())
    ran = 0
    for step in steps:
        command = walk.localize(step.command)
        if step.command in SKIPPED:
            continue
        try:
            if command.startswith(LONG_RUNNING):
                _long_running(walk, step, command)
            else:
                _once(walk, step, command)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n\n--- the walk so far:\n{walk.transcript()}") from None
        ran += 1
    for up in list(walk.running):  # the README's engine, once everything ran against it
        _metrics_need_a_token(walk, up)
        walk.stop(up)
    assert ran >= 20, walk.transcript()


def _once(walk: Walk, step: Step, command: str) -> None:
    stdin = ""
    for prefix, (flag, text) in NEEDS_INPUT.items():
        if command.startswith(prefix):
            command, stdin = f"{command} {flag}", text
    if command.startswith("twin query"):  # the engine stores its first readings in a moment

        def queried() -> subprocess.CompletedProcess[str] | None:
            proc = walk.run(command)
            assert proc.returncode == 0, f"{command!r}:\n{proc.stdout}{proc.stderr}"
            return proc if _data_rows(proc.stdout) else None

        wait_for(queried, "readings of temp_sensor_01 in the store")
        return
    proc = walk.run(command, stdin)
    codes = next((c for p, c in EXIT_CODES.items() if command.startswith(p)), {0})
    assert proc.returncode in codes, f"{command!r} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    if proc.returncode == 3:
        assert "conflict" in proc.stdout or "loop" in proc.stdout, proc.stdout
    _check(step, walk, proc.stdout)


def _long_running(walk: Walk, step: Step, command: str) -> None:
    up = walk.start(command)
    if command.startswith("twin broker"):
        host, port = up.url.split()[1].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10):
            pass  # it accepts connections; Ctrl-C ends it cleanly
        walk.stop(up)
        return
    banner = up.output
    assert "FLUX IoT engine up" in banner and re.search(r"^\s+mqtt\s+mqtt://", banner, re.M), banner
    if "--dashboard" in command:  # "Two commands": the demo with its dashboard, then Ctrl-C
        m = re.search(r"^\s+dashboard\s+(http://\S+)", banner, re.M)
        assert m, banner
        dash = m.group(1)
        wait_for(lambda: _get(dash + "/_stcore/health") == 200, "the dashboard to answer")
        walk.stop(up)
    # the README's engine ("Running it") keeps running for the commands that follow


def _get(url: str, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        return httpx.get(url, headers=headers, timeout=5).status_code
    except httpx.HTTPError:
        return 0


def _metrics_need_a_token(walk: Walk, up: Up) -> None:
    """README: "Every API route needs a token, /metrics included"."""
    assert _get(up.url + "/metrics") == 401
    assert _get(up.url + "/metrics", walk.env["TWIN_TOKEN"]) == 200
