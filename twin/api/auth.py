"""Authentication and authorisation: users, passwords, JWTs, sessions, device keys, roles.

- Passwords and device keys are hashed with argon2id (argon2-cffi). Device keys are 192-bit
  random secrets, so they use light argon2id parameters (``DEVICE_KEY_HASHER``: guessing is
  hopeless whatever the cost; ~100x cheaper to verify than a password); keys made with the
  default parameters still verify (the parameters live in the hash). Verified device keys are
  remembered in memory by the SHA-256 of the presented key, so ingest pays argon2 once per key
  and process; a revocation through the API drops the entry at once, one made elsewhere (the
  CLI) within ``KEY_CACHE_TTL`` seconds (``DeviceKeyVerifier.sweep``: one query).
- Access tokens are HS256 JWTs signed with a secret kept in the state directory
  (``<state_dir>/jwt.secret``, mode 0600), so tokens survive a restart. Every token names the
  user's name (``sub``), id (``uid``) and generation (``gen``) and is refused unless all three
  still match the stored user: a user deleted and created again under the same name is another
  id, and ``revoke_user_credentials`` (``twin token revoke --user``) bumps the generation, which
  kills every token of the user at once. A token from a login also names its session (``sid``,
  revoked by logout); a long-lived token from ``twin token create`` names its record (``tid``,
  listed by ``twin token list``, revoked by ``twin token revoke ID`` or a logout with it).
  Tokens without ``uid`` (made before these checks existed) are refused.
- Refresh tokens are ``<session id>.<secret>``: random, stored as SHA-256 (high entropy, so a
  fast hash is the right tool), listed and revoked by an admin; a session is bound to the user
  id it was opened for.
- Logins verify argon2 in a worker thread, against a dummy hash when the user does not exist
  (same cost: no user enumeration by timing); failures are throttled (``twin.api.throttle``).
- Roles: ``viewer`` < ``operator`` < ``admin``; a user may be scoped to sites (empty = all).
"""

from __future__ import annotations

import hmac
import os
import secrets
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from twin.errors import AuthError
from twin.files import private_dir, private_file
from twin.policy import RANK as RANK  # roles are the policy's
from twin.policy import ROLES as ROLES
from twin.registry.base import ApiToken, Registry, Session, User

# Credentials live in the registry layer (the MQTT broker checks them too); the API keeps
# its names for them as explicit re-exports.
from twin.registry.credentials import DEVICE_KEY_HASHER as DEVICE_KEY_HASHER
from twin.registry.credentials import KEY_CACHE_TTL as KEY_CACHE_TTL
from twin.registry.credentials import KEY_PREFIX as KEY_PREFIX
from twin.registry.credentials import DeviceKeyVerifier as DeviceKeyVerifier
from twin.registry.credentials import create_device_key as create_device_key
from twin.registry.credentials import hash_secret as hash_secret
from twin.registry.credentials import sha256 as sha256
from twin.registry.credentials import split_device_key as split_device_key
from twin.registry.credentials import verify_secret as verify_secret

ALGORITHM = "HS256"
ACCESS_TTL = 15 * 60.0
REFRESH_TTL = 30 * 86400.0

def load_secret(state_dir: str | Path) -> bytes:
    """The JWT signing secret, created on first use (0600, in a 0700 state directory).

    ``TWIN_JWT_SECRET_FILE`` names another file instead: engines of one cluster behind a load
    balancer share one secret, so a token from any of them is good at all of them."""
    shared = os.environ.get("TWIN_JWT_SECRET_FILE")
    path = Path(shared) if shared else Path(state_dir) / "jwt.secret"
    try:
        key = bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    else:
        private_file(path)  # one written before the file modes were enforced
        return key
    private_dir(path.parent)
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
    token_id: str | None = None  # the access token's jti
    api_token: str | None = None  # a long-lived token's record id (twin token create)
    user_id: str = ""  # the User.id and generation the token was issued for
    generation: int = 0
    # what this principal may do is twin.policy's to decide (policy.check(p, verb, ...))


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
    token_id: str | None = None,
) -> str:
    now = time.time() if now is None else now
    claims: dict[str, Any] = {
        "sub": user.name,
        "uid": user.id,
        "gen": user.generation,
        "role": user.role,
        "sites": list(user.sites),
        "typ": "access",
        "iat": int(now),
        "exp": int(now + ttl),
        "jti": uuid.uuid4().hex,
    }
    if session:
        claims["sid"] = session
    if token_id:
        claims["tid"] = token_id
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def check_claims(claims: Mapping[str, Any], user: User | None) -> User:
    """The stored user a decoded access token still speaks for, or AuthError."""
    if "uid" not in claims or "gen" not in claims:
        raise AuthError(
            "token predates user ids and generations", hint="log in again or create a new token"
        )
    if user is None or user.id != claims["uid"]:
        raise AuthError("unknown user")
    if user.disabled:
        raise AuthError("user disabled")
    if user.generation != claims["gen"]:
        raise AuthError("token revoked", hint="log in again")
    return user


def create_api_token(
    registry: Registry, secret: bytes, user: User, *, ttl: float, note: str = ""
) -> tuple[ApiToken, str]:
    """A long-lived access token with a record (listed, revocable); returns (record, token)."""
    now = time.time()
    record = ApiToken(
        id=secrets.token_hex(8),
        user=user.name,
        user_id=user.id,
        created_at=now,
        expires_at=now + ttl,
        note=note,
    )
    registry.add_api_token(record)
    return record, issue_access_token(secret, user, ttl=ttl, now=now, token_id=record.id)


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
            user_id=user.id,
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
    if user is None or user.id != session.user_id:
        raise AuthError("user no longer exists", hint="log in again")
    if user.disabled:
        raise AuthError("user disabled")
    return session, user


# A hash to verify against when the user does not exist (or is disabled), so that a login
# costs the same argon2 time whether the name is known or not. Made once, on first use.
_dummy_hash: str | None = None


def dummy_hash() -> str:
    global _dummy_hash
    if _dummy_hash is None:
        _dummy_hash = hash_secret(secrets.token_urlsafe(16))
    return _dummy_hash


def verify_login(user: User | None, password: str) -> bool:
    """Blocking (argon2, ~0.1 s): run in a worker thread. Constant work for unknown users."""
    if user is None or user.disabled:
        verify_secret(dummy_hash(), password)
        return False
    return verify_secret(user.password_hash, password)


