"""Hypothesis fuzz of the sender and receiver cores on hostile input (docs/PROTOCOL.md, "Limits").

Contract: whatever a peer sends, the only exception that comes out of a core is
RemoteProtocolError (the receiver's give-up on a peer that keeps sending corrupt
chunks, docs/PROTOCOL.md §3, belongs to the integrity rule and is let through from
``chunk_rejected`` alone), and what a core holds stays within its limits: nothing is
allocated in proportion to a size the peer merely claims.

Input goes in as bytes through the real FrameDecoder and decoders (core_fuzz.py): the
same bytes whole, one byte at a time and cut at random; the three runs must agree.
Inputs: session scripts built from valid messages (so that the cores reach their deep
states: planned, receiving, FILE_END, DONE), the same mutated byte-wise or field-wise,
and raw noise.  DXA_FUZZ_SCALE=N multiplies every max_examples, as in test_decoders.py.
"""

from __future__ import annotations

import msgpack
import pytest
from core_fuzz import CoreDriver, assert_split_invariant, check_sendable, feed, peak_memory
from hypothesis import given
from hypothesis import strategies as st
from test_decoders import FEW, FUZZ, mutate_bytes, mutate_value

from agent.config import SessionLimits
from agent.core import ChunkRetried, FinalizeFile, ReceiverCore, SenderCore
from agent.core.sender import MAX_CHUNK_ATTEMPTS
from agent.errors import IntegrityError, RemoteProtocolError
from agent.wire import (
    ACTION_REFUSE,
    ACTION_RESUME,
    ACTION_SEND,
    ACTION_SKIP,
    DATA_HEADER_LEN,
    KIND_DIR,
    KIND_FILE,
    KIND_LINK,
    PREFIX_LEN,
    Ack,
    Done,
    FileDone,
    FileEnd,
    FrameType,
    Manifest,
    ManifestEntry,
    Nak,
    Opener,
    Plan,
    PlanEntry,
    Sealer,
    Summary,
    chunk_digest,
    decode_data_header,
    decode_message,
    encode_frame,
    encode_message,
)

KEY, SID = bytes(range(32)), b"sessid01"
CS = 64  # the session's chunk size in these runs: small frames, many chunks
LIMITS = SessionLimits(max_file_chunks=40, max_entries=6, max_chunks=100)


