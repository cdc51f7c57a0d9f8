# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Compiled twin of agent/_native/_frames_py.py: the fixed-size parts of frames.

Same signatures, return values and exceptions as the pure-Python twin (the
property tests in tests/unit/test_native_twins.py hold them to that):

* hostile input to ``parse_prefix`` / ``parse_data_header`` raises
  RemoteProtocolError, with the twin's messages;
* input that is not a bytes-like object fails as it does under ``struct``
  (TypeError / BufferError), and ``pack_data_header`` raises ValueError for bad
  lengths and ``struct.error`` for out-of-range or non-integer fields.

Input is any C-contiguous buffer (bytes, bytearray, memoryview, ...).  ``bytes``,
the common case on the data path, is read in place; anything else goes through
the buffer protocol (PyBUF_SIMPLE, as ``struct.unpack_from`` does), which also
pins a bytearray's size while we read it.  Fields are decoded by hand, big-endian.
(A ``const unsigned char[:]`` typed memoryview argument was measured at ~50 ns more
per call than this, and it rejects a memoryview of format 'b', which the twin takes.)
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_Check, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_Check, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.long cimport PyLong_Check
from cpython.number cimport PyIndex_Check, PyNumber_Index
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcpy, memset

import struct as _struct

from agent.errors import RemoteProtocolError

cdef extern from "Python.h":
    # Raw versions that leave the error indicator set instead of raising, so the
    # fast path needs no try/except block.
    unsigned long long _as_ull "PyLong_AsUnsignedLongLong"(object) noexcept
    void* PyErr_Occurred() noexcept
    void PyErr_Clear() noexcept

cdef object _StructError = _struct.error

cdef enum:
    _PREFIX_LEN = 8
    _HEADER_LEN = 84


cdef inline uint32_t _be32(const unsigned char* p) noexcept nogil:
    return ((<uint32_t>p[0]) << 24) | ((<uint32_t>p[1]) << 16) | ((<uint32_t>p[2]) << 8) | (<uint32_t>p[3])


cdef inline uint64_t _be64(const unsigned char* p) noexcept nogil:
    return ((<uint64_t>_be32(p)) << 32) | (<uint64_t>_be32(p + 4))


cdef inline void _put32(unsigned char* p, uint32_t v) noexcept nogil:
    p[0] = <unsigned char>(v >> 24)
    p[1] = <unsigned char>(v >> 16)
    p[2] = <unsigned char>(v >> 8)
    p[3] = <unsigned char>v


cdef inline void _put64(unsigned char* p, uint64_t v) noexcept nogil:
    _put32(p, <uint32_t>(v >> 32))
    _put32(p + 4, <uint32_t>v)


cdef int _check_common(const unsigned char* p) except -1:
    """Magic, then version: the checks (and messages) of the twin, in its order."""
    if p[0] != 0x44 or p[1] != 0x58:  # "DX"
        raise RemoteProtocolError("bad magic: not a dxa frame")
    if p[2] != 1:
        raise RemoteProtocolError(f"unsupported frame version {p[2]}")
    return 0


cdef tuple _prefix(const unsigned char* p):
    _check_common(p)
    return (p[3], _be32(p + 4))


cdef tuple _header(const unsigned char* p):
    _check_common(p)
    if p[3] != 0x10:
        raise RemoteProtocolError("not a DATA frame")
    cdef uint32_t length = _be32(p + 4)
    cdef unsigned int flags = p[8]
    cdef uint32_t rsvd = ((<uint32_t>p[9]) << 16) | ((<uint32_t>p[10]) << 8) | (<uint32_t>p[11])
    cdef uint32_t fid = _be32(p + 20)
    cdef uint32_t chunk = _be32(p + 24)
    cdef uint64_t off = _be64(p + 28)
    cdef uint32_t plen = _be32(p + 36)
    sid = PyBytes_FromStringAndSize(<const char*>p + 12, 8)
    nonce = PyBytes_FromStringAndSize(<const char*>p + 40, 12)
    digest = PyBytes_FromStringAndSize(<const char*>p + 52, 32)
    return (flags, rsvd, sid, fid, chunk, off, plen, nonce, digest, length)


cdef object _short_buffer(Py_ssize_t need, Py_ssize_t have):
    # len() said enough but the raw buffer is shorter (a memoryview whose items are
    # wider than one byte): struct.unpack_from raises struct.error there.
    return _StructError(
        f"unpack_from requires a buffer of at least {need} bytes for unpacking {need} "
        f"bytes at offset 0 (actual buffer size is {have})"
    )


def parse_prefix(buf):
    """Return (frame type, body length) of an 8-byte prefix; check magic and version."""
    cdef Py_buffer view
    if PyBytes_CheckExact(buf):
        if PyBytes_GET_SIZE(buf) < _PREFIX_LEN:
            raise RemoteProtocolError("truncated frame prefix")
        return _prefix(<const unsigned char*>PyBytes_AS_STRING(buf))
    if len(buf) < _PREFIX_LEN:
        raise RemoteProtocolError("truncated frame prefix")
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        if view.len < _PREFIX_LEN:
            raise _short_buffer(_PREFIX_LEN, view.len)
        return _prefix(<const unsigned char*>view.buf)
    finally:
        PyBuffer_Release(&view)


