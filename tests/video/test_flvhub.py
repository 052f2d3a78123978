"""The HTTP-FLV hub: a late viewer starts at the cached keyframe, a slow viewer is dropped
without slowing the others, an ffmpeg restart is spliced with monotonic timestamps."""

from __future__ import annotations

import pytest
import trio

from twin.video.flvhub import TAG_SCRIPT, TAG_VIDEO, FlvError, FlvHub, FlvParser, Tag, flv_header


def video(ts: int, key: bool, seq: bool = False, size: int = 100) -> Tag:
    frame = 0x17 if key else 0x27  # keyframe / inter frame, codec 7 (AVC)
    return Tag(TAG_VIDEO, ts, bytes([frame, 0 if seq else 1, 0, 0, 0]) + b"x" * size)


def stream(tags: list[Tag]) -> bytes:
    return flv_header() + b"".join(t.encode() for t in tags)


def first_run() -> list[Tag]:
    return [Tag(TAG_SCRIPT, 0, b"\x02\x00\x0aonMetaData"), video(0, True, seq=True),
            video(0, True), video(40, False), video(80, False), video(1000, True),
            video(1040, False)]


async def test_late_viewer_starts_at_the_current_gop() -> None:
    hub = FlvHub()
    data = stream(first_run())
    for i in range(0, len(data), 7):  # arbitrary chunking
        hub.feed(data[i:i + 7])
    assert hub.ready
    viewer, receive = hub.join()
    got = FlvParser().feed(receive.receive_nowait())
    assert [t.type for t in got] == [TAG_SCRIPT, TAG_VIDEO, TAG_VIDEO, TAG_VIDEO]
    assert got[1].sequence_header and got[2].keyframe and got[2].ts == 1000
    assert [t.ts for t in got[2:]] == [1000, 1040]
    hub.feed(video(1080, False).encode())
    chunk = receive.receive_nowait()
    parser = FlvParser()
    parser.header = b"x"  # a continuation: no header
    assert [t.ts for t in parser.feed(chunk)] == [1080]
    hub.leave(viewer)


async def test_slow_viewer_is_dropped_the_others_continue() -> None:
    hub = FlvHub(viewer_limit=2000)
    hub.feed(stream(first_run()))
    slow, slow_rx = hub.join()
    fast, fast_rx = hub.join()
    for i in range(50):
        hub.feed(video(1080 + 40 * i, False, size=200).encode())
        chunk = fast_rx.receive_nowait()  # the fast one takes everything
        hub.took(fast, len(chunk))
    assert slow.dropped and slow not in hub.viewers
    assert not fast.dropped and fast in hub.viewers
    assert hub.stats.viewers_dropped == 1
    with pytest.raises(trio.EndOfChannel):  # the slow one's response ends after its backlog
        while True:
            slow_rx.receive_nowait()


async def test_restart_is_spliced_with_monotonic_timestamps() -> None:
    hub = FlvHub()
    hub.feed(stream(first_run()))
    viewer, rx = hub.join()
    rx.receive_nowait()
    hub.restart()  # ffmpeg restarted: a new header, timestamps from 0 again
    hub.feed(stream([video(0, True, seq=True), video(0, True), video(40, False)]))
    parser = FlvParser()
    parser.header = b"x"
    tags = []
    while True:
        try:
            tags += parser.feed(rx.receive_nowait())
        except trio.WouldBlock:
            break
    assert tags[0].sequence_header
    assert all(t.ts > 1040 for t in tags if not t.sequence_header)
    assert [t.ts for t in tags[1:]] == sorted(t.ts for t in tags[1:])
    hub.leave(viewer)


def test_garbage_is_refused() -> None:
    with pytest.raises(FlvError):
        FlvParser().feed(b"RIFF" + b"\0" * 20)
    p = FlvParser()
    with pytest.raises(FlvError):
        p.feed(flv_header() + bytes([0x55]) + b"\xff" * 20)
