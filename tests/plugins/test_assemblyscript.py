"""The SDK's AssemblyScript codec (sdk/assemblyscript/assembly/acme_th8.ts): compiled here with
the AssemblyScript compiler from npm (sdk/assemblyscript/build.sh), accepted by `twin validate`'s
module checks (no imports, the ABI's exports) and run through the plugin host on real frames —
the same readings as the demo's WAT codec, frame for frame."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.plugins.modules import acme_wasm, plugin
from twin.plugins.host import PluginHost
from twin.sim.mqtt_device import binary_frame
from twin.spec.plugins import check_module

SDK = Path(__file__).resolve().parents[2] / "sdk" / "assemblyscript"
ASC = SDK / "node_modules" / ".bin" / "asc"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not ASC.exists(),
    reason="AssemblyScript is not installed (needs Node.js; then: cd sdk/assemblyscript && npm ci)",
)

FRAME = {"prefix": "a501", "fields": [{"point": "temperature", "type": "h", "scale": 100},
                                      {"point": "humidity", "type": "H", "scale": 100},
                                      {"point": "battery", "type": "H", "scale": 1000}]}


@pytest.fixture(scope="module")
def module() -> bytes:
    out = subprocess.run([str(SDK / "build.sh")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return (SDK / "build" / "acme_th8.wasm").read_bytes()


@pytest.fixture(scope="module")
def host(module: bytes) -> Iterator[PluginHost]:
    h = PluginHost()
    assert h.sync({("Plugin", "as"): plugin("as", module),
                   ("Plugin", "wat"): plugin("wat", acme_wasm())}) == {}
    yield h
    h.close()


def test_the_compiled_module_passes_the_plugin_checks(module: bytes) -> None:
    assert check_module("wasm", module, {"role": "codec"}) is None  # no imports, ABI exports


def test_it_decodes_real_frames(host: PluginHost) -> None:
    frames = [binary_frame(FRAME, {"temperature": 21.5, "humidity": 45.12, "battery": 3.011}),
              b"junk", binary_frame(FRAME, {"temperature": -5.25, "humidity": 99.99, "battery": 2.9}),
              b""]
    assert host.decode("as", frames) == [
        (0, "temperature", 21.5, 0.0, True), (0, "humidity", 45.12, 0.0, True),
        (0, "battery", 3.011, 0.0, True),
        (1, "payload", None, 0.0, False),
        (2, "temperature", -5.25, 0.0, True), (2, "humidity", 99.99, 0.0, True),
        (2, "battery", 2.9, 0.0, True),
        (3, "payload", None, 0.0, False),
    ]
    stats = host.stats["as"]
    assert stats.calls == 1 and stats.fuel > 0 and not stats.failures


@settings(max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(
    st.tuples(st.integers(-32768, 32767), st.integers(0, 65535), st.integers(0, 65535)),
    st.binary(max_size=12)), min_size=1, max_size=1000))
def test_same_readings_as_the_wat_codec(host: PluginHost, items: list[object]) -> None:
    frames = [binary_frame(FRAME, {"temperature": x[0] / 100, "humidity": x[1] / 100,
                                   "battery": x[2] / 1000}) if isinstance(x, tuple) else bytes(x)
              for x in items]
    assert host.decode("as", frames) == host.decode("wat", frames)
