"""The video API against a running engine with a simulated camera: signed links a <video> tag
can use (HLS, HTTP-FLV, snapshot), per-site authorization, expired/forged links refused."""

from __future__ import annotations

import time
from pathlib import Path

import trio

from tests.api.conftest import start_api
from tests.runtime.helpers import eventually, site
from twin.video.flvhub import FlvParser

from .helpers import camera_model, sim_camera


async def test_signed_links_serve_hls_flv_and_snapshot(tmp_path: Path) -> None:
    # warm: always matters once the stream is off (at the end)
    docs = [site(), site("plant-b"), camera_model(),
            sim_camera("cam1", snapshot={"warm": "always"})]
    api = None
    try:
        async with trio.open_nursery() as nursery:
            api = await start_api(nursery, tmp_path / "state", docs=docs)
            pipeline = None

            def live() -> bool:
                nonlocal pipeline
                pipeline = api.engine.video.get("cam1") if api else None
                return pipeline is not None and pipeline.hub.ready and pipeline.snapshot is not None

            await eventually(live, within=30)
            async with api.client("viewer") as c:
                r = await c.get("/api/v1/video/cameras")
                assert r.status_code == 200
                [cam] = r.json()["items"]
                assert cam["camera"] == "cam1" and cam["state"] == "live" and cam["site"] == "plant-a"
                r = await c.get("/api/v1/video/cameras/cam1/snapshot")
                assert r.status_code == 200 and r.content[:2] == b"\xff\xd8"
                links = (await c.get("/api/v1/video/cameras/cam1/urls")).json()
                # recordings of every readable camera by time range (twin query --recordings)
                assert pipeline is not None
                pipeline.set_recording(True)  # the segment being written is kept at once
                r = await c.get("/api/v1/video/recordings", params={"start": 0})
                assert r.status_code == 200
                [run] = r.json()["items"]
                assert run["camera"] == "cam1" and run["site"] == "plant-a"
                assert run["segments"] >= 1 and run["first"].endswith(".ts")
                r = await c.get("/api/v1/video/recordings",
                                params={"start": 0, "camera": "other"})
                assert r.json()["items"] == []
            async with api.client("oper_b") as c:  # another site's operator sees nothing
                assert (await c.get("/api/v1/video/cameras")).json()["items"] == []
                assert (await c.get("/api/v1/video/recordings")).json()["items"] == []
                assert (await c.get("/api/v1/video/cameras/cam1/urls")).status_code == 403
            async with api.client(None) as c:  # a <video> tag: no Authorization header
                await eventually(lambda: (api.engine.video.camera_dir("cam1") / "hls" /
                                          "index.m3u8").exists(), within=20)
                r = await c.get(links["hls"])
                assert r.status_code == 200, r.text
                assert r.headers["content-type"].startswith("application/vnd.apple.mpegurl")
                segment = next(ln for ln in r.text.splitlines() if ln.endswith(".ts"))
                r = await c.get(links["hls"].rsplit("/", 1)[0] + "/" + segment)
                assert r.status_code == 200 and r.content[:1] == b"\x47"  # MPEG-TS sync byte
                r = await c.get(links["snapshot"])
                assert r.status_code == 200 and r.content[:2] == b"\xff\xd8"
                # HTTP-FLV: header, then the cached keyframe at once
                async with c.stream("GET", links["flv"]) as resp:
                    assert resp.status_code == 200
                    parser = FlvParser()
                    tags = []
                    async for chunk in resp.aiter_bytes():
                        tags += parser.feed(chunk)
                        if len(tags) >= 3:
                            break
                    assert parser.header is not None
                    assert any(t.keyframe for t in tags)
                # forged, for another camera, and unauthenticated JSON routes
                forged = links["hls"].replace("/cam1/", "/cam2/")
                assert (await c.get(forged)).status_code == 401
                token = links["hls"].split("/s/")[1].split("/")[0]
                exp, mac = token.split(".")
                stale = links["hls"].replace(token, f"{int(exp) - 10_000}.{mac}")
                assert (await c.get(stale)).status_code == 401
                assert (await c.get("/api/v1/video/cameras")).status_code == 401
                # the stream off, warm: always: a copy-only session; the snapshot route
                # decodes its newest keyframe (a picture taken after the stream stopped)
                assert pipeline is not None
                pipeline.set_streaming(False)
                stopped = time.time()
                keyframe = api.engine.video.camera_dir("cam1") / "snapshots" / "keyframe.bin"
                await eventually(lambda: pipeline is not None and pipeline._mode == "snapshot"
                                 and keyframe.exists(), within=30)
                r = await c.get(links["snapshot"])
                assert r.status_code == 200 and r.content[:2] == b"\xff\xd8"
                assert float(r.headers["X-Frame-Time"]) >= stopped
                assert "mjpeg" not in pipeline.argv  # nothing decoded but on request
            nursery.cancel_scope.cancel()
    finally:
        if api is not None:
            api.registry.close()


def test_links_expire_and_are_bound_to_their_camera() -> None:
    import pytest
    from fastapi import HTTPException

    from twin.api.routes.video import sign, verify

    class St:
        secret = b"k" * 32

    st = St()
    token = sign(st, "cam1", 1000.0)  # type: ignore[arg-type]
    verify(st, "cam1", token, now=999.0)  # type: ignore[arg-type]
    with pytest.raises(HTTPException, match="expired"):
        verify(st, "cam1", token, now=1001.0)  # type: ignore[arg-type]
    with pytest.raises(HTTPException, match="invalid"):
        verify(st, "cam2", token, now=999.0)  # type: ignore[arg-type]
