"""``/api/v1/video``: cameras' live streams, snapshots and recordings.

Two kinds of route:

* **with a bearer token** (JWT/API token, judged by :mod:`twin.policy` on the camera's site):
  the camera list and status, ``…/urls`` (short-lived signed links, below), the rolling
  snapshot, the recordings in a time range, exporting a clip;
* **signed links** ``/api/v1/video/s/{token}/{camera}/…``: what a ``<video>``/``<img>`` tag or
  an HLS player fetches, which cannot send an ``Authorization`` header. ``token`` is
  ``<expiry>.<HMAC-SHA256(camera, expiry)>`` under a key derived from the API's secret; it is
  issued only to a principal allowed to read that camera and lapses after ``LINK_TTL`` seconds
  (401 after that). The token sits in the path, so an HLS playlist's relative segment names
  resolve to signed links too.

Everything is served from the camera's pipeline (``twin/video/pipeline.py``): HLS files and
recordings from its folder, the snapshot from memory, HTTP-FLV from its in-process hub (a viewer
that cannot keep up is dropped, never slowing the camera).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import time
from collections.abc import AsyncIterator, Mapping
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import trio
from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, Field

from twin import policy
from twin.api.deps import PREFIX, SIGNED_PREFIX, Operator, State, Viewer, authorize
from twin.api.state import ApiState
from twin.video import recordings
from twin.video.pipeline import CameraPipeline, PipelineError
from twin.video.service import VideoService

router = APIRouter(prefix=PREFIX, tags=["video"])

LINK_TTL = 15 * 60.0
"""Seconds a signed link stays valid (a player asks for fresh links before that)."""
SIGNED_PATHS = (
    f"{PREFIX}/video/s/{{token}}/{{camera}}/hls/{{file}}",
    f"{PREFIX}/video/s/{{token}}/{{camera}}/hls-sub/{{file}}",
    f"{PREFIX}/video/s/{{token}}/{{camera}}/live.flv",
    f"{PREFIX}/video/s/{{token}}/{{camera}}/snapshot.jpg",
    f"{PREFIX}/video/s/{{token}}/{{camera}}/files/{{folder}}/{{file}}",
)
"""The signed routes' templates (public in the OpenAPI document: no bearer token)."""

HLS_FILE = re.compile(r"^(index\.m3u8|[0-9]{1,20}\.ts)$")
SAVED_FILE = re.compile(r"^[0-9A-Za-z._-]{1,80}\.(jpg|ts|mp4)$")
FOLDERS = {"snapshots": "image/jpeg", "rec": "video/mp2t", "clips": "video/mp4"}

Camera = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,63}$")]
Token = Annotated[str, Field(pattern=r"^[0-9]{1,12}\.[0-9a-f]{32}$")]


# -- signing -----------------------------------------------------------------------------
def _key(st: ApiState) -> bytes:
    return hmac.new(st.secret, b"flux-iot video links v1", hashlib.sha256).digest()


def sign(st: ApiState, camera: str, expires: float) -> str:
    exp = int(expires)
    mac = hmac.new(_key(st), f"{camera}\n{exp}".encode(), hashlib.sha256).hexdigest()[:32]
    return f"{exp}.{mac}"


def verify(st: ApiState, camera: str, token: str, now: float | None = None) -> None:
    exp_text, _, mac = token.partition(".")
    try:
        exp = int(exp_text)
    except ValueError:
        raise HTTPException(401, "invalid video link") from None
    good = sign(st, camera, exp).partition(".")[2]
    if not hmac.compare_digest(good, mac):
        raise HTTPException(401, "invalid video link")
    if (time.time() if now is None else now) > exp:
        raise HTTPException(401, "video link expired", headers={"X-Hint": "ask for new links"})


# -- models ------------------------------------------------------------------------------
class CameraStatus(BaseModel):
    camera: str
    site: str | None = None
    state: str = Field(description="starting | live | dark | stopped | not running")
    streaming: bool = False
    recording: bool = False
    source: str | None = None
    fps: float = 0.0
    bitrate_kbps: float = 0.0
    frame_age_s: float | None = None
    restarts: int = 0
    last_error: str | None = None
    viewers: int = 0
    snapshot_at: float | None = None


class CameraList(BaseModel):
    items: list[CameraStatus]


class Links(BaseModel):
    camera: str
    expires: float
    hls: str
    flv: str
    snapshot: str
    substream: str | None = None


class Recording(BaseModel):
    camera: str
    file: str
    start: float
    end: float
    duration: float
    bytes: int
    url: str | None = None


