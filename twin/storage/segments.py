"""Segment files of an append-only log: the record frame, the scan of a segment, and the
durable small writes around them. Shared by the time-series write-ahead log
(``twin/timeseries/wal.py``) and the edge's outbox (``twin/edge/outbox.py``), which differ in
their payloads, their magic and what they do with a record.

A segment is a magic (the caller's) followed by records::

    u32 payload length | u32 CRC-32 of (seq + payload) | u64 seq | payload

with sequence numbers strictly ascending. A record whose header or CRC does not check out (a
torn write at a crash, or corruption) ends the scan: what follows it is not trusted.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

HEADER = struct.Struct("<IIQ")
"""payload length, CRC-32 of (seq bytes + payload), seq"""
SEQ = struct.Struct("<Q")
MAX_RECORD = 64 << 20


def frame(seq: int, payload: bytes) -> bytes:
    """One record: header + payload."""
    crc = zlib.crc32(payload, zlib.crc32(SEQ.pack(seq)))
    return HEADER.pack(len(payload), crc, seq) + payload


Frame = tuple[int, int, int, bytes]
"""``(seq, offset of its header in the segment, size with the header, payload)``: one record."""


def frames(data: bytes, start: int, *, seq_name: str = "seq") -> Iterator[Frame | str]:
    """The records of a segment's bytes from ``start`` (after the magic), in order; when a
    record does not check out, a last item says what ended the segment early (a ``str``)."""
    unpack, crc32, pack_seq, hsize = HEADER.unpack_from, zlib.crc32, SEQ.pack, HEADER.size
    pos, end, last = start, len(data), 0
    while pos < end:
        if end - pos < hsize:
            yield f"torn record header at offset {pos} ({end - pos} bytes)"
            return
        size, crc, seq = unpack(data, pos)
        body = pos + hsize
        if size > MAX_RECORD or body + size > end:
            yield f"torn record at offset {pos} (length {size}, {end - body} left)"
            return
        payload = data[body : body + size]
        if crc32(payload, crc32(pack_seq(seq))) != crc or seq <= last:
            yield f"bad record at offset {pos} (CRC or {seq_name} {seq} out of order)"
            return
        last = seq
        yield seq, pos, hsize + size, payload
        pos = body + size


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a new or renamed file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_number(directory: Path, name: str, value: int) -> None:
    """``directory/name`` holds ``value`` durably: written to a temporary file, fsynced,
    renamed over the old one, the directory fsynced (a crash leaves the old or the new)."""
    tmp = directory / (name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, f"{value}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, directory / name)
    fsync_dir(directory)
