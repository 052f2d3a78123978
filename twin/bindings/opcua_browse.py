"""Browse an OPC UA server into Device and DeviceModel documents (``twin discover opcua``).

Every object under ``Objects`` (the server's own ``Server`` object aside) becomes one Device
with an ``opcua`` binding and one DeviceModel: its variables (down to ``depth`` levels of
sub-objects and folders) are points by NodeId, read-only ones telemetry, writable ones
``readwrite`` properties; its methods are commands whose parameters come from the method's
InputArguments. The browse runs on the asyncio bridge through the binding's own connection
code (security, login), and is bounded (``max_nodes``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from twin.bindings.opcua import OpcUaBinding

_NUMBER = {"Float", "Double"}
_INTEGER = {"SByte", "Byte", "Int16", "UInt16", "Int32", "UInt32", "Int64", "UInt64"}


@dataclass
class Var:
    path: list[str]  # browse names from the object down
    node: str
    vtype: str  # VariantType name
    writable: bool
    historized: bool


@dataclass
class Method:
    name: str
    node: str
    inputs: list[tuple[str, str]]  # (argument name, VariantType name or "")


@dataclass
class Obj:
    name: str
    node: str
    browse_name: str
    vars: list[Var] = field(default_factory=list)
    methods: list[Method] = field(default_factory=list)


def snake(text: str) -> str:
    s = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", text)
    s = re.sub(r"[^A-Za-z0-9]+", "_", s).strip("_").lower()
    return s or "x"


async def _a_browse(b: OpcUaBinding, depth: int, max_nodes: int) -> list[Obj]:
    from asyncua import ua

    client = b._client
    seen = 0
    out: list[Obj] = []
    for child in await client.nodes.objects.get_children():
        bname = await child.read_browse_name()
        if bname.NamespaceIndex == 0:  # Server, Aliases, ...: the standard's own objects
            continue
        obj = Obj(snake(bname.Name), child.nodeid.to_string(), bname.to_string())
        stack: list[tuple[Any, list[str], int]] = [(child, [], 0)]
        while stack and seen < max_nodes:
            node, path, level = stack.pop()
            for sub in await node.get_children():
                seen += 1
                if seen > max_nodes:
                    break
                cls = await sub.read_node_class()
                sub_name = (await sub.read_browse_name()).Name
                if cls == ua.NodeClass.Variable:
                    if sub_name in ("InputArguments", "OutputArguments"):
                        continue
                    try:
                        vtype = (await sub.read_data_type_as_variant_type()).name
                    except Exception:  # a structure or an abstract type: still a point
                        vtype = ""
                    access = await sub.get_access_level()
                    obj.vars.append(
                        Var(
                            [*path, sub_name],
                            sub.nodeid.to_string(),
                            vtype,
                            ua.AccessLevel.CurrentWrite in access,
                            ua.AccessLevel.HistoryRead in access,
                        )
                    )
                elif cls == ua.NodeClass.Method:
                    inputs: list[tuple[str, str]] = []
                    for prop in await sub.get_properties():
                        if (await prop.read_browse_name()).Name == "InputArguments":
                            for a in await prop.read_value() or []:
                                t = a.DataType
                                name = ""
                                if t.NamespaceIndex == 0:
                                    try:
                                        name = ua.VariantType(int(t.Identifier)).name
                                    except ValueError:
                                        name = ""
                                inputs.append((a.Name, name))
                    obj.methods.append(Method(sub_name, sub.nodeid.to_string(), inputs))
                elif cls == ua.NodeClass.Object and level + 1 < depth:
                    stack.append((sub, [*path, sub_name], level + 1))
        obj.vars.sort(key=lambda v: v.path)
        out.append(obj)
    return out


def _json_type(vtype: str) -> dict[str, Any]:
    if vtype in _NUMBER:
        return {"type": "number"}
    if vtype in _INTEGER:
        return {"type": "integer"}
    if vtype == "Boolean":
        return {"type": "boolean"}
    return {"type": "string"}


def documents(
    objects: list[Obj],
    endpoint: str,
    *,
    site: str | None = None,
    prefix: str = "",
    binding_extra: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Device + DeviceModel documents for browsed objects."""
    docs: list[dict[str, Any]] = []
    taken: set[str] = set()
    for obj in objects:
        if not obj.vars and not obj.methods:
            continue
        name = prefix + obj.name
        n = 2
        while name in taken:
            name, n = f"{prefix}{obj.name}_{n}", n + 1
        taken.add(name)
        points: dict[str, Any] = {}
        telemetry: dict[str, Any] = {}
        properties: dict[str, Any] = {}
        used: set[str] = set()
        for v in obj.vars:
            point = snake("_".join(v.path))
            while point in used:
                point += "_"
            used.add(point)
            points[point] = {"node": v.node}
            decl = _json_type(v.vtype)
            if v.writable:
                properties[point] = {**decl, "access": "readwrite"}
            elif decl["type"] != "string" or v.vtype == "String":
                telemetry[point] = decl
            else:
                telemetry[point] = {"type": "string"}
        methods: dict[str, Any] = {}
        commands: dict[str, Any] = {}
        for m in obj.methods:
            cmd = snake(m.name)
            methods[cmd] = {"object": obj.node, "method": m.node}
            cdecl: dict[str, Any] = {}
            if m.inputs:
                cdecl["params"] = {
                    "type": "object",
                    "required": [a for a, _ in m.inputs],
                    "properties": {a: _json_type(t) for a, t in m.inputs},
                }
            commands[cmd] = cdecl
        binding: dict[str, Any] = {"endpoint": endpoint, **(binding_extra or {})}
        binding["points"] = points
        if methods:
            binding["methods"] = methods
        model_name = f"{name.replace('_', '-')}-opcua"
        model_spec: dict[str, Any] = {
            "description": f"OPC UA object {obj.browse_name} at {endpoint} (twin discover)",
        }
        if telemetry:
            model_spec["telemetry"] = telemetry
        if properties:
            model_spec["properties"] = properties
        if commands:
            model_spec["commands"] = commands
        docs.append(
            {
                "apiVersion": "flux.iot/v1",
                "kind": "DeviceModel",
                "metadata": {"name": model_name},
                "spec": model_spec,
            }
        )
        meta: dict[str, Any] = {"name": name}
        if site:
            meta["site"] = site
        docs.append(
            {
                "apiVersion": "flux.iot/v1",
                "kind": "Device",
                "metadata": meta,
                "spec": {
                    "type": "industrial",
                    "model": model_name,
                    "description": f"OPC UA {obj.browse_name} ({obj.node})",
                    "binding": {"opcua": binding},
                },
            }
        )
    return docs


async def discover(
    endpoint: str,
    options: Mapping[str, Any] | None = None,
    *,
    depth: int = 4,
    max_nodes: int = 5000,
) -> list[Obj]:
    """Connect (with the binding's options: security, login) and browse."""
    b = OpcUaBinding("discover", {"endpoint": endpoint, "timeout": "10s", **(options or {})})
    await b.connect()
    try:

        async def go() -> list[Obj]:
            return await _a_browse(b, depth, max_nodes)

        return list(await b._run(go, what="browse"))
    finally:
        await b.close()


def normalize_endpoint(text: str) -> str:
    """``opcua://host:port[/path]`` or ``opc.tcp://...`` -> ``opc.tcp://host:port/path``."""
    if text.startswith("opcua://"):
        text = "opc.tcp://" + text[len("opcua://") :]
    if not text.startswith("opc.tcp://"):
        raise ValueError(text)
    rest = text[len("opc.tcp://") :]
    if "/" not in rest:
        text += "/"
    return text