def content(fid: int, chunk: int, length: int) -> bytes:
    """What the honest source holds at chunk ``chunk`` of file ``fid``."""
    return bytes([fid & 0xFF, chunk & 0xFF, 0x5A]) * (length // 3) + b"\x01" * (length % 3)


def chunk_manifest(e: ManifestEntry) -> bytes:
    return b"".join(chunk_digest(content(e.file_id, i, e.chunk_len(i))) for i in range(e.chunks))


class PeerDropped(RemoteProtocolError):
    """The receiver's give-up rule fired (an IntegrityError out of chunk_rejected)."""


# --------------------------------------------------------------------------- receiver


class ReceiverDriver(CoreDriver):
    """Plays ReceiverSession + ReceivePump + ReceiverStore around a ReceiverCore."""

    allowed = (RemoteProtocolError,)

    def __init__(self, limits: SessionLimits = LIMITS, chunk_size: int = CS) -> None:
        self.limits, self.chunk_size = limits, chunk_size

    def new(self):
        core = ReceiverCore(chunk_size=self.chunk_size, limits=self.limits)
        core.opener = Opener(KEY, SID)  # the pump's, kept with the core for this run
        return core

    @staticmethod
    def plan(entries) -> list[PlanEntry]:
        """The store's part, deterministic: send, resume, skip or refuse by file id."""
        out = []
        for e in entries:
            how = e.file_id % 5
            if e.kind != KIND_FILE or how == 3:
                out.append(PlanEntry(e.file_id, ACTION_SKIP))
            elif how == 4:
                out.append(PlanEntry(e.file_id, ACTION_REFUSE, [], "refused"))
            elif how == 2 and e.chunks:
                out.append(PlanEntry(e.file_id, ACTION_RESUME,
                                     [(0, chunk_digest(content(e.file_id, 0, e.chunk_len(0))))]))
            else:
                out.append(PlanEntry(e.file_id, ACTION_SEND))
        return out

    def deliver(self, core, ftype, body, now):
        if ftype == FrameType.DATA:
            frame = encode_frame(ftype, body)
            hdr = decode_data_header(frame[:DATA_HEADER_LEN])
            core.check_header(hdr)
            try:
                core.opener.open(hdr, frame[:DATA_HEADER_LEN], memoryview(frame)[DATA_HEADER_LEN:])
            except IntegrityError as exc:
                try:
                    core.chunk_rejected(hdr.file_id, hdr.chunk, str(exc))
                except IntegrityError as gave_up:
                    raise PeerDropped(str(gave_up)) from None
                return
            core.chunk_verified(hdr.file_id, hdr.chunk, hdr.digest, now)
        else:
            msg = decode_message(ftype, body)
            if isinstance(msg, Manifest):
                core.check_manifest(msg)  # as ReceiverSession does, before the store plans
                core.receive_manifest(msg, self.plan(msg.entries))
            else:
                fin = core.receive(msg)
                if isinstance(fin, FinalizeFile):
                    core.file_finalized(fin.entry.file_id, "" if fin.entry.file_id % 2 else "disk said no")
        if core.get_timer() is not None and core.get_timer() <= now:
            core.handle_timer(now)

    def outputs(self, core):
        said = check_sendable(core.control_to_send())
        while (ev := core.next_event()) is not None:
            said.append(repr(ev))
        return said


def receiver_holds_within_limits(core: ReceiverCore, limits: SessionLimits) -> None:
    entries = core._entries  # what it keeps: every entry, and per file it receives a bitmap and digests
    assert len(entries) <= limits.max_entries
    held = [len(f.digests) for f in core._files.values()]
    assert all(n <= limits.max_file_chunks for n in held) and sum(held) <= limits.max_chunks


sizes = st.sampled_from([0, 1, CS - 1, CS, CS + 1, 3 * CS + 5, 40 * CS, 40 * CS + 1, 60 * CS, 100 * CS + 1,
                         1 << 40, 1 << 62, (1 << 63) - 1])
chunk_sizes = st.sampled_from([CS, CS, CS, CS, 1, CS - 1, CS + 1, 2 * CS, 0xFFFFFFFF])
receiver_entries = st.builds(
    ManifestEntry, st.integers(0, 9), st.sampled_from(["a", "b/c", "d e", "é"]),
    st.sampled_from([KIND_FILE, KIND_FILE, KIND_FILE, KIND_DIR, KIND_LINK]), sizes,
    st.sampled_from([0o644, 0o755]), st.integers(0, 10**18), chunk_sizes, st.sampled_from(["", "a"]))


honest_entries = st.lists(st.builds(
    ManifestEntry, st.integers(0, 9), st.sampled_from(["a", "b/c", "d e"]),
    st.sampled_from([KIND_FILE, KIND_FILE, KIND_FILE, KIND_DIR]), st.integers(0, 6 * CS),
    st.just(0o644), st.integers(0, 10**18), st.just(CS)), max_size=5, unique_by=lambda e: e.file_id)


@st.composite
def receiver_scripts(draw) -> bytes:
    """MANIFEST batches, DATA for some of their chunks (sealed for real), FILE_END, DONE;
    half of them from an honest sender, half with hostile entries."""
    entries = draw(honest_entries if draw(st.booleans()) else st.lists(receiver_entries, max_size=7))
    cut = draw(st.integers(0, len(entries)))
    frames = [encode_message(Manifest(entries[:cut], False)), encode_message(Manifest(entries[cut:], True))]
    if draw(st.integers(0, 3)) == 3:
        frames = frames[1:] if draw(st.booleans()) else frames[::-1]
    sealer = Sealer(KEY, SID)
    tail = []
    received = {pe.file_id for pe in ReceiverDriver.plan(entries) if pe.action in (ACTION_SEND, ACTION_RESUME)}
    for e in entries:
        if e.file_id not in received and draw(st.integers(0, 3)) != 3:
            continue  # an honest sender ends only what the receiver planned to receive
        if e.kind != KIND_FILE or e.chunk_size != CS or e.chunks > 8:
            tail.append(encode_message(FileEnd(e.file_id, bytes(32) * draw(st.integers(0, 3)))))
            continue
        good = list(range(e.chunks)) if draw(st.booleans()) else []
        for i in good + draw(st.lists(st.integers(0, e.chunks + (draw(st.integers(0, 3)) == 3)), max_size=3)):
            n = e.chunk_len(i) if i < e.chunks else CS
            plain = content(e.file_id, i, max(n, 0))
            tail.append(bytes(sealer.seal(e.file_id, i, i * CS, plain, chunk_digest(plain)).frame))
        tail.append(encode_message(FileEnd(e.file_id, chunk_manifest(e) if draw(st.booleans()) else bytes(32))))
    tail = draw(st.permutations(tail)) if draw(st.integers(0, 3)) == 3 else tail
    return b"".join(frames + tail + [encode_message(Done())])


def run_receiver(data: bytes, cuts, driver: ReceiverDriver | None = None):
    driver = driver or ReceiverDriver()
    got = assert_split_invariant(driver, data, cuts)
    receiver_holds_within_limits(got.core, driver.limits)
    return got


@FUZZ
@given(receiver_scripts(), st.lists(st.integers(0, 1 << 16), max_size=6))
def test_receiver_on_session_scripts(data, cuts):
    run_receiver(data, cuts)


@FUZZ
@given(receiver_scripts(), st.lists(st.integers(0, 1 << 16), max_size=6), st.data())
def test_receiver_on_mutated_session_scripts(data, cuts, draw):
    run_receiver(mutate_bytes(draw.draw, data), cuts)


@FEW
@given(st.lists(receiver_entries, min_size=1, max_size=5), st.data())
def test_receiver_on_mutated_manifest_fields(entries, draw):
    fields = msgpack.unpackb(encode_message(Manifest(entries, True))[PREFIX_LEN:], raw=False)
    for _ in range(draw.draw(st.integers(1, 3))):
        fields = mutate_value(draw.draw, fields)
    run_receiver(encode_frame(FrameType.MANIFEST, msgpack.packb(fields, use_bin_type=True)), [])


@FEW
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=4))
def test_receiver_on_raw_bytes(data, cuts):
    run_receiver(data, cuts)


