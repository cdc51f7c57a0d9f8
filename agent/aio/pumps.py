"""Data-connection pumps: one thread per TCP stream, blocking sockets.

Why threads: most per-chunk work (pread, BLAKE3, send/recv, pwrite) releases the GIL,
so one thread per stream runs it in parallel with no event-loop hop per socket read;
the AEAD holds the GIL (see docs/ARCHITECTURE.md, "Threads and the event loop").  Pumps own their
socket and touch no core state: they report every outcome to the event loop with
``call_soon_threadsafe``.

Bytes are counted as they move: each pump adds what every ``send``/``recv_into`` system
call moved to its own :class:`WireCell` (a plain int add by one thread: no lock, no clock
read), and a session's :class:`WireMeter` sums its pumps' cells for a current rate (the
metrics' per-transfer rate, a job's progress), which a per-chunk count cannot give: at
20 Mbit/s over 4 streams a 4 MiB chunk takes seconds.  A send pump's socket has a send
timeout of :data:`SEND_STEP` (``SO_SNDTIMEO``), so a blocking ``send`` of a whole frame
returns what it has queued at least that often while the frame drains slowly, and at full
speed still queues the frame in one call.
"""

from __future__ import annotations

import mmap
import os
import queue
import select
import socket
import struct
import threading
from typing import Callable

from agent.core import ChunkJob
from agent.errors import DxaError, IntegrityError, RemoteProtocolError
from agent.wire import (
    DATA_HEADER_LEN,
    FRAME_OVERHEAD,
    PREFIX_LEN,
    FrameType,
    Opener,
    Sealer,
    check_prefix,
    chunk_digest,
    decode_data_header,
    decode_message,
)

__all__ = ["SendPump", "ReceivePump", "recv_exactly", "SourceReader", "SourceChanged", "set_pacing",
           "tcp_bytes_acked", "WireCell", "WireMeter", "SEND_STEP"]

SO_MAX_PACING_RATE = getattr(socket, "SO_MAX_PACING_RATE", 47)


def set_pacing(sock: socket.socket, bytes_per_second: int) -> None:
    """Ask the kernel to pace this socket (works without the fq qdisc on modern kernels); -1: unpaced."""
    sock.setsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, bytes_per_second)


SEND_STEP = 0.1
"""Seconds a blocking ``send`` on a data socket may wait for buffer space before it returns
what it queued so far (``SO_SNDTIMEO``).  Without it ``send`` returns only once the whole
frame is queued, and a frame being sent would be counted (:class:`WireCell`) in one step
seconds long.  Slicing every frame into small sends would cost a GIL round trip per slice
at full speed; this costs an extra call only per ``SEND_STEP`` spent waiting, i.e. only
when the connection is slow.  (Not benchmarked separately: ``bench.bench_engine --only
big`` showed no difference beyond this machine's noise.)"""
_SNDTIMEO = struct.pack("@ll", int(SEND_STEP), int(SEND_STEP % 1 * 1_000_000))


def _set_send_step(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _SNDTIMEO)
    except (OSError, AttributeError):  # no SO_SNDTIMEO here: counted a whole send at a time
        pass


