"""Starlark plugins: one worker process per script (``starlark_worker``), called in batches.

The worker enforces the step budget and the wall-time limit cooperatively (starlark-pyo3's
``check_cancelled``) and the memory cap with ``RLIMIT_AS``. The host adds a hard deadline:
a worker that does not answer within the time limit plus a grace second is killed (by its
pid, it is our child) and started again on the next call. A worker that dies mid-call (the
memory cap, a crash) is a ``memory`` failure and is started again too.

Calls block the calling thread; the engine calls Starlark plugins from a worker thread
(``trio.to_thread``) so the event loop never waits on a script.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import struct
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twin.plugins.errors import PluginFailure
from twin.spec.plugins import entry_points

_LEN = struct.Struct("<I")
GRACE = 1.0


@dataclass(frozen=True)
class StarlarkLimits:
    steps: int  # per item
    time: float  # seconds per call
    memory: int  # bytes of heap for the worker
    output: int  # bytes of output per call


@dataclass
class StarlarkCost:
    steps: int = 0
    micros: float = 0.0


class StarlarkModule:
    """A script and the worker process that runs it. Not thread-safe: the host serialises
    calls per plugin."""

    kind = "starlark"

    def __init__(self, name: str, data: bytes, spec: Mapping[str, Any], limits: StarlarkLimits) -> None:
        self.name = name
        self.limits = limits
        try:
            self.source = data.decode("utf-8")
        except UnicodeDecodeError:
            raise PluginFailure("load", "the script is not UTF-8") from None
        self.config = dict(spec.get("config") or {})
        self.names = {e: n for e, n in entry_points(spec).items()
                      if re.search(rf"^def\s+{re.escape(n)}\s*\(", self.source, re.MULTILINE)}
        self._proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._start()  # fail now (a syntax error, a top-level loop), not at the first reading

    def has(self, entry: str) -> bool:
        return entry in self.names

    def _start(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self._proc = None
        env = dict(os.environ)
        env["RUST_BACKTRACE"] = "0"  # a panic (out of memory) must not symbolize a backtrace
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        proc = subprocess.Popen(
            [sys.executable, "-m", "twin.plugins.starlark_worker", str(self.limits.memory)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
            close_fds=True,
        )
        self._proc = proc
        reply = self._request({"op": "load", "source": self.source, "config": self.config,
                               "functions": self.names}, deadline=time.monotonic() + 20)
        if "error" in reply:
            self.close()
            raise PluginFailure("load", str(reply.get("message")))
        return proc

    def _request(self, msg: Mapping[str, Any], *, deadline: float) -> dict[str, Any]:
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        data = json.dumps(msg, separators=(",", ":")).encode()
        try:
            proc.stdin.write(_LEN.pack(len(data)) + data)
            proc.stdin.flush()
            head = self._read_exact(proc, 4, deadline)
            (n,) = _LEN.unpack(head)
            if n > self.limits.output + 4096:
                self.close()
                raise PluginFailure("output", f"output of {n} bytes is over the cap of "
                                    f"{self.limits.output}")
            reply: dict[str, Any] = json.loads(self._read_exact(proc, n, deadline))
            return reply
        except (BrokenPipeError, EOFError, OSError, ValueError) as exc:
            code = proc.poll()
            self.close()
            if (code is not None and code < 0) or isinstance(exc, EOFError):
                raise PluginFailure("memory", "the script's worker died (memory cap reached?)") from None
            raise PluginFailure("worker", f"worker failed: {exc}") from None

    def _read_exact(self, proc: subprocess.Popen[bytes], n: int, deadline: float) -> bytes:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        chunks: list[bytes] = []
        got = 0
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0:
                self.close()
                raise PluginFailure("timeout", "wall-time limit reached (worker killed)")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, n - got)
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def call(self, entry: str, items_json: str, items: int) -> tuple[Any, StarlarkCost]:
        """Run one batch (the items as JSON text); returns the decoded result. Raises PluginFailure."""
        if entry not in self.names:
            raise PluginFailure("abi", f"the script does not define the {entry} entry point")
        t0 = time.perf_counter()
        if self._proc is None or self._proc.poll() is not None:
            self.restarts += 1
            self._start()
        reply = self._request(
            {"op": "call", "fn": entry, "items": items_json,
             "steps": self.limits.steps * max(1, items), "time": self.limits.time},
            deadline=time.monotonic() + self.limits.time + GRACE,
        )
        if "error" in reply:
            raise PluginFailure(str(reply["error"]), str(reply.get("message", "")))
        text = reply.get("ok")
        if not isinstance(text, str) or len(text) > self.limits.output:
            raise PluginFailure("output", "output over the cap")
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise PluginFailure("abi", f"output is not JSON: {exc}") from None
        return value, StarlarkCost(int(reply.get("steps", 0)), (time.perf_counter() - t0) * 1e6)

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for stream in (proc.stdin, proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
