"""Login throttling and the aggregation of failed logins in the audit log.

:class:`LoginThrottle` counts failed logins per user name and per client address. A few
failures are free (``free_per_user``, ``free_per_address``); after that each further failure
doubles a lock-out (``base``, 2x, 4x ... up to ``cap`` seconds) during which a login for that
user, or from that address, is answered 429 with ``Retry-After`` *before* any argon2 work. Logins
still being verified count as failures until they end, so a burst of concurrent attempts cannot
slip past the limit while the first ones are hashing, and at most ``max_inflight`` logins per
user and per address are verified at once (the others: 429, retry in 1 s), so a flood from one
address queues at most that much argon2 work in front of everyone else's login;
``max_pending`` bounds the argon2 work queued by every address together. Unknown user names
are counted like known ones (the answer never tells which names exist). A success clears that user's count, not the address's. Entries
are forgotten ``forget_after`` seconds after their last failure; memory is bounded by
``max_keys``.

:class:`LoginAudit` keeps a flood out of the audit log: failed logins (401, each one a password
that was checked and bounded by the throttle) are counted per (user name, address), refused
ones (429) per address whatever the name (so cycling through names cannot make rows), and
written as one row per key and ``window`` — "n failures between first and last" — instead
of one row each.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Count:
    failures: int = 0
    pending: int = 0
    locked_until: float = 0.0
    last: float = 0.0


class LoginThrottle:
    def __init__(
        self,
        *,
        free_per_user: int = 5,
        free_per_address: int = 20,
        base: float = 1.0,
        cap: float = 900.0,
        forget_after: float = 3600.0,
        max_inflight: int = 2,
        max_pending: int = 64,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.free = {"user": free_per_user, "addr": free_per_address}
        self.base = base
        self.cap = cap
        self.forget_after = forget_after
        self.max_inflight = max_inflight
        self.max_pending = max_pending
        self.max_keys = max_keys
        self.clock = clock
        self.pending = 0
        self._counts: dict[tuple[str, str], _Count] = {}

    def _get(self, key: tuple[str, str], now: float) -> _Count:
        c = self._counts.get(key)
        if c is not None and not c.pending and now - c.last > self.forget_after:
            c = None
        if c is None:
            if len(self._counts) >= self.max_keys:
                self._prune(now)
            c = self._counts[key] = _Count(last=now)
        return c

    def _prune(self, now: float) -> None:
        self._counts = {
            k: c
            for k, c in self._counts.items()
            if c.pending or (now - c.last <= self.forget_after and c.locked_until > now)
        }
        if len(self._counts) >= self.max_keys:  # still full of live lock-outs: oldest go
            keep = sorted(self._counts.items(), key=lambda kv: kv[1].last)[self.max_keys // 2 :]
            self._counts = dict(keep)

    def _wait(self, kind: str, c: _Count, now: float) -> float:
        if c.locked_until > now:
            return c.locked_until - now
        if c.pending >= self.max_inflight:
            return 1.0
        if c.failures + c.pending >= self.free[kind] and c.pending:
            return 1.0  # its earlier attempts are still being verified
        return 0.0

    def begin(self, user: str, address: str) -> float:
        """Before verifying a password: 0 (go ahead: call :meth:`end` afterwards) or the
        seconds to wait (answer 429 with that ``Retry-After``; do not call ``end``)."""
        now = self.clock()
        if self.pending >= self.max_pending:
            return 1.0
        counts = [("user", self._get(("user", user), now)), ("addr", self._get(("addr", address), now))]
        wait = max(self._wait(kind, c, now) for kind, c in counts)
        if wait > 0:
            return wait
        for _, c in counts:
            c.pending += 1
        self.pending += 1
        return 0.0

    def end(self, user: str, address: str, ok: bool) -> None:
        now = self.clock()
        self.pending = max(0, self.pending - 1)
        for kind, value in (("user", user), ("addr", address)):
            c = self._get((kind, value), now)
            c.pending = max(0, c.pending - 1)
            if ok:
                if kind == "user":
                    c.failures, c.locked_until = 0, 0.0
                continue
            c.failures += 1
            c.last = now
            over = c.failures - self.free[kind]
            if over >= 0:
                c.locked_until = now + min(self.cap, self.base * 2.0 ** min(over, 32))

    @staticmethod
    def retry_after(wait: float) -> str:
        return str(max(1, math.ceil(wait)))


@dataclass
class _Failures:
    first: float
    last: float
    counts: dict[str, int] = field(default_factory=dict)  # status -> n
    names: dict[str, int] = field(default_factory=dict)  # refused rows: name -> n
    other_names: int = 0  # refused attempts beyond the first NAMES names


class LoginAudit:
    """Failed logins per (user, address), refused ones per address (user ``*``, with the
    first names tried in ``detail``), one audit row per key and ``window`` seconds."""

    NAMES = 20  # names listed in a refused-logins row

    def __init__(self, window: float = 60.0, clock: Callable[[], float] = time.time) -> None:
        self.window = window
        self.clock = clock
        self._open: dict[tuple[str, str], _Failures] = {}

    def failed(self, user: str, address: str, status: int) -> None:
        now = self.clock()
        key = ("*" if status == 429 else user, address)
        f = self._open.get(key)
        if f is None:
            f = self._open[key] = _Failures(now, now)
        f.last = now
        f.counts[str(status)] = f.counts.get(str(status), 0) + 1
        if key[0] == "*":
            if user in f.names or len(f.names) < self.NAMES:
                f.names[user] = f.names.get(user, 0) + 1
            else:
                f.other_names += 1

    def due(self, *, all: bool = False) -> list[tuple[str, str, dict[str, Any]]]:
        """The rows to write now: (user, address, detail) of every window that has closed
        (or every open one, with ``all``: at shutdown)."""
        now = self.clock()
        out = []
        for key, f in list(self._open.items()):
            if all or now - f.first >= self.window:
                del self._open[key]
                detail: dict[str, Any] = {
                    "address": key[1],
                    "failures": sum(f.counts.values()),
                    "by_status": dict(f.counts),
                    "first": f.first,
                    "last": f.last,
                }
                if key[0] == "*":
                    detail["users"] = dict(f.names)
                    detail["other_users_attempts"] = f.other_names
                out.append((key[0], key[1], detail))
        return out
