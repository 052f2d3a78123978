"""What the API keeps while it runs: its settings and :class:`ApiState` (the engine, the JWT
secret, rate limiters, caches of users, sessions and verified device keys).

One ``ApiState`` per app, reachable from a route as ``request.app.state.api`` (the
:data:`twin.api.deps.State` dependency hands it over).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from twin.api import auth
from twin.api.ratelimit import Rate, RateLimiter
from twin.errors import AuthError
from twin.registry.base import User
from twin.runtime.engine import Engine

log = logging.getLogger(__name__)


@dataclass
class ApiSettings:
    state_dir: Path = Path(".twin")
    rate_per_token: Rate = field(default_factory=lambda: Rate(100.0, 400.0))
    rate_per_client: Rate = field(default_factory=lambda: Rate(200.0, 800.0))
    rate_ingest_per_device: Rate = field(default_factory=lambda: Rate(100.0, 400.0))
    access_ttl: float = auth.ACCESS_TTL
    refresh_ttl: float = auth.REFRESH_TTL
    ws_buffer: int = 1000
    user_cache_ttl: float = 5.0
    reload_wait: float = 5.0


class ApiState:
    def __init__(self, engine: Engine, settings: ApiSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.secret = auth.load_secret(settings.state_dir)
        self.by_token = RateLimiter(settings.rate_per_token)
        self.by_client = RateLimiter(settings.rate_per_client)
        self.by_device = RateLimiter(settings.rate_ingest_per_device)
        self.keys = auth.DeviceKeyVerifier(engine.registry)
        # argon2 (logins, new device keys) gets its own threads: it never holds a registry slot
        self.hash_limiter = trio.CapacityLimiter(2)
        self._verifying: dict[tuple[str, str], trio.Event] = {}
        self._users: dict[str, tuple[User | None, float]] = {}
        self._sessions: dict[str, tuple[bool, float]] = {}
        self._list_cache: tuple[int, list[tuple[str, dict[str, Any]]]] = (-1, [])

    async def call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return await self.engine.rio.call(fn, *args, **kw)

    async def hash_call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """CPU-bound hashing (argon2) in a worker thread of its own limiter."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self.hash_limiter)

    async def check_device_key(self, device: str, key: str) -> bool:
        """Memory first (no I/O); else the device's key records (registry thread) and argon2
        (hash thread), once for concurrent requests with the same key."""
        ok = self.keys.cached(device, key)
        if ok is not None:
            return ok
        if auth.split_device_key(key) is None:
            return False
        slot = (device, auth.sha256(key))
        pending = self._verifying.get(slot)
        if pending is not None:
            await pending.wait()
            return bool(self.keys.cached(device, key))
        done = self._verifying[slot] = trio.Event()
        try:
            records = await self.call(self.engine.registry.device_keys, device)
            return bool(await self.hash_call(self.keys.check, device, key, records))
        finally:
            del self._verifying[slot]
            done.set()

    async def sweep_keys(self) -> None:
        """Forget device keys revoked by another process (the CLI), every ``keys.ttl``."""
        while True:
            await trio.sleep(self.keys.ttl)
            try:
                dropped = await self.call(self.keys.sweep)
                if dropped:
                    log.info("api: %d revoked device key(s) dropped from the cache", dropped)
            except Exception:
                log.exception("api: device key sweep failed")

    async def user(self, name: str) -> User | None:
        hit = self._users.get(name)
        now = time.monotonic()
        if hit is not None and now - hit[1] < self.settings.user_cache_ttl:
            return hit[0]
        user = await self.call(self.engine.registry.get_user, name)
        self._users[name] = (user, now)
        return user

    async def session_alive(self, sid: str) -> bool:
        hit = self._sessions.get(sid)
        now = time.monotonic()
        if hit is not None and now - hit[1] < self.settings.user_cache_ttl:
            return hit[0]
        s = await self.call(self.engine.registry.get_session, sid)
        alive = s is not None and s.revoked_at is None and s.expires_at > time.time()
        self._sessions[sid] = (alive, now)
        return alive

    def forget(self, user: str | None = None, session: str | None = None) -> None:
        if user:
            self._users.pop(user, None)
        if session:
            self._sessions.pop(session, None)

    async def authenticate(self, token: str | None) -> auth.Principal:
        if not token:
            raise AuthError("missing bearer token", hint="log in at POST /api/v1/auth/login")
        claims = auth.decode_access_token(self.secret, token)
        user = await self.user(str(claims["sub"]))
        if user is None or user.disabled:
            raise AuthError("unknown or disabled user")
        sid = claims.get("sid")
        if sid and not await self.session_alive(str(sid)):
            raise AuthError("session revoked")
        return auth.Principal(user.name, user.role, tuple(user.sites), sid, claims.get("jti"))

    def devices_sorted(self) -> list[tuple[str, dict[str, Any]]]:
        rev = self.engine.revision_number
        if self._list_cache[0] != rev:
            devs = sorted((n, d) for (k, n), d in self.engine.specs.items() if k == "Device")
            self._list_cache = (rev, devs)
        return self._list_cache[1]
