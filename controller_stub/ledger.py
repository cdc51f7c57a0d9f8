"""The reservation ledger: admission control for bandwidth on a graph of links.

Sans-I/O.  Every method that depends on time takes ``now`` (seconds on any clock the
caller chooses, as a float); the ledger never reads a clock, a socket or a file.  The
service layer feeds it requests, heartbeats and ``tick(now)`` at ``next_timer()``, and
forwards the events it hands out (``drain_events()``) to the agents.

Rules it must never break (docs/CONTROL.md has the reasoning):

* **Capacity.** On every link, at every instant from ``now`` on, the rates of the
  reservations holding the link (``RESERVED`` or ``TRANSFERRING``) whose window
  ``[start, end)`` covers that instant add up to at most the link's capacity.  Windows
  are half-open: one ending at 10 and one starting at 10 do not overlap.
* **Order.** Waiting requests are admitted in queue order: higher priority first, then
  first come first served.  A waiter that cannot be admitted holds back every waiter
  behind it that shares a link with it, so a big request is not starved by small ones.
* **Release is final and immediate.**  Releasing frees the capacity at once and admits
  the waiters that now fit, in order, before returning them.
* **Leases.**  An agent that has not heart-beaten for ``lease_timeout`` seconds loses
  every reservation it is a party to (released as ``FAILED``); until it registers again
  it can neither heartbeat nor request.
* **History is bounded by its owner.**  Released reservations stay as history until
  ``prune(before)`` drops those released before ``before``; the service calls it with its
  retention (``dxa controller serve --history-retention``).
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass, field, replace

from controller_stub.errors import (
    DeadlineUnreachableError,
    InsufficientCapacityError,
    InvalidPathError,
    InvalidRequestError,
    InvalidTransitionError,
    LeaseExpiredError,
    NoRouteError,
    RateAboveCapacityError,
    UnknownAgentError,
    UnknownLinkError,
    UnknownReservationError,
)

__all__ = [
    "State",
    "Outcome",
    "Link",
    "Agent",
    "AgentRegistration",
    "ReservationRequest",
    "Reservation",
    "Decision",
    "LedgerConfig",
    "LedgerSnapshot",
    "Ledger",
    "ReservationQueued",
    "ReservationAdmitted",
    "ReservationStarted",
    "ReservationReleased",
    "RateChanged",
    "LeaseExpired",
]

INF = math.inf
MAX_INT = 2**63 - 1  # rates, volumes and capacities must fit SQLite's 64-bit integers


class State(enum.Enum):
    """Lifecycle: SUBMITTED → RESERVED → TRANSFERRING → DONE | FAILED | CANCELLED."""

    SUBMITTED = "submitted"  # waiting in the queue for room
    RESERVED = "reserved"  # capacity held for [start, end)
    TRANSFERRING = "transferring"  # the agents are moving data
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def released(self) -> bool:
        return self in (State.DONE, State.FAILED, State.CANCELLED)

    @property
    def holds_capacity(self) -> bool:
        return self in (State.RESERVED, State.TRANSFERRING)


_TRANSITIONS: dict[State, frozenset[State]] = {
    State.SUBMITTED: frozenset({State.RESERVED, State.FAILED, State.CANCELLED}),
    State.RESERVED: frozenset({State.TRANSFERRING, State.DONE, State.FAILED, State.CANCELLED}),
    State.TRANSFERRING: frozenset({State.DONE, State.FAILED, State.CANCELLED}),
    State.DONE: frozenset(),
    State.FAILED: frozenset(),
    State.CANCELLED: frozenset(),
}


class Outcome(enum.Enum):
    """What ``Ledger.request`` decided."""

    ADMITTED = "admitted"
    QUEUED = "queued"
    REFUSED = "refused"


@dataclass(frozen=True)
class Link:
    """A directed link from node ``src`` to node ``dst`` (a site or an agent)."""

    id: str
    src: str
    dst: str
    capacity_bps: int
    """Bits per second the ledger may hand out on this link, in this direction."""


@dataclass(frozen=True)
class Agent:
    """A registered agent: a node of the graph joined to its site by two access links."""

    name: str
    site: str
    addresses: tuple[str, ...]
    capacity_bps: int
    """The agent's own link capacity (both directions), as it reported it."""
    lease_expires: float
    """When the lease runs out unless a heartbeat renews it."""
    expired: bool = False
    """True once the lease ran out; a new registration clears it."""

    @property
    def uplink(self) -> str:
        return f"{self.name}>{self.site}"

    @property
    def downlink(self) -> str:
        return f"{self.site}>{self.name}"

    def access_links(self) -> tuple[Link, Link]:
        """Its uplink (agent → site) and downlink (site → agent), at its own capacity."""
        return (Link(self.uplink, self.name, self.site, self.capacity_bps),
                Link(self.downlink, self.site, self.name, self.capacity_bps))


