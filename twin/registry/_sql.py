"""Shared implementation of the ``Registry`` protocol over a DB-API connection.

``SQLiteRegistry`` and ``PostgresRegistry`` differ only in how they connect, open a write
transaction, lock the head, and encode a few column types (tags, JSON, booleans). Everything
else — the apply algorithm, the materialisation of devices and groups, alarms, users ... — lives
here, so both backends behave identically and one test suite covers both.

SQL is written with ``?`` placeholders; the PostgreSQL dialect rewrites them to ``%s``.

Connections: one per thread (``threading.local``), created lazily. The registry is called from
Trio worker threads (``trio.to_thread.run_sync``) and from the CLI; a connection is never shared
between threads, and ``close()`` closes every connection the registry opened.

Times are unix seconds (``DOUBLE PRECISION`` / ``REAL``) on both backends, so rows read back
identically whatever the backend.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import threading
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from ..errors import ConflictError, NotFoundError, RegistryError
from . import migrations
from .base import (
    Alarm,
    ApiToken,
    AuditEntry,
    CommandRecord,
    DeviceKey,
    Key,
    MetricSample,
    Revision,
    SceneTrace,
    Session,
    SpecSet,
    StatusChange,
    User,
    canonical_json,
)
from .overrides import DesiredOverride, is_current
from .reports import ReportRun

log = logging.getLogger(__name__)

_REVISION_COLS = "number, hash, created_at, author, message, source, created, updated, deleted"
_ALARM_COLS = (
    "id, device, type, severity, message, state, raised_at, acked_at, acked_by, "
    "cleared_at, cleared_by"
)
_USER_COLS = "name, password_hash, role, sites, created_at, disabled, id, generation"
_SESSION_COLS = "id, user_name, token_hash, created_at, expires_at, revoked_at, client, user_id"
_TOKEN_COLS = "id, user_name, user_id, created_at, expires_at, revoked_at, note"
_KEY_COLS = "id, device, key_hash, created_at, revoked_at"
_AUDIT_COLS = "id, timestamp, actor, action, target, result, detail"
_COMMAND_COLS = (
    "id, seq, device, type, params, status, error, result, timeout, deadline, idempotency_key, "
    "attempts, source, batch, cancel_requested, created_at, updated_at, transitions"
)
_COMMAND_UPSERT_SET = (
    "status = excluded.status, error = excluded.error, result = excluded.result, "
    "timeout = excluded.timeout, deadline = excluded.deadline, attempts = excluded.attempts, "
    "cancel_requested = excluded.cancel_requested, updated_at = excluded.updated_at, "
    "transitions = excluded.transitions"
)
_TRACE_COLS = "run_id, scene, started_at, finished_at, status, trace"
_DEVICE_COLS = (
    "id, name, device_type, protocol, status, metadata, tags, group_id, created_at, "
    "updated_at, site, model, revision"
)
_DEVICE_UPSERT_SET = (
    "name = excluded.name, device_type = excluded.device_type, protocol = excluded.protocol, "
    "metadata = excluded.metadata, tags = excluded.tags, group_id = excluded.group_id, "
    "updated_at = excluded.updated_at, site = excluded.site, model = excluded.model, "
    "revision = excluded.revision"
)
_GROUP_UPSERT_SET = (
    "name = excluded.name, description = excluded.description, parent_id = excluded.parent_id, "
    "site = excluded.site, revision = excluded.revision"
)


def _as_dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


def _as_str_or_none(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def device_row(name: str, doc: Mapping[str, Any]) -> dict[str, Any]:
    """The materialised ``devices`` columns of a ``Device`` document (status excluded)."""
    meta = _as_dict(doc.get("metadata"))
    spec = _as_dict(doc.get("spec"))
    binding = spec.get("binding")
    if isinstance(binding, Mapping) and binding:
        protocol = "+".join(sorted(str(k) for k in binding))
    else:
        protocol = "none"
    tags = meta.get("tags") or []
    return {
        "id": name,
        "name": str(meta.get("name", name)),
        "device_type": str(spec.get("type", "custom")),
        "protocol": protocol,
        "metadata": _as_dict(meta.get("labels")),
        "tags": [str(t) for t in tags] if isinstance(tags, list) else [],
        "group_id": _as_str_or_none(meta.get("group")),
        "site": _as_str_or_none(meta.get("site")),
        "model": _as_str_or_none(spec.get("model")),
    }


def group_row(name: str, doc: Mapping[str, Any]) -> dict[str, Any]:
    """The materialised ``device_groups`` columns of a ``DeviceGroup`` document."""
    meta = _as_dict(doc.get("metadata"))
    spec = _as_dict(doc.get("spec"))
    desc = spec.get("description")
    return {
        "id": name,
        "name": str(meta.get("name", name)),
        "description": None if desc is None else str(desc),
        "parent_id": _as_str_or_none(spec.get("parent")),
        "site": _as_str_or_none(meta.get("site")),
    }


def pack_specs(specs: SpecSet, canon: Mapping[Key, str] | None = None) -> bytes:
    """The compressed canonical JSON of a spec set, as stored in ``revisions.specs``.

    ``[[kind, name, doc], ...]`` sorted by key; ``canon`` may hold each document's
    ``canonical_json`` already (apply computes it once for hashing).
    """
    parts = []
    for k, n in sorted(specs):
        body = canon[(k, n)] if canon is not None else canonical_json(specs[(k, n)])
        parts.append(f"[{canonical_json(k)},{canonical_json(n)},{body}]")
    return zlib.compress(f"[{','.join(parts)}]".encode(), 6)


def hash_specs(specs: SpecSet) -> tuple[str, dict[Key, str], dict[Key, str]]:
    """(spec_hash, per-document hashes, per-document canonical JSON), serialising once.

    Equal to ``base.spec_hash`` / ``base.doc_hash`` (a test checks it).
    """
    canon = {key: canonical_json(doc) for key, doc in specs.items()}
    hashes = {key: hashlib.sha256(text.encode()).hexdigest() for key, text in canon.items()}
    h = hashlib.sha256()
    for kind, name in sorted(specs):
        h.update(f"{kind}\0{name}\0".encode())
        h.update(hashes[(kind, name)].encode())
        h.update(b"\n")
    return h.hexdigest(), hashes, canon


def unpack_specs(blob: bytes) -> dict[Key, dict[str, Any]]:
    text = zlib.decompress(bytes(blob))
    # json.loads of ~10k documents allocates ~10^6 containers: the cyclic GC would walk them
    # repeatedly for nothing (nothing here can form a cycle); pausing it halves the time.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        items = json.loads(text)
        return {(k, n): doc for k, n, doc in items}
    finally:
        if was_enabled:
            gc.enable()



def _filtered(
    select: str,
    order: str,
    equal: Mapping[str, Any],
    any_of: tuple[str, Sequence[Any] | None] | None,
    since: tuple[str, float | None] | None,
    limit: int | None,
) -> tuple[str, list[Any]] | None:
    """``select`` with ``col = ?`` for each non-None value of ``equal``, ``col IN (...)`` for
    ``any_of`` (None: no filter; empty: matches nothing, so None is returned), ``col >= ?`` for
    ``since`` (None: no filter), then ``order`` and ``limit`` (None: no limit)."""
    clauses: list[str] = []
    params: list[Any] = []
    for col, value in equal.items():
        if value is not None:
            clauses.append(f"{col} = ?")
            params.append(value)
    if any_of is not None and any_of[1] is not None:
        col, values = any_of
        if not values:
            return None
        clauses.append(f"{col} IN ({', '.join('?' * len(values))})")
        params += list(values)
    if since is not None and since[1] is not None:
        clauses.append(f"{since[0]} >= ?")
        params.append(since[1])
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    sql = f"{select}{where} ORDER BY {order}"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return sql, params


class SQLRegistry:
    """Dialect-independent core. Subclasses implement the ``_`` hooks below."""

    url: str
    dialect: str = ""
    max_idle: int = 4  # connections kept open between calls
    # DB-API exception base of the driver, mapped to RegistryError
    _db_error: type[Exception] = Exception
    _integrity_error: type[Exception] = Exception

    def __init__(self, url: str) -> None:
        self.url = url
        self._idle: list[Any] = []
        self._pool_lock = threading.Lock()
        self._closed = False
        self._sql_cache: dict[str, str] = {}

    # -- hooks ------------------------------------------------------------------------------
    def _connect(self) -> Any:
        raise NotImplementedError

    def _begin_write(self, conn: Any) -> None:
        raise NotImplementedError

    def _begin_read(self, conn: Any) -> None:
        raise NotImplementedError

    def _lock_head(self, conn: Any) -> int:
        """Inside a write transaction: lock the head row, return the head revision number."""
        raise NotImplementedError

    def _sql(self, sql: str) -> str:
        return sql

    def _tags_in(self, tags: list[str]) -> Any:
        return canonical_json(tags)

    def _tags_out(self, value: Any) -> list[str]:
        return list(json.loads(value)) if value else []

    def _json_in(self, value: Any) -> Any:
        return canonical_json(value)

    def _json_out(self, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str | bytes) else value

    def _write_objects(self, conn: Any, rows: list[tuple[Any, ...]], upsert: bool) -> None:
        """Insert (or upsert) ``objects`` rows: (kind, name, body, hash, created, updated)."""
        sql = "INSERT INTO objects (kind, name, body, hash, created_rev, updated_rev) VALUES (?, ?, ?, ?, ?, ?)"
        if upsert:
            sql += (
                " ON CONFLICT (kind, name) DO UPDATE SET body = excluded.body, "
                "hash = excluded.hash, updated_rev = excluded.updated_rev"
            )
        self._many(conn, sql, rows)

    # -- plumbing -----------------------------------------------------------------------------
    def _usable(self, conn: Any) -> bool:
        """False if ``conn`` should not go back to the pool (closed or broken)."""
        return True

    @contextmanager
    def _borrow(self) -> Iterator[Any]:
        """A connection for this thread's exclusive use, returned to the pool afterwards.

        A small pool rather than a connection per thread: Trio's worker threads come and go,
        and thread-local connections would leak with them.
        """
        with self._pool_lock:
            if self._closed:
                raise RegistryError(f"registry {self.url} is closed")
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._connect()
        try:
            yield conn
        finally:
            with self._pool_lock:
                keep = not self._closed and len(self._idle) < self.max_idle and self._usable(conn)
                if keep:
                    self._idle.append(conn)
            if not keep:
                _close_quietly(conn)

    def close(self) -> None:
        """Close the idle connections; borrowed ones close when they come back."""
        with self._pool_lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            _close_quietly(conn)

    def __enter__(self) -> SQLRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def schema_version(self) -> int:
        with self._tx(write=False) as conn:
            return migrations.version(conn)

    def _q(self, sql: str) -> str:
        out = self._sql_cache.get(sql)
        if out is None:
            out = self._sql_cache[sql] = self._sql(sql)
        return out

    def _exec(self, conn: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        return conn.execute(self._q(sql), tuple(params))

    def _many(self, conn: Any, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            conn.cursor().executemany(self._q(sql), rows)

    def _all(self, conn: Any, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return list(self._exec(conn, sql, params).fetchall())

    def _one(self, conn: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._exec(conn, sql, params).fetchone()

    def _fetch_one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """The first row of one query in a read transaction (None: no row)."""
        with self._tx(write=False) as conn:
            return self._one(conn, sql, params)

    def _fetch_all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Every row of one query in a read transaction."""
        with self._tx(write=False) as conn:
            return self._all(conn, sql, params)

    def _select(
        self,
        select: str,
        order: str,
        *,
        equal: Mapping[str, Any] | None = None,
        any_of: tuple[str, Sequence[Any] | None] | None = None,
        since: tuple[str, float | None] | None = None,
        limit: int | None = None,
    ) -> list[Any]:
        """The rows of ``select`` filtered and ordered as ``_filtered`` says, in a read
        transaction (no rows when ``any_of`` lists no values)."""
        query = _filtered(select, order, equal or {}, any_of, since, limit)
        return [] if query is None else self._fetch_all(*query)

    @contextmanager
    def _tx(self, write: bool = True) -> Iterator[Any]:
        """One transaction on a pooled connection; driver errors become RegistryError."""
        try:
            with self._borrow() as conn:
                if write:
                    self._begin_write(conn)
                else:
                    self._begin_read(conn)
                try:
                    yield conn
                    conn.commit()
                except BaseException:
                    # also when COMMIT itself fails (a deferred FK): SQLite keeps the tx open
                    _rollback_quietly(conn)
                    raise
        except self._integrity_error as exc:
            raise RegistryError(
                f"registry {self.url}: integrity error: {_first_line(exc)}",
                hint="a reference points at an object that does not exist (run `twin validate`)",
            ) from exc
        except self._db_error as exc:
            raise RegistryError(f"registry {self.url}: {_first_line(exc)}") from exc

    # -- desired state and revisions ---------------------------------------------------------
    def head(self) -> Revision | None:
        row = self._fetch_one(
            f"SELECT {_REVISION_COLS} FROM revisions ORDER BY number DESC LIMIT 1"
        )
        return None if row is None else _revision(row)

    def specs(self, revision: int | None = None) -> dict[Key, dict[str, Any]]:
        with self._tx(write=False) as conn:
            if revision is None:
                revision = self._head_number(conn)
            if revision == 0:
                return {}
            row = self._one(conn, "SELECT specs FROM revisions WHERE number = ?", (revision,))
        if row is None:
            raise NotFoundError(
                f"no revision {revision}", hint="`twin history` lists the revisions"
            )
        return unpack_specs(row[0])

    def _head_number(self, conn: Any) -> int:
        row = self._one(conn, "SELECT revision FROM registry_head WHERE id = 1")
        return int(row[0]) if row else 0

    def apply(
        self,
        specs: SpecSet,
        *,
        base: int,
        author: str,
        message: str = "",
        source: str = "cli",
    ) -> Revision | None:
        new_hash, hashes, canon = hash_specs(specs)
        now = time.time()
        with self._tx(write=True) as conn:
            head = self._lock_head(conn)
            if head != base:
                raise ConflictError(
                    f"registry moved: planned against revision {base}, head is now {head}"
                )
            if head:
                row = self._one(conn, "SELECT hash FROM revisions WHERE number = ?", (head,))
                if row is not None and row[0] == new_hash:
                    return None
            elif not specs:
                return None
            number = head + 1
            current = {
                (k, n): h for k, n, h in self._all(conn, "SELECT kind, name, hash FROM objects")
            }
            created = [key for key in specs if key not in current]
            updated = [key for key in specs if key in current and current[key] != hashes[key]]
            deleted = [key for key in current if key not in specs]
            if not (created or updated or deleted):  # only possible if the head hash is stale
                return None
            self._write_changes(conn, canon, hashes, number, created, updated, deleted)
            dropped = self._drop_stale_overrides(conn, specs)
            self._materialise(conn, specs, number, now, created, updated, deleted)
            rev = Revision(
                number=number,
                hash=new_hash,
                created_at=now,
                author=author,
                message=message,
                source=source,
                created=len(created),
                updated=len(updated),
                deleted=len(deleted),
            )
            self._exec(
                conn,
                f"INSERT INTO revisions ({_REVISION_COLS}, objects, specs) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    rev.number,
                    rev.hash,
                    rev.created_at,
                    rev.author,
                    rev.message,
                    rev.source,
                    rev.created,
                    rev.updated,
                    rev.deleted,
                    len(specs),
                    pack_specs(specs, canon),
                ),
            )
            self._exec(conn, "UPDATE registry_head SET revision = ? WHERE id = 1", (number,))
        log.info(
            "registry: revision %d by %s (+%d ~%d -%d)%s",
            number,
            author,
            len(created),
            len(updated),
            len(deleted),
            f"; the new spec values replace {dropped} runtime override(s)" if dropped else "",
        )
        return rev

    def _drop_stale_overrides(self, conn: Any, specs: SpecSet) -> int:
        """Inside apply's transaction: drop the overrides whose spec value changes (the new
        spec value wins; see twin/registry/overrides.py)."""
        rows = self._all(conn, "SELECT device, property, spec_json FROM desired_overrides")
        gone = [
            (d, p)
            for d, p, sj in rows
            if not is_current(DesiredOverride(d, p, None, "", 0.0, sj), specs)
        ]
        self._many(conn, "DELETE FROM desired_overrides WHERE device = ? AND property = ?", gone)
        return len(gone)

    def _write_changes(
        self,
        conn: Any,
        canon: Mapping[Key, str],
        hashes: Mapping[Key, str],
        number: int,
        created: list[Key],
        updated: list[Key],
        deleted: list[Key],
    ) -> None:
        if deleted:
            self._many(conn, "DELETE FROM objects WHERE kind = ? AND name = ?", deleted)
        if created:
            self._write_objects(
                conn,
                [(k, n, canon[(k, n)], hashes[(k, n)], number, number) for k, n in created],
                upsert=False,
            )
        if updated:
            self._many(
                conn,
                "UPDATE objects SET body = ?, hash = ?, updated_rev = ? WHERE kind = ? AND name = ?",
                [(canon[(k, n)], hashes[(k, n)], number, k, n) for k, n in updated],
            )

    def _materialise(
        self,
        conn: Any,
        specs: SpecSet,
        number: int,
        now: float,
        created: list[Key],
        updated: list[Key],
        deleted: list[Key],
    ) -> None:
        """Mirror Device / DeviceGroup objects into the seed's devices / device_groups."""
        changed = created + updated
        gone_devices = [(n,) for k, n in deleted if k == "Device"]
        gone_groups = [(n,) for k, n in deleted if k == "DeviceGroup"]
        if gone_devices:
            self._many(conn, "DELETE FROM devices WHERE id = ?", gone_devices)
            # a device's keys die with it: one re-created under the same name never takes them
            self._many(
                conn,
                "UPDATE device_keys SET revoked_at = ? WHERE device = ? AND revoked_at IS NULL",
                [(now, n) for (n,) in gone_devices],
            )
        if gone_groups:
            self._many(conn, "DELETE FROM device_groups WHERE id = ?", gone_groups)
        groups = []
        for k, n in changed:
            if k != "DeviceGroup":
                continue
            g = group_row(n, specs[(k, n)])
            groups.append(
                (g["id"], g["name"], g["description"], g["parent_id"], now, g["site"], number)
            )
        if groups:
            self._many(
                conn,
                "INSERT INTO device_groups (id, name, description, parent_id, created_at, site, "
                f"revision) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                f"{_GROUP_UPSERT_SET}",
                groups,
            )
        devices = []
        for k, n in changed:
            if k != "Device":
                continue
            d = device_row(n, specs[(k, n)])
            devices.append(
                (
                    d["id"],
                    d["name"],
                    d["device_type"],
                    d["protocol"],
                    "offline",
                    self._json_in(d["metadata"]),
                    self._tags_in(d["tags"]),
                    d["group_id"],
                    now,
                    now,
                    d["site"],
                    d["model"],
                    number,
                )
            )
        if devices:
            self._write_devices(conn, devices)

    def _write_devices(self, conn: Any, rows: list[tuple[Any, ...]]) -> None:
        self._many(
            conn,
            f"INSERT INTO devices ({_DEVICE_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            f"ON CONFLICT (id) DO UPDATE SET {_DEVICE_UPSERT_SET}",
            rows,
        )

    def history(self, limit: int = 50) -> list[Revision]:
        rows = self._fetch_all(
            f"SELECT {_REVISION_COLS} FROM revisions ORDER BY number DESC LIMIT ?", (limit,)
        )
        return [_revision(r) for r in rows]

    def revision(self, number: int) -> Revision:
        row = self._fetch_one(f"SELECT {_REVISION_COLS} FROM revisions WHERE number = ?", (number,))
        if row is None:
            raise NotFoundError(f"no revision {number}", hint="`twin history` lists the revisions")
        return _revision(row)

    def last_changed(self, kind: str, name: str) -> int | None:
        row = self._fetch_one(
            "SELECT updated_rev FROM objects WHERE kind = ? AND name = ?", (kind, name)
        )
        return None if row is None else int(row[0])

    # -- runtime state -----------------------------------------------------------------------
    def device_rows(self, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        sql = f"SELECT {_DEVICE_COLS} FROM devices"
        with self._tx(write=False) as conn:
            if names is None:
                rows = self._all(conn, sql + " ORDER BY id")
            else:
                rows = []
                wanted = list(dict.fromkeys(names))
                for i in range(0, len(wanted), 500):
                    chunk = wanted[i : i + 500]
                    marks = ", ".join("?" * len(chunk))
                    rows += self._all(conn, f"{sql} WHERE id IN ({marks})", chunk)
                rows.sort(key=lambda r: r[0])
        cols = [c.strip() for c in _DEVICE_COLS.split(",")]
        out = []
        for r in rows:
            d = dict(zip(cols, r, strict=True))
            d["metadata"] = self._json_out(d["metadata"]) or {}
            d["tags"] = self._tags_out(d["tags"])
            out.append(d)
        return out

    def set_device_status(
        self, device: str, status: str, timestamp: float, metadata: Mapping[str, Any] | None = None
    ) -> None:
        with self._tx(write=True) as conn:
            cur = self._exec(
                conn,
                "UPDATE devices SET status = ?, updated_at = ? WHERE id = ?",
                (status, timestamp, device),
            )
            if cur.rowcount == 0:
                raise NotFoundError(f"no device {device!r} in the registry")
            self._exec(
                conn,
                "INSERT INTO device_status_history (device_id, status, timestamp, metadata) "
                "VALUES (?, ?, ?, ?)",
                (device, status, timestamp, self._json_in(dict(metadata or {}))),
            )

    def status_history(
        self, device: str, *, since: float | None = None, limit: int = 100
    ) -> list[StatusChange]:
        rows = self._select(
            "SELECT device_id, status, timestamp, metadata FROM device_status_history",
            "timestamp DESC, id DESC",
            equal={"device_id": device},
            since=("timestamp", since),
            limit=limit,
        )
        return [StatusChange(d, s, float(t), self._json_out(m) or {}) for d, s, t, m in rows]

    def last_status_changes(self, names: Sequence[str] | None = None) -> dict[str, StatusChange]:
        sql = (
            "SELECT device_id, status, timestamp, metadata FROM ("
            "SELECT device_id, status, timestamp, metadata, ROW_NUMBER() OVER ("
            "PARTITION BY device_id ORDER BY timestamp DESC, id DESC) AS rn "
            "FROM device_status_history{where}) AS h WHERE rn = 1"
        )
        with self._tx(write=False) as conn:
            if names is None:
                rows = self._all(conn, sql.format(where=""), ())
            else:
                rows = []
                wanted = list(dict.fromkeys(names))
                for i in range(0, len(wanted), 500):
                    chunk = wanted[i : i + 500]
                    marks = ", ".join("?" * len(chunk))
                    rows += self._all(
                        conn, sql.format(where=f" WHERE device_id IN ({marks})"), chunk
                    )
        return {
            d: StatusChange(d, s, float(t), self._json_out(m) or {}) for d, s, t, m in rows
        }

    def record_metrics(self, samples: Sequence[MetricSample]) -> None:
        if not samples:
            return
        with self._tx(write=True) as conn:
            self._many(
                conn,
                "INSERT INTO device_metrics (device_id, metric_name, metric_value, timestamp) "
                "VALUES (?, ?, ?, ?)",
                [(s.device, s.name, float(s.value), s.timestamp) for s in samples],
            )

    def metrics(
        self,
        device: str,
        *,
        names: Sequence[str] | None = None,
        since: float | None = None,
        limit: int = 1000,
    ) -> list[MetricSample]:
        rows = self._select(
            "SELECT device_id, metric_name, metric_value, timestamp FROM device_metrics",
            "timestamp DESC, id DESC",
            equal={"device_id": device},
            any_of=("metric_name", names),
            since=("timestamp", since),
            limit=limit,
        )
        return [MetricSample(d, n, float(v), float(t)) for d, n, v, t in rows]

    # -- alarms ----------------------------------------------------------------------------
    def raise_alarm(
        self, device: str, type: str, severity: str, message: str, timestamp: float
    ) -> tuple[Alarm, bool]:
        with self._tx(write=True) as conn:
            row = self._one(
                conn,
                "INSERT INTO alarms (device, type, severity, message, state, raised_at) "
                "VALUES (?, ?, ?, ?, 'active', ?) "
                "ON CONFLICT (device, type) WHERE state <> 'cleared' DO NOTHING "
                f"RETURNING {_ALARM_COLS}",
                (device, type, severity, message, timestamp),
            )
            if row is not None:
                return _alarm(row), True
            row = self._one(
                conn,
                f"SELECT {_ALARM_COLS} FROM alarms WHERE device = ? AND type = ? "
                "AND state <> 'cleared'",
                (device, type),
            )
        if row is None:  # pragma: no cover - the unique index guarantees a row
            raise RegistryError(f"alarm {device}/{type} vanished while raising it")
        return _alarm(row), False

    def _alarm_update(self, alarm_id: int, sql: str, params: Sequence[Any]) -> Alarm:
        with self._tx(write=True) as conn:
            self._exec(conn, sql, (*params, alarm_id))
            row = self._one(conn, f"SELECT {_ALARM_COLS} FROM alarms WHERE id = ?", (alarm_id,))
        if row is None:
            raise NotFoundError(f"no alarm {alarm_id}")
        return _alarm(row)

    def ack_alarm(self, alarm_id: int, by: str, timestamp: float) -> Alarm:
        return self._alarm_update(
            alarm_id,
            "UPDATE alarms SET state = 'acknowledged', acked_at = ?, acked_by = ? "
            "WHERE state = 'active' AND id = ?",
            (timestamp, by),
        )

    def clear_alarm(self, alarm_id: int, by: str, timestamp: float) -> Alarm:
        return self._alarm_update(
            alarm_id,
            "UPDATE alarms SET state = 'cleared', cleared_at = ?, cleared_by = ? "
            "WHERE state <> 'cleared' AND id = ?",
            (timestamp, by),
        )

    def clear_alarms(self, device: str, type: str, by: str, timestamp: float) -> list[Alarm]:
        with self._tx(write=True) as conn:
            rows = self._all(
                conn,
                "UPDATE alarms SET state = 'cleared', cleared_at = ?, cleared_by = ? "
                f"WHERE device = ? AND type = ? AND state <> 'cleared' RETURNING {_ALARM_COLS}",
                (timestamp, by, device, type),
            )
        return sorted((_alarm(r) for r in rows), key=lambda a: a.id, reverse=True)

    def alarms(
        self,
        *,
        device: str | None = None,
        states: Sequence[str] | None = None,
        limit: int = 100,
    ) -> list[Alarm]:
        rows = self._select(
            f"SELECT {_ALARM_COLS} FROM alarms",
            "id DESC",
            equal={"device": device},
            any_of=("state", states),
            limit=limit,
        )
        return [_alarm(r) for r in rows]

    # -- users, sessions, device keys, audit ------------------------------------------------
    def put_user(self, user: User) -> None:
        """Create or replace. A replaced user takes the new record's id and generation: a
        user created again (``twin user add`` over an existing name) does not inherit the
        old one's tokens."""
        with self._tx(write=True) as conn:
            self._exec(
                conn,
                f"INSERT INTO users ({_USER_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET password_hash = excluded.password_hash, "
                "role = excluded.role, sites = excluded.sites, created_at = excluded.created_at, "
                "disabled = excluded.disabled, id = excluded.id, "
                "generation = excluded.generation",
                (
                    user.name,
                    user.password_hash,
                    user.role,
                    self._tags_in(list(user.sites)),
                    user.created_at,
                    bool(user.disabled),
                    user.id,
                    int(user.generation),
                ),
            )

    def _user(self, row: Any) -> User:
        name, pw, role, sites, created, disabled, uid, gen = row
        return User(
            name,
            pw,
            role,
            tuple(self._tags_out(sites)),
            float(created),
            bool(disabled),
            str(uid),
            int(gen),
        )

    def get_user(self, name: str) -> User | None:
        row = self._fetch_one(f"SELECT {_USER_COLS} FROM users WHERE name = ?", (name,))
        return None if row is None else self._user(row)

    def users(self) -> list[User]:
        rows = self._fetch_all(f"SELECT {_USER_COLS} FROM users ORDER BY name")
        return [self._user(r) for r in rows]

    def delete_user(self, name: str) -> None:
        with self._tx(write=True) as conn:
            # explicit, not only ON DELETE CASCADE: a SQLite connection opened without
            # foreign keys must not leave a re-created user's name with the old rows
            self._exec(conn, "DELETE FROM api_tokens WHERE user_name = ?", (name,))
            self._exec(conn, "DELETE FROM sessions WHERE user_name = ?", (name,))
            self._exec(conn, "DELETE FROM users WHERE name = ?", (name,))

    def set_user_disabled(self, name: str, disabled: bool) -> bool:
        with self._tx(write=True) as conn:
            cur = self._exec(
                conn, "UPDATE users SET disabled = ? WHERE name = ?", (bool(disabled), name)
            )
            return bool(cur.rowcount)

    def revoke_user_credentials(self, name: str, timestamp: float) -> int | None:
        with self._tx(write=True) as conn:
            cur = self._exec(
                conn, "UPDATE users SET generation = generation + 1 WHERE name = ?", (name,)
            )
            if not cur.rowcount:
                return None
            self._exec(
                conn,
                "UPDATE sessions SET revoked_at = ? WHERE user_name = ? AND revoked_at IS NULL",
                (timestamp, name),
            )
            self._exec(
                conn,
                "UPDATE api_tokens SET revoked_at = ? WHERE user_name = ? AND revoked_at IS NULL",
                (timestamp, name),
            )
            row = self._one(conn, "SELECT generation FROM users WHERE name = ?", (name,))
        return int(row[0])

    def _insert_for_user(
        self, user: str, table: str, cols: str, values: Sequence[Any]
    ) -> None:
        """Insert a credential row (``cols``: its columns) of ``user``, who must exist."""
        with self._tx(write=True) as conn:
            if self._one(conn, "SELECT 1 FROM users WHERE name = ?", (user,)) is None:
                raise NotFoundError(f"no user {user!r}")
            marks = ", ".join("?" * len(values))
            self._exec(conn, f"INSERT INTO {table} ({cols}) VALUES ({marks})", values)

    def create_session(self, session: Session) -> None:
        s = session
        self._insert_for_user(
            s.user,
            "sessions",
            _SESSION_COLS,
            (s.id, s.user, s.token_hash, s.created_at, s.expires_at, s.revoked_at, s.client,
             s.user_id),
        )  # fmt: skip

    def get_session(self, session_id: str) -> Session | None:
        row = self._fetch_one(f"SELECT {_SESSION_COLS} FROM sessions WHERE id = ?", (session_id,))
        return None if row is None else _session(row)

    def revoke_session(self, session_id: str, timestamp: float) -> None:
        with self._tx(write=True) as conn:
            self._exec(
                conn,
                "UPDATE sessions SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (timestamp, session_id),
            )

    def sessions(self, user: str | None = None) -> list[Session]:
        rows = self._select(
            f"SELECT {_SESSION_COLS} FROM sessions", "created_at, id", equal={"user_name": user}
        )
        return [_session(r) for r in rows]

    def add_api_token(self, token: ApiToken) -> None:
        t = token
        self._insert_for_user(
            t.user,
            "api_tokens",
            _TOKEN_COLS,
            (t.id, t.user, t.user_id, t.created_at, t.expires_at, t.revoked_at, t.note),
        )

    def get_api_token(self, token_id: str) -> ApiToken | None:
        row = self._fetch_one(f"SELECT {_TOKEN_COLS} FROM api_tokens WHERE id = ?", (token_id,))
        return None if row is None else _api_token(row)

    def api_tokens(self, user: str | None = None) -> list[ApiToken]:
        rows = self._select(
            f"SELECT {_TOKEN_COLS} FROM api_tokens", "created_at, id", equal={"user_name": user}
        )
        return [_api_token(r) for r in rows]

    def revoke_api_token(self, token_id: str, timestamp: float) -> bool:
        with self._tx(write=True) as conn:
            self._exec(
                conn,
                "UPDATE api_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (timestamp, token_id),
            )
            row = self._one(conn, "SELECT 1 FROM api_tokens WHERE id = ?", (token_id,))
        return row is not None

    def add_device_key(self, key: DeviceKey) -> None:
        with self._tx(write=True) as conn:
            self._exec(
                conn,
                f"INSERT INTO device_keys ({_KEY_COLS}) VALUES (?, ?, ?, ?, ?)",
                (key.id, key.device, key.key_hash, key.created_at, key.revoked_at),
            )

    def device_keys(self, device: str) -> list[DeviceKey]:
        rows = self._fetch_all(
            f"SELECT {_KEY_COLS} FROM device_keys WHERE device = ? ORDER BY created_at, id",
            (device,),
        )
        return [
            DeviceKey(i, d, h, float(c), None if r is None else float(r)) for i, d, h, c, r in rows
        ]

    def revoked_device_keys(self, since: float) -> list[str]:
        rows = self._fetch_all(
            "SELECT id FROM device_keys WHERE revoked_at IS NOT NULL AND revoked_at >= ? "
            "ORDER BY id",
            (since,),
        )
        return [str(r[0]) for r in rows]

    def revoke_device_key(self, key_id: str, timestamp: float) -> None:
        with self._tx(write=True) as conn:
            self._exec(
                conn,
                "UPDATE device_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (timestamp, key_id),
            )

    def audit(
        self,
        actor: str,
        action: str,
        target: str,
        result: str,
        timestamp: float,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        with self._tx(write=True) as conn:
            self._exec(
                conn,
                "INSERT INTO audit_log (timestamp, actor, action, target, result, detail) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (timestamp, actor, action, target, result, self._json_in(dict(detail or {}))),
            )

    def audit_log(self, *, actor: str | None = None, limit: int = 100) -> list[AuditEntry]:
        rows = self._select(
            f"SELECT {_AUDIT_COLS} FROM audit_log", "id DESC", equal={"actor": actor}, limit=limit
        )
        return [
            AuditEntry(int(i), float(t), a, ac, tg, r, self._json_out(d) or {})
            for i, t, a, ac, tg, r, d in rows
        ]

    # -- command ledger and scene traces ----------------------------------------------------
    def _command_params(self, c: CommandRecord) -> tuple[Any, ...]:
        return (
            c.id,
            c.seq,
            c.device,
            c.type,
            self._json_in(dict(c.params)),
            c.status,
            c.error,
            None if c.result is None else self._json_in(c.result),
            c.timeout,
            c.deadline,
            c.idempotency_key,
            c.attempts,
            c.source,
            c.batch,
            bool(c.cancel_requested),
            c.created_at,
            c.updated_at,
            self._json_in([list(t) for t in c.transitions]),
        )

    def _command(self, row: Any) -> CommandRecord:
        (i, seq, dev, typ, params, status, error, result, timeout, deadline, key, attempts,
         source, batch, cancel, created, updated, transitions) = row
        return CommandRecord(
            id=i,
            seq=int(seq),
            device=dev,
            type=typ,
            params=self._json_out(params) or {},
            status=status,
            error=error,
            result=None if result is None else self._json_out(result),
            timeout=float(timeout),
            deadline=float(deadline),
            idempotency_key=key,
            attempts=int(attempts),
            source=source or "",
            batch=batch,
            cancel_requested=bool(cancel),
            created_at=float(created),
            updated_at=float(updated),
            transitions=tuple((str(s), float(t)) for s, t in self._json_out(transitions) or []),
        )

    def insert_command(self, command: CommandRecord) -> tuple[CommandRecord, bool]:
        marks = ", ".join("?" * 18)
        with self._tx(write=True) as conn:
            if command.idempotency_key is not None:
                row = self._one(
                    conn,
                    f"SELECT {_COMMAND_COLS} FROM commands WHERE device = ? "
                    "AND idempotency_key = ?",
                    (command.device, command.idempotency_key),
                )
                if row is not None:
                    return self._command(row), False
            self._exec(
                conn,
                f"INSERT INTO commands ({_COMMAND_COLS}) VALUES ({marks})",
                self._command_params(command),
            )
        return command, True

    def save_commands(self, commands: Sequence[CommandRecord]) -> None:
        if not commands:
            return
        marks = ", ".join("?" * 18)
        with self._tx(write=True) as conn:
            self._many(
                conn,
                f"INSERT INTO commands ({_COMMAND_COLS}) VALUES ({marks}) "
                f"ON CONFLICT (id) DO UPDATE SET {_COMMAND_UPSERT_SET}",
                [self._command_params(c) for c in commands],
            )

    def get_command(self, command_id: str) -> CommandRecord | None:
        row = self._fetch_one(f"SELECT {_COMMAND_COLS} FROM commands WHERE id = ?", (command_id,))
        return None if row is None else self._command(row)

    def commands(
        self,
        *,
        device: str | None = None,
        statuses: Sequence[str] | None = None,
        batch: str | None = None,
        limit: int = 100,
    ) -> list[CommandRecord]:
        rows = self._select(
            f"SELECT {_COMMAND_COLS} FROM commands",
            "seq DESC",
            equal={"device": device, "batch": batch},
            any_of=("status", statuses),
            limit=limit,
        )
        return [self._command(r) for r in rows]

    def open_commands(self, terminal: Sequence[str]) -> list[CommandRecord]:
        sql = f"SELECT {_COMMAND_COLS} FROM commands"
        if terminal:
            sql += f" WHERE status NOT IN ({', '.join('?' * len(terminal))})"
        sql += " ORDER BY seq"
        rows = self._fetch_all(sql, list(terminal))
        return [self._command(r) for r in rows]

    def max_command_seq(self) -> int:
        row = self._fetch_one("SELECT MAX(seq) FROM commands")
        return int(row[0] or 0) if row else 0

    def save_scene_trace(self, trace: SceneTrace) -> None:
        with self._tx(write=True) as conn:
            self._exec(
                conn,
                f"INSERT INTO scene_traces ({_TRACE_COLS}) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (run_id) DO UPDATE SET finished_at = excluded.finished_at, "
                "status = excluded.status, trace = excluded.trace",
                (
                    trace.run_id,
                    trace.scene,
                    trace.started_at,
                    trace.finished_at,
                    trace.status,
                    self._json_in(dict(trace.trace)),
                ),
            )

    def _trace(self, row: Any) -> SceneTrace:
        r, s, st, fin, status, body = row
        return SceneTrace(r, s, float(st), _opt_float(fin), status, self._json_out(body) or {})

    def scene_traces(self, scene: str | None = None, *, limit: int = 20) -> list[SceneTrace]:
        rows = self._select(
            f"SELECT {_TRACE_COLS} FROM scene_traces", "id DESC", equal={"scene": scene},
            limit=limit,
        )
        return [self._trace(r) for r in rows]

    def scene_trace(self, run_id: str) -> SceneTrace | None:
        row = self._fetch_one(f"SELECT {_TRACE_COLS} FROM scene_traces WHERE run_id = ?", (run_id,))
        return None if row is None else self._trace(row)


    # -- runtime desired-state overrides ----------------------------------------------------
    def set_override(self, override: DesiredOverride) -> None:
        with self._tx(write=True) as conn:
            self._exec(
                conn,
                "INSERT INTO desired_overrides (device, property, value, set_by, set_at, "
                "spec_json) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (device, property) DO UPDATE "
                "SET value = excluded.value, set_by = excluded.set_by, "
                "set_at = excluded.set_at, spec_json = excluded.spec_json",
                (
                    override.device,
                    override.prop,
                    canonical_json(override.value),
                    override.set_by,
                    override.set_at,
                    override.spec_json,
                ),
            )

    def clear_override(self, device: str, prop: str) -> bool:
        with self._tx(write=True) as conn:
            cur = self._exec(
                conn,
                "DELETE FROM desired_overrides WHERE device = ? AND property = ?",
                (device, prop),
            )
            return bool(cur.rowcount)

    def overrides(self, device: str | None = None) -> list[DesiredOverride]:
        rows = self._select(
            "SELECT device, property, value, set_by, set_at, spec_json FROM desired_overrides",
            "device, property",
            equal={"device": device},
        )
        return [
            DesiredOverride(d, p, json.loads(v), by, float(at), sj)
            for d, p, v, by, at, sj in rows
        ]

    # -- report runs ------------------------------------------------------------------------
    _RUN_COLS = ("id, report, site, trigger, status, started_at, finished_at, scheduled_for, "
                 "period, artifacts, deliveries, error")

    def save_report_run(self, run: ReportRun) -> None:
        """Insert or update (by id) a report run."""
        with self._tx(write=True) as conn:
            self._exec(
                conn,
                f"INSERT INTO report_runs ({self._RUN_COLS}) VALUES "
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                "status = excluded.status, finished_at = excluded.finished_at, "
                "period = excluded.period, artifacts = excluded.artifacts, "
                "deliveries = excluded.deliveries, error = excluded.error",
                (
                    run.id, run.report, run.site, run.trigger, run.status, run.started_at,
                    run.finished_at, run.scheduled_for, json.dumps(dict(run.period)),
                    json.dumps([dict(a) for a in run.artifacts]),
                    json.dumps([dict(d) for d in run.deliveries]), run.error,
                ),
            )

    def report_runs(self, report: str | None = None, *, limit: int = 50) -> list[ReportRun]:
        """Newest first."""
        rows = self._select(
            f"SELECT {self._RUN_COLS} FROM report_runs", "started_at DESC, id DESC",
            equal={"report": report}, limit=limit,
        )
        return [_report_run(r) for r in rows]

    def report_run(self, run_id: str) -> ReportRun | None:
        row = self._fetch_one(f"SELECT {self._RUN_COLS} FROM report_runs WHERE id = ?", (run_id,))
        return None if row is None else _report_run(row)

    def last_scheduled_run(self, report: str) -> float | None:
        """The newest ``scheduled_for`` of a report's runs (None: never ran on schedule)."""
        row = self._fetch_one(
            "SELECT MAX(scheduled_for) FROM report_runs WHERE report = ?", (report,)
        )
        return None if row is None or row[0] is None else float(row[0])


def _close_quietly(conn: Any) -> None:
    try:
        conn.close()
    except Exception:  # nothing useful to do about it
        log.debug("registry: error closing a connection", exc_info=True)


def _rollback_quietly(conn: Any) -> None:
    try:
        conn.rollback()
    except Exception:  # the connection may be broken; the original error matters more
        log.debug("registry: rollback failed", exc_info=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _revision(row: Any) -> Revision:
    n, h, c, a, m, s, cr, up, de = row
    return Revision(int(n), h, float(c), a, m, s, int(cr), int(up), int(de))


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def _alarm(row: Any) -> Alarm:
    i, d, t, sev, msg, st, raised, acked, acked_by, cleared, cleared_by = row
    return Alarm(
        int(i),
        d,
        t,
        sev,
        msg,
        st,
        float(raised),
        _opt_float(acked),
        acked_by,
        _opt_float(cleared),
        cleared_by,
    )


def _session(row: Any) -> Session:
    i, u, h, c, e, r, cl, uid = row
    return Session(i, u, h, float(c), float(e), _opt_float(r), cl or "", uid or "")


def _api_token(row: Any) -> ApiToken:
    i, u, uid, c, e, r, note = row
    return ApiToken(i, u, uid, float(c), float(e), _opt_float(r), note or "")


def _report_run(row: Any) -> ReportRun:
    i, rep, site, trig, st, started, fin, sched, per, arts, dels, err = row
    return ReportRun(
        i, rep, site, trig, st, float(started), _opt_float(fin), _opt_float(sched),
        json.loads(per), tuple(json.loads(arts)), tuple(json.loads(dels)), err,
    )
