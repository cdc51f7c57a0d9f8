"""Prometheus metrics for ``dxa serve`` (``--metrics HOST:PORT``).

Each Server owns one :class:`ServerMetrics` with a private ``CollectorRegistry`` (no
global state: several servers may run in one process) and its own HTTP endpoint.
It counts the sessions the daemon serves (the Server calls :meth:`ServerMetrics.session_started`
and ``session_ended``: modes ``push``, ``pull``, ``bench``) and the copies it runs itself
when they are handed the same object (``agent.aio.client.copy(..., metrics=...)``, which the
daemon's transfer jobs do: modes ``send`` for a push, ``fetch`` for a pull).
Values are read at scrape time from the live sessions' ``SessionStats`` plus what
finished sessions left behind, so counters need no hooks in the data path.  A
sampler task on the server's event loop refreshes, once per ``interval``, the rate of
each transfer and the RTT and retransmits of its data sockets (``TCP_INFO``).  The rate
comes from the session's :class:`~agent.aio.pumps.WireMeter`, which the pumps advance per
``send``/``recv`` system call, so it reads the real rate every interval even when one chunk
takes many intervals to cross; the byte counters move a chunk at a time (they count a
chunk's payload once it is sent or verified, and never go back).

Exposed (all prefixed ``dxa_``):

==================================  =======  ==================================================
``bytes_total{direction}``          counter  payload bytes on the wire, ``received``/``sent``
``files_completed_total``           counter  files verified (or already present)
``files_failed_total``              counter  files that did not arrive
``chunks_retried_total``            counter  chunks sent again
``transfers_total{mode,outcome}``   counter  ended transfers: ok, incomplete, failed
``active_transfers``                gauge    sessions running now
``transfer_rate_bytes_per_second``  gauge    per live session (``session``, ``mode``, ``peer``)
``peer_rtt_seconds{peer}``          gauge    mean smoothed RTT of the peer's data sockets
``peer_retransmits_total{peer}``    counter  TCP segments retransmitted on them
``certificate_expiry_seconds``      gauge    seconds until a certificate expires (``certificate``:
                                             ``node`` or ``ca``; negative once expired), from the
                                             files the daemon loaded last (start, SIGHUP)
==================================  =======  ==================================================

``peer`` is the certificate name of the other agent.  Files and retried chunks of a
running transfer are sampled every ``interval`` (exact once it ends); retransmits are
sampled too, so the last ``interval`` of a connection before it closes may be missed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from agent.aio.session import ReceiverSession, SenderSession

__all__ = ["SampledCollector", "ServerMetrics", "TcpInfo", "parse_tcp_info", "read_tcp_info"]

log = logging.getLogger(__name__)

TCP_INFO_LEN = 232
"""Bytes asked of getsockopt(TCP_INFO): the kernel fills what it knows, zero-pads the rest."""

# struct tcp_info (linux/tcp.h): 8 one-byte fields, then u32s.  tcpi_rtt is the 16th
# u32 (byte 68, microseconds), tcpi_total_retrans the 24th (byte 100).
_TCP_INFO = struct.Struct("=8B24I")
_RTT, _RTTVAR, _TOTAL_RETRANS = 8 + 15, 8 + 16, 8 + 23

DIRECTIONS = {"push": "received", "bench": "received", "pull": "sent", "send": "sent", "fetch": "received"}
"""Mode of a session → the direction of its bytes: served sessions (``push``, ``pull``, ``bench``)
and this agent's own copies (``send``: it pushes, ``fetch``: it pulls)."""


@dataclass(frozen=True)
class TcpInfo:
    rtt_us: int
    """Smoothed round-trip time, microseconds (tcpi_rtt)."""
    rttvar_us: int
    """Its mean deviation (tcpi_rttvar)."""
    total_retrans: int
    """Segments retransmitted over the connection's life (tcpi_total_retrans)."""


def parse_tcp_info(buf: bytes) -> TcpInfo:
    """Decode the fields we use from a ``struct tcp_info`` as returned by getsockopt."""
    if len(buf) < _TCP_INFO.size:
        raise ValueError(f"tcp_info too short: {len(buf)} bytes, need {_TCP_INFO.size}")
    f = _TCP_INFO.unpack_from(buf)
    return TcpInfo(rtt_us=f[_RTT], rttvar_us=f[_RTTVAR], total_retrans=f[_TOTAL_RETRANS])


def read_tcp_info(sock: socket.socket) -> TcpInfo | None:
    """TCP_INFO of a connected socket; None where unavailable (closed socket, not Linux)."""
    opt = getattr(socket, "TCP_INFO", None)
    if opt is None:
        return None
    try:
        return parse_tcp_info(sock.getsockopt(socket.IPPROTO_TCP, opt, TCP_INFO_LEN))
    except (OSError, ValueError):
        return None


