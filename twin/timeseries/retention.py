"""``kind: RetentionPolicy``: downsampling tiers and expiry, and storage monitoring.

::

    apiVersion: flux.iot/v1
    kind: RetentionPolicy
    metadata: {name: hvac, site: plant-a}
    spec:
      select: {site: plant-a, tag: hvac, metric: [temperature, humidity]}
      tiers:
        - {resolution: raw, keep: 7d}
        - {resolution: 1m, keep: 30d, aggregates: [avg, min, max, count]}
        - {resolution: 1h, keep: 365d}
        - {resolution: 1d, keep: inf}

One series, one policy
    A series must be governed by at most one policy: two policies rolling up the same
    series would write its partials twice into a shared tier (counts and sums doubled) and
    fight over its raw data with different ``keep`` values. ``twin validate`` rejects
    policies whose selectors can overlap (rules in ``twin.spec.retention_check``); a
    ``RetentionManager`` handed overlapping policies anyway (an old revision, a library
    caller) runs only the first of each overlapping pair by name and lists the others in
    ``skipped`` with the reason, so no series is ever processed twice.

Downsampling
    Tier *n* is computed from tier *n-1* (the first from raw) over **closed windows only**:
    up to ``now - lateness`` floored to the tier's resolution, and never past the source
    tier's own watermark. A per-(policy, tier) watermark in the store's metadata records how
    far a tier is complete; each step replaces the tier's rows for its window
    (delete + add), so re-running changes nothing, and after downtime the loop simply
    catches up window by window. Tiers store partials (count, sum, min, max, first, last),
    so every aggregate can be answered from them whatever ``aggregates`` lists (the list
    documents intent and is validated).

    Rollup is incremental and prompt: ``downsample`` is cheap when nothing closed, and
    ``next_due`` says when it next has work: at once when closed windows wait (first run,
    after downtime, after a failure), else when the next window of any tier closes (plus
    ``lateness``). The engine's rollup loop (``TimeSeriesService``) runs it right then,
    independently of the slow expiry/compaction cadence. ``lags`` reports, per (policy,
    tier), the watermark, its age (``now - watermark``, which includes the open window)
    and the rollup lag proper: how long the oldest *closed* window that is not rolled up
    yet has been closed (``max(0, now - (watermark + resolution))``), 0 when current.

Killed mid-rollup
    The watermark moves only after a window's replace has completed, and queries read
    raw data after the watermark. A process killed between the delete and the add of a
    replace (LanceDB: two commits; PostgreSQL: one transaction) or before the watermark
    write leaves the window's tier rows missing or complete, but behind the watermark;
    either way queries still answer that window from raw, and the next run replaces the
    window again. Nothing is counted twice, nothing is lost
    (``tests/timeseries/test_retention_rollup.py``: a crash at each point on every store,
    and a real SIGKILL of a LanceDB rollup between its delete and its add).

Full disk
    A rollup on a full disk fails with ``StorageError`` (LanceDB refuses the add below
    ``min_free_bytes``; the window's old tier rows may already be deleted, which is the
    killed-mid-rollup case above); the watermark stays where it was, the source data is
    kept (expiry never deletes past the next tier's watermark), the failure is logged and
    counted (``twin_timeseries_rollups_total{result="error"}``) and retried every
    ``rollup_retry`` s: the tier catches up when space returns. In the engine the rollup
    also waits for the writer (a flush barrier), so while raw writes are refused no window
    is rolled up with readings missing.

Expiry
    Each tier's rows older than ``keep`` are deleted, but never data that the next tier has
    not rolled up yet (the cut-off is capped at that tier's watermark). After deleting, the
    store compacts and drops old versions, which is what returns the space. Expiry and
    compaction run on the slow cadence (``expire_and_reclaim``); ``run_once`` does both.

Query tier choice
    The catalogue (``tiers`` meta) lists, per tier, its resolution and the policies feeding
    it with their watermarks; ``query.choose_tier`` picks the coarsest tier whose
    resolution divides the requested bucket and whose policies cover the query's selector,
    and reads raw data after the watermark.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twin.spec.retention_check import SelectorSets, disjoint_reason, tier_problems
from twin.spec.units import parse_duration
from twin.timeseries.base import RAW, Agg, Selector, StorageStats, tier_name
from twin.timeseries.query import TIERS_META

if TYPE_CHECKING:
    import trio

    from twin.timeseries.base import TimeSeriesStore

log = logging.getLogger(__name__)

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "specs" / "RetentionPolicy.schema.json"
MAX_BUCKETS_PER_STEP = 1440
"""Catch-up granularity: at most this many buckets of a tier per replace step."""


@dataclass(frozen=True)
class Tier:
    resolution: float | None  # None = raw
    keep: float  # seconds, math.inf = forever
    aggregates: tuple[Agg, ...] = tuple(Agg)

    @property
    def name(self) -> str:
        return tier_name(self.resolution)


@dataclass(frozen=True)
class RetentionPolicy:
    name: str
    selector: Selector
    tiers: tuple[Tier, ...]
    site: str | None = None

    def disjoint_from(self, other: RetentionPolicy) -> str | None:
        """Why no series can match both policies (see ``twin.spec.retention_check``), or
        None when they may overlap."""
        return disjoint_reason(_sets(self.selector), _sets(other.selector))

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> RetentionPolicy:
        """Validate a ``kind: RetentionPolicy`` document (schema + meaning); ValueError."""
        errors = validate_doc(doc)
        if errors:
            raise ValueError("; ".join(errors))
        meta, spec = doc["metadata"], doc["spec"]
        sel = spec.get("select", {})
        site = meta.get("site")
        selector = Selector.of(
            sites=sel.get("site", site),
            groups=sel.get("group"),
            tags=sel.get("tag"),
            devices=sel.get("device"),
            metrics=sel.get("metric"),
        )
        tiers = []
        for t in spec["tiers"]:
            res = None if t["resolution"] == "raw" else parse_duration(t["resolution"])
            aggs = tuple(Agg(a) for a in t.get("aggregates", [a.value for a in Agg]))
            tiers.append(Tier(res, parse_duration(t["keep"], allow_inf=True), aggs))
        return cls(meta["name"], selector, tuple(tiers), site)


def _sets(sel: Selector) -> SelectorSets:
    def f(values: tuple[str, ...]) -> frozenset[str] | None:
        return frozenset(values) if values else None

    return SelectorSets(
        site=f(sel.sites),
        group=f(sel.groups),
        device=f(sel.devices),
        metric=f(sel.metrics),
        tag=frozenset(sel.tags),
    )


def validate_doc(doc: Mapping[str, Any]) -> list[str]:
    """Every problem with a RetentionPolicy document, as ``path: message`` strings."""
    errors: list[str] = []
    try:
        import jsonschema

        schema = json.loads(SCHEMA_PATH.read_text())
        validator = jsonschema.Draft202012Validator(schema)
        for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
            path = ".".join(str(p) for p in err.absolute_path) or "(document)"
            errors.append(f"{path}: {err.message}")
    except ImportError:  # pragma: no cover - jsonschema is a dependency
        pass
    if errors:
        return errors
    from twin.spec.paths import format_path

    for tier_path, message in tier_problems(doc["spec"]["tiers"]):
        errors.append(f"{format_path(tier_path)}: {message}")
    return errors


def _wm_key(policy: str, tier: str) -> str:
    return f"wm:{policy}:{tier}"


@dataclass
class PassReport:
    rolled_up: dict[str, int] = field(default_factory=dict)  # tier -> partial rows written
    expired: dict[str, int] = field(default_factory=dict)  # tier -> rows deleted
    reclaimed_bytes: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class TierLag:
    """How far one (policy, tier) is behind ``now`` (see the module docstring)."""

    policy: str
    tier: str
    resolution: float
    watermark: float | None  # None: never run
    age: float | None  # now - watermark (includes the open window)
    lag: float | None  # how long the oldest closed, not rolled-up window has been closed

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "tier": self.tier,
            "resolution_s": self.resolution,
            "watermark": self.watermark,
            "watermark_age_s": self.age,
            "lag_s": self.lag,
        }


def tier_lags(
    policies: Iterable[RetentionPolicy],
    watermark: Callable[[str, str], float | None],
    now: float | None = None,
) -> list[TierLag]:
    """Per (policy, tier): the watermark (``watermark(policy, tier)``), its age and the
    rollup lag (module docstring)."""
    now = time.time() if now is None else now
    out = []
    for p in policies:
        for t in p.tiers:
            if t.resolution is None:
                continue
            wm = watermark(p.name, t.name)
            age = None if wm is None else now - wm
            lag = None if wm is None else max(0.0, now - (wm + t.resolution))
            out.append(TierLag(p.name, t.name, t.resolution, wm, age, lag))
    return out


def stored_lags(store: TimeSeriesStore, policies: Iterable[RetentionPolicy]) -> list[TierLag]:
    """``tier_lags`` from the watermarks saved in ``store`` (read-only: for `twin storage`
    beside a running engine)."""

    def wm(policy: str, tier: str) -> float | None:
        v = store.get_meta(_wm_key(policy, tier))
        return float(v) if v is not None else None

    return tier_lags(policies, wm)


class RetentionManager:
    """Runs downsampling and expiry for a set of policies against one store.

    Policies are taken in name order; a policy that may overlap an earlier one is not run
    (``skipped`` maps its name to the reason) so no series is processed twice."""

    def __init__(
        self,
        store: TimeSeriesStore,
        policies: Iterable[RetentionPolicy],
        *,
        lateness: float = 0.0,
    ) -> None:
        self.store = store
        given = sorted(policies, key=lambda p: p.name)
        self.lateness = lateness
        names = [p.name for p in given]
        if len(set(names)) != len(names):
            raise ValueError("RetentionPolicy names must be unique")
        self.policies: list[RetentionPolicy] = []
        self.skipped: dict[str, str] = {}
        for p in given:
            clash = next((q for q in self.policies if p.disjoint_from(q) is None), None)
            if clash is not None:
                self.skipped[p.name] = f"its selector overlaps RetentionPolicy {clash.name!r}"
                log.error(
                    "timeseries: RetentionPolicy %s not run: its selector overlaps %s "
                    "(a series would be rolled up twice)",
                    p.name,
                    clash.name,
                )
                continue
            self.policies.append(p)
        self.watermarks: dict[tuple[str, str], float | None] = {}
        self._publish_catalogue()

    # --- catalogue for query tier choice --------------------------------------------
    def _publish_catalogue(self) -> None:
        cat: dict[str, dict[str, Any]] = {}
        for p in self.policies:
            for t in p.tiers:
                if t.resolution is None:
                    continue
                entry = cat.setdefault(
                    t.name, {"resolution": t.resolution, "keep": None, "policies": []}
                )
                keep = None if math.isinf(t.keep) else t.keep
                if entry["keep"] is None or (keep is not None and keep < entry["keep"]):
                    entry["keep"] = keep
                wm = self.store.get_meta(_wm_key(p.name, t.name))
                wm_f = float(wm) if wm is not None else None
                self.watermarks[(p.name, t.name)] = wm_f
                entry["policies"].append(
                    {"name": p.name, "selector": asdict(p.selector), "wm": wm_f}
                )
        self.store.set_meta(TIERS_META, json.dumps(cat))

    # --- downsampling ---------------------------------------------------------------
    def _earliest(self, source: str, sel: Selector, end: float) -> float | None:
        fast = getattr(self.store, "earliest", None)
        if fast is not None:  # one column instead of a whole aggregate over everything
            result: float | None = fast(source, sel, end)
            return result
        part = self.store.aggregate(source, sel, 0.0, end, max(end, 1.0))
        if part.num_rows == 0:
            return None
        import pyarrow.compute as pc

        first = pc.min(part.column("first_ts")).as_py()
        return first.timestamp() if first is not None else None

    def downsample(self, now: float | None = None) -> dict[str, int]:
        now = time.time() if now is None else now
        written: dict[str, int] = {}  # tier -> partial rows written (tiers with rows only)
        moved = False  # a watermark moved: republish the catalogue for query tier choice
        # ``store.rollup(source, tier, selector, start, end, bucket)`` (PostgreSQL) does
        # aggregate + replace_partials in one go without the Arrow round trip
        fast_rollup = getattr(self.store, "rollup", None)
        for p in self.policies:
            source = RAW
            source_wm: float | None = None
            for t in p.tiers:
                if t.resolution is None:
                    continue
                res = t.resolution
                closed = math.floor((now - self.lateness) / res) * res
                if source_wm is not None:
                    closed = min(closed, math.floor(source_wm / res) * res)
                key = _wm_key(p.name, t.name)
                wm_raw = self.store.get_meta(key)
                if wm_raw is not None:
                    start = float(wm_raw)
                else:
                    earliest = self._earliest(source, p.selector, closed)
                    start = closed if earliest is None else math.floor(earliest / res) * res
                step = res * MAX_BUCKETS_PER_STEP
                a = start
                while a < closed:
                    b = min(a + step, closed)
                    if fast_rollup is not None:  # the same replace, computed in the store
                        n = int(fast_rollup(source, t.name, p.selector, a, b, res))
                    else:
                        rows = self.store.aggregate(source, p.selector, a, b, res)
                        if rows.num_rows or t.name in self.store.tiers():
                            self.store.replace_partials(t.name, p.selector, a, b, rows)
                        # (no rows and no table yet: nothing to replace, no empty tier)
                        n = rows.num_rows
                    self.store.set_meta(key, repr(b))
                    self.watermarks[(p.name, t.name)] = b
                    if n:
                        written[t.name] = written.get(t.name, 0) + n
                    moved = True
                    a = b
                if wm_raw is None and a == start:
                    self.store.set_meta(key, repr(start))
                    self.watermarks[(p.name, t.name)] = start
                    moved = True
                source, source_wm = t.name, max(a, start)
        if moved:
            self._publish_catalogue()
        return written

    def next_due(self, now: float | None = None) -> float:
        """When (epoch seconds) ``downsample`` next has something to do: ``now`` if a tier
        has closed windows waiting (never run yet, catching up after downtime, a failed
        run), else when the next window of any tier closes, lateness included. ``inf``
        without tiers."""
        now = time.time() if now is None else now
        due = math.inf
        for p in self.policies:
            for t in p.tiers:
                if t.resolution is None:
                    continue
                res = t.resolution
                closed = math.floor((now - self.lateness) / res) * res
                wm = self.watermarks.get((p.name, t.name))
                if wm is None or wm < closed:
                    return now
                due = min(due, closed + res + self.lateness)
        return due

    def lags(self, now: float | None = None) -> list[TierLag]:
        """Per (policy, tier) watermark, watermark age and rollup lag (module docstring)."""
        return tier_lags(self.policies, lambda p, t: self.watermarks.get((p, t)), now)

    # --- expiry ---------------------------------------------------------------------
    def expire(self, now: float | None = None) -> dict[str, int]:
        now = time.time() if now is None else now
        deleted: dict[str, int] = {}
        for p in self.policies:
            for i, t in enumerate(p.tiers):
                if math.isinf(t.keep):
                    continue
                cutoff = now - t.keep
                if i + 1 < len(p.tiers):
                    nxt = self.store.get_meta(_wm_key(p.name, p.tiers[i + 1].name))
                    cutoff = min(cutoff, float(nxt) if nxt is not None else -math.inf)
                if not math.isfinite(cutoff):
                    continue
                n = self.store.delete_before(t.name, p.selector, cutoff)
                if n:
                    deleted[t.name] = deleted.get(t.name, 0) + n
        return deleted

    def run_once(self, now: float | None = None) -> PassReport:
        """One pass: roll up closed windows, expire, reclaim space when rows were deleted."""
        t0 = time.perf_counter()
        rolled_up = self.downsample(now)
        report = self.expire_and_reclaim(now)
        report.rolled_up = rolled_up
        report.seconds = time.perf_counter() - t0
        return report

    def expire_and_reclaim(self, now: float | None = None) -> PassReport:
        """The slow part of a pass: expire, then compact and drop old versions (reclaiming
        the space when rows were deleted, routine maintenance otherwise)."""
        t0 = time.perf_counter()
        report = PassReport()
        report.expired = self.expire(now)
        if report.expired:
            before = self.store.stats().bytes
            self.store.reclaim()  # type: ignore[attr-defined]
            report.reclaimed_bytes = max(0, before - self.store.stats().bytes)
        else:
            self.store.maintain()
        report.seconds = time.perf_counter() - t0
        log.info(
            "timeseries: retention pass expired %s, reclaimed %d bytes in %.2fs",
            report.expired,
            report.reclaimed_bytes,
            report.seconds,
        )
        return report

    async def run(
        self,
        interval: float = 60.0,
        *,
        task_status: trio.TaskStatus[None] | None = None,
    ) -> None:
        """Standalone scheduler (the engine uses ``TimeSeriesService``'s loops instead):
        rollup as soon as a window closes (``next_due``), expiry and compaction every
        ``interval`` seconds. Errors are logged and retried."""
        import trio

        from twin.errors import StorageError

        if task_status is not None:
            task_status.started()
        next_expiry = 0.0
        while True:
            try:
                await trio.to_thread.run_sync(self.downsample)
                if time.time() >= next_expiry:
                    await trio.to_thread.run_sync(self.expire_and_reclaim)
                    next_expiry = time.time() + interval
            except StorageError as exc:
                log.error("timeseries: retention pass failed: %s", exc)
            wake = min(self.next_due(), next_expiry)
            await trio.sleep(max(0.05, min(wake - time.time(), interval)))


# --- monitoring --------------------------------------------------------------------------


@dataclass
class StorageMonitor:
    """Stats with a growth rate between calls and the disk-nearly-full signal."""

    store: TimeSeriesStore
    _last: tuple[float, int] | None = None

    def report(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        stats: StorageStats = self.store.stats()
        out = stats.as_dict()
        growth = None
        if self._last is not None and now > self._last[0]:
            growth = (stats.bytes - self._last[1]) / (now - self._last[0])
        out["growth_bytes_per_s"] = growth
        self._last = (now, stats.bytes)
        if stats.disk_nearly_full:
            log.warning(
                "timeseries: disk nearly full: %d bytes free at %s",
                stats.free_bytes,
                getattr(self.store, "path", "?"),
            )
        return out
