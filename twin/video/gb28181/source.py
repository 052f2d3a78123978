"""The ``gb28181`` video source: a camera channel of a device registered with our SIP server.

``spec.binding.gb28181: {device_id, channel, transport: udp|tcp, timeout_s}``. Resolving it
needs the running server (:data:`SERVER`, set by the engine service in ``service.py``) and the
device registered and online (else a temporary error: the device task retries with backoff,
the camera shows offline). The camera's ffmpeg then reads the channel's feed
(``tcp://127.0.0.1:PORT``, ``-f mpeg``): connecting INVITEs the channel, the last reader
leaving ends it with a BYE (``server.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twin.errors import BindingConnectError
from twin.video.gb28181.server import Gb28181Server
from twin.video.sources import (
    SecretLookup,
    StreamSource,
    binding_options,
    device_name,
    register_source,
)

SERVER: Gb28181Server | None = None
"""The engine's GB28181 SIP server while it runs."""


def set_server(server: Gb28181Server | None) -> None:
    global SERVER
    SERVER = server


class Gb28181Source:
    async def resolve(self, device: Mapping[str, Any], secrets: SecretLookup) -> StreamSource:
        name = device_name(device)
        o = binding_options(device, "gb28181")
        server = SERVER
        if server is None:
            raise BindingConnectError(f"camera {name!r}: the GB28181 SIP server is not running",
                                      hint="start the engine with `twin up --gb28181 HOST:PORT`")
        device_id = str(o["device_id"])
        channel = str(o.get("channel") or device_id)
        transport = str(o.get("transport", "udp"))
        server._online(device_id)  # not registered / offline: temporary, retried with backoff
        feed = await server.open_feed(device_id, channel, transport)
        timeout_us = str(int(float(o.get("timeout_s", 10)) * 1_000_000))
        # the feed starts at a sequence header: a short probe finds the stream at once
        options = {"f": "mpeg", "rw_timeout": timeout_us, "probesize": "262144",
                   "analyzeduration": "500000"}
        return StreamSource(feed.url, options,
                            display=f"gb28181:{device_id}/{channel} ({transport})")


SOURCE = Gb28181Source()
register_source("gb28181", SOURCE)

__all__ = ["SERVER", "Gb28181Source", "set_server"]
