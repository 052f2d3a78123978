"""Numbered schema migrations, one list per dialect.

Migration ``n`` is a list of statements; it is applied once, in order, inside the same
transaction that records ``n`` in ``schema_version``. Opening a registry applies whatever is
missing, under a lock (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: a transaction-level advisory
lock), so two processes opening a fresh registry at once are safe and re-opening is a no-op.

To change the schema, append a migration to *both* lists — never edit an applied one.

Tables follow the seed's §1.4 (devices, device_groups, device_status_history, device_metrics)
with ``site``, ``model`` and ``revision`` added to devices; desired state lives in ``objects``
(one row per spec document, for fast reads of head) and ``revisions`` (each with the full
normalised spec set, zlib-compressed canonical JSON). Times are unix seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import RegistryError

SQLITE: list[list[str]] = [
    # 1: initial schema
    [
        """CREATE TABLE registry_head (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            revision INTEGER NOT NULL
        )""",
        "INSERT INTO registry_head (id, revision) VALUES (1, 0)",
        """CREATE TABLE revisions (
            number INTEGER PRIMARY KEY,
            hash TEXT NOT NULL,
            created_at REAL NOT NULL,
            author TEXT NOT NULL,
            message TEXT NOT NULL DEFAULT '',
            source TEXT NOT NULL DEFAULT 'cli',
            created INTEGER NOT NULL DEFAULT 0,
            updated INTEGER NOT NULL DEFAULT 0,
            deleted INTEGER NOT NULL DEFAULT 0,
            objects INTEGER NOT NULL DEFAULT 0,
            specs BLOB NOT NULL
        )""",
        """CREATE TABLE objects (
            kind TEXT NOT NULL,
            name TEXT NOT NULL,
            body TEXT NOT NULL,
            hash TEXT NOT NULL,
            created_rev INTEGER NOT NULL,
            updated_rev INTEGER NOT NULL,
            PRIMARY KEY (kind, name)
        ) WITHOUT ROWID""",
        """CREATE TABLE device_groups (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            description TEXT,
            parent_id TEXT REFERENCES device_groups (id) DEFERRABLE INITIALLY DEFERRED,
            created_at REAL NOT NULL,
            site TEXT,
            revision INTEGER
        )""",
        """CREATE TABLE devices (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            device_type TEXT NOT NULL,
            protocol TEXT NOT NULL,
            status TEXT NOT NULL,
            metadata TEXT,
            tags TEXT,
            group_id TEXT REFERENCES device_groups (id) DEFERRABLE INITIALLY DEFERRED,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            site TEXT,
            model TEXT,
            revision INTEGER
        )""",
        "CREATE INDEX devices_group ON devices (group_id)",
        "CREATE INDEX device_groups_parent ON device_groups (parent_id)",
        """CREATE TABLE device_status_history (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            device_id TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
            status TEXT NOT NULL,
            timestamp REAL NOT NULL,
            metadata TEXT
        )""",
        "CREATE INDEX device_status_history_dev ON device_status_history (device_id, timestamp)",
        """CREATE TABLE device_metrics (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            device_id TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
            metric_name TEXT NOT NULL,
            metric_value REAL NOT NULL,
            timestamp REAL NOT NULL
        )""",
        "CREATE INDEX device_metrics_dev ON device_metrics (device_id, timestamp)",
        """CREATE TABLE alarms (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            device TEXT NOT NULL,
            type TEXT NOT NULL,
            severity TEXT NOT NULL,
            message TEXT NOT NULL,
            state TEXT NOT NULL,
            raised_at REAL NOT NULL,
            acked_at REAL,
            acked_by TEXT,
            cleared_at REAL,
            cleared_by TEXT
        )""",
        "CREATE UNIQUE INDEX alarms_open ON alarms (device, type) WHERE state <> 'cleared'",
        "CREATE INDEX alarms_device ON alarms (device)",
        """CREATE TABLE users (
            name TEXT PRIMARY KEY,
            password_hash TEXT NOT NULL,
            role TEXT NOT NULL,
            sites TEXT NOT NULL,
            created_at REAL NOT NULL,
            disabled INTEGER NOT NULL DEFAULT 0
        )""",
        """CREATE TABLE sessions (
            id TEXT PRIMARY KEY,
            user_name TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
            token_hash TEXT NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            revoked_at REAL,
            client TEXT NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX sessions_user ON sessions (user_name)",
        """CREATE TABLE device_keys (
            id TEXT PRIMARY KEY,
            device TEXT NOT NULL,
            key_hash TEXT NOT NULL,
            created_at REAL NOT NULL,
            revoked_at REAL
        )""",
        "CREATE INDEX device_keys_device ON device_keys (device)",
        """CREATE TABLE audit_log (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            timestamp REAL NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT NOT NULL,
            result TEXT NOT NULL,
            detail TEXT
        )""",
        "CREATE INDEX audit_log_actor ON audit_log (actor)",
    ],
    # 2: command ledger and scene traces (twin/control)
    [
        """CREATE TABLE commands (
            id TEXT PRIMARY KEY,
            seq INTEGER NOT NULL,
            device TEXT NOT NULL,
            type TEXT NOT NULL,
            params TEXT NOT NULL,
            status TEXT NOT NULL,
            error TEXT,
            result TEXT,
            timeout REAL NOT NULL,
            deadline REAL NOT NULL,
            idempotency_key TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            source TEXT NOT NULL DEFAULT '',
            batch TEXT,
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            transitions TEXT NOT NULL
        )""",
        "CREATE INDEX commands_device ON commands (device, seq)",
        "CREATE INDEX commands_status ON commands (status)",
        "CREATE INDEX commands_batch ON commands (batch)",
        "CREATE UNIQUE INDEX commands_idem ON commands (device, idempotency_key) "
        "WHERE idempotency_key IS NOT NULL",
        """CREATE TABLE scene_traces (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id TEXT NOT NULL UNIQUE,
            scene TEXT NOT NULL,
            started_at REAL NOT NULL,
            finished_at REAL,
            status TEXT NOT NULL,
            trace TEXT NOT NULL
        )""",
        "CREATE INDEX scene_traces_scene ON scene_traces (scene, id)",
    ],
    # 3: credential lifecycles — a user has a stable id (a name deleted and re-created is
    # another user) and a generation (bumped to revoke every token of the user); sessions
    # name the user id they were opened for; long-lived API tokens are listed and revoked.
    [
        "ALTER TABLE users ADD COLUMN id TEXT NOT NULL DEFAULT ''",
        "UPDATE users SET id = lower(hex(randomblob(16)))",
        "CREATE UNIQUE INDEX users_id ON users (id)",
        "ALTER TABLE users ADD COLUMN generation INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE sessions ADD COLUMN user_id TEXT NOT NULL DEFAULT ''",
        """CREATE TABLE api_tokens (
            id TEXT PRIMARY KEY,
            user_name TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
            user_id TEXT NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            revoked_at REAL,
            note TEXT NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX api_tokens_user ON api_tokens (user_name)",
    ],
    # 4: runtime desired-state overrides (twin/registry/overrides.py)
    [
        """CREATE TABLE desired_overrides (
            device TEXT NOT NULL,
            property TEXT NOT NULL,
            value TEXT NOT NULL,
            set_by TEXT NOT NULL,
            set_at REAL NOT NULL,
            spec_json TEXT,
            PRIMARY KEY (device, property)
        )""",
    ],
    # 5: report runs (twin/registry/reports.py)
    [
        """CREATE TABLE report_runs (
            id TEXT PRIMARY KEY,
            report TEXT NOT NULL,
            site TEXT,
            trigger TEXT NOT NULL,
            status TEXT NOT NULL,
            started_at REAL NOT NULL,
            finished_at REAL,
            scheduled_for REAL,
            period TEXT NOT NULL,
            artifacts TEXT NOT NULL,
            deliveries TEXT NOT NULL,
            error TEXT
        )""",
        "CREATE INDEX report_runs_report ON report_runs (report, started_at)",
    ],
]

POSTGRES: list[list[str]] = [
    # 1: initial schema
    [
        """CREATE TABLE registry_head (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            revision INTEGER NOT NULL
        )""",
        "INSERT INTO registry_head (id, revision) VALUES (1, 0)",
        """CREATE TABLE revisions (
            number INTEGER PRIMARY KEY,
            hash TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            author TEXT NOT NULL,
            message TEXT NOT NULL DEFAULT '',
            source TEXT NOT NULL DEFAULT 'cli',
            created INTEGER NOT NULL DEFAULT 0,
            updated INTEGER NOT NULL DEFAULT 0,
            deleted INTEGER NOT NULL DEFAULT 0,
            objects INTEGER NOT NULL DEFAULT 0,
            specs BYTEA NOT NULL
        )""",
        """CREATE TABLE objects (
            kind TEXT NOT NULL,
            name TEXT NOT NULL,
            body JSONB NOT NULL,
            hash TEXT NOT NULL,
            created_rev INTEGER NOT NULL,
            updated_rev INTEGER NOT NULL,
            PRIMARY KEY (kind, name)
        )""",
        """CREATE TABLE device_groups (
            id VARCHAR(255) PRIMARY KEY,
            name VARCHAR(255) NOT NULL,
            description TEXT,
            parent_id VARCHAR(255) REFERENCES device_groups (id) DEFERRABLE INITIALLY DEFERRED,
            created_at DOUBLE PRECISION NOT NULL,
            site TEXT,
            revision INTEGER
        )""",
        """CREATE TABLE devices (
            id VARCHAR(255) PRIMARY KEY,
            name VARCHAR(255) NOT NULL,
            device_type VARCHAR(100) NOT NULL,
            protocol VARCHAR(100) NOT NULL,
            status VARCHAR(20) NOT NULL,
            metadata JSONB,
            tags TEXT[],
            group_id VARCHAR(255) REFERENCES device_groups (id) DEFERRABLE INITIALLY DEFERRED,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            site TEXT,
            model TEXT,
            revision INTEGER
        )""",
        "CREATE INDEX devices_group ON devices (group_id)",
        "CREATE INDEX devices_tags ON devices USING GIN (tags)",
        "CREATE INDEX device_groups_parent ON device_groups (parent_id)",
        """CREATE TABLE device_status_history (
            id BIGSERIAL PRIMARY KEY,
            device_id VARCHAR(255) NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
            status VARCHAR(20) NOT NULL,
            timestamp DOUBLE PRECISION NOT NULL,
            metadata JSONB
        )""",
        "CREATE INDEX device_status_history_dev ON device_status_history (device_id, timestamp)",
        """CREATE TABLE device_metrics (
            id BIGSERIAL PRIMARY KEY,
            device_id VARCHAR(255) NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
            metric_name VARCHAR(100) NOT NULL,
            metric_value DOUBLE PRECISION NOT NULL,
            timestamp DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX device_metrics_dev ON device_metrics (device_id, timestamp)",
        """CREATE TABLE alarms (
            id BIGSERIAL PRIMARY KEY,
            device TEXT NOT NULL,
            type TEXT NOT NULL,
            severity TEXT NOT NULL,
            message TEXT NOT NULL,
            state TEXT NOT NULL,
            raised_at DOUBLE PRECISION NOT NULL,
            acked_at DOUBLE PRECISION,
            acked_by TEXT,
            cleared_at DOUBLE PRECISION,
            cleared_by TEXT
        )""",
        "CREATE UNIQUE INDEX alarms_open ON alarms (device, type) WHERE state <> 'cleared'",
        "CREATE INDEX alarms_device ON alarms (device)",
        """CREATE TABLE users (
            name TEXT PRIMARY KEY,
            password_hash TEXT NOT NULL,
            role TEXT NOT NULL,
            sites TEXT[] NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            disabled BOOLEAN NOT NULL DEFAULT FALSE
        )""",
        """CREATE TABLE sessions (
            id TEXT PRIMARY KEY,
            user_name TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
            token_hash TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL,
            revoked_at DOUBLE PRECISION,
            client TEXT NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX sessions_user ON sessions (user_name)",
        """CREATE TABLE device_keys (
            id TEXT PRIMARY KEY,
            device TEXT NOT NULL,
            key_hash TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            revoked_at DOUBLE PRECISION
        )""",
        "CREATE INDEX device_keys_device ON device_keys (device)",
        """CREATE TABLE audit_log (
            id BIGSERIAL PRIMARY KEY,
            timestamp DOUBLE PRECISION NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT NOT NULL,
            result TEXT NOT NULL,
            detail JSONB
        )""",
        "CREATE INDEX audit_log_actor ON audit_log (actor)",
    ],
    # 2: command ledger and scene traces (twin/control)
    [
        """CREATE TABLE commands (
            id TEXT PRIMARY KEY,
            seq BIGINT NOT NULL,
            device TEXT NOT NULL,
            type TEXT NOT NULL,
            params JSONB NOT NULL,
            status TEXT NOT NULL,
            error TEXT,
            result JSONB,
            timeout DOUBLE PRECISION NOT NULL,
            deadline DOUBLE PRECISION NOT NULL,
            idempotency_key TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            source TEXT NOT NULL DEFAULT '',
            batch TEXT,
            cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            transitions JSONB NOT NULL
        )""",
        "CREATE INDEX commands_device ON commands (device, seq)",
        "CREATE INDEX commands_status ON commands (status)",
        "CREATE INDEX commands_batch ON commands (batch)",
        "CREATE UNIQUE INDEX commands_idem ON commands (device, idempotency_key) "
        "WHERE idempotency_key IS NOT NULL",
        """CREATE TABLE scene_traces (
            id BIGSERIAL PRIMARY KEY,
            run_id TEXT NOT NULL UNIQUE,
            scene TEXT NOT NULL,
            started_at DOUBLE PRECISION NOT NULL,
            finished_at DOUBLE PRECISION,
            status TEXT NOT NULL,
            trace JSONB NOT NULL
        )""",
        "CREATE INDEX scene_traces_scene ON scene_traces (scene, id)",
    ],
    # 3: credential lifecycles (see the SQLite list)
    [
        "ALTER TABLE users ADD COLUMN id TEXT NOT NULL DEFAULT ''",
        "UPDATE users SET id = md5(random()::text || clock_timestamp()::text || name)",
        "CREATE UNIQUE INDEX users_id ON users (id)",
        "ALTER TABLE users ADD COLUMN generation INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE sessions ADD COLUMN user_id TEXT NOT NULL DEFAULT ''",
        """CREATE TABLE api_tokens (
            id TEXT PRIMARY KEY,
            user_name TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
            user_id TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL,
            revoked_at DOUBLE PRECISION,
            note TEXT NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX api_tokens_user ON api_tokens (user_name)",
    ],
    # 4: runtime desired-state overrides (twin/registry/overrides.py)
    [
        """CREATE TABLE desired_overrides (
            device TEXT NOT NULL,
            property TEXT NOT NULL,
            value TEXT NOT NULL,
            set_by TEXT NOT NULL,
            set_at DOUBLE PRECISION NOT NULL,
            spec_json TEXT,
            PRIMARY KEY (device, property)
        )""",
    ],
    # 5: report runs (twin/registry/reports.py)
    [
        """CREATE TABLE report_runs (
            id TEXT PRIMARY KEY,
            report TEXT NOT NULL,
            site TEXT,
            trigger TEXT NOT NULL,
            status TEXT NOT NULL,
            started_at DOUBLE PRECISION NOT NULL,
            finished_at DOUBLE PRECISION,
            scheduled_for DOUBLE PRECISION,
            period TEXT NOT NULL,
            artifacts TEXT NOT NULL,
            deliveries TEXT NOT NULL,
            error TEXT
        )""",
        "CREATE INDEX report_runs_report ON report_runs (report, started_at)",
    ],
]

SCHEMA_VERSION = len(SQLITE)
assert len(POSTGRES) == SCHEMA_VERSION, "every migration must exist for both dialects"


def version(conn: Any) -> int:
    """The schema version recorded in ``schema_version`` (0: none applied yet)."""
    row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0] or 0)


def upgrade(conn: Any, where: str, steps: Sequence[Sequence[str]], record: str) -> None:
    """Inside the caller's locked transaction: apply each of ``steps`` (this dialect's list)
    the registry at ``where`` lacks, recording each with ``record`` (one parameter: the
    version). A registry newer than this program is refused."""
    current = version(conn)
    if current > SCHEMA_VERSION:
        raise RegistryError(
            f"registry {where} has schema version {current}, newer than this "
            f"program's {SCHEMA_VERSION}",
            hint="upgrade flux-iot",
        )
    for number in range(current + 1, SCHEMA_VERSION + 1):
        for stmt in steps[number - 1]:
            conn.execute(stmt)
        conn.execute(record, (number,))
