"""What a plugin call can fail with (one exception, its kind says why)."""

from __future__ import annotations

from twin.errors import TwinError

FAILURE_KINDS = ("trap", "fuel", "steps", "timeout", "memory", "output", "abi", "load", "worker",
                 "suspended", "unknown")


class PluginFailure(TwinError):
    """A plugin call (or load) failed; ``kind`` is one of :data:`FAILURE_KINDS`."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind if kind in FAILURE_KINDS else "unknown"
        self.message = message

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"
