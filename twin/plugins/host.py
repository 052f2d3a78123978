"""The plugin host: loaded plugins by name, hot swap, limits, failure accounting.

``PluginHost.sync(specs)`` loads every ``kind: Plugin`` of a spec set whose module or settings
changed: the new module is compiled and started *first*, and only then swapped in (one dict
assignment), so a batch in flight finishes on the old module and the next one runs on the new.
A module that fails to load is refused: the old one keeps running (``load_errors``).

Every call goes through :meth:`PluginHost.run`, which never raises for what a plugin does:

* a failure (trap, fuel, steps, timeout, memory, output, malformed output) is counted per
  plugin and kind, logged with the plugin's name, and the caller gets ``None`` — its items
  become ``bad`` readings (codecs, transforms) or a false condition / no actions (scenes);
* ``failures.alarm_after`` failed calls in a row raise an alarm (through ``on_alarm``; the
  engine wires it to its supervision alarms on ``_engine``, type ``plugin_failure:NAME``) and
  suspend the plugin for ``failures.suspend_for``: meanwhile its items are marked bad without
  calling it, so a hostile module cannot eat the engine's CPU; a good call clears the alarm.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from twin.plugins.abi import (
    AbiError,
    Decoded,
    pack_readings,
    pack_records,
    unpack_readings,
    unpack_records,
)
from twin.plugins.errors import PluginFailure
from twin.plugins.starlark import StarlarkLimits, StarlarkModule
from twin.plugins.wasm import WasmLimits, WasmModule
from twin.spec.plugins import module_bytes, module_kind, parse_size
from twin.spec.units import parse_duration

_T = TypeVar("_T")
log = logging.getLogger(__name__)

DEFAULTS = {"fuel": 100_000, "steps": 100_000, "time": 0.5, "wasm_memory": 16 * 1024**2,
            "starlark_memory": 128 * 1024**2, "output": 4 * 1024**2, "batch": 1000,
            "alarm_after": 5, "suspend_for": 30.0}

AlarmHook = Callable[[str, str], None]  # (plugin, message)
ClearHook = Callable[[str], None]


@dataclass
class PluginStats:
    calls: int = 0
    items: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    in_a_row: int = 0
    fuel: int = 0
    steps: int = 0
    micros: float = 0.0
    last_error: str = ""
    suspended_until: float = 0.0
    alarmed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"calls": self.calls, "items": self.items, "failures": dict(self.failures),
                "failures_in_a_row": self.in_a_row, "fuel": self.fuel, "steps": self.steps,
                "micros": round(self.micros, 1), "last_error": self.last_error,
                "suspended": self.suspended_until > time.monotonic()}


@dataclass
class Plugin:
    name: str
    role: str
    kind: str  # wasm | starlark
    sha256: str
    spec: Mapping[str, Any]
    module: WasmModule | StarlarkModule
    batch: int
    alarm_after: int
    suspend_for: float
    lock: threading.Lock = field(default_factory=threading.Lock)


def _fingerprint(spec: Mapping[str, Any]) -> str:
    return json.dumps({k: v for k, v in spec.items() if k != "module"}, sort_keys=True) + \
        str((spec.get("module") or {}).get("sha256"))


def build(name: str, spec: Mapping[str, Any]) -> Plugin:
    """Load one plugin from its (validated) spec. Raises PluginFailure (kind ``load``...)."""
    try:
        data = module_bytes(spec)
    except ValueError as exc:
        raise PluginFailure("load", str(exc)) from None
    limits = dict(spec.get("limits") or {})
    fails = dict(spec.get("failures") or {})
    kind = module_kind(spec)
    time_limit = parse_duration(limits.get("time", DEFAULTS["time"])) or DEFAULTS["time"]
    output = parse_size(limits["output"]) if "output" in limits else int(DEFAULTS["output"])
    module: WasmModule | StarlarkModule
    if kind == "wasm":
        memory = parse_size(limits["memory"]) if "memory" in limits else int(DEFAULTS["wasm_memory"])
        module = WasmModule(name, data, spec, WasmLimits(int(limits.get("fuel", DEFAULTS["fuel"])),
                                                         float(time_limit), memory, output))
    else:
        memory = parse_size(limits["memory"]) if "memory" in limits else int(DEFAULTS["starlark_memory"])
        module = StarlarkModule(name, data, spec, StarlarkLimits(
            int(limits.get("steps", DEFAULTS["steps"])), float(time_limit), memory, output))
    return Plugin(
        name, str(spec.get("role")), kind, str((spec.get("module") or {}).get("sha256")), spec,
        module, int(limits.get("batch", DEFAULTS["batch"])),
        int(fails.get("alarm_after", DEFAULTS["alarm_after"])),
        float(parse_duration(fails.get("suspend_for", DEFAULTS["suspend_for"])) or 0.0),
    )


class PluginHost:
    def __init__(self) -> None:
        self.plugins: dict[str, Plugin] = {}
        self.stats: dict[str, PluginStats] = {}
        self.load_errors: dict[str, str] = {}
        self._fingerprints: dict[str, str] = {}
        self.on_alarm: AlarmHook | None = None
        self.on_clear: ClearHook | None = None
        self.prom: Any = None  # an object with plugin_call(name, outcome, items, micros)
        self._users = 0  # engines running on this host (a process may run several)

    def acquire(self) -> None:
        """An engine starts using the host."""
        self._users += 1

    def release(self) -> None:
        """An engine stopped: the last one closes the plugins (Starlark workers end)."""
        self._users = max(0, self._users - 1)
        if self._users == 0:
            self.close()

    # -- loading -------------------------------------------------------------------------
    def sync(self, specs: Mapping[tuple[str, str], Mapping[str, Any]]) -> dict[str, str]:
        """Load new/changed plugins of a spec set, drop removed ones. Returns load errors of
        this sync by plugin (those keep their old module, if any)."""
        wanted = {name: dict(doc.get("spec") or {}) for (kind, name), doc in specs.items()
                  if kind == "Plugin"}
        errors: dict[str, str] = {}
        for name, spec in sorted(wanted.items()):
            fp = _fingerprint(spec)
            if self._fingerprints.get(name) == fp:
                continue
            try:
                plugin = build(name, spec)
            except Exception as exc:  # PluginFailure, or anything odd in a spec: refused, logged
                if not isinstance(exc, PluginFailure):
                    log.exception("plugin %s: loading failed", name)
                    exc = PluginFailure("load", f"{type(exc).__name__}: {exc}")
                errors[name] = str(exc)
                self.load_errors[name] = str(exc)
                log.error("plugin %s: refused the new module (%s); %s", name, exc,
                          "the old one keeps running" if name in self.plugins else "not loaded")
                continue
            self.swap(plugin)
            self._fingerprints[name] = fp
            self.load_errors.pop(name, None)
        for name in [n for n in self.plugins if n not in wanted]:
            old = self.plugins.pop(name)
            self._fingerprints.pop(name, None)
            with old.lock:
                old.module.close()
        return errors

    def changed(self, specs: Mapping[tuple[str, str], Mapping[str, Any]]) -> bool:
        """Whether :meth:`sync` has anything to do for this spec set (cheap: no loading)."""
        wanted = {name: doc.get("spec") or {} for (kind, name), doc in specs.items()
                  if kind == "Plugin"}
        if set(wanted) != set(self._fingerprints) | set(self.load_errors) or \
                any(n not in wanted for n in self.plugins):
            return True
        return any(self._fingerprints.get(n) != _fingerprint(s) for n, s in wanted.items())

    def swap(self, plugin: Plugin) -> None:
        """Make ``plugin`` the one its name runs (atomic: a batch in flight keeps the old)."""
        old = self.plugins.get(plugin.name)
        self.plugins[plugin.name] = plugin
        stats = self.stats.setdefault(plugin.name, PluginStats())
        stats.in_a_row, stats.suspended_until = 0, 0.0  # a new module gets a fresh chance
        log.info("plugin %s: %s module %s loaded (role %s)", plugin.name, plugin.kind,
                 plugin.sha256[:12], plugin.role)
        if old is not None:
            with old.lock:  # after the batch in flight
                old.module.close()

    def close(self) -> None:
        for p in list(self.plugins.values()):
            with p.lock:
                p.module.close()
        self.plugins.clear()
        self._fingerprints.clear()

    def get(self, name: str) -> Plugin | None:
        return self.plugins.get(name)

    def uses_thread(self, name: str) -> bool:
        """Whether calls should leave the event loop (Starlark: a worker process round trip)."""
        p = self.plugins.get(name)
        return p is not None and p.kind == "starlark"

    # -- calls -----------------------------------------------------------------------------
    def run(self, name: str, entry: str, batch: Sequence[Any], items: int) -> tuple[Any, dict[str, Any]] | None:
        """Call ``entry`` of plugin ``name`` with an encoded batch; ``None`` on any failure
        (counted, logged, alarmed). Returns (raw output, cost)."""
        plugin = self.plugins.get(name)
        stats = self.stats.setdefault(name, PluginStats())
        if plugin is None:
            self._failed(name, stats, PluginFailure("load", self.load_errors.get(name, "not loaded")),
                         items, count=False)
            return None
        now = time.monotonic()
        if stats.suspended_until > now:
            stats.failures["suspended"] = stats.failures.get("suspended", 0) + 1
            self._metric(name, "suspended", items, 0.0)
            return None
        with plugin.lock:
            if self.plugins.get(name) is not plugin and name in self.plugins:
                plugin = self.plugins[name]  # swapped while we waited: run the new one
            t0 = time.perf_counter()
            try:
                if isinstance(plugin.module, WasmModule):
                    out, wcost = plugin.module.call(entry, batch[0], items)
                    cost = {"fuel": wcost.fuel, "micros": wcost.micros}
                    stats.fuel += wcost.fuel
                else:
                    out, scost = plugin.module.call(entry, batch[0], items)
                    cost = {"steps": scost.steps, "micros": scost.micros}
                    stats.steps += scost.steps
            except PluginFailure as exc:
                self._failed(name, stats, exc, items, plugin=plugin)
                return None
            except Exception as exc:  # a bug in the host glue must not reach the caller either
                log.exception("plugin %s: unexpected error", name)
                self._failed(name, stats, PluginFailure("unknown", f"{type(exc).__name__}: {exc}"),
                             items, plugin=plugin)
                return None
        micros = (time.perf_counter() - t0) * 1e6
        stats.calls += 1
        stats.items += items
        stats.micros += micros
        self._metric(name, "ok", items, micros)
        return out, cost

    def ok(self, name: str) -> None:
        """The call's output was usable: the failure streak ends (and its alarm clears)."""
        stats = self.stats.get(name)
        if stats is None:
            return
        stats.in_a_row = 0
        if stats.alarmed:
            stats.alarmed = False
            if self.on_clear is not None:
                try:
                    self.on_clear(name)
                except Exception:
                    log.exception("plugin %s: clearing the alarm failed", name)

    def _failed(self, name: str, stats: PluginStats, exc: PluginFailure, items: int, *,
                plugin: Plugin | None = None, count: bool = True) -> None:
        stats.failures[exc.kind] = stats.failures.get(exc.kind, 0) + 1
        stats.last_error = str(exc)
        self._metric(name, exc.kind, items, 0.0)
        if not count:
            return
        stats.in_a_row += 1
        total = sum(v for k, v in stats.failures.items() if k != "suspended")
        if total <= 3 or total % 100 == 0:
            log.warning("plugin %s: %s (%d failed calls in a row, %d in all)", name, exc,
                        stats.in_a_row, total)
        limit = plugin.alarm_after if plugin is not None else DEFAULTS["alarm_after"]
        if stats.in_a_row >= int(limit):
            suspend = plugin.suspend_for if plugin is not None else float(DEFAULTS["suspend_for"])
            stats.suspended_until = time.monotonic() + suspend
            message = (f"plugin {name}: {stats.in_a_row} failed calls in a row, last: {exc}; "
                       f"suspended for {suspend:g}s (its readings are marked bad)")
            log.error("%s", message)
            stats.in_a_row = 0
            if not stats.alarmed and self.on_alarm is not None:
                stats.alarmed = True
                try:
                    self.on_alarm(name, message)
                except Exception:
                    log.exception("plugin %s: raising the alarm failed", name)

    def output_failed(self, name: str, exc: Exception) -> None:
        """The plugin ran but its output broke the ABI: a failure like any other."""
        plugin = self.plugins.get(name)
        stats = self.stats.setdefault(name, PluginStats())
        if isinstance(plugin, Plugin) and isinstance(plugin.module, WasmModule):
            plugin.module.close()  # fresh instance next time
        self._failed(name, stats, PluginFailure("abi", str(exc)), 0, plugin=plugin)

    def _call(
        self,
        name: str,
        entry: str,
        batch: Any,
        items: int,
        parse: Callable[[Any], _T],
        errors: tuple[type[Exception], ...] = (AbiError,),
    ) -> _T | None:
        """:meth:`run` ``entry`` on one encoded batch and ``parse`` its raw output; None when
        the call failed or ``parse`` raised one of ``errors`` (counted as an ABI failure)."""
        res = self.run(name, entry, [batch], items)
        if res is None:
            return None
        try:
            return parse(res[0])
        except errors as exc:
            self.output_failed(name, exc)
            return None

    def _metric(self, name: str, outcome: str, items: int, micros: float) -> None:
        if self.prom is not None:
            try:
                self.prom.plugin_call(name, outcome, items, micros)
            except Exception:
                log.exception("plugin metrics failed")

    # -- roles -----------------------------------------------------------------------------
    def decode(self, name: str, payloads: Sequence[bytes]) -> list[Decoded]:
        """Payloads -> readings ``(index, point, value, ts, good)``; on failure one bad
        reading ``(i, "", None, 0.0, False)`` per payload."""
        return self._decode_chunks(name, payloads, None)

    def decode_or_none(self, name: str, payloads: Sequence[bytes]) -> list[Decoded] | None:
        """:meth:`decode`, but None when a call failed (trap, fuel, ...): for a caller that
        batched payloads of several sources and then decodes them one by one, so that one
        source's poisonous payload does not make the others' readings bad."""
        failed: list[bool] = []
        out = self._decode_chunks(name, payloads, failed)
        return None if failed else out

    def _decode_chunks(self, name: str, payloads: Sequence[bytes], failed: list[bool] | None
                       ) -> list[Decoded]:
        out: list[Decoded] = []
        plugin = self.plugins.get(name)
        step = plugin.batch if plugin is not None else DEFAULTS["batch"]
        if len(payloads) <= int(step):
            return self._decode(name, payloads, failed)
        for start in range(0, len(payloads), int(step)):
            chunk = payloads[start:start + int(step)]
            out.extend((i + start, p, v, ts, g) for i, p, v, ts, g in self._decode(name, chunk, failed))
            if failed:
                break
        return out

    def _decode(self, name: str, payloads: Sequence[bytes], failures: list[bool] | None = None
                ) -> list[Decoded]:
        plugin = self.plugins.get(name)
        failed = [(i, "", None, 0.0, False) for i in range(len(payloads))]
        if failures is not None:  # filled in below if the call fails; emptied when it did not
            failures.append(True)
        n = len(payloads)
        if plugin is None or plugin.kind == "wasm":
            decoded = self._call(
                name, "decode", pack_records(payloads), n, lambda raw: unpack_readings(raw, n)
            )
        else:
            text = json.dumps([list(p) for p in payloads], separators=(",", ":"))
            decoded = self._call(name, "decode", text, n, lambda raw: _starlark_decoded(raw, n))
        if decoded is None:
            return failed
        self.ok(name)
        if failures is not None:
            failures.pop()
        return decoded

    def encode(self, name: str, commands: Sequence[Mapping[str, Any]]) -> list[bytes] | None:
        """Commands ``{"name", "params"}`` -> frames; None when the plugin failed."""
        plugin = self.plugins.get(name)
        texts = [json.dumps(dict(c), separators=(",", ":"), default=str) for c in commands]
        frames: list[bytes] | None
        if plugin is None or plugin.kind == "wasm":
            frames = self._call(
                name, "encode", pack_records([t.encode() for t in texts]), len(texts),
                unpack_records,
            )
        else:
            frames = self._call(
                name, "encode", "[" + ",".join(texts) + "]", len(texts),
                lambda raw: [_frame(x) for x in raw] if isinstance(raw, list) else [],
                (TypeError, ValueError),
            )
        if frames is None:
            return None
        if len(frames) != len(commands):
            self.output_failed(name, AbiError(f"{len(frames)} frames for {len(commands)} commands"))
            return None
        self.ok(name)
        return frames

    def transform(self, name: str, readings: Sequence[tuple[str, Any, float]]
                  ) -> list[tuple[int, str, Any, float, bool]] | None:
        """Readings ``(point, value, ts)`` -> readings ``(index, point, value, ts, good)``
        (index: the input reading it derives from); None when the plugin failed."""
        plugin = self.plugins.get(name)
        n = len(readings)
        if plugin is None or plugin.kind == "wasm":
            out = self._call(
                name, "transform", pack_readings(readings), n, lambda raw: unpack_readings(raw, n)
            )
        else:
            text = json.dumps([{"point": p, "value": v, "ts": ts} for p, v, ts in readings],
                              separators=(",", ":"), default=str)
            out = self._call(name, "transform", text, n, lambda raw: _starlark_readings(raw, n))
        if out is not None:
            self.ok(name)
        return out

    def call_json(self, name: str, entry: str, inputs: Sequence[Any]) -> list[Any] | None:
        """condition / action: JSON inputs -> JSON outputs (one per input); None on failure."""
        plugin = self.plugins.get(name)
        texts = [json.dumps(x, separators=(",", ":"), default=str) for x in inputs]
        outs: list[Any] | None
        if plugin is None or plugin.kind == "wasm":
            outs = self._call(
                name, entry, pack_records([t.encode() for t in texts]), len(texts),
                lambda raw: [json.loads(r) for r in unpack_records(raw)], (AbiError, ValueError),
            )
        else:
            outs = self._call(
                name, entry, "[" + ",".join(texts) + "]", len(texts),
                lambda raw: raw if isinstance(raw, list) else [],
            )
        if outs is None:
            return None
        if len(outs) != len(inputs):
            self.output_failed(name, AbiError(f"{len(outs)} results for {len(inputs)} inputs"))
            return None
        self.ok(name)
        return list(outs)

    def status(self) -> list[dict[str, Any]]:
        out = []
        for name in sorted(set(self.plugins) | set(self.load_errors)):
            p = self.plugins.get(name)
            out.append({
                "name": name,
                "kind": p.kind if p else None,
                "role": p.role if p else None,
                "sha256": p.sha256 if p else None,
                "load_error": self.load_errors.get(name),
                **self.stats.get(name, PluginStats()).to_json(),
            })
        return out


