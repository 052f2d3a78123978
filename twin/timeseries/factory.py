"""Open the time-series store an engine (or the CLI) uses.

``url`` is ``None``/``""``/``lance`` (LanceDB in ``<state_dir>/timeseries``), ``lance:PATH`` /
a filesystem path (LanceDB there), or ``postgresql://...`` (PostgreSQL). The environment
variable ``TWIN_TIMESERIES`` supplies the default, so ``twin up`` and ``twin query`` agree.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twin.timeseries.base import TimeSeriesStore

ENV = "TWIN_TIMESERIES"


def store_url(url: str | None = None) -> str | None:
    """The configured store URL: ``url``, else ``$TWIN_TIMESERIES``, else None (LanceDB)."""
    if url:
        return url
    return os.environ.get(ENV) or None


def describe(url: str | None, state_dir: Path) -> str:
    url = store_url(url)
    if url and url.startswith(("postgres://", "postgresql://")):
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        host = parts.hostname or "localhost"
        return f"postgresql://{host}{':' + str(parts.port) if parts.port else ''}{parts.path}"
    return f"lance:{lance_path(url, state_dir)}"


def lance_path(url: str | None, state_dir: Path) -> Path:
    if not url or url == "lance":
        return Path(state_dir) / "timeseries"
    if url.startswith("lance:"):
        return Path(url[len("lance:") :])
    return Path(url)


def open_store(url: str | None, state_dir: Path, **options: Any) -> TimeSeriesStore:
    """Open (creating if needed) the store; ``options`` go to the store's constructor."""
    url = store_url(url)
    if url and url.startswith(("postgres://", "postgresql://")):
        from twin.timeseries.postgres import PostgresStore

        pg_opts = {k: v for k, v in options.items() if k in ("prefix", "connect_timeout")}
        return PostgresStore(url, **pg_opts)
    from twin.timeseries.lance import LanceStore

    lance_opts = {k: v for k, v in options.items() if k not in ("prefix", "connect_timeout")}
    return LanceStore(lance_path(url, state_dir), **lance_opts)