@dataclass(frozen=True)
class AgentRegistration:
    """What an agent reports when it registers."""

    name: str
    site: str
    """The site (topology node) it sits at."""
    addresses: tuple[str, ...]
    """Where other agents reach its data port, "host:port"."""
    capacity_bps: int
    """Its own link's capacity, each direction."""


@dataclass(frozen=True)
class ReservationRequest:
    """What a transfer asks for.  Three modes, decided by which fields are set:

    * rate mode: ``rate_bps``; the window is ``[start, finish_by)`` or open-ended, or
      exactly long enough for ``volume_bytes`` at that rate;
    * deadline mode: ``volume_bytes`` and ``finish_by`` without a rate: the rate is the
      volume spread over the time left, rounded up;
    * off-peak mode: ``rate_bps`` and ``volume_bytes`` with ``not_before`` and/or
      ``finish_by``: the window may be placed anywhere in between, the earliest that fits.
    """

    source: str
    """Name of the sending agent."""
    destination: str
    """Name of the receiving agent."""
    rate_bps: int | None = None
    """Rate to reserve, bits per second."""
    volume_bytes: int | None = None
    """How much data the transfer moves (deadline and off-peak modes)."""
    not_before: float | None = None
    """The window starts no earlier than this."""
    finish_by: float | None = None
    """The window ends no later than this."""
    priority: int = 0
    """Higher goes first in the queue."""
    wait: bool = True
    """Queue when there is no room now; False: refuse at once, with the earliest start that fits."""
    path: tuple[str, ...] | None = None
    """Link ids from source to destination; None: the ledger routes (fewest links)."""
    transfer_id: str = ""
    """The agent's id for the transfer, carried along for the agents' benefit."""

    def __post_init__(self) -> None:
        for name in ("rate_bps", "volume_bytes"):
            value = getattr(self, name)
            if value is not None:
                _positive_int(value, f"{name} must be a positive integer below 2**63")
        if self.rate_bps is None and (self.volume_bytes is None or self.finish_by is None):
            raise InvalidRequestError("need rate_bps, or volume_bytes with finish_by (deadline mode)")
        if self.not_before is not None and self.finish_by is not None and self.finish_by <= self.not_before:
            raise InvalidRequestError("empty window: finish_by must be after not_before")
        for t in (self.not_before, self.finish_by):
            if t is not None and not math.isfinite(t):
                raise InvalidRequestError("window bounds must be finite", t)
        if self.source == self.destination:
            raise InvalidRequestError("source and destination are the same agent", self.source)
        if self.path is not None and not self.path:
            raise InvalidPathError("empty path")

    @property
    def duration(self) -> float | None:
        """Seconds the transfer needs at its rate, when both are known."""
        if self.rate_bps is None or self.volume_bytes is None:
            return None
        return self.volume_bytes * 8 / self.rate_bps

    @property
    def flexible(self) -> bool:
        """Off-peak mode: a fixed-length window that may slide within [not_before, finish_by]."""
        return self.duration is not None and self.finish_by is not None


