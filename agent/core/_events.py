"""Events the core state machines hand out (past tense, plain data)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FileCompleted", "FileFailed", "ChunkRetried", "TransferCompleted", "ChunkJob", "StreamStalled"]


@dataclass(frozen=True, slots=True)
class FileCompleted:
    file_id: int
    relpath: str
    size: int
    skipped: bool


@dataclass(frozen=True, slots=True)
class FileFailed:
    file_id: int
    relpath: str
    reason: str


@dataclass(frozen=True, slots=True)
class ChunkRetried:
    file_id: int
    chunk: int
    reason: str


@dataclass(frozen=True, slots=True)
class TransferCompleted:
    files_ok: int
    files_failed: int


@dataclass(frozen=True, slots=True)
class ChunkJob:
    """Work for a send pump: ``verify`` re-hashes a chunk the receiver claims to hold."""

    file_id: int
    chunk: int
    offset: int
    length: int
    verify: bool = False
    claimed: bytes = b""


@dataclass(frozen=True, slots=True)
class StreamStalled:
    """``stream`` held un-ACKed chunks and made no progress for ``seconds``: treat it as lost
    (close it, then ``stream_lost``)."""

    stream: int
    seconds: float
