"""The command ledger: every command to a device, persisted, with a strict state machine.

```
pending ──► sent ──► executing ──► success
   │          │          │     └─► failed {error}
   │          │          ├───────► timeout      (the engine's deadline passed)
   │          │          └───────► cancelled    (the device confirmed a cancel)
   └──────────┴─► cancelled | failed | timeout | success
```
* ``pending``: validated against the DeviceModel's command schema and queued. Each device has
  an ordered queue; one command per device is in flight at a time (``push`` transports), or the
  device fetches its pending commands in order (``poll`` transports: HTTP long-polling).
* A transport failure marked temporary (:class:`~twin.errors.BindingError` with
  ``temporary = True``) leaves the command ``pending`` and retries with exponential backoff;
  a permanent one (``CommandError``, a non-temporary ``BindingError``) fails it.
* Every command has a deadline (creation + timeout). Past it, a non-terminal command becomes
  ``timeout``; the engine enforces that, not the device.
* Cancel: ``pending`` → ``cancelled`` at once; ``sent``/``executing`` → a cancel is sent to the
  device and its outcome recorded (a device that never answers ends ``cancelled`` at the
  deadline, with an error saying it did not confirm).
* Every transition is persisted with its timestamp. After a restart, ``pending`` commands
  resume, commands whose deadline passed while the engine was down become ``timeout``, and
  ``sent``/``executing`` ones wait for the device until their deadline: none stays stuck.
* An idempotency key (per device) makes a retried submit return the original command.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

import trio
from jsonschema import Draft202012Validator

from twin.errors import BindingConnectError, BindingError, CommandError, NotFoundError
from twin.registry.base import CommandRecord, CommandStore
from twin.spec.properties import value_problem
from twin.spec.select import matches, parse_selector
from twin.spec.units import parse_duration

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0


class CommandStatus(enum.StrEnum):
    PENDING = "pending"
    SENT = "sent"
    EXECUTING = "executing"
    SUCCESS = "success"
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"


S = CommandStatus
TERMINAL: frozenset[CommandStatus] = frozenset({S.SUCCESS, S.FAILED, S.TIMEOUT, S.CANCELLED})
TRANSITIONS: dict[CommandStatus, frozenset[CommandStatus]] = {
    S.PENDING: frozenset({S.SENT, S.SUCCESS, S.FAILED, S.TIMEOUT, S.CANCELLED}),
    S.SENT: frozenset({S.EXECUTING, S.SUCCESS, S.FAILED, S.TIMEOUT, S.CANCELLED}),
    S.EXECUTING: frozenset({S.SUCCESS, S.FAILED, S.TIMEOUT, S.CANCELLED}),
    S.SUCCESS: frozenset(),
    S.FAILED: frozenset(),
    S.TIMEOUT: frozenset(),
    S.CANCELLED: frozenset(),
}


def legal(old: CommandStatus, new: CommandStatus) -> bool:
    return new in TRANSITIONS[old]


class IllegalTransition(CommandError):
    """A transition the state machine forbids (e.g. a report for a finished command)."""


# Seed §3.1 command types and their parameters (used when the model declares no schema).
_INT = {"type": "integer"}
SEED_COMMANDS: dict[str, dict[str, Any]] = {
    "reboot": {"type": "object", "additionalProperties": False},
    "reset": {"type": "object", "additionalProperties": False},
    "update": {
        "type": "object",
        "required": ["url", "checksum"],
        "properties": {"url": {"type": "string", "minLength": 1}, "checksum": {"type": "string"}},
        "additionalProperties": False,
    },
    "start_stream": {"type": "object"},
    "stop_stream": {"type": "object"},
    "take_snapshot": {"type": "object"},
    "ptz": {
        "type": "object",
        "properties": {"pan": _INT, "tilt": _INT, "zoom": _INT},
        "additionalProperties": False,
    },
    "read_value": {"type": "object"},
    "set_sampling_rate": {
        "type": "object",
        "required": ["rate"],
        "properties": {"rate": {"type": "integer", "minimum": 1}},
        "additionalProperties": False,
    },
    "set_state": {
        "type": "object",
        "required": ["state"],
        "properties": {"state": {"type": "boolean"}},
        "additionalProperties": False,
    },
    "set_value": {
        "type": "object",
        "required": ["value"],
        "properties": {"value": {"type": "number"}},
        "additionalProperties": False,
    },
    "custom": {
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string", "minLength": 1}, "params": {"type": "object"}},
        "additionalProperties": False,
    },
}
SET = "set"
"""The command the reconciler (and scenes' ``set_desired``) issue: ``{property, value}``."""


@dataclass(slots=True)
class DeviceCommand:
    id: str
    seq: int
    device: str
    type: str
    params: dict[str, Any]
    timeout: float
    deadline: float
    created_at: float
    status: CommandStatus = S.PENDING
    transitions: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None
    result: Any = None
    idempotency_key: str | None = None
    attempts: int = 0
    source: str = ""
    batch: str | None = None
    cancel_requested: bool = False
    updated_at: float = 0.0
    next_attempt: float = 0.0  # not persisted: when a retry may go out (clock seconds)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def transition(
        self, new: CommandStatus, ts: float, *, error: str | None = None, result: Any = None
    ) -> None:
        if not legal(self.status, new):
            raise IllegalTransition(
                f"command {self.id} ({self.device} {self.type}): {self.status} → {new} "
                "is not allowed",
                hint="finished commands cannot change; executing ones cannot go back",
            )
        self.status = new
        self.transitions.append((str(new), ts))
        self.updated_at = ts
        if error is not None:
            self.error = error
        if result is not None:
            self.result = result

    def record(self) -> CommandRecord:
        return CommandRecord(
            id=self.id,
            seq=self.seq,
            device=self.device,
            type=self.type,
            params=dict(self.params),
            status=str(self.status),
            timeout=self.timeout,
            deadline=self.deadline,
            created_at=self.created_at,
            updated_at=self.updated_at,
            transitions=tuple(self.transitions),
            error=self.error,
            result=self.result,
            idempotency_key=self.idempotency_key,
            attempts=self.attempts,
            source=self.source,
            batch=self.batch,
            cancel_requested=self.cancel_requested,
        )

    @classmethod
    def from_record(cls, r: CommandRecord) -> DeviceCommand:
        return cls(
            id=r.id,
            seq=r.seq,
            device=r.device,
            type=r.type,
            params=dict(r.params),
            timeout=r.timeout,
            deadline=r.deadline,
            created_at=r.created_at,
            status=CommandStatus(r.status),
            transitions=[tuple(t) for t in r.transitions],  # type: ignore[misc]
            error=r.error,
            result=r.result,
            idempotency_key=r.idempotency_key,
            attempts=r.attempts,
            source=r.source,
            batch=r.batch,
            cancel_requested=r.cancel_requested,
            updated_at=r.updated_at,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "device": self.device,
            "type": self.type,
            "params": self.params,
            "status": str(self.status),
            "error": self.error,
            "result": self.result,
            "timeout": self.timeout,
            "deadline": self.deadline,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "transitions": [{"status": s, "at": t} for s, t in self.transitions],
            "idempotency_key": self.idempotency_key,
            "attempts": self.attempts,
            "source": self.source,
            "batch": self.batch,
            "cancel_requested": self.cancel_requested,
        }


