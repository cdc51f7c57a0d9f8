"""Session drivers: wire a sans-I/O core to its control channel, pumps and store.

A driver owns nothing but glue: it feeds control messages and pump outcomes into
the core and writes out what the core asks for.  Pump outcomes arrive on the event
loop thread through ``call_soon_threadsafe``; the core is only touched from there.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from agent.aio.control import ControlChannel
from agent.aio.pacing import SharedPacer
from agent.aio.pumps import ReceivePump, SendPump, SourceReader, WireMeter, tcp_bytes_acked
from agent.core import ChunkRetried, FileCompleted, FileFailed, ReceiverCore, SenderCore
from agent.core import StreamStalled
from agent.errors import BrokenConnectionError, DxaError, IntegrityError, TransferError
from agent.store.receiving import ReceiverStore
from agent.wire import Done, ErrorMsg, FileEnd, Manifest, Opener, Sealer

__all__ = ["SenderSession", "ReceiverSession", "Progress", "SessionStats"]

log = logging.getLogger(__name__)

PUMP_DEPTH = 2
JOURNAL_FLUSH = 0.25
MAX_RECONNECTS = 5


@dataclass
class Progress:
    """What a progress display needs; updated in place by the driver."""

    bytes_total: int = 0
    bytes_done: int = 0
    """Bytes verified at the destination (or found there already): moves a chunk at a time."""
    files_total: int = 0
    files_done: int = 0
    started: float = field(default_factory=time.monotonic)
    wire: WireMeter = field(default_factory=WireMeter, repr=False, compare=False)
    """What the session's pumps count into as bytes move (the driver uses this meter)."""

    @property
    def bytes_moved(self) -> int:
        """Bytes sent or received on the data connections so far, counted per system call as they
        move (frame overhead, partial frames and resends included).  The source for a current
        rate: sample it and divide by the time between samples.  Not verified; see ``bytes_done``."""
        return self.wire.total


@dataclass
class SessionStats:
    bytes_total: int = 0
    bytes_wire: int = 0
    bytes_skipped: int = 0
    bytes_delivered: int = 0
    files: int = 0
    files_ok: int = 0
    files_failed: int = 0
    chunks_retried: int = 0
    streams_reconnected: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def outcome(self) -> str:
        """How a finished session ended, for logs and metrics: ``ok`` or ``incomplete``."""
        return "ok" if not self.files_failed and not self.errors else "incomplete"


Reconnect = Callable[[int, int], Awaitable[socket.socket]]


