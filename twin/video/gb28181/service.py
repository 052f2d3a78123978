"""The GB28181 SIP server as an engine service (``twin up --gb28181 HOST:PORT``).

Started under the engine's supervisor like every service: a failure restarts it with backoff,
never the engine. While it runs, the ``gb28181`` video source finds it (``source.SERVER``).
A device's online state (REGISTER, keepalives, expiry) becomes an alarm on every camera Device
bound to it: ``gb28181_offline`` raised when it goes offline, cleared when it is back.
Channels learnt from Catalog responses are proposed as Device YAML in
``<state dir>/gb28181/discovered.yaml``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from twin.errors import TwinError
from twin.video.gb28181 import source
from twin.video.gb28181.server import Gb28181Config, Gb28181Server

log = logging.getLogger(__name__)

OFFLINE_ALARM = "gb28181_offline"


def cameras_of(specs: dict[Any, dict[str, Any]], device_id: str) -> list[str]:
    """Names of the camera Devices bound to GB28181 device ``device_id``."""
    out = []
    for (kind, name), doc in specs.items():
        if kind != "Device":
            continue
        binding = ((doc.get("spec") or {}).get("binding") or {}).get("gb28181")
        if isinstance(binding, dict) and str(binding.get("device_id")) == device_id:
            out.append(str(name))
    return out


class Gb28181Service:
    name = "gb28181"

    def __init__(self, config: Gb28181Config, password_secret: str | None = "gb28181") -> None:
        self.config = config
        self.password_secret = password_secret
        self.server: Gb28181Server | None = None

    async def __call__(self, engine: Any, *,
                       task_status: trio.TaskStatus[Gb28181Server] = trio.TASK_STATUS_IGNORED
                       ) -> None:
        config = self.config
        if self.password_secret and config.password is None:
            password = engine.video.secrets.get(self.password_secret)
            if password is None:
                raise TwinError(f"gb28181: secret {self.password_secret!r} (the registration "
                                "password) is not set",
                                hint="export TWIN_SECRET_GB28181=... or add it to the secrets "
                                     "file")
            config = replace(config, password=password)
        if config.discovered_file is None:
            config = replace(config, discovered_file=Path(engine.config.state_dir) / "gb28181"
                             / "discovered.yaml")
        server = Gb28181Server(config)
        server.on_status.append(lambda dev, online, why: self._status(engine, dev, online, why))
        self.server = server
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.run)
                source.set_server(server)
                task_status.started(server)
        finally:
            if source.SERVER is server:
                source.set_server(None)

    def _status(self, engine: Any, device_id: str, online: bool, reason: str) -> None:
        for camera in cameras_of(engine.specs, device_id):
            if online:
                engine.monitor.clear_alarm(camera, OFFLINE_ALARM)
            else:
                engine.monitor.raise_alarm(camera, OFFLINE_ALARM, "major",
                                           f"GB28181 device {device_id} offline ({reason})")


def parse_listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    try:
        return host or "0.0.0.0", int(port)
    except ValueError:
        raise TwinError(f"--gb28181 {value!r}: not HOST:PORT", hint="e.g. --gb28181 0.0.0.0:5060"
                        ) from None


__all__ = ["OFFLINE_ALARM", "Gb28181Service", "cameras_of", "parse_listen"]
