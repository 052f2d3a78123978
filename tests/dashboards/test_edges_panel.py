"""The dashboard's ``edges`` panel (dashboards/panels/edges.py): link state per edge node."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from dashboards.panels import LIVE, PANELS
from dashboards.panels.edges import rows, summary
from tests.dashboards.fakeapi import FakeApi
from twin.spec.dashboards import PANEL_TYPES

ROOT = Path(__file__).resolve().parents[2]
APP = str(ROOT / "dashboards" / "app.py")

EDGES = [
    {"name": "gw-a", "online": True, "last_sync": 99.0, "revision": 7, "acked": 1200,
     "outbox_depth": 3, "outbox_bytes": 2_500_000, "lag_s": 0.4, "dropped_at_edge": {}},
    {"name": "gw-b", "online": False, "last_sync": 100.0 - 600, "revision": 6, "acked": 88,
     "outbox_depth": 5400, "outbox_bytes": 9_000_000, "lag_s": 600.25,
     "dropped_at_edge": {"telemetry": 12, "scene_trace": 3}},
    {"name": "gw-c", "online": False, "last_sync": None, "revision": None, "acked": 0,
     "outbox_depth": 0, "outbox_bytes": 0, "lag_s": None, "dropped_at_edge": {}},
]  # fmt: skip

DASHBOARD = """\
apiVersion: flux.iot/v1
kind: Dashboard
metadata: {name: edges, site: plant-a}
spec:
  title: Edges
  pages:
    - title: Edges
      panels:
        - {type: edges, title: Edge links}
"""


def test_rows_offline_first_with_lag_outbox_and_last_sync() -> None:
    table = rows(EDGES, now=100.0)
    assert [r["edge"] for r in table] == ["gw-b", "gw-c", "gw-a"]
    b, c, a = table
    assert b["link"] == "offline" and b["lag (s)"] == 600.2 and b["outbox"] == 5400
    assert b["last sync"] == "10 min ago" and b["dropped"] == 15 and b["revision"] == 6
    assert c["last sync"] == "never" and c["lag (s)"] is None and c["revision"] is None
    assert a["link"] == "online" and a["last sync"] == "1 s ago" and a["outbox MB"] == 2.5
    assert summary(table) == (
        "3 edges · 1 online · **offline: gw-b, gw-c** · 5403 records waiting in outboxes"
    )
    assert rows([]) == []


def test_edges_is_a_declared_live_panel_type() -> None:
    assert "edges" in PANEL_TYPES and "edges" in PANELS and "edges" in LIVE


@pytest.fixture
def site(tmp_path: Path) -> Path:
    folder = tmp_path / "site"
    shutil.copytree(ROOT / "sites" / "demo", folder)
    (folder / "dashboards.yaml").write_text(DASHBOARD)
    return folder


def _app(api: FakeApi) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=30)
    at.session_state["flux_transport"] = api.transport()
    at.run()
    at.text_input(key="login-user").input("viewer")
    at.text_input(key="login-password").input("secret123")
    at.button[0].click().run()
    assert not at.exception, at.exception
    return at


def test_panel_shows_every_edge(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUX_SERVER", "http://flux.test")
    monkeypatch.setenv("FLUX_SITE", str(site))
    monkeypatch.setenv("FLUX_REFRESH", "0")
    monkeypatch.delenv("FLUX_TOKEN", raising=False)
    api = FakeApi(str(site))
    at = _app(api)
    assert [s.value for s in at.subheader] == ["Edge links"]
    assert "No edge nodes" in at.caption[0].value
    api.edges = EDGES
    at.run()
    assert not at.exception, at.exception
    assert "offline: gw-b, gw-c" in " ".join(c.value for c in at.caption)
    df = at.dataframe[0].value
    assert list(df["edge"]) == ["gw-b", "gw-c", "gw-a"]
    assert list(df["outbox"]) == [5400, 0, 3]
