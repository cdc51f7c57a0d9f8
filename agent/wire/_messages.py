"""Typed control messages (docs/PROTOCOL.md §2, §4, §5) and their strict codecs.

Each message is a frozen dataclass; :func:`encode_message` turns it into a whole
frame and :func:`decode_message` turns a (type, body) pair back, checking every
field's type.  Hostile input raises only RemoteProtocolError.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from agent.errors import RemoteProtocolError
from agent.wire._codec import FrameType, decode_control, encode_control

__all__ = [
    "Hello", "Welcome", "ErrorMsg", "ManifestEntry", "Manifest", "PlanEntry", "Plan",
    "Ack", "Nak", "FileEnd", "FileDone", "Done", "Summary", "Join", "Joined",
    "Message", "encode_message", "decode_message",
    "KIND_FILE", "KIND_DIR", "KIND_LINK", "ACTION_SEND", "ACTION_SKIP", "ACTION_RESUME", "ACTION_REFUSE",
]

KIND_FILE, KIND_DIR, KIND_LINK = "f", "d", "l"
ACTION_SEND, ACTION_SKIP, ACTION_RESUME, ACTION_REFUSE = "send", "skip", "resume", "refuse"


MAX_REASON = 500
"""Characters of a peer's reason kept (longer ones are cut)."""


def _get(d: dict, key: str, typ, *, optional: bool = False, default: Any = None):
    if key not in d:
        if optional:
            return default
        raise RemoteProtocolError(f"missing field {key!r}")
    v = d[key]
    if typ is int and isinstance(v, bool) or not isinstance(v, typ):
        raise RemoteProtocolError(f"field {key!r} has the wrong type")
    return v


def _uint(v, name: str, bits: int = 64) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < (1 << bits):
        raise RemoteProtocolError(f"{name} is not an unsigned {bits}-bit integer")
    return v


@dataclass(frozen=True, slots=True)
class Hello:
    versions: tuple[int, int]
    mode: str
    path: str
    session_id: bytes
    key: bytes
    cipher: str
    streams: int
    chunk_size: int
    compress: str
    recursive: bool = False
    client: str = ""
    bench_seconds: float = 0.0
    rate: int = 0  # bits/s the server paces a pull at; 0 = unlimited (absent from older clients)


@dataclass(frozen=True, slots=True)
class Welcome:
    version: int
    streams: int
    max_frame: int
    server: str = ""