def _frame(x: Any) -> bytes:
    if isinstance(x, str):
        return x.encode("utf-8")
    if isinstance(x, list) and all(isinstance(b, int) and 0 <= b < 256 for b in x):
        return bytes(x)
    raise ValueError("a frame is a string or a list of byte values")


def _starlark_decoded(value: Any, inputs: int) -> list[Decoded]:
    """Starlark ``decode`` returns one entry per payload: ``{point: value}`` (or a list of
    ``{"point", "value", "ts"}``) or None (the payload is bad)."""
    if not isinstance(value, list) or len(value) != inputs:
        raise AbiError(f"decode must return a list with one entry per payload ({inputs})")
    out: list[Decoded] = []
    for i, entry in enumerate(value):
        if entry is None:
            out.append((i, "", None, 0.0, False))
        elif isinstance(entry, dict):
            out.extend((i, str(k), v, 0.0, True) for k, v in entry.items())
        elif isinstance(entry, list):
            for r in entry:
                if not isinstance(r, dict) or not isinstance(r.get("point"), str):
                    raise AbiError("a decoded reading is {point, value, ts?}")
                out.append((i, r["point"], r.get("value"), _ts(r.get("ts")), r.get("value") is not None))
        else:
            raise AbiError(f"decode entry {i} is {type(entry).__name__}")
    return out