# --------------------------------------------------------------------------- targeted receiver cases


def manifest_frame(*entries: ManifestEntry) -> bytes:
    return encode_message(Manifest(list(entries), True))


def test_a_file_claiming_2_to_the_62_bytes_is_refused_without_allocating_for_it():
    """Was MemoryError (2**50 chunks of 4 KiB: a bitmap of 128 TiB, a list of 8 PiB)."""
    driver = ReceiverDriver(SessionLimits(), chunk_size=4096)
    frame = manifest_frame(ManifestEntry(0, "huge", KIND_FILE, 1 << 62, 0o644, 0, 4096))
    got, peak = peak_memory(feed, driver, [frame])
    assert got.error is not None and got.error[0] is RemoteProtocolError and "chunks" in got.error[1]
    assert peak < 1 << 20
    assert feed(driver, [frame[i : i + 1] for i in range(len(frame))]) == got


def test_a_file_chunked_finer_than_the_session_is_refused_before_its_bitmap_is_made():
    """4 x 16 MiB in 1-byte chunks (~200 bytes on the wire) took a daemon from 52 to 564 MB RSS.
    Here: 1 MiB in 1-byte chunks used to allocate a list of 2**20 slots (8 MiB)."""
    driver = ReceiverDriver(SessionLimits(), chunk_size=4096)
    frame = manifest_frame(*[ManifestEntry(i, f"f{i}", KIND_FILE, 1 << 20, 0o644, 0, 1) for i in range(4)])
    got, peak = peak_memory(feed, driver, [frame])
    assert got.error is not None and got.error[0] is RemoteProtocolError and "chunk size" in got.error[1]
    assert peak < 256 << 10
    assert got.said[-1] == []  # no PLAN went out: nothing was planned for it


@pytest.mark.parametrize("chunk_size", [1, 4095, 4097, 8192])
def test_every_file_must_use_the_sessions_chunk_size(chunk_size):
    core = ReceiverCore(chunk_size=4096)
    with pytest.raises(RemoteProtocolError, match="chunk size"):
        core.check_manifest(Manifest([ManifestEntry(0, "a", KIND_FILE, 10_000, 0o644, 0, chunk_size)], True))
    ok = Manifest([ManifestEntry(0, "a", KIND_FILE, 10_000, 0o644, 0, 4096),
                   ManifestEntry(1, "d", KIND_DIR, 0, 0o755, 0, chunk_size)], True)  # not a file: no chunks
    core.receive_manifest(ok, [PlanEntry(0, ACTION_SEND), PlanEntry(1, ACTION_SKIP)])


