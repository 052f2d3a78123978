"""The CLI's session state (the global options): the registry URL and state dir, the
registry and time-series store they open; reading a site with a progress display. Every
command module imports it from here (twin/cli/main.py only registers the command modules)."""

from __future__ import annotations

import getpass
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from twin.cli import output as out
from twin.errors import TwinError


class State:
    registry_url: str | None = None
    state_dir: Path = Path(".twin")
    debug: bool = False
    _registry: Any = None

    def registry(self) -> Any:
        if self._registry is None:
            from twin.registry import open_registry

            with spinner("opening registry"):
                self._registry = open_registry(self.registry_url, self.state_dir)
        return self._registry


state = State()


def author() -> str:
    return os.environ.get("TWIN_AUTHOR") or f"{getpass.getuser()}@{socket.gethostname()}"


@contextmanager
def spinner(what: str) -> Iterator[None]:
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=out.err_console, transient=True,
                  disable=not out.err_console.is_terminal) as progress:
        progress.add_task(what, total=None)
        yield


def load(paths: list[Path]) -> Any:
    from twin.spec import load_site

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total} files"), TimeElapsedColumn(),
                  console=out.err_console, transient=True,
                  disable=not out.err_console.is_terminal) as progress:
        task = progress.add_task("reading and validating specs", total=None)

        def tick(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        return load_site(paths, progress=tick, cache_dir=state.state_dir / "cache")


def open_timeseries(timeseries: str | None) -> Any:
    from twin.errors import StorageError
    from twin.timeseries.factory import lance_path, open_store, store_url

    url = store_url(timeseries)
    st = state
    if not (url and url.startswith(("postgres://", "postgresql://"))):
        path = lance_path(url, st.state_dir)
        if not path.exists():
            raise TwinError(
                f"no time-series store at {path}",
                hint="run `twin up` (it stores readings there), or pass --state-dir / "
                "--timeseries / --server",
            )
    try:
        return open_store(url, st.state_dir)
    except StorageError as exc:
        raise TwinError(str(exc), hint=exc.hint) from exc
