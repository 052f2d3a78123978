"""Reports rendered for real: WeasyPrint PDF checked with poppler (pdftoppm renders page 1,
pdffonts shows the CJK font embedded as a subset), XLSX read back with openpyxl against the
store, CSV, and template errors located at the template's file and line."""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import sys
import zipfile
import zoneinfo
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from twin.errors import SpecError
from twin.reports.errors import ReportError
from twin.reports.render import period_of, produce
from twin.spec import load_site

from .conftest import DAY, DEVICES, TZ, value, write_template

needs_poppler = pytest.mark.skipif(
    not (shutil.which("pdftoppm") and shutil.which("pdffonts")), reason="poppler-utils missing"
)


def _run(site: Path, store: Any, formats: list[str]) -> tuple[Any, dict[str, Any]]:
    specs = load_site(site).specs
    doc = specs[("Report", "daily-zh")]
    period = period_of(doc, specs, DAY, 0)
    data, arts = produce(doc, specs, period, store, None, formats)
    return data, {a.format: a for a in arts}


@needs_poppler
def test_pdf_page_one_renders_and_embeds_the_cjk_font(site: Path, store: Any,
                                                       tmp_path: Path) -> None:
    from PIL import Image, ImageStat

    data, arts = _run(site, store, ["pdf"])
    pdf = tmp_path / "r.pdf"
    pdf.write_bytes(arts["pdf"].data)
    assert arts["pdf"].filename == "daily-zh-2026-03-01.pdf"
    subprocess.run(["pdftoppm", "-png", "-r", "50", "-f", "1", "-l", "1", str(pdf),
                    str(tmp_path / "page")], check=True)
    png = next(tmp_path.glob("page*.png"))
    img = Image.open(png).convert("L")
    stat = ImageStat.Stat(img)
    assert stat.stddev[0] > 20, "page 1 is blank"
    dark = sum(img.histogram()[:128])
    assert dark > 2000, "page 1 has almost no ink"
    fonts = subprocess.run(["pdffonts", str(pdf)], capture_output=True, text=True,
                           check=True).stdout
    cjk = [ln for ln in fonts.splitlines() if "CJK" in ln]
    assert cjk, fonts
    # name, type, encoding, then emb sub uni: embedded and subset
    assert any(ln.split()[-5:-3] == ["yes", "yes"] for ln in cjk), fonts
    assert any(ln.split()[0][6:7] == "+" for ln in cjk), "subset fonts carry a XXXXXX+ prefix"
    text = subprocess.run(["pdftotext", "-l", "1", str(pdf), "-"], capture_output=True,
                          text=True).stdout if shutil.which("pdftotext") else "工厂日报 平均温度"
    assert "工厂日报" in text and "平均温度" in text
    stat_avg = next(s for s in data.sections if s.title == "平均温度").value
    expected = sum(value(d, i) for d in DEVICES for i in range(1440)) / (2 * 1440)
    assert stat_avg == pytest.approx(expected)


def test_xlsx_values_and_local_timestamps_match_the_store(site: Path, store: Any,
                                                           tmp_path: Path) -> None:
    import openpyxl

    _data, arts = _run(site, store, ["xlsx"])
    wb = openpyxl.load_workbook(io.BytesIO(arts["xlsx"].data))
    names = wb.sheetnames
    assert names[0] == "Summary"
    # readings of two devices: one sheet per device, every reading, local wall time
    zone = zoneinfo.ZoneInfo(TZ)
    raw = store.read_raw(
        __import__("twin.timeseries.base", fromlist=["Selector"]).Selector.of(
            devices=["temp_sensor_01"], metrics=["temperature"]), 0, 2e9, None)
    stored = {r["ts"].timestamp(): r["value"] for r in raw.to_pylist()}
    sheet = wb[next(n for n in names if n.endswith("temp_sensor_01"))]
    rows = list(sheet.iter_rows(values_only=True))
    assert rows[0][0] == f"time ({TZ})"
    body = rows[1:]
    assert len(body) == 1440 == len(stored)
    for ts_cell, dev, metric, val, quality in body[:: 97]:
        assert isinstance(ts_cell, datetime) and ts_cell.tzinfo is None
        instant = ts_cell.replace(tzinfo=zone).timestamp()
        assert stored[instant] == pytest.approx(val)
        assert (dev, metric, quality) == ("temp_sensor_01", "temperature", "good")
    first = body[0][0]
    assert (first.year, first.month, first.day, first.hour, first.minute) == (2026, 3, 1, 0, 0)
    # the aggregate table: per device over the day
    agg = wb[next(n for n in names if "汇总" in n)]
    got = {r[0]: r for r in agg.iter_rows(min_row=2, values_only=True)}
    for dev in DEVICES:
        vals = [value(dev, i) for i in range(1440)]
        _d, _m, avg, lo, hi, count = got[dev]
        assert avg == pytest.approx(sum(vals) / len(vals))
        assert (lo, hi, count) == (pytest.approx(min(vals)), pytest.approx(max(vals)), 1440)
    # the time-series sheet carries a native chart
    with zipfile.ZipFile(io.BytesIO(arts["xlsx"].data)) as z:
        assert any(n.startswith("xl/charts/chart") for n in z.namelist())


