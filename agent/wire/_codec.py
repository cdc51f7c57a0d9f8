"""Byte formats of docs/PROTOCOL.md: the frame prefix, the DATA header, control bodies.

Pure functions over bytes and memoryviews.  This module never does I/O and, on
hostile input, raises only :class:`RemoteProtocolError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Iterator

import msgpack

from agent._native import parse_data_header, parse_prefix, pack_data_header
from agent.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "MAGIC",
    "VERSION",
    "SUPPORTED_VERSIONS",
    "PREFIX_LEN",
    "DATA_HEADER_LEN",
    "TAG_LEN",
    "FLAG_ENCRYPTED",
    "FLAG_COMPRESSED",
    "FrameType",
    "DataHeader",
    "encode_frame",
    "encode_control",
    "decode_control",
    "decode_data_header",
    "encode_data_header",
    "check_prefix",
    "FrameDecoder",
    "CONTROL_MAX",
]

MAGIC = b"DX"
VERSION = 1
SUPPORTED_VERSIONS = (1, 1)
PREFIX_LEN = 8
DATA_HEADER_LEN = 84
TAG_LEN = 16
FLAG_ENCRYPTED = 0x01
FLAG_COMPRESSED = 0x02
_KNOWN_FLAGS = FLAG_ENCRYPTED | FLAG_COMPRESSED
CONTROL_MAX = 16 << 20

_PREFIX = struct.Struct(">2sBBI")


class FrameType(IntEnum):
    HELLO = 0x01
    WELCOME = 0x02
    ERROR = 0x03
    MANIFEST = 0x04
    PLAN = 0x05
    ACK = 0x06
    NAK = 0x07
    FILE_END = 0x08
    FILE_DONE = 0x09
    DONE = 0x0A
    SUMMARY = 0x0B
    DATA = 0x10
    JOIN = 0x20
    JOINED = 0x21
    FWD = 0x30  # docs/FORWARDING.md: a sealed DATA frame with its hop's bitstring and MAC


_TYPES = frozenset(int(t) for t in FrameType)


@dataclass(frozen=True, slots=True)
class DataHeader:
    """The 84-byte header of a DATA frame (its AEAD associated data)."""

    flags: int
    session_id: bytes
    file_id: int
    chunk: int
    offset: int
    plain_len: int
    nonce: bytes
    digest: bytes
    payload_len: int  # bytes of payload between header and tag


def check_prefix(buf: bytes | memoryview, limit: int) -> tuple[FrameType, int]:
    """Validate an 8-byte prefix; return (type, body length).  ``limit`` bounds the body."""
    ftype, length = parse_prefix(buf)
    if ftype not in _TYPES:
        raise RemoteProtocolError(f"unknown frame type 0x{ftype:02x}")
    if length > limit:
        raise RemoteProtocolError(f"frame of {length} bytes exceeds the limit of {limit}")
    return FrameType(ftype), length


def encode_frame(ftype: FrameType, body: bytes) -> bytes:
    return _PREFIX.pack(MAGIC, VERSION, int(ftype), len(body)) + body


def encode_control(ftype: FrameType, fields: dict[str, Any]) -> bytes:
    if ftype == FrameType.DATA:
        raise LocalProtocolError("DATA frames are not msgpack-encoded")
    return encode_frame(ftype, msgpack.packb(fields, use_bin_type=True))


def decode_control(body: bytes | memoryview) -> dict[str, Any]:
    """Decode a msgpack control body into a dict with str keys; hostile input → RemoteProtocolError."""
    try:
        obj = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
        )
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise RemoteProtocolError(f"malformed control body: {exc.__class__.__name__}") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise RemoteProtocolError("control body is not a map with string keys")
    return obj


def encode_data_header(
    flags: int,
    session_id: bytes,
    file_id: int,
    chunk: int,
    offset: int,
    plain_len: int,
    nonce: bytes,
    digest: bytes,
    payload_len: int,
) -> bytes:
    """The 84-byte header for a DATA frame whose payload has ``payload_len`` bytes."""
    if flags & ~_KNOWN_FLAGS:
        raise LocalProtocolError("unknown DATA flags")
    return pack_data_header(
        flags, session_id, file_id, chunk, offset, plain_len, nonce, digest,
        DATA_HEADER_LEN - PREFIX_LEN + payload_len + TAG_LEN,
    )


def decode_data_header(buf: bytes | memoryview) -> DataHeader:
    """Parse and sanity-check the first 84 bytes of a DATA frame."""
    if len(buf) < DATA_HEADER_LEN:
        raise RemoteProtocolError("truncated DATA header")
    fields = parse_data_header(buf)
    flags, _rsvd, session_id, file_id, chunk, offset, plain_len, nonce, digest, length = fields
    if flags & ~_KNOWN_FLAGS or _rsvd:
        raise RemoteProtocolError("unknown DATA flags or non-zero reserved bits")
    payload_len = length - (DATA_HEADER_LEN - PREFIX_LEN) - TAG_LEN
    if payload_len < 0:
        raise RemoteProtocolError("DATA frame shorter than its header and tag")
    return DataHeader(flags, session_id, file_id, chunk, offset, plain_len, nonce, digest, payload_len)


class FrameDecoder:
    """Incremental splitter for a byte stream of frames (used on control connections).

    Feed any number of bytes with :meth:`feed`; iterate :meth:`frames` for complete
    ``(type, body)`` pairs.  Memory is bounded by ``limit`` plus one read.
    """

    def __init__(self, limit: int = CONTROL_MAX) -> None:
        self._buf = bytearray()
        self._limit = limit
        self._need: tuple[FrameType, int] | None = None

    def feed(self, data: bytes) -> None:
        self._buf += data

    def frames(self) -> Iterator[tuple[FrameType, bytes]]:
        while True:
            if self._need is None:
                if len(self._buf) < PREFIX_LEN:
                    return
                self._need = check_prefix(bytes(self._buf[:PREFIX_LEN]), self._limit)
                del self._buf[:PREFIX_LEN]
            ftype, length = self._need
            if len(self._buf) < length:
                return
            body = bytes(self._buf[:length])
            del self._buf[:length]
            self._need = None
            yield ftype, body

    @property
    def buffered(self) -> int:
        return len(self._buf)
