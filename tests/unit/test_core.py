"""Sender and receiver cores wired back to back, no event loop, no sockets.

The harness plays the adapters: it runs chunk jobs against in-memory files, seals
and opens real DATA frames, and can lose or corrupt frames and drop streams.
"""

from __future__ import annotations

import random

import pytest

from agent.core import FileCompleted, FileFailed, FinalizeFile, ReceiverCore, SenderCore
from agent.core import StreamStalled
from agent.errors import IntegrityError, RemoteProtocolError
from agent.wire import (
    ACTION_RESUME,
    ACTION_SEND,
    ACTION_SKIP,
    Ack,
    FileDone,
    FileEnd,
    Manifest,
    ManifestEntry,
    Opener,
    Plan,
    PlanEntry,
    Sealer,
    Summary,
    chunk_digest,
    decode_data_header,
    decode_message,
    encode_message,
    check_prefix,
)

KEY, SID = b"k" * 32, b"s" * 8
CS = 1024


def entries_for(files: dict[str, bytes]) -> list[ManifestEntry]:
    return [ManifestEntry(i, name, "f", len(data), 0o644, 1000 + i, CS) for i, (name, data) in enumerate(files.items())]


def wire(msg):
    """Every control message really goes through the codec."""
    frame = encode_message(msg)
    t, n = check_prefix(frame[:8], 1 << 24)
    return decode_message(t, frame[8:])


class Harness:
    def __init__(self, files: dict[str, bytes], *, have=None, lose=0.0, corrupt=0.0, seed=1, streams=2):
        self.files = files
        self.data = {i: d for i, d in enumerate(files.values())}
        self.entries = entries_for(files)
        self.sender = SenderCore(self.entries, max_inflight_bytes=8 * CS)
        self.receiver = ReceiverCore(chunk_size=CS)
        self.disk: dict[int, bytearray] = {}
        self.have = have or {}
        self.rng = random.Random(seed)
        self.lose, self.corrupt = lose, corrupt
        self.sealer, self.opener = Sealer(KEY, SID), Opener(KEY, SID)
        self.streams = streams
        self.now = 0.0
        self.sender_events, self.receiver_events = [], []
        self.nonces = set()

    def plan_for(self, manifest: Manifest) -> list[PlanEntry]:
        out = []
        for e in manifest.entries:
            self.disk.setdefault(e.file_id, bytearray(e.size))
            h = self.have.get(e.file_id)
            if h == "skip":
                out.append(PlanEntry(e.file_id, ACTION_SKIP))
            elif h:
                for i, d in h:
                    self.disk[e.file_id][i * CS : i * CS + e.chunk_len(i)] = self.data[e.file_id][i * CS : i * CS + e.chunk_len(i)]
                out.append(PlanEntry(e.file_id, ACTION_RESUME, h))
            else:
                out.append(PlanEntry(e.file_id, ACTION_SEND))
        return out

    def to_receiver(self, msgs):
        for m in msgs:
            m = wire(m)
            if isinstance(m, Manifest):
                self.receiver.receive_manifest(m, self.plan_for(m))
            else:
                fin = self.receiver.receive(m)
                if isinstance(fin, FinalizeFile):
                    got = bytes(self.disk[fin.entry.file_id])
                    self.receiver.file_finalized(fin.entry.file_id, "" if got == self.data[fin.entry.file_id] else "mismatch")

    def to_sender(self, msgs):
        for m in msgs:
            self.sender.receive(wire(m))

    def deliver(self, frame: bytearray):
        if self.rng.random() < self.lose:
            return
        if self.rng.random() < self.corrupt:
            pos = self.rng.randrange(84, len(frame))
            frame[pos] ^= 0x40
        hdr = decode_data_header(bytes(frame[:84]))
        e = self.receiver.check_header(hdr)
        try:
            plain = self.opener.open(hdr, bytes(frame[:84]), memoryview(frame)[84:])
        except IntegrityError as exc:
            self.receiver.chunk_rejected(hdr.file_id, hdr.chunk, str(exc))
            return
        self.disk[e.file_id][hdr.offset : hdr.offset + len(plain)] = plain
        self.receiver.chunk_verified(hdr.file_id, hdr.chunk, hdr.digest, self.now)

    def run(self, max_steps=100_000, drop_stream_at=None):
        step = 0
        while not self.sender.finished and step < max_steps:
            step += 1
            self.now += 0.001
            self.to_receiver(self.sender.control_to_send())
            self.to_sender(self.receiver.control_to_send())
            progressed = False
            for s in range(self.streams):
                job = self.sender.next_job(s)
                if job is None:
                    continue
                progressed = True
                data = self.data[job.file_id][job.offset : job.offset + job.length]
                digest = chunk_digest(data)
                if job.verify:
                    self.sender.verified(job, digest)
                    continue
                sealed = self.sealer.seal(job.file_id, job.chunk, job.offset, data, digest)
                assert sealed.nonce not in self.nonces
                self.nonces.add(sealed.nonce)
                self.sender.sent(job, digest)
                self.deliver(sealed.frame)
            if drop_stream_at is not None and step == drop_stream_at:
                self.sender.stream_lost(0)
            if not progressed:
                self.now += 0.05
                self.receiver.handle_timer(self.now)
                if self.lose and not self.sender.has_jobs and self.sender.inflight_bytes:
                    # a lost frame is only noticed when its stream breaks: simulate the reconnect
                    for s in range(self.streams):
                        self.sender.stream_lost(s)
            while (ev := self.sender.next_event()) is not None:
                self.sender_events.append(ev)
            while (ev := self.receiver.next_event()) is not None:
                self.receiver_events.append(ev)
        return step


