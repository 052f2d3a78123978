"""Plugin commands: ``twin plugin test`` and ``twin plugin build``.

``twin plugin test acme-codec --input sample.bin`` runs a plugin on a sample with its declared
limits and prints the output and what it cost (fuel or Starlark steps, microseconds). The
plugin comes from the registry's head revision, or from a site folder with ``--path`` (so a
module can be tried before it is applied).

Inputs by role: a codec decodes each ``--input`` file as one payload (or ``--hex``), or encodes
the JSON command in it with ``--encode``; a transform takes a JSON list of readings
(``[{"point", "value", "ts"}]``); a condition or action takes one JSON document.

``twin plugin build codec.wat`` turns WebAssembly text into a ``.wasm`` next to it (wasmtime's
``wat2wasm``): how the demo's codec is rebuilt without a Wasm toolchain.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from twin.cli.state import load, state
from twin.errors import NotFoundError, TwinError

plugin_app = typer.Typer(help="Sandboxed plugins (Wasm, Starlark): test and build.",
                         no_args_is_help=True)


def _spec_of(name: str, path: Path | None) -> dict[str, Any]:
    if path is not None:
        loaded = load([path])
        doc = loaded.specs.get(("Plugin", name))
        where = str(path)
    else:
        reg = state.registry()
        doc = reg.specs().get(("Plugin", name))
        where = "the registry's head revision"
    if doc is None:
        raise NotFoundError(f"no Plugin {name!r} in {where}",
                            hint="give the site folder with --path, or apply it first")
    return dict(doc)


@plugin_app.command("test")
def test(
    name: Annotated[str, typer.Argument(help="The Plugin's name.")],
    inputs: Annotated[list[Path] | None, typer.Option(
        "--input", "-i", help="A sample file (a payload; JSON for other roles). Repeatable: one batch.")] = None,
    hex_: Annotated[list[str] | None, typer.Option("--hex", help="A payload as hex. Repeatable.")] = None,
    path: Annotated[Path | None, typer.Option(
        "--path", help="Site folder holding the Plugin (default: the registry's head revision).")] = None,
    encode: Annotated[bool, typer.Option("--encode", help="Codec: encode the JSON command(s) instead.")] = False,
    repeat: Annotated[int, typer.Option("--repeat", min=1, help="Run the batch N times (timing).")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Run a plugin on a sample; print its output and cost (fuel / steps, µs)."""
    from twin.cli import output as out
    from twin.plugins.host import PluginHost

    spec = _spec_of(name, path)
    role = str(spec["spec"].get("role"))
    samples = [p.read_bytes() for p in inputs or []] + [bytes.fromhex(h) for h in hex_ or []]
    if not samples:
        raise TwinError("nothing to run the plugin on", hint="give --input FILE or --hex HEX")
    host = PluginHost()
    try:
        errors = host.sync({("Plugin", name): spec})
        if errors:
            raise TwinError(f"plugin {name}: the module does not load: {errors[name]}")
        plugin = host.plugins[name]
        result: Any = None
        t0 = time.perf_counter()
        for _ in range(repeat):
            result = _run(host, name, role, samples, encode)
        wall = (time.perf_counter() - t0) * 1e6 / repeat
        stats = host.stats[name]
        cost = {"kind": plugin.kind, "role": role, "items": len(samples),
                "micros_per_call": round(stats.micros / max(1, stats.calls + sum(stats.failures.values())), 1),
                "micros_wall": round(wall, 1)}
        if plugin.kind == "wasm":
            cost["fuel_per_call"] = stats.fuel // max(1, stats.calls)
        else:
            cost["steps_per_call"] = stats.steps // max(1, stats.calls)
        failed = {k: v for k, v in stats.failures.items()}
        if as_json:
            out.console.print_json(json.dumps({"output": result, "cost": cost, "failures": failed,
                                               "error": stats.last_error or None}, default=_bytes))
        else:
            _print(result, role, encode)
            line = Text(f"cost: {cost['micros_per_call']} µs per call", style="bold")
            if "fuel_per_call" in cost:
                line.append(f", {cost['fuel_per_call']} fuel")
            if "steps_per_call" in cost:
                line.append(f", ~{cost['steps_per_call']} steps")
            line.append(f" ({len(samples)} item{'s' if len(samples) != 1 else ''} per call, {repeat} call"
                        f"{'s' if repeat != 1 else ''})")
            out.console.print(line)
            if failed:
                out.err_console.print(Text(f"failed: {stats.last_error} ({failed})", style="bold red"))
        if failed:
            raise typer.Exit(1)
    finally:
        host.close()


def _bytes(v: Any) -> Any:
    if isinstance(v, bytes | bytearray):
        return v.hex()
    return str(v)


def _run(host: Any, name: str, role: str, samples: list[bytes], encode: bool) -> Any:
    if role == "codec" and not encode:
        return [list(r) for r in host.decode(name, samples)]
    docs = [json.loads(s) for s in samples]
    if role == "codec":
        return host.encode(name, docs)
    if role == "transform":
        rows = [(r["point"], r.get("value"), float(r.get("ts", time.time())))
                for d in docs for r in (d if isinstance(d, list) else [d])]
        out = host.transform(name, rows)
        return None if out is None else [list(r) for r in out]
    return host.call_json(name, role, docs)


def _print(result: Any, role: str, encode: bool) -> None:
    from twin.cli import output as out

    if result is None:
        out.console.print(Text("no output (the call failed)", style="red"))
        return
    if role in ("codec", "transform") and not encode:
        table = Table("input", "point", "value", "ts", "quality")
        for index, point, value, ts, good in result:
            table.add_row(str(index), point, json.dumps(value), f"{ts:g}" if ts else "(receipt)",
                          "good" if good else Text("bad", style="red"))
        out.console.print(table)
        return
    for item in result:
        out.console.print(item.hex(" ") if isinstance(item, bytes) else json.dumps(item))


@plugin_app.command("build")
def build(
    source: Annotated[Path, typer.Argument(help="WebAssembly text (.wat).")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Default: SOURCE with .wasm.")] = None,
) -> None:
    """Compile WebAssembly text to a .wasm module (wasmtime.wat2wasm)."""
    import wasmtime

    from twin.cli import output as out

    target = output or source.with_suffix(".wasm")
    try:
        data = bytes(wasmtime.wat2wasm(source.read_text(encoding="utf-8")))
        wasmtime.Module.validate(wasmtime.Engine(), data)  # text that parses may not validate
    except OSError as exc:
        raise TwinError(f"cannot read {source}: {exc.strerror}") from None
    except wasmtime.WasmtimeError as exc:
        first = str(exc).strip().splitlines()
        raise TwinError(f"{source}: {first[0] if first else 'invalid WebAssembly text'}",
                        hint="\n".join(first[1:4]) or None) from None
    if not target.exists() or target.read_bytes() != data:
        target.write_bytes(data)
    out.console.print(f"{target}: {len(data)} bytes")


def register(app: typer.Typer) -> None:
    app.add_typer(plugin_app, name="plugin")


__all__ = ["register"]
