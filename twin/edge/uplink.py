"""The edge's uplink: drains the outbox to the cloud in batches, reconnects with backoff.

Each round builds one upload of at most ``batch`` records from two runs (see
``twin/edge/protocol.py``): the **live** run — records appended since the link came back
(sequence numbers from ``live_from``) — first, up to half the batch, and the **backlog** run
— the oldest unacknowledged records — filling the rest. So after an outage the backlog drains
at full batch size while live data reaches the cloud within one round, never behind the
backlog. The cloud's answer (``acked``, ``covered``) deletes the records from the outbox.

With nothing to send the uplink still uploads an empty batch every ``heartbeat`` seconds: the
cloud's link state (online, revision, outbox depth and age) stays current.

The upload goes through a transport (``twin/edge/transport.py``: HTTPS, or MQTT through a
broker — the same operations, the same acknowledgement by sequence number).

A failed upload (connection refused or reset, a timeout — a blackholed link —, a 5xx) marks the
link down and retries after a backoff (``initial`` doubling to ``max``, with jitter); records
stay in the outbox until acknowledged, so nothing is lost and the cloud's dedup makes the
re-sends harmless. A 4xx other than 429 (a bad key, an unknown edge) is logged once per
episode and retried with the maximal backoff: the operator fixes the cloud side, the edge
keeps buffering.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from twin.edge.connect import open_transport
from twin.edge.outbox import Outbox
from twin.edge.protocol import Covered
from twin.edge.transport import LinkDown, Transport

log = logging.getLogger(__name__)


class UplinkError(Exception):
    def __init__(self, message: str, *, permanent: bool = False, retry_after: float = 0) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.retry_after = retry_after


@dataclass
class Uplink:
    outbox: Outbox
    url: str
    edge: str
    key: str
    batch: int = 5000
    max_bytes: int = 8 << 20
    """Record bytes per upload (the cloud takes bodies up to 16 MiB)."""
    interval: float = 0.2
    timeout: float = 10.0
    heartbeat: float = 2.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    verify: Any = True
    transport: Transport | None = None
    """Default: :func:`~twin.edge.connect.open_transport` of ``url`` (HTTP(S) or MQTT)."""
    revision: Callable[[], int | None] = lambda: None
    extra_stats: Callable[[], dict[str, Any]] = dict
    online: bool = False
    uploads: int = 0
    failures: int = 0
    sent_records: int = 0
    last_ok: float | None = None
    last_error: str | None = None
    covered: Covered = field(default_factory=Covered)
    live_from: int = 0
    _wake: trio.Event = field(default_factory=trio.Event)

    def poke(self) -> None:
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.transport is None:
            self.transport = open_transport(self.url, self.edge, self.key, verify=self.verify,
                                            backoff=(self.backoff_initial, self.backoff_max))  # fmt: skip
        link = self.transport
        async with trio.open_nursery() as nursery:
            await nursery.start(link.run)
            task_status.started()
            delay = self.backoff_initial
            while True:
                try:
                    await self._session(link)
                except UplinkError as exc:
                    wait = self.backoff_max if exc.permanent else max(delay, exc.retry_after)
                    self._down(str(exc))
                except LinkDown as exc:
                    wait = delay
                    self._down(str(exc))
                await trio.sleep(wait * random.uniform(0.8, 1.2))
                delay = min(self.backoff_max, delay * 2)
                if self.online:
                    delay = self.backoff_initial

    def _down(self, why: str) -> None:
        self.failures += 1
        if self.online or self.last_error is None:
            log.warning("edge uplink to %s down: %s (%d records buffered)", self.url, why,
                        len(self.outbox))  # fmt: skip
        self.online = False
        self.last_error = why

    async def _session(self, client: Transport) -> None:
        """Upload rounds until one fails."""
        self.live_from = self.outbox.next_seq  # records from here on are "live"
        self.covered = Covered()
        last_upload = 0.0
        while True:
            runs, n = await self._build()
            now = time.monotonic()
            if n == 0 and now - last_upload < self.heartbeat and self.online:
                with trio.move_on_after(self.interval):
                    await self._next_record()
                continue
            await self._upload(client, runs)
            last_upload = time.monotonic()
            if n < self.batch // 2:  # caught up: wait a little for records to batch up
                with trio.move_on_after(self.interval):
                    await self._next_record()

    async def _next_record(self) -> None:
        async with trio.open_nursery() as n:
            async def one() -> None:
                await self.outbox.wait_for(self.outbox.durable_seq)
                n.cancel_scope.cancel()

            async def poked() -> None:
                await self._wake.wait()
                self._wake = trio.Event()
                n.cancel_scope.cancel()

            n.start_soon(one)
            n.start_soon(poked)

    async def _build(self) -> tuple[list[dict[str, Any]], int]:
        box = self.outbox
        cov = self.covered
        acked = box.acked_seq
        live_start = max(acked, self.live_from - 1)
        live = [s for s in box.pending(live_start, self.batch) if s not in cov]
        backlog = [s for s in box.pending(acked, self.batch) if s < self.live_from and s not in cov]
        if backlog:
            live = live[: self.batch // 2]
            backlog = backlog[: self.batch - len(live)]
        else:
            live = live[: self.batch]
        budget = self.max_bytes
        sizes = box.sizes
        live_cut = _fit(live, sizes, budget // 2 if backlog else budget)
        live = live[:live_cut]
        budget -= sum(sizes(s) for s in live)
        backlog = backlog[: _fit(backlog, sizes, budget)]
        groups = [g for g in (backlog, live) if g]
        if not groups:
            return [], 0
        runs: list[dict[str, Any]] = []
        for seqs in groups:
            records = await trio.to_thread.run_sync(box.read, seqs)
            if not records:
                continue
            runs.append({"after": box.previous(records[0][0]),
                         "records": [list(r) for r in records]})  # fmt: skip
        return runs, sum(len(r["records"]) for r in runs)

    def stats(self) -> dict[str, Any]:
        s = self.outbox.stats()
        s.update(self.extra_stats())
        return s

    async def _upload(self, client: Transport, runs: list[dict[str, Any]]) -> None:
        body = json.dumps({"revision": self.revision(), "stats": self.stats(), "runs": runs},
                          separators=(",", ":"), default=str).encode()  # fmt: skip
        resp = await client.request("batch", body, limit=self.timeout)
        if resp.status == 429 or resp.status >= 500:
            raise UplinkError(f"cloud answered {resp.status}: {resp.detail}",
                              retry_after=resp.retry_after)  # fmt: skip
        if resp.status >= 400:
            raise UplinkError(f"cloud refused the upload ({resp.status}): {resp.detail}",
                              permanent=True)  # fmt: skip
        ack = resp.body
        if not isinstance(ack, dict) or not isinstance(ack.get("acked"), int):
            raise UplinkError(f"the cloud's answer is not an acknowledgement: {resp.detail}")
        self.covered = Covered([(0, int(ack["acked"])), *ack.get("covered", [])])
        await self.outbox.acked(int(ack["acked"]), [tuple(x) for x in ack.get("covered", [])])
        self.uploads += 1
        self.sent_records += int(ack.get("accepted", 0))
        self.last_ok = time.time()
        if not self.online:
            log.info("edge uplink to %s up (%d records to send)", client.description,
                     len(self.outbox))  # fmt: skip
        self.online = True
        self.last_error = None


def _fit(seqs: list[int], size: Callable[[int], int], budget: int) -> int:
    """How many of ``seqs`` fit in ``budget`` bytes (at least one)."""
    total = 0
    for i, s in enumerate(seqs):
        total += size(s)
        if total > budget and i > 0:
            return i
    return len(seqs)


__all__ = ["Uplink", "UplinkError"]
