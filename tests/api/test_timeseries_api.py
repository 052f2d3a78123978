"""Time-series API against a real served engine: simulated devices → store → HTTP."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from runtime.helpers import eventually

from api.conftest import Api, demo_docs, start_api
from twin.runtime.engine import Engine
from twin.runtime.timeseries_service import TimeSeriesService
from twin.timeseries.base import Selector


@pytest.fixture
async def tsapi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Api]:
    """The API fixture's engine with a TimeSeriesService added (fast flushes)."""
    service = TimeSeriesService(flush_interval=0.1, retention_interval=0.5, monitor_interval=0.2)
    original = Engine.__init__

    def init(self: Engine, registry, config=None, services=()):  # type: ignore[no-untyped-def]
        original(self, registry, config, [service, *services])

    monkeypatch.setattr(Engine, "__init__", init)
    a: Api | None = None
    try:
        async with trio.open_nursery() as nursery:
            a = await start_api(nursery, tmp_path / "state")
            monkeypatch.setattr(Engine, "__init__", original)
            store = service.store
            assert store is not None
            await eventually(
                lambda: store.read_raw(Selector.of(devices=["t1", "t2"]), 0, 2e9).num_rows >= 6
            )
            yield a
            nursery.cancel_scope.cancel()
    finally:
        if a is not None:
            a.registry.close()


