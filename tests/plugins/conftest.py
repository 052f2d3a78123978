from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from twin.registry import open_registry
from twin.registry.base import Registry


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    reg = open_registry(None, tmp_path / "state")
    try:
        yield reg
    finally:
        reg.close()
