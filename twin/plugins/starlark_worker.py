"""The Starlark worker process: runs one plugin's script under an address-space cap.

Started by :mod:`twin.plugins.starlark` as ``python -m twin.plugins.starlark_worker MEMORY``.
starlark-pyo3 can cancel an evaluation (a callback every ~1000 bytecode instructions: the step
budget and the wall-time limit) but has no memory limit, and a failed allocation in its Rust
heap aborts the process. So scripts run here, in a child process whose ``RLIMIT_AS`` is its
size after start-up plus ``MEMORY`` bytes: a script that allocates without bound kills only
this worker, which the host counts as a memory failure and starts again.

Frames on stdin/stdout: u32 little-endian length + JSON. Requests::

    {"op": "load", "source": "...", "config": {...}}
    {"op": "call", "fn": "transform", "items": "<JSON text of the batch>", "steps": N, "time": s}

Replies: ``{"ok": "<JSON text>", "steps": n, "us": t}`` or ``{"error": kind, "message": ...}``.
The batch crosses as JSON text decoded inside Starlark (``json.decode``): ~6x faster than
starlark-pyo3's object conversion.
"""

from __future__ import annotations

import json
import resource
import struct
import sys
import time
from typing import Any

_LEN = struct.Struct("<I")

SHIM = """

def flux_shim_call(name, text, config):
    return json.encode(FLUX_SHIM_FNS[name](json.decode(text), config))

FLUX_SHIM_FNS = {%s}
"""


def _vm_size() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _read(stream: Any) -> dict[str, Any] | None:
    head = stream.read(4)
    if len(head) < 4:
        return None
    (n,) = _LEN.unpack(head)
    data: dict[str, Any] = json.loads(stream.read(n))
    return data


def _write(stream: Any, msg: dict[str, Any]) -> None:
    data = json.dumps(msg, separators=(",", ":")).encode()
    stream.write(_LEN.pack(len(data)) + data)
    stream.flush()


class Budget:
    """The check_cancelled callback: starlark-pyo3 calls it every ~1000 instructions."""

    def __init__(self, ticks: int, seconds: float) -> None:
        self.limit = ticks
        self.deadline = time.perf_counter() + seconds
        self.ticks = 0
        self.why = ""

    def cancelled(self) -> bool:
        self.ticks += 1
        if self.ticks > self.limit:
            self.why = "steps"
            return True
        if time.perf_counter() > self.deadline:
            self.why = "timeout"
            return True
        return False


def main() -> None:
    import starlark as sl

    memory = int(sys.argv[1]) if len(sys.argv) > 1 else 128 * 1024 * 1024
    limit = _vm_size() + memory + 64 * 1024 * 1024  # + room for the batch's JSON text
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    frozen: Any = None
    config: Any = {}
    glb = sl.Globals.extended_by([sl.LibraryExtension.Json, sl.LibraryExtension.StructType])
    dialect = sl.Dialect.extended()
    dialect.enable_load = False
    while True:
        req = _read(stdin)
        if req is None:
            return
        try:
            if req["op"] == "load":
                fns = ", ".join(f"{json.dumps(e)}: {n}" for e, n in req["functions"].items())
                ast = sl.parse("plugin.star", req["source"] + SHIM % fns, dialect)
                mod = sl.Module()
                opts = sl.EvalOptions(check_cancelled=Budget(1 << 62, 1.0).cancelled,
                                      max_callstack_size=200)
                sl.eval_with(opts, mod, ast, glb)
                frozen = mod.freeze()
                config = req.get("config") or {}
                _write(stdout, {"ok": "null", "steps": 0, "us": 0})
                continue
            fn = req["fn"]
            t0 = time.perf_counter()
            budget = Budget(max(1, int(req["steps"]) // 1000), float(req["time"]))
            opts = sl.EvalOptions(check_cancelled=budget.cancelled, max_callstack_size=200)
            try:
                res = frozen.call_with(opts, "flux_shim_call", fn, req["items"], config)
            except sl.StarlarkError as exc:
                kind = budget.why or ("trap" if "cancelled" not in str(exc) else "timeout")
                text = str(exc)
                if "Starlark call stack overflow" in text or "too many recursion" in text:
                    kind = "trap"
                _write(stdout, {"error": kind, "message": _short(text, kind)})
                continue
            _write(stdout, {"ok": res.value, "steps": budget.ticks * 1000,
                            "us": (time.perf_counter() - t0) * 1e6})
        except MemoryError:
            _write(stdout, {"error": "memory", "message": "memory cap reached"})
            return  # the heap may be in any state: the host starts a fresh worker
        except Exception as exc:  # the worker answers every request; the host decides
            _write(stdout, {"error": "trap", "message": f"{type(exc).__name__}: {exc}"[:300]})
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # pyo3's PanicException: a Rust panic (out of memory)
            if type(exc).__name__ != "PanicException":
                raise
            oom = "memory" in str(exc)
            _write(stdout, {"error": "memory" if oom else "trap",
                            "message": "memory cap reached" if oom else f"panic: {exc}"[:300]})
            return  # a fresh worker for the next call


def _short(text: str, kind: str) -> str:
    if kind == "steps":
        return "step budget exhausted"
    if kind == "timeout":
        return "wall-time limit reached"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("error:")]
    return (lines[0] if lines else text.strip().splitlines()[-1] if text.strip() else "error")[:300]


if __name__ == "__main__":
    main()