def record_json(r: CommandRecord) -> dict[str, Any]:
    return DeviceCommand.from_record(r).to_json()


# -- validation against the DeviceModel ----------------------------------------------------------
@lru_cache(maxsize=1024)
def _validator(schema_json: str) -> Draft202012Validator:
    import json

    return Draft202012Validator(json.loads(schema_json))


_FAST: dict[int, tuple[Mapping[str, Any], Callable[[Any], Any]]] = {}


def _fast_ok(schema: Mapping[str, Any], params: dict[str, Any]) -> bool:
    """The compiled (fastjsonschema) check: the hot path; jsonschema explains failures."""
    hit = _FAST.get(id(schema))
    if hit is None or hit[0] is not schema:
        import fastjsonschema

        if len(_FAST) > 4096:
            _FAST.clear()
        hit = _FAST[id(schema)] = (schema, fastjsonschema.compile(dict(schema)))
    try:
        hit[1](params)
    except Exception:
        return False
    return True


def _schema_errors(schema: Mapping[str, Any], params: Mapping[str, Any]) -> list[str]:
    import json

    if _fast_ok(schema, dict(params)):
        return []
    v = _validator(json.dumps(schema, sort_keys=True))
    out = []
    for err in sorted(v.iter_errors(dict(params)), key=lambda e: list(e.path)):
        where = ".".join(str(p) for p in err.path)
        out.append(f"params.{where}: {err.message}" if where else f"params: {err.message}")
    return out


