"""Plugin modules for the tests: Wasm built from WAT text (wasmtime.wat2wasm, no toolchain),
Starlark as text, and Plugin documents with the module embedded as `twin apply` stores it."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import wasmtime

ROOT = Path(__file__).resolve().parents[2]
ACME_WAT = ROOT / "sites" / "demo" / "plugins" / "acme_th.wat"
DERIVE_STAR = ROOT / "sites" / "demo" / "plugins" / "derive.star"


def wat(text: str) -> bytes:
    return bytes(wasmtime.wat2wasm(text))


def acme_wasm() -> bytes:
    return wat(ACME_WAT.read_text())


def write_acme_site(folder: Path, binding: str) -> None:
    """acme.wasm and a site.yaml in ``folder``: the Plugin ``acme`` (a Wasm codec), then the
    sensor th8 whose ``binding:`` is ``binding`` (its lines indented four spaces, the first
    being line 12 of site.yaml; further documents may follow)."""
    (folder / "acme.wasm").write_bytes(acme_wasm())
    (folder / "site.yaml").write_text(
        """\
apiVersion: flux.iot/v1
kind: Plugin
metadata: {name: acme}
spec: {wasm: acme.wasm, role: codec}
---
apiVersion: flux.iot/v1
kind: Device
metadata: {name: th8}
spec:
  type: sensor
  binding:
"""
        + binding
    )


def plugin(name: str, data: bytes, role: str = "codec", *, starlark: bool = False,
           **spec: Any) -> dict[str, Any]:
    field = "starlark" if starlark else "wasm"
    body: dict[str, Any] = {
        field: f"{name}.{'star' if starlark else 'wasm'}",
        "role": role,
        **spec,
        "module": {
            "file": f"{name}.{'star' if starlark else 'wasm'}",
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
            "data": base64.b64encode(data).decode(),
        },
    }
    return {"apiVersion": "flux.iot/v1", "kind": "Plugin", "metadata": {"name": name}, "spec": body}


# -- the ABI's boilerplate: memory, a bump alloc, and one entry point body ------------------------
def codec_wat(body: str, *, memory: int = 1, extra: str = "", entry: str = "decode",
              imports: str = "") -> str:
    """A module exporting memory, alloc and ``entry`` whose body is ``body`` (locals $ptr, $len)."""
    return f"""
(module
  {imports}
  (memory (export "memory") {memory})
  (func (export "alloc") (param $n i32) (result i32) (i32.const 1024))
  {extra}
  (func (export "{entry}") (param $ptr i32) (param $len i32) (result i64)
    {body}))
"""


HOSTILE_WASM: dict[str, str] = {
    # spins forever: fuel runs out
    "infinite_loop": codec_wat("(loop $l (br $l)) (unreachable)"),
    # grows memory until refused (the cap), then keeps asking: contained by the cap and fuel
    "memory_bomb": codec_wat(
        "(loop $l (drop (memory.grow (i32.const 16))) (br $l)) (unreachable)"),
    # reads far outside its memory
    "out_of_bounds": codec_wat("(drop (i32.load (i32.const 0x7ffffff0))) (i64.const 0)"),
    # recursion without end: the wasm stack is exhausted
    "deep_recursion": codec_wat(
        "(call $rec (i32.const 0)) (i64.const 0)",
        extra="(func $rec (param i32) (call $rec (i32.add (local.get 0) (i32.const 1))))"),
    # claims a 4 GB output
    "huge_output": codec_wat("(i64.const 0xfffffff0)"),
    # a well-formed but oversized output (60,000 bytes, the test's cap is 1 KiB)
    "big_output": codec_wat("(i64.const 60000)"),
    # garbage where readings should be
    "garbage_output": codec_wat("(i32.store (i32.const 0) (i32.const 999999)) (i64.const 8)"),
}

WASI_IMPORT = codec_wat(
    "(i64.const 0)",
    imports='(import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))')
NETWORK_IMPORT = codec_wat(
    "(i64.const 0)", imports='(import "env" "socket_connect" (func (param i32 i32) (result i32)))')
FS_IMPORT = codec_wat(
    "(i64.const 0)",
    imports='(import "wasi_snapshot_preview1" "path_open" '
            '(func (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))')

# spins with plenty of fuel: the wall-time limit (epoch deadline) stops it
SLOW_LOOP = HOSTILE_WASM["infinite_loop"]

HOSTILE_STARLARK: dict[str, str] = {
    "star_loop": "def transform(readings, config):\n"
                 "    n = 0\n"
                 "    for i in range(2000000000):\n"
                 "        for j in range(2000000000):\n"
                 "            n += j\n"
                 "    return readings\n",
    "star_alloc": "def transform(readings, config):\n"
                  "    x = [0] * 1000\n"
                  "    for i in range(1000):\n"
                  "        x = x + x\n"
                  "    return readings\n",
    "star_big_string": "def transform(readings, config):\n"
                       "    return [{'point': 'x', 'value': 'a' * (len(readings) << 30)}]\n",
    "star_recursion": "def transform(readings, config):\n"
                      "    return f(0)\n"
                      "def f(n):\n"
                      "    return f(n + 1)\n",
}
