"""Simulated field devices of a site, run next to the engine (``twin up SITE``).

Most demo devices are ``sim`` bindings inside the engine. A site may also declare devices that
are *outside* it and connect like real hardware, in ``SITE/simulators/*.yaml`` (not specs: the
spec loader skips that folder):

```yaml
mqtt:                          # device name -> what it measures (the sim binding's points)
  air_quality_01:
    interval: 2s
    points:
      co2: {wave: sine, min: 450, max: 1100, period: 10m}
```
Each must be a Device of the site with an ``mqtt`` binding. :class:`SimulatorService` starts
one :class:`twin.sim.mqtt_device.MqttDeviceSim` per device against the embedded broker, which
logs in with the device's name and a device key, as a real device would.

**Keys.** The first time, a device key is created for the device (exactly what ``twin
device-key create DEVICE`` does) and stored in ``STATE_DIR/simulators/DEVICE.key`` (mode 0600);
later runs reuse it. Revoke it (``twin device-key revoke DEVICE ID``) and the broker closes the
simulator's connection within 10 s and refuses it from then on; delete the file to let the next
``twin up`` provision a new key.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio

from twin.files import private_dir
from twin.registry.credentials import create_device_key
from twin.runtime.supervisor import supervise
from twin.spec.yamlload import load_data

log = logging.getLogger(__name__)

SIMULATORS_DIR = "simulators"


def load_simulators(site: Path) -> dict[str, dict[str, Any]]:
    """``{device: options}`` of the MQTT devices declared in ``site/simulators/*.yaml``."""
    return load_section(site, "mqtt", strict=True)


def load_section(site: Path, section: str, *, strict: bool = False) -> dict[str, dict[str, Any]]:
    """``{device: options}`` of ``section`` (``mqtt``, ``coap``, ``opcua``, ``modbus``) in
    ``site/simulators/*.yaml``. A file that is not a mapping is skipped, or with ``strict`` an
    error."""
    out: dict[str, dict[str, Any]] = {}
    folder = site / SIMULATORS_DIR
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("*.y*ml")):
        doc = load_data(path.read_text(encoding="utf-8"), str(path)) or {}
        if not isinstance(doc, dict):
            if strict:
                raise ValueError(f"{path}: expected a mapping with an {section!r} key")
            continue
        for device, opts in (doc.get(section) or {}).items():
            out[str(device)] = dict(opts or {})
    return out


def port_for(host: str, port: int) -> int:
    """``port`` when a TCP listener can bind ``host:port`` now, else a free port on ``host``
    (a site simulator must not assume its declared port is free: another program, or another
    demo engine, may hold it). The caller tells the device's binding the port it got
    (``BindingContext.endpoints``)."""
    import socket

    for candidate in (port, 0):
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            try:
                s.bind((host, candidate))
            except OSError:
                continue
            return int(s.getsockname()[1])
    return port  # cannot bind at all: the simulator's own start reports why


def device_key(registry: Any, device: str, key_dir: Path) -> tuple[str, bool]:
    """The simulated device's key: the stored one, or a new one (stored 0600). Returns
    ``(key, created)``. Runs in a worker thread."""
    path = key_dir / f"{device}.key"
    if path.exists():
        return path.read_text(encoding="utf-8").strip(), False
    private_dir(key_dir)
    _, key = create_device_key(registry, device)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(key + "\n")
    return key, True


async def _key(engine: Any, device: str, key_dir: Path) -> str:
    key, created = await engine.rio.call(device_key, engine.registry, device, key_dir)
    if created:
        log.info("simulators: device key for %s created (%s)", device, key_dir / f"{device}.key")
    return str(key)


def _connect_host(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)


@dataclass(repr=False, eq=False)
class SimulatorService:
    """Engine service: start it after the MQTT service (it needs the broker's address)."""

    site: Path
    key_dir: Path | None = None  # default STATE_DIR/simulators
    protocol: int = 5
    name: str = "simulators"
    sims: dict[str, Any] = field(default_factory=dict)

    async def __call__(
        self, engine: Any, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        from twin.sim.mqtt_device import MqttDeviceSim

        declared = await trio.to_thread.run_sync(load_simulators, self.site)
        info = engine.service_info.get("mqtt") or {}
        addresses = info.get("addresses") or []
        if declared and (info.get("mode") != "embedded" or not addresses):
            log.warning("simulators: %s need the embedded MQTT broker; not started",
                        ", ".join(sorted(declared)))
            declared = {}
        host, _, port = addresses[0].rpartition(":") if addresses else ("", "", "0")
        key_dir = self.key_dir or Path(engine.config.state_dir) / SIMULATORS_DIR
        async with trio.open_nursery() as nursery:
            await self._industrial(engine, nursery, key_dir)
            for device, opts in sorted(declared.items()):
                doc = engine.device_doc(device)
                binding = ((doc or {}).get("spec") or {}).get("binding") or {}
                if "mqtt" not in binding:
                    log.warning("simulators: %s is not a Device with an mqtt binding; skipped",
                                device)
                    continue
                spec = (doc or {}).get("spec") or {}
                model = (engine.specs.get(("DeviceModel", str(spec.get("model", "")))) or {})
                key = await _key(engine, device, key_dir)
                site = str((doc or {}).get("metadata", {}).get("site") or "")
                sim = MqttDeviceSim(
                    device,
                    site,
                    key,
                    _connect_host(host.strip("[]")),
                    int(port),
                    opts,
                    model=model.get("spec") or {},
                    binding=binding["mqtt"] or {},
                    protocol=self.protocol,
                )
                self.sims[device] = sim
                self._start(engine, nursery, device, sim.run)
            task_status.started({"devices": sorted(self.sims), "keys": str(key_dir)})

    async def _industrial(self, engine: Any, nursery: trio.Nursery, key_dir: Path) -> None:
        """The site's simulated OPC UA servers and CoAP devices (``opcua:`` / ``coap:`` in
        ``SITE/simulators/*.yaml``), under the engine's supervisor like the MQTT ones."""
        from urllib.parse import urlsplit, urlunsplit

        from twin.sim.coap_device import CoapDeviceSim

        opcua = await trio.to_thread.run_sync(load_section, self.site, "opcua")
        coap = await trio.to_thread.run_sync(load_section, self.site, "coap")
        for device, opts in sorted(opcua.items()):
            binding = ((engine.device_doc(device) or {}).get("spec") or {}).get("binding") or {}
            if "opcua" not in binding:
                log.warning("simulators: %s is not a Device with an opcua binding; skipped", device)
                continue
            endpoint = str(binding["opcua"]["endpoint"])
            url = urlsplit(endpoint)
            declared = url.port or 4840
            port = await trio.to_thread.run_sync(port_for, url.hostname or "127.0.0.1", declared)
            if port != declared:
                netloc = url.netloc.rsplit(":", 1)[0] if url.port else url.netloc
                endpoint = urlunsplit(url._replace(netloc=f"{netloc}:{port}"))
                engine.runtime.binding_context.endpoints[device] = {"endpoint": endpoint}
                log.warning("simulators: %s: port %d is taken; its OPC UA server is at %s "
                            "instead (the device connects there)", device, declared, endpoint)
            run = partial(_opcua_server, device, endpoint, opts)
            self._start(engine, nursery, device, run)
        info = engine.service_info.get("coap") or {}
        coap_url = next((a for a in info.get("addresses") or [] if a.startswith("coap://")), None)
        if coap and coap_url is None:
            log.warning("simulators: %s need the CoAP server; not started", ", ".join(sorted(coap)))
            return
        for device, opts in sorted(coap.items()):
            doc = engine.device_doc(device) or {}
            spec = doc.get("spec") or {}
            if "coap" not in (spec.get("binding") or {}):
                log.warning("simulators: %s is not a Device with a coap binding; skipped", device)
                continue
            model = engine.specs.get(("DeviceModel", str(spec.get("model", "")))) or {}
            key = await _key(engine, device, key_dir)
            assert coap_url is not None
            chost, _, cport = coap_url.removeprefix("coap://").rpartition(":")
            sim = CoapDeviceSim(device, key, _connect_host(chost.strip("[]")), int(cport), opts,
                                model=model.get("spec") or {})
            self.sims[device] = sim
            self._start(engine, nursery, device, sim.run)

    def _start(self, engine: Any, nursery: trio.Nursery, device: str, run: Any) -> None:
        """Under the engine's supervisor like every other child: logged, counted, alarmed on
        the device, restarted with backoff, quarantined if it keeps failing."""
        site = str(((engine.device_doc(device) or {}).get("metadata") or {}).get("site") or "")
        self.sims.setdefault(device, run)
        nursery.start_soon(
            partial(
                supervise,
                run,
                kind="simulator",
                name=device,
                site=site,
                supervision=engine.supervision,
                restart_on_return=True,
            )
        )


async def _opcua_server(device: str, endpoint: str, opts: dict[str, Any]) -> None:
    """A simulated OPC UA server (twin/sim/opcua_server.py) in a child process at the device's
    endpoint (its start-up costs seconds of CPU: kept off the engine's asyncio loop). The
    caller moved it to a free port if the declared one was taken (``port_for``); a port taken
    after that check (a race) is logged once and left alone. Anything else that ends it is a
    failure (supervisor)."""
    import subprocess
    import sys
    from urllib.parse import urlsplit

    from twin.spec.units import parse_duration

    url = urlsplit(endpoint)
    interval = parse_duration(opts.get("interval", "1s")) or 1.0
    cmd = [sys.executable, "-m", "twin.sim.opcua_server", "--port", str(url.port or 4840),
           "--host", url.hostname or "127.0.0.1", "--endpoint", endpoint,
           "--object", str(opts.get("object", "Boiler")), "--interval", str(interval)]
    proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err = bytearray()

    async def drain() -> None:  # the child's log, last 4 kB kept (a full pipe would block it)
        assert proc.stderr is not None
        while chunk := await proc.stderr.receive_some(65536):
            err.extend(chunk)
            del err[:-4000]

    try:
        assert proc.stdout is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            first = await proc.stdout.receive_some(4096)
            if first.startswith(b"ready"):
                log.info("simulators: OPC UA server of %s at %s (pid %d)", device, endpoint,
                         proc.pid)
            await proc.wait()  # then drain() ends at the pipe's end
        text = bytes(err)
        if b"address already in use" in text or b"Errno 98" in text:
            log.warning("simulators: %s: %s is taken (another engine's simulator?); not started",
                        device, endpoint)
            await trio.sleep_forever()
        tail = text.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"OPC UA simulator of {device} exited ({proc.returncode}): {tail[0]}")
    finally:
        if proc.returncode is None:
            proc.terminate()
            with trio.move_on_after(5) as scope:
                scope.shield = True
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
