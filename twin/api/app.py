"""The REST + WebSocket API (FastAPI), served by hypercorn's Trio worker inside the engine.

Every route but ``/api/v1/health``, ``/api/v1/auth/login`` and ``/api/v1/auth/refresh`` needs a
bearer token (``/api/v1/ingest/{device}`` needs that device's key instead). One ASGI middleware
does, in order: per-client rate limiting, authentication (401), per-token rate limiting (429 +
Retry-After), Prometheus accounting, and the audit log of every mutating call. Role and site
checks (403) are per route.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import trio
from fastapi import Body, Depends, FastAPI, HTTPException, Query, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field
from starlette.websockets import WebSocketDisconnect

from twin.api import auth
from twin.api.ratelimit import Rate, RateLimiter
from twin.api.specio import Specs, apply_change
from twin.bindings.http import DeviceNotRunning, IngestBusy, IngestError, parse_ingest
from twin.errors import AuthError, ConflictError, NotFoundError, RegistryError, SpecError, TwinError
from twin.registry.base import Alarm, User
from twin.runtime.bus import KINDS, Filter
from twin.runtime.engine import Engine
from twin.runtime.monitor import alarm_json

log = logging.getLogger(__name__)

PREFIX = "/api/v1"
PUBLIC = {f"{PREFIX}/health", f"{PREFIX}/auth/login", f"{PREFIX}/auth/refresh"}
MUTATING = {"POST", "PUT", "PATCH", "DELETE"}
SORT_FIELDS = ("name", "site", "group", "type", "model", "status", "last_seen", "protocol")


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


def _bearer(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _json_response(status: int, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def ingest_core(
    st: ApiState, device: str, key: str | None, raw: bytes
) -> tuple[int, dict[str, Any], dict[str, str] | None]:
    """One ingest call: device key, per-device rate limit, parse, hand to the device task.
    Returns (HTTP status, JSON body, extra headers); no I/O once the key is cached."""
    engine = st.engine
    if not key:
        return 401, {"detail": "missing device key (X-Device-Key header)"}, None
    if not await st.check_device_key(device, key):
        engine.prom.child(engine.prom.ingest, "unauthorized").inc()
        return 401, {"detail": "invalid device key"}, None
    wait = st.by_device.hit(device)
    if wait:
        engine.prom.child(engine.prom.ingest, "rate_limited").inc()
        engine.prom.rate_limited.inc()
        retry = {"Retry-After": str(max(1, math.ceil(wait)))}
        return 429, {"detail": "too many requests for this device"}, retry
    now = time.time()
    try:
        messages = parse_ingest(device, json.loads(raw or b"{}"), now)
    except (ValueError, IngestError) as exc:
        engine.prom.child(engine.prom.ingest, "invalid").inc()
        return 422, {"detail": str(exc)}, None
    try:
        reply = engine.hub.push(device, messages)
    except DeviceNotRunning:
        engine.prom.child(engine.prom.ingest, "not_running").inc()
        return 409, {"detail": f"device {device!r} is not running with an http push binding"}, None
    except IngestBusy:
        engine.prom.child(engine.prom.ingest, "busy").inc()
        return 429, {"detail": "device queue full"}, {"Retry-After": "1"}
    twin = engine.twin(device)
    if twin is not None:
        twin.metrics.bytes_in += len(raw)
    engine.prom.child(engine.prom.ingest, "ok").inc()
    return 200, reply, None


INGEST_PREFIX = f"{PREFIX}/ingest/"
MAX_INGEST_BODY = 1 << 20


class Gatekeeper:
    """Pure ASGI middleware: rate limits, authentication, metrics, audit."""

    def __init__(self, app: Any, state: ApiState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path0: str = scope["path"]
        if (
            scope["method"] == "POST"
            and path0.startswith(INGEST_PREFIX)
            and "/" not in path0[len(INGEST_PREFIX) :]
        ):
            await self._ingest(scope, receive, send)
            return
        st = self.state
        prom = st.engine.prom
        path: str = scope["path"]
        method: str = scope["method"]
        started = time.perf_counter()
        scope.setdefault("state", {})
        status_box = [500]

        async def send_wrapper(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
            await send(message)

        ingest = path.startswith(f"{PREFIX}/ingest/")
        client = (scope.get("client") or ("?", 0))[0]
        response: Response | None = None
        if not ingest and path != f"{PREFIX}/health":
            wait = st.by_client.hit(client)
            if wait:
                response = _json_response(
                    429,
                    "too many requests from this address",
                    {"Retry-After": str(max(1, math.ceil(wait)))},
                )
        public = (
            path in PUBLIC or ingest or path in ("/openapi.json", "/docs", "/docs/oauth2-redirect")
        )
        if response is None and not public:
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            try:
                principal = await st.authenticate(_bearer(headers))
                scope["state"]["principal"] = principal
                scope["state"]["actor"] = principal.subject
                wait = st.by_token.hit(principal.subject)
                if wait:
                    response = _json_response(
                        429,
                        "rate limit exceeded for this token",
                        {"Retry-After": str(max(1, math.ceil(wait)))},
                    )
            except AuthError as exc:
                response = _json_response(401, str(exc), {"WWW-Authenticate": "Bearer"})
        if response is not None:
            if response.status_code == 429:
                prom.rate_limited.inc()
            await response(scope, receive, send_wrapper)
        else:
            await self.app(scope, receive, send_wrapper)
        status = status_box[0]
        route = scope.get("route")
        route_path = getattr(route, "path", None) or ("unmatched" if response is None else path)
        prom.child(prom.api_requests, method, route_path, str(status)).inc()
        prom.child(prom.api_latency, method, route_path).observe(time.perf_counter() - started)
        if method in MUTATING and not ingest:
            actor = scope["state"].get("actor", "anonymous")
            action = f"{method} {path}"
            target = str(
                (scope.get("path_params") or {}).get("device")
                or (scope.get("path_params") or {}).get("name")
                or path
            )
            detail = scope["state"].get("audit_detail") or {}
            now = time.time()
            st.engine.writer.put(lambda r: r.audit(actor, action, target, str(status), now, detail))

    async def _ingest(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The hot path, in plain ASGI (no routing, dependencies or response classes)."""
        started = time.perf_counter()
        device = scope["path"][len(INGEST_PREFIX) :]
        key = None
        for name, value in scope["headers"]:
            if name == b"x-device-key":
                key = value.decode("latin-1")
                break
            if name == b"authorization" and key is None:
                key = _bearer({"authorization": value.decode("latin-1")})
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_INGEST_BODY:
                status, body, headers = 413, {"detail": "body too large"}, None
                break
            chunks.append(chunk)
            more = message.get("more_body", False)
        else:
            status, body, headers = await ingest_core(self.state, device, key, b"".join(chunks))
        payload = json.dumps(body, separators=(",", ":"), default=str).encode()
        raw_headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
        ]
        if status == 401:
            raw_headers.append((b"www-authenticate", b"DeviceKey"))
        for k, v in (headers or {}).items():
            raw_headers.append((k.lower().encode(), v.encode()))
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": payload})
        prom = self.state.engine.prom
        route = f"{PREFIX}/ingest/{{device}}"
        prom.child(prom.api_requests, "POST", route, str(status)).inc()
        prom.child(prom.api_latency, "POST", route).observe(time.perf_counter() - started)