class RecordingList(BaseModel):
    items: list[Recording]


class RecordingRun(BaseModel):
    camera: str
    site: str | None = None
    start: float
    end: float
    duration: float
    segments: int
    bytes: int
    first: str


class RecordingRunList(BaseModel):
    items: list[RecordingRun]


class ClipRequest(BaseModel):
    start: float = Field(allow_inf_nan=False, ge=0, le=1e11, description="unix seconds")
    end: float = Field(allow_inf_nan=False, ge=0, le=1e11, description="unix seconds")
    format: str = Field("mp4", pattern="^(mp4|ts)$")


class Clip(BaseModel):
    camera: str
    file: str
    bytes: int
    url: str
    expires: float


# -- helpers -----------------------------------------------------------------------------
def _video(st: ApiState) -> VideoService:
    video: VideoService = st.engine.video
    return video


def _camera_doc(st: ApiState, camera: str) -> dict[str, Any]:
    doc = st.engine.device_doc(camera)
    if doc is None or (doc.get("spec") or {}).get("type") != "camera":
        raise HTTPException(404, f"no camera {camera!r}")
    return dict(doc)


def _readable(st: ApiState, p: Any, camera: str) -> dict[str, Any]:
    doc = _camera_doc(st, camera)
    authorize(p, policy.READ, doc)
    return doc


def _pipeline(st: ApiState, camera: str) -> CameraPipeline:
    pipeline = _video(st).get(camera)
    if pipeline is None:
        raise HTTPException(404, f"camera {camera!r} has no running stream")
    return pipeline


def _status(camera: str, doc: Mapping[str, Any] | None, pipeline: CameraPipeline | None
            ) -> CameraStatus:
    site = policy.doc_site(doc) if doc is not None else None
    if pipeline is None:
        return CameraStatus(camera=camera, site=site, state="not running")
    return CameraStatus(site=site, **pipeline.status())


def links(st: ApiState, camera: str, pipeline: CameraPipeline | None = None,
          ttl: float = LINK_TTL) -> Links:
    expires = time.time() + ttl
    token = sign(st, camera, expires)
    base = f"{SIGNED_PREFIX}{token}/{camera}"
    sub = (f"{base}/hls-sub/index.m3u8"
           if pipeline is not None and pipeline.opts.substream is not None else None)
    return Links(camera=camera, expires=int(expires), hls=f"{base}/hls/index.m3u8",
                 flv=f"{base}/live.flv", snapshot=f"{base}/snapshot.jpg", substream=sub)


JPEG: dict[int | str, dict[str, Any]] = {200: {"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
              "description": "A JPEG image"}}


# -- with a bearer token -------------------------------------------------------------------
@router.get("/video/cameras")
async def list_cameras(st: State, p: Viewer) -> CameraList:
    video = _video(st)
    out = []
    for key, doc in sorted(st.engine.specs.items()):
        if key[0] != "Device" or (doc.get("spec") or {}).get("type") != "camera":
            continue
        if not policy.allows(p, policy.READ, old=policy.doc_target(doc)):
            continue
        out.append(_status(key[1], doc, video.get(key[1])))
    return CameraList(items=out)


@router.get("/video/cameras/{camera}")
async def camera_status(st: State, p: Viewer, camera: str) -> CameraStatus:
    doc = _readable(st, p, camera)
    return _status(camera, doc, _video(st).get(camera))


@router.get("/video/cameras/{camera}/urls")
async def camera_links(st: State, p: Viewer, camera: str) -> Links:
    """Signed links (valid ``LINK_TTL`` s) for a ``<video>``/``<img>`` tag or an HLS player."""
    _readable(st, p, camera)
    return links(st, camera, _video(st).get(camera))


SNAPSHOT_WAIT = 2.0
"""How long a snapshot request waits for an always-warm session's first keyframe."""


@router.get("/video/cameras/{camera}/snapshot", response_class=Response, responses=JPEG)
async def camera_snapshot(st: State, p: Viewer, camera: str) -> Response:
    """The newest keyframe (kept in memory; 404 until the camera delivered one). A camera whose
    stream is off with ``snapshot.warm: always``: its session's newest keyframe, decoded now."""
    _readable(st, p, camera)
    return await _snapshot_response(_pipeline(st, camera))


