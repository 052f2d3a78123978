"""The cloud's side of the edge link: ingest of edge uploads (exactly once), link state, and
what flows down (the edge's specs).

``EdgeCloud`` is an engine service (``engine.service_info["edge"]``); the API routes in
``twin/api/routes/edge.py`` call it.

**Exactly once.** Per edge the cloud keeps the set of sequence numbers it has covered
(:class:`twin.edge.protocol.Covered`). An upload is processed under the edge's lock:
records already covered are skipped (duplicates, counted); the new ones are validated
(``twin/bindings/values.py``; a device the edge does not own is refused by
:func:`twin.policy.edge_may_report` and counted); status changes, alarms, command results and
scene traces are written to the registry first (each write is idempotent: an alarm is raised
once per device and type, a trace is keyed by its run id); then the readings **and the new
covered set** (the reading ``_edge/<edge> covered``) go into the time-series write-ahead log in
one append, one group commit. Only then is the covered set in memory advanced and the upload
answered. A cloud killed at any point either has both (the edge's re-send is skipped as
duplicates) or neither (the re-send is stored). At start (or an edge's first upload) the set
is rebuilt from the stored ``covered`` readings (after the log's replay).

**Bounded.** Each marker holds the edge's whole covered set (an ack floor and at most
``MAX_INTERVALS`` intervals above it), and marker timestamps increase with the set per edge
(``max(now, last + 1 ms)``, also across restarts: the last is restored), so the newest marker
in the store contains every older one. Every ``compact_interval`` s the older markers are
deleted (:meth:`EdgeCloud.compact`): the series holds one marker plus those written since,
and a restart reads that much, however long the edge has been uploading. A marker still in the
log but not in the store is newer than every stored one, so none is deleted before its
successor is stored; a replayed log re-adding an older marker only adds a subset.

**Transports.** The API routes (``twin/api/routes/edge.py``) and, when the engine runs MQTT
(its embedded broker or an external one), the requests on ``flux/_edge/+/req``
(``twin/edge/mqtt_link.py``): the same operations, answered on ``flux/_edge/<edge>/resp``
once done — an upload's answer only once its records are durably stored. The edge's key is in
each request and checked here (as the API checks its bearer key), whichever broker carried it.

**Link state** per edge: online/offline (no upload for ``offline_after`` s → offline, the alarm
``edge_offline`` on the pseudo device ``edge:<name>``), the revision it runs, lag (age of the
oldest record still in its outbox, as it reports), outbox depth, records dropped by its
overflow policy, last sync. In ``GET /api/v1/edges``, ``/metrics`` (``twin_edge_*``), alarms
and the bus (``{"kind": "event", "type": "edge_link", ...}``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from twin import policy
from twin.bindings.values import ValueRefused, check_point, check_ts, check_value
from twin.edge.protocol import MAX_INTERVALS, Covered
from twin.mqtt.topics import EDGE_LINK_ROOT, edge_link_topics
from twin.registry.base import SceneTrace
from twin.runtime.timeseries_service import timeseries_of
from twin.spec.edge_check import edge_owned
from twin.timeseries.base import RAW, Selector, to_epoch
from twin.timeseries.wal import WalReading

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from twin.runtime.engine import Engine

log = logging.getLogger(__name__)

MARKER_POINT = "covered"
OFFLINE_ALARM = "edge_offline"
_QUALITIES = frozenset(("good", "uncertain", "bad", "stale"))
DOWN_KINDS = ("Site", "DeviceModel", "DeviceGroup", "Device", "Scene", "RetentionPolicy",
              "Model", "EdgeNode")  # fmt: skip


def marker_device(edge: str) -> str:
    return f"_edge/{edge}"


def link_device(edge: str) -> str:
    """The pseudo device of an edge's alarms."""
    return f"edge:{edge}"


class EdgeRefused(Exception):
    """An upload that is malformed as a whole (HTTP 422)."""


