"""``open_registry``: URL forms, errors, and applies racing from two processes."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from twin.errors import ConflictError, RegistryError
from twin.registry import open_registry
from twin.registry.postgres import PostgresRegistry, redact, split_schema
from twin.registry.sqlite import SQLiteRegistry

from .docs import demo_specs


def test_default_is_sqlite_in_state_dir(tmp_path: Path) -> None:
    reg = open_registry(None, state_dir=tmp_path / "state")
    try:
        assert isinstance(reg, SQLiteRegistry)
        assert reg.path == tmp_path / "state" / "registry.db"
        assert reg.path.exists()
    finally:
        reg.close()
    reg = open_registry("", state_dir=tmp_path / "state")
    reg.close()


@pytest.mark.parametrize("form", ["plain", "dir", "url-abs", "url-empty"])
def test_sqlite_url_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str) -> None:
    target = tmp_path / "x" / "reg.db"
    url = {
        "plain": str(target),
        "dir": str(tmp_path / "x"),
        "url-abs": f"sqlite:///{target}",  # sqlite:/// + /abs/path = four slashes
        "url-empty": "sqlite://",
    }[form]
    (tmp_path / "x").mkdir()
    reg = open_registry(url, state_dir=tmp_path / "x")
    try:
        assert isinstance(reg, SQLiteRegistry)
        expected = target if form in ("plain", "url-abs") else tmp_path / "x" / "registry.db"
        assert reg.path == expected
    finally:
        reg.close()


def test_sqlite_relative_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    reg = open_registry("sqlite:///sub/reg.db")
    try:
        assert isinstance(reg, SQLiteRegistry)
        assert reg.path == Path("sub/reg.db")
        assert (tmp_path / "sub" / "reg.db").exists()
    finally:
        reg.close()


def test_unknown_scheme() -> None:
    with pytest.raises(RegistryError, match="unknown registry URL scheme 'mysql'") as info:
        open_registry("mysql://localhost/db")
    assert info.value.hint and "postgresql://" in info.value.hint


def test_unreachable_postgres_names_url_without_password() -> None:
    url = "postgresql://bob:s3cret@127.0.0.1:1/nodb?connect_timeout=2"
    with pytest.raises(RegistryError) as info:
        open_registry(url)
    msg = str(info.value)
    assert "\n" not in msg
    assert "s3cret" not in msg and "bob@127.0.0.1:1/nodb" in msg
    assert info.value.hint and "PostgreSQL" in info.value.hint


def test_postgres_url_helpers() -> None:
    assert redact("postgresql://u:p@h:5/d?x=1") == "postgresql://u@h:5/d?x=1"
    assert redact("postgresql://h/d") == "postgresql://h/d"
    conninfo, schema = split_schema("postgres://u@h/d?schema=s1&sslmode=disable")
    assert schema == "s1"
    assert conninfo.startswith("postgresql://u@h/d?")
    assert "sslmode=disable" in conninfo and "connect_timeout=5" in conninfo
    assert "schema" not in conninfo


@pytest.mark.postgres
def test_postgres_scheme_alias_and_schema(pg_registry_url: str) -> None:
    reg = open_registry(pg_registry_url.replace("postgresql://", "postgres://", 1))
    try:
        assert isinstance(reg, PostgresRegistry)
        assert reg.head() is None
        schema = pg_registry_url.rsplit("schema=", 1)[1]
        assert reg.schema == schema
        with reg._tx(write=False) as conn:
            (where,) = conn.execute("SELECT current_schema()").fetchone()
        assert where == schema
    finally:
        reg.close()


def _apply_in_process(url: str, n: int, barrier: object, out: object) -> None:
    reg = open_registry(url)
    try:
        barrier.wait()  # type: ignore[attr-defined]
        try:
            rev = reg.apply(demo_specs(n), base=1, author=f"p{n}")
            out.put(("win", rev.number if rev else None))  # type: ignore[attr-defined]
        except ConflictError:
            out.put(("conflict", None))  # type: ignore[attr-defined]
        except Exception as exc:
            out.put(("error", repr(exc)))  # type: ignore[attr-defined]
    finally:
        reg.close()


def test_concurrent_applies_processes(registry_url: str) -> None:
    reg = open_registry(registry_url)
    try:
        reg.apply(demo_specs(1), base=0, author="seed")
        ctx = multiprocessing.get_context("spawn")
        barrier = ctx.Barrier(2)
        out = ctx.Queue()
        procs = [
            ctx.Process(target=_apply_in_process, args=(registry_url, n, barrier, out))
            for n in (200, 300)
        ]
        for p in procs:
            p.start()
        results = sorted(out.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(30)
        assert results == [("conflict", None), ("win", 2)], results
        head = reg.head()
        assert head is not None and head.number == 2
        from twin.registry import spec_hash

        specs = reg.specs()
        assert spec_hash(specs) == head.hash
        assert len(reg.device_rows()) == sum(1 for k in specs if k[0] == "Device")
    finally:
        reg.close()


@pytest.mark.postgres
def test_postgres_broken_connection_is_replaced(pg_registry_url: str) -> None:
    reg = open_registry(pg_registry_url)
    try:
        assert isinstance(reg, PostgresRegistry)
        with reg._tx(write=False) as conn:
            pid = conn.info.backend_pid
        import psycopg

        from .conftest import PG_URL

        with psycopg.connect(PG_URL, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(RegistryError):
            reg.head()  # the dead connection fails once, and is dropped from the pool
        assert reg.head() is None
    finally:
        reg.close()
