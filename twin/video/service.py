"""The video service: what the engine hands to camera bindings, and what the API reads.

One per engine (``engine.video``; camera bindings find it in ``BindingContext.video``):

* ``root``: ``<state dir>/video/<camera>/`` holds each camera's HLS window, recordings,
  saved snapshots and exported clips;
* ``secrets``: resolves the ``{secret: NAME}`` references in camera bindings;
* ``supervise``: the engine's :func:`twin.runtime.supervisor.supervise` with its supervision
  bound (``functools.partial``): each camera's ffmpeg (and a simulated camera's pusher) runs under
  it — logged, counted on /metrics, alarmed, restarted with backoff;
* ``cameras``: the running pipelines by camera name (the API serves their outputs).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from twin.spec.secrets import Secrets
from twin.video.pipeline import CameraPipeline
from twin.video.sources import SecretLookup

Supervise = Callable[..., Awaitable[None]]
"""``supervise(child, *, kind, name, site, policy)`` (twin.runtime.supervisor, bound)."""


class VideoService:
    def __init__(self, state_dir: Path | str, supervise: Supervise,
                 secrets: SecretLookup | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.root = self.state_dir / "video"
        self.supervise = supervise
        self.secrets: SecretLookup = secrets or Secrets(state_dir=self.state_dir)
        self.cameras: dict[str, CameraPipeline] = {}

    def camera_dir(self, name: str) -> Path:
        return self.root / name

    def get(self, name: str) -> CameraPipeline | None:
        return self.cameras.get(name)

    def status(self) -> dict[str, dict[str, Any]]:
        return {name: p.status() for name, p in sorted(self.cameras.items())}


__all__ = ["Supervise", "VideoService"]
