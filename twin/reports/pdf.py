"""PDF: the report as HTML (the built-in layout or the site's Jinja2 template) printed by
WeasyPrint, charts inline as SVG. Fonts are embedded as subsets (WeasyPrint's default); the
document's ``lang`` (``language: zh-CN``) makes Pango pick the CJK glyphs of Noto Sans CJK.

A template error at render time (an undefined name, a failing filter) is reported as
``FILE:LINE: template error: ...`` — the template's own file and line.
"""

from __future__ import annotations

import base64
import html
import logging
import math
import re
import traceback
from collections.abc import Callable
from typing import Any

from markupsafe import Markup

from twin.reports.charts import chart_svg
from twin.reports.errors import ReportError
from twin.reports.layout import BUILTIN, labels
from twin.reports.model import NUMBER, TIME, ReportData, SectionData

PDF_ROWS = 200
"""Rows of one table a PDF shows; the XLSX / CSV exports hold them all."""
BUILTIN_NAME = "<built-in layout>"


def fmt_num(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "\u2013"
    if isinstance(value, int | float) and not isinstance(value, bool):
        v = float(value)
        if v == int(v) and abs(v) < 1e15:
            return f"{int(v):,}"
        if abs(v) >= 100:
            return f"{v:,.1f}"
        return f"{v:,.2f}"
    return str(value)


def duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)} {unit}"
    return f"{seconds:g} s"


def _markdown(text: str | None) -> Markup:
    """A small, safe subset: paragraphs, **bold**, *italic*, `code`, lines starting with '- '."""
    out: list[str] = []
    for block in re.split(r"\n\s*\n", text or ""):
        lines = [ln.rstrip() for ln in block.strip().splitlines()]
        if not lines:
            continue

        def inline(s: str) -> str:
            s = html.escape(s)
            s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
            s = re.sub(r"\*(.+?)\*", r"<em>\1</em>", s)
            return re.sub(r"`(.+?)`", r"<code>\1</code>", s)

        if all(ln.lstrip().startswith("- ") for ln in lines):
            out.append("<ul>" + "".join(f"<li>{inline(ln.lstrip()[2:])}</li>" for ln in lines)
                       + "</ul>")
        else:
            out.append("<p>" + "<br>".join(inline(ln) for ln in lines) + "</p>")
    return Markup("".join(out))


def helpers(data: ReportData) -> dict[str, Callable[..., Any]]:
    period = data.period

    def fmt_time(ts: float | None, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
        if ts is None:
            return "\u2013"
        return period.local(float(ts)).strftime(fmt)

    def rows(s: SectionData) -> list[list[Any]]:
        return s.table.rows[:PDF_ROWS] if s.table else []

    def hidden(s: SectionData) -> int:
        return max(0, len(s.table.rows) - PDF_ROWS) if s.table else 0

    def td(s: SectionData, i: int, cell: Any) -> Markup:
        kind = s.table.kinds[i] if s.table else ""
        col = s.table.columns[i] if s.table else ""
        if kind == TIME:
            return Markup('<td class="time">{}</td>').format(fmt_time(cell, "%m-%d %H:%M:%S"))
        if kind == NUMBER and isinstance(cell, int | float):
            return Markup('<td class="num">{}</td>').format(fmt_num(cell))
        cls = {"severity": "sev-", "status": "status-", "state": "status-"}.get(col)
        if cls and cell:
            return Markup('<td class="{}{}">{}</td>').format(cls, cell, cell)
        return Markup("<td>{}</td>").format("" if cell is None else cell)

    def chart(s: SectionData) -> Markup:
        """The chart as an <img> of an SVG data URL: WeasyPrint draws it as an image, without
        running the document's CSS over every SVG node."""
        svg = chart_svg(s, period.timezone, span=(period.start, period.end))
        if not svg:
            return Markup("")
        data = base64.b64encode(svg.encode()).decode()
        return Markup('<img class="chart-img" alt="{}" src="data:image/svg+xml;base64,{}">'
                      ).format(s.title, data)

    return {
        "fmt_time": fmt_time,
        "fmt_num": fmt_num,
        "rows": rows,
        "hidden": hidden,
        "td": td,
        "chart": chart,
        "markdown": _markdown,
        "duration": duration,
    }


def _template_line(exc: BaseException, name: str) -> int | None:
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == name:
            line = frame.lineno
    return line


def render_html(data: ReportData) -> str:
    import jinja2

    layout = data.spec.get("layout") or {}
    source = layout.get("source")
    name = str(layout.get("source_file") or layout.get("template") or BUILTIN_NAME)
    if not isinstance(source, str):
        source, name = BUILTIN, BUILTIN_NAME
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(lambda n: (source, name, lambda: True) if n == name else None),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    context = {
        "report": data,
        **data.as_context(),
        "labels": labels(data.language),
        "page_size": str(layout.get("page_size") or "A4"),
        "extra_css": Markup(str(layout.get("stylesheet") or "")),
        **helpers(data),
    }
    try:
        return env.get_template(name).render(context)
    except jinja2.TemplateSyntaxError as exc:
        raise ReportError(f"{name}:{exc.lineno}: template syntax error: {exc.message}") from exc
    except Exception as exc:
        line = _template_line(exc, name)
        where = f"{name}:{line}" if line else name
        raise ReportError(
            f"{where}: template error: {type(exc).__name__}: {exc}",
            hint="names a template sees: report, sections, period, labels, fmt_time, fmt_num, "
            "chart, rows, markdown",
        ) from exc


def render_pdf(data: ReportData) -> bytes:
    from weasyprint import HTML
    from weasyprint.text.fonts import FontConfiguration

    document = render_html(data)
    # matplotlib's SVG styles use SVG presentation properties WeasyPrint's CSS parser warns
    # about one by one (they are applied by its SVG renderer all the same)
    logging.getLogger("weasyprint").setLevel(logging.ERROR)
    fonts = FontConfiguration()
    pdf: bytes = HTML(string=document).write_pdf(font_config=fonts)
    return pdf


__all__ = ["PDF_ROWS", "fmt_num", "render_html", "render_pdf"]
