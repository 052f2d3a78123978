"""WebAssembly plugins on wasmtime: fuel, epoch deadlines, a memory cap, no imports by default.

One wasmtime ``Engine`` for the process (fuel and epoch interruption on, a 512 KiB wasm
stack), and one daemon thread that ticks its epoch every ``TICK`` seconds: a call's wall time
limit is a deadline in ticks, so a module spinning in a loop is interrupted even if it has
fuel left. Each plugin has its own ``Store`` with ``set_limits(memory_size=...)`` (a
``memory.grow`` past the cap returns -1; a module whose initial memory exceeds it does not
load) and a fuel budget set before every call (``limits.fuel`` per item of the batch).

After any failure (trap, fuel, timeout, malformed output) the instance is dropped and the next
call starts from a fresh instance: a module's state after a trap is not trusted.
"""

from __future__ import annotations

import atexit
import json
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import wasmtime

from twin.plugins.abi import AbiError
from twin.plugins.errors import PluginFailure
from twin.spec.plugins import WASI_MODULES, entry_points

TICK = 0.002
"""Epoch tick (seconds): the resolution of the wall-time limit."""


@cache
def engine() -> wasmtime.Engine:
    cfg = wasmtime.Config()
    cfg.consume_fuel = True
    cfg.epoch_interruption = True
    cfg.max_wasm_stack = 512 * 1024
    eng = wasmtime.Engine(cfg)
    stop = threading.Event()
    t = threading.Thread(target=_ticker, args=(eng, stop), name="wasm-epoch", daemon=True)
    t.start()

    def shutdown() -> None:  # before the interpreter tears wasmtime's module down
        stop.set()
        t.join(1.0)
        eng.close()

    atexit.register(shutdown)
    return eng


def _ticker(eng: wasmtime.Engine, stop: threading.Event) -> None:
    while not stop.wait(TICK):
        eng.increment_epoch()


@dataclass(frozen=True)
class WasmLimits:
    fuel: int  # per item
    time: float  # seconds per call
    memory: int  # bytes of linear memory
    output: int  # bytes of output per call


@dataclass
class Cost:
    fuel: int = 0
    micros: float = 0.0


class _Instance:
    __slots__ = ("alloc", "entries", "memory", "store")

    def __init__(self, module: wasmtime.Module, limits: WasmLimits, wasi: bool,
                 config: Mapping[str, Any], names: Mapping[str, str]) -> None:
        store = wasmtime.Store(engine())
        store.set_limits(memory_size=limits.memory, table_elements=100_000, instances=1,
                         tables=4, memories=1)
        store.set_fuel(10_000_000)  # start-up (data segments, start function, configure)
        store.set_epoch_deadline(max(1, int(1.0 / TICK)))
        linker = wasmtime.Linker(store.engine)
        if wasi:
            linker.define_wasi()
            store.set_wasi(wasmtime.WasiConfig())  # no args, env, files, stdio, network
        try:
            inst = linker.instantiate(store, module)
        except wasmtime.Trap as exc:
            raise _failure(exc, "load") from None
        except wasmtime.WasmtimeError as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else "instantiation failed"
            kind = "memory" if "memory" in msg and ("limit" in msg or "exceed" in msg) else "load"
            raise PluginFailure(kind, msg) from None
        exports = inst.exports(store)
        mem = exports["memory"]
        if not isinstance(mem, wasmtime.Memory):
            raise PluginFailure("load", "'memory' is not a memory")
        self.store, self.memory = store, mem
        alloc: Any = exports["alloc"]
        self.alloc = alloc
        self.entries: dict[str, Any] = {entry: exports[name] for entry, name in names.items() if name in exports}
        configure = exports.get("configure") if "configure" in {e.name for e in module.exports} else None
        if isinstance(configure, wasmtime.Func) and config:
            data = json.dumps(dict(config), separators=(",", ":")).encode()
            try:
                ptr = self.alloc(store, len(data))
                self._write(ptr, data)
                configure(store, ptr, len(data))
            except wasmtime.Trap as exc:
                raise _failure(exc, "load") from None

    def _write(self, ptr: Any, data: bytes) -> None:
        if not isinstance(ptr, int) or ptr < 0 or ptr + len(data) > self.memory.data_len(self.store):
            raise PluginFailure("abi", f"alloc({len(data)}) returned {ptr!r}, outside memory")
        self.memory.write(self.store, data, ptr)


