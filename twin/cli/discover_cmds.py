"""``twin discover onvif``: find ONVIF cameras (WS-Discovery) and write their Device YAML.

The probe goes to the multicast group, or unicast to each ``--target host:port``. With
credentials (``--username`` and ``--password-secret NAME``, the secret resolved like any
``{secret: NAME}``) each camera is asked for its device information and media profiles, and
the YAML names the chosen profile; the password itself is never written, only the reference.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import trio
import typer
import yaml

from twin.cli import output as out
from twin.errors import TwinError

discover_app = typer.Typer(help="Find devices on the network and write their Device YAML.",
                           no_args_is_help=True)


def device_name(text: str, taken: set[str]) -> str:
    base = re.sub(r"[^a-z0-9_-]+", "_", text.lower()).strip("_-") or "camera"
    base = base[:48]
    name, n = base, 2
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    taken.add(name)
    return name


async def discover_onvif(targets: list[tuple[str, int]] | None, wait: float,
                         username: str | None, password: str | None,
                         password_secret: str | None, site: str | None,
                         prefix: str) -> tuple[list[dict[str, Any]], list[str]]:
    """``(device documents, warnings)`` for every camera that answers the probe."""
    from twin.video.onvif import OnvifCamera, in_thread
    from twin.video.wsdiscovery import probe

    matches = await probe(targets, wait=wait)
    docs: list[dict[str, Any]] = []
    warnings: list[str] = []
    taken: set[str] = set()
    for m in matches:
        try:
            host, port, path = m.host_port
        except ValueError as exc:
            warnings.append(str(exc))
            continue
        label = m.scope("name") or f"{host}_{port}"
        binding: dict[str, Any] = {"host": host, "port": port}
        if path != "/onvif/device_service":
            binding["path"] = path
        labels: dict[str, str] = {}
        if m.scope("hardware"):
            labels["hardware"] = str(m.scope("hardware"))[:63]
        if username:
            binding["username"] = username
            if password_secret:
                binding["password"] = {"secret": password_secret}
            cam = OnvifCamera(host, port, username, password, timeout=5.0, path=path)
            try:
                info = await in_thread(cam.device_information)
                profiles = await in_thread(cam.profiles)
            except TwinError as exc:
                warnings.append(f"{host}:{port}: {exc}")
            else:
                labels.update({k: v[:63] for k, v in (("manufacturer", info["Manufacturer"]),
                                                       ("model", info["Model"])) if v})
                if profiles:
                    binding["profile"] = profiles[0]["token"]
                    labels["profiles"] = ",".join(p["token"] for p in profiles)[:63]
                    labels["ptz"] = "yes" if profiles[0]["ptz"] else "no"
        metadata: dict[str, Any] = {"name": device_name(prefix + label, taken)}
        if site:
            metadata["site"] = site
        if labels:
            metadata["labels"] = labels
        docs.append({
            "apiVersion": "flux.iot/v1",
            "kind": "Device",
            "metadata": metadata,
            "spec": {"type": "camera", "description": f"ONVIF {m.endpoint}",
                     "binding": {"onvif": binding}},
        })
    return docs, warnings


@discover_app.command("onvif")
def onvif_cmd(
    target: Annotated[list[str] | None, typer.Option(
        "--target", "-t", help="probe HOST:PORT unicast (repeatable); default: multicast")] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for answers")] = 2.0,
    username: Annotated[str | None, typer.Option(help="camera user name")] = None,
    password_secret: Annotated[str | None, typer.Option(
        "--password-secret", help="NAME of the secret holding the password "
        "(TWIN_SECRET_<NAME> or the secrets file)")] = None,
    site: Annotated[str | None, typer.Option(help="metadata.site of the devices")] = None,
    prefix: Annotated[str, typer.Option(help="prefix of the device names")] = "",
    output: Annotated[Path | None, typer.Option(
        "--out", "-o", help="write the YAML here (default: print it)")] = None,
) -> None:
    """Probe for ONVIF cameras (WS-Discovery) and write a Device document for each."""
    from twin.spec.secrets import Secrets
    from twin.video.wsdiscovery import parse_target

    try:
        targets = [parse_target(t) for t in target] if target else None
    except ValueError:
        raise TwinError(f"--target {target}: not HOST:PORT", hint="e.g. --target 10.0.0.7:3702"
                        ) from None
    password = None
    if password_secret:
        password = Secrets().get(password_secret)
        if password is None:
            raise TwinError(f"secret {password_secret!r} is not set",
                            hint="export TWIN_SECRET_<NAME>=... or add it to the secrets file")
    with out.err_console.status("probing for ONVIF cameras ..."):
        docs, warnings = trio.run(discover_onvif, targets, timeout, username, password,
                                  password_secret, site, prefix)
    for w in warnings:
        out.err_console.print(f"warning: {w}", style="yellow")
    if not docs:
        raise TwinError("no ONVIF camera answered",
                        hint="try --target HOST:3702, a longer --timeout, or check that "
                        "multicast reaches the cameras")
    text = yaml.safe_dump_all(docs, sort_keys=False, allow_unicode=True)
    if output is None:
        out.console.print(text, markup=False, highlight=False, end="")
    else:
        output.write_text(text, encoding="utf-8")
        out.err_console.print(f"wrote {len(docs)} camera(s) to {output}")


def register(app: typer.Typer) -> None:
    app.add_typer(discover_app, name="discover")
