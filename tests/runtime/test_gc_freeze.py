"""twin/runtime/gc_freeze.py: what is alive is moved out of the collector's way, garbage first."""

from __future__ import annotations

import gc
import weakref

from twin.runtime.gc_freeze import freeze


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_freeze_collects_garbage_then_freezes_the_living() -> None:
    gc.unfreeze()
    try:
        kept = [_Cycle() for _ in range(100)]
        dropped = [weakref.ref(_Cycle()) for _ in range(100)]  # unreachable cycles
        assert any(r() is not None for r in dropped)  # only the collector frees them
        n = freeze()
        # (frozen objects that other threads drop since leave the count: >=, not ==)
        assert n >= gc.get_freeze_count() > 0 and n >= len(kept)
        assert all(r() is None for r in dropped)  # collected, not frozen
        # the living are in the permanent generation: no collection scans them
        assert not any(isinstance(o, _Cycle) for o in gc.get_objects())
        assert len(kept) == 100
    finally:
        gc.unfreeze()
