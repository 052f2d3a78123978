"""Outbound webhooks of scenes (``{type: webhook, url: ...}``), only to hosts the engine's
configuration allows.

A scene is written by an operator, but its webhook is sent by the engine, from inside the
network the engine sits in: without a limit any operator could make it call an internal admin
interface or a cloud metadata service (SSRF). So:

- nothing is allowed unless configured: ``twin up --webhook-allow LIST`` or the environment
  variable ``TWIN_WEBHOOK_ALLOW`` (``ControlService(webhooks=WebhookPolicy.parse(LIST))`` when
  embedding); LIST is comma- or space-separated;
- an entry is a host name (``hooks.example.com``), a wildcard for its subdomains
  (``*.example.com``), an IP address or a network (``10.1.2.0/24``, ``fd00::/8``);
- the **resolved** addresses decide, not the name: a listed name may only reach public
  addresses; loopback, private, link-local (``169.254.169.254``), shared, reserved, multicast
  and unspecified addresses are refused unless an entry lists that address or its network;
- the request goes to the address that was checked (the connection is pinned to it; the
  ``Host`` header and TLS SNI/verification keep the name), so a second DNS answer cannot
  swap in another address; redirects are not followed; only ``http`` and ``https``.

A refused webhook fails its step (the scene's trace says why); nothing is sent.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import trio

from twin.errors import TwinError

ENV = "TWIN_WEBHOOK_ALLOW"

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class WebhookRefused(TwinError):
    """The configuration does not allow this webhook's destination."""


def _address(text: str) -> Address:
    addr = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def is_public(addr: Address) -> bool:
    return addr.is_global and not addr.is_multicast


@dataclass(frozen=True)
class WebhookPolicy:
    hosts: tuple[str, ...] = ()  # lower-case names; "*.example.com" for subdomains
    networks: tuple[Network, ...] = ()

    @classmethod
    def parse(cls, entries: str | Iterable[str] | None) -> WebhookPolicy:
        if entries is None:
            return cls()
        items = entries.replace(",", " ").split() if isinstance(entries, str) else list(entries)
        hosts: list[str] = []
        networks: list[Network] = []
        for raw in items:
            item = raw.strip().lower().rstrip(".")
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            name = item[2:] if item.startswith("*.") else item
            if not name or "/" in name or ":" in name or not all(
                part and all(c.isalnum() or c == "-" for c in part) for part in name.split(".")
            ):
                raise TwinError(
                    f"webhook allow-list: {raw!r} is neither a host name nor an IP network",
                    hint="e.g. --webhook-allow 'hooks.example.com,*.corp.example,10.1.2.0/24'",
                )
            hosts.append(item)
        return cls(tuple(hosts), tuple(networks))

    @classmethod
    def from_env(cls) -> WebhookPolicy:
        return cls.parse(os.environ.get(ENV))

    def name_listed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        for entry in self.hosts:
            if entry.startswith("*."):
                if host.endswith(entry[1:]) and host != entry[2:]:
                    return True
            elif host == entry:
                return True
        return False

    def address_allowed(self, addr: Address, *, name_listed: bool) -> bool:
        if any(addr in net for net in self.networks):
            return True
        return name_listed and is_public(addr)

    async def resolve(self, url: str) -> tuple[str, int, Address]:
        """Check ``url`` and return (host, port, the address to connect to); raises
        :class:`WebhookRefused`."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise WebhookRefused(f"webhook {url!r}: only http and https URLs")
        host = parts.hostname
        if not host:
            raise WebhookRefused(f"webhook {url!r}: no host")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise WebhookRefused(f"webhook {url!r}: {exc}") from None
        listed = self.name_listed(host)
        try:
            addresses = [_address(host)]
        except ValueError:
            if not listed and not self.networks:
                raise WebhookRefused(self._refusal(host)) from None
            try:
                infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
            except OSError as exc:
                raise WebhookRefused(f"webhook host {host!r} does not resolve: {exc}") from None
            addresses = list(dict.fromkeys(_address(str(info[4][0])) for info in infos))
        if not addresses:
            raise WebhookRefused(f"webhook host {host!r} does not resolve")
        refused = [a for a in addresses if not self.address_allowed(a, name_listed=listed)]
        if refused:
            if listed:
                raise WebhookRefused(
                    f"webhook host {host!r} resolves to {refused[0]}, a non-public address",
                    hint=f"list the address or its network too ({ENV} / --webhook-allow)",
                )
            raise WebhookRefused(self._refusal(host))
        return host, port, addresses[0]

    def _refusal(self, host: str) -> str:
        return (
            f"webhook host {host!r} is not allowed (allowed: "
            f"{', '.join([*self.hosts, *map(str, self.networks)]) or 'none configured'}; "
            f"set {ENV} or twin up --webhook-allow)"
        )

    async def send(
        self,
        method: str,
        url: str,
        body: Any,
        headers: Mapping[str, str],
        seconds: float,
        *,
        content: bytes | None = None,
    ) -> int:
        """Check the destination, then send to the checked address; the HTTP status.

        ``content``: send these exact bytes instead of ``body`` as JSON (a signed body)."""
        import httpx

        host, port, addr = await self.resolve(url)
        parts = urlsplit(url)
        literal = f"[{addr}]" if addr.version == 6 else str(addr)
        default = 443 if parts.scheme == "https" else 80
        netloc = literal if port == default else f"{literal}:{port}"
        pinned = urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
        sent = {k: v for k, v in headers.items() if k.lower() != "host"}
        sent["Host"] = host if port == default else f"{host}:{port}"
        extensions = {"sni_hostname": host} if parts.scheme == "https" else None
        async with httpx.AsyncClient(timeout=seconds, follow_redirects=False) as client:
            if content is not None:
                resp = await client.request(
                    method, pinned, content=content, headers=sent, extensions=extensions
                )
            else:
                resp = await client.request(
                    method, pinned, json=body, headers=sent, extensions=extensions
                )
        return resp.status_code


__all__ = ["ENV", "WebhookPolicy", "WebhookRefused", "is_public"]
