"""SIP messages (RFC 3261) as GB/T 28181 uses them: parse, build, digest authentication.

Only what a GB28181 platform needs: requests and responses with headers in order, compact
header names, ``Content-Length`` framing on TCP (CRLF keep-alives skipped), and MD5 digest
(RFC 2617, with or without ``qop=auth``). Everything a peer sends is bounded: a message larger
than :data:`MAX_MESSAGE`, more than :data:`MAX_HEADERS` headers or a malformed line raises
:class:`SipParseError` (the server drops it / closes that connection).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field

MAX_MESSAGE = 65_536
MAX_HEADERS = 64
COMPACT = {"v": "via", "f": "from", "t": "to", "i": "call-id", "m": "contact",
           "l": "content-length", "c": "content-type", "k": "supported", "s": "subject"}


class SipParseError(ValueError):
    """Not a SIP message we accept."""


@dataclass
class SipMessage:
    start: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    # -- first line ------------------------------------------------------------------------
    @property
    def is_request(self) -> bool:
        return not self.start.startswith("SIP/2.0 ")

    @property
    def method(self) -> str:
        if self.is_request:
            return self.start.split(" ", 1)[0]
        return (self.header("cseq") or " ").split()[-1]

    @property
    def uri(self) -> str:
        return self.start.split(" ")[1]

    @property
    def status(self) -> int:
        return int(self.start.split(" ")[1]) if not self.is_request else 0

    # -- headers ---------------------------------------------------------------------------
    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name or COMPACT.get(k.lower()) == name:
                return v
        return None

    def all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name or COMPACT.get(k.lower()) == name]

    def set(self, name: str, value: str) -> None:
        low = name.lower()
        self.headers = [(k, v) for k, v in self.headers
                        if k.lower() != low and COMPACT.get(k.lower()) != low]
        self.headers.append((name, value))

    @property
    def call_id(self) -> str:
        return self.header("call-id") or ""

    @property
    def cseq(self) -> tuple[int, str]:
        raw = (self.header("cseq") or "0 ?").split()
        try:
            return int(raw[0]), raw[-1]
        except (ValueError, IndexError):
            return 0, "?"

    def encode(self) -> bytes:
        lines = [self.start]
        lines += [f"{k}: {v}" for k, v in self.headers if k.lower() not in ("content-length", "l")]
        lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + self.body

    def response(self, status: int, reason: str, *, to_tag: str | None = None,
                 extra: list[tuple[str, str]] | None = None, body: bytes = b"",
                 content_type: str | None = None) -> SipMessage:
        """A response to this request: Via, From, To (+ tag), Call-ID, CSeq copied."""
        headers = [(k, v) for k, v in self.headers
                   if k.lower() in ("via", "v", "from", "f", "call-id", "i", "cseq")]
        to = self.header("to") or ""
        if to_tag and ";tag=" not in to:
            to += f";tag={to_tag}"
        headers.insert(len([h for h in headers if h[0].lower() in ("via", "v")]), ("To", to))
        headers += extra or []
        if content_type:
            headers.append(("Content-Type", content_type))
        return SipMessage(f"SIP/2.0 {status} {reason}", headers, body)


def parse(data: bytes) -> SipMessage:
    """One complete SIP message (a UDP datagram, or a frame cut by :class:`StreamParser`)."""
    if len(data) > MAX_MESSAGE:
        raise SipParseError("message too large")
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = data.partition(b"\n\n")
        if not sep:
            raise SipParseError("no end of headers")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = head.decode("gb18030", errors="strict") if _gb(head) else ""
        if not text:
            raise SipParseError("headers are not UTF-8") from None
    lines = text.replace("\r\n", "\n").split("\n")
    start = lines[0].strip()
    parts = start.split(" ")
    if start.startswith("SIP/2.0 "):
        if len(parts) < 2 or not parts[1].isdigit() or len(parts[1]) != 3:
            raise SipParseError(f"bad status line {start[:80]!r}")
    elif len(parts) != 3 or parts[2] != "SIP/2.0" or not parts[0].isalpha():
        raise SipParseError(f"bad request line {start[:80]!r}")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        if line[0] in " \t" and headers:  # folded continuation
            k, v = headers[-1]
            headers[-1] = (k, v + " " + line.strip())
            continue
        name, colon, value = line.partition(":")
        if not colon or not name.strip() or " " in name.strip():
            raise SipParseError(f"bad header line {line[:80]!r}")
        headers.append((name.strip(), value.strip()))
        if len(headers) > MAX_HEADERS:
            raise SipParseError("too many headers")
    msg = SipMessage(start, headers, body)
    length = msg.header("content-length")
    if length is not None:
        try:
            n = int(length)
        except ValueError:
            raise SipParseError("bad Content-Length") from None
        if n < 0 or n > len(body):
            raise SipParseError("Content-Length beyond the message")
        msg.body = body[:n]
    for required in ("call-id", "cseq", "from", "to"):
        if msg.header(required) is None:
            raise SipParseError(f"missing {required} header")
    if msg.is_request and msg.header("via") is None:
        raise SipParseError("missing via header")
    return msg


def _gb(data: bytes) -> bool:
    try:
        data.decode("gb18030")
    except UnicodeDecodeError:
        return False
    return True


class StreamParser:
    """Cuts a TCP byte stream into SIP messages by ``Content-Length``."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[SipMessage]:
        self.buf += data
        out: list[SipMessage] = []
        while True:
            while self.buf[:2] == b"\r\n":  # keep-alive CRLFs between messages
                del self.buf[:2]
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_MESSAGE:
                    raise SipParseError("headers too long")
                return out
            head = bytes(self.buf[:end])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() in (b"content-length", b"l"):
                    try:
                        length = int(value.strip())
                    except ValueError:
                        raise SipParseError("bad Content-Length") from None
            if length < 0 or end + 4 + length > MAX_MESSAGE:
                raise SipParseError("message too large")
            total = end + 4 + length
            if len(self.buf) < total:
                return out
            frame = bytes(self.buf[:total])
            del self.buf[:total]
            out.append(parse(frame))