class Catalog:
    """What the ledger and scenes need to know about devices: models, commands, properties."""

    def __init__(self, specs: Mapping[tuple[str, str], Mapping[str, Any]] | None = None) -> None:
        self.update(specs or {})

    def update(self, specs: Mapping[tuple[str, str], Mapping[str, Any]]) -> None:
        self.specs = specs
        self.devices = {n: d for (k, n), d in specs.items() if k == "Device"}
        self.models = {n: d for (k, n), d in specs.items() if k == "DeviceModel"}
        self.groups = {n: d for (k, n), d in specs.items() if k == "DeviceGroup"}
        self.sites = {n: d for (k, n), d in specs.items() if k == "Site"}

    def device(self, name: str) -> Mapping[str, Any] | None:
        return self.devices.get(name)

    def model(self, device: str) -> Mapping[str, Any] | None:
        doc = self.devices.get(device)
        if doc is None:
            return None
        model = self.models.get(str((doc.get("spec") or {}).get("model", "")))
        return None if model is None else (model.get("spec") or {})

    def protocol(self, device: str) -> str:
        binding = ((self.devices.get(device) or {}).get("spec") or {}).get("binding") or {}
        return next(iter(binding), "") if isinstance(binding, Mapping) else ""

    def binding_options(self, device: str) -> Mapping[str, Any]:
        binding = ((self.devices.get(device) or {}).get("spec") or {}).get("binding") or {}
        if not isinstance(binding, Mapping) or not binding:
            return {}
        return next(iter(binding.values())) or {}

    def select(self, selector: str) -> list[str]:
        try:
            terms = parse_selector(selector)
        except ValueError as exc:
            raise CommandError(f"selector: {exc}") from None
        return sorted(n for n, d in self.devices.items() if matches(d, terms, groups=self.groups))

    def timezone(self, device: str | None = None, site: str | None = None) -> str:
        if site is None and device is not None:
            site = ((self.devices.get(device) or {}).get("metadata") or {}).get("site")
        if site is None and len(self.sites) == 1:
            site = next(iter(self.sites))
        doc = self.sites.get(str(site)) if site is not None else None
        return str(((doc or {}).get("spec") or {}).get("timezone") or "UTC")

    def validate(
        self, device: str, type_: str, params: Mapping[str, Any] | None, timeout: float | None
    ) -> tuple[dict[str, Any], float]:
        """Check a command before it is queued. Returns (params, timeout); raises CommandError."""
        params = dict(params or {})
        if device not in self.devices:
            raise CommandError(f"no device {device!r}")
        model = self.model(device)
        default_timeout = DEFAULT_TIMEOUT
        if type_ == SET:
            prop, value = params.get("property"), params.get("value")
            if (
                not isinstance(prop, str)
                or "value" not in params
                or set(params)
                - {
                    "property",
                    "value",
                }
            ):
                raise CommandError("set: params must be {property, value}")
            if model is not None:
                decl = (model.get("properties") or {}).get(prop)
                if decl is None:
                    raise CommandError(f"{device}: model has no property {prop!r}")
                if decl.get("access", "read") == "read":
                    raise CommandError(f"{device}: property {prop!r} is read-only")
                why = value_problem(value, decl)
                if why:
                    raise CommandError(f"{device}: {prop}: {why}")
        else:
            schema: Mapping[str, Any] | None = SEED_COMMANDS.get(type_)
            if model is not None:
                commands = model.get("commands") or {}
                decl = commands.get(type_)
                if decl is None:
                    known = ", ".join(sorted(commands)) or "none"
                    raise CommandError(
                        f"{device}: its model has no command {type_!r}", hint=f"known: {known}"
                    )
                schema = decl.get("params") or schema
                if decl.get("timeout") is not None:
                    default_timeout = parse_duration(decl["timeout"])
            elif type_ not in SEED_COMMANDS:
                raise CommandError(
                    f"{device}: unknown command type {type_!r}",
                    hint=f"known: {', '.join(sorted(SEED_COMMANDS))}",
                )
            if schema is not None:
                errors = _schema_errors(schema, params)
                if errors:
                    raise CommandError(f"{device} {type_}: " + "; ".join(errors))
        t = default_timeout if timeout is None else float(timeout)
        if not (t > 0 and math.isfinite(t)):
            raise CommandError(f"timeout must be a positive number of seconds, not {timeout!r}")
        return params, t


# -- transports and stores -----------------------------------------------------------------
class _Sent:
    def __repr__(self) -> str:
        return "SENT"


SENT: Any = _Sent()
"""Returned by ``Transport.send`` when the device will report the outcome later."""


class Transport(Protocol):
    def mode(self, device: str) -> str:
        """``push`` (the ledger calls send) or ``poll`` (the device fetches, HTTP long-poll)."""
        ...

    async def send(self, command: DeviceCommand) -> Any:
        """Deliver; return ``SENT`` (outcome reported later) or the result (``success``)."""
        ...

    async def cancel(self, command: DeviceCommand) -> bool:
        """Ask the device to cancel; True if it confirmed at once."""
        ...


