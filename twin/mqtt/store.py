"""Broker persistence: persistent sessions and retained messages in the state directory.

Layout (``<state_dir>/``)::

    mqtt.snapshot   the whole persistent state at the last compaction (pickle of plain data)
    mqtt.journal    append-only records since then: 4-byte big-endian length + pickle

What is kept: every session with a session expiry > 0 (clean session = 0 on 3.1.1) with its
subscriptions, its queued and in-flight QoS 1/2 messages (with packet ids and PUBREC state)
and its QoS 2 receive state (packet ids awaiting PUBREL); and all retained messages.
QoS 0 messages are never persisted.

Write and fsync policy: every change is written to the journal with an unbuffered
``os.write`` *before* the broker acknowledges the packet that caused it (PUBACK, PUBREC,
SUBACK ...). The bytes are then in the kernel's page cache, so a ``kill -9`` of the broker
loses nothing that was acknowledged. The journal is ``fsync``-ed every ``fsync_interval``
seconds (default 1 s) when it has changed, and on clean shutdown; an operating-system crash or
power loss can therefore lose at most the last ``fsync_interval`` seconds of acknowledged
changes. ``fsync_interval=0`` fsyncs after every record (durable, slow).

On start the snapshot is loaded, the journal replayed (a torn final record, from a crash
mid-write, is ignored), and a fresh snapshot is written atomically (temp file, fsync,
rename, fsync of the directory) before the journal is truncated. The same compaction runs
while serving when the journal passes ``compact_bytes``.
"""

from __future__ import annotations

import logging
import os
import pickle
import struct
from dataclasses import fields
from typing import Any

import trio

from twin.files import private_dir
from twin.mqtt.codec import Properties
from twin.mqtt.session import Message, Outgoing, Session, SubOptions

log = logging.getLogger(__name__)

_PROP_FIELDS = tuple(f.name for f in fields(Properties))
_SUB_FIELDS = tuple(f.name for f in fields(SubOptions))


def _msg_to(m: Message) -> tuple[Any, ...]:
    props = tuple(getattr(m.properties, f) for f in _PROP_FIELDS)
    return (m.topic, m.payload, m.qos, m.retain, props, m.sender, m.expires_at)


def _msg_from(t: tuple[Any, ...]) -> Message:
    topic, payload, qos, retain, props, sender, expires = t
    return Message(topic, payload, qos, retain, Properties(*props), sender, expires)


