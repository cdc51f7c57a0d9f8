"""The receiver side of a session (docs/PROTOCOL.md §5), sans I/O.

It validates every DATA header against the manifest, keeps which chunks of which
file are verified, batches ACKs, answers FILE_END with a finalize request or a list
of bad chunks, and drops a peer that keeps sending bad data.
Rules: no sockets, files or clocks; time comes in as ``now``; a chunk is ACKed only
after the adapter reports it verified *and* written; on hostile input it raises only
RemoteProtocolError, and it holds no more than its ``SessionLimits`` allow (a MANIFEST
is checked against them before anything is allocated for it).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from agent._native import ChunkMap
from agent.config import SessionLimits
from agent.core._events import FileCompleted, FileFailed, TransferCompleted
from agent.errors import IntegrityError, LocalProtocolError, RemoteProtocolError
from agent.wire import (
    ACTION_RESUME,
    ACTION_SEND,
    KIND_FILE,
    Ack,
    DataHeader,
    Done,
    FileDone,
    FileEnd,
    Manifest,
    ManifestEntry,
    Message,
    Nak,
    Plan,
    PlanEntry,
    Summary,
)

__all__ = ["ReceiverCore", "FinalizeFile"]

ACK_DELAY = 0.02
ACK_BATCH = 256
MAX_BAD_CHUNKS = 16


@dataclass(frozen=True, slots=True)
class FinalizeFile:
    """Request to the adapter: fsync, set mode/mtime and rename this file into place."""

    entry: ManifestEntry


class _RFile:
    __slots__ = ("entry", "have", "digests", "state")

    def __init__(self, entry: ManifestEntry) -> None:
        self.entry = entry
        self.have = ChunkMap(entry.chunks)
        self.digests: list[bytes | None] = [None] * entry.chunks
        self.state = "receiving"  # receiving → finalizing → done | failed


class ReceiverCore:
    def __init__(self, *, chunk_size: int, max_bad: int = MAX_BAD_CHUNKS,
                 limits: SessionLimits = SessionLimits()) -> None:
        """``chunk_size``: the session's (HELLO's); every file of the manifest must use it."""
        self._max_chunk = chunk_size
        self._max_bad = max_bad
        self._limits = limits
        self._chunks = 0  # chunks of the files listed so far
        self._entries: dict[int, ManifestEntry] = {}
        self._files: dict[int, _RFile] = {}
        self._out: deque[Message] = deque()
        self._events: deque = deque()
        self._acks: list[tuple[int, int]] = []
        self._ack_deadline: float | None = None
        self._manifest_done = False
        self._done_received = False
        self._sender_reasons: dict[int, str] = {}  # why the sender gave up on a file (DONE)
        self.finished = False
        self.bad_chunks = 0
        self.bytes_written = 0
        self.files_ok = 0
        self.files_failed = 0
        self.errors: list[str] = []

    # -- outputs ----------------------------------------------------------------
    def control_to_send(self) -> list[Message]:
        out = list(self._out)
        self._out.clear()
        return out

    def next_event(self):
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        return self._ack_deadline

    def handle_timer(self, now: float) -> None:
        if self._ack_deadline is not None and now >= self._ack_deadline:
            self._flush_acks()

    # -- manifest and plan --------------------------------------------------------
    def check_manifest(self, manifest: Manifest) -> int:
        """Refuse a MANIFEST batch the peer may not send; return the session's chunk count with it.

        The adapter calls this before it plans the batch (touches the disk);
        ``receive_manifest`` checks again.  Only RemoteProtocolError comes out."""
        if self._manifest_done:
            raise RemoteProtocolError("MANIFEST after the last batch")
        lim, entries = self._limits, manifest.entries
        if len(self._entries) + len(entries) > lim.max_entries:
            raise RemoteProtocolError(f"manifest lists more than {lim.max_entries} entries")
        ids: set[int] = set()
        chunks = self._chunks
        for e in entries:
            if e.file_id in self._entries or e.file_id in ids:
                raise RemoteProtocolError(f"file_id {e.file_id} listed twice")
            ids.add(e.file_id)
            if e.kind != KIND_FILE:
                continue
            if e.chunk_size != self._max_chunk:  # before e.chunks: a 1-byte chunk claims 2**62 of them
                raise RemoteProtocolError(f"file {e.file_id}: chunk size {e.chunk_size}, the session's is "
                                          f"{self._max_chunk}")
            if e.chunks > lim.max_file_chunks:
                raise RemoteProtocolError(f"file {e.file_id}: {e.chunks} chunks, above the limit of "
                                          f"{lim.max_file_chunks}")
            chunks += e.chunks
            if chunks > lim.max_chunks:
                raise RemoteProtocolError(f"manifest holds more than {lim.max_chunks} chunks")
        return chunks

    def receive_manifest(self, manifest: Manifest, plan: list[PlanEntry]) -> None:
        """Record a MANIFEST batch and the plan the adapter computed for it (one entry per file, in order)."""
        chunks = self.check_manifest(manifest)
        if [pe.file_id for pe in plan] != [e.file_id for e in manifest.entries]:
            raise LocalProtocolError("the plan must have one entry per manifest entry, in order")
        for e, pe in zip(manifest.entries, plan):
            self._entries[e.file_id] = e
            if pe.action in (ACTION_SEND, ACTION_RESUME):
                f = self._files[e.file_id] = _RFile(e)
                for i, d in pe.have:
                    f.have.add(i)
                    f.digests[i] = d
        self._chunks = chunks
        self._manifest_done = manifest.last
        self._out.append(Plan(plan))

    def entry(self, file_id: int) -> ManifestEntry | None:
        return self._entries.get(file_id)

    def check_header(self, hdr: DataHeader) -> ManifestEntry:
        """Validate a DATA header against the manifest; return the file it belongs to."""
        f = self._files.get(hdr.file_id)
        if f is None:
            raise RemoteProtocolError(f"DATA for file {hdr.file_id}, which is not being received")
        e = f.entry
        if hdr.chunk >= e.chunks:
            raise RemoteProtocolError("DATA chunk index beyond the end of the file")
        if hdr.offset != hdr.chunk * e.chunk_size or hdr.plain_len != e.chunk_len(hdr.chunk):
            raise RemoteProtocolError("DATA offset or length does not match the manifest")
        if hdr.payload_len > self._max_chunk + 1024:
            raise RemoteProtocolError("DATA payload above the limit")
        return e

    # -- chunk outcomes from the adapter -----------------------------------------------
    def chunk_verified(self, file_id: int, chunk: int, digest: bytes, now: float) -> None:
        f = self._files[file_id]
        if f.state != "receiving":
            return
        if f.have.add(chunk):
            self.bytes_written += f.entry.chunk_len(chunk)
        f.digests[chunk] = digest
        self._acks.append((file_id, chunk))
        if len(self._acks) >= ACK_BATCH:
            self._flush_acks()
        elif self._ack_deadline is None:
            self._ack_deadline = now + ACK_DELAY

    def chunk_rejected(self, file_id: int, chunk: int, reason: str) -> None:
        """A chunk failed its tag or digest: ask for it again; drop a peer that keeps doing it."""
        self.bad_chunks += 1
        if self.bad_chunks > self._max_bad:
            raise IntegrityError(f"peer sent {self.bad_chunks} corrupt chunks; giving up on it")
        self._out.append(Nak([(file_id, chunk)], reason))

    def _flush_acks(self) -> None:
        if self._acks:
            self._out.append(Ack(self._acks))
            self._acks = []
        self._ack_deadline = None

    # -- file and session end -----------------------------------------------------
    def receive(self, msg: Message) -> FinalizeFile | None:
        if isinstance(msg, FileEnd):
            return self._on_file_end(msg)
        if isinstance(msg, Done):
            if not self._manifest_done:
                raise RemoteProtocolError("DONE before the last MANIFEST batch")
            self._done_received = True
            self._sender_reasons = {fid: r for fid, r in msg.failed[:len(self._files)] if fid in self._files}
            self._maybe_finish()
            return None
        raise RemoteProtocolError(f"unexpected {type(msg).__name__} at the receiver")

    def _on_file_end(self, fe: FileEnd) -> FinalizeFile | None:
        f = self._files.get(fe.file_id)
        if f is None or f.state != "receiving":
            raise RemoteProtocolError(f"FILE_END for file {fe.file_id}, which is not being received")
        e = f.entry
        if len(fe.digests) != 32 * e.chunks:
            raise RemoteProtocolError("chunk manifest has the wrong number of digests")
        self._flush_acks()
        bad = [i for i in range(e.chunks) if f.digests[i] != fe.digests[32 * i : 32 * i + 32]]
        if bad:
            for i in bad:
                if f.have.discard(i):
                    self.bytes_written -= e.chunk_len(i)
                f.digests[i] = None
            self._out.append(FileDone(e.file_id, False, bad))
            return None
        f.state = "finalizing"
        return FinalizeFile(e)

    def file_finalized(self, file_id: int, error: str = "") -> None:
        f = self._files[file_id]
        if error:
            f.state = "failed"
            self.files_failed += 1
            self.errors.append(f"{f.entry.relpath}: {error}")
            self._events.append(FileFailed(file_id, f.entry.relpath, error))
            self._out.append(FileDone(file_id, False, [], error))
        else:
            f.state = "done"
            self.files_ok += 1
            self._events.append(FileCompleted(file_id, f.entry.relpath, f.entry.size, False))
            self._out.append(FileDone(file_id, True))
        self._maybe_finish()

    @property
    def busy(self) -> bool:
        return any(f.state == "finalizing" for f in self._files.values())

    def _maybe_finish(self) -> None:
        if not self._done_received or self.finished or self.busy:
            return
        self._flush_acks()
        unfinished = [f for f in self._files.values() if f.state == "receiving"]
        for f in unfinished:
            f.state = "failed"
            self.files_failed += 1
            reason = self._sender_reasons.get(f.entry.file_id) or "incomplete (resumable)"
            self.errors.append(f"{f.entry.relpath}: {reason}")
            self._events.append(FileFailed(f.entry.file_id, f.entry.relpath, reason))
        self.finished = True
        self._out.append(Summary(self.files_ok, self.files_failed, self.bytes_written, self.errors[:100]))
        self._events.append(TransferCompleted(self.files_ok, self.files_failed))

    def unfinished_files(self) -> list[ManifestEntry]:
        return [f.entry for f in self._files.values() if f.state in ("receiving", "finalizing")]