def sample_files(n=5, seed=0):
    rng = random.Random(seed)
    return {f"f{i}": rng.randbytes(rng.choice([0, 1, CS - 1, CS, CS + 1, 7 * CS + 13])) for i in range(n)}


def test_clean_transfer_delivers_every_byte():
    files = sample_files(8)
    h = Harness(files)
    h.run()
    assert h.sender.finished and h.sender.files_ok == len(files) and h.sender.files_failed == 0
    for i, data in h.data.items():
        assert bytes(h.disk[i]) == data
    assert h.sender.bytes_acked == sum(map(len, files.values()))
    assert isinstance(h.sender.summary, Summary) and h.sender.summary.files_failed == 0


def test_corrupted_frames_are_resent_never_written():
    files = sample_files(4, seed=3)
    h = Harness(files, corrupt=0.2, seed=7)
    h.run()
    assert h.sender.files_ok == len(files)
    assert 0 < h.receiver.bad_chunks <= 16
    assert h.sender.chunks_retried >= h.receiver.bad_chunks
    for i, data in h.data.items():
        assert bytes(h.disk[i]) == data


def test_peer_that_keeps_corrupting_is_dropped():
    h = Harness({"big": bytes(40 * CS)}, corrupt=1.0)
    with pytest.raises(IntegrityError):
        h.run()


def test_lost_frames_and_stream_loss_are_recovered():
    files = sample_files(6, seed=5)
    h = Harness(files, lose=0.1, seed=11)
    h.run()
    assert h.sender.files_ok == len(files)
    for i, data in h.data.items():
        assert bytes(h.disk[i]) == data


def test_resume_sends_only_missing_chunks_and_rechecks_claims():
    data = random.Random(9).randbytes(10 * CS)
    good = [(i, chunk_digest(data[i * CS : (i + 1) * CS])) for i in range(6)]
    lie = (6, b"\x00" * 32)  # the receiver claims chunk 6 with a wrong digest: must be re-sent
    h = Harness({"f": data}, have={0: good + [lie]})
    h.run()
    assert bytes(h.disk[0]) == data
    assert h.sender.bytes_skipped == 6 * CS
    assert h.sender.bytes_acked == 4 * CS


def test_skip_counts_bytes_without_sending():
    h = Harness({"a": b"x" * 3000, "b": b"y" * 10}, have={0: "skip"})
    h.run()
    assert h.sender.bytes_skipped == 3000 and h.sender.bytes_acked == 10 and h.sender.files_ok == 2


