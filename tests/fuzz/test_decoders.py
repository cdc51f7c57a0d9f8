"""Hypothesis fuzz of every wire decoder on hostile input (docs/PROTOCOL.md §2-§4).

Contract: on bytes from the network a decoder returns a value or raises
RemoteProtocolError (Opener: or IntegrityError).  Anything else -- KeyError,
TypeError, struct.error, msgpack exceptions, MemoryError, RecursionError, a bare
ValueError -- is a bug.  ``hostile()`` lets only the allowed errors through, so
any other exception fails the test and Hypothesis shrinks it.

Two kinds of input: unstructured bytes, and structurally valid frames/messages
that are then mutated (bit flips, byte sets, truncation, extension, insertion,
deletion; for msgpack bodies also field-level replace/delete/add at any depth).

Budget: the whole module runs in well under 30 s on 2 shared cores (DXA_FUZZ_SCALE=N
multiplies every max_examples for a longer campaign).
"""

from __future__ import annotations

import os
import struct

import blake3
import msgpack
import pytest
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent.errors import IntegrityError, RemoteProtocolError
from agent.wire import (
    ACTION_REFUSE,
    ACTION_RESUME,
    ACTION_SEND,
    ACTION_SKIP,
    CIPHERS,
    CONTROL_MAX,
    DATA_HEADER_LEN,
    FLAG_COMPRESSED,
    KIND_DIR,
    KIND_FILE,
    KIND_LINK,
    PREFIX_LEN,
    TAG_LEN,
    Ack,
    Done,
    ErrorMsg,
    FileDone,
    FileEnd,
    FrameDecoder,
    FrameType,
    Hello,
    Join,
    Joined,
    Manifest,
    ManifestEntry,
    Nak,
    Opener,
    Plan,
    PlanEntry,
    Sealer,
    Summary,
    Welcome,
    check_prefix,
    chunk_digest,
    decode_control,
    decode_data_header,
    decode_message,
    encode_data_header,
    encode_frame,
    encode_message,
)

# DXA_FUZZ_SCALE=20 for a longer campaign; the default keeps the suite to ~10-15 s.
SCALE = max(1, int(os.environ.get("DXA_FUZZ_SCALE", "1") or 1))
FUZZ = settings(
    deadline=None,
    max_examples=150 * SCALE,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
FEW = settings(FUZZ, max_examples=60 * SCALE)
MANY = settings(FUZZ, max_examples=300 * SCALE)

KEY = bytes(range(32))
SID = b"sessid01"
CONTROL_TYPES = [t for t in FrameType if t not in (FrameType.DATA, FrameType.FWD)]


def hostile(fn, *args, allowed: tuple[type[BaseException], ...] = (RemoteProtocolError,)):
    """Call ``fn``; return (result, None) or (None, allowed error).  Any other exception propagates."""
    try:
        return fn(*args), None
    except allowed as exc:
        return None, exc


# --------------------------------------------------------------------------- strategies

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u63 = st.integers(0, (1 << 63) - 1)
u64 = st.integers(0, (1 << 64) - 1)
i64 = st.integers(-(1 << 63), (1 << 64) - 1)  # everything msgpack can carry
text = st.text(max_size=12)


def fixed(n: int):
    return st.binary(min_size=n, max_size=n)


# Values a hostile peer would put in a msgpack field: boundaries, near-miss types and
# lengths, protocol words, arbitrary nested msgpack data.
BOUNDARY_INTS = [0, 1, -1, 2, 255, 256, 0xFFFF, 0x10000, 0xFFFFFFFF, 1 << 32, (1 << 63) - 1, 1 << 63,
                 (1 << 64) - 1, -(1 << 63), -(1 << 31)]
WORDS = ["", "f", "d", "l", "x", "send", "skip", "resume", "refuse", "push", "pull", "bench", "aes256gcm",
         "none", "zstd", "auto", "off", "\x00", "é"]
scalars = st.one_of(
    st.none(), st.booleans(), st.sampled_from(BOUNDARY_INTS), i64,
    st.floats(), st.sampled_from(WORDS), text,
    st.sampled_from([0, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 64]).map(bytes), st.binary(max_size=40),
)
msgpack_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(text, inner, max_size=4)),
    max_leaves=12,
)

