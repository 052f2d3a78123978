"""One error tree for FLUX IoT.

::

    TwinError                     base of everything we raise on purpose
    ├── SpecError                 a spec set is invalid (carries every located problem)
    ├── RegistryError             the registry could not do what was asked
    │   ├── ConflictError         someone else applied first: re-plan and retry
    │   └── NotFoundError         no such revision / object
    ├── BindingError              a protocol binding failed
    │   ├── BindingTimeout        temporary: the peer did not answer in time
    │   └── BindingConnectError   temporary: the peer is unreachable
    ├── PortInUseError            a listener's port is taken
    ├── AuthError                 authentication / authorisation failed
    ├── CommandError              a command was rejected or failed
    └── StorageError              the time-series store failed (disk full, corruption ...)

Every error has a one-line ``str()`` and an optional ``hint`` that the CLI prints beneath it.
Errors that are worth retrying carry ``temporary = True`` (and maybe ``retry_after`` seconds).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class TwinError(Exception):
    """Base of every error FLUX IoT raises on purpose."""

    hint: str | None = None
    temporary: bool = False
    retry_after: float | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


@dataclass(frozen=True, order=True)
class Location:
    """A place in a source file (1-based line and column)."""

    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True)
class Problem:
    """One located validation problem.

    Rendered as ``file:line:col: Kind name: json.path: message`` with an optional hint.
    """

    location: Location | None
    message: str
    kind: str | None = None
    name: str | None = None
    path: str | None = None
    hint: str | None = None
    syntax: bool = False
    """The file could not be read as YAML: documents in it are missing, so problems elsewhere
    may only be echoes of this one. Such problems are reported first."""

    def __str__(self) -> str:
        parts = []
        if self.location is not None:
            parts.append(str(self.location))
        if self.kind:
            parts.append(f"{self.kind} {self.name}" if self.name else self.kind)
        if self.path:
            parts.append(self.path)
        parts.append(self.message)
        return ": ".join(parts)

    def sort_key(self) -> tuple[bool, str, int, int, str]:
        loc = self.location
        if loc is None:
            return (not self.syntax, "", 0, 0, self.message)
        return (not self.syntax, loc.file, loc.line, loc.col, self.message)


class SpecError(TwinError):
    """A spec set is invalid. ``problems`` holds every problem found, syntax errors first, then
    by location. ``suppressed`` counts follow-on problems left out because they are most likely
    echoes of a file that could not be parsed (a reference to a document that file defines)."""

    def __init__(self, problems: Sequence[Problem], *, hint: str | None = None,
                 suppressed: int = 0) -> None:
        self.problems = sorted(problems, key=Problem.sort_key)
        self.suppressed = suppressed
        n = len(self.problems)
        first = str(self.problems[0]) if self.problems else "invalid spec"
        msg = first if n == 1 else f"{n} problems; first: {first}"
        super().__init__(msg, hint=hint)


class RegistryError(TwinError):
    """The registry could not do what was asked."""


class ConflictError(RegistryError):
    """Another apply landed between plan and apply. Re-plan and try again."""

    temporary = True
    hint = "someone else applied meanwhile: run `twin plan` again and re-apply"


class NotFoundError(RegistryError):
    """No such revision or object."""


class BindingError(TwinError):
    """A protocol binding failed."""


class BindingTimeout(BindingError):
    temporary = True


class BindingConnectError(BindingError):
    temporary = True


class PortInUseError(TwinError):
    """A listener could not bind its port."""

    def __init__(self, host: str, port: int, what: str = "listener") -> None:
        super().__init__(
            f"{what}: address {host}:{port} is already in use",
            hint="stop whatever holds that port, or pick another with --listen HOST:PORT "
            "(port 0 picks a free one)",
        )
        self.host = host
        self.port = port


class AuthError(TwinError):
    """Authentication or authorisation failed."""


class CommandError(TwinError):
    """A command was rejected or failed."""


class StorageError(TwinError):
    """The time-series store failed (disk full, corruption, I/O)."""
