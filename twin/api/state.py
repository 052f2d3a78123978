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

import httpx
import trio

from twin.api import auth
from twin.api.limits import Limits
from twin.api.ratelimit import Rate, RateLimiter
from twin.api.throttle import LoginAudit, LoginThrottle
from twin.errors import AuthError
from twin.registry.base import User
from twin.runtime.engine import Engine

log = logging.getLogger(__name__)

PEER_TIMEOUT = 10.0
"""Seconds a forwarded request may take at the owner engine (then 503)."""


@dataclass
class ApiSettings:
    state_dir: Path = Path(".twin")
    rate_per_token: Rate = field(default_factory=lambda: Rate(100.0, 400.0))
    rate_per_client: Rate = field(default_factory=lambda: Rate(200.0, 800.0))
    rate_ingest_per_device: Rate = field(default_factory=lambda: Rate(100.0, 400.0))
    access_ttl: float = auth.ACCESS_TTL
    refresh_ttl: float = auth.REFRESH_TTL
    ws_buffer: int = 1000
    user_cache_ttl: float = 5.0  # a revocation made by another process holds within this
    reload_wait: float = 5.0
    # failed logins: free ones per user / per address, then a doubling lock-out up to the cap
    login_free_per_user: int = 5
    login_free_per_address: int = 20
    login_backoff_cap: float = 900.0
    login_audit_window: float = 60.0  # failed logins: one audit row per user/address/window
    body_limits: Limits = field(default_factory=Limits.from_env)
    # ingest answered by twin/api/frontdoor.py before hypercorn (False: hypercorn serves all)
    front_door: bool = True
    # the front door's guards against slow or too many clients (twin/api/frontdoor.py): a
    # request head not complete this long after its first byte, or a body not complete this
    # long after its head, is a 408; above max_connections open connections a new one gets 503
    request_head_timeout: float = 10.0
    request_body_timeout: float = 30.0
    max_connections: int = 2048


