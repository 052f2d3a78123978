"""Errors of reports and notifications."""

from __future__ import annotations

from twin.errors import TwinError


class ReportError(TwinError):
    """A report could not be produced (bad template, no such report, bad period)."""


class DeliveryError(TwinError):
    """A channel could not deliver (SMTP refused, webhook answered 5xx, folder not writable).

    ``permanent``: retrying cannot help (a refused destination, a 4xx answer, bad credentials).
    """

    def __init__(self, message: str, *, hint: str | None = None, permanent: bool = False) -> None:
        super().__init__(message, hint=hint)
        self.permanent = permanent
