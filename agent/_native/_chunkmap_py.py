"""Pure-Python twin of native/_chunkmap.pyx: which chunks of a file are done.

A fixed-size bitmap with a running count, the bookkeeping hot path of the receiver
and the sender (one update per chunk, one query per scheduling decision).
"""

from __future__ import annotations


class ChunkMap:
    """Set of chunk indices in ``range(n)``, stored as a bitmap."""

    __slots__ = ("_bits", "_n", "_count")

    def __init__(self, n: int) -> None:
        if n < 0:
            raise ValueError("negative chunk count")
        self._n = n
        self._bits = bytearray((n + 7) // 8)
        self._count = 0

    def __len__(self) -> int:
        return self._n

    @property
    def count(self) -> int:
        return self._count

    def complete(self) -> bool:
        return self._count == self._n

    def add(self, i: int) -> bool:
        """Mark chunk i; return True if it was not marked before."""
        if not 0 <= i < self._n:
            raise IndexError(i)
        byte, bit = i >> 3, 1 << (i & 7)
        if self._bits[byte] & bit:
            return False
        self._bits[byte] |= bit
        self._count += 1
        return True

    def discard(self, i: int) -> bool:
        if not 0 <= i < self._n:
            raise IndexError(i)
        byte, bit = i >> 3, 1 << (i & 7)
        if not self._bits[byte] & bit:
            return False
        self._bits[byte] &= ~bit & 0xFF
        self._count -= 1
        return True

    def __contains__(self, i: int) -> bool:
        if not 0 <= i < self._n:
            return False
        return bool(self._bits[i >> 3] & (1 << (i & 7)))

    def missing(self) -> list[int]:
        """Indices not marked, ascending."""
        bits = self._bits
        out = []
        for byte_i, b in enumerate(bits):
            if b == 0xFF:
                continue
            base = byte_i << 3
            for j in range(8):
                if not b & (1 << j) and base + j < self._n:
                    out.append(base + j)
        return out

    def to_bytes(self) -> bytes:
        return bytes(self._bits)