def test_manifest_mismatch_at_file_end_resends_the_bad_chunk():
    data = bytes(range(256)) * 12
    h = Harness({"f": data})
    h.to_receiver(h.sender.control_to_send())
    h.to_sender(h.receiver.control_to_send())
    digests = [chunk_digest(data[i * CS : (i + 1) * CS]) for i in range(3)]
    for i in range(3):
        h.receiver.chunk_verified(0, i, digests[i], 0.0)
    h.receiver._files[0].digests[1] = b"\x01" * 32  # e.g. a stale journal row
    assert h.receiver.receive(FileEnd(0, b"".join(digests))) is None
    done = [m for m in h.receiver.control_to_send() if isinstance(m, FileDone)]
    assert len(done) == 1 and not done[0].ok and done[0].bad == [1]


def test_hostile_receiver_messages_raise_protocol_errors():
    h = Harness({"f": bytes(3 * CS)})
    h.sender.control_to_send()
    with pytest.raises(RemoteProtocolError):
        h.sender.receive(Ack([(99, 0)]))
    with pytest.raises(RemoteProtocolError):
        h.sender.receive(Plan([PlanEntry(0, ACTION_RESUME, [(50, b"\0" * 32)])]))
    with pytest.raises(RemoteProtocolError):
        h.sender.receive(FileDone(0, True))


def test_receiver_refuses_headers_that_do_not_match_the_manifest():
    h = Harness({"f": bytes(3 * CS)})
    h.to_receiver(h.sender.control_to_send())
    sealer = Sealer(KEY, SID)
    bad = sealer.seal(0, 1, 5, b"\0" * CS, chunk_digest(b"\0" * CS))  # wrong offset
    with pytest.raises(RemoteProtocolError):
        h.receiver.check_header(decode_data_header(bytes(bad.frame[:84])))
    bad = sealer.seal(7, 0, 0, b"\0" * CS, chunk_digest(b"\0" * CS))  # unknown file
    with pytest.raises(RemoteProtocolError):
        h.receiver.check_header(decode_data_header(bytes(bad.frame[:84])))


def test_source_change_between_sends_fails_the_file():
    h = Harness({"f": bytes(3 * CS)})
    h.to_receiver(h.sender.control_to_send())
    h.to_sender(h.receiver.control_to_send())
    job = h.sender.next_job(0)
    h.sender.sent(job, b"a" * 32)
    h.sender.stream_lost(0)
    job2 = h.sender.next_job(0)
    assert (job2.file_id, job2.chunk) == (job.file_id, job.chunk)
    h.sender.sent(job2, b"b" * 32)
    evs = []
    while (ev := h.sender.next_event()) is not None:
        evs.append(ev)
    assert any(isinstance(e, FileFailed) and "changed" in e.reason for e in evs)


def test_empty_manifest_finishes():
    h = Harness({})
    h.run()
    assert h.sender.finished and h.sender.files_ok == 0


def test_ack_overtaking_the_pump_report_does_not_end_the_file_early():
    # the pump thread reports "sent" through the event loop; the receiver's ACK can be
    # handled first. FILE_END must wait until every digest is known.
    h = Harness({"f": bytes(2 * CS)})
    h.to_receiver(h.sender.control_to_send())
    h.to_sender(h.receiver.control_to_send())
    j0, j1 = h.sender.next_job(0), h.sender.next_job(1)
    h.sender.sent(j0, chunk_digest(bytes(CS)))
    h.sender.receive(Ack([(0, 0), (0, 1)]))  # chunk 1 ACKed before its "sent" report
    assert not [m for m in h.sender.control_to_send() if isinstance(m, FileEnd)]
    h.sender.sent(j1, chunk_digest(bytes(CS)))
    ends = [m for m in h.sender.control_to_send() if isinstance(m, FileEnd)]
    assert len(ends) == 1 and ends[0].digests == chunk_digest(bytes(CS)) * 2


# -- the ACK-timeout watch: injected time, no clock --------------------------------------
def _planned(ack_timeout: float, chunks: int = 6) -> SenderCore:
    e = ManifestEntry(0, "f", "f", chunks * CS, 0o644, 1, CS)
    s = SenderCore([e], ack_timeout=ack_timeout)
    s.control_to_send()
    s.receive(Plan([PlanEntry(0, ACTION_SEND)]))
    return s


def _stalls(s: SenderCore) -> list:
    out = []
    while (ev := s.next_event()) is not None:
        if isinstance(ev, StreamStalled):
            out.append(ev)
    return out