manifest_entries = st.builds(
    ManifestEntry, u32, text, st.sampled_from([KIND_FILE, KIND_DIR, KIND_LINK]), u63, u32, i64,
    st.integers(1, 0xFFFFFFFF), text,
)
plan_entries = st.one_of(
    st.builds(PlanEntry, u32, st.sampled_from([ACTION_SEND, ACTION_SKIP, ACTION_RESUME]),
              st.lists(st.tuples(u32, fixed(32)), max_size=3)),
    st.builds(lambda f, r: PlanEntry(f, ACTION_REFUSE, [], r), u32, text),
)
pairs = st.lists(st.tuples(u32, u32), max_size=5)

MESSAGE_STRATEGIES = {
    FrameType.HELLO: st.builds(
        Hello, st.tuples(u8, u8), text, text, st.binary(max_size=12), st.binary(max_size=40),
        st.sampled_from(CIPHERS) | text, u16, u32, st.sampled_from(["auto", "off", "zstd"]) | text,
        st.booleans(), text, st.floats(allow_nan=False)),
    FrameType.WELCOME: st.builds(Welcome, u8, u16, u32, text),
    FrameType.ERROR: st.builds(ErrorMsg, text, text),
    FrameType.MANIFEST: st.builds(Manifest, st.lists(manifest_entries, max_size=4), st.booleans()),
    FrameType.PLAN: st.builds(Plan, st.lists(plan_entries, max_size=4)),
    FrameType.ACK: st.builds(Ack, pairs),
    FrameType.NAK: st.builds(Nak, pairs, text),
    FrameType.FILE_END: st.builds(FileEnd, u32, st.lists(fixed(32), max_size=3).map(b"".join)),
    FrameType.FILE_DONE: st.builds(FileDone, u32, st.booleans(), st.lists(u32, max_size=4), text),
    FrameType.DONE: st.just(Done()),
    FrameType.SUMMARY: st.builds(Summary, u64, u64, u64, st.lists(text, max_size=4)),
    FrameType.JOIN: st.builds(Join, fixed(8), u16, u32, fixed(16)),
    FrameType.JOINED: st.just(Joined()),
}
assert set(MESSAGE_STRATEGIES) == set(CONTROL_TYPES)
messages = st.sampled_from(CONTROL_TYPES).flatmap(lambda t: MESSAGE_STRATEGIES[t])


