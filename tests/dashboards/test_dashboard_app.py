"""Panel logic through Streamlit's AppTest, against an in-memory API (no engine, no browser)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from dashboards.client import read_table
from dashboards.core import bucket_for
from dashboards.panels.commands import example_params
from dashboards.panels.history import add_trend, export_bytes
from tests.dashboards.fakeapi import FakeApi

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "sites" / "demo"
APP = str(ROOT / "dashboards" / "app.py")


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> FakeApi:
    monkeypatch.setenv("FLUX_SERVER", "http://flux.test")
    monkeypatch.setenv("FLUX_SITE", str(DEMO))
    monkeypatch.setenv("FLUX_REFRESH", "0")
    monkeypatch.delenv("FLUX_TOKEN", raising=False)
    return FakeApi(str(DEMO))


def app(api: FakeApi, user: str | None = "admin", page: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=30)
    at.session_state["flux_transport"] = api.transport()
    at.run()
    if user is not None:
        at.text_input(key="login-user").input(user)
        at.text_input(key="login-password").input("secret123")
        at.button[0].click().run()
    if page is not None:
        at.sidebar.radio(key="page").set_value(page).run()
    assert not at.exception, at.exception
    return at


def texts(at: AppTest) -> str:
    return "\n".join(
        [m.value for m in at.markdown]
        + [s.value for s in at.subheader]
        + [c.value for c in at.caption]
    )


def test_login_form_rejects_a_wrong_password(api: FakeApi) -> None:
    at = app(api, user=None)
    at.text_input(key="login-user").input("admin")
    at.text_input(key="login-password").input("nope")
    at.button[0].click().run()
    assert "Sign-in failed: wrong user name or password" in at.error[0].value
    assert "flux_login" not in at.session_state


def test_overview_shows_every_panel_and_device(api: FakeApi) -> None:
    at = app(api)
    heads = [s.value for s in at.subheader]
    assert heads == ["Devices by status", "Alarms", "Climate", "Conveyor", "Devices"]
    assert [m.label for m in at.metric] == [
        "Temperature (avg) [°C]", "Humidity (avg) [%]", "Conveyor rpm", "Power [kW]",
    ]  # fmt: skip
    assert all(m.value not in ("", "—") for m in at.metric)
    assert "Live updates: REST polling" in texts(at)  # no WebSocket under AppTest
    table = at.dataframe[0].value
    assert list(table.columns) == ["name", "type", "group", "status", "last_seen"]
    assert set(table["name"]) == {d["name"] for d in api.devices}
    assert dict(zip(table["name"], table["status"], strict=True))["door_sensor_01"] == "offline"
    # the stat tile of a nested group asks for the group and every group below it
    q = next(q for q in api.queries if q.get("metric") == ["temperature"] and "group" in q)
    assert set(q["group"]) == {"plant", "line-1", "line-2", "cell-1a", "cell-1b", "utilities"}


def test_device_filters(api: FakeApi) -> None:
    at = app(api)
    at.multiselect(key="devices-Devices-status").set_value(["offline", "fault"]).run()
    assert sorted(at.dataframe[0].value["name"]) == ["door_sensor_01", "plc_packer_01"]
    at.multiselect(key="devices-Devices-status").set_value([]).run()
    at.text_input(key="devices-Devices-text").input("video").run()
    assert sorted(at.dataframe[0].value["name"]) == ["cam_gate_01", "cam_line_01"]


def test_operator_acknowledges_an_alarm(api: FakeApi) -> None:
    at = app(api, "operator")
    assert "`active`" in texts(at)
    at.button(key="ack-1").click().run()
    assert api.alarms[0]["state"] == "acknowledged"
    assert "`acknowledged`" in texts(at)
    assert [b.label for b in at.button if b.key == "clear-1"] == ["Clear"]


def test_viewer_is_not_offered_what_it_cannot_do(api: FakeApi) -> None:
    at = app(api, "viewer")
    keys = {b.key for b in at.button}
    assert "ack-1" not in keys
    at = app(api, "viewer", page="Control")
    labels = {b.label for b in at.button}
    assert "Send command" not in labels and "Run" not in labels
    assert not at.toggle  # no enable/disable for scenes


def test_operator_sends_a_command_and_follows_it(api: FakeApi) -> None:
    at = app(api, "operator", page="Control")
    at.selectbox(key="cmd-Commands-device").set_value("fan_01").run()
    at.selectbox(key="cmd-Commands-type").set_value("set_state").run()
    at.button(key="cmd-Commands-send").click().run()
    assert not at.error
    cmd = api.commands["c1"]
    assert (cmd["device"], cmd["type"], cmd["params"]) == ("fan_01", "set_state", {"state": True})
    assert "**success**" in texts(at)
    assert not at.toggle  # operators run scenes but do not change them
    at.button(key="scenes-Scenes-energy-peak-run").click().run()
    assert api.executed == ["energy-peak"]


def test_control_panels_without_the_control_api(api: FakeApi) -> None:
    api.control = False
    at = app(api, "admin", page="Control")
    assert "Commands are not available on this server" in texts(at)
    assert "Scenes are not available on this server" in texts(at)


def test_history_compare_trend_and_export(api: FakeApi) -> None:
    at = app(api, page="History")
    at.checkbox(key="hist-History-compare").check().run()
    at.checkbox(key="hist-History-trend").check().run()
    at.selectbox(key="hist-History-agg").set_value("max").run()
    assert not at.exception
    q = api.queries[-1]
    assert q["agg"] == ["max"] and q["compare"] == ["1h"] and q["metric"] == ["temperature"]
    slopes, shown = at.dataframe[0].value, at.dataframe[1].value
    assert list(slopes["slope per hour"].round(3).unique()) == [30.0]  # 0.5 per minute
    assert q["site"] == ["plant-a"]  # the panel selector, not a list of 12 names
    assert "max_previous" in shown.columns and len(shown) == 10 * 3
    for fmt in ("csv", "xlsx"):
        rows = read_table(export_bytes(shown, fmt), fmt)
        assert rows[0] == list(shown.columns) and len(rows) == len(shown) + 1


def test_history_resolution_picker(api: FakeApi) -> None:
    at = app(api, page="History")
    assert at.selectbox(key="hist-History-tier").options == ["auto", "raw", "1m", "1h", "1d"]
    assert "tier" not in api.queries[-1]  # auto: the engine chooses from the bucket
    assert "tier auto → raw" in texts(at)  # and says which (X-Twin-Tier)
    at.selectbox(key="hist-History-tier").set_value("1h").run()
    q = api.queries[-1]
    assert q["tier"] == ["1h"] and q["every"] == ["1h"]  # the last hour's 30s bucket, widened
    assert "tier 1h" in texts(at)
    at.selectbox(key="hist-History-bucket").set_value("1m").run()
    assert api.queries[-1]["every"] == ["1h"]
    assert "finer than the 1h tier" in texts(at)
    at.selectbox(key="hist-History-tier").set_value("raw").run()
    assert api.queries[-1]["tier"] == ["raw"] and api.queries[-1]["every"] == ["1m"]


def test_history_axis_format() -> None:
    from dashboards.panels.history import axis_format

    def at(*iso: str) -> pd.Series:
        return pd.Series(pd.to_datetime(list(iso), utc=True))

    assert axis_format(at("2026-01-01T23:00Z", "2026-01-02T01:00Z")) == "%m-%d %H:%M"
    assert axis_format(at("2026-01-01T10:00Z", "2026-01-01T12:00Z")) == "%H:%M"
    assert axis_format(at("2026-01-01T10:00Z", "2026-01-01T10:01Z")) == "%H:%M:%S"


def test_lines_break_at_gaps() -> None:
    from dashboards.core import segments

    ts = pd.to_datetime([0, 10, 20, 100, 110, 0, 10], unit="s", utc=True)
    df = pd.DataFrame({"ts": ts, "device": ["a"] * 5 + ["b"] * 2})
    assert segments(df, "device", 10.0).tolist() == [0, 0, 0, 1, 1, 0, 0]
    # one reading a minute in 30 s buckets is a line; the 10-minute outage still breaks it
    minutes = [0, 60, 120, 180, 240, 840, 900, 960]
    df = pd.DataFrame({"ts": pd.to_datetime(minutes, unit="s", utc=True), "device": "a"})
    assert segments(df, "device", 30.0).tolist() == [0, 0, 0, 0, 0, 1, 1, 1]


def test_tier_label() -> None:
    from dashboards.panels.history import tier_label

    assert tier_label("auto", "agg_3600s") == "auto → 1h"
    assert tier_label("auto", "agg_60s+raw") == "auto → 1m + raw"
    assert tier_label("auto", None) == "auto" and tier_label("1h", "1h") == "1h"


def test_default_dashboard_when_the_site_declares_none(
    api: FakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLUX_SITE", "")
    at = app(api)
    assert [s.value for s in at.subheader] == ["Devices by status", "Active alarms", "Devices"]


def test_helpers() -> None:
    assert bucket_for(3600) == 30 and bucket_for(7 * 86400, 200) == 3600
    assert example_params({"properties": {"rate": {"type": "integer", "minimum": 1}}}) == {
        "rate": 1
    }
    ts = pd.to_datetime([0, 60, 120], unit="s", utc=True)
    line, slopes = add_trend(pd.DataFrame({"ts": ts, "v": [1.0, 2.0, 3.0], "s": "a"}), "v", "s")
    assert slopes["slope per hour"].iloc[0] == pytest.approx(60.0) and len(line) == 2


def test_admin_disables_a_scene(api: FakeApi) -> None:
    at = app(api, "admin", page="Control")
    at.toggle(key="scenes-Scenes-energy-peak-on").set_value(False).run()
    assert api.puts and api.puts[-1]["spec"]["enabled"] is False
    assert api.puts[-1]["site"] == "plant-a"  # the scene stays in its site
    assert at.json  # the last trace of the chosen scene


def test_large_selections_are_not_sent_as_name_lists() -> None:
    from dashboards.client import FluxClient, Login
    from dashboards.core import MAX_NAMES, Ctx, select_params

    devices = [
        {"name": f"s{i}", "site": "plant-a", "group": "line-1", "tags": [], "model": "m"}
        for i in range(MAX_NAMES + 1)
    ]
    ctx = Ctx(FluxClient("http://x"), Login("u", "viewer", "t"), [], devices)
    assert select_params({"select": {"site": "plant-a", "model": "m"}}, ctx) == {
        "site": ["plant-a"]
    }
    ctx.devices = devices[:3]
    assert select_params({"select": {"model": "m"}}, ctx) == {"device": ["s0", "s1", "s2"]}


def _chart_specs(at: AppTest) -> list[str]:
    return [el.proto.spec for el in at.get("vega_lite_chart")]


def test_page_heading_does_not_repeat_the_page(api: FakeApi) -> None:
    at = app(api)
    heads = [m.value for m in at.markdown if m.value.startswith("### ")]
    assert heads == ["### Plant A — overview"]  # was "Plant A — overview · Overview"
    at.sidebar.radio(key="page").set_value("Control").run()
    assert [m.value for m in at.markdown if m.value.startswith("### ")] == [
        "### Plant A — overview · Control"]


def test_stat_delta_that_rounds_to_zero_is_not_shown(api: FakeApi) -> None:
    from dashboards.panels.stat import fmt_delta

    assert fmt_delta(23.41, 23.413) is None  # was "-0.00", in red
    assert fmt_delta(23.41, 23.31) == "+0.1" and fmt_delta(1.5, 1.75) == "-0.25"
    assert fmt_delta(1234.0, 1200.0) == "+34" and fmt_delta(5.0, None) is None
    at = app(api)
    first = at.metric[0]
    key = f"stat:{first.label.split(' [')[0]}:temperature"
    at.session_state[key] = at.session_state[key] + 0.003  # as if the last refresh read that
    at.run()
    assert at.metric[0].value == first.value and at.metric[0].delta in (None, "")


def test_scene_toggles_are_labelled_with_the_scene(api: FakeApi) -> None:
    at = app(api, "admin", page="Control")
    labels = [t.label for t in at.toggle]
    assert labels and all(label.startswith("**") for label in labels), labels  # was "enabled"
    assert "**energy-peak**" in labels


def test_history_axis_names_the_metric_and_aggregate(api: FakeApi) -> None:
    at = app(api, page="History")
    import json

    spec = json.loads(_chart_specs(at)[0])
    assert spec["layer"][0]["encoding"]["y"]["title"] == "temperature °C (avg)"  # was "avg"
    from dashboards.core import metric_label

    assert metric_label("motor_rpm", "rpm") == "motor_rpm" and metric_label("power_kw", "kW") == "power_kw"
    assert metric_label("humidity", "%") == "humidity %" and metric_label("x", "") == "x"


def test_map_says_which_positions_are_approximate(api: FakeApi) -> None:
    at = app(api)
    caption = next(c.value for c in at.caption if "online" in c.value or "offline" in c.value)
    assert "ring" not in caption
    assert "10 of 17 without spec.location: placed around the site (faded)" in caption