class ApiState:
    def __init__(self, engine: Engine, settings: ApiSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.front_door: Any = None  # the FrontDoor answering this API's connections, if any
        self.secret = auth.load_secret(settings.state_dir)
        self.by_token = RateLimiter(settings.rate_per_token)
        self.by_client = RateLimiter(settings.rate_per_client)
        self.by_device = RateLimiter(settings.rate_ingest_per_device)
        self.keys = auth.DeviceKeyVerifier(engine.registry)
        # argon2 (logins, new device keys) gets its own threads: it never holds a registry slot
        self.hash_limiter = trio.CapacityLimiter(2)
        self._verifying: dict[tuple[str, str], trio.Event] = {}
        self._keys_revision = engine.revision_number
        self._users: dict[str, tuple[User | None, float]] = {}
        self._sessions: dict[str, tuple[bool, float]] = {}
        self._tokens: dict[str, tuple[bool, float]] = {}
        self.logins = LoginThrottle(
            free_per_user=settings.login_free_per_user,
            free_per_address=settings.login_free_per_address,
            cap=settings.login_backoff_cap,
        )
        self.login_audit = LoginAudit(settings.login_audit_window)
        auth.dummy_hash()  # made now, so the first unknown-user login costs what the others do
        self._list_cache: tuple[int, list[tuple[str, dict[str, Any]]]] = (-1, [])
        self._peers: httpx.AsyncClient | None = None

    def peers(self) -> httpx.AsyncClient:
        """The HTTP client for requests to the other engines of the cluster (twin/api/owner.py):
        one per API, its connections to each engine kept; closed by :meth:`aclose`."""
        if self._peers is None:
            self._peers = httpx.AsyncClient(timeout=PEER_TIMEOUT)
        return self._peers

    async def aclose(self) -> None:
        """At the API's shutdown: close the connections to the other engines."""
        peers, self._peers = self._peers, None
        if peers is not None:
            await peers.aclose()

    async def call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return await self.engine.rio.call(fn, *args, **kw)

    async def hash_call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """CPU-bound hashing (argon2) in a worker thread of its own limiter."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self.hash_limiter)

    async def check_device_key(self, device: str, key: str) -> bool:
        """Memory first (no I/O); else the device's key records (registry thread) and argon2
        (hash thread), once for concurrent requests with the same key. After the engine loads
        a new revision, the cache is swept first: a device deleted in it took its keys along,
        and one re-created under the same name must not find them in memory."""
        rev = self.engine.revision_number
        if rev != self._keys_revision:
            self._keys_revision = rev
            await self.call(self.keys.sweep)
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
        """Every ``keys.ttl / 2``: forget device keys revoked by another process (the CLI, a
        device deleted through apply), which also keeps the valid ones fresh in the cache;
        write the audit rows of failed logins whose window has closed."""
        try:
            while True:
                await trio.sleep(self.keys.ttl / 2)
                self.flush_login_audit()
                try:
                    dropped = await self.call(self.keys.sweep)
                    if dropped:
                        log.info("api: %d revoked device key(s) dropped from the cache", dropped)
                except Exception:
                    log.exception("api: device key sweep failed")
        finally:
            self.flush_login_audit(all=True)

    def flush_login_audit(self, *, all: bool = False) -> None:
        rows = self.login_audit.due(all=all)
        if not rows:
            return
        now = time.time()

        def write(reg: Any) -> None:
            for user, _address, detail in rows:
                reg.audit(user, "POST /api/v1/auth/login", user, "failed", now, detail)

        self.engine.writer.put(write)

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

    async def api_token_alive(self, tid: str) -> bool:
        hit = self._tokens.get(tid)
        now = time.monotonic()
        if hit is not None and now - hit[1] < self.settings.user_cache_ttl:
            return hit[0]
        t = await self.call(self.engine.registry.get_api_token, tid)
        alive = t is not None and t.revoked_at is None and t.expires_at > time.time()
        self._tokens[tid] = (alive, now)
        return alive

    def forget(
        self, user: str | None = None, session: str | None = None, token: str | None = None
    ) -> None:
        """Drop cached answers after a change made here (the API), so it holds at once;
        one made by another process holds within ``user_cache_ttl``."""
        if user:
            self._users.pop(user, None)
        if session:
            self._sessions.pop(session, None)
        if token:
            self._tokens.pop(token, None)

    async def authenticate(self, token: str | None) -> auth.Principal:
        """The principal of a bearer token: its signature and expiry, then its user (same
        id, same generation, not disabled) and its session or API-token record (unrevoked)."""
        if not token:
            raise AuthError("missing bearer token", hint="log in at POST /api/v1/auth/login")
        claims = auth.decode_access_token(self.secret, token)
        user = auth.check_claims(claims, await self.user(str(claims["sub"])))
        sid = claims.get("sid")
        if sid and not await self.session_alive(str(sid)):
            raise AuthError("session revoked", hint="log in again")
        tid = claims.get("tid")
        if tid and not await self.api_token_alive(str(tid)):
            raise AuthError("token revoked")
        return auth.Principal(
            user.name,
            user.role,
            tuple(user.sites),
            sid,
            claims.get("jti"),
            api_token=tid,
            user_id=user.id,
            generation=user.generation,
        )

    async def still_valid(self, p: auth.Principal) -> bool:
        """For long-lived connections (the WebSocket): do the credentials ``p`` was made from
        still hold — same user id and generation, not disabled, same role and sites, session
        or token record unrevoked? (Expiry is checked at connect only.)"""
        user = await self.user(p.subject)
        if (
            user is None
            or user.disabled
            or (user.id, user.generation) != (p.user_id, p.generation)
            or (user.role, tuple(user.sites)) != (p.role, p.sites)
        ):
            return False
        if p.session and not await self.session_alive(p.session):
            return False
        return not (p.api_token and not await self.api_token_alive(p.api_token))

    def devices_sorted(self) -> list[tuple[str, dict[str, Any]]]:
        rev = self.engine.revision_number
        if self._list_cache[0] != rev:
            devs = sorted((n, d) for (k, n), d in self.engine.specs.items() if k == "Device")
            self._list_cache = (rev, devs)
        return self._list_cache[1]