async def _snapshot_response(pipeline: CameraPipeline) -> Response:
    if pipeline.always_warm and not pipeline.streaming:
        try:  # ~0.1 s; a session that has no keyframe yet leaves the last picture (or 404)
            await pipeline.session_snapshot(SNAPSHOT_WAIT)
        except PipelineError as exc:
            if pipeline.snapshot is None:
                raise HTTPException(404, f"camera {pipeline.name!r}: {exc}") from exc
    image = pipeline.snapshot
    if image is None:
        raise HTTPException(404, f"camera {pipeline.name!r} has no picture yet")
    headers = {"Cache-Control": "no-store"}
    if pipeline.snapshot_wall is not None:
        headers["X-Frame-Time"] = f"{pipeline.snapshot_wall:.3f}"
    return Response(image, media_type="image/jpeg", headers=headers)


@router.get("/video/cameras/{camera}/recordings")
async def camera_recordings(
    st: State, p: Viewer, camera: str,
    start: Annotated[float | None, Query(allow_inf_nan=False, description="unix seconds")] = None,
    end: Annotated[float | None, Query(allow_inf_nan=False, description="unix seconds")] = None,
) -> RecordingList:
    """Recording segments overlapping ``[start, end]``, oldest first, with signed links."""
    _readable(st, p, camera)
    rec = _video(st).camera_dir(camera) / "rec"
    segs = await trio.to_thread.run_sync(partial(recordings.in_range, rec, start, end))
    token = sign(st, camera, time.time() + LINK_TTL)
    return RecordingList(items=[
        Recording(**s.to_json(camera), url=f"{SIGNED_PREFIX}{token}/{camera}/files/rec/{s.path.name}")
        for s in segs
    ])


@router.get("/video/recordings")
async def all_recordings(
    st: State, p: Viewer,
    start: Annotated[float | None, Query(allow_inf_nan=False, description="unix seconds")] = None,
    end: Annotated[float | None, Query(allow_inf_nan=False, description="unix seconds")] = None,
    camera: Annotated[list[str] | None, Query(description="cameras (default: all)")] = None,
    site: Annotated[list[str] | None, Query(description="sites (default: all)")] = None,
) -> RecordingRunList:
    """Recordings (back-to-back segments merged) overlapping ``[start, end]`` of every camera
    the caller may read, by camera then time (``twin query --recordings``)."""
    video = _video(st)
    found: list[RecordingRun] = []
    for key, doc in sorted(st.engine.specs.items()):
        if key[0] != "Device" or (doc.get("spec") or {}).get("type") != "camera":
            continue
        if camera and key[1] not in camera:
            continue
        cam_site = policy.doc_site(doc)
        if site and cam_site not in site:
            continue
        if not policy.allows(p, policy.READ, old=policy.doc_target(doc)):
            continue
        rec = video.camera_dir(key[1]) / "rec"
        segs = await trio.to_thread.run_sync(partial(recordings.in_range, rec, start, end))
        found += [RecordingRun(**r.to_json(key[1], cam_site)) for r in recordings.runs(segs)]
    return RecordingRunList(items=found)


@router.post("/video/cameras/{camera}/clips")
async def export_clip(st: State, p: Operator, camera: str, body: ClipRequest) -> Clip:
    """Cut ``[start, end]`` out of the recordings (stream copy) into one file."""
    doc = _camera_doc(st, camera)
    authorize(p, policy.OPERATE, doc)
    if body.end <= body.start:
        raise HTTPException(422, "end must be after start")
    if body.end - body.start > 6 * 3600:
        raise HTTPException(422, "a clip is at most 6 hours long")
    cam_dir = _video(st).camera_dir(camera)
    name = (time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(body.start))
            + f"-{int(body.end - body.start)}s.{body.format}")
    out = cam_dir / "clips" / name
    if not recordings.in_range(cam_dir / "rec", body.start, body.end):
        raise HTTPException(404, "no recording in that time range")
    try:
        await trio.to_thread.run_sync(
            partial(recordings.export_clip, cam_dir / "rec", body.start, body.end, out))
    except (RuntimeError, ValueError, OSError) as exc:
        raise HTTPException(409, str(exc)) from exc
    expires = time.time() + LINK_TTL
    token = sign(st, camera, expires)
    return Clip(camera=camera, file=name, bytes=out.stat().st_size, expires=int(expires),
                url=f"{SIGNED_PREFIX}{token}/{camera}/files/clips/{name}")


# -- signed links ------------------------------------------------------------------------
HLS_TYPES: dict[int | str, dict[str, Any]] = {200: {"content": {
    "application/vnd.apple.mpegurl": {"schema": {"type": "string"}},
    "video/mp2t": {"schema": {"type": "string", "format": "binary"}}},
    "description": "An HLS playlist or segment"}}


