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

from twin.errors import BindingConnectError, CommandError
from twin.video.gb28181 import manscdp
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


    async def ptz(self, device: Mapping[str, Any], action: str,
                  args: Mapping[str, Any]) -> dict[str, Any]:
        """PTZ through MANSCDP DeviceControl (GB/T 28181 A.3): ``move`` {pan, tilt, zoom in
        -1..1: direction and speed}, ``stop``, ``goto_preset`` / ``set_preset`` {preset: 1-255}."""
        o = binding_options(device, "gb28181")
        server = SERVER
        if server is None:
            raise BindingConnectError("the GB28181 SIP server is not running")
        device_id = str(o["device_id"])
        channel = str(o.get("channel") or device_id)
        if action == "move":
            pan, tilt, zoom = (_unit(args, k) for k in ("pan", "tilt", "zoom"))
            bits = ((manscdp.PTZ_RIGHT if pan > 0 else manscdp.PTZ_LEFT if pan < 0 else 0)
                    | (manscdp.PTZ_UP if tilt > 0 else manscdp.PTZ_DOWN if tilt < 0 else 0)
                    | (manscdp.PTZ_ZOOM_IN if zoom > 0 else manscdp.PTZ_ZOOM_OUT if zoom < 0
                       else 0))
            cmd = manscdp.ptz_cmd(bits, round(abs(pan) * 255), round(abs(tilt) * 255),
                                  round(abs(zoom) * 15))
            result: dict[str, Any] = {"action": "move", "pan": pan, "tilt": tilt, "zoom": zoom}
        elif action == "stop":
            cmd, result = manscdp.ptz_cmd(0), {"action": "stop"}
        elif action in ("goto_preset", "set_preset"):
            try:
                preset = int(args.get("preset"))  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise CommandError(f"ptz {action}: needs {{preset: 1-255}} (a number in "
                                   "GB28181)") from None
            if not 1 <= preset <= 255:
                raise CommandError(f"ptz {action}: preset must be 1-255, not {preset}")
            code = manscdp.PTZ_GOTO_PRESET if action == "goto_preset" else \
                manscdp.PTZ_SET_PRESET
            cmd, result = manscdp.ptz_cmd(code, 0, preset), {"action": action, "preset": preset}
        else:
            raise CommandError(f"ptz: unknown action {action!r} for a GB28181 camera",
                               hint="move, stop, goto_preset, set_preset")
        await server.ptz(device_id, channel, cmd)
        result["ptz_cmd"] = cmd
        return result


def _unit(args: Mapping[str, Any], key: str) -> float:
    try:
        v = float(args.get(key, 0.0))
    except (TypeError, ValueError):
        raise CommandError(f"ptz: {key} must be a number in -1..1") from None
    if not -1.0 <= v <= 1.0:
        raise CommandError(f"ptz: {key} must be in -1..1, not {v:g}")
    return v


SOURCE = Gb28181Source()
register_source("gb28181", SOURCE)

__all__ = ["SERVER", "Gb28181Source", "set_server"]
