"""Prometheus metrics of the scheduler (``dxa controller serve --metrics HOST:PORT``).

The ledger lives on the server's event loop and is not thread-safe, while
prometheus_client scrapes from its own HTTP thread.  So a sampler on the loop copies
what is exported into a plain snapshot at ``start()`` and every ``interval`` seconds,
under a lock, and the collector only reads that snapshot.  The
registry, endpoint and sampler are :class:`agent.service.metrics.SampledCollector`'s.

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

import threading
import time
from collections import Counter
from collections.abc import Callable

from prometheus_client.core import GaugeMetricFamily

from agent.service.metrics import SampledCollector
from controller_stub.ledger import Ledger, State

__all__ = ["SchedulerMetrics"]


class SchedulerMetrics(SampledCollector):
    """``start(host, port, ledger_fn)`` on the event loop; ``await close()``."""

    def __init__(self, interval: float = 1.0, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._snap: dict = {}
        self._ledger_fn: Callable[[], Ledger] | None = None
        super().__init__(interval)

    def start(self, host: str, port: int, ledger_fn: Callable[[], Ledger]) -> None:  # type: ignore[override]
        """Serve ``/metrics`` on host:port (0: a free one, then in ``self.port``); needs a running loop."""
        self._ledger_fn = ledger_fn
        self.sample()
        super().start(host, port)

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