def _signed(st: ApiState, token: str, camera: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,63}", camera):
        raise HTTPException(404, "no such camera")
    verify(st, camera, token)


@router.get("/video/s/{token}/{camera}/hls/{file}", response_class=Response, responses=HLS_TYPES)
async def signed_hls(st: State, token: str, camera: str, file: str) -> Response:
    return _hls(st, token, camera, "hls", file)


@router.get("/video/s/{token}/{camera}/hls-sub/{file}", response_class=Response,
            responses=HLS_TYPES)
async def signed_hls_sub(st: State, token: str, camera: str, file: str) -> Response:
    """The sub-stream rendition (``substream: {scale, bitrate}``)."""
    return _hls(st, token, camera, "hls-sub", file)


def _hls(st: ApiState, token: str, camera: str, folder: str, file: str) -> Response:
    _signed(st, token, camera)
    if not HLS_FILE.match(file):
        raise HTTPException(404, "no such HLS file")
    path = _video(st).camera_dir(camera) / folder / file
    return _file(path, "application/vnd.apple.mpegurl" if file.endswith(".m3u8")
                 else "video/mp2t", cache="no-cache" if file.endswith(".m3u8") else "max-age=60")


@router.get("/video/s/{token}/{camera}/snapshot.jpg", response_class=Response, responses=JPEG)
async def signed_snapshot(st: State, token: str, camera: str) -> Response:
    _signed(st, token, camera)
    response = await _snapshot_response(_pipeline(st, camera))
    response.headers.update(CORS)
    return response


FILE_TYPES: dict[int | str, dict[str, Any]] = {200: {
    "content": {t: {"schema": {"type": "string", "format": "binary"}}
                for t in sorted(set(FOLDERS.values()))},
    "description": "A saved snapshot, recording segment or clip"}}


@router.get("/video/s/{token}/{camera}/files/{folder}/{file}", response_class=Response,
            responses=FILE_TYPES)
async def signed_file(st: State, token: str, camera: str, folder: str, file: str) -> Response:
    _signed(st, token, camera)
    if folder not in FOLDERS or not SAVED_FILE.match(file):
        raise HTTPException(404, "no such file")
    path = _video(st).camera_dir(camera) / folder / file
    media = "video/mp4" if file.endswith(".mp4") else FOLDERS[folder]
    return _file(path, media, cache="max-age=3600")


CORS = {"Access-Control-Allow-Origin": "*"}
"""Signed links are capabilities (no cookies, no bearer): any page may fetch them (the
dashboard's player runs on another origin than the API)."""


def _file(path: Path, media: str, cache: str) -> Response:
    """The file as it is when opened: a playlist ffmpeg replaces (rename) or a recording it
    is still writing is served consistently (the size taken from the open file)."""
    try:
        f = path.open("rb")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise HTTPException(404, f"no file {path.name!r}") from None
    size = os.fstat(f.fileno()).st_size
    headers = {"Cache-Control": cache, "Content-Length": str(size), **CORS}
    if size <= 256 * 1024:
        with f:
            return Response(f.read(size), media_type=media, headers=headers)

    async def body() -> AsyncIterator[bytes]:
        left = size
        try:
            while left > 0:
                chunk = await trio.to_thread.run_sync(f.read, min(left, 256 * 1024))
                if not chunk:
                    break
                left -= len(chunk)
                yield chunk
        finally:
            f.close()

    return StreamingResponse(body(), media_type=media, headers=headers)


FLV_TYPE: dict[int | str, dict[str, Any]] = {200: {"content": {"video/x-flv": {"schema": {"type": "string", "format": "binary"}}},
                  "description": "A live FLV stream (HTTP-FLV: starts at the current keyframe)"}}


@router.get("/video/s/{token}/{camera}/live.flv", response_class=Response, responses=FLV_TYPE)
async def signed_flv(st: State, token: str, camera: str) -> StreamingResponse:
    _signed(st, token, camera)
    pipeline = _pipeline(st, camera)
    stream = await pipeline.hub.stream(wait=10.0)

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in stream:
                yield chunk
        finally:
            stream.close()

    return StreamingResponse(body(), media_type="video/x-flv",
                             headers={"Cache-Control": "no-store", **CORS})


__all__ = ["LINK_TTL", "SIGNED_PATHS", "SIGNED_PREFIX", "links", "router", "sign", "verify"]
