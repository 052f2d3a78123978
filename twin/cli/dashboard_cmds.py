"""``twin dashboard SITE``: the Streamlit dashboard (``dashboards/app.py``) as a subprocess.

Nothing here imports streamlit: the app runs in its own process (``python -m dashboards.serve
run``: Streamlit's command line, with the app's imports and site preloaded)
and reads the engine only through the REST API at ``--server``.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from twin.errors import TwinError


def app_path() -> Path:
    """``dashboards/app.py`` next to the twin package (a source checkout)."""
    path = Path(__file__).resolve().parents[2] / "dashboards" / "app.py"
    if not path.is_file():
        raise TwinError(
            f"cannot find the dashboard app at {path}",
            hint="run from a FLUX IoT source checkout with the dashboards extra installed",
        )
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def dashboard_command(
    site: Path | None,
    server: str,
    host: str,
    port: int,
    *,
    token: str | None = None,
    refresh: str | None = None,
) -> tuple[list[str], dict[str, str], str]:
    """The streamlit command line, its environment and the URL it will serve."""
    if importlib.util.find_spec("streamlit") is None:  # never imported here: it runs apart
        raise TwinError("streamlit is not installed", hint="pip install 'flux-iot[dashboards]'")
    port = port or free_port(host)
    cmd = [
        sys.executable, "-m", "dashboards.serve", "run", str(app_path()),
        "--server.address", host,
        "--server.port", str(port),
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
        "--server.fileWatcherType", "none",
        "--global.developmentMode", "false",
        "--client.toolbarMode", "minimal",
        "--runner.magicEnabled", "false",
        "--logger.level", "warning",
    ]  # fmt: skip
    env = dict(os.environ)
    env["FLUX_SERVER"] = server.rstrip("/")
    root = str(app_path().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    if site is not None:
        env["FLUX_SITE"] = str(site.resolve())
    if token:
        env["FLUX_TOKEN"] = token
    if refresh is not None:
        env["FLUX_REFRESH"] = refresh
    return cmd, env, f"http://{host}:{port}"


def start_dashboard(
    site: Path | None, server: str, host: str = "127.0.0.1", port: int = 0
) -> tuple[subprocess.Popen[bytes], str]:
    """Start the dashboard process (for ``twin up --dashboard``); the caller stops it."""
    from twin.cli.signals import die_with_parent

    cmd, env, url = dashboard_command(site, server, host, port)
    # preexec_fn: the kernel stops streamlit if `twin up` dies without cleaning up (SIGKILL)
    proc = _Dashboard(cmd, env=env, stdout=subprocess.DEVNULL, preexec_fn=die_with_parent)
    return proc, url


class _Dashboard(subprocess.Popen[bytes]):
    """``terminate()`` waits for streamlit and kills it if it lingers (open sessions)."""

    def terminate(self) -> None:
        super().terminate()
        try:
            self.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            self.kill()
            self.wait()


def dashboard(
    site: Annotated[
        Path | None, typer.Argument(help="Site folder (Dashboard documents, models, locations).")
    ] = None,
    server: Annotated[
        str, typer.Option("--server", envvar="TWIN_SERVER", help="API base URL of the engine.")
    ] = "http://127.0.0.1:8080",
    host: Annotated[str, typer.Option("--host", help="Address to serve on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port (0 picks a free one).")] = 0,
    token: Annotated[
        str | None,
        typer.Option("--token", envvar="TWIN_TOKEN", help="Access token (skips the login form)."),
    ] = None,
    refresh: Annotated[
        str | None, typer.Option("--refresh", help="Override the refresh interval (0 = off).")
    ] = None,
) -> None:
    """Open the Streamlit dashboard of SITE against a running engine's API."""
    from twin.cli import output

    cmd, env, url = dashboard_command(site, server, host, port, token=token, refresh=refresh)
    output.console.print(f"dashboard  {url}   (API {env['FLUX_SERVER']})", highlight=False)
    from twin.cli.signals import die_with_parent

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, preexec_fn=die_with_parent)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)  # a terminated `twin dashboard` stops streamlit too
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        stop_dashboard(proc)
        output.console.print("stopped.")
        return
    if code:
        raise typer.Exit(code)


def stop_dashboard(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if streamlit has not exited after ``grace`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def register(app: typer.Typer) -> None:
    app.command("dashboard")(dashboard)
