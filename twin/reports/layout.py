"""The built-in report layout (Jinja2 HTML + CSS for WeasyPrint) and its labels.

A site's own template (``layout.template``) sees the same context: ``report`` (a
:class:`twin.reports.model.ReportData`), ``sections``, ``period``, ``labels`` and the helpers
``fmt_time(ts, fmt)``, ``fmt_num(value)``, ``chart(section)`` (inline SVG) and
``rows(section)`` (the rows a PDF shows, at most ``PDF_ROWS``).
"""

from __future__ import annotations

LABELS = {
    "en": {
        "period": "Period",
        "generated": "Generated",
        "site": "Site",
        "page": "Page",
        "of": "of",
        "devices": "devices",
        "no_data": "No data in this period.",
        "more_rows": "{n:,} more rows in the XLSX / CSV export.",
        "contents": "Contents",
        "bucket": "resolution",
    },
    "zh": {
        "period": "报告周期",
        "generated": "生成时间",
        "site": "站点",
        "page": "第",
        "of": "页\uff0c共",
        "devices": "台设备",
        "no_data": "此期间没有数据。",
        "more_rows": "另有 {n:,} 行数据见 XLSX / CSV 导出。",
        "contents": "目录",
        "bucket": "分辨率",
    },
}


def labels(language: str) -> dict[str, str]:
    return LABELS.get(language.split("-")[0].lower(), LABELS["en"])