class _Driver:
    def __init__(self, ctrl: ControlChannel, *, progress: Progress | None, reconnect: Reconnect | None,
                 logger: logging.Logger | logging.LoggerAdapter | None) -> None:
        self.ctrl = ctrl
        self.loop = asyncio.get_running_loop()
        self.progress = progress or Progress()
        self.wire = self.progress.wire  # bytes as they move, for rates (metrics, job progress)
        self.stats = SessionStats()
        self._reconnect = reconnect
        self._epochs: dict[int, int] = {}
        self._done: asyncio.Future = self.loop.create_future()
        self._tasks: set[asyncio.Task] = set()
        self._plan_tail: asyncio.Task | None = None
        self.log = logger or log

    def _post(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed while a pump finished
            pass

    def _fail(self, exc: BaseException) -> None:
        if not self._done.done():
            self._done.set_exception(exc)

    def abort(self, exc: BaseException) -> None:
        """End the session with ``exc`` (the daemon's idle timeout): ``run`` raises it."""
        self._fail(exc)

    @property
    def working(self) -> bool:
        """True while this side is busy on its own (planning a manifest, finishing files), so
        that a silent peer is not taken for an idle one (the daemon's idle timeout)."""
        return bool(getattr(self, "_finalizing", False)) or (
            self._plan_tail is not None and not self._plan_tail.done())

    def _spawn(self, coro) -> asyncio.Task:
        t = self.loop.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._task_done)
        return t

    def _task_done(self, t: asyncio.Task) -> None:
        self._tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            self._fail(t.exception())

    def _flush(self, core) -> None:
        try:
            self.ctrl.send_nowait(core.control_to_send())
        except (ConnectionError, RuntimeError, OSError) as exc:
            self._fail(BrokenConnectionError(f"control connection broke: {exc}"))

    def _stream_lost(self, stream: int, reason: str) -> None:
        self.log.warning("data stream %d lost: %s", stream, reason)
        if self._reconnect is None:
            return
        self._spawn(self._rejoin(stream))

    async def _rejoin(self, stream: int) -> None:
        delay = 0.2
        last: Exception | None = None
        for _attempt in range(MAX_RECONNECTS):
            if self._done.done():
                return
            epoch = self._epochs.get(stream, 0) + 1
            self._epochs[stream] = epoch
            try:
                sock = await self._reconnect(stream, epoch)
            except (OSError, DxaError) as exc:
                last = exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self.stats.streams_reconnected += 1
            self.add_stream(stream, sock)
            return
        if not self._live_streams():
            self._fail(BrokenConnectionError(f"all data connections lost; last error: {last}"))

    async def _read_control(self, handle) -> None:
        while not self._done.done():
            msg = await self.ctrl.recv()
            handle(msg)

    async def _finish(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class SenderSession(_Driver):
    def __init__(self, ctrl: ControlChannel, core: SenderCore, reader: SourceReader, sealer: Sealer, compress: str,
                 *, files_total: int, progress: Progress | None = None, reconnect: Reconnect | None = None,
                 logger=None, rate: float = 0, pacer: SharedPacer | None = None) -> None:
        super().__init__(ctrl, progress=progress, reconnect=reconnect, logger=logger)
        self.core = core
        self.reader = reader
        # all data connections together: an aggregate token bucket (rate in bits/s, 0 =
        # unlimited) plus kernel pacing per socket; ``pacer`` may come from the caller
        # (a controller or library user who changes the rate mid-flight)
        self.pacer = pacer if pacer is not None else SharedPacer(rate)
        if pacer is not None and rate:
            pacer.set_rate(rate)
        self.sealer = sealer
        self.compress = compress
        self.pumps: dict[int, SendPump] = {}
        self._timer: asyncio.TimerHandle | None = None
        self.progress.bytes_total = core.bytes_total
        self.progress.files_total = files_total
        self.stats.bytes_total = core.bytes_total
        self.stats.files = files_total

    def _live_streams(self) -> int:
        return len(self.pumps)

    def add_stream(self, stream: int, sock: socket.socket) -> None:
        old = self.pumps.pop(stream, None)
        if old is not None:
            self._retire(old, "replaced by a new connection")
        self.pacer.attach(sock)
        pump = SendPump(stream, sock, self.reader, self.sealer, self.compress, self._post, self._on_result,
                        pacer=self.pacer, cell=self.wire.cell())
        self.pumps[stream] = pump
        pump.start()
        self._pump()

    def set_rate(self, rate_bps: float) -> None:
        """Pace this transfer to ``rate_bps`` bits/s in total from now on (0 = unlimited).

        Callable from the event loop or any thread; pumps waiting for credit are re-timed
        at once.  Raises ConfigError for a negative or non-finite rate."""
        self.pacer.set_rate(rate_bps)

    @property
    def rate(self) -> float:
        return self.pacer.rate_bps

    def _retire(self, pump: SendPump, reason: str) -> None:
        pump.stop()
        self.pacer.detach(pump.sock)
        self.core.stream_lost(pump.stream)
        while True:
            try:
                job = pump.jobs.get_nowait()
            except Exception:
                break
            if job is not None and job.verify:
                self.core.job_failed(job, pump.stream, reason)
        try:
            pump.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _on_result(self, pump: SendPump, kind: str, job, arg, wire: int) -> None:
        if self._done.done():
            return
        if self.pumps.get(pump.stream) is not pump:
            if kind == "verified":
                self.core.verified(job, arg)
            self._pump()
            return
        pump.queued -= 1
        if kind == "sent":
            self.stats.bytes_wire += wire
            self.core.sent(job, arg)
        elif kind == "verified":
            self.core.verified(job, arg)
        elif kind == "source_failed":
            self.core.source_failed(job.file_id, arg)
        elif kind == "broken":
            self._lose(pump, arg)
        self._pump()

    def _lose(self, pump: SendPump, reason: str) -> None:
        """A data connection is gone (broken, or stalled and closed by us): requeue, re-join."""
        del self.pumps[pump.stream]
        self._retire(pump, reason)
        self._stream_lost(pump.stream, reason)

    def _arm_timer(self) -> None:
        deadline = self.core.get_timer()
        if deadline is not None and self._timer is None and not self._done.done():
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        # the ACK-timeout watch: one check every ack_timeout/4, whatever the chunk rate;
        # the transport token lets a slow but moving connection count as alive
        self._timer = None
        if self._done.done():
            return
        self.core.handle_timer(self.loop.time(), {s: tcp_bytes_acked(p.sock) for s, p in self.pumps.items()})
        self._pump()
        self._arm_timer()

    def _pump(self) -> None:
        core = self.core
        for pump in self.pumps.values():
            while pump.queued < PUMP_DEPTH:
                job = core.next_job(pump.stream)
                if job is None:
                    break
                pump.queued += 1
                pump.jobs.put(job)
        if self.pacer.rate_bps:
            self.pacer.set_busy([p.sock for p in self.pumps.values() if p.queued])
        self._flush(core)
        lost = False
        while (ev := core.next_event()) is not None:
            if isinstance(ev, StreamStalled):
                pump = self.pumps.get(ev.stream)
                if pump is not None:
                    lost = True
                    self._lose(pump, f"no acknowledgement for {ev.seconds:.1f} s with chunks outstanding")
            elif isinstance(ev, FileCompleted):
                self.reader.release(ev.file_id)
                self.progress.files_done += 1
            elif isinstance(ev, FileFailed):
                self.reader.release(ev.file_id)
                self.stats.errors.append(f"{ev.relpath}: {ev.reason}")
                self.log.warning("file failed: %s: %s", ev.relpath, ev.reason)
            elif isinstance(ev, ChunkRetried):
                self.log.info("chunk %d of file %d sent again: %s", ev.chunk, ev.file_id, ev.reason)
        self.progress.bytes_done = core.bytes_acked + core.bytes_skipped
        if core.finished and not self._done.done():
            self._done.set_result(None)
        elif lost:
            self._pump()  # hand the requeued chunks to the connections that are left

    def _handle(self, msg) -> None:
        self.core.receive(msg)
        self._pump()

    async def run(self) -> SessionStats:
        self._pump()
        self._arm_timer()
        self._spawn(self._read_control(self._handle))
        try:
            await self._done
            await self.ctrl.drain()
        finally:
            if self._timer is not None:
                self._timer.cancel()
            for pump in self.pumps.values():
                pump.stop()
            self.pacer.release()
            await self._finish()
            self.reader.close()
        c = self.core
        s = self.stats
        s.bytes_skipped, s.bytes_delivered = c.bytes_skipped, c.bytes_acked
        s.files_ok, s.files_failed, s.chunks_retried = c.files_ok, c.files_failed, c.chunks_retried
        if c.summary is not None:
            s.errors.extend(e for e in c.summary.errors if e not in s.errors)
        return s


class ReceiverSession(_Driver):
    def __init__(self, ctrl: ControlChannel, core: ReceiverCore, store: ReceiverStore, opener: Opener, max_frame: int,
                 *, progress: Progress | None = None, reconnect: Reconnect | None = None, logger=None) -> None:
        super().__init__(ctrl, progress=progress, reconnect=reconnect, logger=logger)
        self.core = core
        self.store = store
        self._to_finalize: list = []
        self._finalizing = False
        self.opener = opener
        self.max_frame = max_frame
        self.pumps: dict[int, ReceivePump] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._manifest_bytes = 0
        self._skipped = 0

    def _live_streams(self) -> int:
        return len(self.pumps)

    def add_stream(self, stream: int, sock: socket.socket) -> None:
        old = self.pumps.pop(stream, None)
        if old is not None:
            old.stopping = True
            try:
                old.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        pump = ReceivePump(stream, sock, self.opener, self.core.check_header, self.store.write_chunk,
                           self.max_frame, self._post, self._on_result, cell=self.wire.cell())
        self.pumps[stream] = pump
        pump.start()

    def _on_result(self, pump: ReceivePump, kind: str, hdr, arg, wire: int) -> None:
        if self._done.done():
            if kind == "verified":  # verified and on disk: worth journaling even as we fail
                self.store.record(hdr.file_id, hdr.chunk, arg)
            return
        self.stats.bytes_wire += wire
        try:
            if kind == "verified":
                self.core.chunk_verified(hdr.file_id, hdr.chunk, arg, self.loop.time())
                self.store.record(hdr.file_id, hdr.chunk, arg)
            elif kind == "rejected":
                self.log.warning("chunk %d of file %d rejected: %s", hdr.chunk, hdr.file_id, arg)
                self.stats.chunks_retried += 1
                self.core.chunk_rejected(hdr.file_id, hdr.chunk, arg)
            elif kind == "storage":
                raise arg
            elif kind in ("broken", "eof"):
                if self.pumps.get(pump.stream) is pump:
                    del self.pumps[pump.stream]
                    if kind == "broken":
                        self._stream_lost(pump.stream, str(arg))
                    elif self._reconnect is not None:
                        # a sender closes a data connection before the end only when it
                        # gave it up (no ACKs came back): join again, as after a break
                        self._stream_lost(pump.stream, "closed by the sender")
                if kind == "broken" and isinstance(arg, IntegrityError):
                    raise arg
        except DxaError as exc:
            self._fail(exc)
            return
        self._after()

    def _after(self) -> None:
        core = self.core
        deadline = core.get_timer()
        if deadline is not None and self._timer is None:
            self._timer = self.loop.call_at(deadline, self._on_timer)
        self._flush(core)
        while (ev := core.next_event()) is not None:
            if isinstance(ev, FileCompleted):
                self.progress.files_done += 1
            elif isinstance(ev, FileFailed):
                self.stats.errors.append(f"{ev.relpath}: {ev.reason}")
        self.progress.bytes_done = self._skipped + core.bytes_written
        if core.finished and not self._done.done():
            self._done.set_result(None)

    def _on_timer(self) -> None:
        self._timer = None
        self.core.handle_timer(self.loop.time())
        self._after()

    def _handle(self, msg) -> None:
        # MANIFEST batches are planned in a worker thread, one after the other and in
        # order (the receiver core insists on it); DONE waits for the last plan.
        if isinstance(msg, Manifest):
            self._plan_tail = self._spawn(self._plan(msg, self._plan_tail))
        elif isinstance(msg, FileEnd):
            fin = self.core.receive(msg)
            if fin is not None:
                self._queue_finalize(fin.entry)
        elif isinstance(msg, Done):
            self._spawn(self._done_after_plans(msg))
        elif isinstance(msg, ErrorMsg):
            self._fail(TransferError(f"peer error {msg.code}: {msg.message}"))
        else:
            self.core.receive(msg)
        self._after()

    async def _done_after_plans(self, done: Done) -> None:
        if self._plan_tail is not None:
            await asyncio.shield(self._plan_tail)
        self.core.receive(done)
        self._after()

    async def _plan(self, manifest: Manifest, previous: asyncio.Task | None) -> None:
        if previous is not None:
            await asyncio.shield(previous)
        entries = manifest.entries
        self.core.check_manifest(manifest)  # a hostile batch ends the session before it touches the disk
        plan = await self.loop.run_in_executor(None, self.store.plan, entries)
        self.core.receive_manifest(manifest, plan)
        by_id = {e.file_id: e for e in entries}
        for pe in plan:
            e = by_id[pe.file_id]
            if pe.action == "skip":
                self._skipped += e.size if e.kind == "f" else 0
                self.stats.bytes_skipped += e.size if e.kind == "f" else 0
                self.progress.files_done += 1
                self.stats.files_ok += 1
            elif pe.action == "refuse":
                self.stats.errors.append(f"{e.relpath}: refused: {pe.reason}")
                self.stats.files_failed += 1
            elif pe.action == "resume":
                self._skipped += sum(e.chunk_len(i) for i, _ in pe.have)
            self.stats.bytes_total += e.size if e.kind == "f" else 0
            self.stats.files += 1
        self.progress.bytes_total = self.stats.bytes_total
        self.progress.files_total = self.stats.files
        self._after()

    def _queue_finalize(self, entry) -> None:
        # files are finished in batches, one worker-thread hop per batch: with many small
        # files a hop per file costs more than the rename itself
        self._to_finalize.append(entry)
        if not self._finalizing:
            self._finalizing = True
            self._spawn(self._finalizer())

    async def _finalizer(self) -> None:
        try:
            while self._to_finalize:
                batch, self._to_finalize = self._to_finalize, []
                results = await self.loop.run_in_executor(None, self._finalize_batch, batch)
                for entry, error in results:
                    self.core.file_finalized(entry.file_id, error)
                self._after()
        finally:
            self._finalizing = False

    def _finalize_batch(self, batch: list) -> list:
        results = []
        for entry in batch:
            try:
                self.store.finalize(entry)
                results.append((entry, ""))
            except DxaError as exc:
                self.log.error("could not finish %s: %s", entry.relpath, exc)
                results.append((entry, str(exc)))
        return results

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(JOURNAL_FLUSH)
            await self.loop.run_in_executor(None, self.store.flush)

    async def run(self) -> SessionStats:
        self._spawn(self._read_control(self._handle))
        self._spawn(self._flusher())
        try:
            await self._done
            await self.ctrl.drain()
        finally:
            for pump in self.pumps.values():
                pump.stopping = True
                try:
                    pump.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            if self._timer is not None:
                self._timer.cancel()
            await self._finish()
            try:
                await self.loop.run_in_executor(None, self.store.close)
            except DxaError as exc:
                if self._done.done() and not self._done.cancelled() and self._done.exception() is None:
                    raise  # the transfer itself went well: this failure is the news
                self.log.warning("closing the store after a failure: %s", exc)
            self.store.finish_dirs()
        c = self.core
        s = self.stats
        s.files_ok += c.files_ok
        s.files_failed += c.files_failed
        s.bytes_delivered = c.bytes_written
        s.bytes_skipped = self._skipped
        return s