async def test_raw_query_with_tags_from_the_device_spec(tsapi: Api) -> None:
    async with tsapi.client("viewer") as c:
        r = await c.get(
            "/api/v1/timeseries/query",
            params={"metric": "temperature", "device": "t2", "from": "-1h"},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["count"] >= 3
        row = dict(zip(body["columns"], body["rows"][0], strict=True))
        assert row["device"] == "t2" and row["site"] == "plant-a" and row["group"] == "cell-1"
        assert row["tags"] == ",critical,floor=3,hvac,"
        assert row["ts"].endswith("Z") and isinstance(row["value"], float)
        # tag selector
        r = await c.get("/api/v1/timeseries/query", params={"tag": "critical", "from": "-1h"})
        assert {x[body["columns"].index("device")] for x in r.json()["rows"]} == {"t2"}


async def test_aggregates_group_by_fill_compare_trend(tsapi: Api) -> None:
    async with tsapi.client("viewer") as c:
        q = {"metric": "temperature", "from": "-10m", "every": "1m", "agg": "avg,min,max,count"}
        r = await c.get("/api/v1/timeseries/query", params=q)
        assert r.status_code == 200, r.text
        body = r.json()
        assert {"avg", "min", "max", "count"} <= set(body["columns"])
        devices = {row[body["columns"].index("device")] for row in body["rows"]}
        assert {"t1", "t2"} <= devices
        assert r.headers["x-twin-tier"] == "raw"  # no tier rolled up here
        r = await c.get("/api/v1/timeseries/query", params={**q, "tier": "1m"})
        assert r.status_code == 200 and r.headers["x-twin-tier"] == "1m"
        r = await c.get("/api/v1/timeseries/query", params={"metric": "temperature"})
        assert "x-twin-tier" not in r.headers  # raw points
        r = await c.get("/api/v1/timeseries/query", params={**q, "group_by": "site"})
        assert {row[r.json()["columns"].index("site")] for row in r.json()["rows"]} == {
            "plant-a",
            "plant-b",
        }
        r = await c.get("/api/v1/timeseries/query", params={**q, "fill": "null", "device": "t1"})
        assert r.json()["count"] >= 10  # every bucket present, empty ones null
        r = await c.get("/api/v1/timeseries/query", params={**q, "compare": "1h"})
        assert r.status_code == 200 and "avg_previous" in r.json()["columns"]
        r = await c.get(
            "/api/v1/timeseries/query",
            params={"metric": "temperature", "device": "t1", "from": "-1h", "trend": "true"},
        )
        assert r.status_code == 200 and "slope_per_h" in r.json()["columns"]
        # bad input is a 422 with the reason
        r = await c.get("/api/v1/timeseries/query", params={"agg": "median"})
        assert r.status_code == 422 and "median" in r.text
        r = await c.get("/api/v1/timeseries/query", params={"from": "yesterday-ish"})
        assert r.status_code == 422


async def test_export_formats(tsapi: Api) -> None:
    async with tsapi.client("viewer") as c:
        params = {"metric": "temperature", "device": "t1", "from": "-1h"}
        r = await c.get("/api/v1/timeseries/query", params={**params, "format": "csv"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        assert "attachment" in r.headers["content-disposition"]
        rows = list(csv.DictReader(io.StringIO(r.text)))
        assert rows and rows[0]["device"] == "t1"
        r = await c.get("/api/v1/timeseries/query", params={**params, "format": "parquet"})
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(r.content))
        assert table.num_rows >= 3 and "value" in table.column_names
        r = await c.get("/api/v1/timeseries/query", params={**params, "format": "xlsx"})
        import openpyxl

        wb = openpyxl.load_workbook(io.BytesIO(r.content))
        assert wb.active is not None and wb.active.max_row >= 4
        r = await c.get("/api/v1/timeseries/query", params={**params, "format": "xml"})
        assert r.status_code == 422


async def test_storage_stats_retention_and_device_metrics(tsapi: Api) -> None:
    async with tsapi.client("viewer") as c:
        r = await c.get("/api/v1/timeseries/storage")
        assert r.status_code == 200
        s = r.json()
        assert s["points"] > 0 and s["bytes"] > 0 and s["free_bytes"] > 0
        assert s["tiers"][0]["tier"] == "raw" and s["store"].startswith("lance:")
        assert s["writer"]["points_written"] > 0
        assert (await c.post("/api/v1/timeseries/retention/run")).status_code == 403
        r = await c.get("/api/v1/devices/t1/metrics")
        assert r.status_code == 200
        series = {m["metric"]: m for m in r.json()["series"]}
        assert series["temperature"]["count"] > 0 and series["temperature"]["last"] is not None
        r = await c.get("/metrics")
        assert 'twin_timeseries_points{tier="raw"}' in r.text
    async with tsapi.client("admin") as c:
        r = await c.post("/api/v1/timeseries/retention/run")
        assert r.status_code == 200 and r.json() == {"ran": False, "report": None, "policies": []}


async def test_site_scoped_user_sees_only_its_sites(tsapi: Api) -> None:
    async with tsapi.client("oper_b") as c:
        r = await c.get("/api/v1/timeseries/query", params={"from": "-1h"})
        assert r.status_code == 200
        sites = {row[r.json()["columns"].index("site")] for row in r.json()["rows"]}
        assert sites <= {"plant-b"}
        r = await c.get("/api/v1/timeseries/query", params={"site": "plant-a"})
        assert r.status_code == 403


async def test_without_the_service_the_routes_answer_503(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        a = await start_api(nursery, tmp_path / "state", docs=demo_docs())
        try:
            async with a.client("viewer") as c:
                r = await c.get("/api/v1/timeseries/query")
                assert r.status_code == 503
                r = await c.get("/api/v1/devices/t1/metrics")
                assert r.status_code == 200 and r.json()["series"] is None
        finally:
            nursery.cancel_scope.cancel()
            a.registry.close()


def test_tier_used_names_the_tier_the_engine_chose() -> None:
    import json

    from twin.api.routes.timeseries import tier_used
    from twin.timeseries.query import TIERS_META
    from twin.timeseries.request import QueryRequest

    class Catalog:  # choose_tier reads only the tier catalogue
        def get_meta(self, key: str) -> str | None:
            assert key == TIERS_META
            info = {"resolution": 3600, "policies": [{"selector": {}, "wm": 10_000.0}]}
            return json.dumps({"agg_3600s": info})

    def used(**kw: object) -> str | None:
        return tier_used(Catalog(), QueryRequest.build(now=20_000.0, **kw))  # type: ignore[arg-type]

    assert used(start=0, end=9_000, every="1h") == "agg_3600s"
    assert used(start=0, end=20_000, every="2h") == "agg_3600s+raw"  # raw after the roll-up
    assert used(start=0, end=20_000, every="1m") == "raw"  # finer than the tier
    assert used(start=12_000, end=20_000, every="1h") == "raw"  # nothing rolled up yet
    assert used(start=0, end=9_000, every="1h", tier="raw") == "raw"
    assert used(start=0, end=9_000) is None


async def test_csv_download_filename_cannot_inject_headers(tsapi: Api) -> None:
    from twin.api.routes.timeseries import attachment

    for name, ascii_name in (('a"b', "a_b"), ("x\r\nSet-Cookie: s=1", "x__Set-Cookie_ s_1"),
                             ("température", "temp_rature")):
        value = attachment(f"{name}.csv")
        assert "\r" not in value and "\n" not in value
        assert value.startswith(f'attachment; filename="{ascii_name}.csv"; filename*=UTF-8\'\'')
        assert value.isascii()
    async with tsapi.client("viewer") as c:
        for metric in ('x"\r\nSet-Cookie: s=1', 'temperature"; filename="evil.exe'):
            r = await c.get("/api/v1/timeseries/query",
                            params={"metric": metric, "device": "t1", "format": "csv"})
            assert r.status_code == 200 and "set-cookie" not in r.headers
            value = r.headers["content-disposition"]  # three parameters, none injected
            assert value == attachment(f"{metric}.csv") and len(value.split(";")) == 3
