"""Short full garbage collections for a latency-sensitive engine (the edge: local scenes
react offline within milliseconds).

Python's cyclic collector pauses the event loop's thread for a full (generation 2) collection
in proportion to every tracked object alive — the engine's modules, specs, registry rows,
device twins — although almost all of them live as long as the process. Measured on
``benchmarks/edge/scene.py``: full collections of 140-190 ms, each one a reading → command
reaction that late. :func:`freeze` moves everything alive into the permanent generation
(``gc.freeze``): later collections scan only what was allocated since. Reference counting still
frees frozen objects that are dropped; only a frozen *cycle* would never be collected, which
is why :func:`keep_frozen` freezes once the engine is up and again only when a new revision
has been running for a while (its documents are as long-lived as the first ones).
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

import trio

log = logging.getLogger(__name__)


def freeze() -> int:
    """Collect what is garbage now, then freeze the rest; returns the objects frozen."""
    t = time.perf_counter()
    gc.collect()
    gc.freeze()
    n = gc.get_freeze_count()
    log.debug("gc: %d objects frozen (%.0f ms)", n, (time.perf_counter() - t) * 1e3)
    return n


async def keep_frozen(engine: Any, settle: float = 5.0) -> None:
    """Freeze ``settle`` s after the engine is up, and ``settle`` s after each new revision."""
    frozen = None
    while True:
        await trio.sleep(settle)
        rev = engine.revision_number
        if rev != frozen:
            await trio.sleep(settle)  # devices and scenes of the revision started meanwhile
            if engine.revision_number == rev:
                freeze()
                frozen = rev


__all__ = ["freeze", "keep_frozen"]