Store = CommandStore
"""What the ledger keeps its commands in (twin/registry/base.py says what it offers)."""


class MemoryStore:
    """A Store in memory (tests, ``twin simulate``); the registry is the real one."""

    def __init__(self) -> None:
        self.rows: dict[str, CommandRecord] = {}
        self.saves = 0

    def insert_command(self, command: CommandRecord) -> tuple[CommandRecord, bool]:
        if command.idempotency_key is not None:
            for r in self.rows.values():
                if r.device == command.device and r.idempotency_key == command.idempotency_key:
                    return r, False
        self.rows[command.id] = command
        return command, True

    def save_commands(self, commands: Sequence[CommandRecord]) -> None:
        self.saves += 1
        for c in commands:
            self.rows[c.id] = c

    def get_command(self, command_id: str) -> CommandRecord | None:
        return self.rows.get(command_id)

    def commands(
        self,
        *,
        device: str | None = None,
        statuses: Sequence[str] | None = None,
        batch: str | None = None,
        limit: int = 100,
    ) -> list[CommandRecord]:
        rows = [
            r
            for r in self.rows.values()
            if (device is None or r.device == device)
            and (statuses is None or r.status in statuses)
            and (batch is None or r.batch == batch)
        ]
        return sorted(rows, key=lambda r: r.seq, reverse=True)[:limit]

    def open_commands(self, terminal: Sequence[str]) -> list[CommandRecord]:
        return sorted(
            (r for r in self.rows.values() if r.status not in terminal), key=lambda r: r.seq
        )

    def max_command_seq(self) -> int:
        return max((r.seq for r in self.rows.values()), default=0)


@dataclass
class RetryPolicy:
    initial: float = 0.5
    factor: float = 2.0
    maximum: float = 30.0

    def delay(self, attempt: int) -> float:
        return min(self.maximum, self.initial * self.factor ** max(0, attempt - 1))


# -- the ledger ------------------------------------------------------------------------------
@dataclass
class BatchResult:
    batch: str
    results: list[dict[str, Any]]

    @property
    def status(self) -> str:
        ok = sum(1 for r in self.results if r.get("accepted"))
        if ok == len(self.results):
            return "accepted"
        return "rejected" if ok == 0 else "partial"

    def to_json(self) -> dict[str, Any]:
        return {"batch": self.batch, "status": self.status, "results": self.results}


