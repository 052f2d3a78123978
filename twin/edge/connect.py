"""Open the transport to the cloud (twin/edge/transport.py) its URL names: MQTT
(twin/edge/mqtt_link.py) for ``mqtt://``/``mqtts://``, else HTTPS. Above both transports, so
neither imports the other."""

from __future__ import annotations

from typing import Any

from twin.edge.transport import HttpTransport, Transport


def open_transport(url: str, edge: str, key: str, *, verify: Any = True,
                   backoff: tuple[float, float] = (0.5, 30.0)) -> Transport:  # fmt: skip
    """The transport for the cloud ``url``: ``mqtt://``/``mqtts://`` → MQTT, else HTTP(S).
    ``verify``: True (system CAs), False, or a CA bundle path."""
    if url.startswith(("mqtt://", "mqtts://")):
        # imported for an MQTT cloud only: paho and the MQTT hub are ~40 modules an HTTPS
        # edge does not need at start-up (mqtt_link imports transport.py, never this module)
        from twin.edge.mqtt_link import MqttTransport

        return MqttTransport(url, edge, key, verify=verify, backoff=backoff)
    return HttpTransport(url, edge, key, verify=verify)