def _tick_until(s: SenderCore, until: float, transport=None) -> list:
    """Run the timer as the adapter does: at each get_timer() deadline up to ``until``."""
    found = []
    while (t := s.get_timer()) is not None and t <= until:
        s.handle_timer(t, transport(t) if transport else None)
        found += [(t, ev) for ev in _stalls(s)]
    return found


def test_a_stream_whose_chunks_are_never_acked_is_reported_after_ack_timeout_not_before():
    s = _planned(ack_timeout=10.0)
    j0, j1, j2 = s.next_job(0), s.next_job(0), s.next_job(1)
    for j in (j0, j1, j2):
        s.sent(j, chunk_digest(bytes(CS)))
    assert s.get_timer() == 0.0  # first snapshot at once
    s.receive(Ack([(0, j2.chunk)]))  # stream 1 is answered; stream 0 never is
    assert _tick_until(s, 9.99) == []
    [(t, ev)] = _tick_until(s, 10.0)
    assert t == 10.0 and ev == StreamStalled(0, 10.0)
    s.stream_lost(0)  # what the adapter does: close it, requeue its chunks
    assert s.chunks_retried == 2
    assert {s.next_job(1).chunk, s.next_job(1).chunk} == {j0.chunk, j1.chunk}
    assert _tick_until(s, 15.0) == []  # stream 1's new chunks start a fresh watch


def test_progress_of_any_kind_restarts_the_clock():
    s = _planned(ack_timeout=10.0)
    j0, j1 = s.next_job(0), s.next_job(0)
    s.sent(j0, chunk_digest(bytes(CS)))
    assert _tick_until(s, 5.0) == []
    s.receive(Ack([(0, j0.chunk)]))  # an ACK at t=5
    assert _tick_until(s, 14.9) == []
    j2 = s.next_job(0)  # a frame finished and the pump got the next chunk at t=15
    assert j2 is not None
    assert _tick_until(s, 24.9) == []
    # the transport keeps moving bytes (a link slower than one chunk per ack_timeout)
    assert _tick_until(s, 60.0, transport=lambda t: {0: int(t)}) == []
    # ... until it does not
    assert _tick_until(s, 79.9, transport=lambda t: {0: 60}) == [(70.0, StreamStalled(0, 10.0))]
    assert j1 is not None


def test_a_stream_with_nothing_outstanding_never_stalls_and_zero_turns_the_watch_off():
    s = _planned(ack_timeout=1.0)
    j = s.next_job(0)
    s.sent(j, chunk_digest(bytes(CS)))
    s.receive(Ack([(0, j.chunk)]))
    assert _tick_until(s, 100.0) == []  # idle stream, nothing owed
    off = _planned(ack_timeout=0)
    off.next_job(0)
    assert off.get_timer() is None
    off.handle_timer(1e9)
    assert _stalls(off) == []


def test_a_black_holed_stream_is_found_by_the_timer_and_the_transfer_completes():
    files = sample_files(6, seed=21)
    h = Harness(files, seed=3)
    h.sender = SenderCore(h.entries, max_inflight_bytes=8 * CS, ack_timeout=1.0)
    holed = {0}  # stream 0 swallows every frame from the start; TCP would say nothing
    deliver = h.deliver
    sent_on: dict[tuple[int, int], int] = {}
    next_job = h.sender.next_job

    def job_for(stream):
        job = next_job(stream)
        if job is not None:
            sent_on[(job.file_id, job.chunk)] = stream
        return job

    def maybe_deliver(frame):
        hdr = decode_data_header(bytes(frame[:84]))
        if sent_on.get((hdr.file_id, hdr.chunk)) not in holed:
            deliver(frame)

    h.sender.next_job = job_for
    h.deliver = maybe_deliver
    timer = h.receiver.handle_timer

    def receiver_timer(now):
        timer(now)
        if (t := h.sender.get_timer()) is not None and t <= now:
            h.sender.handle_timer(now)
            for ev in _stalls(h.sender):
                h.sender.stream_lost(ev.stream)
                holed.discard(ev.stream)  # re-joined on a path that works

    h.receiver.handle_timer = receiver_timer
    h.run()
    assert h.sender.finished and h.sender.files_ok == len(files)
    assert h.sender.chunks_retried >= 1 and not holed
    for i, data in h.data.items():
        assert bytes(h.disk[i]) == data
