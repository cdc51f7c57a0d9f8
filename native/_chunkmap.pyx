# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Compiled twin of agent/_native/_chunkmap_py.py: which chunks of a file are done.

A C bitmap (bit ``i & 7`` of byte ``i >> 3``, the twin's layout, so ``to_bytes``
is byte-identical) with a running count.  ``missing()`` skips complete 64-bit
words and walks the holes with count-trailing-zeros; it stops as soon as it has
found the ``n - count`` holes it knows are there.  Same signatures, results and
exceptions as the twin (ValueError for a negative size, IndexError(i) for an
index outside ``range(n)``, TypeError for a non-integer index in range).
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.long cimport PyLong_Check, PyLong_FromSsize_t
from cpython.mem cimport PyMem_Calloc, PyMem_Free
from cpython.ref cimport Py_INCREF
from libc.stdint cimport uint64_t
from libc.string cimport memcpy

from operator import index as _index

cdef extern from "Python.h":
    # Leaves the error indicator set instead of raising: the fast path needs no try.
    Py_ssize_t _as_ssize "PyLong_AsSsize_t"(object) noexcept
    void* PyErr_Occurred() noexcept
    void PyErr_Clear() noexcept

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    /* 8 bitmap bytes as a word whose bit k is chunk 8*byte + k, on any host. */
    static inline uint64_t dxa_load_le64(const unsigned char *p) {
    #if defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        uint64_t v; memcpy(&v, p, 8); return v;
    #else
        uint64_t v = 0; int k;
        for (k = 7; k >= 0; k--) v = (v << 8) | p[k];
        return v;
    #endif
    }
    #if defined(__GNUC__) || defined(__clang__)
    static inline int dxa_ctz64(uint64_t v) { return __builtin_ctzll(v); }
    static inline int dxa_popcount64(uint64_t v) { return __builtin_popcountll(v); }
    #else
    static inline int dxa_ctz64(uint64_t v) { int n = 0; while (!(v & 1)) { v >>= 1; n++; } return n; }
    static inline int dxa_popcount64(uint64_t v) { int n = 0; while (v) { v &= v - 1; n++; } return n; }
    #endif
    """
    uint64_t dxa_load_le64(const unsigned char* p) noexcept nogil
    int dxa_ctz64(uint64_t v) noexcept nogil
    int dxa_popcount64(uint64_t v) noexcept nogil


def _rebuild(n, state):
    """Unpickle / copy helper: a ChunkMap of n chunks with the bitmap ``state``."""
    cdef ChunkMap m = ChunkMap(n)
    cdef const unsigned char[:] src = state
    if src.shape[0] != m._nbytes:
        raise ValueError("bitmap size does not match the chunk count")
    if m._nbytes:
        memcpy(m._bits, &src[0], m._nbytes)
    m._mask_tail()
    m._count = m._popcount()
    return m


cdef class ChunkMap:
    """Set of chunk indices in ``range(n)``, stored as a bitmap."""

    cdef unsigned char* _bits  # _nwords * 8 bytes, zero past _nbytes
    cdef Py_ssize_t _n
    cdef Py_ssize_t _count
    cdef Py_ssize_t _nbytes
    cdef Py_ssize_t _nwords

    def __cinit__(self):
        self._bits = NULL
        self._n = 0
        self._count = 0
        self._nbytes = 0
        self._nwords = 0

    def __init__(self, n):
        if n < 0:
            raise ValueError("negative chunk count")
        cdef Py_ssize_t nn = n  # TypeError / OverflowError as bytearray(n) would raise
        cdef Py_ssize_t nbytes = (nn >> 3) + ((nn & 7) != 0)
        cdef Py_ssize_t nwords = (nbytes >> 3) + ((nbytes & 7) != 0)
        cdef unsigned char* bits = <unsigned char*>PyMem_Calloc(nwords if nwords else 1, 8)
        if bits == NULL:
            raise MemoryError()
        PyMem_Free(self._bits)
        self._bits = bits
        self._n = nn
        self._nbytes = nbytes
        self._nwords = nwords
        self._count = 0

    def __dealloc__(self):
        PyMem_Free(self._bits)
        self._bits = NULL

    cdef void _mask_tail(self) noexcept:
        cdef Py_ssize_t k
        for k in range(self._n, self._nwords * 64):
            self._bits[k >> 3] &= <unsigned char>~(1 << (k & 7))

    cdef Py_ssize_t _popcount(self) noexcept:
        cdef Py_ssize_t w, total = 0
        for w in range(self._nwords):
            total += dxa_popcount64(dxa_load_le64(self._bits + (w << 3)))
        return total

    cdef Py_ssize_t _slot(self, object i) except -1:
        """The twin's ``if not 0 <= i < n: raise IndexError(i)``, then i as a C index."""
        cdef Py_ssize_t k
        if PyLong_Check(i):
            k = _as_ssize(i)
            if k == -1 and PyErr_Occurred() != NULL:
                PyErr_Clear()  # wider than Py_ssize_t: out of range either way
                raise IndexError(i)
            if k < 0 or k >= self._n:
                raise IndexError(i)
            return k
        # Not an int: compare the way the twin does, then demand an integer
        # (the twin's ``i >> 3`` raises TypeError for a float in range).
        if not 0 <= i < self._n:
            raise IndexError(i)
        k = _index(i)
        if k < 0 or k >= self._n:
            raise IndexError(i)
        return k

    def __len__(self):
        return self._n

    @property
    def count(self):
        return self._count

    def complete(self):
        return self._count == self._n

    def add(self, i):
        """Mark chunk i; return True if it was not marked before."""
        cdef Py_ssize_t k = self._slot(i)
        cdef unsigned char bit = <unsigned char>(1 << (k & 7))
        if self._bits[k >> 3] & bit:
            return False
        self._bits[k >> 3] |= bit
        self._count += 1
        return True

    def discard(self, i):
        cdef Py_ssize_t k = self._slot(i)
        cdef unsigned char bit = <unsigned char>(1 << (k & 7))
        if not (self._bits[k >> 3] & bit):
            return False
        self._bits[k >> 3] &= <unsigned char>~bit
        self._count -= 1
        return True

    def __contains__(self, i):
        cdef Py_ssize_t k
        if PyLong_Check(i):
            k = _as_ssize(i)
            if k == -1 and PyErr_Occurred() != NULL:
                PyErr_Clear()
                return False
            if k < 0 or k >= self._n:
                return False
        else:
            if not 0 <= i < self._n:
                return False
            k = _index(i)
            if k < 0 or k >= self._n:
                return False
        return (self._bits[k >> 3] >> (k & 7)) & 1

    def missing(self):
        """Indices not marked, ascending."""
        cdef Py_ssize_t want = self._n - self._count
        cdef list out = PyList_New(want)
        if want == 0:
            return out
        cdef Py_ssize_t pos = 0, w = 0, base
        cdef uint64_t holes
        cdef object item
        # Bits past n are never set, so the first `want` holes are exactly the
        # missing chunks: no bounds test per bit, and an early stop.
        while pos < want and w < self._nwords:
            holes = ~dxa_load_le64(self._bits + (w << 3))
            base = w << 6
            while holes and pos < want:
                item = PyLong_FromSsize_t(base + dxa_ctz64(holes))
                Py_INCREF(item)
                PyList_SET_ITEM(out, pos, item)
                pos += 1
                holes &= holes - 1
            w += 1
        return out

    def to_bytes(self):
        return PyBytes_FromStringAndSize(<const char*>self._bits, self._nbytes)

    def __reduce__(self):
        return (_rebuild, (self._n, self.to_bytes()))
