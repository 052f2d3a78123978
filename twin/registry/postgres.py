"""The PostgreSQL registry (psycopg 3), for when one machine is not enough.

URL: ``postgresql://user[:password]@host[:port]/db[?schema=NAME&libpq_param=...]``.
``schema`` is ours: the registry lives in that schema (created if missing, and put first on the
``search_path`` of every connection). Without it, the connection's default ``search_path``
applies (so libpq's ``options=-csearch_path%3DNAME`` also works). ``connect_timeout`` defaults
to 5 seconds.

- One connection per thread (autocommit off is emulated with explicit transactions).
- ``apply`` locks the single ``registry_head`` row (``SELECT ... FOR UPDATE``): a second apply
  on the same base waits for the first, then sees the moved head and raises ConflictError.
- Migrations run under ``pg_advisory_xact_lock`` keyed by the schema name, so concurrent opens
  of a fresh database are safe.
- Bulk writes of ``objects`` and ``devices`` go through ``COPY`` into temporary tables.
"""

from __future__ import annotations

import hashlib
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql as pgsql
from psycopg.types.json import Jsonb

from ..errors import RegistryError
from . import migrations
from ._sql import _DEVICE_COLS, _DEVICE_UPSERT_SET, SQLRegistry, _first_line


def redact(url: str) -> str:
    """``url`` without its password (safe to print and log)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def split_schema(url: str) -> tuple[str, str | None]:
    """Remove our ``schema=`` query parameter; return (libpq URL, schema or None)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = None
    rest = []
    for k, v in query:
        if k == "schema":
            schema = v or None
        else:
            rest.append((k, v))
    if not any(k == "connect_timeout" for k, _ in rest):
        rest.append(("connect_timeout", "5"))
    scheme = "postgresql" if parts.scheme == "postgres" else parts.scheme
    return urlunsplit(parts._replace(scheme=scheme, query=urlencode(rest))), schema


class PostgresRegistry(SQLRegistry):
    dialect = "postgresql"
    _db_error = psycopg.Error
    _integrity_error = psycopg.IntegrityError

    def __init__(self, url: str) -> None:
        super().__init__(redact(url))
        self._conninfo, self.schema = split_schema(url)
        self._migrate()

    # -- hooks ------------------------------------------------------------------------------
    def _connect(self) -> Any:
        try:
            conn = psycopg.connect(self._conninfo, autocommit=True)
        except psycopg.Error as exc:
            raise RegistryError(
                f"cannot connect to the registry at {self.url}: {_first_line(exc)}",
                hint="is PostgreSQL running and reachable? check the URL "
                "(--registry or TWIN_REGISTRY)",
            ) from exc
        try:
            if self.schema:
                ident = pgsql.Identifier(self.schema)
                conn.execute(pgsql.SQL("SET search_path TO {}").format(ident))
            conn.autocommit = False
        except psycopg.Error as exc:
            conn.close()
            raise RegistryError(f"registry {self.url}: {_first_line(exc)}") from exc
        return conn

    def _usable(self, conn: Any) -> bool:
        return not (conn.closed or conn.broken)

    def _begin_write(self, conn: Any) -> None:
        pass  # psycopg opens a transaction on the first statement (autocommit off)

    def _begin_read(self, conn: Any) -> None:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")

    def _lock_head(self, conn: Any) -> int:
        row = conn.execute("SELECT revision FROM registry_head WHERE id = 1 FOR UPDATE").fetchone()
        return int(row[0]) if row else 0

    def _sql(self, sql: str) -> str:
        return sql.replace("%", "%%").replace("?", "%s")

    def _tags_in(self, tags: list[str]) -> Any:
        return list(tags)

    def _tags_out(self, value: Any) -> list[str]:
        return list(value or [])

    def _json_in(self, value: Any) -> Any:
        return Jsonb(value)

    def _write_objects(self, conn: Any, rows: list[tuple[Any, ...]], upsert: bool) -> None:
        if upsert or len(rows) < 200:
            super()._write_objects(conn, rows, upsert)
            return
        with conn.cursor().copy(
            "COPY objects (kind, name, body, hash, created_rev, updated_rev) FROM STDIN"
        ) as copy:
            for row in rows:
                copy.write_row(row)

    def _write_devices(self, conn: Any, rows: list[tuple[Any, ...]]) -> None:
        if len(rows) < 200:
            super()._write_devices(conn, rows)
            return
        conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS devices_in "
            "(LIKE devices INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        conn.execute("TRUNCATE devices_in")
        with conn.cursor().copy(f"COPY devices_in ({_DEVICE_COLS}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        conn.execute(
            f"INSERT INTO devices ({_DEVICE_COLS}) SELECT {_DEVICE_COLS} FROM devices_in "
            f"ON CONFLICT (id) DO UPDATE SET {_DEVICE_UPSERT_SET}"
        )

    # -- schema -----------------------------------------------------------------------------
    def _migrate(self) -> None:
        lock_key = int.from_bytes(
            hashlib.sha256(f"flux-iot-registry:{self.schema or ''}".encode()).digest()[:8],
            "big",
            signed=True,
        )
        try:
            with self._borrow() as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key,))
                if self.schema:
                    conn.execute(
                        pgsql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
                            pgsql.Identifier(self.schema)
                        )
                    )
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version ("
                    "version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
                )
                migrations.upgrade(
                    conn,
                    self.url,
                    migrations.POSTGRES,
                    "INSERT INTO schema_version (version) VALUES (%s)",
                )
        except psycopg.Error as exc:
            raise RegistryError(f"registry {self.url}: {_first_line(exc)}") from exc

