"""The registry: the source of truth for desired state, revisions and device status.

One ``Registry`` protocol, two implementations (``sqlite.py``, ``postgres.py``). The API is
synchronous; the Trio runtime calls it through ``trio.to_thread.run_sync``.

A *spec set* maps ``(kind, name)`` to a normalised document (plain JSON data:
``{"apiVersion", "kind", "metadata", "spec"}``). ``spec_hash`` is its content hash.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .overrides import DesiredOverride
    from .reports import ReportRun

Key = tuple[str, str]
"""``(kind, name)``"""

SpecSet = Mapping[Key, Mapping[str, Any]]


def canonical_json(value: Any) -> str:
    """Deterministic JSON (sorted keys, no spaces): what hashes are taken over."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def doc_hash(doc: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(doc).encode()).hexdigest()


def spec_hash(specs: SpecSet) -> str:
    """Content hash of a whole spec set, independent of insertion order."""
    h = hashlib.sha256()
    for kind, name in sorted(specs):
        h.update(f"{kind}\0{name}\0".encode())
        h.update(doc_hash(specs[(kind, name)]).encode())
        h.update(b"\n")
    return h.hexdigest()


@dataclass(frozen=True)
class Revision:
    number: int
    hash: str
    created_at: float  # unix seconds, UTC
    author: str
    message: str
    source: str  # "cli" | "api" | "rollback"
    created: int = 0  # objects created / updated / deleted by this revision
    updated: int = 0
    deleted: int = 0


@dataclass(frozen=True)
class StatusChange:
    device: str
    status: str
    timestamp: float
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricSample:
    device: str
    name: str
    value: float
    timestamp: float


@dataclass(frozen=True)
class Alarm:
    id: int
    device: str
    type: str  # "offline" | "fault" | ... free text for scene-raised alarms
    severity: str  # "critical" | "major" | "minor" | "warning" | "info"
    message: str
    state: str  # "active" | "acknowledged" | "cleared"
    raised_at: float
    acked_at: float | None = None
    acked_by: str | None = None
    cleared_at: float | None = None
    cleared_by: str | None = None


@dataclass(frozen=True)
class User:
    name: str
    password_hash: str
    role: str  # "viewer" | "operator" | "admin"
    sites: tuple[str, ...] = ()  # empty = all sites
    created_at: float = 0.0
    disabled: bool = False
    # A user's identity: a name deleted and created again is another user (a new ``id``), so
    # tokens of the old one stay dead. Bumping ``generation`` revokes every token of the user.
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    generation: int = 1


@dataclass(frozen=True)
class Session:
    """A refresh-token session; the token itself is only stored hashed."""

    id: str
    user: str
    token_hash: str
    created_at: float
    expires_at: float
    revoked_at: float | None = None
    client: str = ""
    user_id: str = ""  # the User.id it was opened for ("" : before schema 3, never valid)


@dataclass(frozen=True)
class ApiToken:
    """A long-lived access token (``twin token create``): listed and revoked by its id."""

    id: str
    user: str
    user_id: str
    created_at: float
    expires_at: float
    revoked_at: float | None = None
    note: str = ""


@dataclass(frozen=True)
class DeviceKey:
    id: str
    device: str
    key_hash: str
    created_at: float
    revoked_at: float | None = None


@dataclass(frozen=True)
class AuditEntry:
    id: int
    timestamp: float
    actor: str
    action: str  # e.g. "PUT /api/v1/devices/fan_01"
    target: str
    result: str  # e.g. "200" or "403"
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CommandRecord:
    """One row of the command ledger (twin/control/ledger.py owns the state machine)."""

    id: str
    seq: int
    device: str
    type: str
    params: Mapping[str, Any]
    status: str
    timeout: float
    deadline: float  # unix seconds: past it, a non-terminal command becomes ``timeout``
    created_at: float
    updated_at: float
    transitions: tuple[tuple[str, float], ...] = ()  # (status, unix seconds), oldest first
    error: str | None = None
    result: Any = None
    idempotency_key: str | None = None
    attempts: int = 0
    source: str = ""
    batch: str | None = None
    cancel_requested: bool = False


