"""Human output: plans, problems, tables. Colour when the terminal supports it."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from twin.errors import Problem, SpecError, TwinError
from twin.registry.base import Revision
from twin.spec.paths import format_path
from twin.spec.plan import MISSING, Action, Plan


def _console(stderr: bool = False) -> Console:
    probe = Console(stderr=stderr)
    # piped output is not cut at 80 columns; user text is never read as rich markup
    width = None if probe.is_terminal else 240
    return Console(stderr=stderr, highlight=False, soft_wrap=True, markup=False, width=width)


console = _console()
err_console = _console(stderr=True)

_SYMBOL = {Action.CREATE: ("+", "green"), Action.UPDATE: ("~", "yellow"),
           Action.DELETE: ("-", "red"), Action.KEEP: ("=", "dim")}


def json_text(value: Any, **kw: Any) -> str:
    """JSON for ``-o json``: never ``NaN``/``Infinity`` (invalid JSON a consumer would choke
    on); a non-finite number that slipped into stored data is an error here, not output."""
    from twin.spec.inputlimits import dumps

    try:
        return dumps(value, **kw)
    except ValueError as exc:
        raise TwinError(f"cannot print this as JSON: {exc} (a NaN or Infinity in stored data)",
                        hint="find it with `-o yaml` (it shows as .nan/.inf) and re-apply a "
                        "corrected spec") from None


def print_json(value: Any, con: Console | None = None, **kw: Any) -> None:
    """Print ``value`` as (strict, pretty) JSON."""
    (con or console).print_json(json_text(value, **kw))


def short(value: Any, limit: int = 70) -> str:
    if value is MISSING:
        return "(absent)"
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fmt_number(value: float, precision: int | None = None) -> str:
    """A measured value for people: ``precision`` decimals when the model declares them, else
    4 significant digits (never an exponent for ordinary magnitudes): 2.9148004503231064 →
    ``2.915``, 1234.5678 → ``1235``, 0.000123456 → ``0.0001235``."""
    if not math.isfinite(value):
        return str(value)
    if precision is None:
        if value == 0:
            return "0"
        magnitude = math.floor(math.log10(abs(value))) + 1
        digits = max(0, 4 - magnitude)
        if digits > 12:  # tiny: an exponent reads better than a row of zeros
            return f"{value:.4g}"
        text = f"{value:.{digits}f}"
        if "." in text:  # significant digits, not padding: 40.0 → 40
            text = text.rstrip("0").rstrip(".")
        return text.lstrip("-") if float(text) == 0 else text
    text = f"{value:.{precision}f}"
    return text.lstrip("-") if float(text) == 0 else text  # never "-0.00"


def fmt_value(value: Any, precision: int | None = None, limit: int = 70) -> str:
    """Any reported or desired value: numbers rounded (see :func:`fmt_number`), the rest JSON."""
    if isinstance(value, float):
        return fmt_number(value, precision)
    return short(value, limit)


def fmt_tags(encoded: Any) -> str:
    """The time-series TAGS column (``,critical,floor=1,hvac,``: delimited for matching) as
    ``critical, hvac, floor=1``: tags, then labels."""
    if not isinstance(encoded, str):
        return "" if encoded is None else str(encoded)
    items = [t for t in encoded.split(",") if t]
    return ", ".join([t for t in items if "=" not in t] + [t for t in items if "=" in t])


def print_problems(problems: Sequence[Problem], con: Console = err_console) -> None:
    for p in problems:
        line = Text()
        if p.location is not None:
            line.append(str(p.location), style="bold")
            line.append(": ")
        rest = str(Problem(None, p.message, p.kind, p.name, p.path))
        line.append(rest, style="red")
        con.print(line)
        if p.hint:
            con.print(Text(f"    hint: {p.hint}", style="cyan"))


def problems_summary(exc: SpecError) -> Text:
    """``✗ 1 problem found (12 follow-on problems suppressed)``, with the hint when suppressed."""
    n = len(exc.problems)
    line = Text(f"✗ {n} problem{'s' if n != 1 else ''} found", style="bold red")
    if exc.suppressed:
        s = exc.suppressed
        line.append(f" ({s} follow-on problem{'s' if s != 1 else ''} suppressed)", style="red")
        if exc.hint:
            line.append(f"\n    hint: {exc.hint}", style="cyan")
    return line


def plan_lines(plan: Plan, *, show_kept: bool = True) -> Iterable[Text]:
    for change in plan.changes:
        if change.action is Action.KEEP and not show_kept:
            continue
        sym, style = _SYMBOL[change.action]
        head = Text(f"{sym} {change.kind} {change.name}", style=f"bold {style}")
        if change.action is Action.KEEP:
            head.append("  (not in the files; left alone — use --prune to delete)", style="dim")
        yield head
        for f in change.fields:
            if f.path[-3:] == ("spec", "module", "data"):
                continue  # a Plugin's module content: its sha256 line says it changed
            path = format_path(f.path)
            if f.old is MISSING:
                yield Text(f"    + {path}: {short(f.new)}", style="green")
            elif f.new is MISSING:
                yield Text(f"    - {path}: {short(f.old)}", style="red")
            else:
                yield Text(f"    ~ {path}: {short(f.old)} → {short(f.new)}", style="yellow")


def plan_summary(plan: Plan) -> Text:
    c = plan.counts
    t = Text("Plan: ")
    t.append(f"{c['create']} to create", style="green")
    t.append(", ")
    t.append(f"{c['update']} to update", style="yellow")
    t.append(", ")
    t.append(f"{c['delete']} to delete", style="red")
    if c["keep"]:
        t.append(f", {c['keep']} left alone", style="dim")
    t.append(".")
    return t


def print_plan(plan: Plan, con: Console = console) -> None:
    if plan.empty:
        con.print(Text("No changes: the registry already matches the files.", style="green"))
        for line in plan_lines(plan):  # only kept objects remain: name them
            con.print(line)
        return
    for line in plan_lines(plan):
        con.print(line)
    con.print()
    con.print(plan_summary(plan))


def plan_json(plan: Plan) -> dict[str, Any]:
    return {
        "counts": plan.counts,
        "changes": [
            {
                "action": c.action.value,
                "kind": c.kind,
                "name": c.name,
                "fields": [
                    {"path": format_path(f.path),
                     "old": None if f.old is MISSING else f.old,
                     "new": None if f.new is MISSING else f.new,
                     "op": "add" if f.old is MISSING else "remove" if f.new is MISSING else "replace"}
                    for f in c.fields
                ],
            }
            for c in plan.changes
        ],
    }


def fmt_time(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def revision_dict(r: Revision) -> dict[str, Any]:
    return {"revision": r.number, "hash": r.hash, "created_at": r.created_at, "author": r.author,
            "message": r.message, "source": r.source, "created": r.created,
            "updated": r.updated, "deleted": r.deleted}


def history_table(revs: Sequence[Revision]) -> Table:
    t = Table(box=None, header_style="bold")
    for col in ("REV", "WHEN", "AUTHOR", "SOURCE", "CHANGES", "HASH", "MESSAGE"):
        t.add_column(col)
    for r in revs:
        t.add_row(str(r.number), fmt_time(r.created_at), r.author, r.source,
                  f"+{r.created} ~{r.updated} -{r.deleted}", r.hash[:12], r.message)
    return t


def rows_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    t = Table(box=None, header_style="bold")
    for col in columns:
        t.add_column(col.upper())
    for row in rows:
        t.add_row(*("-" if v is None or v == "" else str(v) for v in row))
    return t


@contextmanager
def progress(description: str) -> Any:
    """A rich progress display on stderr (hidden when stderr is not a terminal)."""
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
        disable=not err_console.is_terminal,
    ) as progress:
        task = progress.add_task(description, total=None)

        def step(text: str, done: int | None = None, total: int | None = None) -> None:
            progress.update(task, description=text, completed=done or 0, total=total)

        yield step