def _failure(exc: wasmtime.Trap | wasmtime.WasmtimeError, during: str = "call") -> PluginFailure:
    code = getattr(exc, "trap_code", None)
    msg = (exc.message if isinstance(exc, wasmtime.Trap) else str(exc)).strip().splitlines()
    text = msg[0] if msg else type(exc).__name__
    if code == wasmtime.TrapCode.OUT_OF_FUEL:
        return PluginFailure("fuel", "fuel exhausted")
    if code == wasmtime.TrapCode.INTERRUPT:
        return PluginFailure("timeout", "wall-time limit reached (epoch deadline)")
    if code == wasmtime.TrapCode.STACK_OVERFLOW:
        return PluginFailure("trap", "call stack exhausted (deep recursion)")
    if code == wasmtime.TrapCode.MEMORY_OUT_OF_BOUNDS:
        return PluginFailure("trap", "out-of-bounds memory access")
    return PluginFailure("trap" if during == "call" else "load", text)


class WasmModule:
    """A compiled plugin module and its (lazily re-made) instance. Not thread-safe: the host
    serialises calls per plugin."""

    kind = "wasm"

    def __init__(self, name: str, data: bytes, spec: Mapping[str, Any], limits: WasmLimits) -> None:
        self.name = name
        self.limits = limits
        self.wasi = "wasi" in (spec.get("capabilities") or ())
        self.config = dict(spec.get("config") or {})
        self.names = entry_points(spec)
        try:
            self.module = wasmtime.Module(engine(), data)
        except wasmtime.WasmtimeError as exc:
            raise PluginFailure("load", str(exc).strip().splitlines()[0]) from None
        for imp in self.module.imports:
            if not (self.wasi and imp.module in WASI_MODULES):
                raise PluginFailure("load", f"imports {imp.module}.{imp.name}, which is not granted")
        self._inst: _Instance | None = None
        self._instance()  # fail now (a bad start function, memory over the cap), not later

    def _instance(self) -> _Instance:
        if self._inst is None:
            self._inst = _Instance(self.module, self.limits, self.wasi, self.config, self.names)
        return self._inst

    def has(self, entry: str) -> bool:
        return entry in self._instance().entries

    def call(self, entry: str, data: bytes, items: int) -> tuple[bytes, Cost]:
        """Run one batch: ``data`` in, the output bytes out. Raises PluginFailure."""
        t0 = time.perf_counter()
        inst = self._instance()
        fn = inst.entries.get(entry)
        if fn is None:
            raise PluginFailure("abi", f"module does not export {self.names.get(entry, entry)!r}")
        store = inst.store
        budget = self.limits.fuel * max(1, items)
        store.set_fuel(budget)
        store.set_epoch_deadline(max(1, round(self.limits.time / TICK)))
        try:
            try:
                ptr = inst.alloc(store, len(data))
                inst._write(ptr, data)
                packed = fn(store, ptr, len(data))
            except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
                raise _failure(exc) from None
            if not isinstance(packed, int):
                raise PluginFailure("abi", f"{entry} returned {packed!r}, not an i64")
            out_ptr, out_len = (packed >> 32) & 0xFFFFFFFF, packed & 0xFFFFFFFF
            if out_len > self.limits.output:
                raise PluginFailure("output", f"output of {out_len} bytes is over the cap of "
                                    f"{self.limits.output}")
            if out_ptr + out_len > inst.memory.data_len(store):
                raise PluginFailure("abi", f"output [{out_ptr}, +{out_len}) is outside memory")
            out = bytes(inst.memory.read(store, out_ptr, out_ptr + out_len))
        except (PluginFailure, AbiError):
            self._inst = None  # never trust an instance after a failure
            raise
        used = budget - store.get_fuel()
        return out, Cost(used, (time.perf_counter() - t0) * 1e6)

    def close(self) -> None:
        self._inst = None
