"""The embedded registry: one SQLite file (``registry.db``) in the state directory.

- The file (and its ``-wal``/``-shm``) is 0600, a directory created for it 0700
  (``twin.files``).
- WAL journal, ``busy_timeout`` (default 30 s), foreign keys on, ``synchronous=NORMAL``.
- Thread-safety: one connection per thread (see ``_sql.SQLRegistry``); SQLite serialises
  writers itself. Write transactions start with ``BEGIN IMMEDIATE``, which takes the database's
  write lock up front, so the head check in ``apply`` and the write that follows cannot
  interleave with another apply (in this process or another one).
- Read transactions are plain ``BEGIN`` (a consistent WAL snapshot).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from ..errors import RegistryError
from ..files import private_dir, private_file, tighten_file
from . import migrations
from ._sql import SQLRegistry

DEFAULT_FILENAME = "registry.db"


class SQLiteRegistry(SQLRegistry):
    dialect = "sqlite"
    _db_error = sqlite3.Error
    _integrity_error = sqlite3.IntegrityError

    def __init__(self, path: str | Path, *, busy_timeout: float = 30.0) -> None:
        """``path`` is the database file; an existing directory (or a path ending in ``/``)
        means ``<dir>/registry.db``. Missing parent directories are created."""
        p = Path(path)
        if p.is_dir() or str(path).endswith(("/", "\\")):
            p = p / DEFAULT_FILENAME
        super().__init__(f"sqlite:///{p}")
        self.path = p
        self.busy_timeout = busy_timeout
        try:
            # a new directory is private (0700); the file and its -wal/-shm are 0600 (SQLite
            # gives the -wal and -shm it creates the database file's mode)
            private_dir(p.parent, tighten=False)
            private_file(p)
            for suffix in ("-wal", "-shm"):
                tighten_file(f"{p}{suffix}")
        except OSError as exc:
            raise RegistryError(
                f"cannot create the state directory {p.parent}: {exc.strerror}",
                hint="pick another state directory with --state-dir, or fix its permissions",
            ) from exc
        self._migrate()

    def _connect(self) -> Any:
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout,
                isolation_level=None,  # we issue BEGIN / COMMIT ourselves
                check_same_thread=False,  # only so that close() may run on any thread
            )
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            self._enable_wal(conn)
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as exc:
            raise RegistryError(
                f"cannot open the registry {self.path}: {exc}",
                hint="check the path and its permissions (is it a SQLite file?)",
            ) from exc
        return conn

    def _enable_wal(self, conn: Any) -> None:
        """Switch to WAL. On a fresh file, several processes opening at once race for the
        exclusive lock this needs, and SQLite answers "database is locked" at once, without
        its busy handler: retry with a short backoff, up to ``busy_timeout``."""
        deadline = time.monotonic() + self.busy_timeout
        delay = 0.005
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.2)

    def _begin_write(self, conn: Any) -> None:
        conn.execute("BEGIN IMMEDIATE")

    def _begin_read(self, conn: Any) -> None:
        conn.execute("BEGIN")

    def _lock_head(self, conn: Any) -> int:
        # BEGIN IMMEDIATE already holds the write lock
        return self._head_number(conn)

    def _migrate(self) -> None:
        with self._tx(write=True) as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                "version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
            )
            migrations.upgrade(
                conn,
                str(self.path),
                migrations.SQLITE,
                "INSERT INTO schema_version (version, applied_at) "
                "VALUES (?, strftime('%s', 'now'))",
            )
