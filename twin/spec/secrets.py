"""Secret references: ``{secret: plant-a/plc}`` resolved outside git, never inline.

Resolution order for a reference ``NAME``:

1. the environment variable ``TWIN_SECRET_<NAME>`` with every character that is not a letter
   or digit replaced by ``_`` and upper-cased (``plant-a/plc`` → ``TWIN_SECRET_PLANT_A_PLC``);
2. a secrets file: YAML mapping ``NAME: value``, from ``TWIN_SECRETS_FILE`` or, by default,
   ``<state dir>/secrets.yaml``. The file must not be readable by group or others (mode 0600):
   a world-readable secrets file is refused with a hint.

Unresolvable references raise ``SpecError`` listing every missing name with where it is used.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from twin.errors import Problem, SpecError, TwinError


def env_name(ref: str) -> str:
    return "TWIN_SECRET_" + re.sub(r"[^A-Za-z0-9]", "_", ref).upper()


def iter_refs(value: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """Every ``{secret: NAME}`` inside a document, with its path."""
    if isinstance(value, Mapping):
        if set(value) == {"secret"} and isinstance(value["secret"], str):
            yield path, value["secret"]
            return
        for k, v in value.items():
            yield from iter_refs(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from iter_refs(v, (*path, i))


class Secrets:
    def __init__(self, file: str | Path | None = None, environ: Mapping[str, str] | None = None,
                 state_dir: str | Path = ".twin") -> None:
        self.environ = os.environ if environ is None else environ
        chosen = file or self.environ.get("TWIN_SECRETS_FILE")
        self.file = Path(chosen) if chosen else Path(state_dir) / "secrets.yaml"
        self._values: dict[str, str] | None = None

    def _load(self) -> dict[str, str]:
        if self._values is not None:
            return self._values
        self._values = {}
        try:
            st = self.file.stat()
        except FileNotFoundError:
            return self._values
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise TwinError(f"secrets file {self.file} is readable by other users",
                            hint=f"chmod 600 {self.file}")
        data = yaml.safe_load(self.file.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise TwinError(f"secrets file {self.file} must be a mapping of name: value")
        self._values = {str(k): str(v) for k, v in data.items()}
        return self._values

    def get(self, ref: str) -> str | None:
        value = self.environ.get(env_name(ref))
        if value is not None:
            return value
        return self._load().get(ref)

    def resolve(self, doc: Mapping[str, Any]) -> dict[tuple[str | int, ...], str]:
        """Every secret a document references, resolved; SpecError names the missing ones."""
        out: dict[tuple[str | int, ...], str] = {}
        missing: list[Problem] = []
        meta = doc.get("metadata") or {}
        for path, ref in iter_refs(doc.get("spec") or {}, ("spec",)):
            value = self.get(ref)
            if value is None:
                from twin.spec.paths import format_path

                missing.append(Problem(None, f"secret {ref!r} is not set", doc.get("kind"),
                                       meta.get("name"), format_path(path),
                                       hint=f"export {env_name(ref)}=... or add it to {self.file}"))
            else:
                out[path] = value
        if missing:
            raise SpecError(missing)
        return out