def mutate_bytes(draw, data: bytes, max_ops: int = 4) -> bytes:
    """Flip / set / truncate / extend / insert / delete, 1..max_ops times."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "extend", "insert", "delete"]))
        if op == "flip" and buf:
            i = draw(st.integers(0, len(buf) - 1))
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and buf:
            buf[draw(st.integers(0, len(buf) - 1))] = draw(u8)
        elif op == "truncate":
            del buf[draw(st.integers(0, len(buf))):]
        elif op == "extend":
            buf += draw(st.binary(min_size=1, max_size=24))
        elif op == "insert":
            i = draw(st.integers(0, len(buf)))
            buf[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and buf:
            i = draw(st.integers(0, len(buf) - 1))
            del buf[i : i + draw(st.integers(1, 8))]
    return bytes(buf)


def mutate_value(draw, v, depth: int = 0):
    """Replace / delete / add somewhere inside a msgpack-shaped value."""
    ops = ["replace"]
    if isinstance(v, dict) and depth < 4:
        ops += ["add"] + (["descend", "descend", "delete"] if v else [])
    if isinstance(v, list) and depth < 4:
        ops += ["add", "truncate"] + (["descend", "descend", "delete"] if v else [])
    op = draw(st.sampled_from(ops))
    if op == "replace":
        return draw(msgpack_values)
    if isinstance(v, dict):
        v = dict(v)
        if op == "add":
            v[draw(text | st.sampled_from(sorted(v) or ["x"]))] = draw(msgpack_values)
        else:
            k = draw(st.sampled_from(sorted(v)))
            if op == "delete":
                del v[k]
            else:
                v[k] = mutate_value(draw, v[k], depth + 1)
        return v
    v = list(v)
    if op == "add":
        v.insert(draw(st.integers(0, len(v))), draw(msgpack_values))
    elif op == "truncate":
        del v[draw(st.integers(0, len(v))):]
    else:
        i = draw(st.integers(0, len(v) - 1))
        if op == "delete":
            del v[i]
        else:
            v[i] = mutate_value(draw, v[i], depth + 1)
    return v


def fields_of(msg) -> dict:
    return msgpack.unpackb(encode_message(msg)[PREFIX_LEN:], raw=False)


def assert_stable(ftype, msg) -> None:
    """Whatever a decoder accepts, it accepts again after our own re-encoding (and equal)."""
    frame = encode_message(msg)
    assert check_prefix(frame[:PREFIX_LEN], CONTROL_MAX) == (ftype, len(frame) - PREFIX_LEN)
    again = decode_message(ftype, frame[PREFIX_LEN:])
    assert repr(again) == repr(msg)  # repr: a NaN bench_seconds is not == itself


def check_decoded_message(ftype, body: bytes) -> None:
    msg, err = hostile(decode_message, ftype, body)
    if err is None:
        assert ftype != FrameType.DATA
        assert_stable(ftype, msg)


# --------------------------------------------------------------------------- check_prefix


@MANY
@given(st.binary(max_size=16), st.sampled_from([0, 1, 100, CONTROL_MAX, 0xFFFFFFFF]))
@example(b"DX\x01\x01\xff\xff\xff\xff", CONTROL_MAX)
@example(b"DX\x02\x01\x00\x00\x00\x00", CONTROL_MAX)
@example(b"DX\x01\x99\x00\x00\x00\x00", CONTROL_MAX)
def test_check_prefix_random(buf, limit):
    got, err = hostile(check_prefix, buf, limit)
    if err is None:
        ftype, length = got
        assert isinstance(ftype, FrameType) and 0 <= length <= limit
        assert buf[:PREFIX_LEN] == struct.pack(">2sBBI", b"DX", 1, ftype, length)


@MANY
@given(st.sampled_from([b"DX", b"XD", b"D\0"]), st.sampled_from([0, 1, 2, 255]), u8, u32,
       st.sampled_from([0, 1, 1000, CONTROL_MAX]))
def test_check_prefix_fields(magic, version, ftype, length, limit):
    buf = struct.pack(">2sBBI", magic, version, ftype, length)
    got, err = hostile(check_prefix, buf, limit)
    valid = magic == b"DX" and version == 1 and ftype in set(FrameType) and length <= limit
    assert (err is None) == valid
    if valid:
        assert got == (FrameType(ftype), length)


# --------------------------------------------------------------------------- FrameDecoder

# A stream segment: a valid frame, a prefix with hostile fields, or noise.
valid_frames = st.builds(lambda t, body: encode_frame(t, body), st.sampled_from(list(FrameType)),
                         st.binary(max_size=40))
message_frames = messages.map(encode_message)
odd_prefixes = st.builds(lambda m, v, t, n: struct.pack(">2sBBI", m, v, t, n),
                         st.sampled_from([b"DX", b"DX", b"DX", b"XD"]), st.sampled_from([1, 1, 1, 0, 2]),
                         st.sampled_from([int(t) for t in FrameType] + [0, 0x0C, 0x22, 0xFF]),
                         st.sampled_from([0, 1, 5, 64, 200, CONTROL_MAX, CONTROL_MAX + 1, 0xFFFFFFFF]))
segments = st.one_of(valid_frames, valid_frames, message_frames, odd_prefixes, st.binary(max_size=12))
streams = st.lists(segments, max_size=6).map(b"".join)


def run_decoder(pieces, limit: int):
    """Feed ``pieces`` one by one, collecting frames; stop at the first (allowed) error."""
    dec = FrameDecoder(limit)
    frames: list = []
    for piece in pieces:
        dec.feed(piece)
        try:
            for f in dec.frames():
                frames.append(f)
        except RemoteProtocolError as exc:
            return frames, (type(exc), str(exc)), None
    return frames, None, dec.buffered


def reference(data: bytes, limit: int):
    """The same split, written as plainly as possible."""
    frames, i = [], 0
    while len(data) - i >= PREFIX_LEN:
        try:
            ftype, n = check_prefix(data[i : i + PREFIX_LEN], limit)
        except RemoteProtocolError as exc:
            return frames, (type(exc), str(exc)), None
        if len(data) - i - PREFIX_LEN < n:
            return frames, None, len(data) - i - PREFIX_LEN
        frames.append((ftype, data[i + PREFIX_LEN : i + PREFIX_LEN + n]))
        i += PREFIX_LEN + n
    return frames, None, len(data) - i


@MANY
@given(streams, st.sampled_from([0, 16, 64, CONTROL_MAX]), st.data())
def test_frame_decoder_split_invariance(data, limit, draw):
    whole = run_decoder([data], limit)
    one_by_one = run_decoder([data[i : i + 1] for i in range(len(data))], limit)
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(data)), max_size=8)))
    bounds = [0, *cuts, len(data)]
    random_split = run_decoder([data[a:b] for a, b in zip(bounds, bounds[1:])], limit)  # may feed b""
    assert whole == one_by_one == random_split
    assert whole == reference(data, limit)
    frames, err, buffered = whole
    for ftype, body in frames:
        assert isinstance(ftype, FrameType) and isinstance(body, bytes) and len(body) <= limit


@FUZZ
@given(st.lists(message_frames, min_size=1, max_size=4).map(b"".join), st.data())
def test_frame_decoder_mutated_stream_then_decode(data, draw):
    """Valid control frames, mutated; whatever comes out goes through decode_message."""
    bad = mutate_bytes(draw.draw, data)
    frames, err, _ = run_decoder([bad], CONTROL_MAX)
    assert (frames, err) == run_decoder([bad[i : i + 1] for i in range(len(bad))], CONTROL_MAX)[:2]
    for ftype, body in frames:
        check_decoded_message(ftype, body)


# --------------------------------------------------------------------------- decode_control


@MANY
@given(st.binary(max_size=64))
@example(b"\xc1")
@example(b"\xdf\xff\xff\xff\xff")
@example(b"\x91" * 1024 + b"\xc0")
@example(b"\x91" * 1025 + b"\xc0")
@example(b"\x81\xa1k\x91" + b"\x91" * 1100 + b"\xc0")
@example(b"\xd6\xff\xff\xff\xff\xff")  # timestamp ext out of range
@example(b"\xc7\x0c\xff" + b"\xff" * 12)
def test_decode_control_random_bytes(body):
    obj, err = hostile(decode_control, body)
    if err is None:
        assert isinstance(obj, dict) and all(isinstance(k, str) for k in obj)


@MANY
@given(msgpack_values, st.booleans())
def test_decode_control_random_objects(obj, bin_type):
    body = msgpack.packb(obj, use_bin_type=bin_type)
    got, err = hostile(decode_control, body)
    if err is None:
        assert isinstance(got, dict) and all(isinstance(k, str) for k in got)


# --------------------------------------------------------------------------- decode_message


@MANY
@given(messages)
def test_valid_messages_round_trip(msg):
    frame = encode_message(msg)
    ftype, n = check_prefix(frame[:PREFIX_LEN], CONTROL_MAX)
    assert n == len(frame) - PREFIX_LEN
    assert decode_message(ftype, frame[PREFIX_LEN:]) == msg


@FUZZ
@given(st.sampled_from(list(FrameType)), st.binary(max_size=64) | msgpack_values.map(msgpack.packb))
def test_decode_message_random_bodies(ftype, body):
    check_decoded_message(ftype, body)


@pytest.mark.parametrize("ftype", CONTROL_TYPES, ids=lambda t: t.name)
@FEW
@given(st.data())
def test_decode_message_random_maps(ftype, data):
    """Maps with the right key names and arbitrary values (so decoding gets past the first key)."""
    keys = sorted(fields_of(data.draw(MESSAGE_STRATEGIES[ftype])))
    d = data.draw(st.fixed_dictionaries({}, optional={k: msgpack_values for k in keys}))
    check_decoded_message(ftype, msgpack.packb(d, use_bin_type=data.draw(st.booleans())))


@pytest.mark.parametrize("ftype", CONTROL_TYPES, ids=lambda t: t.name)
@FEW
@given(st.data())
def test_decode_message_mutated_fields(ftype, data):
    """A valid message with one to three field-level mutations at any depth."""
    v = fields_of(data.draw(MESSAGE_STRATEGIES[ftype]))
    for _ in range(data.draw(st.integers(1, 3))):
        v = mutate_value(data.draw, v)
    target = data.draw(st.sampled_from([ftype, ftype, *CONTROL_TYPES]))
    check_decoded_message(target, msgpack.packb(v, use_bin_type=True))


@FUZZ
@given(messages, st.data())
def test_decode_message_mutated_bytes(msg, data):
    frame = encode_message(msg)
    body = mutate_bytes(data.draw, frame[PREFIX_LEN:])
    check_decoded_message(data.draw(st.sampled_from([frame[3], frame[3], *CONTROL_TYPES])), body)


def _map_with_raw(d: dict, key: str, raw: bytes) -> bytes:
    """msgpack map ``d`` whose value for ``key`` is the raw msgpack ``raw``."""
    items = dict(d, **{key: None})
    out = b"\xde" + struct.pack(">H", len(items))
    for k, v in items.items():
        out += msgpack.packb(k) + (raw if k == key else msgpack.packb(v, use_bin_type=True))
    return out


@pytest.mark.parametrize("depth", [998, 1021, 1030])
@pytest.mark.parametrize("ftype", CONTROL_TYPES, ids=lambda t: t.name)
def test_decode_message_deep_nesting(ftype, depth):
    """A ~1000-deep list in every field, top level and one level down (RecursionError hunt)."""
    deep = b"\x91" * depth + b"\xc0"
    base = fields_of(_SAMPLES[ftype])
    for key in [*base, "unknown"]:
        check_decoded_message(ftype, _map_with_raw(base, key, deep))
        if isinstance(base.get(key), list):
            check_decoded_message(ftype, _map_with_raw(base, key, b"\x91" + deep))
            check_decoded_message(ftype, _map_with_raw(base, key, b"\x92\x91" + deep + b"\xc0"))


_SAMPLES = {
    FrameType.HELLO: Hello((1, 1), "push", "p", SID, KEY, "aes256gcm", 4, 1 << 20, "auto"),
    FrameType.WELCOME: Welcome(1, 4, 1 << 20),
    FrameType.ERROR: ErrorMsg("c", "m"),
    FrameType.MANIFEST: Manifest([ManifestEntry(0, "a", KIND_FILE, 1, 0, 0, 1)], True),
    FrameType.PLAN: Plan([PlanEntry(0, ACTION_RESUME, [(0, bytes(32))])]),
    FrameType.ACK: Ack([(1, 2)]),
    FrameType.NAK: Nak([(1, 2)], "r"),
    FrameType.FILE_END: FileEnd(1, bytes(32)),
    FrameType.FILE_DONE: FileDone(1, False, [1], "e"),
    FrameType.DONE: Done(),
    FrameType.SUMMARY: Summary(1, 1, 1, ["e"]),
    FrameType.JOIN: Join(SID, 1, 1, bytes(16)),
    FrameType.JOINED: Joined(),
}


# --------------------------------------------------------------------------- decode_data_header

header_fields = st.fixed_dictionaries({
    "flags": st.integers(0, 3), "session_id": fixed(8), "file_id": u32, "chunk": u32, "offset": u64,
    "plain_len": u32, "nonce": fixed(12), "digest": fixed(32),
    "payload_len": st.integers(0, 0xFFFFFFFF - (DATA_HEADER_LEN - PREFIX_LEN) - TAG_LEN),
})


def check_data_header(buf: bytes) -> None:
    hdr, err = hostile(decode_data_header, buf)
    if err is None:
        assert len(buf) >= DATA_HEADER_LEN
        assert hdr.flags & ~3 == 0 and hdr.payload_len >= 0
        assert len(hdr.session_id) == 8 and len(hdr.nonce) == 12 and len(hdr.digest) == 32
        # everything the decoder accepted is exactly what the encoder would produce
        again = encode_data_header(hdr.flags, hdr.session_id, hdr.file_id, hdr.chunk, hdr.offset, hdr.plain_len,
                                   hdr.nonce, hdr.digest, hdr.payload_len)
        assert again == bytes(buf[:DATA_HEADER_LEN])


@MANY
@given(st.binary(max_size=100) | st.binary(min_size=84, max_size=100).map(lambda b: b"DX\x01\x10" + b[4:]))
def test_decode_data_header_random(buf):
    check_data_header(buf)


@MANY
@given(header_fields, st.data())
def test_decode_data_header_mutated(fields, data):
    raw = encode_data_header(**fields)
    assert decode_data_header(raw).payload_len == fields["payload_len"]
    check_data_header(mutate_bytes(data.draw, raw, max_ops=2))


@FUZZ
@given(u8, st.binary(min_size=3, max_size=3), u32)
def test_decode_data_header_flags_reserved_length(flags, rsvd, length):
    raw = bytearray(encode_data_header(0, SID, 0, 0, 0, 0, bytes(12), bytes(32), 0))
    raw[8], raw[9:12], raw[4:8] = flags, rsvd, length.to_bytes(4, "big")
    hdr, err = hostile(decode_data_header, bytes(raw))
    ok = flags & ~3 == 0 and rsvd == b"\0\0\0" and length >= DATA_HEADER_LEN - PREFIX_LEN + TAG_LEN
    assert (err is None) == ok


# --------------------------------------------------------------------------- Opener

OPEN_ERRORS = (RemoteProtocolError, IntegrityError)


def open_frame(opener: Opener, frame: bytes):
    header = frame[:DATA_HEADER_LEN]
    hdr = decode_data_header(header)
    return opener.open(hdr, header, memoryview(frame)[DATA_HEADER_LEN:])


plaintexts = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda b, k: b * k, st.binary(min_size=1, max_size=8), st.integers(0, 200)),  # compressible
)
ciphers = st.sampled_from(CIPHERS)


@MANY
@given(ciphers, st.sampled_from([SID, b"\0" * 8]), st.integers(0, 255), st.binary(min_size=76, max_size=76),
       st.binary(max_size=120))
def test_opener_random_frames(cipher, sid, flags, rest, tail):
    """A random header (right magic/type, our session half the time) and a random payload+tag."""
    header = bytearray(b"DX\x01\x10" + rest[:4] + bytes([flags]) + rest[5:8] + sid + rest[16:])
    # half of the time: a consistent length, so the opener gets past the size check
    if flags & 0x80:
        header[4:8] = (DATA_HEADER_LEN - PREFIX_LEN + len(tail)).to_bytes(4, "big")
    header[8] &= 0x03 if flags & 0x40 else 0xFF
    header[9:12] = b"\0\0\0" if flags & 0x20 else header[9:12]
    frame = bytes(header) + tail
    hostile(open_frame, Opener(KEY, SID, cipher), frame, allowed=OPEN_ERRORS)


@MANY
@given(ciphers, st.sampled_from(["off", "zstd", "auto"]), plaintexts, st.data())
def test_opener_mutated_sealed_frames(cipher, compress, plain, data):
    """Valid sealed frames, mutated anywhere: never open to anything but the sealed plaintext."""
    frame = bytes(Sealer(KEY, SID, cipher).seal(1, 2, 3, plain, chunk_digest(plain), compress).frame)
    assert open_frame(Opener(KEY, SID, cipher), frame) == plain
    bad = mutate_bytes(data.draw, frame)
    out, err = hostile(open_frame, Opener(KEY, SID, cipher), bad, allowed=OPEN_ERRORS)
    if err is None:
        assert bytes(out) == plain


def _zstd_payloads(n: int):
    """Payloads a relay might substitute: noise, or a zstd frame header with a hostile content size."""
    fhd = st.integers(0, 255)
    zstd = st.builds(lambda d, size, rest: (b"\x28\xb5\x2f\xfd" + bytes([d]) + size + rest)[:n].ljust(n, b"\0"),
                     fhd, st.binary(min_size=0, max_size=8) | st.sampled_from(
                         [struct.pack("<Q", 1 << 40), struct.pack("<Q", 1 << 62), struct.pack("<Q", 300 << 20),
                          struct.pack("<I", 0xFFFFFFFF), b"\xff" * 8]),
                     st.binary(max_size=64))
    return st.one_of(fixed(n), zstd)


@FUZZ
@given(st.sampled_from(["off", "zstd"]), plaintexts.filter(lambda p: len(p) >= 16), st.data())
def test_opener_unencrypted_payload_substitution(compress, plain, data):
    """--no-encrypt: the keyed tag covers only the header, so a relay can swap the payload
    (same length).  The opener must refuse it (IntegrityError) without a big allocation, or
    return exactly the sealed plaintext."""
    frame = bytes(Sealer(KEY, SID, "none").seal(1, 2, 3, plain, chunk_digest(plain), compress).frame)
    n = len(frame) - DATA_HEADER_LEN - TAG_LEN
    payload = data.draw(_zstd_payloads(n))
    bad = frame[:DATA_HEADER_LEN] + payload + frame[-TAG_LEN:]
    out, err = hostile(open_frame, Opener(KEY, SID, "none"), bad, allowed=(IntegrityError,))
    if err is None:
        assert bytes(out) == plain


@FUZZ
@given(st.sampled_from(["aes256gcm", "chacha20poly1305", "none"]), st.integers(0, 3), st.integers(0, 600),
       st.binary(max_size=200) | plaintexts.map(lambda p: zstandard.ZstdCompressor(
           write_content_size=True).compress(p)) | plaintexts.map(lambda p: zstandard.ZstdCompressor(
               write_content_size=False).compress(p)))
def test_opener_hostile_key_holder(cipher, flags, plain_len, body):
    """A peer that holds the key seals arbitrary bodies under arbitrary (consistent-size) headers.
    plain_len is bounded as the receiver's header check bounds it (≤ chunk size) before open."""
    flags = (flags & FLAG_COMPRESSED) | (0 if cipher == "none" else 1)
    nonce = bytes(12)
    header = encode_data_header(flags, SID, 0, 0, 0, plain_len, nonce, chunk_digest(b"x" * plain_len), len(body))
    if cipher == "none":
        frame = header + body + blake3.blake3(header, key=KEY).digest(TAG_LEN)
    else:
        aead = AESGCM(KEY) if cipher == "aes256gcm" else ChaCha20Poly1305(KEY)
        frame = header + aead.encrypt(nonce, body, header)
    out, err = hostile(open_frame, Opener(KEY, SID, cipher), frame, allowed=(IntegrityError,))
    if err is None:
        assert bytes(out) == b"x" * plain_len

