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

Downsampling
    Tier *n* is computed from tier *n-1* (the first from raw) over **closed windows only**:
    up to ``now - lateness`` floored to the tier's resolution, and never past the source
    tier's own watermark. A per-(policy, tier) watermark in the store's metadata records how
    far a tier is complete; each step replaces the tier's rows for its window
    (delete + add), so re-running changes nothing, a crash between the two is repaired by
    the next run, and after downtime the loop simply catches up window by window. Tiers
    store partials (count, sum, min, max, first, last), so every aggregate can be answered
    from them whatever ``aggregates`` lists (the list documents intent and is validated).

Expiry
    Each tier's rows older than ``keep`` are deleted, but never data that the next tier has
    not rolled up yet (the cut-off is capped at that tier's watermark). After deleting, the
    store compacts and drops old versions, which is what returns the space.

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
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twin.spec.units import format_duration, parse_duration
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
    tiers = doc["spec"]["tiers"]
    prev: float | None = None
    for i, t in enumerate(tiers):
        path = f"spec.tiers.{i}"
        if t["resolution"] == "raw":
            if i != 0:
                errors.append(f"{path}.resolution: raw must be the first tier")
            continue
        try:
            res = parse_duration(t["resolution"])
        except ValueError as exc:
            errors.append(f"{path}.resolution: {exc}")
            continue
        if res <= 0 or res != round(res):
            errors.append(f"{path}.resolution: must be a whole number of seconds > 0")
        elif prev is not None and (res <= prev or res % prev):
            errors.append(
                f"{path}.resolution: {t['resolution']} must be a multiple of the previous "
                f"tier's {format_duration(prev)}"
            )
        prev = res
        try:
            parse_duration(t["keep"], allow_inf=True)
        except ValueError as exc:
            errors.append(f"{path}.keep: {exc}")
    return errors


def _wm_key(policy: str, tier: str) -> str:
    return f"wm:{policy}:{tier}"


@dataclass
class PassReport:
    rolled_up: dict[str, int] = field(default_factory=dict)  # tier -> partial rows written
    expired: dict[str, int] = field(default_factory=dict)  # tier -> rows deleted
    reclaimed_bytes: int = 0
    seconds: float = 0.0


class RetentionManager:
    """Runs downsampling and expiry for a set of policies against one store."""

    def __init__(
        self,
        store: TimeSeriesStore,
        policies: Iterable[RetentionPolicy],
        *,
        lateness: float = 0.0,
    ) -> None:
        self.store = store
        self.policies = list(policies)
        self.lateness = lateness
        names = [p.name for p in self.policies]
        if len(set(names)) != len(names):
            raise ValueError("RetentionPolicy names must be unique")
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
                entry["policies"].append(
                    {
                        "name": p.name,
                        "selector": asdict(p.selector),
                        "wm": float(wm) if wm is not None else None,
                    }
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
        written: dict[str, int] = {}
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
                    rows = self.store.aggregate(source, p.selector, a, b, res)
                    self.store.replace_partials(t.name, p.selector, a, b, rows)
                    self.store.set_meta(key, repr(b))
                    written[t.name] = written.get(t.name, 0) + rows.num_rows
                    a = b
                if wm_raw is None and a == start:
                    self.store.set_meta(key, repr(start))
                source, source_wm = t.name, max(a, start)
        self._publish_catalogue()
        return written

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
        report = PassReport()
        report.rolled_up = self.downsample(now)
        report.expired = self.expire(now)
        if report.expired:
            before = self.store.stats().bytes
            self.store.reclaim()  # type: ignore[attr-defined]
            report.reclaimed_bytes = max(0, before - self.store.stats().bytes)
        else:
            self.store.maintain()
        report.seconds = time.perf_counter() - t0
        log.info(
            "timeseries: retention pass rolled up %s, expired %s, reclaimed %d bytes in %.2fs",
            report.rolled_up,
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
        """Scheduled service: a pass every ``interval`` seconds (rollup lag ≤ interval +
        the tier's resolution). Errors are logged and the next pass tries again."""
        import trio

        from twin.errors import StorageError

        if task_status is not None:
            task_status.started()
        while True:
            try:
                await trio.to_thread.run_sync(self.run_once)
            except StorageError as exc:
                log.error("timeseries: retention pass failed: %s", exc)
            await trio.sleep(interval)


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
