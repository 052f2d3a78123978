"""Fixtures: ``registry`` yields a fresh registry, once per backend.

PostgreSQL comes from ``TWIN_TEST_POSTGRES`` (default
``postgresql://postgres@127.0.0.1:5432/test``); each test gets its own schema, dropped
afterwards. Tests are skipped (with the reason) when the server is unreachable.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from twin.registry import open_registry
from twin.registry._sql import SQLRegistry

PG_URL = os.environ.get("TWIN_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")

_pg_error: str | bool | None = False  # False = not probed yet


def pg_unavailable() -> str | None:
    global _pg_error
    if _pg_error is False:
        try:
            import psycopg

            with psycopg.connect(PG_URL, connect_timeout=3) as conn:
                conn.execute("SELECT 1")
            _pg_error = None
        except Exception as exc:
            _pg_error = f"PostgreSQL unreachable at {PG_URL}: {str(exc).strip().splitlines()[0]}"
    return _pg_error if isinstance(_pg_error, str) else None


def _with_schema(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}schema={schema}"


def _drop_schema(schema: str) -> None:
    import psycopg

    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


Opener = Callable[[], SQLRegistry]


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
    ]
)
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "postgres":
        reason = pg_unavailable()
        if reason:
            pytest.skip(reason)
    return str(request.param)


@pytest.fixture
def registry_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A URL for a fresh, empty registry of the backend under test."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    schema = f"t_{uuid.uuid4().hex[:12]}"
    try:
        yield _with_schema(PG_URL, schema)
    finally:
        _drop_schema(schema)


@pytest.fixture
def open_reg(registry_url: str) -> Iterator[Opener]:
    """Open (another) registry on the same URL; every one opened is closed at teardown."""
    opened: list[SQLRegistry] = []

    def opener() -> SQLRegistry:
        reg = open_registry(registry_url)
        assert isinstance(reg, SQLRegistry)
        opened.append(reg)
        return reg

    yield opener
    for reg in opened:
        reg.close()


@pytest.fixture
def registry(open_reg: Opener) -> SQLRegistry:
    return open_reg()


@pytest.fixture
def pg_registry_url() -> Iterator[str]:
    """A fresh PostgreSQL schema URL (for PostgreSQL-only tests; mark them ``postgres``)."""
    reason = pg_unavailable()
    if reason:
        pytest.skip(reason)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    try:
        yield _with_schema(PG_URL, schema)
    finally:
        _drop_schema(schema)
