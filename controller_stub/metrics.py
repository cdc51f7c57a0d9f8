"""Prometheus metrics of the scheduler (``dxa controller serve --metrics HOST:PORT``).

The ledger lives on the server's event loop and is not thread-safe, while
prometheus_client scrapes from its own HTTP thread.  So a sampler on the loop copies
what is exported into a plain snapshot every ``interval`` seconds (and after each
``sample()`` call), under a lock, and the collector only reads that snapshot.  A private
``CollectorRegistry`` keeps several schedulers in one process apart (tests).

Exposed (all prefixed ``dxa_scheduler_``):

==================================  =======  =================================================
``agents{state}``                   gauge    registered agents, ``live`` or ``expired``
``reservations{state}``             gauge    reservations in the ledger by state (released
                                             ones included: done, failed, cancelled)
``waiting_reservations``            gauge    the queue: reservations waiting for room
``link_capacity_bps{link}``         gauge    capacity of each directed link
``link_reserved_bps{link}``         gauge    rate reserved on it at the moment of the sample
==================================  =======  =================================================
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily

from controller_stub.ledger import Ledger, State

__all__ = ["SchedulerMetrics"]


class SchedulerMetrics:
    """``start(host, port, ledger_fn)`` on the event loop; ``await close()``."""

    def __init__(self, interval: float = 1.0, clock: Callable[[], float] = time.time) -> None:
        self.interval = interval
        self.clock = clock
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(self)
        self.host, self.port = "", 0
        self._lock = threading.Lock()
        self._snap: dict = {}
        self._ledger_fn: Callable[[], Ledger] | None = None
        self._httpd = None
        self._thread = None
        self._sampler: asyncio.Task | None = None

    def start(self, host: str, port: int, ledger_fn: Callable[[], Ledger]) -> None:
        """Serve ``/metrics`` on host:port (0: a free one, then in ``self.port``); needs a running loop."""
        self._ledger_fn = ledger_fn
        self.sample()
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
            self.sample()

    def sample(self) -> None:
        """Copy the ledger's numbers (call on the ledger's event loop)."""
        assert self._ledger_fn is not None
        ledger, now = self._ledger_fn(), self.clock()
        agents = Counter("expired" if a.expired else "live" for a in ledger.agents())
        states = Counter(r.state.value for r in ledger.reservations())
        links = [(k.id, k.capacity_bps, ledger.load(k.id, now)) for k in ledger.links()]
        snap = {"agents": agents, "states": states, "waiting": len(ledger.waiting()), "links": links}
        with self._lock:
            self._snap = snap

    # -- the collector (prometheus_client, HTTP thread) ------------------------------
    def describe(self):
        return []

    def collect(self):
        with self._lock:
            snap = self._snap
        if not snap:
            return
        g = GaugeMetricFamily("dxa_scheduler_agents", "Registered agents, by lease state", labels=["state"])
        for state in ("live", "expired"):
            g.add_metric([state], snap["agents"].get(state, 0))
        yield g
        g = GaugeMetricFamily("dxa_scheduler_reservations", "Reservations in the ledger, by state", labels=["state"])
        for state in State:
            g.add_metric([state.value], snap["states"].get(state.value, 0))
        yield g
        yield GaugeMetricFamily("dxa_scheduler_waiting_reservations", "Reservations queued for room",
                                value=snap["waiting"])
        cap = GaugeMetricFamily("dxa_scheduler_link_capacity_bps", "Capacity of each directed link, bits/s",
                                labels=["link"])
        held = GaugeMetricFamily("dxa_scheduler_link_reserved_bps", "Rate reserved on each directed link now, "
                                 "bits/s", labels=["link"])
        for link, capacity, load in snap["links"]:
            cap.add_metric([link], capacity)
            held.add_metric([link], load)
        yield cap
        yield held
