"""Camera sources: each built-in resolver turns a Device document into what ffmpeg reads."""

from __future__ import annotations

from typing import Any

import pytest

from twin.errors import BindingError, CommandError
from twin.video.sources import (
    SOURCES,
    StreamSource,
    ptz,
    redact,
    resolve_source,
    with_credentials,
)


class FakeSecrets:
    def __init__(self, values: dict[str, str]) -> None:
        self.values = values

    def get(self, ref: str) -> str | None:
        return self.values.get(ref)


def cam(protocol: str, options: dict[str, Any], name: str = "cam1") -> dict[str, Any]:
    return {"kind": "Device", "metadata": {"name": name},
            "spec": {"type": "camera", "binding": {protocol: options}}}


async def test_rtsp_credentials_from_secret_are_in_url_not_in_display() -> None:
    doc = cam("rtsp", {"url": "rtsp://127.0.0.1:8554/live", "transport": "udp",
                       "username": "admin", "password": {"secret": "cams/pw"}})
    src = await resolve_source(doc, "rtsp", FakeSecrets({"cams/pw": "p@ss:w/rd"}))
    assert src.url == "rtsp://admin:p%40ss%3Aw%2Frd@127.0.0.1:8554/live"
    assert src.options["rtsp_transport"] == "udp"
    assert "p%40ss" not in src.display and src.display == "rtsp://127.0.0.1:8554/live"


async def test_missing_secret_is_a_binding_error_naming_it() -> None:
    doc = cam("rtsp", {"url": "rtsp://127.0.0.1/x", "username": "u",
                       "password": {"secret": "nope"}})
    with pytest.raises(BindingError, match="'nope' is not set"):
        await resolve_source(doc, "rtsp", FakeSecrets({}))


async def test_push_listeners_and_pulls() -> None:
    s = FakeSecrets({"k": "0123456789"})
    rtmp = await resolve_source(cam("rtmp", {"listen": 19350}), "rtmp", s)
    assert rtmp.listener and rtmp.url == "rtmp://127.0.0.1:19350/live/cam1"
    srt = await resolve_source(cam("srt", {"listen": 9000, "passphrase": {"secret": "k"}}), "srt", s)
    assert srt.listener and srt.url == "srt://127.0.0.1:9000?mode=listener&passphrase=0123456789"
    assert "0123456789" not in srt.display
    hls = await resolve_source(cam("hls", {"url": "http://127.0.0.1/a.m3u8"}), "hls", s)
    assert not hls.listener and hls.url == "http://127.0.0.1/a.m3u8"


async def test_sim_source_has_a_testsrc_pusher_on_loopback() -> None:
    src = await resolve_source(cam("sim", {"video": {"fps": 10, "port": 41234}}), "sim",
                               FakeSecrets({}))
    assert src.pusher[0] == "ffmpeg" and "udp://127.0.0.1:41234?pkt_size=1316" in src.pusher
    assert src.url.startswith("udp://127.0.0.1:41234")


async def test_unknown_source_and_ptz_without_ptz() -> None:
    with pytest.raises(BindingError, match="no video source 'xyz'"):
        await resolve_source(cam("xyz", {}), "xyz", FakeSecrets({}))
    with pytest.raises(CommandError, match="camera has no PTZ"):
        await ptz(cam("rtsp", {"url": "rtsp://x"}), "rtsp", "stop", {})


async def test_a_plugged_in_resolver_with_ptz_gets_the_command() -> None:
    calls = []

    class Moving:
        async def resolve(self, device: Any, secrets: Any) -> StreamSource:
            return StreamSource("rtsp://127.0.0.1/p")

        async def ptz(self, device: Any, action: str, args: Any) -> dict[str, Any]:
            calls.append((action, dict(args)))
            return {"ok": True}

    SOURCES["moving_test"] = Moving()
    try:
        assert await ptz(cam("moving_test", {}), "moving_test", "move", {"pan": 0.5}) == {"ok": True}
    finally:
        del SOURCES["moving_test"]
    assert calls == [("move", {"pan": 0.5})]


def test_redact_and_credentials() -> None:
    assert redact("rtsp://u:secret@h:554/p") == "rtsp://u:***@h:554/p"
    assert with_credentials("rtsp://a:b@h/p", "x", "y") == "rtsp://a:b@h/p"