class Store:
    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        fsync_interval: float = 1.0,
        compact_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.dir = private_dir(state_dir)  # sessions and messages: 0700, files 0600
        self.journal_path = self.dir / "mqtt.journal"
        self.snapshot_path = self.dir / "mqtt.snapshot"
        self.fsync_interval = fsync_interval
        self.compact_bytes = compact_bytes
        self._fd: int | None = None
        self._dirty = False
        self._seq = 0
        self._size = 0
        self._source: Any = None  # callable returning (sessions, retained) for compaction

    # ------------------------------------------------------------------ load / compact

    def load(self, max_queued: int = 1000) -> tuple[dict[str, Session], dict[str, Message]]:
        state: dict[str, Any] = {"sessions": {}, "retained": {}, "seq": 0}
        if self.snapshot_path.exists():
            state = pickle.loads(self.snapshot_path.read_bytes())
        sessions: dict[str, dict[str, Any]] = state["sessions"]
        retained: dict[str, tuple[Any, ...]] = state["retained"]
        seq = state["seq"]
        if self.journal_path.exists():
            data = self.journal_path.read_bytes()
            pos = 0
            while pos + 4 <= len(data):
                (n,) = struct.unpack_from("!I", data, pos)
                if pos + 4 + n > len(data):
                    log.warning("mqtt journal: ignoring torn final record")
                    break
                try:
                    rec = pickle.loads(data[pos + 4 : pos + 4 + n])
                except Exception:  # a torn or corrupt record ends the replay
                    log.warning("mqtt journal: corrupt record at %d, stopping replay", pos)
                    break
                pos += 4 + n
                seq = max(seq, self._apply(sessions, retained, rec))
        self._seq = seq
        out_sessions: dict[str, Session] = {}
        for cid, d in sessions.items():
            s = Session(cid, d["version"], d["expiry"], max_queued)
            s.subs = {flt: SubOptions(*opts) for flt, opts in d["subs"].items()}
            s.in_qos2 = set(d["in2"])
            for mseq in sorted(d["msgs"]):
                m = d["msgs"][mseq]
                out = Outgoing(
                    _msg_from(m["msg"]),
                    m["qos"],
                    m["retain"],
                    tuple(m["sub_ids"]),
                    m["share"],
                    m["pid"],
                    m["state"],
                    mseq,
                )
                if out.pid is not None:
                    s.inflight[out.pid] = out
                else:
                    s.queue.append(out)
            if s.inflight:
                s.next_pid = max(s.inflight) % 0xFFFF + 1
            out_sessions[cid] = s
        out_retained = {t: _msg_from(m) for t, m in retained.items()}
        self._write_snapshot(out_sessions, out_retained)
        self._open()
        return out_sessions, out_retained

    @staticmethod
    def _apply(sessions: dict[str, Any], retained: dict[str, Any], rec: tuple[Any, ...]) -> int:
        kind = rec[0]
        if kind == "T":
            if rec[2] is None:
                retained.pop(rec[1], None)
            else:
                retained[rec[1]] = rec[2]
            return 0
        if kind == "S":
            _, cid, version, expiry, subs = rec
            d = sessions.setdefault(cid, {"msgs": {}, "in2": set()})
            d.update(version=version, expiry=expiry, subs=dict(subs))
            return 0
        if kind == "D":
            sessions.pop(rec[1], None)
            return 0
        d = sessions.get(rec[1])
        if d is None:
            return 0
        if kind == "E":
            _, cid, seq, msg, qos, retain, sub_ids, share = rec
            d["msgs"][seq] = {
                "msg": msg,
                "qos": qos,
                "retain": retain,
                "sub_ids": sub_ids,
                "share": share,
                "pid": None,
                "state": "queued",
            }
            return int(seq)
        if kind == "Q":
            if rec[3]:
                d["in2"].add(rec[2])
            else:
                d["in2"].discard(rec[2])
            return 0
        m = d["msgs"].get(rec[2])
        if m is None:
            return 0
        if kind == "P":
            m["pid"] = rec[3]
            m["state"] = "sent"
        elif kind == "R":
            m["state"] = "pubrec"
        elif kind == "C":
            del d["msgs"][rec[2]]
        return 0

    def _write_snapshot(self, sessions: dict[str, Session], retained: dict[str, Message]) -> None:
        snap: dict[str, Any] = {"sessions": {}, "retained": {}, "seq": self._seq}
        for cid, s in sessions.items():
            if not s.persistent:
                continue
            msgs = {}
            for out in [*s.inflight.values(), *s.queue]:
                if out.qos == 0:
                    continue
                if not out.seq:
                    self._seq += 1
                    out.seq = self._seq
                msgs[out.seq] = {
                    "msg": _msg_to(out.msg),
                    "qos": out.qos,
                    "retain": out.retain,
                    "sub_ids": out.sub_ids,
                    "share": out.share,
                    "pid": out.pid if out.state != "queued" else None,
                    "state": out.state,
                }
            snap["sessions"][cid] = {
                "version": s.version,
                "expiry": s.expiry,
                "subs": {f: tuple(getattr(o, n) for n in _SUB_FIELDS) for f, o in s.subs.items()},
                "in2": set(s.in_qos2),
                "msgs": msgs,
            }
        snap["retained"] = {t: _msg_to(m) for t, m in retained.items()}
        snap["seq"] = self._seq
        tmp = self.snapshot_path.with_suffix(".tmp")
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(pickle.dumps(snap, protocol=pickle.HIGHEST_PROTOCOL))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.snapshot_path)
        self._fsync_dir()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with os.fdopen(
            os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb"
        ) as f:
            os.fsync(f.fileno())
        self._size = 0

    def _fsync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _open(self) -> None:
        self._fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def attach(self, source: Any) -> None:
        """``source()`` returns (sessions, retained) for compaction while serving."""
        self._source = source

    async def sync_loop(self) -> None:
        interval = self.fsync_interval or 1.0
        while True:
            await trio.sleep(interval)
            if self._dirty and self._fd is not None:
                self._dirty = False
                fd = self._fd
                await trio.to_thread.run_sync(os.fsync, fd)
            if self._size > self.compact_bytes and self._source is not None:
                sessions, retained = self._source()
                self._write_snapshot(sessions, retained)
                self._open()

    def close(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None

    # ------------------------------------------------------------------ records

    def _write(self, rec: tuple[Any, ...]) -> None:
        if self._fd is None:
            return
        data = pickle.dumps(rec, protocol=pickle.HIGHEST_PROTOCOL)
        buf = struct.pack("!I", len(data)) + data
        os.write(self._fd, buf)
        self._size += len(buf)
        if self.fsync_interval == 0:
            os.fsync(self._fd)
        else:
            self._dirty = True

    def session_saved(self, s: Session) -> None:
        subs = [(f, tuple(getattr(o, n) for n in _SUB_FIELDS)) for f, o in s.subs.items()]
        self._write(("S", s.client_id, s.version, s.expiry, subs))

    def session_deleted(self, cid: str) -> None:
        self._write(("D", cid))

    def enqueued(self, cid: str, out: Outgoing) -> None:
        self._seq += 1
        out.seq = self._seq
        self._write(
            ("E", cid, out.seq, _msg_to(out.msg), out.qos, out.retain, out.sub_ids, out.share)
        )

    def sent(self, cid: str, out: Outgoing) -> None:
        if out.seq:
            self._write(("P", cid, out.seq, out.pid))

    def pubrec(self, cid: str, out: Outgoing) -> None:
        if out.seq:
            self._write(("R", cid, out.seq))

    def completed(self, cid: str, out: Outgoing) -> None:
        if out.seq:
            self._write(("C", cid, out.seq))

    def in_qos2(self, cid: str, pid: int, add: bool) -> None:
        self._write(("Q", cid, pid, add))

    def retained(self, topic: str, msg: Message | None) -> None:
        self._write(("T", topic, None if msg is None else _msg_to(msg)))