@dataclass(frozen=True)
class Reservation:
    """One request's place in the ledger.  While ``SUBMITTED``, rate and window are provisional."""

    id: str
    request: ReservationRequest
    path: tuple[str, ...]
    rate_bps: int
    start: float
    end: float
    """Exclusive; ``math.inf`` for an open-ended reservation."""
    state: State
    seq: int
    """Arrival order (first come first served within a priority)."""
    submitted_at: float
    reason: str = ""
    """Why it was released, when not DONE by the agents themselves."""
    released_at: float | None = None
    """When it was released (None while it is not); history older than the retention goes."""

    def overlaps(self, start: float, end: float) -> bool:
        return self.start < end and start < self.end

    @property
    def queue_key(self) -> tuple[int, int]:
        return (-self.request.priority, self.seq)


@dataclass(frozen=True)
class Decision:
    """The answer to a request."""

    outcome: Outcome
    reservation: Reservation | None
    """None when refused (a refused request leaves no trace in the ledger)."""
    earliest_start: float | None = None
    """When not admitted: the earliest start at which it would fit among the current
    reservations (ignoring the queue), or None if it never would while they hold."""
    blocked_by_queue: bool = False
    """Not admitted although it fits: an earlier waiter on a shared link goes first."""


@dataclass(frozen=True)
class LedgerConfig:
    """How the ledger treats agents."""

    lease_timeout: float = 30.0
    """Seconds without a heartbeat after which an agent loses its reservations."""

    def __post_init__(self) -> None:
        if not (self.lease_timeout > 0 and math.isfinite(self.lease_timeout)):
            raise InvalidRequestError("lease_timeout must be a positive number of seconds")


# Events: what happened, past tense, for the service layer to tell the agents.


@dataclass(frozen=True)
class ReservationQueued:
    reservation: Reservation


@dataclass(frozen=True)
class ReservationAdmitted:
    reservation: Reservation


@dataclass(frozen=True)
class ReservationStarted:
    reservation: Reservation


@dataclass(frozen=True)
class ReservationReleased:
    reservation: Reservation


@dataclass(frozen=True)
class RateChanged:
    reservation: Reservation
    old_rate_bps: int


@dataclass(frozen=True)
class LeaseExpired:
    agent: Agent


Event = ReservationQueued | ReservationAdmitted | ReservationStarted | ReservationReleased | RateChanged | LeaseExpired


@dataclass(frozen=True)
class LedgerSnapshot:
    """Everything needed to rebuild a ledger (what controller_stub.store persists)."""

    sites: tuple[str, ...]
    links: tuple[Link, ...]
    """Backbone links only; agents' access links are rebuilt from the agents."""
    agents: tuple[Agent, ...]
    reservations: tuple[Reservation, ...]
    next_seq: int


@dataclass
class _Index:
    """Active (capacity-holding) reservation ids per link."""

    by_link: dict[str, set[str]] = field(default_factory=dict)

    def add(self, r: Reservation) -> None:
        for link in r.path:
            self.by_link.setdefault(link, set()).add(r.id)

    def remove(self, r: Reservation) -> None:
        for link in r.path:
            self.by_link.get(link, set()).discard(r.id)

    def ids(self) -> set[str]:
        """Every active reservation (each holds at least one link)."""
        return set().union(*self.by_link.values())