def test_limits_on_chunks_per_file_entries_and_chunks_per_session():
    lim = SessionLimits(max_file_chunks=10, max_entries=4, max_chunks=25)

    def f(fid, chunks):
        return ManifestEntry(fid, f"f{fid}", KIND_FILE, chunks * CS, 0o644, 0, CS)

    core = ReceiverCore(chunk_size=CS, limits=lim)
    with pytest.raises(RemoteProtocolError, match="11 chunks"):
        core.check_manifest(Manifest([f(0, 11)], False))
    core.receive_manifest(Manifest([f(0, 10), f(1, 10)], False), [PlanEntry(0, ACTION_SEND), PlanEntry(1, ACTION_SEND)])
    with pytest.raises(RemoteProtocolError, match="more than 25 chunks"):  # counted over the batches
        core.check_manifest(Manifest([f(2, 6)], True))
    with pytest.raises(RemoteProtocolError, match="more than 4 entries"):
        core.check_manifest(Manifest([f(2, 1), f(3, 1), f(4, 1)], True))
    with pytest.raises(RemoteProtocolError, match="listed twice"):
        core.check_manifest(Manifest([f(2, 1), f(2, 1)], True))
    core.receive_manifest(Manifest([f(2, 5), f(3, 0)], True), [PlanEntry(2, ACTION_SEND), PlanEntry(3, ACTION_SEND)])
    with pytest.raises(RemoteProtocolError, match="after the last"):
        core.check_manifest(Manifest([], True))


def test_the_default_file_limit_is_what_one_file_end_can_carry():
    n = SessionLimits().max_file_chunks
    assert len(encode_message(FileEnd(0xFFFFFFFF, bytes(32) * n))) - PREFIX_LEN <= 16 << 20
    assert len(encode_message(FileEnd(0xFFFFFFFF, bytes(32) * (n + 1024)))) - PREFIX_LEN > 16 << 20


# --------------------------------------------------------------------------- sender

SENDER_FILES = [
    ManifestEntry(0, "empty", KIND_FILE, 0, 0o644, 0, CS),
    ManifestEntry(1, "one", KIND_FILE, CS - 7, 0o644, 0, CS),
    ManifestEntry(2, "five", KIND_FILE, 4 * CS + 9, 0o644, 0, CS),
    ManifestEntry(3, "dir", KIND_DIR, 0, 0o755, 0, CS),
    ManifestEntry(4, "link", KIND_LINK, 0, 0o777, 0, CS, "one"),
    ManifestEntry(5, "three", KIND_FILE, 3 * CS, 0o600, 0, CS),
]


PLAN_ALL = Plan([PlanEntry(e.file_id, ACTION_SEND if e.kind == KIND_FILE else ACTION_SKIP) for e in SENDER_FILES])


class SenderDriver(CoreDriver):
    """Plays SenderSession + SendPump around a SenderCore that sends SENDER_FILES."""

    def new(self):
        return SenderCore(SENDER_FILES, batch=4, max_inflight_bytes=6 * CS, ack_timeout=0.05)

    def deliver(self, core, ftype, body, now):
        core.receive(decode_message(ftype, body))
        self.pump(core)
        core.handle_timer(now, {})

    @staticmethod
    def pump(core: SenderCore) -> None:
        for stream in (0, 1):
            while (job := core.next_job(stream)) is not None:
                digest = chunk_digest(content(job.file_id, job.chunk, job.length))
                (core.verified if job.verify else core.sent)(job, digest)

    def outputs(self, core):
        said = check_sendable(core.control_to_send())
        while (ev := core.next_event()) is not None:
            said.append(repr(ev))
        return said


def sender_stays_bounded(got) -> None:
    retried = [s for step in got.said for s in step if s.startswith("ChunkRetried(")]
    chunks = sum(e.chunks for e in SENDER_FILES)
    assert len(retried) <= (MAX_CHUNK_ATTEMPTS + 1) * chunks
    assert len(got.core._jobs) <= (MAX_CHUNK_ATTEMPTS + 2) * chunks