def parse_data_header(buf):
    """(flags, reserved, session_id, file_id, chunk, offset, plain_len, nonce, digest, length)."""
    cdef Py_buffer view
    if PyBytes_CheckExact(buf):
        if PyBytes_GET_SIZE(buf) < _HEADER_LEN:
            raise RemoteProtocolError("truncated DATA header")
        return _header(<const unsigned char*>PyBytes_AS_STRING(buf))
    if len(buf) < _HEADER_LEN:
        raise RemoteProtocolError("truncated DATA header")
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        if view.len < _HEADER_LEN:
            raise _short_buffer(_HEADER_LEN, view.len)
        return _header(<const unsigned char*>view.buf)
    finally:
        PyBuffer_Release(&view)


cdef uint64_t _uint(object v, uint64_t maxv, str what) except? 0xFFFFFFFFFFFFFFFF:
    """An unsigned field the way struct.pack takes it: int or __index__, else struct.error.

    Out of range is struct.error, except (as in CPython's struct) for a 64-bit
    field given a non-int with __index__, where the OverflowError goes through.
    """
    cdef unsigned long long x
    cdef bint is_int = PyLong_Check(v)
    if not is_int:
        if not PyIndex_Check(v):
            raise _StructError("required argument is not an integer")
        v = PyNumber_Index(v)
    x = _as_ull(v)
    if x == <unsigned long long>-1 and PyErr_Occurred() != NULL:
        # negative or wider than 64 bits
        PyErr_Clear()
        if maxv == 0xFFFFFFFFFFFFFFFF:
            if not is_int:
                if v < 0:
                    raise OverflowError("can't convert negative int to unsigned")
                raise OverflowError("int too big to convert")
            raise _StructError("int too large to convert")
        raise _StructError("argument out of range")
    if x > maxv:
        raise _StructError(f"{what} format requires 0 <= number <= {maxv}")
    return x


cdef inline int _put_bytes(unsigned char* dst, object v, Py_ssize_t n) except -1:
    """An ``Ns`` field as struct.pack takes it: bytes or bytearray, cut or zero-padded to n."""
    cdef Py_ssize_t have
    cdef const char* src
    if PyBytes_Check(v):
        have = PyBytes_GET_SIZE(v)
        src = PyBytes_AS_STRING(v)
    elif PyByteArray_Check(v):
        have = PyByteArray_GET_SIZE(v)
        src = PyByteArray_AS_STRING(v)
    else:
        raise _StructError("argument for 's' must be a bytes object")
    if have >= n:
        memcpy(dst, src, n)
    else:  # only reachable through a subclass whose len() lies
        memcpy(dst, src, have)
        memset(dst + have, 0, n - have)
    return 0


def pack_data_header(flags, session_id, file_id, chunk, offset, plain_len, nonce, digest, length):
    """84 bytes: prefix (type DATA, ``length``) followed by the DATA header fields."""
    if len(session_id) != 8 or len(nonce) != 12 or len(digest) != 32:
        raise ValueError("session_id, nonce and digest must be 8, 12 and 32 bytes")
    # Same order as the twin's struct.pack, so the first bad field is the one reported.
    cdef uint64_t c_length = _uint(length, 0xFFFFFFFF, "'I'")
    cdef uint64_t c_flags = _uint(flags, 0xFF, "ubyte")
    if not (PyBytes_Check(session_id) or PyByteArray_Check(session_id)):
        raise _StructError("argument for 's' must be a bytes object")
    cdef uint64_t c_fid = _uint(file_id, 0xFFFFFFFF, "'I'")
    cdef uint64_t c_chunk = _uint(chunk, 0xFFFFFFFF, "'I'")
    cdef uint64_t c_off = _uint(offset, 0xFFFFFFFFFFFFFFFF, "'Q'")
    cdef uint64_t c_plen = _uint(plain_len, 0xFFFFFFFF, "'I'")
    if not (PyBytes_Check(nonce) or PyByteArray_Check(nonce)):
        raise _StructError("argument for 's' must be a bytes object")
    if not (PyBytes_Check(digest) or PyByteArray_Check(digest)):
        raise _StructError("argument for 's' must be a bytes object")

    out = PyBytes_FromStringAndSize(NULL, _HEADER_LEN)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(out)
    p[0] = 0x44
    p[1] = 0x58
    p[2] = 1
    p[3] = 0x10
    _put32(p + 4, <uint32_t>c_length)
    p[8] = <unsigned char>c_flags
    p[9] = 0
    p[10] = 0
    p[11] = 0
    # _put_bytes reads the real size again: an __index__ call above may have run code.
    _put_bytes(p + 12, session_id, 8)
    _put32(p + 20, <uint32_t>c_fid)
    _put32(p + 24, <uint32_t>c_chunk)
    _put64(p + 28, c_off)
    _put32(p + 36, <uint32_t>c_plen)
    _put_bytes(p + 40, nonce, 12)
    _put_bytes(p + 52, digest, 32)
    return out
