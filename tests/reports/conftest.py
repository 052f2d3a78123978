"""A copy of the demo site with a report in Chinese, and a LanceDB store with a known day of
readings (2026-03-01 in Asia/Shanghai) for it."""

from __future__ import annotations

import math
import shutil
import textwrap
from pathlib import Path
from typing import Any

import pytest

from twin.spec.periods import resolve_period

ROOT = Path(__file__).resolve().parents[2]
TZ = "Asia/Shanghai"
DAY = "2026-03-01..2026-03-02"
DEVICES = {"temp_sensor_01": 20.0, "temp_sensor_02": 24.0}

REPORT = """\
apiVersion: flux.iot/v1
kind: Report
metadata: {name: daily-zh, site: plant-a}
spec:
  title: 工厂日报 Plant A daily
  language: zh-CN
  timezone: Asia/Shanghai
  period: yesterday
  formats: [pdf, xlsx, csv]
  sections:
    - {type: stat, title: 平均温度, metric: temperature, aggregate: avg}
    - {type: stat, title: 最高温度, metric: temperature, aggregate: max}
    - {type: timeseries, title: 温度曲线, metrics: [temperature], every: 1h}
    - {type: table, title: 汇总, metrics: [temperature], aggregates: [avg, min, max, count]}
    - {type: readings, title: 原始读数, metrics: [temperature], select: {device: [temp_sensor_01, temp_sensor_02]}}
    - {type: alarms, title: 报警}
"""


def value(device: str, i: int) -> float:
    """The reading of ``device`` at minute ``i`` of the day."""
    return round(DEVICES[device] + 2 * math.sin(i / 1440 * 2 * math.pi), 3)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    dst = tmp_path / "site"
    shutil.copytree(ROOT / "sites" / "demo", dst)
    (dst / "report-zh.yaml").write_text(REPORT, encoding="utf-8")
    return dst


@pytest.fixture
def store(tmp_path: Path) -> Any:
    from twin.timeseries.lance import LanceStore

    s = LanceStore(tmp_path / "state" / "timeseries")
    p = resolve_period(DAY, TZ, 0)
    recs = []
    for dev in DEVICES:
        for i in range(1440):
            recs.append((dev, "temperature", value(dev, i), p.start + 60 * i, 0, "plant-a",
                         "cell-1a", ",hvac,"))
    s.write_records(recs)
    yield s
    s.close()


def write_template(site: Path, body: str) -> None:
    (site / "report-zh.yaml").write_text(
        REPORT.replace("  formats: [pdf, xlsx, csv]\n",
                       "  formats: [pdf, xlsx, csv]\n  layout: {template: tpl/report.html.j2}\n"),
        encoding="utf-8",
    )
    (site / "tpl").mkdir(exist_ok=True)
    (site / "tpl" / "report.html.j2").write_text(textwrap.dedent(body), encoding="utf-8")
