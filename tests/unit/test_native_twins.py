"""The compiled modules (native/*.pyx) and their pure-Python twins agree on every input.

Same return values, same exception types (and, for RemoteProtocolError, ValueError
and IndexError, the same message / args).  The compiled modules are imported
directly, so this runs whatever DXA_NO_EXTENSIONS says; it skips when they are
not built.
"""

from __future__ import annotations

import copy
import pickle
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent._native import _chunkmap_py, _frames_py
from agent.errors import RemoteProtocolError

_frames = pytest.importorskip("agent._native._frames")
_chunkmap = pytest.importorskip("agent._native._chunkmap")

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

U8, U32, U64 = 0xFF, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF


def outcome(fn, *args):
    """('ok', value) or ('err', type, detail): what a twin did with ``args``."""
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # noqa: BLE001 - comparing whatever is raised
        if isinstance(exc, (RemoteProtocolError, ValueError, IndexError)) and not isinstance(exc, struct.error):
            return ("err", type(exc), exc.args)
        return ("err", type(exc))  # TypeError, struct.error, BufferError: type only


def same(name, native_mod, py_mod, *args):
    got, want = outcome(getattr(native_mod, name), *args), outcome(getattr(py_mod, name), *args)
    assert got == want, (name, args, got, want)
    return got


# ---------------------------------------------------------------- frames

def valid_header(draw_fields):
    return _frames_py.pack_data_header(*draw_fields)


header_fields = st.tuples(
    st.integers(0, U8),
    st.binary(min_size=8, max_size=8),
    st.integers(0, U32),
    st.integers(0, U32),
    st.integers(0, U64),
    st.integers(0, U32),
    st.binary(min_size=12, max_size=12),
    st.binary(min_size=32, max_size=32),
    st.integers(0, U32),
)


@st.composite
def frame_bytes(draw):
    """Random bytes, or a valid header that was cut, extended, or had a byte changed."""
    kind = draw(st.sampled_from(["random", "valid", "mutated", "cut"]))
    if kind == "random":
        data = draw(st.binary(max_size=120))
        if draw(st.booleans()) and len(data) >= 2:  # reach the version/type checks
            data = b"DX" + data[2:]
        return data
    data = valid_header(draw(header_fields)) + draw(st.binary(max_size=16))
    if kind == "mutated":
        pos = draw(st.integers(0, 15))
        data = data[:pos] + bytes([draw(st.integers(0, 255))]) + data[pos + 1:]
    elif kind == "cut":
        data = data[: draw(st.integers(0, 84))]
    return data


def wrappings(data: bytes):
    """Every bytes-like shape the callers hand in."""
    return [data, bytearray(data), memoryview(data), memoryview(b"pad" + data)[3:], memoryview(bytearray(data))]


@FAST
@given(frame_bytes())
def test_parse_prefix_agrees(data):
    for buf in wrappings(data):
        same("parse_prefix", _frames, _frames_py, buf)


@FAST
@given(frame_bytes())
def test_parse_data_header_agrees(data):
    for buf in wrappings(data):
        same("parse_data_header", _frames, _frames_py, buf)


@FAST
@given(header_fields)
def test_pack_parse_round_trip(fields):
    native = _frames.pack_data_header(*fields)
    assert native == _frames_py.pack_data_header(*fields)
    flags, sid, fid, chunk, off, plen, nonce, digest, length = fields
    expect = (flags, 0, sid, fid, chunk, off, plen, nonce, digest, length)
    assert _frames.parse_data_header(native) == expect
    assert _frames_py.parse_data_header(native) == expect
    assert _frames.parse_prefix(native) == (0x10, length) == _frames_py.parse_prefix(native)
    # bytearray fields are accepted like struct accepts them
    args = (flags, bytearray(sid), fid, chunk, off, plen, bytearray(nonce), digest, length)
    assert _frames.pack_data_header(*args) == native


def odd_int(limit):
    return st.one_of(
        st.integers(0, limit),
        st.integers(-(2**70), -1),
        st.integers(limit + 1, 2**70),
        st.sampled_from([True, False, 1.0, 0.5, "7", None]),
    )


def odd_bytes(size):
    return st.one_of(
        st.binary(min_size=size, max_size=size),
        st.binary(max_size=40),
        st.binary(min_size=size, max_size=size).map(bytearray),
        st.binary(min_size=size, max_size=size).map(memoryview),
        st.sampled_from(["x" * size, None, 5, [0] * size]),
    )


@FAST
@given(
    st.tuples(
        odd_int(U8), odd_bytes(8), odd_int(U32), odd_int(U32), odd_int(U64), odd_int(U32),
        odd_bytes(12), odd_bytes(32), odd_int(U32),
    )
)
def test_pack_data_header_errors_agree(fields):
    same("pack_data_header", _frames, _frames_py, *fields)


