"""Authentication and authorisation: users, passwords, JWTs, sessions, device keys, roles.

- Passwords and device keys are hashed with argon2id (argon2-cffi). Verified device keys are
  remembered in memory (by the SHA-256 of the presented key) so the ingest path does not pay
  argon2 on every request; revocation is seen within ``KEY_CACHE_TTL`` seconds.
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
    record = DeviceKey(id=kid, device=device, key_hash=hash_secret(secret), created_at=time.time())
    registry.add_device_key(record)
    return record, f"{KEY_PREFIX}{kid}_{secret}"


def split_device_key(key: str) -> tuple[str, str] | None:
    if not key.startswith(KEY_PREFIX):
        return None
    kid, sep, secret = key[len(KEY_PREFIX) :].partition("_")
    return (kid, secret) if sep and kid and secret else None


class DeviceKeyVerifier:
    """Verifies device keys; argon2 once per key, then a SHA-256 cache revalidated every
    ``ttl`` seconds against the registry (so revocation takes effect within ``ttl``)."""

    def __init__(self, registry: Registry, ttl: float = KEY_CACHE_TTL) -> None:
        self.registry = registry
        self.ttl = ttl
        self._ok: dict[str, tuple[str, str, float]] = {}  # sha256(key) -> (device, kid, checked)

    def cached(self, device: str, key: str, now: float) -> bool | None:
        """True/False if the cache can answer without the registry, None otherwise."""
        hit = self._ok.get(sha256(key))
        if hit is None:
            return None
        if hit[0] != device:
            return False
        return True if now - hit[2] < self.ttl else None

    def verify(self, device: str, key: str, now: float) -> bool:
        """Blocking (registry + argon2): run in a worker thread."""
        parts = split_device_key(key)
        if parts is None:
            return False
        kid, secret = parts
        digest = sha256(key)
        for rec in self.registry.device_keys(device):
            if rec.id != kid or rec.revoked_at is not None:
                continue
            hit = self._ok.get(digest)
            if (hit is not None and hit[1] == kid) or verify_secret(rec.key_hash, secret):
                self._ok[digest] = (device, kid, now)
                return True
        self._ok.pop(digest, None)
        return False