@dataclass(frozen=True)
class SceneTrace:
    run_id: str
    scene: str
    started_at: float
    finished_at: float | None
    status: str
    trace: Mapping[str, Any] = field(default_factory=dict)


class CommandStore(Protocol):
    """Where the command ledger (twin/control/ledger.py) keeps its commands: the registry, or
    the ledger's MemoryStore."""

    def insert_command(self, command: CommandRecord) -> tuple[CommandRecord, bool]:
        """Insert a new command. If (device, idempotency_key) exists, return that one, False."""

    def save_commands(self, commands: Sequence[CommandRecord]) -> None:
        """Insert or update (by id) every field of each command, in one transaction."""

    def get_command(self, command_id: str) -> CommandRecord | None: ...

    def commands(
        self,
        *,
        device: str | None = None,
        statuses: Sequence[str] | None = None,
        batch: str | None = None,
        limit: int = 100,
    ) -> list[CommandRecord]:
        """Newest first (by seq)."""

    def open_commands(self, terminal: Sequence[str]) -> list[CommandRecord]:
        """Every command whose status is not in ``terminal``, oldest first (by seq)."""

    def max_command_seq(self) -> int:
        """The highest seq used so far (0 for none)."""


@runtime_checkable
class Registry(CommandStore, Protocol):
    url: str

    def close(self) -> None: ...

    # -- desired state and revisions -------------------------------------------------------
    def head(self) -> Revision | None:
        """The newest revision, or None before the first apply."""

    def specs(self, revision: int | None = None) -> dict[Key, dict[str, Any]]:
        """The full spec set of a revision (default: head; empty before the first apply)."""

    def apply(
        self,
        specs: SpecSet,
        *,
        base: int,
        author: str,
        message: str = "",
        source: str = "cli",
    ) -> Revision | None:
        """Atomically make ``specs`` the new desired state.

        ``base`` is the head revision number the caller planned against (0 = empty registry).
        Raises ``ConflictError`` if the head moved meanwhile. Returns None (and writes nothing)
        when ``specs`` equals the head's content. Materialises devices and device_groups in the
        same transaction; a device's runtime status survives updates of its spec.
        """

    def history(self, limit: int = 50) -> list[Revision]:
        """Newest first."""

    def revision(self, number: int) -> Revision:
        """Raises NotFoundError."""

    def last_changed(self, kind: str, name: str) -> int | None:
        """The revision that last created or changed this object (None if absent)."""

    # -- runtime state -----------------------------------------------------------------------
    def device_rows(self, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Rows of the devices table (seed §1.4 columns plus site, model, revision)."""

    def set_device_status(
        self, device: str, status: str, timestamp: float, metadata: Mapping[str, Any] | None = None
    ) -> None:
        """Set devices.status and append to device_status_history (one transaction)."""

    def status_history(
        self, device: str, *, since: float | None = None, limit: int = 100
    ) -> list[StatusChange]:
        """Newest first."""

    def record_metrics(self, samples: Sequence[MetricSample]) -> None: ...

    def metrics(
        self,
        device: str,
        *,
        names: Sequence[str] | None = None,
        since: float | None = None,
        limit: int = 1000,
    ) -> list[MetricSample]:
        """Newest first."""

    # -- alarms ----------------------------------------------------------------------------
    def raise_alarm(
        self, device: str, type: str, severity: str, message: str, timestamp: float
    ) -> tuple[Alarm, bool]:
        """Raise an alarm unless one of the same (device, type) is active or acknowledged.

        Returns (alarm, created): the existing one with created=False when not cleared yet.
        """

    def ack_alarm(self, alarm_id: int, by: str, timestamp: float) -> Alarm: ...

    def clear_alarm(self, alarm_id: int, by: str, timestamp: float) -> Alarm: ...

    def clear_alarms(self, device: str, type: str, by: str, timestamp: float) -> list[Alarm]:
        """Clear every uncleared alarm of (device, type): automatic clearing on recovery."""

    def alarms(
        self,
        *,
        device: str | None = None,
        states: Sequence[str] | None = None,
        limit: int = 100,
    ) -> list[Alarm]:
        """Newest first."""

    # -- users, sessions, device keys, audit ------------------------------------------------
    def put_user(self, user: User) -> None:
        """Create or replace."""

    def get_user(self, name: str) -> User | None: ...

    def users(self) -> list[User]: ...

    def delete_user(self, name: str) -> None:
        """Delete the user, its sessions and its API tokens."""

    def set_user_disabled(self, name: str, disabled: bool) -> bool:
        """Disable (or enable again) a user; False if there is no such user."""

    def revoke_user_credentials(self, name: str, timestamp: float) -> int | None:
        """Revoke every token of a user at once: bump its generation (access tokens carry
        the generation they were issued for), revoke its sessions and API tokens. Returns
        the new generation, None if there is no such user."""

    def add_api_token(self, token: ApiToken) -> None: ...

    def get_api_token(self, token_id: str) -> ApiToken | None: ...

    def api_tokens(self, user: str | None = None) -> list[ApiToken]: ...

    def revoke_api_token(self, token_id: str, timestamp: float) -> bool:
        """False if there is no such token (revoking twice keeps the first time)."""

    def create_session(self, session: Session) -> None: ...

    def get_session(self, session_id: str) -> Session | None: ...

    def revoke_session(self, session_id: str, timestamp: float) -> None: ...

    def sessions(self, user: str | None = None) -> list[Session]: ...

    def add_device_key(self, key: DeviceKey) -> None: ...

    def device_keys(self, device: str) -> list[DeviceKey]:
        """All keys of a device, revoked ones included."""

    def revoke_device_key(self, key_id: str, timestamp: float) -> None: ...

    # Deleting a Device through ``apply`` (prune, the API, a rollback) revokes its keys in the
    # same transaction: a device created later under the same name never accepts them.

    def audit(
        self,
        actor: str,
        action: str,
        target: str,
        result: str,
        timestamp: float,
        detail: Mapping[str, Any] | None = None,
    ) -> None: ...

    def audit_log(self, *, actor: str | None = None, limit: int = 100) -> list[AuditEntry]:
        """Newest first."""

    # -- command ledger (CommandStore, above) and scene traces (twin/control) -------------------
    def save_scene_trace(self, trace: SceneTrace) -> None:
        """Insert or replace (by run_id) a scene run's trace."""

    def scene_traces(self, scene: str | None = None, *, limit: int = 20) -> list[SceneTrace]:
        """Newest first."""

    def scene_trace(self, run_id: str) -> SceneTrace | None: ...

    def last_status_changes(self, names: Sequence[str] | None = None) -> dict[str, StatusChange]:
        """The newest device_status_history row of every device that has one (or of ``names``),
        in one query: what the engine resumes from at start."""

    def revoked_device_keys(self, since: float) -> list[str]:
        """Ids of device keys revoked at or after ``since`` (for in-memory key caches)."""

    # -- runtime desired-state overrides (twin/registry/overrides.py) ------------------------
    def set_override(self, override: DesiredOverride) -> None:
        """Insert or replace the override of (device, property)."""

    def clear_override(self, device: str, prop: str) -> bool:
        """Remove the override of (device, property); False if there was none."""

    def overrides(self, device: str | None = None) -> list[DesiredOverride]:
        """Every override (or one device's), by device and property."""

    # -- report runs (twin/registry/reports.py) ---------------------------------------------
    def save_report_run(self, run: ReportRun) -> None:
        """Insert or update (by id) a report run."""

    def report_runs(self, report: str | None = None, *, limit: int = 50) -> list[ReportRun]:
        """Newest first."""

    def report_run(self, run_id: str) -> ReportRun | None: ...

    def last_scheduled_run(self, report: str) -> float | None:
        """The newest ``scheduled_for`` of a report's runs (None: never ran on schedule)."""
