"""Authentication and authorisation: users, passwords, JWTs, sessions, device keys, roles.

- Passwords and device keys are hashed with argon2id (argon2-cffi). Device keys are 192-bit
  random secrets, so they use light argon2id parameters (``DEVICE_KEY_HASHER``: guessing is
  hopeless whatever the cost; ~100x cheaper to verify than a password); keys made with the
  default parameters still verify (the parameters live in the hash). Verified device keys are
  remembered in memory by the SHA-256 of the presented key, so ingest pays argon2 once per key
  and process; a revocation through the API drops the entry at once, one made elsewhere (the
  CLI) within ``KEY_CACHE_TTL`` seconds (``DeviceKeyVerifier.sweep``: one query).
- Access tokens are HS256 JWTs signed with a secret kept in the state directory
  (``<state_dir>/jwt.secret``, mode 0600), so tokens survive a restart.
- Refresh tokens are ``<session id>.<secret>``: random, stored as SHA-256 (high entropy, so a
  fast hash is the right tool), listed and revoked by an admin.
- Roles: ``viewer`` < ``operator`` < ``admin``; a user may be scoped to sites (empty = all).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from twin.errors import AuthError
from twin.registry.base import DeviceKey, Registry, Session, User

ROLES = ("viewer", "operator", "admin")
RANK = {r: i for i, r in enumerate(ROLES)}
ALGORITHM = "HS256"
ACCESS_TTL = 15 * 60.0
REFRESH_TTL = 30 * 86400.0
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


def load_secret(state_dir: str | Path) -> bytes:
    """The JWT signing secret, created on first use (0600)."""
    path = Path(state_dir) / "jwt.secret"
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex())
    return key


@dataclass(frozen=True)
class Principal:
    subject: str
    role: str
    sites: tuple[str, ...] = ()  # empty: every site
    session: str | None = None
    token_id: str | None = None

    def at_least(self, role: str) -> bool:
        return RANK.get(self.role, -1) >= RANK[role]

    def can_site(self, site: str | None) -> bool:
        """May act on objects of ``site`` (None: a global object such as a DeviceModel)."""
        if not self.sites:
            return True
        return site is not None and site in self.sites

    def visible_sites(self, wanted: Iterable[str] | None) -> set[str] | None:
        if not self.sites:
            return None if wanted is None else set(wanted)
        return set(self.sites) if wanted is None else set(wanted) & set(self.sites)


def make_user(name: str, password: str, role: str, sites: Iterable[str] = ()) -> User:
    if role not in RANK:
        raise AuthError(f"unknown role {role!r}", hint=f"use one of {', '.join(ROLES)}")
    return User(
        name=name,
        password_hash=hash_secret(password),
        role=role,
        sites=tuple(sites),
        created_at=time.time(),
    )


def issue_access_token(
    secret: bytes,
    user: User,
    *,
    ttl: float = ACCESS_TTL,
    session: str | None = None,
    now: float | None = None,
) -> str:
    now = time.time() if now is None else now
    claims: dict[str, Any] = {
        "sub": user.name,
        "role": user.role,
        "sites": list(user.sites),
        "typ": "access",
        "iat": int(now),
        "exp": int(now + ttl),
        "jti": uuid.uuid4().hex,
    }
    if session:
        claims["sid"] = session
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def decode_access_token(secret: bytes, token: str) -> dict[str, Any]:
    try:
        claims = jwt.decode(
            token, secret, algorithms=[ALGORITHM], options={"require": ["exp", "sub"]}
        )
    except jwt.ExpiredSignatureError as exc:
        raise AuthError("token expired", hint="log in again or use your refresh token") from exc
    except jwt.PyJWTError as exc:
        raise AuthError("invalid token") from exc
    if claims.get("typ") != "access":
        raise AuthError("not an access token")
    return claims


def create_session(
    registry: Registry, user: User, *, client: str = "", ttl: float = REFRESH_TTL
) -> str:
    """Create a refresh-token session; returns the refresh token (shown once)."""
    sid = uuid.uuid4().hex
    secret = secrets.token_urlsafe(32)
    now = time.time()
    registry.create_session(
        Session(
            id=sid,
            user=user.name,
            token_hash=sha256(secret),
            created_at=now,
            expires_at=now + ttl,
            client=client,
        )
    )
    return f"{sid}.{secret}"


def check_refresh(registry: Registry, refresh_token: str) -> tuple[Session, User]:
    sid, _, secret = refresh_token.partition(".")
    session = registry.get_session(sid) if sid and secret else None
    if session is None or not hmac.compare_digest(session.token_hash, sha256(secret)):
        raise AuthError("invalid refresh token")
    if session.revoked_at is not None:
        raise AuthError("session revoked", hint="log in again")
    if session.expires_at < time.time():
        raise AuthError("session expired", hint="log in again")
    user = registry.get_user(session.user)
    if user is None or user.disabled:
        raise AuthError("user no longer exists")
    return session, user


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

    ``cached`` answers from memory (no I/O, no argon2); ``check`` runs argon2 against the key
    records of the device (blocking: a worker thread); ``invalidate`` drops a revoked key at
    once; ``sweep`` (blocking) drops keys revoked by another process since the last sweep."""

    def __init__(self, registry: Registry, ttl: float = KEY_CACHE_TTL) -> None:
        self.registry = registry
        self.ttl = ttl
        self._ok: dict[str, tuple[str, str]] = {}  # sha256(key) -> (device, key id)
        self._swept = time.time()
        self.argon2_checks = 0

    def __len__(self) -> int:
        return len(self._ok)

    def cached(self, device: str, key: str, now: float | None = None) -> bool | None:
        """True/False if memory can answer, None when the key must be checked."""
        hit = self._ok.get(sha256(key))
        if hit is None:
            return None
        return hit[0] == device

    def check(self, device: str, key: str, records: Iterable[DeviceKey]) -> bool:
        """Blocking (argon2): is ``key`` one of ``records`` (the device's keys), unrevoked?"""
        parts = split_device_key(key)
        if parts is None:
            return False
        kid, secret = parts
        for rec in records:
            if rec.id != kid or rec.device != device or rec.revoked_at is not None:
                continue
            self.argon2_checks += 1
            if verify_secret(rec.key_hash, secret):
                self._ok[sha256(key)] = (device, kid)
                return True
        return False

    def verify(self, device: str, key: str, now: float | None = None) -> bool:
        """Blocking (registry + argon2): run in a worker thread."""
        if split_device_key(key) is None:
            return False
        ok = self.cached(device, key)
        if ok is not None:
            return ok
        return self.check(device, key, self.registry.device_keys(device))

    def invalidate(self, key_id: str) -> None:
        for digest, (_, kid) in list(self._ok.items()):
            if kid == key_id:
                del self._ok[digest]

    def sweep(self) -> int:
        """Blocking (one registry query): forget keys revoked since the last sweep."""
        since, self._swept = self._swept, time.time()
        revoked = set(self.registry.revoked_device_keys(since - 60.0))  # overlap: clock skew
        if not revoked or not self._ok:
            return 0
        before = len(self._ok)
        self._ok = {d: v for d, v in self._ok.items() if v[1] not in revoked}
        return before - len(self._ok)
