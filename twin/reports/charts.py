"""Charts of a report's time-series sections, drawn with matplotlib as SVG (vector: sharp at
any zoom, small). Text stays text (``svg.fonttype: none``), drawn by WeasyPrint with the
document's fonts (Noto CJK for Chinese labels): ten times fewer SVG nodes than glyph paths.

The x axis is in the report's time zone. Many series (more than ``data.MAX_LINES``) arrive
already summarised as a mean with a min-max band.
"""

from __future__ import annotations

import io
import threading
import zoneinfo
from datetime import datetime
from typing import Any

from twin.reports.model import SectionData

PALETTE = ["#1f5fa8", "#e07b00", "#2e9e5b", "#c23b3b", "#7a4fb3", "#8c6d31", "#d45fa6", "#5a5a5a"]
_LOCK = threading.Lock()  # pyplot's state is global: one figure at a time


def _setup() -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    rc = matplotlib.rcParams
    rc["svg.fonttype"] = "none"  # text as <text>: far fewer nodes; WeasyPrint draws it
    rc["font.family"] = ["DejaVu Sans", "Noto Sans CJK SC", "sans-serif"]
    rc["font.size"] = 8
    rc["axes.spines.top"] = False
    rc["axes.spines.right"] = False
    rc["axes.edgecolor"] = "#9aa4b1"
    rc["axes.labelcolor"] = "#333f4d"
    rc["xtick.color"] = "#4b5563"
    rc["ytick.color"] = "#4b5563"
    rc["axes.grid"] = True
    rc["grid.color"] = "#e3e8ee"
    rc["grid.linewidth"] = 0.6
    rc["svg.hashsalt"] = "flux-iot"  # deterministic ids


def chart_svg(section: SectionData, timezone: str, width: float = 7.2, height: float = 2.6,
              span: tuple[float, float] | None = None) -> str:
    """The section's series as an SVG document (empty string when it has no points); the x
    axis covers ``span`` (the report's period) when given."""
    if not any(s.ts for s in section.series):
        return ""
    with _LOCK:
        _setup()
        import matplotlib.dates as mdates
        import matplotlib.pyplot as plt

        zone = zoneinfo.ZoneInfo(timezone)
        fig, ax = plt.subplots(figsize=(width, height), dpi=100)
        try:
            span_data = 0.0
            for i, s in enumerate(section.series):
                if not s.ts:
                    continue
                color = PALETTE[i % len(PALETTE)]
                x: Any = [datetime.fromtimestamp(t, zone) for t in s.ts]
                span_data = max(span_data, s.ts[-1] - s.ts[0])
                y = [float("nan") if v is None else v for v in s.values]
                if s.low is not None and s.high is not None:
                    lo = [float("nan") if v is None else v for v in s.low]
                    hi = [float("nan") if v is None else v for v in s.high]
                    ax.fill_between(x, lo, hi, color=color, alpha=0.15, linewidth=0,
                                    label=f"{s.label.split(' (')[0]} min\u2013max")
                ax.plot(x, y, color=color, linewidth=1.3, label=s.label)
            if span is not None:
                lim: Any = (datetime.fromtimestamp(span[0], zone),
                            datetime.fromtimestamp(span[1], zone))
                ax.set_xlim(*lim)
                span_s = span[1] - span[0]
            else:
                span_s = span_data
            locator = mdates.AutoDateLocator(tz=zone, minticks=4, maxticks=9)
            ax.xaxis.set_major_locator(locator)
            fmt = "%H:%M" if span_s <= 2 * 86400 else "%d.%m"
            ax.xaxis.set_major_formatter(mdates.DateFormatter(fmt, tz=zone))
            if section.unit:
                ax.set_ylabel(section.unit)
            if span is None:
                ax.margins(x=0)
            n = len(section.series)
            if n > 1 or (section.series and section.series[0].low is not None):
                ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=min(4, n * 2),
                          frameon=False, fontsize=7)
            # fixed margins: tight_layout measures every text (slow) for the same result
            fig.subplots_adjust(left=0.08, right=0.96, top=0.96,
                                bottom=0.26 if ax.get_legend() is not None else 0.14)
            buf = io.StringIO()
            fig.savefig(buf, format="svg", metadata={"Date": None})
        finally:
            plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.find("<svg"):]


__all__ = ["chart_svg"]
