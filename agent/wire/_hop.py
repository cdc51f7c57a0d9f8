"""The hop frame of docs/FORWARDING.md: one sealed DATA frame plus what changes per hop.

``FWD`` = prefix, hop_seq (8), bits_len (2), bitstring, hop MAC (16), inner DATA frame.
The inner frame is the source's sealed frame, byte for byte; only the bitstring (the
receivers it must still reach) changes at a hop, and it is MACed with that hop's key
together with the inner header, so a forwarder can re-address a frame but never forge
one.  Pure functions over bytes; hostile input raises only RemoteProtocolError.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import blake3

from agent.errors import LocalProtocolError, RemoteProtocolError
from agent.wire._codec import DATA_HEADER_LEN, MAGIC, PREFIX_LEN, VERSION, FrameType

__all__ = [
    "HOP_MAC_LEN",
    "MAX_BITS_LEN",
    "MAX_RECEIVERS",
    "HopHeader",
    "hop_mac",
    "encode_hop_header",
    "decode_hop_header",
    "hop_overhead",
    "bits_to_bytes",
]

HOP_MAC_LEN = 16
MAX_BITS_LEN = 32
MAX_RECEIVERS = MAX_BITS_LEN * 8
_FIXED = struct.Struct(">QH")  # hop_seq, bits_len
_PREFIX = struct.Struct(">2sBBI")
_CONTEXT = b"dxa-fwd"


@dataclass(frozen=True, slots=True)
class HopHeader:
    """What precedes the inner DATA frame in a FWD frame."""

    hop_seq: int
    bits_len: int
    bits: int
    mac: bytes
    inner_len: int  # bytes of the inner DATA frame, its own prefix included
    header_len: int  # bytes of the FWD frame before the inner frame


def bits_to_bytes(bits: int, bits_len: int) -> bytes:
    return bits.to_bytes(bits_len, "little")


def hop_mac(key: bytes, hop_seq: int, bits: int, bits_len: int, inner_header) -> bytes:
    """BLAKE3-keyed over the hop's sequence number, the bitstring and the inner 84-byte header.

    The payload is not covered: its AEAD tag binds it to that header end to end."""
    h = blake3.blake3(_CONTEXT, key=key)
    h.update(_FIXED.pack(hop_seq, bits_len))
    h.update(bits_to_bytes(bits, bits_len))
    h.update(inner_header)
    return h.digest(HOP_MAC_LEN)


def hop_overhead(bits_len: int) -> int:
    """Bytes a FWD frame adds to the DATA frame it carries."""
    return PREFIX_LEN + _FIXED.size + bits_len + HOP_MAC_LEN


def encode_hop_header(key: bytes, hop_seq: int, bits: int, bits_len: int, inner_header, inner_len: int) -> bytes:
    """The bytes to send before an unchanged inner DATA frame of ``inner_len`` bytes."""
    if not 1 <= bits_len <= MAX_BITS_LEN or bits <= 0 or bits >> (8 * bits_len):
        raise LocalProtocolError("bitstring empty or longer than its length")
    if len(inner_header) != DATA_HEADER_LEN or inner_len < DATA_HEADER_LEN:
        raise LocalProtocolError("inner frame shorter than a DATA header")
    body_len = _FIXED.size + bits_len + HOP_MAC_LEN + inner_len
    return b"".join((
        _PREFIX.pack(MAGIC, VERSION, int(FrameType.FWD), body_len),
        _FIXED.pack(hop_seq, bits_len),
        bits_to_bytes(bits, bits_len),
        hop_mac(key, hop_seq, bits, bits_len, inner_header),
    ))


def decode_hop_header(buf, body_len: int) -> HopHeader:
    """Parse the hop part of a FWD frame; ``buf`` starts after the prefix and holds at least
    ``_FIXED.size + bits_len + HOP_MAC_LEN`` bytes (the adapter reads 2 + 8 first, then the
    rest).  ``body_len`` is the prefix's length field.  The MAC is checked by the caller."""
    if len(buf) < _FIXED.size:
        raise RemoteProtocolError("truncated FWD header")
    hop_seq, bits_len = _FIXED.unpack_from(buf, 0)
    if not 1 <= bits_len <= MAX_BITS_LEN:
        raise RemoteProtocolError(f"FWD bitstring of {bits_len} bytes")
    fixed = _FIXED.size + bits_len + HOP_MAC_LEN
    if len(buf) < fixed:
        raise RemoteProtocolError("truncated FWD header")
    inner_len = body_len - fixed
    if inner_len < DATA_HEADER_LEN:
        raise RemoteProtocolError("FWD frame shorter than the DATA frame it must carry")
    bits = int.from_bytes(bytes(buf[_FIXED.size:_FIXED.size + bits_len]), "little")
    if bits == 0:
        raise RemoteProtocolError("FWD frame for no receiver")
    mac = bytes(buf[_FIXED.size + bits_len:fixed])
    return HopHeader(hop_seq, bits_len, bits, mac, inner_len, PREFIX_LEN + fixed)
