"""The plugin registry: the one place bindings, the engine and scenes reach plugins by name.

A process has one :class:`~twin.plugins.host.PluginHost` (``HOST``); the engine loads the
plugins of each revision into it (``HOST.sync``). Protocol code calls these functions — no
import of the engine or of a particular runtime, so the Modbus/CoAP bindings use them the same
way as MQTT and HTTP::

    from twin.plugins import registry as plugins
    readings = plugins.decode_batch("acme-codec", [frame1, frame2])   # [(index, point, value, ts, good)]
    frame = plugins.encode_command("acme-codec", {"name": "reboot", "params": {}})

None of them raises for what a plugin does: a failed decode gives one bad reading per payload,
a failed encode/transform gives None (the caller marks its readings bad or fails the command).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from twin.plugins.abi import Decoded
from twin.plugins.host import PluginHost

HOST = PluginHost()


def host() -> PluginHost:
    return HOST


def known(name: str) -> bool:
    return name in HOST.plugins


def decode_batch(name: str, payloads: Sequence[bytes]) -> list[Decoded]:
    return HOST.decode(name, payloads)


def decode_batch_or_none(name: str, payloads: Sequence[bytes]) -> list[Decoded] | None:
    """:func:`decode_batch`, None when the plugin call failed (see PluginHost.decode_or_none)."""
    return HOST.decode_or_none(name, payloads)


def encode_command(name: str, command: Mapping[str, Any]) -> bytes | None:
    frames = HOST.encode(name, [command])
    return frames[0] if frames else None


def transform_batch(name: str, readings: Sequence[tuple[str, Any, float]]
                    ) -> list[tuple[int, str, Any, float, bool]] | None:
    return HOST.transform(name, readings)


def condition(name: str, inputs: Sequence[Any]) -> list[bool] | None:
    out = HOST.call_json(name, "condition", inputs)
    return None if out is None else [bool(x) for x in out]


def action(name: str, inputs: Sequence[Any]) -> list[Any] | None:
    return HOST.call_json(name, "action", inputs)