class Ledger:
    """The command ledger service. ``await nursery.start(ledger.run)``."""

    def __init__(
        self,
        store: Store,
        transport: Transport,
        catalog: Catalog,
        *,
        clock: Callable[[], float] = time.time,
        retry: RetryPolicy | None = None,
        threaded: bool = True,
        flush_batch: int = 2000,
    ) -> None:
        self.store = store
        self.transport = transport
        self.catalog = catalog
        self.clock = clock
        self.retry = retry or RetryPolicy()
        self.threaded = threaded
        self.flush_batch = flush_batch
        self.commands: dict[str, DeviceCommand] = {}  # non-terminal + recently finished
        self._queues: dict[str, deque[str]] = {}
        self._workers: set[str] = set()
        self._idem: dict[tuple[str, str], str] = {}
        self._done: dict[str, trio.Event] = {}
        self._kick: dict[str, trio.Event] = {}  # per device: something changed
        self._poll_wake: dict[str, trio.Event] = {}
        self._cancels: dict[str, list[str]] = {}  # poll devices: cancels to hand out
        self._heap: list[tuple[float, int, str]] = []
        self._heap_wake = trio.Event()
        self._dirty: dict[str, DeviceCommand] = {}
        self._dirty_wake = trio.Event()
        self._flushed = trio.Event()
        self._flushed.set()
        self._inflight = 0
        self._seq = itertools.count(1)
        self._tie = itertools.count()
        self._nursery: trio.Nursery | None = None
        self.listeners: list[Callable[[DeviceCommand], None]] = []
        self.dispatched = 0
        self.finished_keep = 10_000
        # scale-out (twin/runtime/cluster.py): this engine delivers only the commands of the
        # devices it owns; ``claim`` inserts the command's claim row before a delivery (False:
        # another engine has it, or this one's lease has passed: it is not delivered here)
        self.owns: Callable[[str], bool] = lambda device: True
        self.claim: Callable[[str], Awaitable[bool]] | None = None
        # gives a claim back when the command surely was not sent (the device was not
        # connected here): its next owner may deliver it
        self.unclaim: Callable[[str], Awaitable[None]] | None = None
        self.not_ours = 0

    # -- plumbing ----------------------------------------------------------------------------
    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.threaded:
            return await trio.to_thread.run_sync(fn, *args)
        await trio.lowlevel.checkpoint()
        return fn(*args)

    def _mark(self, cmd: DeviceCommand) -> None:
        self._dirty[cmd.id] = cmd
        if self._flushed.is_set():
            self._flushed = trio.Event()
        self._dirty_wake.set()
        for fn in self.listeners:
            try:
                fn(cmd)
            except Exception:
                log.exception("ledger listener failed")
        if cmd.terminal:
            ev = self._done.pop(cmd.id, None)
            if ev is not None:
                ev.set()
            self._wake_device(cmd.device)

    def _wake_device(self, device: str) -> None:
        ev = self._kick.pop(device, None)
        if ev is not None:
            ev.set()

    def _move(
        self,
        cmd: DeviceCommand,
        new: CommandStatus,
        *,
        error: str | None = None,
        result: Any = None,
    ) -> None:
        cmd.transition(new, self.clock(), error=error, result=result)
        log.info(
            "command %s device %s %s: %s%s",
            cmd.id,
            cmd.device,
            cmd.type,
            new,
            f" ({error})" if error else "",
        )
        self._mark(cmd)

    async def flush(self) -> None:
        """Persist every transition so far."""
        while self._dirty:
            batch = list(self._dirty.values())[: self.flush_batch]
            records = [c.record() for c in batch]
            for c in batch:
                del self._dirty[c.id]
            self._inflight += 1
            try:
                await self._call(self.store.save_commands, records)
            except Exception:
                log.exception("ledger: persisting %d commands failed; will retry", len(records))
                for c in batch:
                    self._dirty.setdefault(c.id, c)
                await trio.sleep(1.0)
            finally:
                self._inflight -= 1
        if not self._inflight:
            self._flushed.set()

    async def flushed(self) -> None:
        """Wait until every transition so far is in the store."""
        while self._dirty or self._inflight:
            if self._flushed.is_set():
                self._flushed = trio.Event()
            self._dirty_wake.set()
            await self._flushed.wait()

    async def _writer(self) -> None:
        while True:
            await self._dirty_wake.wait()
            self._dirty_wake = trio.Event()
            await self.flush()

    # -- submit ------------------------------------------------------------------------------
    def _new_id(self) -> str:
        return "cmd_" + secrets.token_hex(8)

    async def submit(
        self,
        device: str,
        type_: str,
        params: Mapping[str, Any] | None = None,
        *,
        command_timeout: float | None = None,
        idempotency_key: str | None = None,
        source: str = "",
        batch: str | None = None,
        durable: bool = True,
    ) -> DeviceCommand:
        """Validate and queue a command. Raises CommandError when it does not validate."""
        if idempotency_key is not None:
            known = self._idem.get((device, idempotency_key))
            if known is not None and known in self.commands:
                return self.commands[known]
        clean, t = self.catalog.validate(device, type_, params, command_timeout)
        now = self.clock()
        cmd = DeviceCommand(
            id=self._new_id(),
            seq=next(self._seq),
            device=device,
            type=type_,
            params=clean,
            timeout=t,
            deadline=now + t,
            created_at=now,
            transitions=[(str(S.PENDING), now)],
            idempotency_key=idempotency_key,
            source=source,
            batch=batch,
            updated_at=now,
        )
        if not self.owns(device):
            # another engine of the cluster delivers it: store it (durably) and let go; its
            # owner adopts it from the store (``adopt``), ``wait``/``get`` read the store
            rec, created = await self._call(self.store.insert_command, cmd.record())
            return DeviceCommand.from_record(rec) if not created else cmd
        if idempotency_key is not None:
            rec, created = await self._call(self.store.insert_command, cmd.record())
            if not created:
                existing = self.commands.get(rec.id) or DeviceCommand.from_record(rec)
                self._idem[(device, idempotency_key)] = existing.id
                return existing
            self._idem[(device, idempotency_key)] = cmd.id
            self._track(cmd)
            self._mark(cmd)
        else:
            self._track(cmd)
            self._mark(cmd)
            if durable:
                await self.flushed()
        return cmd

    def _track(self, cmd: DeviceCommand) -> None:
        self.commands[cmd.id] = cmd
        heapq.heappush(self._heap, (cmd.deadline, next(self._tie), cmd.id))
        self._heap_wake.set()
        # a recovered sent/executing command keeps its place: the next waits for its outcome
        if cmd.status is S.PENDING or (
            not cmd.terminal and self.transport.mode(cmd.device) == "push"
        ):
            self._queues.setdefault(cmd.device, deque()).append(cmd.id)
            self._start_worker(cmd.device)
            self._poll_wake_device(cmd.device)

    def _poll_wake_device(self, device: str) -> None:
        ev = self._poll_wake.pop(device, None)
        if ev is not None:
            ev.set()

    async def submit_batch(
        self,
        type_: str,
        params: Mapping[str, Any] | None = None,
        *,
        devices: Iterable[str] | None = None,
        selector: str | None = None,
        command_timeout: float | None = None,
        source: str = "",
        idempotency_key: str | None = None,
    ) -> BatchResult:
        targets = list(devices or [])
        if selector is not None:
            targets += [d for d in self.catalog.select(selector) if d not in targets]
        if not targets:
            raise CommandError("batch: no device matched", hint="give ids or a selector")
        batch = "batch_" + secrets.token_hex(6)
        results = []
        for device in targets:
            try:
                cmd = await self.submit(
                    device,
                    type_,
                    params,
                    command_timeout=command_timeout,
                    source=source,
                    batch=batch,
                    durable=False,
                    idempotency_key=None if idempotency_key is None else f"{idempotency_key}",
                )
                results.append({"device": device, "accepted": True, "command": cmd.id})
            except CommandError as exc:
                results.append({"device": device, "accepted": False, "error": str(exc)})
        await self.flushed()
        return BatchResult(batch, results)

    # -- reading -------------------------------------------------------------------------------
    async def get(self, command_id: str) -> DeviceCommand:
        cmd = self.commands.get(command_id)
        if cmd is not None:
            return cmd
        rec = await self._call(self.store.get_command, command_id)
        if rec is None:
            raise NotFoundError(f"no command {command_id!r}")
        return DeviceCommand.from_record(rec)

    async def history(self, device: str, limit: int = 50) -> list[DeviceCommand]:
        await self.flushed()
        recs = await self._call(lambda: self.store.commands(device=device, limit=limit))
        return [self.commands.get(r.id) or DeviceCommand.from_record(r) for r in recs]

    async def wait(self, command_id: str) -> DeviceCommand:
        """Wait until the command is terminal; return it (a command another engine delivers
        is followed in the store)."""
        cmd = await self.get(command_id)
        while not cmd.terminal:
            if command_id in self.commands:
                ev = self._done.setdefault(command_id, trio.Event())
                with trio.move_on_after(1.0):
                    await ev.wait()
            else:
                await trio.sleep(0.2)
            cmd = await self.get(command_id)
        return cmd

    def active(self, device: str | None = None) -> list[DeviceCommand]:
        return sorted(
            (
                c
                for c in self.commands.values()
                if not c.terminal and (device is None or c.device == device)
            ),
            key=lambda c: c.seq,
        )

    # -- device reports, cancel ---------------------------------------------------------------
    async def report(
        self,
        command_id: str,
        status: str,
        *,
        result: Any = None,
        error: str | None = None,
        device: str | None = None,
    ) -> DeviceCommand:
        """A device reports ``executing``, ``success``, ``failed`` or ``cancelled``."""
        try:
            new = CommandStatus(status)
        except ValueError:
            raise CommandError(f"unknown status {status!r}") from None
        if new not in (S.EXECUTING, S.SUCCESS, S.FAILED, S.CANCELLED):
            raise CommandError(f"a device cannot report {status!r}")
        cmd = await self.get(command_id)
        if device is not None and cmd.device != device:
            raise NotFoundError(f"no command {command_id!r} for device {device!r}")
        if cmd.id not in self.commands:  # finished long ago
            raise IllegalTransition(f"command {command_id} is already {cmd.status}")
        if new is S.FAILED and not error:
            error = "device reported failure"
        self._move(cmd, new, error=error, result=result)
        return cmd

    async def cancel(self, command_id: str) -> DeviceCommand:
        cmd = await self.get(command_id)
        if cmd.terminal:
            raise IllegalTransition(f"command {command_id} is already {cmd.status}")
        if cmd.status is S.PENDING:
            self._move(cmd, S.CANCELLED, error="cancelled before delivery")
            return cmd
        cmd.cancel_requested = True
        self._mark(cmd)
        if self.transport.mode(cmd.device) == "poll":
            self._cancels.setdefault(cmd.device, []).append(cmd.id)
            self._poll_wake_device(cmd.device)
            return cmd
        try:
            confirmed = await self.transport.cancel(cmd)
        except Exception as exc:
            log.warning("command %s: sending the cancel failed: %s", cmd.id, exc)
            confirmed = False
        if confirmed and not cmd.terminal:
            self._move(cmd, S.CANCELLED, error="cancelled by request")
        return cmd

    # -- HTTP long-poll (poll transports) -------------------------------------------------------
    async def poll(self, device: str, wait: float = 0.0) -> dict[str, Any]:
        """Hand a polling device its pending commands (→ sent) and pending cancels."""
        with trio.move_on_after(wait):
            while not self._pollable(device):
                ev = self._poll_wake.setdefault(device, trio.Event())
                await ev.wait()
        out = []
        for cid in list(self._queues.get(device, ())):
            cmd = self.commands.get(cid)
            if cmd is None or cmd.status is not S.PENDING:
                continue
            self._move(cmd, S.SENT)
            self.dispatched += 1
            out.append(
                {"id": cmd.id, "type": cmd.type, "params": cmd.params, "deadline": cmd.deadline}
            )
        self._queues.pop(device, None)
        cancels = self._cancels.pop(device, [])
        return {"commands": out, "cancel": cancels}

    def _pollable(self, device: str) -> bool:
        if self._cancels.get(device):
            return True
        return any(
            (c := self.commands.get(cid)) is not None and c.status is S.PENDING
            for cid in self._queues.get(device, ())
        )

    # -- dispatch (push transports) --------------------------------------------------------------
    def _start_worker(self, device: str) -> None:
        if self._nursery is None or device in self._workers:
            return
        if self.transport.mode(device) == "poll":
            return
        self._workers.add(device)
        self._nursery.start_soon(self._worker, device)

    async def _sleep_or_kick(self, device: str, seconds: float) -> None:
        ev = self._kick.setdefault(device, trio.Event())
        with trio.move_on_after(max(0.0, seconds)):
            await ev.wait()

    async def _worker(self, device: str) -> None:
        queue = self._queues.setdefault(device, deque())
        try:
            while queue:
                cmd = self.commands.get(queue[0])
                if cmd is None or cmd.terminal:
                    queue.popleft()
                    continue
                if cmd.status is S.PENDING:
                    now = self.clock()
                    if cmd.next_attempt > now:
                        await self._sleep_or_kick(device, cmd.next_attempt - now)
                        continue
                    await self._deliver(cmd)
                    continue
                # sent / executing: one command in flight per device
                ev = self._done.setdefault(cmd.id, trio.Event())
                await ev.wait()
        finally:
            self._workers.discard(device)
            if not queue:
                self._queues.pop(device, None)

    async def _claimed(self, cmd: DeviceCommand) -> bool:
        """Cluster: the claim row is ours (or there is no cluster). A command that is not ours
        is let go here (its owner delivers it; ``wait`` follows it in the store)."""
        if self.claim is None:
            return True
        try:
            ok = await self.claim(cmd.id)
        except Exception as exc:
            log.warning("command %s: claiming it failed (%s); retrying", cmd.id, exc)
            cmd.next_attempt = self.clock() + 1.0
            return False
        if not ok:
            self.not_ours += 1
            log.info("command %s device %s: delivered by another engine", cmd.id, cmd.device)
            self._let_go(cmd.id)
        return ok

    def _let_go(self, command_id: str) -> None:
        cmd = self.commands.pop(command_id, None)
        if cmd is not None:
            self._dirty.pop(command_id, None)
            ev = self._done.pop(command_id, None)
            if ev is not None:
                ev.set()  # its waiters go on in the store

    def release(self, devices: Iterable[str]) -> int:
        """This engine no longer owns ``devices``: stop delivering their open commands (their new
        owner adopts them from the store). Sent commands keep their outcome there."""
        gone = set(devices)
        n = 0
        for cid in [c.id for c in self.commands.values() if c.device in gone and not c.terminal]:
            if cid in self._dirty:
                continue  # written by the next flush first; the next release takes it
            self._let_go(cid)
            n += 1
        for device in gone:
            self._queues.pop(device, None)
            self._wake_device(device)
        return n

    async def adopt(self) -> int:
        """Take the open commands of the devices this engine owns that it does not track yet
        (submitted on another engine, or left by an engine that died)."""
        rows = await self._call(self.store.open_commands, [str(s) for s in TERMINAL])
        n = 0
        for r in rows:
            if r.id in self.commands or not self.owns(r.device):
                continue
            cmd = DeviceCommand.from_record(r)
            if cmd.idempotency_key is not None:
                self._idem[(cmd.device, cmd.idempotency_key)] = cmd.id
            self._track(cmd)
            n += 1
        return n

    async def _deliver(self, cmd: DeviceCommand) -> None:
        if not await self._claimed(cmd):
            return
        cmd.attempts += 1
        try:
            result = SENT
            with trio.move_on_after(max(0.0, cmd.deadline - self.clock())) as scope:
                result = await self.transport.send(cmd)
            if scope.cancelled_caught:
                return  # the deadline watcher times it out
        except BindingError as exc:
            if cmd.terminal:
                return
            if isinstance(exc, BindingConnectError) and self.unclaim is not None:
                try:
                    await self.unclaim(cmd.id)
                except Exception as uexc:
                    log.warning("command %s: giving the claim back failed: %s", cmd.id, uexc)
            if exc.temporary:
                delay = self.retry.delay(cmd.attempts)
                cmd.next_attempt = self.clock() + delay
                log.warning(
                    "command %s device %s: transport failed (attempt %d), retry in %.1fs: %s",
                    cmd.id,
                    cmd.device,
                    cmd.attempts,
                    delay,
                    exc,
                )
                self._mark(cmd)
                return
            self._move(cmd, S.FAILED, error=str(exc))
            return
        except CommandError as exc:
            if not cmd.terminal:
                self._move(cmd, S.FAILED, error=str(exc))
            return
        except Exception as exc:
            log.exception("command %s: unexpected transport error", cmd.id)
            if not cmd.terminal:
                self._move(cmd, S.FAILED, error=f"{type(exc).__name__}: {exc}")
            return
        if cmd.terminal:  # timed out or cancelled meanwhile
            return
        self.dispatched += 1
        if cmd.status is S.PENDING:
            self._move(cmd, S.SENT)
        if result is not SENT:
            self._move(cmd, S.SUCCESS, result=result)

    def progress(self, command_id: str, status: str) -> None:
        """A transport saw the device's progress while delivering (e.g. MQTT ``executing``)."""
        cmd = self.commands.get(command_id)
        if cmd is None or cmd.terminal:
            return
        if cmd.status is S.PENDING:
            self._move(cmd, S.SENT)
        if status == S.EXECUTING and cmd.status is S.SENT:
            self._move(cmd, S.EXECUTING)

    # -- timeouts --------------------------------------------------------------------------------
    async def _deadlines(self) -> None:
        while True:
            while self._heap:
                deadline, _, cid = self._heap[0]
                cmd = self.commands.get(cid)
                if cmd is None or cmd.terminal:
                    heapq.heappop(self._heap)
                    continue
                now = self.clock()
                if deadline > now:
                    break
                heapq.heappop(self._heap)
                if cmd.cancel_requested:
                    self._move(
                        cmd,
                        S.CANCELLED,
                        error="device did not confirm the cancel before the deadline",
                    )
                else:
                    self._move(cmd, S.TIMEOUT, error=f"no outcome within {cmd.timeout:g}s")
            self._heap_wake = trio.Event()
            wait = self._heap[0][0] - self.clock() if self._heap else math.inf
            with trio.move_on_after(max(0.0, wait)):
                await self._heap_wake.wait()

    def _evict(self) -> None:
        if len(self.commands) <= self.finished_keep:
            return
        for cid in [c.id for c in self.commands.values() if c.terminal and c.id not in self._dirty]:
            del self.commands[cid]

    async def _janitor(self) -> None:
        while True:
            await trio.sleep(60)
            self._evict()

    # -- recovery and run ---------------------------------------------------------------------------
    async def recover(self) -> dict[str, int]:
        """Resume after a restart. Returns counts (resumed, timed_out, waiting)."""
        rows = await self._call(self.store.open_commands, [str(s) for s in TERMINAL])
        top = await self._call(self.store.max_command_seq)
        self._seq = itertools.count(top + 1)
        now = self.clock()
        counts = {"resumed": 0, "timed_out": 0, "waiting": 0}
        for r in rows:
            if not self.owns(r.device):
                continue  # another engine's (it recovers them)
            cmd = DeviceCommand.from_record(r)
            if cmd.idempotency_key is not None:
                self._idem[(cmd.device, cmd.idempotency_key)] = cmd.id
            if cmd.deadline <= now:
                self.commands[cmd.id] = cmd
                self._move(cmd, S.TIMEOUT, error="deadline passed while the engine was down")
                counts["timed_out"] += 1
                continue
            self._track(cmd)
            counts["resumed" if cmd.status is S.PENDING else "waiting"] += 1
        if rows:
            log.info("ledger: recovered %s", counts)
        return counts

    async def run(self, *, task_status: trio.TaskStatus[Ledger] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer)
                nursery.start_soon(self._deadlines)
                nursery.start_soon(self._janitor)
                await self.recover()
                for device in list(self._queues):
                    self._start_worker(device)
                task_status.started(self)
        finally:
            self._nursery = None
            with trio.move_on_after(5) as scope:
                scope.shield = True
                await self.flush()
