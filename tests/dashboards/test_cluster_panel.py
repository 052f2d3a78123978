"""The dashboard's ``cluster`` panel table (dashboards/panels/cluster.py)."""

from __future__ import annotations

from dashboards.panels import LIVE, PANELS
from dashboards.panels.cluster import rows
from twin.spec.dashboards import PANEL_TYPES


def test_rows_from_the_cluster_api() -> None:
    doc = {
        "cluster": "plant",
        "engine": {"id": "b", "name": "eng-b", "epoch": 7},
        "members": [
            {"id": "a", "name": "eng-a", "epoch": 5, "alive": True, "lease_until": 105.0,
             "api": "http://10.0.0.1:8080", "load": {"devices": 10, "scenes": 2, "revision": 3}},
            {"id": "b", "name": "eng-b", "epoch": 7, "alive": True, "lease_until": 104.0,
             "api": "", "load": {"devices": 12, "scenes": 1, "revision": 3}},
        ],
    }  # fmt: skip
    table = rows(doc, now=100.0)
    assert [r["engine"] for r in table] == ["eng-a", "eng-b"]
    assert [r["this"] for r in table] == ["", "●"]
    assert table[0]["lease left (s)"] == 5.0 and table[1]["devices"] == 12
    assert rows({"cluster": None}) == []


def test_cluster_is_a_declared_live_panel_type() -> None:
    assert "cluster" in PANEL_TYPES and "cluster" in PANELS and "cluster" in LIVE