@dataclass
class EdgeLink:
    name: str
    covered: Covered = field(default_factory=Covered)
    restored: bool = False
    last_sync: float | None = None
    revision: int | None = None
    depth: int = 0
    bytes: int = 0
    oldest_age_s: float | None = None
    edge_dropped: dict[str, int] = field(default_factory=dict)
    edge_refused: int = 0
    received: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    gaps: int = 0
    refused: int = 0
    uploads: int = 0
    online: bool = False
    marker_ts: float = 0.0
    """Timestamp of the newest covered marker (stored or in the log)."""
    markers: int = 0
    """Markers written since the last compaction."""
    lock: trio.Lock = field(default_factory=trio.Lock)

    def state(self, now: float) -> dict[str, Any]:
        return {
            "name": self.name,
            "online": self.online,
            "last_sync": self.last_sync,
            "since_sync_s": None if self.last_sync is None else round(now - self.last_sync, 3),
            "revision": self.revision,
            "acked": self.covered.acked,
            "covered_above": self.covered.above(),
            "outbox_depth": self.depth,
            "outbox_bytes": self.bytes,
            "lag_s": self.oldest_age_s,
            "dropped_at_edge": dict(self.edge_dropped),
            "refused_at_edge": self.edge_refused,
            "received": dict(self.received),
            "duplicates": self.duplicates,
            "gaps": self.gaps,
            "refused": self.refused,
            "uploads": self.uploads,
        }


class _Prom:
    def __init__(self, r: CollectorRegistry) -> None:
        from prometheus_client import Counter as C
        from prometheus_client import Gauge as G

        self.online = G("twin_edge_online", "1 when the edge synced recently", ["edge"], registry=r)
        self.depth = G("twin_edge_outbox_depth", "Records in the edge's outbox", ["edge"], registry=r)
        self.lag = G("twin_edge_lag_seconds", "Age of the oldest record in the edge's outbox",
                     ["edge"], registry=r)  # fmt: skip
        self.last = G("twin_edge_last_sync_timestamp_seconds", "Last upload", ["edge"], registry=r)
        self.revision = G("twin_edge_revision", "Spec revision the edge runs", ["edge"], registry=r)
        self.records = C("twin_edge_records", "Records stored from edges", ["edge", "kind"],
                         registry=r)  # fmt: skip
        self.duplicates = C("twin_edge_duplicates", "Re-sent records skipped", ["edge"], registry=r)
        self.dropped = G("twin_edge_dropped", "Records the edge's overflow policy dropped",
                         ["edge", "kind"], registry=r)  # fmt: skip
        self.refused = C("twin_edge_refused", "Records refused (validation, ownership)",
                         ["edge"], registry=r)  # fmt: skip