# -- addresses ---------------------------------------------------------------------------------
def uri_user(value: str) -> str:
    """``34020000001320000001`` of ``"x" <sip:34020000001320000001@3402000000>;tag=1``."""
    start = value.find("sip:")
    if start < 0:
        return ""
    rest = value[start + 4:]
    user = rest.split("@", 1)[0] if "@" in rest else ""
    return user.split(";")[0].split(">")[0]


def tag(value: str) -> str | None:
    for part in value.split(";")[1:]:
        k, _, v = part.strip().partition("=")
        if k.lower() == "tag":
            return v
    return None


def new_tag() -> str:
    return secrets.token_hex(6)


def new_branch() -> str:
    return "z9hG4bK" + secrets.token_hex(8)


# -- digest (RFC 2617) -------------------------------------------------------------------------
def parse_auth(value: str) -> dict[str, str]:
    """``Digest username="a", realm="b", ...`` → ``{username: a, realm: b, ...}``."""
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "digest":
        return {}
    out: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " ,":
            i += 1
        eq = rest.find("=", i)
        if eq < 0:
            break
        key = rest[i:eq].strip().lower()
        i = eq + 1
        if i < n and rest[i] == '"':
            end = rest.find('"', i + 1)
            if end < 0:
                break
            out[key] = rest[i + 1:end]
            i = end + 1
        else:
            end = rest.find(",", i)
            end = n if end < 0 else end
            out[key] = rest[i:end].strip()
            i = end
    return out


def _md5(s: str) -> str:
    return hashlib.md5(s.encode("utf-8")).hexdigest()


def digest_response(username: str, realm: str, password: str, method: str, uri: str,
                    nonce: str, qop: str | None = None, nc: str | None = None,
                    cnonce: str | None = None) -> str:
    ha1 = _md5(f"{username}:{realm}:{password}")
    ha2 = _md5(f"{method}:{uri}")
    if qop:
        return _md5(f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")
    return _md5(f"{ha1}:{nonce}:{ha2}")


def check_digest(auth: dict[str, str], password: str, method: str) -> bool:
    want = digest_response(auth.get("username", ""), auth.get("realm", ""), password, method,
                           auth.get("uri", ""), auth.get("nonce", ""), auth.get("qop"),
                           auth.get("nc"), auth.get("cnonce"))
    return secrets.compare_digest(want, auth.get("response", ""))


__all__ = ["MAX_MESSAGE", "SipMessage", "SipParseError", "StreamParser", "check_digest",
           "digest_response", "new_branch", "new_tag", "parse", "parse_auth", "tag", "uri_user"]