def _starlark_readings(value: Any, inputs: int) -> list[tuple[int, str, Any, float, bool]]:
    if not isinstance(value, list):
        raise AbiError("transform must return a list of readings")
    out = []
    for r in value:
        if not isinstance(r, dict) or not isinstance(r.get("point"), str):
            raise AbiError("a reading is {point, value, ts?, index?}")
        index = r.get("index", 0)
        if not isinstance(index, int) or not 0 <= index < max(1, inputs):
            index = 0
        bad = r.get("quality") == "bad" or r.get("value") is None
        out.append((index, r["point"], r.get("value"), _ts(r.get("ts")), not bad))
    return out


def _ts(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return 0.0


class PluginCollector:
    """Prometheus collector over a host's counters (read at scrape time: no hot-path cost)."""

    def __init__(self, host: PluginHost) -> None:
        self.host = host

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        calls = CounterMetricFamily("twin_plugin_calls", "Successful plugin calls (batches)", labels=["plugin"])
        items = CounterMetricFamily("twin_plugin_items", "Items (payloads, readings) through plugins", labels=["plugin"])
        fails = CounterMetricFamily("twin_plugin_failures", "Failed plugin calls by kind (trap, fuel, "
                                    "steps, timeout, memory, output, abi, load, suspended)",
                                    labels=["plugin", "kind"])
        fuel = CounterMetricFamily("twin_plugin_fuel", "Wasm fuel consumed", labels=["plugin"])
        steps = CounterMetricFamily("twin_plugin_steps", "Starlark steps consumed", labels=["plugin"])
        secs = CounterMetricFamily("twin_plugin_seconds", "Wall time in plugin calls", labels=["plugin"])
        susp = GaugeMetricFamily("twin_plugin_suspended", "1 while a plugin is suspended after failures",
                                 labels=["plugin"])
        now = time.monotonic()
        for name, s in sorted(self.host.stats.items()):
            calls.add_metric([name], s.calls)
            items.add_metric([name], s.items)
            for kind, n in sorted(s.failures.items()):
                fails.add_metric([name, kind], n)
            fuel.add_metric([name], s.fuel)
            steps.add_metric([name], s.steps)
            secs.add_metric([name], s.micros / 1e6)
            susp.add_metric([name], 1 if s.suspended_until > now else 0)
        yield from (calls, items, fails, fuel, steps, secs, susp)