class _Index:
    def __init__(self, v):
        self.v = v

    def __index__(self):
        return self.v


def test_frames_edge_cases():
    hdr = _frames_py.pack_data_header(1, b"s" * 8, 2, 3, 4, 5, b"n" * 12, b"d" * 32, 6)
    odd = [
        None, "DX\x01\x10aaaa", 12345, memoryview(hdr)[::2], memoryview(hdr * 2)[::2],
        memoryview(hdr).cast("I"), memoryview(hdr[:8]).cast("I"), memoryview(b"x").cast("B", ()),
        memoryview(hdr).cast("b"),
    ]
    for buf in odd:
        same("parse_prefix", _frames, _frames_py, buf)
        same("parse_data_header", _frames, _frames_py, buf)
    # __index__ objects are taken like struct takes them
    args = (_Index(1), b"s" * 8, _Index(2), 3, _Index(4), 5, b"n" * 12, b"d" * 32, _Index(6))
    assert same("pack_data_header", _frames, _frames_py, *args) == ("ok", hdr)
    for bad in (_Index(-1), _Index(2**64)):
        same("pack_data_header", _frames, _frames_py, 1, b"s" * 8, 2, 3, bad, 5, b"n" * 12, b"d" * 32, 6)


# ---------------------------------------------------------------- chunk map

def index_for(n):
    return st.one_of(
        st.integers(-3, n + 3),
        st.integers(0, max(n - 1, 0)),
        st.sampled_from([2**63, -(2**63) - 1, 10**30, True, False, 1.0, 0.5, -1.0, float(n), _Index(0)]),
    )


@st.composite
def chunkmap_program(draw):
    n = draw(st.one_of(st.integers(0, 70), st.integers(0, 700), st.sampled_from([1, 7, 8, 9, 63, 64, 65, 512])))
    ops = draw(
        st.lists(
            st.one_of(
                st.tuples(st.sampled_from(["add", "discard", "contains"]), index_for(n)),
                st.tuples(st.sampled_from(["missing", "count", "to_bytes", "complete", "len", "copy"]), st.none()),
                st.tuples(st.just("fill"), st.integers(0, 3)),
            ),
            max_size=80,
        )
    )
    return n, ops


def run(impl, op, arg, state):
    m = state["m"]
    if op == "add":
        return m.add(arg)
    if op == "discard":
        return m.discard(arg)
    if op == "contains":
        return arg in m
    if op == "missing":
        return m.missing()
    if op == "count":
        return m.count
    if op == "to_bytes":
        return m.to_bytes()
    if op == "complete":
        return m.complete()
    if op == "len":
        return len(m)
    if op == "copy":
        state["m"] = copy.deepcopy(m)
        return (state["m"].count, state["m"].to_bytes())
    if op == "fill":  # mark every chunk except those with index % 4 == arg
        return [m.add(i) for i in range(len(m)) if i % 4 != arg]
    raise AssertionError(op)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunkmap_program())
def test_chunkmap_programs_agree(program):
    n, ops = program
    native = {"m": _chunkmap.ChunkMap(n)}
    python = {"m": _chunkmap_py.ChunkMap(n)}
    for op, arg in ops:
        got = outcome(run, "native", op, arg, native)
        want = outcome(run, "python", op, arg, python)
        assert got == want, (n, op, arg, got, want)
    assert native["m"].missing() == python["m"].missing()
    assert native["m"].to_bytes() == python["m"].to_bytes()


@FAST
@given(st.one_of(st.integers(-(2**70), 5000), st.sampled_from([2**62, 2**70, 2.0, -1.0, "3", None, True])))
def test_chunkmap_constructor_agrees(n):
    got = outcome(lambda v: _chunkmap.ChunkMap(v).missing(), n)
    want = outcome(lambda v: _chunkmap_py.ChunkMap(v).missing(), n)
    assert got == want


def test_chunkmap_large_and_pickle():
    n = 100_003
    a, b = _chunkmap.ChunkMap(n), _chunkmap_py.ChunkMap(n)
    for i in range(0, n, 1):
        if i % 97:
            assert a.add(i) == b.add(i)
    assert a.missing() == b.missing()
    assert a.count == b.count and a.to_bytes() == b.to_bytes()
    c = pickle.loads(pickle.dumps(a))
    assert type(c) is type(a) and c.count == a.count and c.missing() == a.missing()
    assert a.add(n - 1) == b.add(n - 1)
    assert a.missing() == b.missing()
    for i in b.missing():
        a.add(i)
        b.add(i)
    assert a.complete() and b.complete() and a.missing() == [] == b.missing()
    # __init__ again resets, as it does for the twin
    a.__init__(10)
    b.__init__(10)
    assert len(a) == len(b) == 10 and a.count == b.count == 0 and a.to_bytes() == b.to_bytes()
