from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from twin.timeseries.base import TimeSeriesStore

PG_URL = os.environ.get("TWIN_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def _pg_unreachable() -> str | None:
    try:
        import psycopg

        with psycopg.connect(PG_URL, connect_timeout=3):
            return None
    except Exception as exc:  # any failure means: skip, with the reason
        return f"PostgreSQL at {PG_URL} unreachable (set TWIN_TEST_POSTGRES): {exc}"


_PG_REASON: list[str | None] = []


def pg_reason() -> str | None:
    if not _PG_REASON:
        _PG_REASON.append(_pg_unreachable())
    return _PG_REASON[0]


def make_lance(path: Path) -> TimeSeriesStore:
    from twin.timeseries.lance import LanceStore

    return LanceStore(path / "ts", compact_every=4, min_free_bytes=1024)


@pytest.fixture(params=["lance", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TimeSeriesStore]:
    if request.param == "lance":
        s = make_lance(tmp_path)
        yield s
        s.close()
        return
    reason = pg_reason()
    if reason:
        pytest.skip(reason)
    from twin.timeseries.postgres import PostgresStore

    s2 = PostgresStore(PG_URL, prefix=f"t{uuid.uuid4().hex[:10]}_")
    try:
        yield s2
    finally:
        s2.drop_all()
        s2.close()
