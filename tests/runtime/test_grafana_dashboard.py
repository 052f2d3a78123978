"""The shipped Grafana dashboard only queries metrics the engine exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from twin.runtime.metrics import EngineMetrics
from twin.runtime.state import TwinStore

DASH = Path(__file__).resolve().parents[2] / "dashboards" / "grafana" / "flux-runtime.json"


def test_dashboard_queries_exported_metrics() -> None:
    doc = json.loads(DASH.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    assert exprs and doc["uid"]
    exported = EngineMetrics(TwinStore()).render().decode()
    names = set(re.findall(r"^# TYPE (\w+)", exported, re.M))
    known = names | {f"{n}_total" for n in names} | {f"{n}_bucket" for n in names}
    for expr in exprs:
        for metric in re.findall(r"\b(twin_\w+)", expr):
            assert metric in known, f"{metric} (in {expr}) is not exported"
