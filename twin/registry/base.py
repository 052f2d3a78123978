"""The registry: the source of truth for desired state, revisions and device status.

One ``Registry`` protocol, two implementations (``sqlite.py``, ``postgres.py``). The API is
synchronous; the Trio runtime calls it through ``trio.to_thread.run_sync``.

A *spec set* maps ``(kind, name)`` to a normalised document (plain JSON data:
``{"apiVersion", "kind", "metadata", "spec"}``). ``spec_hash`` is its content hash.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

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


@runtime_checkable
class Registry(Protocol):
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
