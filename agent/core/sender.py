"""The sender side of a session (docs/PROTOCOL.md §5), sans I/O.

Feed it the receiver's control messages and the outcome of each chunk job; it says
which control messages to send, which chunk jobs to run next, and what happened.
Rules: it never touches a socket, a file or a clock; a chunk counts as delivered
only when the receiver ACKs it, and a file only when the receiver says FILE_DONE ok.
On hostile input (a receiver's PLAN, ACK, NAK, FILE_DONE) it raises only
RemoteProtocolError, and what it holds stays bounded by its own files: a chunk is
retried at most MAX_CHUNK_ATTEMPTS times however often the receiver names it.

A data connection whose chunks stop being acknowledged while it stays open (a black
hole) is found by ``handle_timer``: the adapter calls it when ``get_timer`` says, with
``now`` and, per stream, a token of the transport's own progress; the core compares
snapshots, so the hot path (``next_job``, ``sent``, ACKs) never needs the clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

from agent._native import ChunkMap
from agent.core._events import (
    ChunkJob,
    ChunkRetried,
    FileCompleted,
    FileFailed,
    StreamStalled,
    TransferCompleted,
)
from agent.errors import RemoteProtocolError
from agent.wire import (
    ACTION_REFUSE,
    ACTION_RESUME,
    ACTION_SKIP,
    KIND_FILE,
    Ack,
    Done,
    FileDone,
    FileEnd,
    Manifest,
    ManifestEntry,
    Message,
    Nak,
    Plan,
    Summary,
)

__all__ = ["SenderCore"]

MAX_CHUNK_ATTEMPTS = 8
STALL_CHECKS = 4  # snapshots per ack_timeout: a stall is reported within 1.25 x ack_timeout
MAX_FAILED_REASONS = 1000  # files named with their reason in DONE (the rest: "incomplete" at the receiver)


class _File:
    __slots__ = ("entry", "acked", "digests", "known", "state", "attempts", "sent_bytes", "skipped_bytes")

    def __init__(self, entry: ManifestEntry) -> None:
        self.entry = entry
        self.acked = ChunkMap(entry.chunks)
        self.digests: list[bytes | None] = [None] * entry.chunks
        self.known = 0  # digests not None
        self.state = "listed"  # listed → planned → ended → done | failed
        self.attempts: dict[int, int] = {}
        self.sent_bytes = 0
        self.skipped_bytes = 0


class SenderCore:
    def __init__(self, entries: list[ManifestEntry], *, batch: int = 1024, max_inflight_bytes: int = 512 << 20,
                 ack_timeout: float = 30.0) -> None:
        self._files = {e.file_id: _File(e) for e in entries}
        self._order = [e.file_id for e in entries]
        self._batch = batch
        self._max_inflight = max_inflight_bytes
        self._out: deque[Message] = deque()
        self._events: deque = deque()
        self._jobs: deque[ChunkJob] = deque()
        self._inflight: dict[int, dict[tuple[int, int], int]] = {}
        self._inflight_bytes = 0
        # stall watch: ack_timeout 0 = off; per stream (progress mark, when it last changed)
        self._ack_timeout = ack_timeout
        self._next_check = 0.0
        self._watch: dict[int, tuple[tuple, float]] = {}
        self._pending_files = len(entries)
        self._done_sent = False
        self.finished = False
        self.summary: Summary | None = None
        self._failed_reasons: list[tuple[int, str]] = []
        self.bytes_total = sum(e.size for e in entries if e.kind == KIND_FILE)
        self.bytes_acked = 0
        self.bytes_skipped = 0
        self.chunks_retried = 0
        self.files_ok = 0
        self.files_failed = 0
        for i in range(0, len(entries), batch):
            part = entries[i : i + batch]
            self._out.append(Manifest(part, last=i + batch >= len(entries)))
        if not entries:
            self._out.append(Manifest([], last=True))
            self._maybe_done()

    # -- outputs ----------------------------------------------------------------
    def control_to_send(self) -> list[Message]:
        out = list(self._out)
        self._out.clear()
        return out

    def next_event(self):
        return self._events.popleft() if self._events else None

    def next_job(self, stream: int) -> ChunkJob | None:
        """A job for ``stream``, or None when nothing is runnable now (queue empty or window full)."""
        if not self._jobs:
            return None
        job = self._jobs[0]
        if not job.verify and self._inflight_bytes + job.length > self._max_inflight and self._inflight_bytes:
            return None
        self._jobs.popleft()
        if not job.verify:
            self._inflight.setdefault(stream, {})[(job.file_id, job.chunk)] = job.length
            self._inflight_bytes += job.length
        return job

    def get_timer(self) -> float | None:
        """When ``handle_timer`` wants to run next (loop time); None: never (watch off)."""
        return self._next_check if self._ack_timeout > 0 and not self.finished else None

    def handle_timer(self, now: float, transport: Mapping[int, object] | None = None) -> None:
        """Look for stalled streams; each one found becomes a ``StreamStalled`` event.

        A stream is stalled when it has chunks outstanding (handed to it and not ACKed or
        NAKed) and, for ``ack_timeout`` seconds, none of them was acknowledged, no new one
        was handed to it (its pump finished no frame) and its ``transport`` token did not
        change.  The token is whatever shows the connection itself moving bytes (the
        adapter passes the bytes the peer's TCP acknowledged): a slow link that takes
        longer than ``ack_timeout`` to carry one chunk is not a stall.  Snapshots are
        taken every ``ack_timeout / 4``, so a stall is reported between 1 and 1.25 times
        ``ack_timeout`` after the last progress, never earlier."""
        if self._ack_timeout <= 0:
            return
        self._next_check = now + self._ack_timeout / STALL_CHECKS
        tokens = transport or {}
        for stream in [s for s in self._watch if not self._inflight.get(s)]:
            del self._watch[stream]
        for stream, chunks in self._inflight.items():
            if not chunks:
                continue
            mark = (next(iter(chunks)), next(reversed(chunks)), len(chunks), tokens.get(stream))
            seen = self._watch.get(stream)
            if seen is None or seen[0] != mark:
                self._watch[stream] = (mark, now)
            elif now - seen[1] >= self._ack_timeout:
                self._watch[stream] = (mark, now)  # reported once per ack_timeout, not at every check
                self._events.append(StreamStalled(stream, now - seen[1]))

    @property
    def has_jobs(self) -> bool:
        return bool(self._jobs)

    @property
    def inflight_bytes(self) -> int:
        return self._inflight_bytes

    # -- inputs from the receiver ------------------------------------------------
    def receive(self, msg: Message) -> None:
        if isinstance(msg, Plan):
            self._on_plan(msg)
        elif isinstance(msg, Ack):
            self._on_ack(msg)
        elif isinstance(msg, Nak):
            self._on_nak(msg)
        elif isinstance(msg, FileDone):
            self._on_file_done(msg)
        elif isinstance(msg, Summary):
            if not self._done_sent:
                raise RemoteProtocolError("SUMMARY before DONE")
            self.summary = msg
            self.finished = True
            self._events.append(TransferCompleted(self.files_ok, self.files_failed))
        else:
            raise RemoteProtocolError(f"unexpected {type(msg).__name__} at the sender")

    def _file(self, file_id: int) -> _File:
        f = self._files.get(file_id)
        if f is None:
            raise RemoteProtocolError(f"unknown file_id {file_id}")
        return f

    def _on_plan(self, plan: Plan) -> None:
        for pe in plan.entries:
            f = self._file(pe.file_id)
            if f.state != "listed":
                raise RemoteProtocolError(f"file {pe.file_id} planned twice")
            f.state = "planned"
            e = f.entry
            if pe.action == ACTION_REFUSE:
                self._fail(f, f"refused by the receiver: {pe.reason}")
            elif pe.action == ACTION_SKIP:
                f.skipped_bytes = e.size if e.kind == KIND_FILE else 0
                self.bytes_skipped += f.skipped_bytes
                self._complete(f, skipped=True)
            elif e.kind != KIND_FILE:
                raise RemoteProtocolError(f"plan asks to send non-file {pe.file_id}")
            else:
                have = dict(pe.have) if pe.action == ACTION_RESUME else {}
                if any(i >= e.chunks for i in have):
                    raise RemoteProtocolError("plan claims a chunk beyond the end of the file")
                for i in range(e.chunks):
                    off = i * e.chunk_size
                    self._jobs.append(ChunkJob(e.file_id, i, off, e.chunk_len(i), i in have, have.get(i, b"")))
                self._maybe_end(f)

    def verified(self, job: ChunkJob, digest: bytes) -> None:
        """A ``verify`` job finished: ``digest`` is our chunk's BLAKE3."""
        f = self._files[job.file_id]
        if f.state != "planned":
            return
        if digest == job.claimed:
            self._set_digest(f, job.chunk, digest)
            if f.acked.add(job.chunk):
                f.skipped_bytes += job.length
                self.bytes_skipped += job.length
            self._maybe_end(f)
        else:
            self._jobs.append(ChunkJob(job.file_id, job.chunk, job.offset, job.length))

    def sent(self, job: ChunkJob, digest: bytes) -> None:
        """A send job put its frame on the wire; ``digest`` is what it sealed."""
        f = self._files[job.file_id]
        prev = f.digests[job.chunk]
        self._set_digest(f, job.chunk, digest)
        if prev is not None and prev != digest:
            self._fail(f, "source file changed during the transfer")
        elif f.state == "planned":
            # the ACK may be handled before this report from the pump thread
            self._maybe_end(f)

    @staticmethod
    def _set_digest(f: "_File", chunk: int, digest: bytes) -> None:
        if f.digests[chunk] is None:
            f.known += 1
        f.digests[chunk] = digest

    def job_failed(self, job: ChunkJob, stream: int, reason: str) -> None:
        """A job could not run (stream broke before the frame left); it goes back in the queue."""
        if not job.verify:
            self._forget_inflight(stream, job.file_id, job.chunk)
        f = self._files[job.file_id]
        if f.state in ("planned",):
            self._jobs.appendleft(job)

    def source_failed(self, file_id: int, reason: str) -> None:
        """The source file could not be read, or changed under us."""
        self._fail(self._files[file_id], reason)

    def stream_lost(self, stream: int) -> None:
        """Every chunk sent on ``stream`` and not yet ACKed is queued again."""
        lost = self._inflight.pop(stream, {})
        self._watch.pop(stream, None)
        for (fid, chunk), length in lost.items():
            self._inflight_bytes -= length
            f = self._files[fid]
            if f.state == "planned" and chunk not in f.acked:
                self._retry(f, chunk, "data connection lost")

    def _forget_inflight(self, stream: int, fid: int, chunk: int) -> int | None:
        length = self._inflight.get(stream, {}).pop((fid, chunk), None)
        if length is not None:
            self._inflight_bytes -= length
        return length

    def _forget_anywhere(self, fid: int, chunk: int) -> None:
        for stream in list(self._inflight):
            if self._forget_inflight(stream, fid, chunk) is not None:
                return

    def _on_ack(self, ack: Ack) -> None:
        for fid, chunk in ack.chunks:
            f = self._file(fid)
            if chunk >= f.entry.chunks:
                raise RemoteProtocolError("ACK for a chunk beyond the end of the file")
            self._forget_anywhere(fid, chunk)
            if f.state == "planned" and f.acked.add(chunk):
                n = f.entry.chunk_len(chunk)
                self.bytes_acked += n
                f.sent_bytes += n
                self._maybe_end(f)

    def _on_nak(self, nak: Nak) -> None:
        for fid, chunk in nak.chunks:
            f = self._file(fid)
            if chunk >= f.entry.chunks:
                raise RemoteProtocolError("NAK for a chunk beyond the end of the file")
            self._forget_anywhere(fid, chunk)
            if f.state == "planned":
                f.acked.discard(chunk)
                self._retry(f, chunk, nak.reason or "receiver rejected the chunk")

    def _retry(self, f: _File, chunk: int, reason: str) -> None:
        n = f.attempts.get(chunk, 0) + 1
        f.attempts[chunk] = n
        self.chunks_retried += 1
        self._events.append(ChunkRetried(f.entry.file_id, chunk, reason))
        if n > MAX_CHUNK_ATTEMPTS:
            self._fail(f, f"chunk {chunk} failed {n} times: {reason}")
            return
        e = f.entry
        self._jobs.appendleft(ChunkJob(e.file_id, chunk, chunk * e.chunk_size, e.chunk_len(chunk)))

    def _on_file_done(self, fd: FileDone) -> None:
        f = self._file(fd.file_id)
        if f.state != "ended":
            raise RemoteProtocolError(f"FILE_DONE for file {fd.file_id} that was not ended")
        if fd.ok:
            self._complete(f, skipped=False)
        elif fd.bad and not fd.error:
            # a set: the list is the peer's, and each name of a chunk costs a retry and an event
            bad = sorted(set(fd.bad))
            if bad[-1] >= f.entry.chunks:
                raise RemoteProtocolError("FILE_DONE names a chunk beyond the end of the file")
            f.state = "planned"
            for chunk in bad:
                f.acked.discard(chunk)
                self._retry(f, chunk, "chunk manifest mismatch")
                if f.state != "planned":  # failed: its chunk gave up
                    break
        else:
            self._fail(f, fd.error or "receiver could not finish the file")

    # -- transitions ------------------------------------------------------------
    def _maybe_end(self, f: _File) -> None:
        if f.state == "planned" and f.acked.complete() and f.known == f.entry.chunks:
            f.state = "ended"
            self._out.append(FileEnd(f.entry.file_id, b"".join(f.digests)))  # type: ignore[arg-type]

    def _complete(self, f: _File, *, skipped: bool) -> None:
        f.state = "done"
        self.files_ok += 1
        self._events.append(FileCompleted(f.entry.file_id, f.entry.relpath, f.entry.size, skipped))
        self._pending_files -= 1
        self._maybe_done()

    def _fail(self, f: _File, reason: str) -> None:
        if f.state in ("done", "failed"):
            return
        if f.state == "planned" and len(self._failed_reasons) < MAX_FAILED_REASONS:
            self._failed_reasons.append((f.entry.file_id, reason))  # the receiver waits for it: say why
        f.state = "failed"
        self.files_failed += 1
        self._jobs = deque(j for j in self._jobs if j.file_id != f.entry.file_id)
        self._events.append(FileFailed(f.entry.file_id, f.entry.relpath, reason))
        self._pending_files -= 1
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self._pending_files == 0 and not self._done_sent:
            self._done_sent = True
            self._out.append(Done(self._failed_reasons))
