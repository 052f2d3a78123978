from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from twin.registry import open_registry
from twin.registry.base import Registry

# ffmpeg is a required peer (installed by .ci/run): these tests fail, never skip, without it
assert shutil.which("ffmpeg"), "ffmpeg is required for the video tests (apt-get install ffmpeg)"


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    reg = open_registry(None, tmp_path / "state")
    try:
        yield reg
    finally:
        reg.close()