@dataclass(frozen=True, slots=True)
class ErrorMsg:
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    file_id: int
    relpath: str
    kind: str
    size: int
    mode: int
    mtime_ns: int
    chunk_size: int
    link_target: str = ""

    @property
    def chunks(self) -> int:
        if self.kind != KIND_FILE:
            return 0
        return max(1, -(-self.size // self.chunk_size)) if self.size else 0

    def chunk_len(self, i: int) -> int:
        return min(self.chunk_size, self.size - i * self.chunk_size)


@dataclass(frozen=True, slots=True)
class Manifest:
    entries: list[ManifestEntry]
    last: bool


@dataclass(frozen=True, slots=True)
class PlanEntry:
    file_id: int
    action: str
    have: list[tuple[int, bytes]] = field(default_factory=list)
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Plan:
    entries: list[PlanEntry]


@dataclass(frozen=True, slots=True)
class Ack:
    chunks: list[tuple[int, int]]


@dataclass(frozen=True, slots=True)
class Nak:
    chunks: list[tuple[int, int]]
    reason: str = ""


@dataclass(frozen=True, slots=True)
class FileEnd:
    file_id: int
    digests: bytes


@dataclass(frozen=True, slots=True)
class FileDone:
    file_id: int
    ok: bool
    bad: list[int] = field(default_factory=list)
    error: str = ""


@dataclass(frozen=True, slots=True)
class Done:
    failed: list[tuple[int, str]] = field(default_factory=list)
    """(file_id, reason) of files the sender gave up on after planning them (its source
    changed, a chunk kept failing): optional key, so an older receiver just reports them
    incomplete."""


@dataclass(frozen=True, slots=True)
class Summary:
    files_ok: int
    files_failed: int
    bytes_written: int
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Join:
    session_id: bytes
    stream: int
    epoch: int
    mac: bytes


@dataclass(frozen=True, slots=True)
class Joined:
    pass


Message = Union[Hello, Welcome, ErrorMsg, Manifest, Plan, Ack, Nak, FileEnd, FileDone, Done, Summary, Join, Joined]


def _flat_pairs(pairs) -> list[int]:
    out: list[int] = []
    for a, b in pairs:
        out += (a, b)
    return out


def _pairs(flat, name: str) -> list[tuple[int, int]]:
    if not isinstance(flat, list) or len(flat) % 2:
        raise RemoteProtocolError(f"{name} must be a flat list of pairs")
    return [(_uint(flat[i], name, 32), _uint(flat[i + 1], name, 32)) for i in range(0, len(flat), 2)]


def encode_message(msg: Message) -> bytes:
    """Whole frame (prefix + msgpack body) for a control message."""
    t = type(msg)
    if t is Hello:
        return encode_control(FrameType.HELLO, {
            "versions": list(msg.versions), "mode": msg.mode, "path": msg.path,
            "session_id": msg.session_id, "key": msg.key, "cipher": msg.cipher,
            "streams": msg.streams, "chunk_size": msg.chunk_size, "compress": msg.compress,
            "recursive": msg.recursive, "client": msg.client, "bench_seconds": msg.bench_seconds,
            "rate": msg.rate,
        })
    if t is Welcome:
        return encode_control(FrameType.WELCOME, {"version": msg.version, "streams": msg.streams,
                                                  "max_frame": msg.max_frame, "server": msg.server})
    if t is ErrorMsg:
        return encode_control(FrameType.ERROR, {"code": msg.code, "message": msg.message})
    if t is Manifest:
        return encode_control(FrameType.MANIFEST, {"last": msg.last, "entries": [
            [e.file_id, e.relpath, e.kind, e.size, e.mode, e.mtime_ns, e.chunk_size, e.link_target]
            for e in msg.entries]})
    if t is Plan:
        return encode_control(FrameType.PLAN, {"entries": [
            [e.file_id, e.action, e.reason if e.action == ACTION_REFUSE else [[i, d] for i, d in e.have]]
            for e in msg.entries]})
    if t is Ack:
        return encode_control(FrameType.ACK, {"chunks": _flat_pairs(msg.chunks)})
    if t is Nak:
        return encode_control(FrameType.NAK, {"chunks": _flat_pairs(msg.chunks), "reason": msg.reason})
    if t is FileEnd:
        return encode_control(FrameType.FILE_END, {"file_id": msg.file_id, "digests": msg.digests})
    if t is FileDone:
        return encode_control(FrameType.FILE_DONE, {"file_id": msg.file_id, "ok": msg.ok,
                                                    "bad": list(msg.bad), "error": msg.error})
    if t is Done:
        return encode_control(FrameType.DONE, {"failed": [[f, r] for f, r in msg.failed]} if msg.failed else {})
    if t is Summary:
        return encode_control(FrameType.SUMMARY, {"files_ok": msg.files_ok, "files_failed": msg.files_failed,
                                                  "bytes_written": msg.bytes_written, "errors": msg.errors})
    if t is Join:
        return encode_control(FrameType.JOIN, {"session_id": msg.session_id, "stream": msg.stream,
                                               "epoch": msg.epoch, "mac": msg.mac})
    if t is Joined:
        return encode_control(FrameType.JOINED, {})
    raise TypeError(f"not a control message: {msg!r}")


def _entry(raw) -> ManifestEntry:
    if not isinstance(raw, list) or len(raw) != 8:
        raise RemoteProtocolError("manifest entry must have 8 fields")
    fid, rel, kind, size, mode, mtime, csize, target = raw
    if not isinstance(rel, str) or not isinstance(target, str) or kind not in (KIND_FILE, KIND_DIR, KIND_LINK):
        raise RemoteProtocolError("manifest entry has a bad path, kind or link target")
    if isinstance(mtime, bool) or not isinstance(mtime, int):
        raise RemoteProtocolError("manifest mtime is not an integer")
    csize = _uint(csize, "chunk_size", 32)
    if kind == KIND_FILE and csize == 0:
        raise RemoteProtocolError("chunk_size is zero")
    return ManifestEntry(_uint(fid, "file_id", 32), rel, kind, _uint(size, "size", 63),
                         _uint(mode, "mode", 32), mtime, csize, target)


def _plan_entry(raw) -> PlanEntry:
    if not isinstance(raw, list) or len(raw) != 3:
        raise RemoteProtocolError("plan entry must have 3 fields")
    fid, action, extra = raw
    fid = _uint(fid, "file_id", 32)
    if action == ACTION_REFUSE:
        if not isinstance(extra, str):
            raise RemoteProtocolError("refuse reason is not a string")
        return PlanEntry(fid, action, [], extra)
    if action not in (ACTION_SEND, ACTION_SKIP, ACTION_RESUME) or not isinstance(extra, list):
        raise RemoteProtocolError("bad plan action")
    have = []
    for item in extra:
        if not isinstance(item, list) or len(item) != 2 or not isinstance(item[1], bytes) or len(item[1]) != 32:
            raise RemoteProtocolError("bad plan 'have' item")
        have.append((_uint(item[0], "chunk", 32), item[1]))
    return PlanEntry(fid, action, have)


def decode_message(ftype: FrameType, body: bytes) -> Message:
    """Decode the body of a control frame of type ``ftype``."""
    if ftype in (FrameType.DATA, FrameType.FWD):
        raise RemoteProtocolError(f"{ftype.name} frame where a control message was expected")
    d = decode_control(body)
    if ftype == FrameType.HELLO:
        versions = _get(d, "versions", list)
        if len(versions) != 2:
            raise RemoteProtocolError("versions must be [min, max]")
        return Hello(
            (_uint(versions[0], "version", 8), _uint(versions[1], "version", 8)),
            _get(d, "mode", str), _get(d, "path", str), _get(d, "session_id", bytes),
            _get(d, "key", bytes), _get(d, "cipher", str),
            _uint(_get(d, "streams", int), "streams", 16), _uint(_get(d, "chunk_size", int), "chunk_size", 32),
            _get(d, "compress", str), _get(d, "recursive", bool, optional=True, default=False),
            _get(d, "client", str, optional=True, default=""),
            float(_get(d, "bench_seconds", (int, float), optional=True, default=0.0)),
            _uint(_get(d, "rate", int, optional=True, default=0), "rate"),
        )
    if ftype == FrameType.WELCOME:
        return Welcome(_uint(_get(d, "version", int), "version", 8), _uint(_get(d, "streams", int), "streams", 16),
                       _uint(_get(d, "max_frame", int), "max_frame", 32), _get(d, "server", str, optional=True, default=""))
    if ftype == FrameType.ERROR:
        return ErrorMsg(_get(d, "code", str), _get(d, "message", str))
    if ftype == FrameType.MANIFEST:
        return Manifest([_entry(e) for e in _get(d, "entries", list)], _get(d, "last", bool))
    if ftype == FrameType.PLAN:
        return Plan([_plan_entry(e) for e in _get(d, "entries", list)])
    if ftype == FrameType.ACK:
        return Ack(_pairs(_get(d, "chunks", list), "chunks"))
    if ftype == FrameType.NAK:
        return Nak(_pairs(_get(d, "chunks", list), "chunks"), _get(d, "reason", str, optional=True, default=""))
    if ftype == FrameType.FILE_END:
        digests = _get(d, "digests", bytes)
        if len(digests) % 32:
            raise RemoteProtocolError("chunk manifest length is not a multiple of 32")
        return FileEnd(_uint(_get(d, "file_id", int), "file_id", 32), digests)
    if ftype == FrameType.FILE_DONE:
        bad = [_uint(i, "chunk", 32) for i in _get(d, "bad", list, optional=True, default=[])]
        return FileDone(_uint(_get(d, "file_id", int), "file_id", 32), _get(d, "ok", bool), bad,
                        _get(d, "error", str, optional=True, default=""))
    if ftype == FrameType.DONE:
        failed = []
        for item in _get(d, "failed", list, optional=True, default=[]):
            if not isinstance(item, list) or len(item) != 2 or not isinstance(item[1], str):
                raise RemoteProtocolError("DONE failed entries must be [file_id, reason]")
            failed.append((_uint(item[0], "file_id", 32), item[1][:MAX_REASON]))
        return Done(failed)
    if ftype == FrameType.SUMMARY:
        errors = _get(d, "errors", list, optional=True, default=[])
        if not all(isinstance(e, str) for e in errors):  # str() of a deep list: RecursionError
            raise RemoteProtocolError("summary errors must be strings")
        return Summary(_uint(_get(d, "files_ok", int), "files_ok"), _uint(_get(d, "files_failed", int), "files_failed"),
                       _uint(_get(d, "bytes_written", int), "bytes_written"), errors[:100])
    if ftype == FrameType.JOIN:
        sid, mac = _get(d, "session_id", bytes), _get(d, "mac", bytes)
        if len(sid) != 8 or len(mac) != 16:
            raise RemoteProtocolError("JOIN session_id/mac have the wrong length")
        return Join(sid, _uint(_get(d, "stream", int), "stream", 16), _uint(_get(d, "epoch", int), "epoch", 32), mac)
    if ftype == FrameType.JOINED:
        return Joined()
    raise RemoteProtocolError(f"unexpected frame type {ftype!r}")