@dataclass
class _Live:
    mode: str
    peer: str
    driver: object
    rate: float = 0.0
    counts: tuple[int, int, int] = (0, 0, 0)  # files ok, files failed, chunks retried at the last sample
    last_bytes: int = 0
    last_t: float = field(default_factory=time.monotonic)


@dataclass
class _Peer:
    retrans: int = 0
    rtt: float | None = None
    seen: dict = field(default_factory=dict)  # id(socket) -> (socket, last tcpi_total_retrans)


def _live_counts(driver) -> tuple[int, int, int]:
    """(files ok, files failed, chunks retried) of a running session, read on the event loop.

    Only valid until the driver's ``run()`` has returned: a receiver then folds its core's
    counts into its stats (which a sender copies from its core)."""
    s = driver.stats
    if isinstance(driver, SenderSession):
        c = driver.core
        return c.files_ok, c.files_failed, c.chunks_retried
    if isinstance(driver, ReceiverSession):
        c = driver.core
        return s.files_ok + c.files_ok, s.files_failed + c.files_failed, s.chunks_retried
    return s.files_ok, s.files_failed, s.chunks_retried


def _moved(driver) -> int:
    """Wire bytes the session moved so far, for its rate: its pumps' per-syscall count, or (a
    driver whose pumps count into no meter, e.g. a bench receiver) its per-chunk count."""
    wire = getattr(driver, "wire", None)
    moved = wire.total if wire is not None else 0
    return moved or driver.stats.bytes_wire


def _sockets(driver) -> list[socket.socket]:
    return [p.sock for p in list(getattr(driver, "pumps", {}).values()) if getattr(p, "sock", None) is not None]


