"""Credentials kept in the registry: hashing and checking passwords and device keys.

Used by the HTTP API (logins, ingest) and by the MQTT broker's authentication, so it lives
below both. Passwords use argon2id with the library's defaults; device keys are 192-bit random
secrets, so they use light argon2id parameters (a brute force is infeasible either way) and a
verified key is remembered by its SHA-256 so a hot ingest path never runs argon2 twice.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable, Iterable

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from twin.registry.base import DeviceKey, Registry

KEY_CACHE_TTL = 10.0

_hasher = PasswordHasher()
DEVICE_KEY_HASHER = PasswordHasher(time_cost=1, memory_cost=4096, parallelism=1)


def hash_secret(secret: str) -> str:
    return _hasher.hash(secret)


def verify_secret(hashed: str, secret: str) -> bool:
    try:
        return _hasher.verify(hashed, secret)
    except (VerificationError, InvalidHashError):
        return False


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# -- device keys ----------------------------------------------------------------------------
KEY_PREFIX = "dk_"


def create_device_key(registry: Registry, device: str) -> tuple[DeviceKey, str]:
    """Create a key for ``device``; returns (record, the key itself: shown once)."""
    kid = secrets.token_hex(6)
    secret = secrets.token_urlsafe(24)
    record = DeviceKey(
        id=kid, device=device, key_hash=DEVICE_KEY_HASHER.hash(secret), created_at=time.time()
    )
    registry.add_device_key(record)
    return record, f"{KEY_PREFIX}{kid}_{secret}"


def split_device_key(key: str) -> tuple[str, str] | None:
    if not key.startswith(KEY_PREFIX):
        return None
    kid, sep, secret = key[len(KEY_PREFIX) :].partition("_")
    return (kid, secret) if sep and kid and secret else None


class DeviceKeyVerifier:
    """Verifies device keys: argon2 once per key, then a dict lookup by SHA-256 of the key.

    ``cached`` answers from memory (no I/O, no argon2) while the entry is fresh: verified, or
    confirmed by a ``sweep``, less than ``ttl`` seconds ago. A stale entry answers None, and
    ``verify`` then re-reads the key's record (one query, no argon2). So a key revoked by any
    process (the CLI, another engine, a device deleted through ``apply``) is refused within
    ``ttl`` whether or not anyone sweeps; ``sweep`` (blocking: one query for the keys revoked
    since the last one) keeps every entry fresh at once, and the services that hold a
    verifier run it every ``ttl / 2`` so the hot path never goes to the registry.
    ``invalidate`` drops a key revoked in this process at once."""

    def __init__(
        self,
        registry: Registry,
        ttl: float = KEY_CACHE_TTL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.ttl = ttl
        self.clock = clock
        # sha256(key) -> (device, key id, when it was last known to be valid)
        self._ok: dict[str, tuple[str, str, float]] = {}
        self._swept = clock()
        self.argon2_checks = 0

    def __len__(self) -> int:
        return len(self._ok)

    def _fresh(self, checked: float, now: float | None) -> bool:
        now = self.clock() if now is None else now
        return now - max(checked, self._swept) < self.ttl

    def cached(self, device: str, key: str, now: float | None = None) -> bool | None:
        """True/False if memory can answer, None when the key must be checked."""
        return self.cached_digest(device, sha256(key), now)

    def cached_digest(self, device: str, digest: str, now: float | None = None) -> bool | None:
        """As ``cached``, given the key's SHA-256 (what a long-lived connection keeps)."""
        hit = self._ok.get(digest)
        if hit is None or not self._fresh(hit[2], now):
            return None
        return hit[0] == device

    def check(self, device: str, key: str, records: Iterable[DeviceKey]) -> bool:
        """Blocking (argon2 unless the key was verified before): is ``key`` one of
        ``records`` (the device's keys), unrevoked?"""
        parts = split_device_key(key)
        if parts is None:
            return False
        kid, secret = parts
        digest = sha256(key)
        known = self._ok.get(digest)
        for rec in records:
            if rec.id != kid or rec.device != device or rec.revoked_at is not None:
                continue
            if known is not None and known[:2] == (device, kid):
                self._ok[digest] = (device, kid, self.clock())  # still valid: no argon2
                return True
            self.argon2_checks += 1
            if verify_secret(rec.key_hash, secret):
                self._ok[digest] = (device, kid, self.clock())
                return True
        self._ok.pop(digest, None)
        return False

    def verify(self, device: str, key: str, now: float | None = None) -> bool:
        """Blocking (registry + argon2): run in a worker thread."""
        if split_device_key(key) is None:
            return False
        ok = self.cached(device, key, now)
        if ok is not None:
            return ok
        return self.check(device, key, self.registry.device_keys(device))

    def invalidate(self, key_id: str) -> None:
        for digest, (_, kid, _t) in list(self._ok.items()):
            if kid == key_id:
                del self._ok[digest]

    def sweep(self) -> int:
        """Blocking (one registry query): forget keys revoked since the last sweep; the
        others are confirmed valid as of the query."""
        started = self.clock()
        since = self._swept
        revoked = set(self.registry.revoked_device_keys(since - 60.0))  # overlap: clock skew
        self._swept = started
        if not revoked or not self._ok:
            return 0
        before = len(self._ok)
        self._ok = {d: v for d, v in self._ok.items() if v[1] not in revoked}
        return before - len(self._ok)
