"""The engine as an OPC UA server: twins as an address space for SCADA/MES clients
(``twin up --opcua-listen HOST:PORT``; asyncua on the asyncio bridge).

Address space (namespace ``urn:flux-iot:twins``; every NodeId a string)::

    Objects/2:Sites/2:<site>/2:<device>          ns=2;s=<device>
        2:<point>        Variable   ns=2;s=<device>.<point>   telemetry and properties of
                                                              its model (+ any point it reports)
        2:_status        String     ns=2;s=<device>._status   online | offline | fault | ...
        2:<command>(...)  Method    ns=2;s=<device>.<command> the model's commands
                                    in: the command's params (model JSON Schema, by name)
                                    out: result (String, JSON)

Variables are read-only here and carry each reading's value, source timestamp and a StatusCode
from its quality (good / uncertain / bad; stale as ``UncertainLastUsableValue``;
``BadWaitingForInitialData`` until the first value).
Clients subscribe to them as to any PLC. Writing desired state is a command (``set``) through
the REST API or a method.

**Security**: Basic256Sha256 SignAndEncrypt and Sign by default, ``None`` only when declared;
the certificate from secrets or a self-signed one kept in the state directory
(:mod:`twin.runtime.opcua_security`).
**Logins** are the engine's users (``twin user add``): username/password, anonymous refused.
**Methods** are commands in the ledger (``source: opcua:<user>``), allowed by the one policy
(:mod:`twin.policy`: ``operate`` on ``Command`` in the device's site, i.e. an operator of that
site); the call returns when the command is final (its result, or Bad status with the reason:
``BadUserAccessDenied``, ``BadInvalidArgument``, ``BadInvalidState``, ``BadTimeout``).

Known cost: asyncua builds the standard address space at start-up, ~7 s of CPU on this VM, on
the shared asyncio loop (it yields, but Modbus/OPC UA/CoAP work on that loop is delayed by up
to ~0.5-1 s at a time meanwhile); the server is opt-in for that reason.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from twin.bindings import aio
from twin.errors import CommandError, PortInUseError, TwinError
from twin.runtime.opcua_security import (
    DEFAULT_POLICIES,
    ServerSecurity,
    parse_policies,
    server_security,
)

if TYPE_CHECKING:
    from twin.runtime.engine import Engine

log = logging.getLogger(__name__)

NAMESPACE = "urn:flux-iot:twins"
LOGIN_TTL = 60.0  # seconds a verified username/password is remembered (argon2 once a minute)
_CURRENT_USER: contextvars.ContextVar[Any] = contextvars.ContextVar("opcua_user", default=None)


@dataclass
class CallRequest:
    """A method call crossing to Trio: ``future`` gets ``(ok, result or (status, reason))``."""

    user: str
    device: str
    command: str
    params: dict[str, Any]
    future: concurrent.futures.Future[tuple[bool, Any]] = field(
        default_factory=concurrent.futures.Future
    )


class OpcUaServerService:
    name = "opcua-server"

    def __init__(self, listen: tuple[str, int] = ("127.0.0.1", 4840), *,
                 command_timeout: float = 60.0, security: ServerSecurity | None = None,
                 policies: Sequence[str] = DEFAULT_POLICIES, certificate_secret: str | None = None,
                 key_secret: str | None = None, trust_dir: Path | None = None) -> None:
        self.listen = listen
        self.security = security  # None: resolved at start from the rest (twin.runtime.opcua_security)
        self.policies = parse_policies(policies)
        self.secrets = (certificate_secret, key_secret)
        self.trust_dir = trust_dir
        self.command_timeout = command_timeout
        self.endpoint = f"opc.tcp://{listen[0]}:{listen[1]}/flux/"
        self.calls = 0
        self.refused = 0

    async def __call__(
        self, engine: Engine, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        push, receive = aio.channel(256)
        users = _Users(engine.registry)
        security = self.security
        if security is None:
            security = await trio.to_thread.run_sync(partial(
                server_security, self.policies, certificate_secret=self.secrets[0],
                key_secret=self.secrets[1], state_dir=engine.config.state_dir,
                hostname=self.listen[0], trust_dir=self.trust_dir))
        ua_server = _UaServer(self.endpoint, users, push, security)
        start: Callable[[], Any] = ua_server.start
        stop: Callable[[], Any] = ua_server.stop
        try:
            await aio.run(start)
        except OSError as exc:
            await aio.run(stop)
            host, port = self.listen
            if exc.errno == 98:
                raise PortInUseError(host, port, "opcua server") from exc
            raise TwinError(f"opcua server: cannot listen on {host}:{port}: {exc}") from exc
        try:
            async with trio.open_nursery() as nursery:
                await self._sync_devices(engine, ua_server)
                nursery.start_soon(self._values, engine, ua_server)
                nursery.start_soon(self._statuses, engine, ua_server)
                nursery.start_soon(self._reload, engine, ua_server)
                task_status.started({"endpoint": self.endpoint,
                                     "security": list(security.policies)})
                log.info("opcua server: %s (%s)", self.endpoint, ", ".join(security.policies))
                async with receive:
                    async for req in receive:
                        nursery.start_soon(self._call, engine, req)
        finally:
            with trio.move_on_after(5) as scope:
                scope.shield = True
                await aio.run(stop)

    async def _sync_devices(self, engine: Engine, ua_server: _UaServer) -> None:
        devices = []
        for (kind, name), doc in sorted(engine.specs.items()):
            if kind != "Device":
                continue
            spec = doc.get("spec") or {}
            model = (engine.specs.get(("DeviceModel", str(spec.get("model", "")))) or {}).get(
                "spec"
            ) or {}
            site = str((doc.get("metadata") or {}).get("site") or "_")
            devices.append((name, site, model))
        add: Callable[[], Any] = partial(ua_server.add_devices, devices)
        await aio.run(add)

    async def _reload(self, engine: Engine, ua_server: _UaServer) -> None:
        """A new revision: devices added get their objects, devices removed lose them."""
        while True:
            await engine.wait_revision(engine.revision_number + 1)
            await self._sync_devices(engine, ua_server)

    async def _values(self, engine: Engine, ua_server: _UaServer) -> None:
        """Readings from the bus -> variables, the latest per point, every 200 ms."""
        from twin.runtime.bus import Filter

        while True:
            with engine.bus.subscribe(Filter.of(kinds=["reading"]), buffer=10_000,
                                      name="opcua-server") as sub:
                latest: dict[tuple[str, str], tuple[Any, float, str]] = {}
                deadline = trio.current_time() + 0.2
                async for ev in sub.receive:
                    latest[(ev["device"], ev["point"])] = (ev["value"], ev["ts"], ev["quality"])
                    if trio.current_time() >= deadline or len(latest) > 5000:
                        batch, latest = latest, {}
                        update: Callable[[], Any] = partial(ua_server.update, batch)
                        await aio.run(update)
                        deadline = trio.current_time() + 0.2
            await trio.sleep(0.5)  # dropped as a slow subscriber: subscribe again

    async def _statuses(self, engine: Engine, ua_server: _UaServer) -> None:
        known: dict[str, str] = {}
        while True:
            changed = {}
            for twin in engine.twins.all():
                s = str(twin.status)
                if known.get(twin.name) != s:
                    known[twin.name] = changed[twin.name] = s
            if changed:
                update: Callable[[], Any] = partial(ua_server.statuses, changed)
                await aio.run(update)
            await trio.sleep(0.5)

    async def _call(self, engine: Engine, req: CallRequest) -> None:
        from twin import policy

        self.calls += 1
        try:
            user = await trio.to_thread.run_sync(engine.registry.get_user, req.user)
            doc = engine.device_doc(req.device)
            if user is None or doc is None:
                raise _Refused("BadUserAccessDenied", "unknown user or device")
            site = policy.doc_site(doc)
            decision = policy.decide(user, policy.OPERATE, new=policy.Target.of("Command", site))
            if not decision:
                raise _Refused("BadUserAccessDenied", decision.reason)
            control = engine.service_info.get("control")
            ledger = getattr(control, "ledger", None)
            if ledger is None:
                raise _Refused("BadInvalidState", "the engine runs without its control service")
            try:
                cmd = await ledger.submit(req.device, req.command, req.params,
                                          source=f"opcua:{req.user}")
            except CommandError as exc:
                raise _Refused("BadInvalidArgument", str(exc)) from None
            with trio.move_on_after(self.command_timeout):
                done = await ledger.wait(cmd.id)
                if str(done.status) == "success":
                    answer: tuple[bool, Any] = (True, done.result)
                else:
                    answer = (False, ("BadInvalidState", f"{done.status}: {done.error or ''}"))
                req.future.set_result(answer)
                return
            raise _Refused("BadTimeout", f"command {cmd.id} not final within "
                           f"{self.command_timeout:g}s")
        except _Refused as exc:
            self.refused += 1
            log.info("opcua server: %s %s.%s refused: %s", req.user, req.device, req.command,
                     exc.reason)
            if not req.future.done():
                req.future.set_result((False, (exc.status, exc.reason)))
        except Exception as exc:  # never leave the caller hanging
            log.exception("opcua server: call %s.%s failed", req.device, req.command)
            if not req.future.done():
                req.future.set_result((False, ("BadInternalError", str(exc))))


class _Refused(Exception):
    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


class _Users:
    """asyncua's user manager over the engine's users (the same passwords as the API)."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry
        self._ok: dict[str, float] = {}

    def get_user(self, iserver: Any, username: Any = None, password: Any = None,
                 certificate: Any = None) -> Any:
        from asyncua.crypto.permission_rules import User, UserRole

        from twin.registry.credentials import verify_secret

        if not username or password is None:
            return None
        digest = hashlib.sha256(f"{username}\0{password}".encode()).hexdigest()
        now = time.monotonic()
        if now - self._ok.get(digest, -1e9) < LOGIN_TTL:
            return User(role=UserRole.User, name=str(username))
        rec = self.registry.get_user(str(username))
        if rec is None or rec.disabled or not verify_secret(rec.password_hash, str(password)):
            log.info("opcua server: login of %r refused", username)
            return None
        self._ok[digest] = now
        return User(role=UserRole.User, name=str(username))