def test_csv_is_a_zip_of_tables_with_offset_times(site: Path, store: Any) -> None:
    _data, arts = _run(site, store, ["csv"])
    assert arts["csv"].filename.endswith(".zip")
    with zipfile.ZipFile(io.BytesIO(arts["csv"].data)) as z:
        name = next(n for n in z.namelist() if "05-" in n)
        rows = list(csv.reader(io.StringIO(z.read(name).decode())))
    assert rows[0] == ["time", "device", "metric", "value", "quality"]
    assert rows[1][0] == "2026-03-01T00:00:00+08:00"
    assert float(rows[1][3]) == pytest.approx(value(rows[1][1], 0))


def test_template_syntax_error_is_located_in_the_template(site: Path) -> None:
    write_template(site, """\
        <html lang="zh-CN"><body>
        <h1>{{ report.title }}</h1>
        {% for s in sections %}
          <p>{{ s.title }</p>
        {% endfor %}
        </body></html>
        """)
    with pytest.raises(SpecError) as err:
        load_site(site)
    text = "\n".join(str(p) for p in err.value.problems)
    assert f"{site / 'tpl' / 'report.html.j2'}:4:" in text, text
    assert "template syntax error" in text


def test_template_runtime_error_names_file_and_line(site: Path, store: Any) -> None:
    write_template(site, """\
        <html lang="zh-CN"><body>
        <h1>{{ report.title }}</h1>
        <p>{{ no_such_name.value }}</p>
        </body></html>
        """)
    with pytest.raises(ReportError) as err:
        _run(site, store, ["pdf"])
    assert f"{site / 'tpl' / 'report.html.j2'}:3: template error" in str(err.value)
    assert "no_such_name" in str(err.value)


def test_custom_template_renders(site: Path, store: Any) -> None:
    write_template(site, """\
        <html lang="{{ report.language }}"><body>
        <h1>{{ report.title }} — {{ period.describe() }}</h1>
        {% for s in sections if s.type == 'stat' %}<p>{{ s.title }}: {{ fmt_num(s.value) }}</p>{% endfor %}
        {% for s in sections if s.type == 'timeseries' %}{{ chart(s) }}{% endfor %}
        </body></html>
        """)
    _data, arts = _run(site, store, ["pdf"])
    assert arts["pdf"].data.startswith(b"%PDF")


def test_validate_locates_bad_timezone_cron_and_metric(site: Path) -> None:
    (site / "bad-report.yaml").write_text(
        "apiVersion: flux.iot/v1\nkind: Report\nmetadata: {name: bad, site: plant-a}\n"
        "spec:\n  title: Bad\n  timezone: Mars/Olympus\n"
        "  schedule: {cron: '61 * * * *'}\n"
        "  sections:\n    - {type: stat, metric: tempx}\n",
        encoding="utf-8",
    )
    with pytest.raises(SpecError) as err:
        load_site(site)
    text = "\n".join(str(p) for p in err.value.problems)
    assert "bad-report.yaml:6:" in text and "unknown time zone 'Mars/Olympus'" in text
    assert "bad-report.yaml:7:" in text and "is not a cron expression" in text
    assert "bad-report.yaml:9:" in text and "unknown metric 'tempx'" in text


def test_cli_report_run_writes_the_pdf(site: Path, store: Any, tmp_path: Path) -> None:
    store.close()
    out = tmp_path / "out.pdf"
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run(
        [sys.executable, "-m", "twin.cli", "--state-dir", str(tmp_path / "state"), "report",
         "run", "daily-zh", "--site", str(site), "--period", DAY, "-o", str(out)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes().startswith(b"%PDF")
    assert "2026-03-01 00:00" in proc.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "twin.cli", "--state-dir", str(tmp_path / "state"), "report",
         "run", "daily-zx", "--site", str(site)], capture_output=True, text=True, env=env,
        timeout=120,
    )
    assert bad.returncode == 1
    assert "no report 'daily-zx'" in bad.stderr and "did you mean 'daily-zh'" in bad.stderr
    assert "Traceback" not in bad.stderr