# -- request bodies ---------------------------------------------------------------------------
class LoginRequest(BaseModel):
    username: str = Field(min_length=1, max_length=200)
    password: str = Field(min_length=1, max_length=1000)


class RefreshRequest(BaseModel):
    refresh_token: str = Field(min_length=1, max_length=500)


class ApplyRequest(BaseModel):
    documents: list[dict[str, Any]]
    prune: bool = False
    message: str = ""


class UserRequest(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.@-]{1,100}$")
    password: str = Field(min_length=8, max_length=1000)
    role: str = Field(pattern="^(viewer|operator|admin)$")
    sites: list[str] = []


class MaintenanceRequest(BaseModel):
    on: bool = True


def _principal(request: Request) -> auth.Principal:
    p = request.scope.get("state", {}).get("principal")
    if p is None:  # pragma: no cover - the gatekeeper guarantees it
        raise HTTPException(401, "missing bearer token")
    return p


def need(role: str) -> Callable[[Request], auth.Principal]:
    def dep(request: Request) -> auth.Principal:
        p = _principal(request)
        if not p.at_least(role):
            raise HTTPException(403, f"needs role {role} (you are {p.role})")
        return p

    dep.__name__ = f"need_{role}"
    return dep


Limit = Annotated[int, Query(ge=1, le=1000)]
Offset = Annotated[int, Query(ge=0)]
Viewer = Annotated[auth.Principal, Depends(need("viewer"))]
Operator = Annotated[auth.Principal, Depends(need("operator"))]
Admin = Annotated[auth.Principal, Depends(need("admin"))]


def _site_of(doc: Mapping[str, Any]) -> str | None:
    meta = doc.get("metadata") or {}
    if doc.get("kind") == "Site":
        return str(meta.get("name"))
    site = meta.get("site")
    return str(site) if site is not None else None


def _check_site(p: auth.Principal, doc: Mapping[str, Any] | None) -> None:
    if doc is not None and not p.can_site(_site_of(doc)):
        raise HTTPException(
            403, f"not allowed for site {_site_of(doc)!r} (your sites: {', '.join(p.sites)})"
        )


