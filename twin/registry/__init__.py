"""The registry: desired state, revisions, device status, alarms, users.

``open_registry(url, state_dir)`` picks the backend from the URL:

- ``None`` or ``""``: SQLite, ``<state_dir>/registry.db`` (default ``./.twin/registry.db``).
- ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db`` (SQLAlchemy's convention:
  three slashes then the path); a plain filesystem path works too. A directory means
  ``<dir>/registry.db``.
- ``postgresql://user:pw@host:5432/db`` or ``postgres://...``: PostgreSQL. Add ``?schema=NAME``
  to keep the registry in its own schema (created if missing); libpq's
  ``options=-csearch_path%3DNAME`` works too. Other query parameters go to libpq.

The ``TWIN_REGISTRY`` environment variable is read by the CLI, not here.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import RegistryError
from ..files import private_dir
from .base import (
    Alarm,
    ApiToken,
    AuditEntry,
    DeviceKey,
    Key,
    MetricSample,
    Registry,
    Revision,
    Session,
    SpecSet,
    StatusChange,
    User,
    canonical_json,
    doc_hash,
    spec_hash,
)
from .overrides import DesiredOverride

__all__ = [
    "Alarm",
    "ApiToken",
    "AuditEntry",
    "DesiredOverride",
    "DeviceKey",
    "Key",
    "MetricSample",
    "Registry",
    "Revision",
    "Session",
    "SpecSet",
    "StatusChange",
    "User",
    "canonical_json",
    "doc_hash",
    "open_registry",
    "spec_hash",
]


def open_registry(url: str | None = None, state_dir: str | Path = ".twin") -> Registry:
    """Open (and migrate) the registry at ``url``; see the module docstring for URL forms."""
    if not url:
        from .sqlite import DEFAULT_FILENAME, SQLiteRegistry

        private_dir(state_dir)  # the state directory: 0700 (tightened if an old one is not)
        return SQLiteRegistry(Path(state_dir) / DEFAULT_FILENAME)
    scheme, sep, rest = url.partition("://")
    if not sep:
        from .sqlite import SQLiteRegistry

        return SQLiteRegistry(Path(url))
    scheme = scheme.lower()
    if scheme == "sqlite":
        from .sqlite import DEFAULT_FILENAME, SQLiteRegistry

        # sqlite:///rel.db -> "rel.db"; sqlite:////abs.db -> "/abs.db"; sqlite:// -> state dir
        path = rest[1:] if rest.startswith("/") else rest
        if not path:
            private_dir(state_dir)
        return SQLiteRegistry(Path(path) if path else Path(state_dir) / DEFAULT_FILENAME)
    if scheme in ("postgresql", "postgres"):
        from .postgres import PostgresRegistry

        return PostgresRegistry(url)
    raise _unknown_scheme(url, scheme)


def _unknown_scheme(url: str, scheme: str) -> RegistryError:
    return RegistryError(
        f"unknown registry URL scheme {scheme!r}",
        hint="use a path or sqlite:///path/registry.db for SQLite, "
        "postgresql://user@host:5432/db for PostgreSQL",
    )
