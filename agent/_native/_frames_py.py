"""Pure-Python twin of native/_frames.pyx: the fixed-size parts of frames.

Same signatures and same errors as the compiled module; agent/_native/__init__.py
picks one.  No I/O; hostile input raises only RemoteProtocolError.
"""

from __future__ import annotations

import struct

from agent.errors import RemoteProtocolError

_PREFIX = struct.Struct(">2sBBI")
_DATA = struct.Struct(">2sBBIB3s8sIIQI12s32s")
_MAGIC = b"DX"
_VERSION = 1


def parse_prefix(buf) -> tuple[int, int]:
    """Return (frame type, body length) of an 8-byte prefix; check magic and version."""
    if len(buf) < 8:
        raise RemoteProtocolError("truncated frame prefix")
    magic, version, ftype, length = _PREFIX.unpack_from(buf, 0)
    if magic != _MAGIC:
        raise RemoteProtocolError("bad magic: not a dxa frame")
    if version != _VERSION:
        raise RemoteProtocolError(f"unsupported frame version {version}")
    return ftype, length


def parse_data_header(buf) -> tuple:
    """(flags, reserved, session_id, file_id, chunk, offset, plain_len, nonce, digest, length)."""
    if len(buf) < 84:
        raise RemoteProtocolError("truncated DATA header")
    magic, version, ftype, length, flags, rsvd, sid, fid, chunk, off, plen, nonce, digest = (
        _DATA.unpack_from(buf, 0)
    )
    if magic != _MAGIC:
        raise RemoteProtocolError("bad magic: not a dxa frame")
    if version != _VERSION:
        raise RemoteProtocolError(f"unsupported frame version {version}")
    if ftype != 0x10:
        raise RemoteProtocolError("not a DATA frame")
    return flags, int.from_bytes(rsvd, "big"), sid, fid, chunk, off, plen, nonce, digest, length


def pack_data_header(flags, session_id, file_id, chunk, offset, plain_len, nonce, digest, length) -> bytes:
    """84 bytes: prefix (type DATA, ``length``) followed by the DATA header fields."""
    if len(session_id) != 8 or len(nonce) != 12 or len(digest) != 32:
        raise ValueError("session_id, nonce and digest must be 8, 12 and 32 bytes")
    return _DATA.pack(
        _MAGIC, _VERSION, 0x10, length, flags, b"\0\0\0", session_id, file_id, chunk,
        offset, plain_len, nonce, digest,
    )
