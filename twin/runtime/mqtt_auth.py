"""Broker security for the engine: who may connect, and what each principal may do.

Authentication (``Broker(authenticate=...)``), tried in this order:

1. **Client certificate** (mutual TLS): the certificate's CN names a Device with an ``mqtt``
   binding → that device (``cert_devices=True``; the TLS layer already verified the chain).
2. **Edge key**: user name = ``edge:<name>`` of an EdgeNode in the spec, password = its uplink
   key (``twin edge-key NAME``: a device key of the pseudo device ``edge:<name>``); it may
   publish on ``flux/_edge/<name>/req`` and subscribe to ``flux/_edge/<name>/resp`` only.
3. **Device key**: user name = device name, password = a device key (``dk_...``, the same keys
   as HTTP ingest, verified by the very same :class:`twin.registry.credentials.DeviceKeyVerifier`:
   argon2 once, then a SHA-256 cache whose entries are trusted for at most 10 s without being
   confirmed against the registry, so a revoked key is refused within 10 s).
4. **User**: user name and password of an API user (argon2 ``verify_secret``).
5. Anonymous clients only with ``allow_anonymous=True`` (then they may do nothing but what
   ``anonymous_role`` allows; default: nothing).

Authorisation (``Broker(authorize=...)``), derived from the running spec
(:func:`twin.bindings.mqtt.device_topics`) and, for users, decided by :mod:`twin.policy`:

=========  ===========================================  ===========================================
principal  publish                                      subscribe
=========  ===========================================  ===========================================
device     its telemetry, state, events, status and     its command and desired topics only
           command response topics only
viewer     nothing                                      anything under its sites' prefixes (all
                                                        when unscoped), never ``$SYS``
operator   command / desired topics of devices in its    as viewer, plus ``$SYS``
           sites (all when unscoped)
admin      as operator; unscoped: anything               as operator; unscoped: anything
engine     anything (the in-process client never passes through here)
=========  ===========================================  ===========================================

Revocation (:meth:`RegistryAuth.revalidate`, run every ``REVALIDATE_INTERVAL`` = 5 s by both
``twin up``'s MQTT service and ``twin broker``, so what was revoked takes effect within 10 s
with room for the registry query): revoked device keys are swept from the key cache (whoever
revoked them: the API, the CLI, another process, a device deleted through ``apply``, which
revokes its keys), and every **open** connection whose credentials no longer hold is closed
with reason 0x87 (not authorised): a revoked key, a device removed from the spec or no longer
bound to MQTT, a deleted, disabled or re-created user (another user id), a user whose tokens
were all revoked (its generation moved), a user whose role or sites changed (they reconnect
and get the new rights). Without this a revoked device could keep publishing on a connection
opened before the revocation for as long as it stayed up.

Failures are counted in ``stats`` (exported on /metrics by the engine's MQTT service).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from twin import policy
from twin.mqtt.topics import matches

log = logging.getLogger(__name__)

Specs = Mapping[tuple[str, str], Mapping[str, Any]]

# Open connections are re-checked this often; with the registry query on top, a revocation
# takes effect within the documented 10 s.
REVALIDATE_INTERVAL = 5.0


@dataclass(frozen=True)
class MqttPrincipal:
    kind: str  # device | edge | user | anonymous | engine
    name: str
    role: str = ""  # users: viewer | operator | admin
    sites: tuple[str, ...] = ()
    via: str = ""  # key | password | certificate | anonymous
    key_digest: str = field(default="", repr=False, compare=False)  # sha256 of a device key
    user_id: str = ""  # users: the User.id and generation they logged in as
    generation: int = 0


@dataclass(frozen=True)
class DeviceAcl:
    site: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


def cert_common_name(cert: Any) -> str | None:
    """The subject CN of a peer certificate as returned by ``SSLSocket.getpeercert()``."""
    if not isinstance(cert, Mapping):
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def _covered(allowed: str, flt: str) -> bool:
    """Is every topic matched by ``flt`` also matched by ``allowed``? (exact, or no wildcard)"""
    if flt == allowed:
        return True
    if "+" in flt or "#" in flt:
        return False
    return matches(allowed, flt)


_MAY_PUBLISH_MAX = 100_000
"""Bound of ``RegistryAuth._may_publish`` (emptied when full: topics chosen by peers)."""


class RegistryAuth:
    def __init__(
        self,
        registry: Any,
        specs: Callable[[], Specs],
        *,
        allow_anonymous: bool = False,
        anonymous_role: str | None = None,
        cert_devices: bool = True,
        users: bool = True,
        verifier: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        from twin.registry.credentials import DeviceKeyVerifier

        self.registry = registry
        self.specs = specs
        self.allow_anonymous = allow_anonymous
        self.anonymous_role = anonymous_role
        self.cert_devices = cert_devices
        self.users = users
        self.keys = verifier or DeviceKeyVerifier(registry)
        self.clock = clock
        self.stats: Counter[str] = Counter()  # auth_failed, denied_publish, denied_subscribe
        self._acl_src: Any = None
        self._acl: dict[str, DeviceAcl] = {}
        self._may_publish: dict[tuple[str, str], bool] = {}
        """(device, topic) → the ACL's answer, for the specs of ``_acl`` (a device publishes
        to the same few topics: its telemetry is one publish ACL check per message)."""
        self._swept_specs: Any = None

    # -- ACLs from the spec -----------------------------------------------------------------
    def device_acl(self, device: str) -> DeviceAcl | None:
        specs = self.specs()
        if specs is not self._acl_src:
            self._acl_src, self._acl, self._may_publish = specs, {}, {}
        acl = self._acl.get(device)
        if acl is None:
            doc = specs.get(("Device", device))
            binding = ((doc or {}).get("spec") or {}).get("binding") or {}
            if not isinstance(binding, Mapping) or "mqtt" not in binding:
                return None
            from twin.bindings.mqtt import (
                DEVICE_PUBLISHES,
                DEVICE_SUBSCRIBES,
                device_topics,
                doc_site,
            )

            assert doc is not None
            site = doc_site(doc)
            topics = device_topics(device, site, binding.get("mqtt") or {})
            acl = DeviceAcl(
                site,
                tuple(topics[k] for k in DEVICE_PUBLISHES),
                tuple(topics[k] for k in DEVICE_SUBSCRIBES),
            )
            self._acl[device] = acl
        return acl

    def _device_topics_in(self, sites: tuple[str, ...]) -> list[DeviceAcl]:
        out = []
        for kind, name in list(self.specs()):
            if kind != "Device":
                continue
            acl = self.device_acl(name)
            if acl is not None and (not sites or acl.site in sites):
                out.append(acl)
        return out

    # -- authentication ---------------------------------------------------------------------
    async def authenticate(
        self, client_id: str, username: str | None, password: bytes | None, peer_cert: Any
    ) -> MqttPrincipal | None:
        principal = await self._authenticate(username, password, peer_cert)
        if principal is None:
            self.stats["auth_failed"] += 1
            log.info("mqtt: authentication failed for client %r (user %r)", client_id, username)
        return principal

    async def _authenticate(
        self, username: str | None, password: bytes | None, peer_cert: Any
    ) -> MqttPrincipal | None:
        cn = cert_common_name(peer_cert)
        if (
            cn
            and self.cert_devices
            and self.device_acl(cn) is not None
            and (username is None or username == cn)
        ):
            return MqttPrincipal("device", cn, via="certificate")
        if username is None:
            if self.allow_anonymous:
                return MqttPrincipal("anonymous", "", self.anonymous_role or "", via="anonymous")
            return None
        if password is None:
            return None
        try:
            secret = password.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if username.startswith("edge:") and secret.startswith("dk_"):
            edge = username[len("edge:") :]
            if ("EdgeNode", edge) not in self.specs():
                return None
            now = self.clock()
            ok = self.keys.cached(username, secret, now)
            if ok is None:
                ok = await trio.to_thread.run_sync(self.keys.verify, username, secret, now)
            if not ok:
                return None
            from twin.registry.credentials import sha256

            return MqttPrincipal("edge", edge, via="key", key_digest=sha256(secret))
        if self.device_acl(username) is not None and secret.startswith("dk_"):
            specs = self.specs()
            if specs is not self._swept_specs:
                # a new revision may have deleted a device (and its keys) that is back under
                # the same name: forget revoked keys before the cache answers
                self._swept_specs = specs
                await trio.to_thread.run_sync(self.keys.sweep)
            now = self.clock()
            ok = self.keys.cached(username, secret, now)
            if ok is None:
                ok = await trio.to_thread.run_sync(self.keys.verify, username, secret, now)
            if not ok:
                return None
            from twin.registry.credentials import sha256

            return MqttPrincipal("device", username, via="key", key_digest=sha256(secret))
        if self.users:
            return await trio.to_thread.run_sync(self._check_user, username, secret)
        return None

    def _check_user(self, username: str, secret: str) -> MqttPrincipal | None:
        from twin.registry.credentials import verify_secret

        user = self.registry.get_user(username)
        if user is None or user.disabled:
            return None
        if not verify_secret(user.password_hash, secret):
            return None
        return MqttPrincipal(
            "user",
            user.name,
            user.role,
            tuple(user.sites),
            via="password",
            user_id=user.id,
            generation=user.generation,
        )

    # -- revocation -------------------------------------------------------------------------
    def _still_valid(self, p: MqttPrincipal, users: Mapping[str, Any]) -> bool:
        if p.kind == "edge":
            return ("EdgeNode", p.name) in self.specs() and self.keys.cached_digest(
                f"edge:{p.name}", p.key_digest
            ) is True
        if p.kind == "device":
            if self.device_acl(p.name) is None:
                return False
            if p.via == "key":
                return self.keys.cached_digest(p.name, p.key_digest) is True
            return True
        if p.kind == "user":
            user = users.get(p.name)
            return (
                user is not None
                and not user.disabled
                and user.id == p.user_id
                and user.generation == p.generation
                and user.role == p.role
                and tuple(user.sites) == p.sites
            )
        if p.kind == "anonymous":
            return self.allow_anonymous
        return True

    def _revoked_sync(self, principals: list[MqttPrincipal]) -> list[MqttPrincipal]:
        """Blocking (registry queries): the principals whose credentials no longer hold."""
        self.keys.sweep()
        names = {p.name for p in principals if p.kind == "user"}
        users = {n: self.registry.get_user(n) for n in names}
        return [p for p in principals if not self._still_valid(p, users)]

    async def revalidate_once(self, broker: Any) -> int:
        """Close every open connection of ``broker`` whose credentials were revoked."""
        from twin.mqtt.codec import ReasonCode

        # network connections only: the engine's in-process client has no principal
        conns = [
            s.conn
            for s in list(broker.sessions.values())
            if isinstance(getattr(s.conn, "principal", None), MqttPrincipal)
        ]
        principals = [c.principal for c in conns]
        if not principals:
            await trio.to_thread.run_sync(self.keys.sweep)
            return 0
        revoked = {id(p) for p in await trio.to_thread.run_sync(self._revoked_sync, principals)}
        n = 0
        for conn in conns:
            if id(conn.principal) in revoked and not conn.closing:
                p = conn.principal
                log.info("mqtt: closing %s %r: credentials revoked", p.kind, p.name)
                conn.kick(ReasonCode.NOT_AUTHORIZED, "credentials revoked")
                self.stats["revoked"] += 1
                n += 1
        return n

    async def revalidate(self, broker: Any, interval: float = REVALIDATE_INTERVAL) -> None:
        """Forever: every ``interval``, :meth:`revalidate_once`."""
        while True:
            await trio.sleep(interval)
            try:
                await self.revalidate_once(broker)
            except Exception:
                log.exception("mqtt: credential revalidation failed; retrying next interval")

    # -- authorisation ----------------------------------------------------------------------
    def authorize(self, principal: Any, action: str, topic: str) -> bool:
        ok = self._authorize(principal, action, topic)
        if not ok:
            self.stats[f"denied_{action}"] += 1
        return ok

    def _authorize(self, p: Any, action: str, topic: str) -> bool:
        if not isinstance(p, MqttPrincipal):
            return False
        if p.kind == "engine":
            return True
        flt = topic
        if action == "subscribe" and topic.startswith("$share/"):
            parts = topic.split("/", 2)
            flt = parts[2] if len(parts) == 3 else topic
        if p.kind == "edge":
            from twin.mqtt.topics import edge_link_topics

            req, resp = edge_link_topics(p.name)
            return topic == (req if action == "publish" else resp)
        if p.kind == "device":
            acl = self.device_acl(p.name)
            if acl is None:
                return False
            if action == "publish":
                key = (p.name, topic)
                ok = self._may_publish.get(key)
                if ok is None:
                    ok = any(matches(a, topic) for a in acl.publish)
                    if len(self._may_publish) >= _MAY_PUBLISH_MAX:
                        self._may_publish.clear()
                    self._may_publish[key] = ok
                return ok
            return any(_covered(a, flt) for a in acl.subscribe)
        # users: twin.policy decides (a subscription reads, a publish to a device's command
        # and desired topics operates that device; other topics are an unscoped admin's)
        if action == "subscribe":
            if flt.startswith("$SYS"):
                return policy.allows(p, policy.READ, old=policy.Target("Broker", frozenset()))
            if policy.allows(p, policy.READ, old=policy.Target("Topic", None)):
                return True  # every site's topics
            return any(
                flt.startswith(f"flux/{site}/")
                and policy.allows(p, policy.READ, old=policy.Target.of("Topic", site))
                for site in p.sites
            ) or any(
                policy.allows(p, policy.READ, old=policy.Target.of("Device", acl.site))
                and any(_covered(t, flt) for t in (*acl.publish, *acl.subscribe))
                for acl in self._device_topics_in(p.sites)
            )
        if policy.allows(p, policy.WRITE, old=policy.Target("Topic", None)):
            return True
        return any(
            policy.allows(p, policy.OPERATE, old=policy.Target.of("Device", acl.site))
            and any(matches(t, topic) for t in acl.subscribe)
            for acl in self._device_topics_in(p.sites)
        )
