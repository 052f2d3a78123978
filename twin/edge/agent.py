"""The edge agent: the engine service ``twin edge`` adds, which makes an engine an edge node.

::

    edge engine (its own registry + time-series store in the edge's state dir)
    ├─ devices          only those the EdgeNode owns (EngineConfig.edge)
    ├─ scenes, commands local: they work with the uplink down
    └─ edge agent
       ├─ outbox        <state>/outbox (twin/edge/outbox.py), limits from the EdgeNode spec
       ├─ tap           pushed readings: in the outbox before the local ack (the time-series
       │                service's append hook: HTTP 2xx / PUBACK only when both are fsynced);
       │                polled readings, status changes, alarms (bus), scene traces (the
       │                scene engine's trace sink), command results (ledger listener) → outbox
       ├─ uplink        outbox → cloud (twin/edge/uplink.py)
       └─ spec sync     cloud → local registry: the edge's documents as a new local revision
                        (atomic: one apply), kept across restarts; the engine hot-reloads

Offline autonomy: the local registry holds the last applied revision, so an edge restarted with
the uplink down runs exactly what it ran before; the scenes and commands are local.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from twin.edge.connect import open_transport
from twin.edge.outbox import Outbox, OutboxError
from twin.edge.transport import LinkDown, Transport
from twin.edge.uplink import Uplink
from twin.runtime.bus import Filter
from twin.runtime.gc_freeze import keep_frozen
from twin.runtime.supervisor import supervise
from twin.runtime.timeseries_service import timeseries_of
from twin.spec.edge_check import overflow_policy, parse_size
from twin.spec.units import parse_duration

if TYPE_CHECKING:
    from twin.runtime.engine import Engine

log = logging.getLogger(__name__)

CLOUD_REV_PREFIX = "cloud revision "
CLOUD_CMD = "cloud:"
"""Idempotency-key prefix of commands the cloud queued (the local ledger runs each once)."""


class _Joined:
    """Two group-commit batches (the local WAL's and the outbox's) awaited as one: duck-typed
    like a WAL batch (``done.wait()``, ``error``) for the ingest edges that commit it."""

    def __init__(self, a: Any, b: Any) -> None:
        self.a, self.b = a, b
        self.done = self

    async def wait(self) -> None:
        await self.a.done.wait()
        await self.b.done.wait()

    @property
    def error(self) -> Any:
        return self.a.error or self.b.error


@dataclass
class EdgeAgent:
    """The engine service (``engine.service_info["edge"]``)."""

    edge: str
    cloud_url: str
    key: str
    verify: Any = True
    name: str = "edge"
    sync_interval: float = 2.0
    freeze_gc: bool = True
    """Move what is alive once the engine is up out of the collector's way
    (``twin/runtime/gc_freeze.py``)."""
    freeze_settle: float = 5.0
    outbox: Outbox | None = field(default=None, init=False)
    uplink: Uplink | None = field(default=None, init=False)
    transport: Transport | None = field(default=None, init=False)
    """HTTP(S) or MQTT (``mqtt://``, ``mqtts://``), by the cloud URL (twin/edge/transport.py)."""
    cloud_revision: int | None = field(default=None, init=False)
    spec_hash: str | None = field(default=None, init=False)
    pipelines: dict[str, Any] = field(default_factory=dict, init=False)
    lost: int = field(default=0, init=False)
    """Bus events lost to an overflowing subscription (counted, logged)."""
    _engine: Engine | None = field(default=None, init=False, repr=False)

    def _spec(self) -> Mapping[str, Any]:
        assert self._engine is not None
        doc = self._engine.specs.get(("EdgeNode", self.edge)) or {}
        return doc.get("spec") or {}

    async def __call__(
        self, engine: Engine, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self._engine = engine
        spec = self._spec()
        buf = spec.get("buffer") or {}
        drop, never = overflow_policy(spec)
        box = Outbox(
            Path(engine.config.state_dir) / "outbox",
            max_bytes=parse_size(buf["max_bytes"]) if "max_bytes" in buf else None,
            max_records=buf.get("max_records"),
            max_age=parse_duration(buf["max_age"]) if "max_age" in buf else None,
            drop=drop,
            never=never,
        )
        self.outbox = box
        up = spec.get("uplink") or {}
        back = up.get("backoff") or {}
        backoff = (parse_duration(back.get("initial", "500ms")),
                   parse_duration(back.get("max", "30s")))  # fmt: skip
        self.transport = open_transport(self.cloud_url, self.edge, self.key, verify=self.verify,
                                        backoff=backoff)  # fmt: skip
        self.uplink = Uplink(
            box, self.cloud_url, self.edge, self.key, verify=self.verify,
            transport=self.transport,
            batch=int(up.get("batch", 5000)),
            interval=parse_duration(up.get("interval", "200ms")),
            timeout=parse_duration(up.get("timeout", "10s")),
            backoff_initial=parse_duration(back.get("initial", "500ms")),
            backoff_max=parse_duration(back.get("max", "30s")),
            revision=lambda: self.cloud_revision,
            extra_stats=lambda: {"local_revision": engine.revision_number, "lost": self.lost},
        )  # fmt: skip
        self.sync_interval = parse_duration(up.get("sync", self.sync_interval))
        self.cloud_revision, self.spec_hash = await engine.rio.call(self._local_origin)
        async with trio.open_nursery() as nursery:
            await nursery.start(box.run)
            self._hook(engine)
            sub = engine.bus.open(Filter.of(kinds=("reading", "status", "alarm")),
                                  buffer=100_000, name="edge outbox")  # fmt: skip
            nursery.start_soon(self._tap, sub)
            await nursery.start(self.uplink.run)
            nursery.start_soon(self._sync_loop)
            if self.freeze_gc:  # short full collections: local scenes react in milliseconds
                nursery.start_soon(keep_frozen, engine, self.freeze_settle)
            for i, vision in enumerate(spec.get("vision") or []):
                nursery.start_soon(partial(
                    supervise, partial(self._vision, engine, vision), kind="vision",
                    name=str(vision.get("camera", i)), supervision=engine.supervision,
                    policy=engine.config.restart, restart_on_return=True))  # fmt: skip
            task_status.started(self)

    # --- up -----------------------------------------------------------------------------
    def _hook(self, engine: Engine) -> None:
        box = self.outbox
        assert box is not None
        svc = timeseries_of(engine)
        if svc is not None:

            def hook(rows: list[Any], append: Callable[[], Any]) -> Any:
                _, ob = box.append("telemetry", [list(r) for r in rows])  # OutboxFull: refused
                return _Joined(append(), ob)

            svc.append_hook = hook
        control = engine.service_info.get("control")
        if control is not None:
            scenes = getattr(control, "scenes", None)
            if scenes is not None:
                sink = scenes.trace_sink

                def trace_sink(trace: dict[str, Any]) -> None:
                    if sink is not None:
                        sink(trace)
                    self.put_soon("scene_trace", {
                        "run_id": trace.get("run_id"), "scene": trace.get("scene"),
                        "started_at": trace.get("started_at"),
                        "finished_at": trace.get("finished_at"), "status": trace.get("status"),
                        "trace": trace})  # fmt: skip

                scenes.trace_sink = trace_sink
            ledger = getattr(control, "ledger", None)
            if ledger is not None:
                ledger.listeners.append(self._command_done)

    def _command_done(self, cmd: Any) -> None:
        if not getattr(cmd, "terminal", True):
            return  # the cloud gets each command's outcome, not every step
        key = getattr(cmd, "idempotency_key", None) or ""
        self.put_soon("command_result", {
            "id": key[len(CLOUD_CMD):] if key.startswith(CLOUD_CMD) else cmd.id, "device": cmd.device, "type": cmd.type, "status": str(cmd.status),
            "error": cmd.error, "result": cmd.result, "ts": cmd.updated_at or time.time()})  # fmt: skip

    def put_soon(self, kind: str, body: Any, ts: float | None = None) -> None:
        """Append without waiting for the fsync (no acknowledgement stands behind it)."""
        box = self.outbox
        if box is None:
            return
        try:
            box.append(kind, body, ts)
        except OutboxError as exc:
            self.lost += 1
            log.warning("edge outbox: %s record refused: %s", kind, exc)

    async def _tap(self, sub: Any) -> None:
        """Bus → outbox: polled readings (pushed ones are in it already: ``logged``), status
        changes and alarms. Readings arriving together become one telemetry record."""
        engine = self._engine
        assert engine is not None
        while True:
            try:
                first = await sub.receive.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                self.lost += 1
                log.error("edge outbox: the bus dropped its subscription (too slow); resubscribing")
                sub = engine.bus.open(sub.filter, buffer=100_000, name="edge outbox")
                continue
            events = [first]
            while len(events) < 5000:
                try:
                    events.append(sub.receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
            readings = []
            for ev in events:
                kind = ev.get("kind")
                if kind == "reading":
                    if not ev.get("logged") and ev.get("value") is not None:
                        readings.append([ev["device"], ev["point"], ev["value"], ev["ts"],
                                         ev.get("quality", "good")])  # fmt: skip
                elif kind == "status":
                    self.put_soon("status", {"device": ev["device"], "status": ev["status"],
                                             "previous": ev.get("previous"),
                                             "reason": ev.get("reason")}, ev.get("ts"))  # fmt: skip
                elif kind == "alarm":
                    alarm = ev.get("alarm") or {}
                    self.put_soon("alarm", {
                        "device": ev.get("device"), "event": ev.get("event"),
                        "type": alarm.get("type"), "severity": alarm.get("severity"),
                        "message": alarm.get("message")}, ev.get("ts"))  # fmt: skip
            if readings:
                self.put_soon("telemetry", readings)

    # --- edge AI ------------------------------------------------------------------------
    async def _model_file(self, name: str, spec: Mapping[str, Any]) -> Path:
        """The Model's ONNX file: the declared path when this machine has it, else the copy
        downloaded from the cloud into ``<state>/models/`` (checked against ``sha256``)."""
        import hashlib

        engine = self._engine
        assert engine is not None
        declared = Path(str(spec["file"]))
        want = spec.get("sha256")
        cache = Path(engine.config.state_dir) / "models" / f"{name}.onnx"

        def local() -> Path | None:
            if declared.is_file():
                return declared
            if cache.is_file() and (
                not want or hashlib.sha256(cache.read_bytes()).hexdigest() == want
            ):
                return cache
            return None

        found = await trio.to_thread.run_sync(local)
        if found is not None:
            return found
        assert self.transport is not None
        resp = await self.transport.request(f"models/{name}", limit=60)
        if resp.status != 200 or not isinstance(resp.body, bytes):
            raise ValueError(f"model {name}: the cloud answered {resp.status}: {resp.detail}")
        data = resp.body
        if want and hashlib.sha256(data).hexdigest() != want:
            raise ValueError(f"model {name}: the downloaded file does not match its sha256")

        def store() -> None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(cache)

        await trio.to_thread.run_sync(store)
        return cache

    async def _vision(self, engine: Engine, vision: Mapping[str, Any]) -> None:
        from twin.edge.vision import CameraPipeline, Detector, MotionGate, parse_size

        model = engine.specs.get(("Model", str(vision["model"])))
        if model is None:
            raise ValueError(f"no Model {vision['model']!r} in the running revision")
        mspec = model.get("spec") or {}
        path = await self._model_file(str(vision["model"]), mspec)
        detector = await trio.to_thread.run_sync(Detector, path, mspec)
        motion = vision.get("motion") or {}
        w, h = parse_size(str(vision.get("size", "320x180")))
        source = vision.get("input")
        if not source:
            cam = engine.specs.get(("Device", str(vision["camera"]))) or {}
            binding = (cam.get("spec") or {}).get("binding") or {}
            source = next((b.get("url") for b in binding.values()
                           if isinstance(b, dict) and b.get("url")), None)  # fmt: skip
        if not source:
            raise ValueError(f"camera {vision['camera']}: no input URL (spec.vision[].input)")
        pipe = CameraPipeline(str(vision["camera"]), str(source), detector,
                              MotionGate(int(motion.get("pixel", 25)), float(motion.get("area", 0.01))),
                              w, h, float(vision.get("fps", 5)))  # fmt: skip
        self.pipelines[pipe.camera] = pipe
        await pipe.run(engine)

    # --- down ---------------------------------------------------------------------------
    def _local_origin(self) -> tuple[int | None, str | None]:
        """(cloud revision, hash) of the locally applied cloud documents (from the head's
        message), so a restarted edge reports what it runs before it reaches the cloud."""
        assert self._engine is not None
        head = self._engine.registry.head()
        msg = getattr(head, "message", "") or ""
        if msg.startswith(CLOUD_REV_PREFIX):
            rev, _, digest = msg[len(CLOUD_REV_PREFIX) :].partition(" ")
            if rev.isdigit():
                return int(rev), digest.strip("()") or None
        return None, None

    async def _sync_loop(self) -> None:
        link = self.transport
        assert link is not None
        while True:
            try:
                resp = await link.request("specs", limit=10)
                if resp.status == 200 and isinstance(resp.body, dict):
                    await self._apply(resp.body)
                else:
                    log.debug("edge spec sync: %s %s", resp.status, resp.detail)
                resp = await link.request("commands", limit=10)
                if resp.status == 200 and isinstance(resp.body, dict):
                    await self._commands(resp.body.get("items") or [])
            except (LinkDown, ValueError, TypeError, KeyError) as exc:
                log.debug("edge spec sync failed: %s", exc)
            await trio.sleep(self.sync_interval)

    async def _commands(self, items: list[Mapping[str, Any]]) -> None:
        """Run the cloud's queued commands on the local ledger, each once (keyed by the cloud's
        id, durably in the local registry); past their deadline they are reported timed out."""
        engine = self._engine
        assert engine is not None
        control = engine.service_info.get("control")
        ledger = getattr(control, "ledger", None)
        if ledger is None:
            return
        from twin.errors import TwinError

        now = time.time()
        for c in items:
            cid = str(c.get("id"))
            left = float(c.get("deadline") or 0) - now
            if left <= 0:
                self.put_soon("command_result", {"id": cid, "device": c.get("device"),
                                                 "status": "timeout", "ts": now,
                                                 "error": "expired before the edge got it"})  # fmt: skip
                continue
            try:
                await ledger.submit(str(c["device"]), str(c["type"]), c.get("params") or {},
                                    command_timeout=left, idempotency_key=CLOUD_CMD + cid,
                                    source="cloud")  # fmt: skip
            except (TwinError, KeyError, ValueError) as exc:
                self.put_soon("command_result", {"id": cid, "device": c.get("device"),
                                                 "status": "failed", "ts": now,
                                                 "error": str(exc)})  # fmt: skip

    async def _apply(self, desired: Mapping[str, Any]) -> None:
        """Apply the cloud's documents for this edge as one local revision (all or nothing)."""
        engine = self._engine
        assert engine is not None
        digest = str(desired.get("hash"))
        rev = int(desired.get("revision") or 0)
        if digest == self.spec_hash:
            self.cloud_revision = rev if self.cloud_revision is None else self.cloud_revision
            return
        from twin.errors import TwinError
        from twin.spec import validate_specs
        from twin.spec.apply import apply_specs

        docs = desired.get("documents") or []

        def apply() -> int | None:
            loaded = validate_specs(docs)
            result = apply_specs(engine.registry, loaded, prune=True, author=f"cloud:{self.edge}",
                                 message=f"{CLOUD_REV_PREFIX}{rev} ({digest})", source="edge")  # fmt: skip
            return result.revision.number if result.revision is not None else None

        try:
            local = await engine.rio.call(apply)
        except TwinError as exc:
            log.error("edge: cloud revision %d not applied (kept the running one): %s", rev, exc)
            return
        self.spec_hash, self.cloud_revision = digest, rev
        log.info("edge: applied cloud revision %d as local revision %s", rev, local)
        engine.poke()

    def stats(self) -> dict[str, Any]:
        up = self.uplink
        return {
            "edge": self.edge,
            "cloud": self.cloud_url,
            "online": bool(up and up.online),
            "last_ok": up.last_ok if up else None,
            "last_error": up.last_error if up else None,
            "cloud_revision": self.cloud_revision,
            "outbox": self.outbox.stats() if self.outbox else None,
            "lost": self.lost,
        }


__all__ = ["EdgeAgent"]
