"""On-demand snapshots (``take_snapshot``): the fastest honest source of a camera's picture.

In order:

1. the stream runs and is live: the rolling keyframe JPEG in memory (microseconds);
2. the camera has a snapshot URL (ONVIF ``GetSnapshotUri``, or ``snapshot_url`` in the binding):
   its own JPEG over HTTP, Digest (or Basic) auth from the URL's credentials;
3. the stream is off and ``snapshot.warm`` is not 0: the camera's **warm snapshot session**
   (:meth:`CameraPipeline.session_snapshot`). With ``warm: always`` (the default) it runs
   whenever the stream is off, copy only (no decoding: each keyframe is written to a file as the
   camera sent it), and a request decodes the newest keyframe (~0.1 s, whatever the GOP). With
   a duration it is an ffmpeg that decodes only keyframes, started by the first request and
   kept that long after the last one: the first request pays ffmpeg start + RTSP setup + the
   wait for the next keyframe (on average half a GOP, up to a whole one: 0.5-0.6 s median with
   a 1 s GOP, ~2 s with a 4 s GOP); the next ones get the newest keyframe at once;
4. otherwise (the stream should run but is dark or starting, or ``warm: 0``): a one-shot ffmpeg
   (:func:`grab_frame`) that decodes the first keyframe and exits.

A snapshot is never older than one GOP of a running session, and never a non-keyframe (a
decoder without its reference frames paints garbage).
"""

from __future__ import annotations

import logging
import ssl
import time
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx
import trio

from twin.video.pipeline import CameraPipeline, grab_frame

log = logging.getLogger(__name__)

_tls: ssl.SSLContext | None = None
"""One TLS context for every snapshot fetch (building one costs 60-300 ms)."""
_auth: dict[tuple[str, str, str], httpx.DigestAuth] = {}
"""Digest auth per camera and credentials: the last challenge is reused, so a snapshot after
the first is one request, not two."""


@dataclass(frozen=True)
class Snapshot:
    image: bytes
    ts: float  # when the picture was taken (unix seconds)
    source: str  # rolling | camera | session | source


async def fetch_jpeg(url: str, wait: float) -> bytes | None:
    """A JPEG from the camera's snapshot URL (ONVIF ``GetSnapshotUri``); credentials in the URL
    answer a Digest challenge (what ONVIF cameras ask). None when no JPEG comes back."""
    global _tls
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    auth: httpx.Auth | None = None
    if parts.username:
        key = (netloc, unquote(parts.username), unquote(parts.password or ""))
        auth = _auth.get(key)
        if auth is None:
            auth = _auth[key] = httpx.DigestAuth(key[1], key[2])
        url = urlunsplit(parts._replace(netloc=netloc))
    if _tls is None:  # 60-300 ms a client when each builds its own
        _tls = await trio.to_thread.run_sync(ssl.create_default_context)
    try:
        async with httpx.AsyncClient(timeout=wait, auth=auth, verify=_tls) as client:
            resp = await client.get(url)
    except httpx.HTTPError as exc:
        log.warning("snapshot URL on %s failed: %s", host, exc)
        return None
    if resp.status_code != 200 or not resp.content.startswith(b"\xff\xd8"):
        log.warning("snapshot URL on %s answered %s", host, resp.status_code)
        return None
    return resp.content


async def take(p: CameraPipeline, wait: float = 5.0) -> Snapshot:
    """A picture from camera ``p`` (see the module docstring); raises PipelineError."""
    if p.streaming and p.health.state == "live":
        image = await p.wait_snapshot(wait)
        if image is not None:
            return Snapshot(image, p.snapshot_wall or time.time(), "rolling")
    if p.source.snapshot_url:
        image = await fetch_jpeg(p.source.snapshot_url, wait)
        if image is not None:
            return Snapshot(image, time.time(), "camera")
    if not p.streaming and p.opts.snapshot_warm > 0:
        image = await p.session_snapshot(wait)
        return Snapshot(image, p.snapshot_wall or time.time(), "session")
    image = await grab_frame(p.source, wait)
    return Snapshot(image, time.time(), "source")


__all__ = ["Snapshot", "fetch_jpeg", "take"]
