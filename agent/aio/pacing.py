"""The pacer adapter: one thread-safe aggregate pacer per transfer, shared by its send pumps.

:class:`agent.core.pacer.Pacer` holds the logic (a token bucket with injected time);
this adapter adds the lock, the clock, the sleeping, and the sockets:

* a pump sends each frame in slices of :attr:`SharedPacer.quantum` bytes (about 5 ms
  at the rate), each slice paid for in the shared bucket before ``sendall``;
* every data socket is also paced by the kernel (``SO_MAX_PACING_RATE``) at its fair
  share of the rate x 1.2, so no stream sends a slice at line rate; the share counts
  the streams that have work (:meth:`SharedPacer.set_busy`), so the last streams of a
  transfer are not held back;
* a paced socket gets a small ``TCP_NOTSENT_LOWAT``: what the bucket lets go leaves
  the host, instead of queueing in a socket buffer to be drained later above the rate;
* :meth:`SharedPacer.set_rate` may be called from any thread (the event loop, a
  controller, a library user) and takes effect at once: pumps waiting for credit are
  woken and re-timed at the new rate, and every socket gets its new share.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

from agent.aio.pumps import set_pacing
from agent.core.pacer import Pacer, check_rate

__all__ = ["BURST_SECONDS", "SHARE_HEADROOM", "SharedPacer"]

SHARE_HEADROOM = 1.2
"""Kernel pacing per socket: fair share of the rate x this (the aggregate bucket holds the total)."""
BURST_SECONDS = 0.02
"""Credit the bucket may hold: 20 ms of the rate (absorbs late wake-ups, bounds bursts to 2%)."""
QUANTUM_SECONDS = 0.005
MIN_QUANTUM = 16 << 10
MAX_QUANTUM = 1 << 20
MIN_NOTSENT = 32 << 10
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
_UNPACED = -1  # ~0U: no kernel pacing (SO_MAX_PACING_RATE), no low-water mark (TCP_NOTSENT_LOWAT)


class SharedPacer:
    """``SharedPacer(rate_bps)``: pace all streams of one transfer to ``rate_bps`` in total (0 = unlimited)."""

    def __init__(self, rate_bps: float = 0, *, clock: Callable[[], float] = time.monotonic) -> None:
        rate = check_rate(rate_bps)
        self._clock = clock
        self._cond = threading.Condition(threading.Lock())
        self._pacer = Pacer(rate, self._burst(rate), clock())
        self._rate = rate
        self._quantum = self._quantum_for(rate)
        self._socks: list[socket.socket] = []
        self._busy: set[socket.socket] = set()
        self._applied: dict[socket.socket, tuple[int, int]] = {}  # (pacing rate, notsent lowat) set
        self._generation = 0  # bumped by release(): pumps waiting then give up waiting

    @staticmethod
    def _burst(rate_bps: float) -> float:
        return rate_bps / 8 * BURST_SECONDS

    @staticmethod
    def _quantum_for(rate_bps: float) -> int:
        return int(min(MAX_QUANTUM, max(MIN_QUANTUM, rate_bps / 8 * QUANTUM_SECONDS)))

    @property
    def rate_bps(self) -> float:
        return self._rate

    @property
    def quantum(self) -> int:
        return self._quantum

    @property
    def reserved_bytes(self) -> float:
        """Bytes granted (or being waited for) so far while paced; unlimited sends are not counted."""
        return self._pacer.reserved_bytes

    # -- rate -------------------------------------------------------------------------------
    def set_rate(self, rate_bps: float) -> None:
        """New total rate in bits/s (0 = unlimited), from any thread; effective at once."""
        rate = check_rate(rate_bps)
        with self._cond:
            self._pacer.set_rate(rate, self._clock(), self._burst(rate))
            self._rate = rate
            self._quantum = self._quantum_for(rate)
            self._cond.notify_all()
            self._apply()

    # -- sockets ----------------------------------------------------------------------------
    def attach(self, sock: socket.socket) -> None:
        """A data socket of this transfer: kernel-paced at its share of the rate."""
        with self._cond:
            if sock not in self._socks:
                self._socks.append(sock)
            self._apply()

    def detach(self, sock: socket.socket) -> None:
        """A socket that no longer carries data: the others get its share."""
        with self._cond:
            if sock in self._socks:
                self._socks.remove(sock)
            self._busy.discard(sock)
            self._applied.pop(sock, None)
            self._apply()

    def set_busy(self, socks) -> None:
        """The sockets that have work queued now share the rate (all attached ones if none
        has): at the end of a transfer the last busy streams are not held to a share
        sized for streams that have nothing left to send."""
        with self._cond:
            busy = {s for s in socks if s in self._socks}
            if busy != self._busy:
                self._busy = busy
                self._apply()

    def share(self) -> int:
        """SO_MAX_PACING_RATE per socket now, in bytes/s (0: not paced)."""
        with self._cond:
            return self._share()

    def _share(self) -> int:
        if not self._rate:
            return 0
        n = len(self._busy) or len(self._socks)
        return max(1000, min(int(self._rate / 8 / max(1, n) * SHARE_HEADROOM), 2**31 - 1))

    def _apply(self) -> None:
        """(Lock held.)  Give every socket its kernel pacing rate and not-sent low-water mark:
        while paced, ``sendall`` returns only when the socket has little unsent data, so
        bytes the bucket lets go are bytes on the wire, not a backlog (after TCP slow start
        or a stall) that a socket would later drain above the rate."""
        if self._rate:
            want = (self._share(), max(MIN_NOTSENT, self._quantum))
        else:
            want = (_UNPACED, _UNPACED)
        for s in self._socks:
            have = self._applied.get(s)
            if have == want or (have is None and want[0] == _UNPACED):
                continue
            try:
                set_pacing(s, want[0])
                s.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, want[1])
            except OSError:  # closed under us: its pump reports it
                continue
            self._applied[s] = want

    # -- pumps --------------------------------------------------------------------------------
    def acquire(self, nbytes: int) -> None:
        """Block until ``nbytes`` may be sent (returns at once when unlimited or closed)."""
        if not self._rate:  # unlimited: no lock on the fast path
            return
        with self._cond:
            pacer, clock = self._pacer, self._clock
            ticket = pacer.take(nbytes, clock())
            generation = self._generation
            while generation == self._generation:
                delay = pacer.wait_time(ticket, clock())
                if delay <= 0:
                    return
                self._cond.wait(delay)

    def sendall(self, sock: socket.socket, data) -> None:
        """``sock.sendall(data)`` at the shared rate, slice by slice."""
        if not self._rate:
            sock.sendall(data)
            return
        view = memoryview(data).cast("B")
        off, n = 0, len(view)
        while off < n:
            q = self._quantum
            piece = view[off : off + q]
            self.acquire(len(piece))
            sock.sendall(piece)
            off += len(piece)

    def release(self) -> None:
        """The session is over: wake every pump waiting now and forget the sockets.

        The pacer stays usable: a caller may hand it to the next transfer (a resume)."""
        with self._cond:
            self._generation += 1
            self._cond.notify_all()
            self._socks.clear()
            self._busy.clear()
            self._applied.clear()