BUILTIN = r"""<!DOCTYPE html>
<html lang="{{ report.language }}">
<head>
<meta charset="utf-8">
<title>{{ report.title }}</title>
<style>
@page {
  size: {{ page_size }};
  margin: 22mm 16mm 20mm 16mm;
  @top-left { content: "{{ report.title|replace('"', "'") }}"; font-size: 8pt; color: #6b7785; }
  @top-right { content: "{{ (report.site_title or '')|replace('"', "'") }}"; font-size: 8pt; color: #6b7785; }
  @bottom-left { content: "FLUX IoT · {{ period.label }}"; font-size: 7.5pt; color: #8a95a3; }
  @bottom-right { content: "{{ labels.page }} " counter(page) " {{ labels.of }} " counter(pages); font-size: 7.5pt; color: #8a95a3; }
}
@page :first { @top-left { content: none; } @top-right { content: none; } }
html { font-family: "DejaVu Sans", "Noto Sans CJK SC", sans-serif; font-size: 9.5pt; color: #1f2933; }
html:lang(zh), html:lang(zh-CN) { font-family: "Noto Sans CJK SC", "DejaVu Sans", sans-serif; }
h1 { font-size: 21pt; margin: 0 0 2mm 0; color: #0f2d52; font-weight: 700; }
h2 { font-size: 12.5pt; color: #0f2d52; margin: 7mm 0 2mm 0; padding-bottom: 1.2mm;
     border-bottom: 1.2pt solid #1f5fa8; break-after: avoid; }
.band { background: #0f2d52; color: white; margin: -22mm -16mm 6mm -16mm; padding: 14mm 16mm 8mm 16mm; }
.band h1 { color: white; }
.band .sub { color: #c9d6e6; font-size: 10pt; }
.meta { display: flex; gap: 10mm; margin-top: 4mm; font-size: 9pt; }
.meta div span { display: block; color: #9fb3cc; font-size: 7.5pt; text-transform: uppercase; letter-spacing: .05em; }
.desc { color: #4b5563; margin: 0 0 4mm 0; }
.stats { display: grid; gap: 3mm; margin: 2mm 0 4mm 0; }
.stat { border: 0.8pt solid #d6dde6; border-radius: 2mm; padding: 3mm 4mm;
        background: #f6f8fb; break-inside: avoid; }
.stat .label { color: #5b6674; font-size: 8pt; }
.stat .value { font-size: 15pt; white-space: nowrap; font-weight: 700; color: #0f2d52; margin-top: 1mm; }
.stat .unit { font-size: 9pt; color: #5b6674; font-weight: 400; }
.stat .scope { font-size: 7pt; color: #8a95a3; margin-top: 1mm; }
.section { break-inside: auto; }
.section.break { break-before: page; }
.chart { break-inside: avoid; margin: 1mm 0 2mm 0; }
.chart svg, .chart img { width: 100%; height: auto; display: block; }
.note { color: #6b7785; font-size: 7.5pt; margin: 0 0 2mm 0; }
table { width: 100%; border-collapse: collapse; font-size: 8pt; margin-bottom: 2mm; }
thead { display: table-header-group; }
th { text-align: left; background: #e9eef5; color: #23364d; font-weight: 600; padding: 1.4mm 2mm;
     border-bottom: 0.8pt solid #b9c5d3; }
td { padding: 1.1mm 2mm; border-bottom: 0.4pt solid #e3e8ee; vertical-align: top; }
tr { break-inside: avoid; }
tbody tr:nth-child(even) td { background: #fafbfd; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.sev-critical { color: #b42318; font-weight: 700; }
.sev-major { color: #c4320a; font-weight: 600; }
.sev-minor, .sev-warning { color: #b54708; }
.status-failed, .status-error, .status-timeout { color: #b42318; }
.status-success, .status-ok, .status-online { color: #067647; }
.empty { color: #8a95a3; font-style: italic; }
.markdown { color: #333f4d; }
{{ extra_css }}
</style>
</head>
<body>
<div class="band">
  <h1>{{ report.title }}</h1>
  <div class="sub">{{ report.site_title or '' }}</div>
  <div class="meta">
    <div><span>{{ labels.period }}</span>{{ period.describe() }}</div>
    <div><span>{{ labels.generated }}</span>{{ fmt_time(report.generated_at, '%Y-%m-%d %H:%M') }}</div>
  </div>
</div>
{% if report.description %}<p class="desc">{{ report.description }}</p>{% endif %}
{% set stats = sections|selectattr('type', 'equalto', 'stat')|list %}
{% if stats %}
<div class="stats" style="grid-template-columns: repeat({{ [stats|length, 4]|min }}, 1fr)">
{% for s in stats %}
  <div class="stat">
    <div class="label">{{ s.title }}</div>
    <div class="value">{{ fmt_num(s.value) }} <span class="unit">{{ s.unit or '' }}</span></div>
    <div class="scope">{{ s.spec.get('aggregate') or 'avg' }} · {{ s.devices|length }} {{ labels.devices }}</div>
  </div>
{% endfor %}
</div>
{% endif %}
{% for s in sections if s.type != 'stat' %}
<div class="section{% if s.spec.get('page_break') %} break{% endif %}">
  <h2>{{ s.title }}</h2>
  {% if s.type == 'markdown' %}
    <div class="markdown">{{ markdown(s.text) }}</div>
  {% elif s.type == 'timeseries' %}
    {% set svg = chart(s) %}
    {% if svg %}<div class="chart">{{ svg }}</div>
    <p class="note">{{ ([s.note] if s.note else [])|join('') }}{% if s.note and s.bucket %} · {% endif %}{% if s.bucket %}{{ labels.bucket }} {{ duration(s.bucket) }}{% endif %}</p>
    {% else %}<p class="empty">{{ labels.no_data }}</p>{% endif %}
  {% else %}
    {% if s.table and s.table.rows %}
    <table>
      <thead><tr>{% for c in s.table.columns %}<th>{{ c }}</th>{% endfor %}</tr></thead>
      <tbody>
      {% for row in rows(s) %}
        <tr>{% for cell in row %}{{ td(s, loop.index0, cell) }}{% endfor %}</tr>
      {% endfor %}
      </tbody>
    </table>
    {% if hidden(s) %}<p class="note">{{ labels.more_rows.format(n=hidden(s)) }}</p>{% endif %}
    {% if s.unit %}<p class="note">{{ s.unit }}</p>{% endif %}
    {% else %}<p class="empty">{{ labels.no_data }}</p>{% endif %}
  {% endif %}
</div>
{% endfor %}
</body>
</html>
"""