fids = st.integers(0, 7)
chunk_ix = st.integers(0, 6)
have = st.lists(st.tuples(chunk_ix, st.sampled_from([b"\0" * 32]) | st.builds(
    lambda f, i: chunk_digest(content(f, i, CS)), fids, chunk_ix)), max_size=3)
plan_entries = st.one_of(
    st.builds(PlanEntry, fids, st.sampled_from([ACTION_SEND, ACTION_SKIP])),
    st.builds(PlanEntry, fids, st.just(ACTION_RESUME), have),
    st.builds(lambda f: PlanEntry(f, ACTION_REFUSE, [], "no"), fids),
)
pairs = st.lists(st.tuples(fids, chunk_ix), max_size=8)
honest_pairs = st.lists(st.sampled_from([(e.file_id, i) for e in SENDER_FILES for i in range(e.chunks)]), max_size=10)
receiver_messages = st.one_of(
    st.builds(Plan, st.lists(plan_entries, max_size=6)), st.just(PLAN_ALL),
    st.builds(Ack, pairs | honest_pairs), st.builds(Nak, pairs | honest_pairs, st.sampled_from(["", "tag"])),
    st.builds(FileDone, fids, st.booleans(), st.lists(chunk_ix, max_size=6), st.sampled_from(["", "disk"])),
    st.builds(Summary, st.integers(0, 9), st.integers(0, 9), st.integers(0, 1 << 20), st.lists(st.just("e"), max_size=2)),
    st.just(Done()), st.just(FileEnd(1, bytes(32))),
)
honest_messages = st.one_of(
    st.builds(Ack, honest_pairs), st.builds(Nak, honest_pairs, st.just("tag")),
    st.builds(FileDone, st.sampled_from([0, 1, 2, 5]), st.booleans(), st.lists(st.integers(0, 2), max_size=3)),
    st.just(Summary(1, 0, 1, [])),
)
sender_scripts = st.one_of(
    st.lists(receiver_messages, max_size=14),
    st.lists(honest_messages, max_size=20).map(lambda ms: [PLAN_ALL, Ack([(1, 0)]), *ms]),
    st.just([PLAN_ALL, Ack([(e.file_id, i) for e in SENDER_FILES for i in range(e.chunks)]),
             *[FileDone(e.file_id, True) for e in SENDER_FILES if e.kind == KIND_FILE], Summary(4, 0, 1, [])]),
).map(lambda ms: b"".join(map(encode_message, ms)))


@FUZZ
@given(sender_scripts, st.lists(st.integers(0, 4096), max_size=6))
def test_sender_on_receiver_scripts(data, cuts):
    sender_stays_bounded(assert_split_invariant(SenderDriver(), data, cuts))


@FUZZ
@given(sender_scripts, st.lists(st.integers(0, 4096), max_size=6), st.data())
def test_sender_on_mutated_receiver_scripts(data, cuts, draw):
    sender_stays_bounded(assert_split_invariant(SenderDriver(), mutate_bytes(draw.draw, data), cuts))


@FEW
@given(receiver_messages, st.data())
def test_sender_on_mutated_fields(msg, draw):
    fields = msgpack.unpackb(encode_message(msg)[PREFIX_LEN:], raw=False)
    for _ in range(draw.draw(st.integers(1, 3))):
        fields = mutate_value(draw.draw, fields)
    frame = encode_frame(FrameType(encode_message(msg)[3]), msgpack.packb(fields, use_bin_type=True))
    sender_stays_bounded(assert_split_invariant(SenderDriver(), encode_message(PLAN_ALL) + frame, []))


def test_a_file_done_naming_one_chunk_many_times_costs_one_retry_per_attempt():
    """Was: 100,000 ChunkRetried events (and as many queued jobs) from one 100 kB FILE_DONE."""
    driver = SenderDriver()
    script = [PLAN_ALL, Ack([(2, i) for i in range(5)]), FileDone(2, False, [3] * 100_000)]
    got = feed(driver, [b"".join(map(encode_message, script))])
    assert got.error is None
    retried = [s for step in got.said for s in step if s.startswith("ChunkRetried(file_id=2")]
    assert len(retried) == 1
    sender_stays_bounded(got)
