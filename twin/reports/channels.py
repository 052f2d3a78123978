"""Delivery channels shared by reports, notification rules and the scene action ``notify``:
``email`` (SMTP with STARTTLS or implicit TLS, login with a secret reference), ``webhook``
(HTTP POST of a JSON body signed with HMAC-SHA256, only to destinations the engine's webhook
allow-list admits — the same rules as scene webhooks, :mod:`twin.control.webhooks`),
``mqtt`` (publish to a topic through the engine's MQTT hub) and ``folder`` (files written
atomically: a temporary file in the same folder, fsync, rename).

:func:`deliver` retries temporary failures with exponential backoff and returns what
happened (attempts, last error) instead of raising: the caller records it.

Webhook signature: ``X-Twin-Signature: sha256=<hex of HMAC-SHA256(secret, timestamp + "." +
body)>`` with ``X-Twin-Timestamp: <unix seconds>``; a receiver recomputes it over the raw body
and refuses old timestamps (replays).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import smtplib
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import trio

from twin.control.webhooks import WebhookPolicy, WebhookRefused
from twin.reports.errors import DeliveryError
from twin.spec.secrets import Secrets, env_name
from twin.spec.units import parse_duration

log = logging.getLogger(__name__)

SIGNATURE = "X-Twin-Signature"
TIMESTAMP = "X-Twin-Timestamp"
Publish = Callable[[str, bytes, int, bool], Awaitable[None]]


@dataclass(frozen=True)
class Attachment:
    filename: str
    data: bytes
    media_type: str


@dataclass
class Message:
    """One thing to deliver: a subject and text for people, a JSON body for machines."""

    subject: str
    text: str
    payload: dict[str, Any]
    attachments: Sequence[Attachment] = ()
    html: str | None = None
    name: str = "message"  # file stem of a folder delivery without attachments


@dataclass
class ChannelContext:
    state_dir: Path
    secrets: Secrets
    webhooks: WebhookPolicy = field(default_factory=WebhookPolicy.from_env)
    mqtt: Publish | None = None
    sender: str = "flux-iot@localhost"


def sign(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str) -> bool:
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


def _secret(ctx: ChannelContext, ref: Any) -> str:
    name = ref.get("secret") if isinstance(ref, Mapping) else None
    if not name:
        raise DeliveryError("a secret reference is missing", permanent=True)
    value = ctx.secrets.get(str(name))
    if value is None:
        raise DeliveryError(
            f"secret {name!r} is not set",
            hint=f"export {env_name(str(name))}=... or add it to {ctx.secrets.file}",
            permanent=True,
        )
    return value


def target(channel: Mapping[str, Any]) -> str:
    """A short description of where a channel delivers (for run records and logs)."""
    kind = channel.get("type")
    if kind == "email":
        return "email:" + ",".join(channel.get("to") or [])
    if kind == "webhook":
        return "webhook:" + str(channel.get("url"))
    if kind == "mqtt":
        return "mqtt:" + str(channel.get("topic"))
    if kind == "folder":
        return "folder:" + str(channel.get("path"))
    return str(kind)


# -- email ----------------------------------------------------------------------------------
def _email_sync(channel: Mapping[str, Any], msg: Message, ctx: ChannelContext,
                password: str | None) -> None:
    smtp = channel.get("smtp") or {}
    host = str(smtp["host"])
    implicit = bool(smtp.get("tls", False))
    starttls = bool(smtp.get("starttls", not implicit))
    port = int(smtp.get("port") or (465 if implicit else 587 if starttls else 25))
    timeout = parse_duration(smtp.get("timeout", "30s"))
    context = ssl.create_default_context(cafile=smtp.get("ca_file"))
    if smtp.get("verify") is False:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    em = EmailMessage()
    em["Subject"] = msg.subject
    em["From"] = str(channel.get("from") or ctx.sender)
    em["To"] = ", ".join(channel.get("to") or [])
    if channel.get("cc"):
        em["Cc"] = ", ".join(channel["cc"])
    em.set_content(msg.text)
    if msg.html:
        em.add_alternative(msg.html, subtype="html")
    for a in msg.attachments:
        main, _, sub = a.media_type.partition("/")
        em.add_attachment(a.data, maintype=main, subtype=sub, filename=a.filename)
    client: smtplib.SMTP
    try:
        if implicit:
            client = smtplib.SMTP_SSL(host, port, timeout=timeout, context=context)
        else:
            client = smtplib.SMTP(host, port, timeout=timeout)
        try:
            client.ehlo()
            if starttls and not implicit:
                client.starttls(context=context)
                client.ehlo()
            username = smtp.get("username")
            if username:
                client.login(str(username), password or "")
            client.send_message(em)
        finally:
            try:
                client.quit()
            except (smtplib.SMTPException, OSError):
                client.close()
    except smtplib.SMTPAuthenticationError as exc:
        raise DeliveryError(f"SMTP {host}:{port} refused the login ({exc.smtp_code})",
                            hint="check smtp.username and the password secret",
                            permanent=True) from None
    except smtplib.SMTPRecipientsRefused as exc:
        raise DeliveryError(f"SMTP {host}:{port} refused the recipients "
                            f"{', '.join(exc.recipients)}", permanent=True) from None
    except smtplib.SMTPNotSupportedError as exc:
        raise DeliveryError(f"SMTP {host}:{port}: {exc}", hint="set smtp.starttls: false only "
                            "on a trusted network", permanent=True) from None
    except ssl.SSLError as exc:
        raise DeliveryError(f"SMTP {host}:{port}: TLS failed: {exc.reason or exc}",
                            permanent=True) from None
    except (smtplib.SMTPException, OSError) as exc:
        raise DeliveryError(f"SMTP {host}:{port}: {type(exc).__name__}: {exc}") from None


async def send_email(channel: Mapping[str, Any], msg: Message, ctx: ChannelContext) -> None:
    smtp = channel.get("smtp") or {}
    password = _secret(ctx, smtp["password"]) if smtp.get("password") else None
    await trio.to_thread.run_sync(_email_sync, channel, msg, ctx, password)


# -- webhook --------------------------------------------------------------------------------
async def send_webhook(channel: Mapping[str, Any], msg: Message, ctx: ChannelContext) -> None:
    import httpx

    payload = dict(msg.payload)
    if msg.attachments and channel.get("attach", True):
        payload["files"] = [
            {"filename": a.filename, "media_type": a.media_type, "bytes": len(a.data),
             "base64": base64.b64encode(a.data).decode()}
            for a in msg.attachments
        ]
    body = json.dumps(payload, ensure_ascii=False, allow_nan=False, default=str).encode()
    stamp = str(int(time.time()))
    headers = {"Content-Type": "application/json", TIMESTAMP: stamp,
               "User-Agent": "flux-iot", **dict(channel.get("headers") or {})}
    if channel.get("secret"):
        headers[SIGNATURE] = sign(_secret(ctx, channel["secret"]), stamp, body)
    url = str(channel["url"])
    seconds = parse_duration(channel.get("timeout", "10s"))
    try:
        status = await ctx.webhooks.send("POST", url, None, headers, seconds, content=body)
    except WebhookRefused as exc:
        raise DeliveryError(str(exc), hint=exc.hint, permanent=True) from None
    except httpx.HTTPError as exc:
        raise DeliveryError(f"webhook {url}: {type(exc).__name__}: {exc}") from None
    if status >= 300:
        permanent = 400 <= status < 500 and status not in (408, 425, 429)
        raise DeliveryError(f"webhook {url} answered HTTP {status}", permanent=permanent)


# -- folder ---------------------------------------------------------------------------------
def folder_path(channel: Mapping[str, Any], ctx: ChannelContext) -> Path:
    path = Path(os.path.expanduser(str(channel["path"])))
    return path if path.is_absolute() else ctx.state_dir / path


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


async def send_folder(channel: Mapping[str, Any], msg: Message, ctx: ChannelContext) -> None:
    folder = folder_path(channel, ctx)
    files = [(a.filename, a.data) for a in msg.attachments]
    if not files:
        body = json.dumps({"subject": msg.subject, "text": msg.text, **msg.payload},
                          ensure_ascii=False, indent=2, default=str).encode()
        files = [(f"{msg.name}.json", body)]

    def write() -> None:
        for name, data in files:
            write_atomic(folder / name, data)

    try:
        await trio.to_thread.run_sync(write)
    except OSError as exc:
        raise DeliveryError(f"folder {folder}: {exc.strerror or exc}") from None


# -- mqtt -----------------------------------------------------------------------------------
async def send_mqtt(channel: Mapping[str, Any], msg: Message, ctx: ChannelContext) -> None:
    if ctx.mqtt is None:
        raise DeliveryError("no MQTT broker in this engine", hint="run twin up with MQTT",
                            permanent=True)
    payload = json.dumps({"subject": msg.subject, "text": msg.text, **msg.payload},
                         ensure_ascii=False, default=str).encode()
    try:
        await ctx.mqtt(str(channel["topic"]), payload, int(channel.get("qos", 1)),
                       bool(channel.get("retain", False)))
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise DeliveryError(f"MQTT publish to {channel['topic']}: {exc}") from None


SENDERS: dict[str, Callable[[Mapping[str, Any], Message, ChannelContext], Awaitable[None]]] = {
    "email": send_email,
    "webhook": send_webhook,
    "folder": send_folder,
    "mqtt": send_mqtt,
}


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3
    backoff: float = 5.0  # seconds before the 2nd attempt; doubles

    @classmethod
    def of(cls, spec: Mapping[str, Any] | None) -> RetryPolicy:
        spec = spec or {}
        return cls(int(spec.get("attempts", 3)), parse_duration(spec.get("backoff", "5s")))


async def deliver(
    channel: Mapping[str, Any], msg: Message, ctx: ChannelContext,
    retry: RetryPolicy = RetryPolicy(),
) -> dict[str, Any]:
    """Send through one channel, retrying temporary failures; what happened, never raises
    (except cancellation)."""
    sender = SENDERS.get(str(channel.get("type")))
    where = target(channel)
    outcome: dict[str, Any] = {"channel": channel.get("type"), "target": where,
                               "status": "failed", "attempts": 0, "error": None}
    if sender is None:
        outcome["error"] = f"unknown channel type {channel.get('type')!r}"
        return outcome
    delay = retry.backoff
    for attempt in range(1, retry.attempts + 1):
        outcome["attempts"] = attempt
        try:
            await sender(channel, msg, ctx)
        except DeliveryError as exc:
            outcome["error"] = str(exc)
            log.warning("delivery to %s failed (attempt %d/%d): %s", where, attempt,
                        retry.attempts, exc)
            if exc.permanent:
                break
        except Exception as exc:  # a bug in a sender must not take the service down
            outcome["error"] = f"{type(exc).__name__}: {exc}"
            log.exception("delivery to %s failed unexpectedly", where)
            break
        else:
            outcome["status"], outcome["error"] = "delivered", None
            outcome["at"] = time.time()
            return outcome
        if attempt < retry.attempts:
            await trio.sleep(delay)
            delay *= 2
    return outcome


__all__ = [
    "SENDERS", "SIGNATURE", "TIMESTAMP", "Attachment", "ChannelContext", "Message",
    "RetryPolicy", "deliver", "sign", "target", "verify", "write_atomic",
]
