"""Sealing and opening DATA frames (docs/PROTOCOL.md §3): AEAD, keyed tags, zstd.

Pure functions and small objects over bytes; no I/O, no clock.  The nonce counter
lives in :class:`Sealer` so that one session never seals twice with one nonce.
Bulk crypto stays in `cryptography` (writes in place; holds the GIL, measured) and hashing
in `blake3` (releases the GIL); callers run these from worker threads.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass

import blake3
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from agent.errors import ConfigError, IntegrityError, RemoteProtocolError
from agent.wire._codec import (
    DATA_HEADER_LEN,
    FLAG_COMPRESSED,
    FLAG_ENCRYPTED,
    TAG_LEN,
    DataHeader,
    encode_data_header,
)

__all__ = ["FRAME_OVERHEAD", "CIPHERS", "Sealer", "Opener", "SealedChunk", "chunk_digest", "join_mac", "compressible"]

CIPHERS = ("aes256gcm", "chacha20poly1305", "none")
_SAMPLE = 32 << 10
FRAME_OVERHEAD = DATA_HEADER_LEN + TAG_LEN  # a compressed body is used only when smaller than the plaintext
_local = threading.local()


def chunk_digest(data) -> bytes:
    """BLAKE3-256 of a chunk (multithreaded internally for big inputs? no: callers parallelise)."""
    return blake3.blake3(data).digest()


def join_mac(key: bytes, session_id: bytes, stream: int, epoch: int) -> bytes:
    msg = b"dxa-join" + session_id + stream.to_bytes(4, "big") + epoch.to_bytes(4, "big")
    return blake3.blake3(msg, key=key).digest(16)


def _keyed_tag(key: bytes, header) -> bytes:
    return blake3.blake3(header, key=key).digest(TAG_LEN)


def _compressor() -> zstandard.ZstdCompressor:
    c = getattr(_local, "cctx", None)
    if c is None:
        c = _local.cctx = zstandard.ZstdCompressor(level=1, write_content_size=True)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


def compressible(data) -> bool:
    """True when a sample of ``data`` shrinks by at least 10% under zstd level 1."""
    sample = data[:_SAMPLE]
    if len(sample) < 512:
        return False
    return len(_compressor().compress(sample)) < 0.9 * len(sample)


def _aead(cipher: str, key: bytes):
    if cipher == "aes256gcm":
        return AESGCM(key)
    if cipher == "chacha20poly1305":
        return ChaCha20Poly1305(key)
    if cipher == "none":
        return None
    raise ConfigError(f"unknown cipher {cipher!r}")


@dataclass(frozen=True, slots=True)
class SealedChunk:
    """A whole DATA frame in one buffer, ready for one sendall()."""

    frame: bytearray
    nonce: bytes
    wire_payload: int  # payload bytes (compressed size when compressed)


class Sealer:
    """Seals chunks for one session.  Thread-safe: the nonce counter is atomic under the GIL."""

    def __init__(self, key: bytes, session_id: bytes, cipher: str = "aes256gcm") -> None:
        if len(key) != 32 or len(session_id) != 8:
            raise ConfigError("key must be 32 bytes and session_id 8 bytes")
        self._key = key
        self._sid = session_id
        self._aead = _aead(cipher, key)
        self._counter = itertools.count()

    @property
    def encrypted(self) -> bool:
        return self._aead is not None

    def seal(self, file_id: int, chunk: int, offset: int, plain, digest: bytes, compress: str = "off",
             out: bytearray | None = None) -> SealedChunk:
        """Frame ``plain`` (bytes-like).  ``compress``: 'off', 'zstd' (always) or 'auto' (if a sample shrinks).

        With ``out`` (at least ``len(plain) + FRAME_OVERHEAD`` bytes) the frame is built in
        it and ``SealedChunk.frame`` is a view of it, valid until ``out`` is reused.
        ``plain`` may be ``out[DATA_HEADER_LEN:]`` itself (how SendPump reads a chunk): it is
        then sealed in place, after the digest and the compression sample were taken."""
        flags = 0
        body = plain
        if compress == "zstd" or (compress == "auto" and compressible(plain)):
            packed = _compressor().compress(plain)
            if len(packed) < len(plain):
                body, flags = packed, FLAG_COMPRESSED
        nonce = b"\0\0\0\0" + next(self._counter).to_bytes(8, "big")
        n = len(body)
        if self._aead is not None:
            flags |= FLAG_ENCRYPTED
        header = encode_data_header(flags, self._sid, file_id, chunk, offset, len(plain), nonce, digest, n)
        total = DATA_HEADER_LEN + n + TAG_LEN
        frame = memoryview(out)[:total] if out is not None and len(out) >= total else bytearray(total)
        frame[:DATA_HEADER_LEN] = header
        if self._aead is not None:
            self._aead.encrypt_into(nonce, body, header, memoryview(frame)[DATA_HEADER_LEN:])
        else:
            frame[DATA_HEADER_LEN : DATA_HEADER_LEN + n] = body
            frame[DATA_HEADER_LEN + n :] = _keyed_tag(self._key, header)
        return SealedChunk(frame, nonce, n)


class Opener:
    """Opens DATA frames of one session: tag, then decompression, then the BLAKE3 digest."""

    def __init__(self, key: bytes, session_id: bytes, cipher: str = "aes256gcm") -> None:
        self._key = key
        self._sid = session_id
        self._aead = _aead(cipher, key)

    def open(self, hdr: DataHeader, header, payload_and_tag, out: bytearray | None = None):
        """Return the verified plaintext, or raise IntegrityError / RemoteProtocolError.

        With ``out`` (at least ``payload_len`` bytes) decryption goes into it and the result
        may be a view of it (or of ``payload_and_tag`` when unencrypted), valid until reuse."""
        if hdr.session_id != self._sid:
            raise RemoteProtocolError("DATA frame for another session")
        encrypted = bool(hdr.flags & FLAG_ENCRYPTED)
        if encrypted != (self._aead is not None):
            raise RemoteProtocolError("DATA frame encryption flag does not match the session")
        n = hdr.payload_len
        if len(payload_and_tag) != n + TAG_LEN:
            raise RemoteProtocolError("DATA payload length mismatch")
        if self._aead is not None:
            body = memoryview(out)[:n] if out is not None and len(out) >= n else bytearray(n)
            try:
                self._aead.decrypt_into(hdr.nonce, payload_and_tag, header, body)
            except InvalidTag:
                raise IntegrityError("AEAD tag mismatch") from None
        else:
            if _keyed_tag(self._key, header) != bytes(payload_and_tag[n:]):
                raise IntegrityError("keyed tag mismatch")
            body = payload_and_tag[:n]
        if hdr.flags & FLAG_COMPRESSED:
            try:
                # decompress() ignores max_output_size when the zstd frame declares its content
                # size, and allocates that size: refuse a declared size above plain_len first.
                if zstandard.frame_content_size(body) > hdr.plain_len:
                    raise IntegrityError("zstd frame declares more than plain_len bytes")
                body = _decompressor().decompress(body, max_output_size=hdr.plain_len)
            except zstandard.ZstdError:
                raise IntegrityError("zstd payload does not decompress") from None
        if len(body) != hdr.plain_len:
            raise IntegrityError("plaintext length differs from the header")
        if chunk_digest(body) != hdr.digest:
            raise IntegrityError("BLAKE3 digest mismatch")
        return body
