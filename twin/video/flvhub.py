"""The in-process HTTP-FLV hub: one camera's FLV stream (from its ffmpeg) fanned out to viewers.

ffmpeg writes FLV to a pipe; :meth:`FlvHub.feed` parses it into tags and keeps what a viewer
joining now needs to start decoding at once:

* the FLV file header,
* the script tag (``onMetaData``) and the codec sequence headers (AVC/HEVC decoder config,
  AAC AudioSpecificConfig),
* the current GOP: every tag since the last video keyframe.

A new viewer gets those first (so its first picture is the GOP's keyframe, no waiting for the
next one), then every tag as it comes. Each viewer has a bounded queue (in bytes); a viewer that
falls behind by more than that is dropped (its response ends) — it never slows the camera or the
other viewers. ffmpeg restarts (a new FLV header) are spliced: viewers keep their connection and
get the new sequence headers; timestamps are rebased to stay monotonic.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass, field

import trio

FLV_HEADER_LEN = 9
TAG_HEADER_LEN = 11
TAG_AUDIO, TAG_VIDEO, TAG_SCRIPT = 8, 9, 18
MAX_TAG = 16 * 1024 * 1024
MAX_GOP_TAGS = 4000  # ~2.5 min at 25 fps: longer GOPs are not cached (viewers wait)


class FlvError(ValueError):
    """The byte stream is not FLV."""


@dataclass
class Tag:
    type: int
    ts: int  # milliseconds
    data: bytes

    @property
    def keyframe(self) -> bool:
        return self.type == TAG_VIDEO and bool(self.data) and (self.data[0] >> 4) == 1

    @property
    def sequence_header(self) -> bool:
        if self.type == TAG_VIDEO:
            return len(self.data) > 1 and (self.data[0] & 0x0F) in (7, 12) and self.data[1] == 0
        if self.type == TAG_AUDIO:
            return len(self.data) > 1 and (self.data[0] >> 4) == 10 and self.data[1] == 0
        return False

    def encode(self, ts: int | None = None) -> bytes:
        t = self.ts if ts is None else ts
        t &= 0xFFFFFFFF
        size = len(self.data)
        head = struct.pack(">B", self.type) + size.to_bytes(3, "big") + (t & 0xFFFFFF).to_bytes(3, "big")
        head += bytes([t >> 24]) + b"\x00\x00\x00"
        return head + self.data + struct.pack(">I", TAG_HEADER_LEN + size)


def flv_header(video: bool = True, audio: bool = False) -> bytes:
    flags = (4 if audio else 0) | (1 if video else 0)
    return b"FLV\x01" + bytes([flags]) + struct.pack(">I", 9) + b"\x00\x00\x00\x00"


class FlvParser:
    """Incremental FLV parser: bytes in, :class:`Tag` s out."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.header: bytes | None = None

    def feed(self, data: bytes) -> list[Tag]:
        self.buf += data
        out: list[Tag] = []
        buf = self.buf
        pos = 0
        if self.header is None:
            if len(buf) < FLV_HEADER_LEN + 4:
                return out
            if bytes(buf[:3]) != b"FLV":
                raise FlvError("not an FLV stream (no 'FLV' signature)")
            offset = struct.unpack(">I", buf[5:9])[0]
            if offset < 9 or offset > 1024:
                raise FlvError(f"bad FLV header size {offset}")
            if len(buf) < offset + 4:
                return out
            self.header = bytes(buf[:offset]) + b"\x00\x00\x00\x00"
            pos = offset + 4
        while len(buf) - pos >= TAG_HEADER_LEN:
            ttype = buf[pos] & 0x1F
            size = int.from_bytes(buf[pos + 1:pos + 4], "big")
            if size > MAX_TAG or ttype not in (TAG_AUDIO, TAG_VIDEO, TAG_SCRIPT):
                raise FlvError(f"bad FLV tag (type {ttype}, size {size})")
            end = pos + TAG_HEADER_LEN + size + 4
            if len(buf) < end:
                break
            ts = int.from_bytes(buf[pos + 4:pos + 7], "big") | (buf[pos + 7] << 24)
            out.append(Tag(ttype, ts, bytes(buf[pos + TAG_HEADER_LEN:end - 4])))
            pos = end
        del buf[:pos]
        return out


@dataclass(eq=False)
class Viewer:
    send: trio.MemorySendChannel[bytes]
    limit: int
    queued: int = 0  # bytes handed over and not yet taken by the response
    dropped: bool = False


@dataclass
class FlvStats:
    tags: int = 0
    bytes: int = 0
    keyframes: int = 0
    viewers_dropped: int = 0
    last_tag_at: float | None = None  # trio.current_time() of the last tag
    last_keyframe_at: float | None = None


