"""``dxa bench``: memory-to-memory throughput through the real data path.

The client seals (BLAKE3 + AEAD) chunks of an in-memory buffer on N streams for a
fixed time; the server opens and verifies every frame and discards it.  Intervals
are reported like iperf3; the total is what the server verified.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from dataclasses import dataclass, field

from agent.aio.control import ControlChannel
from agent.aio.pumps import ReceivePump
from agent.aio.session import SessionStats, _Driver
from agent.errors import RemoteProtocolError
from agent.wire import Done, Opener, Sealer, Summary, chunk_digest

__all__ = ["BenchReceiver", "BenchSender", "BenchInterval"]


class BenchReceiver(_Driver):
    def __init__(self, ctrl: ControlChannel, opener: Opener, max_frame: int, *, logger=None) -> None:
        super().__init__(ctrl, progress=None, reconnect=None, logger=logger)
        self.opener = opener
        self.max_frame = max_frame
        self.pumps: dict[int, ReceivePump] = {}
        self.verified = 0
        self.rejected = 0

    def _live_streams(self) -> int:
        return len(self.pumps)

    def _check(self, hdr) -> None:
        if hdr.plain_len > self.max_frame:
            raise RemoteProtocolError("bench frame too large")

    def add_stream(self, stream: int, sock: socket.socket) -> None:
        pump = ReceivePump(stream, sock, self.opener, self._check, None, self.max_frame, self._post, self._on_result,
                           cell=self.wire.cell())
        self.pumps[stream] = pump
        pump.start()

    def _on_result(self, pump, kind, hdr, arg, wire) -> None:
        self.stats.bytes_wire += wire
        if kind == "verified":
            self.verified += hdr.plain_len
        elif kind == "rejected":
            self.rejected += 1

    def _handle(self, msg) -> None:
        if not isinstance(msg, Done):
            raise RemoteProtocolError(f"unexpected {type(msg).__name__} in a bench session")
        self._spawn(self._finish_bench())

    async def _finish_bench(self) -> None:
        # let the pumps drain what is already in flight (the client closed its streams)
        deadline = self.loop.time() + 5
        while any(p.is_alive() for p in self.pumps.values()) and self.loop.time() < deadline:
            await asyncio.sleep(0.01)
        await self.ctrl.send(Summary(0, self.rejected, self.verified, []))
        if not self._done.done():
            self._done.set_result(None)

    async def run(self) -> SessionStats:
        self._spawn(self._read_control(self._handle))
        try:
            await self._done
        finally:
            for p in self.pumps.values():
                p.stopping = True
                try:
                    p.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            await self._finish()
        self.stats.bytes_delivered = self.verified
        return self.stats


@dataclass
class BenchInterval:
    start: float
    end: float
    bytes: int

    @property
    def gbps(self) -> float:
        return self.bytes * 8 / max(self.end - self.start, 1e-9) / 1e9


@dataclass
class BenchResult:
    seconds: float
    bytes_sent: int
    bytes_verified: int
    intervals: list[BenchInterval] = field(default_factory=list)

    @property
    def gbps(self) -> float:
        return self.bytes_verified * 8 / max(self.seconds, 1e-9) / 1e9


class BenchSender:
    """Client side: one thread per stream sealing and sending an in-memory buffer."""

    def __init__(self, socks: list[socket.socket], sealer: Sealer, chunk_size: int) -> None:
        self.socks = socks
        self.sealer = sealer
        self.buf = os.urandom(chunk_size)
        self.sent = [0] * len(socks)
        self._stop = threading.Event()
        self.errors: list[str] = []

    def _run(self, i: int) -> None:
        sock, buf, chunk = self.socks[i], self.buf, 0
        try:
            while not self._stop.is_set():
                frame = self.sealer.seal(i, chunk, 0, buf, chunk_digest(buf), "off").frame
                sock.sendall(frame)
                self.sent[i] += len(buf)
                chunk += 1
        except OSError as exc:
            self.errors.append(str(exc))
        finally:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    async def run(self, seconds: float, on_interval=None, interval: float = 1.0) -> tuple[float, int, list[BenchInterval]]:
        threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(len(self.socks))]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        intervals: list[BenchInterval] = []
        last_t, last_b = t0, 0
        while (now := time.monotonic()) < t0 + seconds:
            await asyncio.sleep(min(interval - (now - last_t) % interval, t0 + seconds - now))
            now, total = time.monotonic(), sum(self.sent)
            if now - last_t >= interval * 0.5 or now >= t0 + seconds:
                iv = BenchInterval(last_t - t0, now - t0, total - last_b)
                intervals.append(iv)
                if on_interval:
                    on_interval(iv)
                last_t, last_b = now, total
        self._stop.set()
        await asyncio.get_running_loop().run_in_executor(None, lambda: [t.join() for t in threads])
        for s in self.socks:
            s.close()
        return time.monotonic() - t0, sum(self.sent), intervals