def create_app(engine: Engine, settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or ApiSettings(state_dir=engine.config.state_dir)
    st = ApiState(engine, settings)
    reg = engine.registry
    app = FastAPI(
        title="FLUX IoT",
        version="1",
        description="Devices, twins, status, alarms and live data of a FLUX IoT engine.",
    )
    app.state.api = st

    # -- errors ---------------------------------------------------------------------------------
    @app.exception_handler(SpecError)
    async def _spec_error(request: Request, exc: SpecError) -> JSONResponse:
        return JSONResponse(
            {"detail": str(exc), "problems": [str(p) for p in exc.problems], "hint": exc.hint},
            status_code=422,
        )

    @app.exception_handler(ConflictError)
    async def _conflict(request: Request, exc: ConflictError) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "hint": exc.hint}, status_code=409)

    @app.exception_handler(NotFoundError)
    async def _not_found(request: Request, exc: NotFoundError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(AuthError)
    async def _auth(request: Request, exc: AuthError) -> JSONResponse:
        return JSONResponse(
            {"detail": str(exc)}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
        )

    @app.exception_handler(TwinError)
    async def _twin(request: Request, exc: TwinError) -> JSONResponse:
        code = 409 if isinstance(exc, RegistryError) else 400
        return JSONResponse({"detail": str(exc), "hint": exc.hint}, status_code=code)

    # -- helpers ----------------------------------------------------------------------------------
    async def change(
        request: Request, p: auth.Principal, fn: Callable[[Specs], Specs], message: str
    ) -> dict[str, Any]:
        rev, _ = await st.call(apply_change, reg, fn, author=p.subject, message=message)
        if rev is None:
            return {"revision": engine.revision_number, "changed": False}
        request.scope["state"]["audit_detail"] = {"revision": rev.number}
        engine.poke()
        with trio.move_on_after(settings.reload_wait):
            await engine.wait_revision(rev.number)
        return {"revision": rev.number, "changed": True}

    def device_or_404(name: str) -> dict[str, Any]:
        doc = engine.device_doc(name)
        if doc is None:
            raise HTTPException(404, f"no device {name!r}")
        return doc

    def summary(name: str, doc: Mapping[str, Any]) -> dict[str, Any]:
        meta = doc.get("metadata") or {}
        spec = doc.get("spec") or {}
        twin = engine.twin(name)
        binding = spec.get("binding") or {}
        return {
            "name": name,
            "site": meta.get("site"),
            "group": meta.get("group"),
            "tags": list(meta.get("tags") or []),
            "labels": dict(meta.get("labels") or {}),
            "type": spec.get("type"),
            "model": spec.get("model"),
            "protocol": next(iter(binding), None) if isinstance(binding, Mapping) else None,
            "status": str(twin.status) if twin else "unknown",
            "last_seen": twin.last_seen if twin else None,
            "maintenance": bool(spec.get("maintenance", False)),
        }

    def group_members(group: str) -> set[str]:
        groups = {n: d for (k, n), d in engine.specs.items() if k == "DeviceGroup"}
        members = {group}
        grew = True
        while grew:
            grew = False
            for n, d in groups.items():
                if n not in members and (d.get("spec") or {}).get("parent") in members:
                    members.add(n)
                    grew = True
        return members

    def list_devices(
        p: auth.Principal,
        *,
        site: list[str] | None,
        group: str | None,
        tag: list[str] | None,
        label: list[str] | None,
        status: list[str] | None,
        type_: list[str] | None,
        sort: str,
        limit: int,
        offset: int,
        names: set[str] | None = None,
    ) -> dict[str, Any]:
        sites = p.visible_sites(site)
        groups = group_members(group) if group else None
        labels = []
        for item in label or []:
            k, sep, v = item.partition("=")
            if not sep:
                raise HTTPException(422, f"label filter {item!r} must be key=value")
            labels.append((k, v))
        key = sort.lstrip("-")
        every = st.devices_sorted()
        if (
            key == "name"
            and names is None
            and sites is None
            and groups is None
            and not (tag or labels or type_ or status)
        ):
            # no filter, by name: a slice of the cached sorted list (no pass over every device)
            n = len(every)
            if sort.startswith("-"):
                lo, hi = max(0, n - offset - limit), max(0, n - offset)
                chosen = every[lo:hi][::-1]
            else:
                chosen = every[offset : offset + limit]
            return {
                "items": [summary(name, doc) for name, doc in chosen],
                "total": n,
                "limit": limit,
                "offset": offset,
                "revision": engine.revision_number,
            }
        items = []
        for name, doc in every:
            if names is not None and name not in names:
                continue
            meta = doc.get("metadata") or {}
            if sites is not None and meta.get("site") not in sites:
                continue
            if groups is not None and meta.get("group") not in groups:
                continue
            if tag and not set(tag) <= set(meta.get("tags") or ()):
                continue
            if labels and any((meta.get("labels") or {}).get(k) != v for k, v in labels):
                continue
            if type_ and (doc.get("spec") or {}).get("type") not in type_:
                continue
            if status:
                twin = engine.twin(name)
                if (str(twin.status) if twin else "unknown") not in status:
                    continue
            items.append((name, doc))
        if key not in SORT_FIELDS:
            raise HTTPException(
                422, f"sort must be one of {', '.join(SORT_FIELDS)} (prefix - to reverse)"
            )
        rows = [summary(n, d) for n, d in items] if key != "name" else None
        if rows is None:
            if sort.startswith("-"):
                items.reverse()
            page = [summary(n, d) for n, d in items[offset : offset + limit]]
        else:
            rows.sort(
                key=lambda r: (r[key] is None, r[key] if r[key] is not None else 0, r["name"]),
                reverse=sort.startswith("-"),
            )
            page = rows[offset : offset + limit]
        return {
            "items": page,
            "total": len(items),
            "limit": limit,
            "offset": offset,
            "revision": engine.revision_number,
        }

    # -- health, auth -------------------------------------------------------------------------
    @app.get(f"{PREFIX}/health", tags=["system"])
    async def health() -> dict[str, Any]:
        return {"status": "ok", "revision": engine.revision_number, "devices": len(engine.twins)}

    @app.post(f"{PREFIX}/auth/login", tags=["auth"])
    async def login(request: Request, body: LoginRequest) -> dict[str, Any]:
        request.scope["state"]["actor"] = body.username
        user = await st.call(reg.get_user, body.username)
        ok = (
            user is not None
            and not user.disabled
            and await st.hash_call(auth.verify_secret, user.password_hash, body.password)
        )
        if not ok or user is None:
            raise HTTPException(401, "wrong user name or password")
        client = request.client.host if request.client else ""
        refresh = await st.call(
            auth.create_session, reg, user, client=client, ttl=settings.refresh_ttl
        )
        sid = refresh.partition(".")[0]
        token = auth.issue_access_token(st.secret, user, ttl=settings.access_ttl, session=sid)
        return {
            "access_token": token,
            "token_type": "bearer",
            "expires_in": int(settings.access_ttl),
            "refresh_token": refresh,
            "role": user.role,
            "sites": list(user.sites),
        }

    @app.post(f"{PREFIX}/auth/refresh", tags=["auth"])
    async def refresh(request: Request, body: RefreshRequest) -> dict[str, Any]:
        try:
            session, user = await st.call(auth.check_refresh, reg, body.refresh_token)
        except AuthError as exc:
            raise HTTPException(401, str(exc)) from None
        request.scope["state"]["actor"] = user.name
        token = auth.issue_access_token(
            st.secret, user, ttl=settings.access_ttl, session=session.id
        )
        return {
            "access_token": token,
            "token_type": "bearer",
            "expires_in": int(settings.access_ttl),
        }

    @app.post(f"{PREFIX}/auth/logout", tags=["auth"])
    async def logout(p: Viewer) -> dict[str, Any]:
        if p.session:
            await st.call(reg.revoke_session, p.session, time.time())
            st.forget(session=p.session)
        return {"revoked": p.session}

    # -- devices --------------------------------------------------------------------------------
    @app.get(f"{PREFIX}/devices", tags=["devices"])
    async def get_devices(
        p: Viewer,
        site: Annotated[list[str] | None, Query()] = None,
        group: str | None = None,
        tag: Annotated[list[str] | None, Query()] = None,
        label: Annotated[list[str] | None, Query(description="key=value")] = None,
        status: Annotated[list[str] | None, Query()] = None,
        type: Annotated[list[str] | None, Query()] = None,
        sort: str = "name",
        limit: Limit = 100,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        return list_devices(
            p,
            site=site,
            group=group,
            tag=tag,
            label=label,
            status=status,
            type_=type,
            sort=sort,
            limit=limit,
            offset=offset,
        )

    @app.post(f"{PREFIX}/devices", tags=["devices"], status_code=201)
    async def post_device(
        request: Request, p: Operator, doc: Annotated[dict[str, Any], Body()]
    ) -> dict[str, Any]:
        doc = {"apiVersion": "flux.iot/v1", "kind": "Device", **doc}
        name = (doc.get("metadata") or {}).get("name")
        if doc.get("kind") != "Device" or not isinstance(name, str):
            raise HTTPException(422, "body must be a Device document with metadata.name")
        _check_site(p, doc)
        if engine.device_doc(name) is not None:
            raise HTTPException(409, f"device {name!r} exists; use PUT to change it")

        def fn(specs: Specs) -> Specs:
            if ("Device", name) in specs:
                raise ConflictError(f"device {name!r} exists")
            specs[("Device", name)] = doc
            return specs

        out = await change(request, p, fn, f"create device {name}")
        return {**out, "device": summary(name, engine.device_doc(name) or doc)}

    @app.get(f"{PREFIX}/devices/{{device}}", tags=["devices"])
    async def get_device(p: Viewer, device: str) -> dict[str, Any]:
        doc = device_or_404(device)
        _check_site(p, doc)
        twin = engine.twin(device)
        last = await st.call(reg.last_changed, "Device", device)
        return {
            **summary(device, doc),
            "document": doc,
            "last_changed": last,
            "twin": twin.to_json() if twin else None,
        }

    @app.put(f"{PREFIX}/devices/{{device}}", tags=["devices"])
    async def put_device(
        request: Request, p: Operator, device: str, doc: Annotated[dict[str, Any], Body()]
    ) -> dict[str, Any]:
        old = device_or_404(device)
        _check_site(p, old)
        doc = {"apiVersion": "flux.iot/v1", "kind": "Device", **doc}
        doc["metadata"] = {**(doc.get("metadata") or {}), "name": device}
        _check_site(p, doc)

        def fn(specs: Specs) -> Specs:
            if ("Device", device) not in specs:
                raise NotFoundError(f"no device {device!r}")
            specs[("Device", device)] = doc
            return specs

        out = await change(request, p, fn, f"update device {device}")
        return {**out, "device": summary(device, engine.device_doc(device) or doc)}

    @app.delete(f"{PREFIX}/devices/{{device}}", tags=["devices"])
    async def delete_device(request: Request, p: Operator, device: str) -> dict[str, Any]:
        _check_site(p, device_or_404(device))

        def fn(specs: Specs) -> Specs:
            if specs.pop(("Device", device), None) is None:
                raise NotFoundError(f"no device {device!r}")
            return specs

        return await change(request, p, fn, f"delete device {device}")

    def _set_spec_field(device: str, key: str, value: Any) -> Callable[[Specs], Specs]:
        def fn(specs: Specs) -> Specs:
            doc = specs.get(("Device", device))
            if doc is None:
                raise NotFoundError(f"no device {device!r}")
            spec = dict(doc.get("spec") or {})
            if value is None:
                spec.pop(key, None)
            else:
                spec[key] = value
            specs[("Device", device)] = {**doc, "spec": spec}
            return specs

        return fn

    @app.post(f"{PREFIX}/devices/{{device}}/activate", tags=["devices"])
    async def activate(request: Request, p: Operator, device: str) -> dict[str, Any]:
        """End maintenance: the device is monitored (and alarms raised) again."""
        _check_site(p, device_or_404(device))
        return await change(
            request, p, _set_spec_field(device, "maintenance", None), f"activate device {device}"
        )

    @app.post(f"{PREFIX}/devices/{{device}}/maintenance", tags=["devices"])
    async def maintenance(
        request: Request, p: Operator, device: str, body: MaintenanceRequest
    ) -> dict[str, Any]:
        """Put a device into (or out of) maintenance: suppresses its alarms."""
        _check_site(p, device_or_404(device))
        return await change(
            request,
            p,
            _set_spec_field(device, "maintenance", True if body.on else None),
            f"maintenance {'on' if body.on else 'off'} for {device}",
        )

    @app.get(f"{PREFIX}/devices/{{device}}/status", tags=["status"])
    async def device_status(p: Viewer, device: str) -> dict[str, Any]:
        doc = device_or_404(device)
        _check_site(p, doc)
        twin = engine.twin(device)
        return {
            "device": device,
            "status": str(twin.status) if twin else "unknown",
            "since": twin.status_since if twin else None,
            "last_seen": twin.last_seen if twin else None,
            "fault": twin.fault if twin else None,
            "maintenance": bool((doc.get("spec") or {}).get("maintenance", False)),
        }

    @app.get(f"{PREFIX}/devices/{{device}}/status/history", tags=["status"])
    async def device_status_history(
        p: Viewer, device: str, since: float | None = None, limit: Limit = 100
    ) -> dict[str, Any]:
        _check_site(p, device_or_404(device))
        rows = await st.call(reg.status_history, device, since=since, limit=limit)
        return {
            "device": device,
            "items": [
                {"status": r.status, "timestamp": r.timestamp, "metadata": dict(r.metadata)}
                for r in rows
            ],
        }

    @app.get(f"{PREFIX}/devices/{{device}}/metrics", tags=["status"])
    async def device_metrics(
        p: Viewer,
        device: str,
        name: Annotated[list[str] | None, Query()] = None,
        since: float | None = None,
        limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    ) -> dict[str, Any]:
        _check_site(p, device_or_404(device))
        rows = await st.call(reg.metrics, device, names=name, since=since, limit=limit)
        ratios = [r.value for r in rows if r.name == "uptime_ratio"]
        twin = engine.twin(device)
        from twin.api.timeseries_routes import device_series

        return {
            "device": device,
            "live": twin.metrics.to_json() if twin else None,
            "uptime_ratio": sum(ratios) / len(ratios) if ratios else None,
            "samples": [{"name": r.name, "value": r.value, "timestamp": r.timestamp} for r in rows],
            # per telemetry metric from the time-series store (None without one)
            "series": await device_series(engine, device, since=since),
        }

    @app.get(f"{PREFIX}/devices/{{device}}/twin", tags=["twin"])
    async def device_twin(p: Viewer, device: str) -> dict[str, Any]:
        _check_site(p, device_or_404(device))
        twin = engine.twin(device)
        if twin is None:
            raise HTTPException(404, f"device {device!r} is not running")
        return twin.to_json()

    @app.patch(f"{PREFIX}/devices/{{device}}/twin/desired", tags=["twin"])
    async def patch_desired(
        request: Request, p: Operator, device: str, patch: Annotated[dict[str, Any], Body()]
    ) -> dict[str, Any]:
        """Merge into spec.desired (null removes a key); becomes a revision (source = api)."""
        doc = device_or_404(device)
        _check_site(p, doc)
        desired = dict((doc.get("spec") or {}).get("desired") or {})
        for k, v in patch.items():
            if v is None:
                desired.pop(k, None)
            else:
                desired[k] = v
        out = await change(
            request,
            p,
            _set_spec_field(device, "desired", desired or None),
            f"desired {', '.join(sorted(patch))} of {device}",
        )
        twin = engine.twin(device)
        return {**out, "twin": twin.to_json() if twin else None}

    # -- device keys ----------------------------------------------------------------------------
    @app.post(f"{PREFIX}/devices/{{device}}/keys", tags=["devices"], status_code=201)
    async def create_key(p: Admin, device: str) -> dict[str, Any]:
        _check_site(p, device_or_404(device))
        rec, key = await st.call(auth.create_device_key, reg, device)
        return {"id": rec.id, "device": device, "key": key, "created_at": rec.created_at}

    @app.get(f"{PREFIX}/devices/{{device}}/keys", tags=["devices"])
    async def list_keys(p: Admin, device: str) -> dict[str, Any]:
        keys = await st.call(reg.device_keys, device)
        return {
            "items": [
                {"id": k.id, "created_at": k.created_at, "revoked_at": k.revoked_at} for k in keys
            ]
        }

    @app.delete(f"{PREFIX}/devices/{{device}}/keys/{{key_id}}", tags=["devices"])
    async def revoke_key(p: Admin, device: str, key_id: str) -> dict[str, Any]:
        keys = await st.call(reg.device_keys, device)
        if not any(k.id == key_id for k in keys):
            raise HTTPException(404, f"no key {key_id!r} for device {device!r}")
        await st.call(reg.revoke_device_key, key_id, time.time())
        st.keys.invalidate(key_id)
        return {"revoked": key_id}

    # -- groups ---------------------------------------------------------------------------------
    @app.get(f"{PREFIX}/device-groups", tags=["groups"])
    async def get_groups(
        p: Viewer,
        site: Annotated[list[str] | None, Query()] = None,
        limit: Limit = 100,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        sites = p.visible_sites(site)
        rows = [
            {"name": n, "site": (d.get("metadata") or {}).get("site"), **(d.get("spec") or {})}
            for (k, n), d in sorted(engine.specs.items())
            if k == "DeviceGroup"
            and (sites is None or (d.get("metadata") or {}).get("site") in sites)
        ]
        return {
            "items": rows[offset : offset + limit],
            "total": len(rows),
            "limit": limit,
            "offset": offset,
        }

    @app.post(f"{PREFIX}/device-groups", tags=["groups"], status_code=201)
    async def post_group(
        request: Request, p: Operator, doc: Annotated[dict[str, Any], Body()]
    ) -> dict[str, Any]:
        doc = {"apiVersion": "flux.iot/v1", "kind": "DeviceGroup", "spec": {}, **doc}
        name = (doc.get("metadata") or {}).get("name")
        if doc.get("kind") != "DeviceGroup" or not isinstance(name, str):
            raise HTTPException(422, "body must be a DeviceGroup document with metadata.name")
        _check_site(p, doc)
        if ("DeviceGroup", name) in engine.specs:
            raise HTTPException(409, f"device group {name!r} exists")

        def fn(specs: Specs) -> Specs:
            specs[("DeviceGroup", name)] = doc
            return specs

        return await change(request, p, fn, f"create device group {name}")

    @app.get(f"{PREFIX}/device-groups/{{name}}/devices", tags=["groups"])
    async def group_devices(
        p: Viewer, name: str, sort: str = "name", limit: Limit = 100, offset: Offset = 0
    ) -> dict[str, Any]:
        doc = engine.specs.get(("DeviceGroup", name))
        if doc is None:
            raise HTTPException(404, f"no device group {name!r}")
        _check_site(p, doc)
        return list_devices(
            p,
            site=None,
            group=name,
            tag=None,
            label=None,
            status=None,
            type_=None,
            sort=sort,
            limit=limit,
            offset=offset,
        )

    # -- alarms ---------------------------------------------------------------------------------
    def alarm_visible(p: auth.Principal, alarm: Alarm) -> bool:
        doc = engine.device_doc(alarm.device)
        return not p.sites or (doc is not None and p.can_site(_site_of(doc)))

    @app.get(f"{PREFIX}/alarms", tags=["alarms"])
    async def get_alarms(
        p: Viewer,
        device: str | None = None,
        state: Annotated[list[str] | None, Query()] = None,
        limit: Limit = 100,
    ) -> dict[str, Any]:
        rows = await st.call(reg.alarms, device=device, states=state, limit=limit)
        return {"items": [alarm_json(a) for a in rows if alarm_visible(p, a)]}

    async def alarm_action(p: auth.Principal, alarm_id: int, action: str) -> dict[str, Any]:
        rows = await st.call(reg.alarms, limit=1_000_000)
        alarm = next((a for a in rows if a.id == alarm_id), None)
        if alarm is None:
            raise HTTPException(404, f"no alarm {alarm_id}")
        if not alarm_visible(p, alarm):
            raise HTTPException(403, "alarm of a device outside your sites")
        fn = reg.ack_alarm if action == "ack" else reg.clear_alarm
        updated: Alarm = await st.call(fn, alarm_id, p.subject, time.time())
        if action == "clear":
            engine.monitor.forget_alarm(updated.device, updated.type)
        twin = engine.twin(updated.device)
        engine.bus.publish(
            {
                "kind": "alarm",
                "device": updated.device,
                "site": twin.site if twin else None,
                "groups": twin.groups if twin else (),
                "ts": time.time(),
                "event": "acknowledged" if action == "ack" else "cleared",
                "alarm": alarm_json(updated),
            }
        )
        return alarm_json(updated)

    @app.post(f"{PREFIX}/alarms/{{alarm_id}}/ack", tags=["alarms"])
    async def ack_alarm(p: Operator, alarm_id: int) -> dict[str, Any]:
        return await alarm_action(p, alarm_id, "ack")

    @app.post(f"{PREFIX}/alarms/{{alarm_id}}/clear", tags=["alarms"])
    async def clear_alarm(p: Operator, alarm_id: int) -> dict[str, Any]:
        return await alarm_action(p, alarm_id, "clear")

    # -- apply, revisions -------------------------------------------------------------------------
    @app.post(f"{PREFIX}/apply", tags=["specs"])
    async def post_apply(request: Request, p: Operator, body: ApplyRequest) -> dict[str, Any]:
        """What ``twin apply --server URL`` uses: documents of a folder; ``prune`` deletes the rest."""
        docs: Specs = {}
        for i, doc in enumerate(body.documents):
            name = (
                (doc.get("metadata") or {}).get("name")
                if isinstance(doc.get("metadata"), dict)
                else None
            )
            if not isinstance(doc.get("kind"), str) or not isinstance(name, str):
                raise HTTPException(422, f"documents[{i}] needs kind and metadata.name")
            _check_site(p, doc)
            docs[(doc["kind"], name)] = doc

        def fn(specs: Specs) -> Specs:
            if p.sites or not body.prune:
                kept = {k: v for k, v in specs.items() if k not in docs}
                if body.prune:  # a scoped user prunes only inside their sites
                    kept = {k: v for k, v in kept.items() if not p.can_site(_site_of(v))}
                return {**kept, **docs}
            return dict(docs)

        before = dict(engine.specs)
        out = await change(request, p, fn, body.message or "apply through the API")
        after = engine.specs
        created = sum(1 for k in after if k not in before)
        deleted = sum(1 for k in before if k not in after)
        updated = sum(1 for k in after if k in before and before[k] != after[k])
        return {**out, "created": created, "updated": updated, "deleted": deleted}

    @app.get(f"{PREFIX}/revisions", tags=["specs"])
    async def revisions(p: Viewer, limit: Limit = 20) -> dict[str, Any]:
        revs = await st.call(reg.history, limit)
        return {
            "items": [
                {
                    "number": r.number,
                    "hash": r.hash,
                    "created_at": r.created_at,
                    "author": r.author,
                    "message": r.message,
                    "source": r.source,
                }
                for r in revs
            ]
        }

    # -- users, sessions, audit -------------------------------------------------------------------
    @app.get(f"{PREFIX}/users", tags=["admin"])
    async def get_users(p: Admin) -> dict[str, Any]:
        users = await st.call(reg.users)
        return {
            "items": [
                {
                    "name": u.name,
                    "role": u.role,
                    "sites": list(u.sites),
                    "created_at": u.created_at,
                    "disabled": u.disabled,
                }
                for u in users
            ]
        }

    @app.post(f"{PREFIX}/users", tags=["admin"], status_code=201)
    async def post_user(p: Admin, body: UserRequest) -> dict[str, Any]:
        user = await st.hash_call(auth.make_user, body.name, body.password, body.role, body.sites)
        await st.call(reg.put_user, user)
        st.forget(user=user.name)
        return {"name": user.name, "role": user.role, "sites": list(user.sites)}

    @app.delete(f"{PREFIX}/users/{{name}}", tags=["admin"])
    async def delete_user(p: Admin, name: str) -> dict[str, Any]:
        if await st.call(reg.get_user, name) is None:
            raise HTTPException(404, f"no user {name!r}")
        await st.call(reg.delete_user, name)
        st.forget(user=name)
        return {"deleted": name}

    @app.get(f"{PREFIX}/sessions", tags=["admin"])
    async def get_sessions(p: Admin, user: str | None = None) -> dict[str, Any]:
        rows = await st.call(reg.sessions, user)
        return {
            "items": [
                {
                    "id": s.id,
                    "user": s.user,
                    "created_at": s.created_at,
                    "expires_at": s.expires_at,
                    "revoked_at": s.revoked_at,
                    "client": s.client,
                }
                for s in rows
            ]
        }

    @app.delete(f"{PREFIX}/sessions/{{session_id}}", tags=["admin"])
    async def delete_session(p: Admin, session_id: str) -> dict[str, Any]:
        if await st.call(reg.get_session, session_id) is None:
            raise HTTPException(404, f"no session {session_id!r}")
        await st.call(reg.revoke_session, session_id, time.time())
        st.forget(session=session_id)
        return {"revoked": session_id}

    @app.get(f"{PREFIX}/audit", tags=["admin"])
    async def get_audit(p: Admin, actor: str | None = None, limit: Limit = 100) -> dict[str, Any]:
        rows = await st.call(reg.audit_log, actor=actor, limit=limit)
        return {
            "items": [
                {
                    "id": a.id,
                    "timestamp": a.timestamp,
                    "actor": a.actor,
                    "action": a.action,
                    "target": a.target,
                    "result": a.result,
                    "detail": dict(a.detail),
                }
                for a in rows
            ]
        }

    # -- ingest -----------------------------------------------------------------------------------
    @app.post(
        f"{PREFIX}/ingest/{{device}}",
        tags=["ingest"],
        openapi_extra={
            "requestBody": {"content": {"application/json": {"schema": {"type": "object"}}}},
            "security": [{"DeviceKey": []}],
        },
    )
    async def ingest(request: Request, device: str) -> JSONResponse:
        """Readings, heartbeats and events from a device with ``binding: {http: {}}``.

        (Served by the gatekeeper's fast path without FastAPI; this route documents it.)"""
        key = request.headers.get("x-device-key") or _bearer(request.headers)
        status, body, headers = await ingest_core(st, device, key, await request.body())
        return JSONResponse(body, status_code=status, headers=headers)

    # -- metrics, websocket -------------------------------------------------------------------------
    @app.get("/metrics", tags=["system"])
    async def metrics(p: Viewer) -> Response:
        return Response(engine.prom.render(), media_type=CONTENT_TYPE_LATEST)

    def parse_filter(p: auth.Principal, params: Mapping[str, Any]) -> Filter:
        def items(key: str) -> list[str] | None:
            raw = params.get(key)
            if raw is None:
                return None
            vals = raw if isinstance(raw, list) else str(raw).split(",")
            return [str(v).strip() for v in vals if str(v).strip()]

        kinds = items("kinds")
        if kinds is not None and not set(kinds) <= set(KINDS):
            raise ValueError(f"kinds must be among {', '.join(KINDS)}")
        return Filter.of(
            sites=p.visible_sites(items("sites")),
            groups=items("groups"),
            devices=items("devices"),
            kinds=kinds,
        )

    @app.websocket(f"{PREFIX}/ws")
    async def ws(websocket: WebSocket) -> None:
        """Live feed. The access token, in order of preference:

        1. ``Sec-WebSocket-Protocol: bearer, <token>`` (browsers can set this one: the server
           answers with the ``bearer`` subprotocol and the token stays out of URLs and logs);
        2. ``Authorization: Bearer <token>`` (non-browser clients);
        3. a first message ``{"type": "auth", "token": "<token>"}`` within 10 s of connecting
           (when the connection carries no token at all);
        4. ``?token=`` in the URL: kept for old clients and tools that can set neither headers
           nor subprotocols; it ends up in proxy logs and history, so prefer 1-3.

        ``?batch=N`` (opt-in, 2..1000): every frame is a JSON array of up to N events, all
        those already waiting (one frame per event costs more than the event itself at a few
        thousand readings/s). Without it each frame is one event object.
        """
        protocols = [
            v.strip()
            for v in websocket.headers.get("sec-websocket-protocol", "").split(",")
            if v.strip()
        ]
        subprotocol = None
        token = None
        if len(protocols) >= 2 and protocols[0].lower() == "bearer":
            subprotocol, token = protocols[0], protocols[1]
        token = token or _bearer(websocket.headers) or websocket.query_params.get("token")
        try:
            flt: Filter | None = None
            if token is not None:
                p = await st.authenticate(token)
                flt = parse_filter(p, dict(websocket.query_params))
        except AuthError as exc:
            await websocket.close(code=1008, reason=str(exc)[:100])
            return
        except ValueError as exc:
            await websocket.close(code=1003, reason=str(exc)[:100])
            return
        await websocket.accept(subprotocol=subprotocol)
        if flt is None:  # authenticate with the first message
            try:
                with trio.fail_after(10):
                    first = await websocket.receive_json()
                if not (isinstance(first, dict) and first.get("type") == "auth"):
                    raise AuthError('first message must be {"type": "auth", "token": ...}')
                p = await st.authenticate(str(first.get("token") or ""))
                flt = parse_filter(p, dict(websocket.query_params))
            except (AuthError, trio.TooSlowError) as exc:
                reason = str(exc) or "no auth message within 10 s"
                await websocket.close(code=1008, reason=reason[:100])
                return
            except ValueError as exc:
                await websocket.close(code=1003, reason=str(exc)[:100])
                return
            except WebSocketDisconnect:
                return
        try:
            batch = min(1000, max(1, int(websocket.query_params.get("batch") or 1)))
        except ValueError:
            batch = 1
        sub = engine.bus.open(flt, buffer=settings.ws_buffer, name=f"ws:{p.subject}")
        engine.prom.ws_clients.inc()

        async def reader(cancel: trio.CancelScope) -> None:
            try:
                while True:
                    msg = await websocket.receive_json()
                    if isinstance(msg, dict) and isinstance(msg.get("subscribe"), dict):
                        try:
                            sub.filter = parse_filter(p, msg["subscribe"])
                            await websocket.send_json({"kind": "subscribed", **msg["subscribe"]})
                        except ValueError as exc:
                            await websocket.send_json({"kind": "error", "detail": str(exc)})
            except (WebSocketDisconnect, ValueError):
                pass
            cancel.cancel()

        try:
            await websocket.send_json(
                {"kind": "hello", "user": p.subject, "revision": engine.revision_number}
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader, nursery.cancel_scope)
                if batch > 1:
                    async for event in sub.receive:
                        events = [event]
                        while len(events) < batch:
                            try:
                                events.append(sub.receive.receive_nowait())
                            except (trio.WouldBlock, trio.EndOfChannel):
                                break
                        await websocket.send_text(json.dumps(events, default=str))
                else:
                    async for event in sub.receive:
                        await websocket.send_text(json.dumps(event, default=str))
                if sub.dropped:
                    engine.prom.ws_dropped.inc()
                    await websocket.close(code=1013, reason="too slow: events were dropped")
                nursery.cancel_scope.cancel()
        except WebSocketDisconnect:
            pass
        finally:
            engine.bus.close(sub)
            engine.prom.ws_clients.dec()

    from twin.api.timeseries_routes import timeseries_router

    app.include_router(timeseries_router(engine))
    from twin.api.control_routes import router as control_router

    app.include_router(control_router)
    app.openapi_schema = None
    _add_security(app)
    return Gatekeeper(app, st)  # type: ignore[return-value]


def _add_security(app: FastAPI) -> None:
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = original()
        comps = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        comps["Bearer"] = {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
        comps["DeviceKey"] = {"type": "apiKey", "in": "header", "name": "X-Device-Key"}
        schema["security"] = [{"Bearer": []}]
        for path in PUBLIC:
            for op in schema.get("paths", {}).get(path, {}).values():
                op["security"] = []
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


AppFactory = Callable[[Engine], Awaitable[Any]]
