"""A simulated OPC UA server (asyncua): a PLC-like peer for the demo and the tests.

It is *outside* the engine's data path: the engine's ``opcua`` binding connects to it over TCP
like to any real server. Run it on its own (tests start it in another process)::

    python -m twin.sim.opcua_server --port 4841 [--user operator:secret] [--secure CERT_DIR]

``twin up`` starts it that way, as a child process, for ``SITE/simulators/opcua.yaml`` (its
start-up builds the standard address space for seconds of CPU: not on the engine's asyncio
loop, which the Modbus, OPC UA and CoAP bindings share).

Address space (namespace ``urn:flux-iot:sim``, every NodeId a string ``ns=2;s=<Object>.<Var>``)::

    Objects/2:<object>                       default object "Boiler"
        2:Temperature   Double   sine 60..80 °C over 60 s, historized (HistoryRead)
        2:Pressure      Double   random walk 1..3 bar
        2:Counter       Int64    +1 per tick
        2:Setpoint      Double   writable (read/write), starts at 70
        2:Running       Boolean  writable, starts true
        2:Status        String   "ok" / "stopped"
        2:Frame         ByteString  an ACME TH-8 frame (8 bytes: a5 01, int16 BE temperature
                                 in 0.01 degC, uint16 BE humidity 0.01 %, uint16 BE mV), per tick
        2:Junk          ByteString  b"junk" (not a TH-8 frame)
        2:Reset()                          Counter := 0; returns Boolean true
        2:Add(a Int32, b Int32) -> Int32
        2:SetSetpoint(value Double) -> Boolean  (Setpoint := value)
        2:Fail()                           always answers BadInvalidState

``points`` (``{name: {wave: ..., type: Double}}``, the sim binding's generators) replace the
default variables. Security: ``--secure DIR`` also offers Basic256Sha256 Sign and
SignAndEncrypt (DIR/server.der + server-key.pem are made when missing); ``--user NAME:PASS``
requires that login (anonymous is then refused).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import random
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from asyncua import Server, ua
from asyncua.common.methods import uamethod
from asyncua.server.user_managers import UserManager

from twin.sim.generators import make_generator

log = logging.getLogger(__name__)

NAMESPACE = "urn:flux-iot:sim"

VTYPES = {
    "Double": ua.VariantType.Double,
    "Float": ua.VariantType.Float,
    "Int32": ua.VariantType.Int32,
    "Int64": ua.VariantType.Int64,
    "UInt16": ua.VariantType.UInt16,
    "Boolean": ua.VariantType.Boolean,
    "String": ua.VariantType.String,
}


class _Users(UserManager):
    def __init__(self, user: str, password: str) -> None:
        self.user, self.password = user, password

    def get_user(self, iserver: Any, username: Any = None, password: Any = None,
                 certificate: Any = None) -> Any:
        from asyncua.crypto.permission_rules import User, UserRole

        if username == self.user and password == self.password:
            return User(role=UserRole.User)
        if certificate is not None and username is None:
            return None
        return None


async def ensure_certificate(folder: Path, name: str = "server") -> tuple[Path, Path]:
    """A self-signed application certificate (DER) + key (PEM) in ``folder`` (made when missing)."""
    from asyncua.crypto.cert_gen import setup_self_signed_certificate
    from cryptography.x509.oid import ExtendedKeyUsageOID

    folder.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, at start-up
    cert, key = folder / f"{name}.der", folder / f"{name}-key.pem"
    if not cert.exists() or not key.exists():
        usage = (ExtendedKeyUsageOID.SERVER_AUTH if name == "server"
                 else ExtendedKeyUsageOID.CLIENT_AUTH)
        await setup_self_signed_certificate(
            key, cert, f"urn:flux-iot:{name}", "localhost", [usage],
            {"countryName": "DE", "organizationName": "FLUX IoT", "commonName": f"flux-{name}"},
        )
    return cert, key


class SimServer:
    """The simulated server; ``await start()`` then ``await tick()`` periodically (``run``)."""

    def __init__(
        self,
        port: int,
        *,
        host: str = "127.0.0.1",
        obj: str = "Boiler",
        points: Mapping[str, Mapping[str, Any]] | None = None,
        interval: float = 0.5,
        user: str | None = None,
        secure_dir: Path | None = None,
        seed: int = 1,
        endpoint: str | None = None,
    ) -> None:
        self.endpoint = endpoint or f"opc.tcp://{host}:{port}/flux/"
        self.obj_name = obj
        self.interval = interval
        self.user = user
        self.secure_dir = secure_dir
        self.rng = random.Random(seed)
        self.points = dict(points or {})
        self.server = Server(user_manager=_Users(*user.split(":", 1)) if user else None)
        self.vars: dict[str, Any] = {}
        self.gens: dict[str, Any] = {}
        self.counter = 0
        self.pressure = 2.0
        self.started = False

    async def start(self) -> None:
        s = self.server
        await s.init()
        await s.set_application_uri("urn:flux-iot:server")
        s.set_endpoint(self.endpoint)
        s.set_server_name("FLUX IoT simulated PLC")
        policies = [ua.SecurityPolicyType.NoSecurity]
        if self.secure_dir is not None:
            cert, key = await ensure_certificate(self.secure_dir)
            await s.load_certificate(str(cert))
            await s.load_private_key(str(key))
            policies += [
                ua.SecurityPolicyType.Basic256Sha256_Sign,
                ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
            ]
        s.set_security_policy(policies)
        if self.user:
            s.set_identity_tokens([ua.UserNameIdentityToken])
        idx = await s.register_namespace(NAMESPACE)
        obj = await s.nodes.objects.add_object(
            f"ns={idx};s={self.obj_name}", ua.QualifiedName(self.obj_name, idx)
        )
        self.obj = obj

        async def var(name: str, value: Any, vtype: ua.VariantType, writable: bool = False) -> Any:
            node = await obj.add_variable(
                f"ns={idx};s={self.obj_name}.{name}", ua.QualifiedName(name, idx),
                ua.Variant(value, vtype),
            )
            if writable:
                await node.set_writable()
            self.vars[name] = node
            return node

        if self.points:
            for name, opts in self.points.items():
                vtype = VTYPES.get(str(opts.get("type", "Double")), ua.VariantType.Double)
                gen = make_generator({k: v for k, v in opts.items() if k != "type"}, self.rng)
                self.gens[name] = (gen, vtype)
                await var(name, self._cast(gen.value(time.time()), vtype), vtype,
                          bool(opts.get("writable", False)))
        else:
            await var("Temperature", 70.0, ua.VariantType.Double)
            await var("Pressure", 2.0, ua.VariantType.Double)
            await var("Counter", 0, ua.VariantType.Int64)
            await var("Setpoint", 70.0, ua.VariantType.Double, writable=True)
            await var("Running", True, ua.VariantType.Boolean, writable=True)
            await var("Status", "ok", ua.VariantType.String)
            await var("Frame", th8_frame(70.0, 45.0), ua.VariantType.ByteString)
            await var("Junk", b"junk", ua.VariantType.ByteString)
            await self._methods(obj, idx)
        first = next(iter(self.vars.values()))
        await s.historize_node_data_change(first, period=None, count=10_000)  # type: ignore[arg-type]
        await s.start()
        self.started = True
        await self.tick()

    async def _methods(self, obj: Any, idx: int) -> None:
        @uamethod
        async def reset(parent: Any) -> bool:
            self.counter = 0
            await self.vars["Counter"].write_value(ua.Variant(0, ua.VariantType.Int64))
            return True

        @uamethod
        def add(parent: Any, a: int, b: int) -> Any:
            return ua.Variant(int(a) + int(b), ua.VariantType.Int32)

        @uamethod
        async def set_setpoint(parent: Any, value: float) -> bool:
            await self.vars["Setpoint"].write_value(ua.Variant(float(value), ua.VariantType.Double))
            return True

        async def fail(parent: Any) -> Any:
            bad: Any = ua.StatusCodes.BadInvalidState
            return ua.StatusCode(bad)

        def arg(name: str, vtype: ua.VariantType) -> ua.Argument:
            a = ua.Argument()
            a.Name = name
            a.DataType = ua.NodeId(ua.Int32(vtype.value))
            a.ValueRank = -1
            return a

        boolean, int32, double = (ua.VariantType.Boolean, ua.VariantType.Int32,
                                  ua.VariantType.Double)
        n = self.obj_name
        await obj.add_method(f"ns={idx};s={n}.Reset", ua.QualifiedName("Reset", idx), reset, [], [arg("ok", boolean)])
        await obj.add_method(f"ns={idx};s={n}.Add", ua.QualifiedName("Add", idx), add,
                             [arg("a", int32), arg("b", int32)], [arg("sum", int32)])
        await obj.add_method(f"ns={idx};s={n}.SetSetpoint", ua.QualifiedName("SetSetpoint", idx), set_setpoint,
                             [arg("value", double)], [arg("ok", boolean)])
        await obj.add_method(f"ns={idx};s={n}.Fail", ua.QualifiedName("Fail", idx), fail, [], [])

    @staticmethod
    def _cast(value: Any, vtype: ua.VariantType) -> Any:
        if vtype in (ua.VariantType.Double, ua.VariantType.Float):
            return float(value)
        if vtype is ua.VariantType.Boolean:
            return bool(value)
        if vtype is ua.VariantType.String:
            return str(value)
        return int(value)

    async def tick(self) -> None:
        now = time.time()
        if self.gens:
            for name, (gen, vtype) in self.gens.items():
                await self.vars[name].write_value(ua.Variant(self._cast(gen.value(now), vtype), vtype))
            return
        running = await self.vars["Running"].read_value()
        setpoint = await self.vars["Setpoint"].read_value()
        temp = setpoint + 10.0 * math.sin(2 * math.pi * now / 60.0) if running else 20.0
        self.pressure = min(3.0, max(1.0, self.pressure + self.rng.uniform(-0.05, 0.05)))
        self.counter += 1
        await self.vars["Temperature"].write_value(ua.Variant(round(temp, 3), ua.VariantType.Double))
        await self.vars["Pressure"].write_value(
            ua.Variant(round(self.pressure, 3), ua.VariantType.Double))
        await self.vars["Counter"].write_value(ua.Variant(self.counter, ua.VariantType.Int64))
        await self.vars["Status"].write_value(
            ua.Variant("ok" if running else "stopped", ua.VariantType.String))
        await self.vars["Frame"].write_value(
            ua.Variant(th8_frame(temp, 40.0 + self.counter % 20), ua.VariantType.ByteString))

    async def run(self) -> None:
        """Start (when not yet) and tick until cancelled; stops the server at the end."""
        try:
            if not self.started:
                await self.start()
            while True:
                await asyncio.sleep(self.interval)
                await self.tick()
        finally:
            if self.started:
                self.started = False
                await self.server.stop()


def th8_frame(temp: float, humidity: float, millivolts: int = 3000) -> bytes:
    """A vendor blob for codec tests: the ACME TH-8 frame (sites/demo/plugins/acme_th.wat)."""
    t = max(-32768, min(32767, round(temp * 100)))
    return b"\xa5\x01" + struct.pack(">hHH", t, round(humidity * 100), millivolts)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--endpoint", help="the full endpoint URL (default opc.tcp://HOST:PORT/flux/)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--object", default="Boiler")
    p.add_argument("--interval", type=float, default=0.2)
    p.add_argument("--user", help="NAME:PASSWORD required to log in")
    p.add_argument("--secure", type=Path, help="folder of the server certificate (made if missing)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    sim = SimServer(args.port, host=args.host, obj=args.object, interval=args.interval,
                    user=args.user, secure_dir=args.secure, endpoint=args.endpoint)

    async def go() -> None:
        await sim.start()
        print(f"ready {sim.endpoint}", flush=True)
        await sim.run()

    asyncio.run(go())


if __name__ == "__main__":
    main()