class _Rules:
    """Who may do what on the wire: any logged-in user reads, browses and subscribes and may
    call methods (each call is then judged by twin.policy); nobody writes or changes the
    address space. Remembers the caller for the method handler (same asyncio task)."""

    def __init__(self) -> None:
        from asyncua import ua

        ids = ua.ObjectIds
        self.allowed = {
            ua.NodeId(getattr(ids, f"{n}Request_Encoding_DefaultBinary"))
            for n in ("Read", "Browse", "BrowseNext", "TranslateBrowsePathsToNodeIds",
                      "RegisterNodes", "UnregisterNodes", "CreateSubscription",
                      "ModifySubscription", "DeleteSubscriptions", "CreateMonitoredItems",
                      "ModifyMonitoredItems", "DeleteMonitoredItems", "SetMonitoringMode",
                      "Publish", "Republish", "SetPublishingMode", "HistoryRead", "Call",
                      "TransferSubscriptions")
        }

    def check_validity(self, user: Any, action_type: Any, body: Any) -> bool:
        _CURRENT_USER.set(user)
        return user is not None and getattr(user, "name", None) is not None and (
            action_type in self.allowed
        )


_TYPES = {"number": "Double", "integer": "Int64", "boolean": "Boolean", "string": "String"}


class _UaServer:
    """Everything here runs on the asyncio thread."""

    def __init__(self, endpoint: str, users: _Users, push: aio.Push[Any],
                 security: ServerSecurity) -> None:
        self.endpoint = endpoint
        self.security = security
        self.users = users
        self.push = push
        self.server: Any = None
        self.idx = 2
        self.sites: dict[str, Any] = {}
        self.devices: dict[str, Any] = {}
        self.vars: dict[tuple[str, str], Any] = {}
        self.status_vars: dict[str, Any] = {}
        self.models: dict[str, Mapping[str, Any]] = {}

    async def start(self) -> None:
        from asyncua import Server, ua

        s = Server(user_manager=self.users)  # type: ignore[arg-type]
        await s.init()
        await s.set_application_uri("urn:flux-iot:engine")
        s.set_endpoint(self.endpoint)
        s.set_server_name("FLUX IoT engine")
        sec = self.security
        if sec.certificate is not None and sec.private_key is not None:
            await s.load_certificate(sec.certificate)  # DER
            await s.load_private_key(sec.private_key)  # DER (PKCS#8)
        if sec.trust_dir is not None:
            from asyncua.crypto.truststore import TrustStore
            from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions

            store = TrustStore([sec.trust_dir], [])
            await store.load()
            opts = (CertificateValidatorOptions.TIME_RANGE | CertificateValidatorOptions.URI
                    | CertificateValidatorOptions.PEER_CLIENT | CertificateValidatorOptions.TRUSTED)
            s.set_certificate_validator(CertificateValidator(opts, store))
        s.set_security_policy(sec.policy_types(), permission_ruleset=_Rules())  # type: ignore[arg-type]
        s.set_identity_tokens([ua.UserNameIdentityToken])
        self.idx = await s.register_namespace(NAMESPACE)
        self.root = await s.nodes.objects.add_object(f"ns={self.idx};s=Sites",
                                                     ua.QualifiedName("Sites", self.idx))
        self.server = s
        await s.start()

    async def stop(self) -> None:
        s, self.server = self.server, None
        if s is not None:
            try:
                await asyncio.wait_for(s.stop(), 3)
            except (Exception, asyncio.CancelledError) as exc:
                log.debug("opcua server: stop: %s", exc)

    async def add_devices(self, devices: list[tuple[str, str, Mapping[str, Any]]]) -> None:
        from asyncua import ua

        idx = self.idx
        wanted = {name for name, _, _ in devices}
        for gone in sorted(set(self.devices) - wanted):
            obj = self.devices.pop(gone)
            self.models.pop(gone, None)
            self.status_vars.pop(gone, None)
            for key in [k for k in self.vars if k[0] == gone]:
                del self.vars[key]
            await self.server.delete_nodes([obj], recursive=True)
        for name, site, model in devices:
            if name in self.devices:
                continue
            folder = self.sites.get(site)
            if folder is None:
                folder = await self.root.add_object(f"ns={idx};s=site:{site}",
                                                    ua.QualifiedName(site, idx))
                self.sites[site] = folder
            obj = await folder.add_object(f"ns={idx};s={name}", ua.QualifiedName(name, idx))
            self.devices[name] = obj
            self.models[name] = model
            for point, decl in {**(model.get("telemetry") or {}),
                                **(model.get("properties") or {})}.items():
                await self._var(name, point, _TYPES.get(str((decl or {}).get("type")), ""))
            self.status_vars[name] = await obj.add_variable(
                f"ns={idx};s={name}._status", ua.QualifiedName("_status", idx),
                ua.Variant("unknown", ua.VariantType.String))
            for command, cdecl in (model.get("commands") or {}).items():
                await self._method(obj, name, str(command), cdecl or {})

    async def _var(self, device: str, point: str, vtype: str) -> Any:
        from asyncua import ua

        key = (device, point)
        node = self.vars.get(key)
        if node is not None:
            return node
        initial: dict[str, Any] = {"Double": 0.0, "Int64": 0, "Boolean": False, "String": ""}
        variant = (ua.Variant(initial[vtype], getattr(ua.VariantType, vtype)) if vtype
                   else ua.Variant(None))
        node = await self.devices[device].add_variable(
            f"ns={self.idx};s={device}.{point}", ua.QualifiedName(point, self.idx), variant)
        waiting: Any = ua.StatusCodes.BadWaitingForInitialData
        dv = ua.DataValue(variant, StatusCode=ua.StatusCode(waiting))
        await self.server.write_attribute_value(node.nodeid, dv)
        self.vars[key] = node
        return node

    async def _method(self, obj: Any, device: str, command: str, decl: Mapping[str, Any]) -> None:
        from asyncua import ua

        schema = decl.get("params") or {}
        props = dict(schema.get("properties") or {})
        names = list(props)

        def arg(name: str, vtype: str) -> Any:
            a = ua.Argument()
            a.Name = name
            a.DataType = ua.NodeId(ua.Int32(getattr(ua.VariantType, vtype).value))
            a.ValueRank = -1
            return a

        inputs = [arg(n, _TYPES.get(str((props[n] or {}).get("type")), "String")) for n in names]

        async def handler(parent: Any, *args: Any) -> Any:
            user = _CURRENT_USER.get()
            values = [a.Value if isinstance(a, ua.Variant) else a for a in args]
            params: dict[str, Any] = {}
            for n, v in zip(names, values, strict=False):
                if str((props[n] or {}).get("type")) not in _TYPES and isinstance(v, str):
                    with contextlib.suppress(ValueError):
                        v = json.loads(v)
                params[n] = v
            req = CallRequest(str(getattr(user, "name", "") or ""), device, command, params)
            self.push(req)
            ok, result = await asyncio.wrap_future(req.future)
            if not ok:
                status, reason = result
                log.info("opcua server: %s.%s: %s %s", device, command, status, reason)
                return ua.StatusCode(getattr(ua.StatusCodes, status))  # the call's status
            return [ua.Variant(json.dumps(result, default=str), ua.VariantType.String)]

        await obj.add_method(f"ns={self.idx};s={device}.{command}",
                             ua.QualifiedName(command, self.idx), handler, inputs,
                             [arg("result", "String")])

    async def update(self, batch: Mapping[tuple[str, str], tuple[Any, float, str]]) -> None:
        import datetime as dt

        from asyncua import ua

        codes = {"good": ua.StatusCodes.Good, "uncertain": ua.StatusCodes.Uncertain,
                 "stale": ua.StatusCodes.UncertainLastUsableValue, "bad": ua.StatusCodes.Bad}
        for (device, point), (value, ts, quality) in batch.items():
            if device not in self.devices:
                continue
            node = self.vars.get((device, point))
            if node is None:
                vtype = ("Boolean" if isinstance(value, bool) else "Int64" if isinstance(value, int)
                         else "Double" if isinstance(value, float) else "String")
                node = await self._var(device, point, vtype)
            if value is not None and not isinstance(value, bool | int | float | str):
                value = json.dumps(value, default=str)
            when: Any = dt.datetime.fromtimestamp(ts, dt.UTC)
            now: Any = dt.datetime.now(dt.UTC)
            code: Any = codes.get(quality, 0)
            dv = ua.DataValue(ua.Variant(value), StatusCode=ua.StatusCode(code),
                              SourceTimestamp=when, ServerTimestamp=now)
            try:
                await self.server.write_attribute_value(node.nodeid, dv)
            except Exception as exc:  # a value of another type than the variable's: as text
                log.debug("opcua server: %s.%s: %s", device, point, exc)

    async def statuses(self, changed: Mapping[str, str]) -> None:
        from asyncua import ua

        for device, status in changed.items():
            node = self.status_vars.get(device)
            if node is not None:
                await self.server.write_attribute_value(
                    node.nodeid, ua.DataValue(ua.Variant(status, ua.VariantType.String)))


def describe(info: Any) -> str | None:
    if not info:
        return None
    security = ", ".join(info.get("security") or ())
    return (f"{info['endpoint']}   ({security + '; ' if security else ''}logins: the engine's "
            "users; methods = commands)")
