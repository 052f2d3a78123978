"""Open the time-series store an engine (or the CLI) uses.

``url`` is ``None``/``""``/``lance`` (LanceDB in ``<state_dir>/timeseries``), ``lance:PATH`` /
a filesystem path (LanceDB there), or ``postgresql://...`` (PostgreSQL). The environment
variable ``TWIN_TIMESERIES`` supplies the default, so ``twin up`` and ``twin query`` agree.

Hot/cold (LanceDB): aggregate tiers may live in a separate, colder directory —
``lance?cold=/mnt/archive/ts`` or ``lance:/var/twin/ts?cold=/mnt/archive/ts`` (the
``?cold=`` query is read only on ``lance`` URLs, so a bare path may contain ``?``), else
``$TWIN_TIMESERIES_COLD``, else a ``cold_path`` option to :func:`open_store`, which wins.
``raw`` and the metadata stay in the hot directory (see ``LanceStore``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from twin.timeseries.base import TimeSeriesStore

ENV = "TWIN_TIMESERIES"
COLD_ENV = "TWIN_TIMESERIES_COLD"


def store_url(url: str | None = None) -> str | None:
    """The configured store URL: ``url``, else ``$TWIN_TIMESERIES``, else None (LanceDB)."""
    if url:
        return url
    return os.environ.get(ENV) or None


def _is_postgres(url: str | None) -> bool:
    return bool(url and url.startswith(("postgres://", "postgresql://")))


def _split_lance(url: str | None) -> tuple[str | None, dict[str, list[str]]]:
    """``lance[:PATH]?cold=...`` -> (``lance[:PATH]``, query); other URLs unchanged."""
    if url and (url == "lance" or url.startswith(("lance:", "lance?"))) and "?" in url:
        base, _, query = url.partition("?")
        return base, parse_qs(query, keep_blank_values=True)
    return url, {}


def describe(url: str | None, state_dir: Path) -> str:
    url = store_url(url)
    if _is_postgres(url):
        from urllib.parse import urlsplit

        assert url is not None
        parts = urlsplit(url)
        host = parts.hostname or "localhost"
        return f"postgresql://{host}{':' + str(parts.port) if parts.port else ''}{parts.path}"
    cold = lance_cold_path(url)
    return f"lance:{lance_path(url, state_dir)}" + (f" (cold tiers: {cold})" if cold else "")


def lance_path(url: str | None, state_dir: Path) -> Path:
    """The (hot) directory of the LanceDB store."""
    url, _query = _split_lance(url)
    if not url or url == "lance":
        return Path(state_dir) / "timeseries"
    if url.startswith("lance:"):
        return Path(url[len("lance:") :])
    return Path(url)


def lance_cold_path(url: str | None) -> Path | None:
    """The cold directory for aggregate tiers: ``?cold=`` on the URL, else
    ``$TWIN_TIMESERIES_COLD``, else None (every tier in the hot directory)."""
    _base, query = _split_lance(store_url(url))
    cold = (query.get("cold") or [""])[-1] or os.environ.get(COLD_ENV) or ""
    return Path(cold) if cold else None


def open_store(url: str | None, state_dir: Path, **options: Any) -> TimeSeriesStore:
    """Open (creating if needed) the store; ``options`` go to the store's constructor."""
    url = store_url(url)
    if _is_postgres(url):
        from twin.timeseries.postgres import PostgresStore

        assert url is not None
        pg_opts = {k: v for k, v in options.items() if k in ("prefix", "connect_timeout")}
        return PostgresStore(url, **pg_opts)
    from twin.timeseries.lance import LanceStore

    lance_opts = {k: v for k, v in options.items() if k not in ("prefix", "connect_timeout")}
    if lance_opts.get("cold_path") is None:
        lance_opts["cold_path"] = lance_cold_path(url)
    return LanceStore(lance_path(url, state_dir), **lance_opts)