class Ledger:
    """Links, agents, reservations and the waiting queue.  Not thread-safe: one owner."""

    def __init__(self, config: LedgerConfig | None = None) -> None:
        self.config = config or LedgerConfig()
        self._sites: set[str] = set()
        self._links: dict[str, Link] = {}
        self._backbone: set[str] = set()
        self._agents: dict[str, Agent] = {}
        self._reservations: dict[str, Reservation] = {}
        self._active = _Index()
        self._waiting: list[str] = []  # kept sorted by queue_key
        self._next_seq = 1  # the next reservation's seq (and id "r<seq>"); saved in snapshots
        self._events: deque[Event] = deque()

    # ----------------------------------------------------------------- topology

    def add_site(self, name: str) -> None:
        if not name:
            raise InvalidRequestError("empty site name")
        if name in self._agents:
            raise InvalidRequestError("a site cannot share its name with an agent", name)
        self._sites.add(name)

    def add_link(self, link_id: str, src: str, dst: str, capacity_bps: int, now: float = -INF) -> Link:
        """Add a backbone link between two sites, or change its capacity.

        Lowering a capacity below what is held preempts reservations (lowest priority,
        newest first) until it fits again; they are released as FAILED.
        """
        for site in (src, dst):
            if site not in self._sites:
                self.add_site(site)
        existing = self._links.get(link_id)
        if existing is not None and link_id not in self._backbone:
            raise InvalidRequestError("link id taken by an agent's access link", link_id)
        if existing is not None and (existing.src, existing.dst) != (src, dst):
            raise InvalidRequestError("link id already joins other sites", link_id)
        return self._set_link(Link(link_id, src, dst, _check_capacity(capacity_bps)), now, backbone=True)

    def link(self, link_id: str) -> Link:
        try:
            return self._links[link_id]
        except KeyError:
            raise UnknownLinkError(link_id) from None

    def links(self) -> list[Link]:
        return sorted(self._links.values(), key=lambda link: link.id)

    def sites(self) -> list[str]:
        return sorted(self._sites)

    def route(self, source: str, destination: str) -> tuple[str, ...]:
        """The path with the fewest links from agent to agent (ties: smallest link ids)."""
        self._live_agent(source)
        self._live_agent(destination)
        out: dict[str, list[Link]] = {}
        for link in self.links():
            out.setdefault(link.src, []).append(link)
        previous: dict[str, Link] = {}
        frontier, seen = [source], {source}
        while frontier and destination not in seen:
            nxt = []
            for node in frontier:
                for link in out.get(node, ()):
                    if link.dst not in seen and (link.dst not in self._agents or link.dst == destination):
                        seen.add(link.dst)
                        previous[link.dst] = link
                        nxt.append(link.dst)
            frontier = nxt
        if destination not in seen:
            raise NoRouteError(source, destination)
        path, node = [], destination
        while node != source:
            path.append(previous[node].id)
            node = previous[node].src
        return tuple(reversed(path))

    # ------------------------------------------------------------------- agents

    def register_agent(self, name: str, site: str, addresses: tuple[str, ...] | list[str], capacity_bps: int,
                       now: float) -> Agent:
        """Register (or re-register) an agent: its lease starts now.  An unknown site is created."""
        if not name or not site:
            raise InvalidRequestError("agent and site names must not be empty")
        if name in self._sites:
            raise InvalidRequestError("an agent cannot share its name with a site", name)
        if site in self._agents:
            raise InvalidRequestError("an agent's site cannot be another agent", site)
        old = self._agents.get(name)
        if old is not None and old.site != site:
            # Moving to another site changes every path through the agent: drop what it holds.
            self._release_party(name, now, "agent moved to another site")
            for link_id in (old.uplink, old.downlink):
                self._links.pop(link_id, None)
        if site not in self._sites:
            self.add_site(site)
        agent = Agent(name, site, tuple(addresses), _check_capacity(capacity_bps), now + self.config.lease_timeout)
        self._agents[name] = agent
        for link in agent.access_links():
            self._set_link(link, now, backbone=False, admit=False)
        self._admit_waiters(now)  # once, after both links
        return agent

    def register(self, registration: AgentRegistration, now: float) -> Agent:
        r = registration
        return self.register_agent(r.name, r.site, r.addresses, r.capacity_bps, now)

    def heartbeat(self, name: str, now: float) -> Agent:
        """Renew the lease.  An agent whose lease ran out must register again."""
        agent = self._agent(name)
        if agent.expired or now >= agent.lease_expires:
            self.tick(now)
            raise LeaseExpiredError(name, agent.lease_expires)
        agent = replace(agent, lease_expires=now + self.config.lease_timeout)
        self._agents[name] = agent
        return agent

    def agent(self, name: str) -> Agent:
        return self._agent(name)

    def agents(self) -> list[Agent]:
        return sorted(self._agents.values(), key=lambda a: a.name)

    # ------------------------------------------------------------- reservations

    def request(self, req: ReservationRequest, now: float) -> Decision:
        """Admit, queue or refuse a request (see the module rules)."""
        self.tick(now)
        path = self._check_path(req) if req.path is not None else self.route(req.source, req.destination)
        rate, start, end = self._plan(req, now)
        self._check_rate_fits_path(rate, path)
        seq = self._next_seq
        self._next_seq += 1
        r = Reservation(f"r{seq}", req, path, rate, start, end, State.SUBMITTED, seq, now)
        self._reservations[r.id] = r
        self._enqueue(r)
        self._admit_waiters(now)
        r = self._reservations[r.id]
        if r.state is State.RESERVED:
            return Decision(Outcome.ADMITTED, r)
        earliest = self._earliest_start(r, r.start, None)
        blocked = earliest is not None and earliest <= r.start
        if not req.wait:
            self._waiting.remove(r.id)
            del self._reservations[r.id]
            return Decision(Outcome.REFUSED, None, earliest, blocked)
        self._events.append(ReservationQueued(r))
        return Decision(Outcome.QUEUED, r, earliest, blocked)

    def start(self, reservation_id: str, now: float) -> Reservation:
        """The agents began moving data: RESERVED → TRANSFERRING (not before the window opens)."""
        self.get(reservation_id)
        self.tick(now)  # a window that closed, or a lease that ran out, cannot start
        r = self.get(reservation_id)
        if r.state is not State.RESERVED or now < r.start:
            raise InvalidTransitionError(r.id, r.state.value, "start" if now >= r.start else "start before window")
        r = replace(r, state=State.TRANSFERRING)
        self._reservations[r.id] = r
        self._events.append(ReservationStarted(r))
        return r

    def release(self, reservation_id: str, outcome: State, now: float, reason: str = "") -> list[Reservation]:
        """End a reservation (DONE, FAILED or CANCELLED); return the waiters admitted as a result."""
        if not outcome.released:
            raise InvalidRequestError("release outcome must be done, failed or cancelled", outcome)
        r = self.get(reservation_id)
        if outcome not in _TRANSITIONS[r.state]:
            raise InvalidTransitionError(r.id, r.state.value, f"release as {outcome.value}")
        self._release(r, outcome, reason, now)
        return self._admit_waiters(now)

    def change_rate(self, reservation_id: str, rate_bps: int, now: float) -> tuple[Reservation, list[Reservation]]:
        """Raise or lower a reserved or running reservation's rate for the rest of its window.

        A raise is admitted only if every link on the path has room for it; a lowering
        always is, and the freed rate goes to the waiters at once (returned second).
        """
        _positive_int(rate_bps, "rate_bps must be a positive integer below 2**63")
        self.tick(now)
        r = self.get(reservation_id)
        if not r.state.holds_capacity:
            raise InvalidTransitionError(r.id, r.state.value, "change rate")
        self._check_rate_fits_path(rate_bps, r.path)
        if rate_bps > r.rate_bps:
            available = self._available(r.path, max(now, r.start), r.end, exclude=r.id)
            if rate_bps > available:
                raise InsufficientCapacityError(r.id, rate_bps, available)
        old = r.rate_bps
        r = replace(r, rate_bps=rate_bps)
        self._reservations[r.id] = r
        if old != rate_bps:
            self._events.append(RateChanged(r, old))
        return r, (self._admit_waiters(now) if rate_bps < old else [])

    def get(self, reservation_id: str) -> Reservation:
        try:
            return self._reservations[reservation_id]
        except KeyError:
            raise UnknownReservationError(reservation_id) from None

    def reservations(self, *, states: set[State] | frozenset[State] | None = None,
                     agent: str | None = None) -> list[Reservation]:
        """Reservations in arrival order, optionally only those in ``states`` or involving ``agent``."""
        out = [r for r in self._reservations.values()
               if (states is None or r.state in states)
               and (agent is None or agent in (r.request.source, r.request.destination))]
        return sorted(out, key=lambda r: r.seq)

    def waiting(self) -> list[Reservation]:
        """The queue, in the order it will be served."""
        return [self._reservations[i] for i in self._waiting]

    # ------------------------------------------------------------------- time

    def tick(self, now: float) -> None:
        """Let time pass: expire leases, end windows that closed, drop waiters whose deadline
        can no longer be met, and admit the waiters that now fit."""
        for agent in list(self._agents.values()):
            if not agent.expired and now >= agent.lease_expires:
                agent = replace(agent, expired=True)
                self._agents[agent.name] = agent
                self._events.append(LeaseExpired(agent))
                self._release_party(agent.name, now, "lease expired")
        ended = [self._reservations[i] for i in self._active.ids() if self._reservations[i].end <= now]
        for r in sorted(ended, key=lambda r: r.seq):  # the active ones only: history is never rescanned
            self._release(r, State.FAILED, "window ended", now)
        for rid in list(self._waiting):
            r = self._reservations[rid]
            finish_by = r.request.finish_by
            if finish_by is not None and (now >= finish_by or now > self._last_chance(r)):
                self._release(r, State.FAILED, "deadline unreachable", now)
        self._admit_waiters(now)

    def next_timer(self) -> float | None:
        """When ``tick`` next has something to do, if nothing else happens before."""
        times = [a.lease_expires for a in self._agents.values() if not a.expired]
        times += [e for e in (self._reservations[i].end for i in self._active.ids()) if e < INF]
        times += [self._last_chance(self._reservations[i]) for i in self._waiting
                  if self._reservations[i].request.finish_by is not None]
        return min(times) if times else None

    def prune(self, before: float) -> list[Reservation]:
        """Forget the released reservations released before ``before`` (the history past its
        retention); return them.  What holds capacity or waits is never touched, and ids are
        never reused (``next_seq`` stays)."""
        gone = [r for r in self._reservations.values()
                if r.state.released and _released_at(r) < before]
        for r in gone:
            del self._reservations[r.id]
        return sorted(gone, key=lambda r: r.seq)

    def drain_events(self) -> list[Event]:
        out = list(self._events)
        self._events.clear()
        return out

    # --------------------------------------------------------------- capacity

    def load(self, link_id: str, t: float) -> int:
        """Bits per second held on a link at instant ``t``."""
        self.link(link_id)
        return sum(r.rate_bps for r in self._holding(link_id) if r.start <= t < r.end)

    def peak(self, link_id: str, start: float, end: float, exclude: str | None = None) -> int:
        """The most held on a link at any instant of ``[start, end)``."""
        events: list[tuple[float, int]] = []
        for r in self._holding(link_id):
            if r.id == exclude or not r.overlaps(start, end):
                continue
            events.append((max(r.start, start), r.rate_bps))
            if r.end < end:
                events.append((r.end, -r.rate_bps))
        events.sort()  # at equal times the negative (an end) comes first: windows are half-open
        level = top = 0
        for _, delta in events:
            level += delta
            top = max(top, level)
        return top

    # ---------------------------------------------------------- persistence

    def snapshot(self) -> LedgerSnapshot:
        return LedgerSnapshot(
            sites=tuple(sorted(self._sites)),
            links=tuple(self._links[i] for i in sorted(self._backbone)),
            agents=tuple(self.agents()),
            reservations=tuple(self.reservations()),
            next_seq=self._next_seq,
        )

    @classmethod
    def restore(cls, snap: LedgerSnapshot, now: float, config: LedgerConfig | None = None) -> Ledger:
        """Rebuild a ledger after a restart.  Every live agent gets a fresh lease from ``now``:
        it could not heartbeat a scheduler that was away."""
        ledger = cls(config)
        for site in snap.sites:
            ledger._sites.add(site)
        for link in snap.links:
            ledger._links[link.id] = link
            ledger._backbone.add(link.id)
        for agent in snap.agents:
            if not agent.expired:
                agent = replace(agent, lease_expires=now + ledger.config.lease_timeout)
            ledger._agents[agent.name] = agent
            for link in agent.access_links():
                ledger._links[link.id] = link
        for r in snap.reservations:
            ledger._reservations[r.id] = r
            if r.state.holds_capacity:
                ledger._active.add(r)
            elif r.state is State.SUBMITTED:
                ledger._waiting.append(r.id)
        ledger._waiting.sort(key=lambda i: ledger._reservations[i].queue_key)
        ledger._next_seq = snap.next_seq
        return ledger

    # ---------------------------------------------------------------- private

    def _agent(self, name: str) -> Agent:
        try:
            return self._agents[name]
        except KeyError:
            raise UnknownAgentError(name) from None

    def _live_agent(self, name: str) -> Agent:
        agent = self._agent(name)
        if agent.expired:
            raise LeaseExpiredError(name, agent.lease_expires)
        return agent

    def _set_link(self, link: Link, now: float, *, backbone: bool, admit: bool = True) -> Link:
        self._links[link.id] = link
        if backbone:
            self._backbone.add(link.id)
        self._shed(link, now)
        if admit:
            self._admit_waiters(now)
        return link

    def _shed(self, link: Link, now: float) -> None:
        while self.peak(link.id, now, INF) > link.capacity_bps:
            victim = min(self._holding(link.id), key=lambda r: (r.request.priority, -r.seq))
            self._release(victim, State.FAILED, "preempted: link capacity reduced", now)

    def _check_path(self, req: ReservationRequest) -> tuple[str, ...]:
        self._live_agent(req.source)
        self._live_agent(req.destination)
        links = [self.link(i) for i in req.path or ()]
        node = req.source
        for link in links:
            if link.src != node:
                raise InvalidPathError(f"link {link.id} does not start at {node}")
            node = link.dst
        if node != req.destination:
            raise InvalidPathError(f"path ends at {node}, not at {req.destination}")
        if len(set(req.path or ())) != len(links):
            raise InvalidPathError("path uses a link twice")
        return tuple(req.path or ())

    def _check_rate_fits_path(self, rate: int, path: tuple[str, ...]) -> None:
        for link_id in path:
            link = self.link(link_id)
            if rate > link.capacity_bps:
                raise RateAboveCapacityError(rate, link.id, link.capacity_bps)

    def _plan(self, req: ReservationRequest, now: float) -> tuple[int, float, float]:
        """Rate and window if the request started as early as it may, from ``now``."""
        start = max(now, req.not_before) if req.not_before is not None else now
        if req.rate_bps is None:  # deadline mode
            assert req.volume_bytes is not None and req.finish_by is not None
            if req.finish_by <= start:
                raise DeadlineUnreachableError(req.finish_by, now)
            rate = math.ceil(req.volume_bytes * 8 / (req.finish_by - start))
            return rate, start, req.finish_by
        duration = req.duration
        end = start + duration if duration is not None else (req.finish_by if req.finish_by is not None else INF)
        if req.finish_by is not None and (end > req.finish_by or start >= req.finish_by):
            raise DeadlineUnreachableError(req.finish_by, now)
        return req.rate_bps, start, end

    def _last_chance(self, r: Reservation) -> float:
        """The instant from which a waiter with a finish-by time can no longer be served:
        its window no longer fits before finish_by, or (deadline mode) the rate it would
        need exceeds what its path can carry."""
        req = r.request
        assert req.finish_by is not None
        if req.rate_bps is not None:
            return req.finish_by - (req.duration or 0.0)
        assert req.volume_bytes is not None
        narrowest = min(self._links[i].capacity_bps for i in r.path)
        return req.finish_by - req.volume_bytes * 8 / narrowest

    def _holding(self, link_id: str) -> list[Reservation]:
        return [self._reservations[i] for i in self._active.by_link.get(link_id, ())]

    def _fits(self, path: tuple[str, ...], rate: int, start: float, end: float, exclude: str | None = None) -> bool:
        return all(self.peak(i, start, end, exclude) + rate <= self._links[i].capacity_bps for i in path)

    def _available(self, path: tuple[str, ...], start: float, end: float, exclude: str | None = None) -> int:
        return min(self._links[i].capacity_bps - self.peak(i, start, end, exclude) for i in path)

    def _earliest_start(self, r: Reservation, start: float, latest: float | None) -> float | None:
        """The earliest start ≥ ``start`` (and ≤ ``latest``) where ``r``'s rate and length fit.

        Load only drops when a reservation ends, so the candidates are ``start`` and the
        ends of the reservations on the path."""
        length = r.end - r.start
        ends = {h.end for i in r.path for h in self._holding(i) if start < h.end < INF}
        for t in [start, *sorted(ends)]:
            if latest is not None and t > latest:
                break
            if self._fits(r.path, r.rate_bps, t, t + length):
                return t
        return None

    def _enqueue(self, r: Reservation) -> None:
        self._waiting.append(r.id)
        self._waiting.sort(key=lambda i: self._reservations[i].queue_key)

    def _admit_waiters(self, now: float) -> list[Reservation]:
        admitted: list[Reservation] = []
        blocked: set[str] = set()
        for rid in list(self._waiting):
            r = self._reservations[rid]
            if blocked.isdisjoint(r.path):
                placed = self._place(r, now)
                if placed is not None:
                    self._waiting.remove(rid)
                    self._reservations[rid] = placed
                    self._active.add(placed)
                    self._events.append(ReservationAdmitted(placed))
                    admitted.append(placed)
                    continue
            blocked.update(r.path)
        return admitted

    def _place(self, r: Reservation, now: float) -> Reservation | None:
        try:
            rate, start, end = self._plan(r.request, now)
        except DeadlineUnreachableError:
            return None  # tick() fails it
        if any(rate > self._links[i].capacity_bps for i in r.path):
            return None  # deadline mode: the rate grew past what the path can ever carry
        r = replace(r, rate_bps=rate, start=start, end=end)
        if r.request.flexible:
            assert r.request.finish_by is not None
            t = self._earliest_start(r, start, r.request.finish_by - (end - start))
            if t is None:
                return None
            return replace(r, start=t, end=t + (end - start), state=State.RESERVED)
        if self._fits(r.path, rate, start, end):
            return replace(r, state=State.RESERVED)
        return None

    def _release(self, r: Reservation, outcome: State, reason: str, now: float) -> None:
        assert outcome in _TRANSITIONS[r.state], (r.state, outcome)
        if r.state.holds_capacity:
            self._active.remove(r)
        elif r.state is State.SUBMITTED:
            self._waiting.remove(r.id)
        r = replace(r, state=outcome, reason=reason, released_at=now)
        self._reservations[r.id] = r
        self._events.append(ReservationReleased(r))

    def _release_party(self, agent: str, now: float, reason: str) -> None:
        for r in self.reservations(agent=agent):
            if not r.state.released:
                self._release(r, State.FAILED, reason, now)


def _released_at(r: Reservation) -> float:
    """When a released reservation was released; for one saved before that was recorded, the
    latest instant known of it (its window's end if it had one, else its submission)."""
    if r.released_at is not None:
        return r.released_at
    return r.end if r.end < INF else r.submitted_at


def _positive_int(value, message: str) -> int:
    """``value`` if it is an int (not a bool) in 1..2**63-1, else InvalidRequestError(message, value)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_INT:
        raise InvalidRequestError(message, value)
    return value


def _check_capacity(capacity_bps: int) -> int:
    return _positive_int(capacity_bps, "capacity must be a positive integer below 2**63 (bits per second)")