class EdgeCloud:
    """The engine service (see the module docstring)."""

    name = "edge"

    def __init__(self, *, offline_after: float = 15.0, check_interval: float = 1.0,
                 compact_interval: float = 60.0) -> None:  # fmt: skip
        self.offline_after = offline_after
        self.check_interval = check_interval
        self.compact_interval = compact_interval
        self.links: dict[str, EdgeLink] = {}
        self.engine: Engine | None = None
        self._prom: _Prom | None = None
        self._owner_rev = -1
        self._owner: dict[str, str] = {}
        self._ok_dev: set[str] = set()
        self._ok_point: set[str] = set()
        self._keys: Any = None
        self._keys_rev = -1
        self.mqtt_dropped = 0

    async def __call__(
        self, engine: Engine, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self.engine = engine
        if self._prom is None:
            self._prom = _Prom(engine.prom.registry)
        svc = timeseries_of(engine)
        if svc is not None and svc.writer is not None:
            with trio.move_on_after(30):
                await svc.flush_barrier()  # the log's replay is in the store: markers included
        for edge in self.edge_names():
            await self._restore(self.link(edge))
        control = engine.service_info.get("control")
        ledger = getattr(control, "ledger", None)
        if ledger is not None:  # commands to an edge's devices wait in the store for the edge
            theirs = ledger.owns
            ledger.owns = lambda device: theirs(device) and self.owner_of(device) is None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._mqtt_loop)
            task_status.started(self)
            await self._loop()

    async def _loop(self) -> None:
        last_expiry = last_compact = time.monotonic()
        while True:
            self.check()
            if time.monotonic() - last_expiry > 5.0:
                last_expiry = time.monotonic()
                await self.expire_commands()
            if time.monotonic() - last_compact > self.compact_interval:
                last_compact = time.monotonic()
                await self.compact()
            await trio.sleep(self.check_interval)

    # --- MQTT: requests through the engine's broker connection -------------------------
    async def _mqtt_loop(self) -> None:
        """Route ``flux/_edge/+/req`` on the engine's MQTT hub (again when the MQTT service
        restarted with a new one); a few workers answer the requests."""
        engine = self.engine
        assert engine is not None
        send, recv = trio.open_memory_channel[tuple[Any, Any]](256)
        routed: Any = None

        def on_request(hub: Any) -> Any:
            def handler(msg: Any) -> None:
                try:
                    send.send_nowait((hub, msg))
                except trio.WouldBlock:  # the edge gets no reply, times out and re-sends
                    self.mqtt_dropped += 1

            return handler

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(self._mqtt_worker, recv.clone())
            while True:
                hub = getattr(engine, "mqtt", None)
                if hub is not None and hub is not routed:
                    try:
                        await hub.route(f"{EDGE_LINK_ROOT}/+/req", on_request(hub), qos=1)
                        routed = hub
                    except Exception as exc:  # an external broker not reachable yet
                        log.debug("edge: MQTT route not subscribed yet: %s", exc)
                await trio.sleep(0.5 if routed is None else 2.0)

    async def _mqtt_worker(self, recv: Any) -> None:
        async for hub, msg in recv:
            try:
                await self._mqtt_request(hub, msg)
            except Exception:  # bad input from a peer never stops the service
                log.exception("edge: MQTT request on %s failed", msg.topic)

    async def _key_ok(self, edge: str, key: Any) -> bool:
        assert self.engine is not None
        if not isinstance(key, str) or not key.startswith("dk_"):
            return False
        from twin.registry.credentials import DeviceKeyVerifier

        if self._keys is None:
            self._keys = DeviceKeyVerifier(self.engine.registry)
        rev = self.engine.revision_number
        if rev != self._keys_rev:  # a deleted and re-created edge: its old keys are gone
            self._keys_rev = rev
            await trio.to_thread.run_sync(self._keys.sweep)
        ok = self._keys.cached(link_device(edge), key)
        if ok is None:
            ok = await trio.to_thread.run_sync(self._keys.verify, link_device(edge), key)
        return bool(ok)

    async def _mqtt_request(self, hub: Any, msg: Any) -> None:
        from twin.timeseries.wal import WalError

        parts = msg.topic.split("/")
        if len(parts) != 4:
            return
        edge = parts[2]
        try:
            req = json.loads(msg.payload)
            rid = str(req["id"])
            op = str(req["op"])
        except (ValueError, TypeError, KeyError, RecursionError):
            log.warning("edge %s: an MQTT request that is not one skipped", edge)
            return
        status: int = 200
        body: Any = None
        extra: dict[str, Any] = {}
        if not await self._key_ok(edge, req.get("key")):
            status, body = 401, {"detail": "missing or invalid edge key (twin edge-key NAME)"}
        elif self.edge_doc(edge) is None:
            status, body = 404, {"detail": f"no EdgeNode {edge!r} in the running revision"}
        elif op == "batch":
            payload = req.get("body")
            try:
                if not isinstance(payload, dict):
                    raise EdgeRefused("an upload is a JSON object with 'runs'")
                body = await self.ingest(edge, payload)
            except EdgeRefused as exc:
                status, body = 422, {"detail": str(exc)}
            except WalError as exc:
                status, body = 503, {"detail": f"not stored, retry later: {exc}"}
                extra["retry_after"] = exc.retry_after
        elif op == "specs":
            body = self.desired(edge)
        elif op == "commands":
            body = {"items": await self.commands_for(edge)}
        elif op.startswith("models/"):
            found = await self.model_file(edge, op[len("models/") :])
            if found is None:
                status, body = 404, {"detail": f"edge {edge!r} has no model {op[7:]!r} here"}
            else:
                data = await trio.to_thread.run_sync(found.read_bytes)
                body, extra["encoding"] = base64.b64encode(data).decode(), "base64"
        else:
            status, body = 400, {"detail": f"unknown operation {op!r}"}
        reply = json.dumps({"id": rid, "status": status, "body": body, **extra},
                           separators=(",", ":"), default=str).encode()  # fmt: skip
        _, resp_topic = edge_link_topics(edge)
        try:
            await hub.publish(resp_topic, reply, qos=1)
        except Exception as exc:  # the broker went away: the edge times out and re-sends
            log.debug("edge %s: MQTT reply not sent: %s", edge, exc)

    async def model_file(self, edge: str, model: str) -> Path | None:
        """The ONNX file of a Model the edge's EdgeNode deploys (None: not one, or no file)."""
        assert self.engine is not None
        doc = self.edge_doc(edge) or {}
        if model not in ((doc.get("spec") or {}).get("models") or []):
            return None
        mdoc = self.engine.specs.get(("Model", model))
        path = Path(str(((mdoc or {}).get("spec") or {}).get("file", "")))
        if mdoc is None or not await trio.to_thread.run_sync(path.is_file):
            return None
        return path

    # --- bookkeeping --------------------------------------------------------------------
    def edge_names(self) -> list[str]:
        assert self.engine is not None
        return sorted(n for (k, n) in self.engine.specs if k == "EdgeNode")

    def edge_doc(self, edge: str) -> Mapping[str, Any] | None:
        assert self.engine is not None
        return self.engine.specs.get(("EdgeNode", edge))

    def link(self, edge: str) -> EdgeLink:
        link = self.links.get(edge)
        if link is None:
            link = self.links[edge] = EdgeLink(edge)
        return link

    def owner_of(self, device: str) -> str | None:
        assert self.engine is not None
        if self._owner_rev != self.engine.revision_number:
            self._owner = edge_owned(self.engine.specs)
            self._owner_rev = self.engine.revision_number
        return self._owner.get(device)

    async def _restore(self, link: EdgeLink) -> None:
        """The covered set from the stored markers (they only ever grow: the union is the
        latest)."""
        if link.restored:
            return
        assert self.engine is not None
        svc = timeseries_of(self.engine)
        store = svc.store if svc is not None else None
        if store is not None:
            table = await trio.to_thread.run_sync(self._markers, store, link.name)
            for text in table.column("value_str").to_pylist():
                if isinstance(text, str):
                    link.covered.union(Covered.decode(text))
            if table.num_rows:
                link.marker_ts = max(to_epoch(t) for t in table.column("ts").to_pylist())
            link.markers = table.num_rows
        link.restored = True
        if link.covered.acked or link.covered.above():
            log.info("edge %s: resuming at seq %d (%s)", link.name, link.covered.acked,
                     link.covered.encode())  # fmt: skip

    @staticmethod
    def _markers(store: Any, edge: str) -> Any:
        sel = Selector.of(devices=marker_device(edge), metrics=MARKER_POINT)
        return store.read_raw(sel, 0.0, max(time.time(), 4e9))

    async def compact(self) -> int:
        """Delete every stored covered marker older than the newest stored one (it contains
        them); returns how many were deleted."""
        assert self.engine is not None
        svc = timeseries_of(self.engine)
        store = svc.store if svc is not None else None
        if store is None:
            return 0
        deleted = 0
        for link in list(self.links.values()):
            if not link.restored or link.markers <= 1:
                continue
            async with link.lock:
                table = await trio.to_thread.run_sync(self._markers, store, link.name)
                if table.num_rows <= 1:
                    continue
                newest = max(to_epoch(t) for t in table.column("ts").to_pylist())
                sel = Selector.of(devices=marker_device(link.name), metrics=MARKER_POINT)
                # markers are >= 1 ms apart: the newest is kept whatever the rounding
                n = await trio.to_thread.run_sync(store.delete_before, RAW, sel, newest - 0.0005)
                deleted += n
                link.markers = max(1, link.markers - n)
        if deleted:
            log.debug("edge: compacted %d covered markers", deleted)
        return deleted

    def check(self, now: float | None = None) -> None:
        """Online/offline transitions (alarm), gauges."""
        engine, prom = self.engine, self._prom
        assert engine is not None and prom is not None
        now = time.time() if now is None else now
        for edge in set(self.edge_names()) | set(self.links):
            link = self.link(edge)
            online = link.last_sync is not None and now - link.last_sync <= self.offline_after
            if online != link.online:
                link.online = online
                if online:
                    engine.monitor.clear_alarm(link_device(edge), OFFLINE_ALARM)
                    log.info("edge %s: online (revision %s)", edge, link.revision)
                else:
                    since = "never synced" if link.last_sync is None else (
                        f"no upload for {now - link.last_sync:.0f}s")
                    engine.monitor.raise_alarm(link_device(edge), OFFLINE_ALARM, "major",
                                               f"edge {edge} is offline ({since})")
                    log.warning("edge %s: offline (%s)", edge, since)
                engine.bus.publish({"kind": "event", "device": link_device(edge), "site": None,
                                    "groups": (), "ts": now, "type": "edge_link",
                                    "data": {"online": online, "edge": edge}})  # fmt: skip
            prom.online.labels(edge).set(1 if online else 0)
            prom.depth.labels(edge).set(link.depth)
            prom.lag.labels(edge).set(link.oldest_age_s or 0.0)
            prom.last.labels(edge).set(link.last_sync or 0.0)
            prom.revision.labels(edge).set(link.revision or 0)
            for kind, n in link.edge_dropped.items():
                prom.dropped.labels(edge, kind).set(n)

    def states(self) -> list[dict[str, Any]]:
        now = time.time()
        names = set(self.edge_names()) | set(self.links)
        return [self.link(n).state(now) for n in sorted(names)]

    # --- up: an upload ------------------------------------------------------------------
    async def ingest(self, edge: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Process one upload (see ``twin/edge/protocol.py``); raises EdgeRefused (422) for a
        malformed one and ``WalError`` when nothing could be stored (503)."""
        engine, prom = self.engine, self._prom
        assert engine is not None and prom is not None
        runs = payload.get("runs")
        if not isinstance(runs, list):
            raise EdgeRefused("'runs' must be a list")
        link = self.link(edge)
        async with link.lock:
            await self._restore(link)
            self._ok_dev, self._ok_point = set(), set()
            new = link.covered.copy()
            readings: list[WalReading] = []
            effects: list[tuple[str, Any]] = []
            kinds: Counter[str] = Counter()
            dup = gaps = refused = 0
            for run in runs:
                try:
                    after = int(run["after"])
                    records = run["records"]
                    if after < 0 or not isinstance(records, list) or not records:
                        raise ValueError
                    seqs = [int(r[0]) for r in records]
                except (KeyError, TypeError, ValueError, IndexError):
                    raise EdgeRefused(
                        "a run is {after: int, records: [[seq, kind, ts, body]..]}"
                    ) from None
                if any(b <= a for a, b in zip([after, *seqs], seqs, strict=False)):
                    raise EdgeRefused("record sequence numbers must increase within a run")
                trial = new.copy()
                trial.add(after + 1, seqs[-1])
                if len(trial.iv) > MAX_INTERVALS:
                    continue  # not covered now: the edge sends it again later
                prev = after
                for rec, seq in zip(records, seqs, strict=True):
                    gaps += new.missing(prev + 1, seq - 1)
                    prev = seq
                    if seq in new:
                        dup += 1
                        continue
                    try:
                        _, kind, ts, body = rec
                        n = self._take(edge, str(kind), float(ts), body, readings, effects)
                    except (ValueError, TypeError) as exc:
                        log.warning("edge %s: record %s refused: %s", edge, seq, exc)
                        refused += 1
                        continue
                    refused += n
                    kinds[str(kind)] += 1
                new = trial
            for what, arg in effects:  # idempotent registry writes, before the commit
                await self._effect(edge, what, arg)
            if new.iv != link.covered.iv:
                # newer than every marker before it, so the newest stored one holds them all
                now = max(time.time(), link.marker_ts + 0.001)
                # the new covered set goes into the same log record as the data: one commit
                readings.append((marker_device(edge), MARKER_POINT, new.encode(), now, "good"))
                svc = timeseries_of(engine)
                if svc is None or svc.wal is None:
                    raise EdgeRefused("the cloud engine runs without a time-series store")
                await svc.wal.log(readings)
                link.covered = new
                link.marker_ts = now
                link.markers += 1
            # link state
            link.last_sync = time.time()
            link.uploads += 1
            link.duplicates += dup
            link.gaps += gaps
            link.refused += refused
            link.received.update(kinds)
            stats: Mapping[str, Any] = (
                payload["stats"] if isinstance(payload.get("stats"), dict) else {}
            )
            self._stats(link, payload.get("revision"), stats)
            for kind, n in kinds.items():
                prom.records.labels(edge, kind).inc(n)
            prom.duplicates.labels(edge).inc(dup)
            prom.refused.labels(edge).inc(refused)
        self._publish(readings[:-1] if readings else [])
        if not link.online:
            self.check()
        return {"acked": link.covered.acked, "covered": link.covered.above(),
                "accepted": sum(kinds.values()), "duplicates": dup, "dropped": gaps,
                "refused": refused, "revision": engine.revision_number}  # fmt: skip

    def _stats(self, link: EdgeLink, revision: Any, stats: Mapping[str, Any]) -> None:
        if isinstance(revision, int):
            link.revision = revision
        depth = stats.get("depth")
        if isinstance(depth, int):
            link.depth = depth
        b = stats.get("bytes")
        if isinstance(b, int):
            link.bytes = b
        age = stats.get("oldest_age_s")
        link.oldest_age_s = float(age) if isinstance(age, int | float) and math.isfinite(age) else None
        dropped = stats.get("dropped")
        if isinstance(dropped, dict):
            link.edge_dropped = {str(k): int(v) for k, v in dropped.items() if isinstance(v, int)}
        r = stats.get("refused")
        if isinstance(r, int):
            link.edge_refused = r

    def _may(self, edge: str, device: Any) -> str:
        if not isinstance(device, str) or not policy.edge_may_report(
            edge, device, self.owner_of(device)
        ):
            raise ValueError(f"edge {edge} does not own device {device!r}")
        return device

    def _take(self, edge: str, kind: str, ts: float, body: Any, readings: list[WalReading],
              effects: list[tuple[str, Any]]) -> int:
        """Validate one record into log rows / registry effects; returns readings refused.
        Every value is checked (``twin/bindings/values.py``); the device and point name checks
        are remembered per upload (a batch names the same few series thousands of times)."""
        if kind == "telemetry":
            if not isinstance(body, list):
                raise ValueError("telemetry body must be a list of readings")
            bad = 0
            ok_dev, ok_point = self._ok_dev, self._ok_point
            for r in body:
                try:
                    device, point, value, rts, quality = r
                    if device not in ok_dev:
                        ok_dev.add(self._may(edge, device))
                    if point not in ok_point:
                        ok_point.add(check_point(point))
                    value = check_value(value, point)
                    rts = check_ts(rts, point) if rts is not None else ts
                    if quality not in _QUALITIES:
                        raise ValueError(f"quality {quality!r}")
                    readings.append((device, point, value, rts, quality))
                except (ValueError, TypeError, ValueRefused) as exc:
                    log.warning("edge %s: reading %r refused: %s", edge, r, exc)
                    bad += 1
            return bad
        if not isinstance(body, dict):
            raise ValueError(f"{kind} body must be an object")
        if kind in ("status", "alarm"):
            self._may(edge, body.get("device"))
            effects.append((kind, {**body, "ts": ts}))
        elif kind in ("scene_trace", "command_result"):
            effects.append((kind, body))
        else:
            raise ValueError(f"unknown record kind {kind!r}")
        return 0

    async def _effect(self, edge: str, what: str, arg: dict[str, Any]) -> None:
        engine = self.engine
        assert engine is not None
        reg = engine.registry
        if what == "status":
            await engine.rio.call(reg.set_device_status, str(arg["device"]), str(arg["status"]),
                                  float(arg["ts"]), {"edge": edge})  # fmt: skip
            engine.bus.publish({"kind": "status", "device": arg["device"], "site": None,
                                "groups": (), "ts": arg["ts"], "status": str(arg["status"]),
                                "previous": arg.get("previous"), "reason": f"edge {edge}"})  # fmt: skip
        elif what == "alarm":
            device, type_ = str(arg["device"]), str(arg.get("type") or "alarm")
            if arg.get("event") == "cleared":
                await engine.rio.call(reg.clear_alarms, device, type_, f"edge:{edge}",
                                      float(arg["ts"]))  # fmt: skip
            else:
                await engine.rio.call(reg.raise_alarm, device, type_,
                                      str(arg.get("severity") or "major"),
                                      str(arg.get("message") or ""), float(arg["ts"]))  # fmt: skip
        elif what == "scene_trace":
            trace = SceneTrace(
                run_id=f"{edge}:{arg.get('run_id')}", scene=str(arg.get("scene")),
                started_at=float(arg.get("started_at") or 0.0),
                finished_at=arg.get("finished_at"), status=str(arg.get("status") or "?"),
                trace={**(arg.get("trace") or {}), "edge": edge},
            )  # fmt: skip
            await engine.rio.call(reg.save_scene_trace, trace)
        elif what == "command_result":
            # a command the cloud queued for the edge's device: its ledger row follows the edge
            cmd = await engine.rio.call(reg.get_command, str(arg.get("id")))
            status = arg.get("status")
            if cmd is not None and isinstance(status, str) and cmd.status != status:
                ts = float(arg.get("ts") or time.time())
                done = replace(cmd, status=status, updated_at=ts, result=arg.get("result"),
                               error=arg.get("error"),
                               transitions=(*cmd.transitions, (status, ts)))  # fmt: skip
                await engine.rio.call(reg.save_commands, [done])

    def _publish(self, readings: list[WalReading]) -> None:
        """The newest reading of each series in an upload goes on the bus (live views see the
        current value; a drained hour of backlog is not replayed to every subscriber)."""
        engine = self.engine
        assert engine is not None
        latest: dict[tuple[str, str], WalReading] = {}
        for r in readings:
            key = (r[0], r[1])
            old = latest.get(key)
            if old is None or r[3] >= old[3]:
                latest[key] = r
        for device, point, value, ts, quality in latest.values():
            engine.bus.publish({"kind": "reading", "device": device, "site": None,
                                "groups": (), "ts": ts, "point": point, "value": value,
                                "quality": quality, "logged": True})  # fmt: skip

    # --- down: commands for the edge's devices ------------------------------------------
    async def _open_commands(self) -> list[Any]:
        from twin.control.ledger import TERMINAL

        engine = self.engine
        assert engine is not None
        rows = await engine.rio.call(engine.registry.open_commands, [str(t) for t in TERMINAL])
        return [r for r in rows if self.owner_of(r.device) is not None]

    async def commands_for(self, edge: str) -> list[dict[str, Any]]:
        """The cloud's open commands to the edge's devices, oldest first (the edge runs each
        once: its ledger keys them by the cloud's id). A pending one becomes ``sent``."""
        engine = self.engine
        assert engine is not None
        now = time.time()
        out, moved = [], []
        for r in await self._open_commands():
            if self.owner_of(r.device) != edge or r.deadline <= now:
                continue
            if r.status == "pending":
                r = replace(r, status="sent", updated_at=now,
                            transitions=(*r.transitions, ("sent", now)))  # fmt: skip
                moved.append(r)
            out.append({"id": r.id, "device": r.device, "type": r.type, "params": dict(r.params),
                        "deadline": r.deadline, "created_at": r.created_at,
                        "status": r.status})  # fmt: skip
        if moved:
            await engine.rio.call(engine.registry.save_commands, moved)
        return out

    async def expire_commands(self) -> None:
        """Open commands to edge devices past their deadline become ``timeout`` (the edge
        was offline too long, or never reported): they expire as declared, here too."""
        engine = self.engine
        assert engine is not None
        now = time.time()
        done = [replace(r, status="timeout", updated_at=now, error="deadline passed before "
                        "the edge reported an outcome",
                        transitions=(*r.transitions, ("timeout", now)))
                for r in await self._open_commands() if r.deadline <= now]  # fmt: skip
        if done:
            await engine.rio.call(engine.registry.save_commands, done)
            log.info("edge: %d commands to edge devices timed out", len(done))

    # --- down: the edge's specs ---------------------------------------------------------
    def desired(self, edge: str) -> dict[str, Any]:
        """The documents the edge runs: its EdgeNode, site, owned devices and what they use
        (models, groups), scenes acting only on its devices, retention policies, Models."""
        engine = self.engine
        assert engine is not None
        specs = engine.specs
        me = specs.get(("EdgeNode", edge))
        if me is None:
            raise KeyError(edge)
        owned = {d for d, e in edge_owned(specs).items() if e == edge}
        site = (me.get("metadata") or {}).get("site")
        keep: dict[tuple[str, str], Mapping[str, Any]] = {("EdgeNode", edge): me}
        if site and ("Site", site) in specs:
            keep[("Site", site)] = specs[("Site", site)]
        groups = {g: d for (k, g), d in specs.items() if k == "DeviceGroup"}
        for dev in owned:
            doc = specs[("Device", dev)]
            keep[("Device", dev)] = doc
            model = (doc.get("spec") or {}).get("model")
            if model and ("DeviceModel", model) in specs:
                keep[("DeviceModel", model)] = specs[("DeviceModel", model)]
            g = (doc.get("metadata") or {}).get("group")
            while g and g in groups and ("DeviceGroup", g) not in keep:
                keep[("DeviceGroup", g)] = groups[g]
                g = (groups[g].get("spec") or {}).get("parent")
        all_devices = {n for (k, n) in specs if k == "Device"}
        for (k, n), doc in specs.items():
            if k == "Scene":
                refs = _strings(doc.get("spec")) & all_devices
                if refs and refs <= owned:
                    keep[(k, n)] = doc
            elif k == "RetentionPolicy":
                psite = (doc.get("metadata") or {}).get("site")
                if psite in (None, site):
                    keep[(k, n)] = doc
            elif k == "Model" and n in ((me.get("spec") or {}).get("models") or []):
                keep[(k, n)] = doc
        docs = [keep[key] for key in sorted(keep)]
        digest = hashlib.sha256(json.dumps(docs, sort_keys=True, default=str).encode()).hexdigest()
        return {"revision": engine.revision_number, "hash": digest, "documents": docs}


def _strings(value: Any) -> set[str]:
    out: set[str] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            out.add(v)
            if "." in v:
                out.add(v.split(".", 1)[0])  # "fan_01.power"
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return out


__all__ = ["EdgeCloud", "EdgeLink", "EdgeRefused", "link_device", "marker_device"]