class FlvHub:
    """One camera's FLV fan-out (see the module docstring)."""

    def __init__(self, viewer_limit: int = 4 * 1024 * 1024) -> None:
        self.viewer_limit = viewer_limit
        self.parser = FlvParser()
        self.header: bytes | None = None
        self.script: Tag | None = None
        self.seq: dict[int, Tag] = {}  # tag type -> its sequence header
        self.gop: list[Tag] = []
        self.viewers: set[Viewer] = set()
        self.stats = FlvStats()
        self._base = 0  # timestamp offset of the current ffmpeg run
        self._last_out = 0  # last timestamp handed out
        self._waiters: list[trio.Event] = []

    # -- the producer ----------------------------------------------------------------------
    def restart(self) -> None:
        """A new ffmpeg run starts (a new FLV header follows): keep viewers, reset parsing."""
        self.parser = FlvParser()
        self.gop = []
        self._base = self._last_out + 40

    def feed(self, data: bytes) -> None:
        """Bytes from ffmpeg's FLV output (FlvError if they are not FLV)."""
        first = self.parser.header is None
        tags = self.parser.feed(data)
        if first and self.parser.header is not None and self.header is None:
            self.header = self.parser.header
        now = trio.current_time()
        for tag in tags:
            tag.ts += self._base
            self._last_out = max(self._last_out, tag.ts)
            self.stats.tags += 1
            self.stats.bytes += len(tag.data)
            self.stats.last_tag_at = now
            if tag.type == TAG_SCRIPT:
                self.script = tag
                continue  # a new run's metadata: viewers already have one
            if tag.sequence_header:
                self.seq[tag.type] = tag
                self.gop = [t for t in self.gop if t.type != tag.type]
            elif tag.keyframe:
                self.stats.keyframes += 1
                self.stats.last_keyframe_at = now
                self.gop = []
                self._wake()
            if not tag.sequence_header and not self.gop and not tag.keyframe:
                continue  # no keyframe yet in this run: nothing decodable to cache
            if not tag.sequence_header:
                self.gop.append(tag)
                if len(self.gop) > MAX_GOP_TAGS:  # a camera without keyframes: cache nothing
                    self.gop = []
            if self.viewers:  # nobody watching: only the cache is kept
                self._fan_out(tag.encode())

    def _fan_out(self, chunk: bytes) -> None:
        for viewer in list(self.viewers):
            self._offer(viewer, chunk)

    def _offer(self, viewer: Viewer, chunk: bytes) -> None:
        if viewer.dropped:
            return
        if viewer.queued + len(chunk) > viewer.limit:
            self._drop(viewer)
            return
        try:
            viewer.send.send_nowait(chunk)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            self._drop(viewer)
            return
        viewer.queued += len(chunk)

    def _drop(self, viewer: Viewer) -> None:
        viewer.dropped = True
        self.viewers.discard(viewer)
        self.stats.viewers_dropped += 1
        viewer.send.close()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for event in waiters:
            event.set()

    # -- viewers ---------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """A viewer joining now gets a picture at once (a header and a keyframe are cached)."""
        return self.header is not None and bool(self.gop)

    async def wait_ready(self) -> None:
        while not self.ready:
            event = trio.Event()
            self._waiters.append(event)
            await event.wait()

    def join(self) -> tuple[Viewer, trio.MemoryReceiveChannel[bytes]]:
        """A new viewer; its channel starts with the header, sequence headers and GOP."""
        send, receive = trio.open_memory_channel[bytes](4096)
        viewer = Viewer(send, self.viewer_limit)
        self.viewers.add(viewer)
        start = [flv_header(video=True, audio=TAG_AUDIO in self.seq)]
        if self.script is not None:
            start.append(self.script.encode(0))
        first_ts = self.gop[0].ts if self.gop else self._last_out
        for tag in self.seq.values():
            start.append(tag.encode(first_ts))
        start.extend(tag.encode() for tag in self.gop)
        self._offer(viewer, b"".join(start))
        return viewer, receive

    def took(self, viewer: Viewer, n: int) -> None:
        """The response wrote ``n`` bytes of this viewer's queue."""
        viewer.queued = max(0, viewer.queued - n)

    def leave(self, viewer: Viewer) -> None:
        self.viewers.discard(viewer)
        viewer.send.close()

    async def stream(self, *, wait: float = 10.0) -> _ViewerStream:
        """Join (after waiting up to ``wait`` s for a keyframe) as an async byte iterator."""
        with trio.move_on_after(wait):
            await self.wait_ready()
        viewer, receive = self.join()
        return _ViewerStream(self, viewer, receive)


@dataclass
class _ViewerStream:
    hub: FlvHub
    viewer: Viewer
    receive: trio.MemoryReceiveChannel[bytes]
    _pending: deque[bytes] = field(default_factory=deque)

    def __aiter__(self) -> _ViewerStream:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self.receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            self.hub.leave(self.viewer)
            raise StopAsyncIteration from None
        self.hub.took(self.viewer, len(chunk))
        return chunk

    def close(self) -> None:
        self.hub.leave(self.viewer)
        self.receive.close()


__all__ = ["FlvError", "FlvHub", "FlvParser", "Tag", "flv_header"]