class WireCell:
    """Bytes one pump moved through its socket so far.  Only that pump's thread adds to ``n``
    (one int add per system call: no lock needed); any thread may read it."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


class WireMeter:
    """Wire bytes a session's data connections moved so far, counted per system call as they
    move: whole frames (prefix, header, tag) and parts of frames, resends included.  The
    source of a current rate; not a count of delivered or verified bytes.

    :meth:`cell` hands each new pump its own :class:`WireCell` (on the event loop); ``total``
    sums all cells ever handed out, from any thread."""

    __slots__ = ("_cells",)

    def __init__(self) -> None:
        self._cells: list[WireCell] = []

    def cell(self) -> WireCell:
        c = WireCell()
        self._cells.append(c)
        return c

    @property
    def total(self) -> int:
        return sum(c.n for c in tuple(self._cells))


def recv_exactly(sock: socket.socket, n: int, buf: bytearray | None = None,
                 cell: WireCell | None = None) -> bytearray | None:
    """Read exactly n bytes (counted into ``cell`` as they arrive); None on a clean EOF before the first byte."""
    out = buf if buf is not None else bytearray(n)
    view = memoryview(out)[:n]
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            if got == 0:
                return None
            raise ConnectionResetError("connection closed in the middle of a frame")
        got += k
        if cell is not None:
            cell.n += k
    return out


class _CountingSocket:
    """A data socket's ``sendall`` as a loop of ``send`` calls, each counted into the pump's
    cell as it returns (the socket has the SEND_STEP send timeout: a call returns after at
    most that long, partly done, or with EAGAIN when nothing could be queued).  What a
    SendPump sends through, and what SharedPacer.sendall calls for each slice it paid for."""

    __slots__ = ("_cell", "_send")

    def __init__(self, sock: socket.socket, cell: WireCell) -> None:
        _set_send_step(sock)
        self._send = sock.send
        self._cell = cell

    def sendall(self, data) -> None:
        send, cell = self._send, self._cell
        view = memoryview(data).cast("B")
        off, n = 0, len(view)
        while off < n:
            try:
                k = send(view[off:] if off else view)
            except BlockingIOError:  # SEND_STEP passed with nothing queued: still waiting
                continue
            off += k
            cell.n += k


_TCP_INFO = getattr(socket, "TCP_INFO", None)
_BYTES_ACKED = struct.Struct("=Q")
_BYTES_ACKED_AT = 120  # struct tcp_info.tcpi_bytes_acked (Linux >= 4.1)


def tcp_bytes_acked(sock: socket.socket) -> int | None:
    """Bytes of ours the peer's TCP has acknowledged (tcpi_bytes_acked); None where unknown.

    One getsockopt: for a periodic check, never per chunk."""
    if _TCP_INFO is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _BYTES_ACKED_AT + _BYTES_ACKED.size)
    except (OSError, ValueError):
        return None
    if len(info) < _BYTES_ACKED_AT + _BYTES_ACKED.size:
        return None
    return _BYTES_ACKED.unpack_from(info, _BYTES_ACKED_AT)[0]


IDLE_CHECK = 1.0  # seconds an idle send pump waits before checking its connection


def _peer_closed(sock: socket.socket) -> bool:
    try:
        r, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(r)


class SourceChanged(DxaError):
    pass


def _version(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)  # = store.tree.source_version


class SourceReader:
    """Reads chunks of local source files, checking they did not change since listing.

    Each read is bracketed by two ``fstat`` calls, both compared with the file as listed
    (``versions``: device, inode, size, mtime, ctime; size and mtime alone when a file has no
    version): a write anywhere in the file between the listing and the end of the last read
    changes ctime, so every chunk sent comes from one and the same version of the file, or
    the file fails with :class:`SourceChanged`."""

    def __init__(self, paths: dict[int, str], entries: dict, versions: dict[int, tuple[int, ...]] | None = None) -> None:
        self._paths = paths
        self._entries = entries
        self._versions = versions or {}
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def _fd(self, file_id: int) -> int:
        fd = self._fds.get(file_id)
        if fd is None:
            with self._lock:
                fd = self._fds.get(file_id)
                if fd is None:
                    try:
                        fd = os.open(self._paths[file_id], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                    except OSError as exc:
                        raise SourceChanged(f"cannot open source: {exc.strerror}") from None
                    self._fds[file_id] = fd
        return fd

    def _check(self, fd: int, file_id: int) -> None:
        st = os.fstat(fd)
        want = self._versions.get(file_id)
        if want is not None:
            if _version(st) != want:
                raise SourceChanged("source changed during transfer (size, mtime, ctime or inode differ "
                                    "from when it was listed); re-run to send its new version")
            return
        e = self._entries[file_id]
        if st.st_size != e.size or st.st_mtime_ns != e.mtime_ns:
            raise SourceChanged("source changed during transfer (size or mtime differ from when it was listed); "
                                "re-run to send its new version")

    def read(self, job: ChunkJob, buf: bytearray | memoryview | None = None) -> bytes | memoryview:
        """The chunk's bytes; into ``buf`` (reused by the caller, no allocation) when given."""
        fd = self._fd(job.file_id)
        self._check(fd, job.file_id)
        if buf is not None:
            data = memoryview(buf)[: job.length]
            got = os.preadv(fd, [data], job.offset)
        else:
            data = os.pread(fd, job.length, job.offset)
            got = len(data)
        if got != job.length:
            raise SourceChanged("source file shrank while being read")
        self._check(fd, job.file_id)  # a write during the pread: these bytes may be mixed
        return data

    def release(self, file_id: int) -> None:
        with self._lock:
            fd = self._fds.pop(file_id, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class SendPump(threading.Thread):
    """Takes jobs from its queue: verify (re-hash) or read + hash + seal + send."""

    def __init__(self, stream: int, sock: socket.socket, reader, sealer: Sealer, compress: str,
                 post: Callable, on_result: Callable, pacer=None, cell: WireCell | None = None) -> None:
        super().__init__(name=f"dxa-send-{stream}", daemon=True)
        self.stream = stream
        self.sock = sock
        self.jobs: queue.SimpleQueue[ChunkJob | None] = queue.SimpleQueue()
        self.queued = 0
        self._reader = reader
        self._sealer = sealer
        self._compress = compress
        self._post = post
        self._on_result = on_result
        # the transfer's SharedPacer (agent/aio/pacing.py), shared by all its pumps, or None
        self._pacer = pacer
        # bytes sent, counted per send() (WireCell): what the session's rate is measured from
        self.cell = cell if cell is not None else WireCell()
        self._out = _CountingSocket(sock, self.cell)
        # one frame buffer per pump, reused chunk after chunk (no per-chunk allocation or
        # zero-fill; sendall returns before the next read): the chunk is read into the
        # payload's place, hashed, and sealed there in place
        self._fbuf = bytearray()

    def run(self) -> None:
        try:
            self._run()
        finally:
            self.sock.close()

    def _run(self) -> None:
        while True:
            try:
                job = self.jobs.get(timeout=IDLE_CHECK)
            except queue.Empty:
                # Idle with frames possibly still un-ACKed: a send pump never reads, so a
                # connection that died after our last sendall would go unnoticed and its
                # chunks would wait for ACKs forever.  The receiver never writes on a data
                # connection except to close it, so "readable" means "gone".
                if _peer_closed(self.sock):
                    self._post(self._on_result, self, "broken", None, "connection closed by the peer", 0)
                    return
                continue
            if job is None:
                return
            if len(self._fbuf) < job.length + FRAME_OVERHEAD:
                self._fbuf = bytearray(job.length + FRAME_OVERHEAD)
            try:
                # read where the payload goes in the frame: hashed, then sealed in place
                data = self._reader.read(job, memoryview(self._fbuf)[DATA_HEADER_LEN:])
            except (SourceChanged, OSError) as exc:
                self._post(self._on_result, self, "source_failed", job, str(exc), 0)
                continue
            digest = chunk_digest(data)
            if job.verify:
                self._post(self._on_result, self, "verified", job, digest, 0)
                continue
            sealed = self._sealer.seal(job.file_id, job.chunk, job.offset, data, digest, self._compress,
                                       out=self._fbuf)
            del data
            try:
                if self._pacer is not None:
                    self._pacer.sendall(self._out, sealed.frame)  # in slices, each paid for first
                else:
                    self._out.sendall(sealed.frame)
            except OSError as exc:
                self._post(self._on_result, self, "broken", job, str(exc), 0)
                return
            self._post(self._on_result, self, "sent", job, digest, sealed.wire_payload)

    def stop(self) -> None:
        self.jobs.put(None)


class _WriteBehind(threading.Thread):
    """Writes a receive pump's verified chunks while the pump receives, opens and hashes the
    next frame into its other slot.  A direct (``O_DIRECT``) write waits for the device,
    and writes to one file are serialized (``_Open.wlock``): done in line, every pump sat in
    ``pwrite`` a good part of the time with its socket unread.  Posts ``verified`` once a
    chunk is on disk, or ``storage`` (and then writes nothing more) when a write failed."""

    def __init__(self, pump: "ReceivePump", write: Callable) -> None:
        super().__init__(name=f"dxa-write-{pump.stream}", daemon=True)
        self._pump = pump
        self._write = write
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.failed = False

    def run(self) -> None:
        pump = self._pump
        while (item := self.jobs.get()) is not None:
            hdr, plain, free = item
            if not self.failed:
                try:
                    self._write(hdr.file_id, hdr.offset, plain)
                except DxaError as exc:
                    self.failed = True
                    pump._post(pump._on_result, pump, "storage", hdr, exc, hdr.payload_len)
                else:
                    pump._post(pump._on_result, pump, "verified", hdr, hdr.digest, hdr.payload_len)
            del plain
            free.set()


class ReceivePump(threading.Thread):
    """Reads DATA frames, opens and verifies them, and has them written at their offset.

    Two frame buffers (slots), page-aligned (anonymous ``mmap``): a frame's payload and tag
    are received into a free slot and opened in place, so the plaintext starts on a page
    boundary and a direct (``O_DIRECT``) write takes it as it is, with no second buffer.
    While :class:`_WriteBehind` writes one slot's chunk, the pump receives and opens the next
    frame into the other.  Results reach the loop in order per pump: every write in flight
    is finished before the pump reports ``eof`` or ``broken``."""

    def __init__(self, stream: int, sock: socket.socket, opener: Opener, check_header: Callable,
                 write: Callable | None, max_frame: int, post: Callable, on_result: Callable,
                 cell: WireCell | None = None) -> None:
        super().__init__(name=f"dxa-recv-{stream}", daemon=True)
        self.stream = stream
        self.sock = sock
        self._opener = opener
        self._check = check_header
        self._max_frame = max_frame
        self._post = post
        self._on_result = on_result
        self.stopping = False
        self.cell = cell if cell is not None else WireCell()  # bytes received, counted per recv_into()
        self._hbuf = bytearray(DATA_HEADER_LEN - PREFIX_LEN)  # the rest of a DATA header
        # payload + tag of a frame, opened in place, reused (see SendPump); each slot's
        # "free" is set while no write of it is in flight
        self._slots: list = [bytearray(), bytearray()]
        self._free = [threading.Event(), threading.Event()]
        for ev in self._free:
            ev.set()
        self._writer = _WriteBehind(self, write) if write is not None else None

    def run(self) -> None:
        if self._writer is not None:
            self._writer.start()
        outcome: tuple = ("eof", None)
        try:
            self._loop()
        except (OSError, RemoteProtocolError, DxaError) as exc:
            outcome = ("broken", exc)
        finally:
            self.sock.close()
            if self._writer is not None:
                self._writer.jobs.put(None)
                self._writer.join()
        if outcome[0] == "broken" and self.stopping:
            return
        self._post(self._on_result, self, outcome[0], None, outcome[1], 0)

    def _loop(self) -> None:
        sock, cell, writer = self.sock, self.cell, self._writer
        rest = DATA_HEADER_LEN - PREFIX_LEN
        slot = 0
        while True:
            prefix = recv_exactly(sock, PREFIX_LEN, None, cell)
            if prefix is None:
                return
            ftype, length = check_prefix(prefix, self._max_frame)
            if ftype != FrameType.DATA:
                body = recv_exactly(sock, length, None, cell) if length else b""
                if body is None:
                    raise ConnectionResetError("connection closed in the middle of a frame")
                msg = decode_message(ftype, bytes(body))
                raise RemoteProtocolError(f"unexpected {type(msg).__name__} on a data connection")
            if length < rest:
                raise RemoteProtocolError("truncated DATA header")
            if recv_exactly(sock, rest, self._hbuf, cell) is None:
                raise ConnectionResetError("connection closed in the middle of a frame")
            header = bytes(prefix) + bytes(self._hbuf)
            hdr = decode_data_header(header)
            self._check(hdr)
            free = self._free[slot]
            free.wait()  # that slot's previous write is done
            if writer is not None and writer.failed:
                return
            n = length - rest  # payload and tag
            buf = self._slots[slot]
            if len(buf) < n:
                buf = self._slots[slot] = mmap.mmap(-1, n)
            frame = memoryview(buf)[:n]
            if recv_exactly(sock, n, frame, cell) is None:
                raise ConnectionResetError("connection closed in the middle of a frame")
            try:
                plain = self._opener.open(hdr, header, frame, out=frame)  # in place
            except IntegrityError as exc:
                self._post(self._on_result, self, "rejected", hdr, str(exc), hdr.payload_len)
                continue
            if writer is None:
                self._post(self._on_result, self, "verified", hdr, hdr.digest, hdr.payload_len)
                continue
            free.clear()
            writer.jobs.put((hdr, plain, free))
            slot ^= 1