class SampledCollector:
    """What a dxa Prometheus endpoint shares: a private ``CollectorRegistry`` with this object as
    its only collector, the HTTP endpoint, and a sampler task on the event loop that calls
    :meth:`sample` every ``interval`` seconds (a failed sample is logged, never raised).
    Subclasses set up their state before calling ``super().__init__`` and implement
    ``sample()`` and ``collect()``."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.registry = CollectorRegistry(auto_describe=True)
        self._httpd = None
        self._thread = None
        self._sampler: asyncio.Task | None = None
        self.host = ""
        self.port = 0
        self.registry.register(self)

    def start(self, host: str, port: int) -> None:
        """Serve ``/metrics`` on host:port (0: a free port, then in ``self.port``); needs a running loop."""
        self._httpd, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.host, self.port = host, self._httpd.server_port
        self._sampler = asyncio.get_running_loop().create_task(self._sample_loop())

    async def close(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
            self._sampler = None
        if self._httpd is not None:
            httpd, self._httpd = self._httpd, None
            await asyncio.get_running_loop().run_in_executor(None, httpd.shutdown)
            httpd.server_close()
            self._thread.join(5)

    async def _sample_loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.sample()
            except Exception:  # never let metrics take the daemon down
                log.exception("metrics sampling failed")

    def sample(self) -> None:
        raise NotImplementedError

    def describe(self):
        return []


class ServerMetrics(SampledCollector):
    """Metrics of one Server.  Mutated on the event loop; scraped from the HTTP thread."""

    def __init__(self, interval: float = 1.0) -> None:
        self._lock = threading.Lock()
        self._live: dict[str, _Live] = {}
        self._bytes = {"received": 0, "sent": 0}
        self._files_ok = self._files_failed = self._retried = 0
        self._transfers: dict[tuple[str, str], int] = {}
        self._peers: dict[str, _Peer] = {}
        self._expiry: dict[str, float] = {}
        super().__init__(interval)

    def set_certificate_expiry(self, expiry: dict[str, float]) -> None:
        """The Unix time at which each certificate the daemon uses expires (``node``, ``ca``)."""
        with self._lock:
            self._expiry = dict(expiry)

    # -- hooks called by the Server and by copy(metrics=...) -----------------------
    def session_started(self, sid: str, mode: str, peer: str, driver) -> None:
        """A session runs from now on: ``sid`` unique among live sessions, ``mode`` a key of
        DIRECTIONS, ``peer`` the other agent's certificate name, ``driver`` its session driver
        (``stats``, ``wire``, ``pumps``).  Called on the sampler's event loop."""
        with self._lock:
            self._live[sid] = _Live(mode, peer, driver)
            self._peers.setdefault(peer, _Peer())

    def session_ended(self, sid: str, outcome: str) -> None:
        """Fold a session into the totals: ``ok`` or ``incomplete`` once its driver's ``run()``
        returned (its stats are final), ``failed`` when it raised."""
        live = self._live.get(sid)
        if live is None:
            return
        stats = live.driver.stats
        if outcome == "failed":
            final = _live_counts(live.driver)
        else:
            final = (stats.files_ok, stats.files_failed, stats.chunks_retried)
        final = tuple(max(a, b) for a, b in zip(final, live.counts))  # counters never go back
        with self._lock:
            del self._live[sid]
            self._bytes[DIRECTIONS.get(live.mode, "received")] += stats.bytes_wire
            self._files_ok += final[0]
            self._files_failed += final[1]
            self._retried += final[2]
            key = (live.mode, outcome)
            self._transfers[key] = self._transfers.get(key, 0) + 1
            if not any(x.peer == live.peer for x in self._live.values()):
                peer = self._peers.get(live.peer)
                if peer is not None:
                    peer.rtt = None
                    peer.seen.clear()

    # -- sampling ----------------------------------------------------------------
    def sample(self) -> None:
        """Refresh transfer rates and per-peer TCP_INFO now (the sampler calls this every interval)."""
        now = time.monotonic()
        with self._lock:
            live = list(self._live.values())
        rtts: dict[str, list[float]] = {}
        retrans: dict[str, int] = {}
        current: dict[str, dict] = {}
        for s in live:
            b = _moved(s.driver)
            dt = now - s.last_t
            if dt >= self.interval / 2:  # a session that just started waits a whole interval for its rate
                s.rate = max(0, b - s.last_bytes) / dt
                s.last_bytes, s.last_t = b, now
            counts = _live_counts(s.driver)
            s.counts = tuple(max(new, old) for new, old in zip(counts, s.counts))
            for sock in _sockets(s.driver):
                info = read_tcp_info(sock)
                if info is None:
                    continue
                if info.rtt_us:
                    rtts.setdefault(s.peer, []).append(info.rtt_us / 1e6)
                current.setdefault(s.peer, {})[id(sock)] = (sock, info.total_retrans)
        with self._lock:
            for name, socks in current.items():
                peer = self._peers.setdefault(name, _Peer())
                for key, (sock, total) in socks.items():
                    prev = peer.seen.get(key)
                    last = prev[1] if prev is not None and prev[0] is sock else 0
                    retrans[name] = retrans.get(name, 0) + max(0, total - last)
                peer.seen = socks
                peer.retrans += retrans.get(name, 0)
            for name, peer in self._peers.items():
                if name in rtts:
                    peer.rtt = sum(rtts[name]) / len(rtts[name])
                elif name not in current:
                    peer.seen = {}

    # -- the collector (called by prometheus_client at scrape time) -----------------
    def collect(self):
        with self._lock:
            live = list(self._live.items())
            sent = dict(self._bytes)
            files_ok, files_failed, retried = self._files_ok, self._files_failed, self._retried
            for _sid, s in live:
                sent[DIRECTIONS.get(s.mode, "received")] += s.driver.stats.bytes_wire
                files_ok += s.counts[0]
                files_failed += s.counts[1]
                retried += s.counts[2]
            transfers = dict(self._transfers)
            peers = [(name, p.rtt, p.retrans) for name, p in self._peers.items()]
            expiry = dict(self._expiry)
        c = CounterMetricFamily("dxa_bytes", "Payload bytes moved on the wire (after compression, with resends)",
                                labels=["direction"])
        for direction in ("received", "sent"):
            c.add_metric([direction], sent[direction])
        yield c
        yield CounterMetricFamily("dxa_files_completed", "Files verified at the destination or already present",
                                  value=files_ok)
        yield CounterMetricFamily("dxa_files_failed", "Files that did not arrive", value=files_failed)
        yield CounterMetricFamily("dxa_chunks_retried", "Chunks sent again after a failed verification or a lost "
                                  "connection", value=retried)
        c = CounterMetricFamily("dxa_transfers", "Transfers ended, by mode and outcome", labels=["mode", "outcome"])
        for (mode, outcome), n in sorted(transfers.items()):
            c.add_metric([mode, outcome], n)
        yield c
        yield GaugeMetricFamily("dxa_active_transfers", "Transfers in progress", value=len(live))
        g = GaugeMetricFamily("dxa_transfer_rate_bytes_per_second", "Wire rate of each live transfer over the "
                              "last sampling interval", labels=["session", "mode", "peer"])
        for sid, s in live:
            g.add_metric([sid, s.mode, s.peer], s.rate)
        yield g
        g = GaugeMetricFamily("dxa_peer_rtt_seconds", "Mean smoothed RTT (TCP_INFO) of the peer's live data "
                              "connections", labels=["peer"])
        c = CounterMetricFamily("dxa_peer_retransmits", "TCP segments retransmitted on the peer's data connections "
                                "(TCP_INFO tcpi_total_retrans, sampled)", labels=["peer"])
        for name, rtt, rx in peers:
            if rtt is not None:
                g.add_metric([name], rtt)
            c.add_metric([name], rx)
        yield g
        yield c
        g = GaugeMetricFamily("dxa_certificate_expiry_seconds", "Seconds until the certificate expires (negative: "
                              "expired)", labels=["certificate"])
        now = time.time()
        for which, at in sorted(expiry.items()):
            g.add_metric([which], at - now)
        yield g
