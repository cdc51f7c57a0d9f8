"""The scheduler's gRPC server (``dxa controller serve``): ControllerService over the ledger.

A thin layer: each RPC reads the clock once, converts the request (``convert``), makes one
ledger call, saves the whole ledger (``LedgerStore``) and only then answers, so an
acknowledged registration, reservation, release or rate change survives a restart.
The ledger is sans-I/O and not thread-safe; here it is owned by one asyncio event loop
and every RPC runs its ledger call and its save without yielding, so calls never
interleave.  A background task calls ``Ledger.tick`` when the ledger's next timer is due
(and at least every ``tick_interval`` seconds): leases run out, windows end, waiters
whose deadline passed fail, and the state is saved when anything changed.

Transport: gRPC over mutual TLS with the ``dxa init`` identity (the node's certificate
and key, the CA as the only trust anchor, client certificates required), so a client
whose certificate comes from another CA is refused during the handshake.

Authorization: the caller is the common name (CN) of its client certificate, the node
name ``dxa init`` put there (as ``agent.aio.tls.peer_identity`` names a peer).  An agent
registers and heartbeats only as itself; it requests, starts, releases and re-rates only
reservations it is the source or destination of; a node named in ``admins`` may do
everything; ListReservations is open to every caller.  The check runs before any ledger
call, so a refused call (``PERMISSION_DENIED``, logged at WARNING) changes nothing.

Errors: a ledger error is answered with ``convert.error_to_status`` and a readable
message; trailing metadata ``dxa-error`` names the error class, and a raise that does not
fit carries ``dxa-available-bps``.  A save that fails is answered ``UNAVAILABLE`` and the
ledger is rolled back to the last state on disk, so the caller may retry.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import grpc

from agent import errors as agent_errors
from agent.errors import ConfigError
from agent.service import paging
from agent.service.credentials import bind_server, caller_name
from agent.store.pki import Identity
from controller_stub import convert
from controller_stub.errors import (
    InsufficientCapacityError,
    InvalidRequestError,
    InvalidTransitionError,
    LeaseExpiredError,
    LedgerError,
    LedgerStoreError,
    NoRouteError,
    PermissionDeniedError,
    RateAboveCapacityError,
    UnknownAgentError,
    UnknownLinkError,
    UnknownReservationError,
)
from controller_stub.ledger import (
    LeaseExpired,
    Ledger,
    LedgerConfig,
    RateChanged,
    Reservation,
    ReservationAdmitted,
    ReservationReleased,
)
from controller_stub.store import LedgerStore
from controller_stub.topology import Topology

__all__ = ["ControllerServer", "ControllerService", "ListenError", "describe_error", "describe_refusal"]

log = logging.getLogger("controller_stub.server")

WATCH_BACKLOG = 10_000
"""Changes a WatchReservations stream may leave unread before it is cut off (bounded memory)."""


class ListenError(agent_errors.ListenError):
    """The scheduler could not bind its listening address."""


def describe_error(exc: LedgerError) -> str:
    """A sentence for people (the gRPC status details)."""
    if isinstance(exc, UnknownAgentError):
        return f"unknown agent {exc.name!r}: it must register first"
    if isinstance(exc, UnknownLinkError):
        return f"unknown link {exc.link!r}"
    if isinstance(exc, UnknownReservationError):
        return f"no reservation {exc.reservation_id!r}"
    if isinstance(exc, NoRouteError):
        return f"no route from {exc.source!r} to {exc.destination!r}"
    if isinstance(exc, LeaseExpiredError):
        return f"agent {exc.name!r}: its lease expired; register again"
    if isinstance(exc, RateAboveCapacityError):
        return f"{exc.rate_bps} bit/s is above the capacity of link {exc.link!r} ({exc.capacity_bps} bit/s)"
    if isinstance(exc, InsufficientCapacityError):
        return (f"{exc.reservation_id}: {exc.rate_bps} bit/s does not fit on its path; "
                f"at most {exc.available_bps} bit/s is available")
    if isinstance(exc, InvalidTransitionError):
        return f"{exc.reservation_id} is {exc.state}: cannot {exc.action}"
    return str(exc) or type(exc).__name__  # InvalidRequestError and its kin read as sentences


_VERBS = {
    "RegisterAgent": "register",
    "Heartbeat": "heartbeat",
    "RequestReservation": "request a reservation",
    "StartReservation": "start",
    "ReleaseReservation": "release",
    "ChangeRate": "change the rate of",
}


def describe_refusal(exc: PermissionDeniedError) -> str:
    """A sentence for people: who called, and what it may not do."""
    verb = _VERBS.get(exc.action, exc.action)
    if not exc.caller:
        return f"the caller's certificate has no common name (node name): it may not {verb}"
    if exc.agent:
        return f"node {exc.caller!r} may not {verb} as {exc.agent!r}"
    if exc.reservation_id:
        return (f"node {exc.caller!r} is not a party of reservation {exc.reservation_id} "
                f"({exc.source} -> {exc.destination}): it may not {verb} it")
    return (f"node {exc.caller!r} may not {verb} from {exc.source!r} to {exc.destination!r}: "
            f"it is neither the source nor the destination")


async def _refuse(context, exc: PermissionDeniedError) -> None:
    """Answer PERMISSION_DENIED (logged at WARNING), naming the caller and what it tried."""
    text = describe_refusal(exc)
    log.warning("refused: %s", text)
    await context.abort(grpc.StatusCode.PERMISSION_DENIED, text, trailing_metadata=(("dxa-error", type(exc).__name__),))


def _admin_names(admins: Iterable[str]) -> frozenset[str]:
    if isinstance(admins, str):
        raise ConfigError(f"admins must be a collection of node names, not the string {admins!r}")
    names = frozenset(admins)
    if any(not isinstance(n, str) or not n for n in names):
        raise ConfigError(f"admins must be non-empty node names, got {sorted(map(repr, names))}")
    return names


def _event_text(event) -> str:
    if isinstance(event, LeaseExpired):
        return f"lease expired: agent {event.agent.name}"
    r = event.reservation
    if isinstance(event, ReservationAdmitted):
        return f"admitted {r.id} {r.request.source}->{r.request.destination} at {r.rate_bps} bit/s"
    if isinstance(event, ReservationReleased):
        return f"released {r.id} as {r.state.value}" + (f" ({r.reason})" if r.reason else "")
    if isinstance(event, RateChanged):
        return f"rate of {r.id}: {event.old_rate_bps} -> {r.rate_bps} bit/s"
    return f"{type(event).__name__} {r.id}"


class ControllerService(convert.ControllerServicerBase):
    """The servicer: owns the ledger and its store for the lifetime of the server.

    ``admins``: node names (certificate CNs) allowed every call on every agent's behalf.
    """

    def __init__(self, ledger: Ledger, store: LedgerStore, clock: Callable[[], float] = time.time, *,
                 admins: Iterable[str] = ()) -> None:
        self.ledger = ledger
        self.store = store
        self.admins = _admin_names(admins)
        self._clock = clock
        self._last_now = -math.inf
        self._saved = ledger.snapshot()
        self._watchers: dict[asyncio.Queue, str | None] = {}
        """WatchReservations streams: queue → the agent watched (None: all)."""
        self._commit(self.now())

    # ------------------------------------------------------------ plumbing

    def now(self) -> float:
        """The clock, never going backwards (the ledger's assumption)."""
        self._last_now = max(self._last_now, self._clock())
        return self._last_now

    def _commit(self, now: float, *, always: bool = True) -> None:
        """Save the ledger (always, or only when events show that something changed)."""
        events = self.ledger.drain_events()
        for event in events:
            log.info("%s", _event_text(event))
        if not (always or events):
            return
        snap = self.ledger.snapshot()
        try:
            self.store.save(snap)
        except LedgerStoreError:
            # Roll back to what is on disk: an unsaved change must not be acknowledged
            # later by accident (agents that were live get a fresh lease, as on restart).
            self.ledger = Ledger.restore(self._saved, now, self.ledger.config)
            raise
        self._saved = snap
        self._notify(event.reservation for event in events if hasattr(event, "reservation"))

    def _notify(self, changed: Iterable[Reservation]) -> None:
        """Push saved changes to the WatchReservations streams that follow one of their agents."""
        if not self._watchers:
            return
        for r in changed:
            for q, agent in list(self._watchers.items()):
                if agent is not None and agent not in (r.request.source, r.request.destination):
                    continue
                if q.qsize() >= WATCH_BACKLOG:  # a watcher that does not read: cut it off
                    log.warning("dropping a WatchReservations stream of %s: %d changes unread", agent or "all",
                                q.qsize())
                    del self._watchers[q]
                    q.put_nowait(None)
                    continue
                q.put_nowait(r)

    def close_watchers(self) -> None:
        """End every WatchReservations stream (the server is stopping)."""
        for q in self._watchers:
            q.put_nowait(None)
        self._watchers.clear()

    async def _call(self, context, fn: Callable[[float], object], *, mutating: bool = True):
        now = self.now()
        try:
            answer = fn(now)
        except PermissionDeniedError as exc:  # raised before any ledger call: nothing to save or roll back
            await _refuse(context, exc)
        except LedgerError as exc:
            try:  # the ledger may have moved time on (expired a lease) before refusing
                self._commit(now, always=False)
            except LedgerStoreError as store_exc:
                log.error("%s", store_exc)
            metadata = [("dxa-error", type(exc).__name__)]
            if isinstance(exc, InsufficientCapacityError):
                metadata.append(("dxa-available-bps", str(exc.available_bps)))
            await context.abort(convert.error_to_status(exc), describe_error(exc), trailing_metadata=tuple(metadata))
        try:
            self._commit(now, always=mutating)
        except LedgerStoreError as exc:
            log.error("%s", exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the scheduler could not save its state, nothing "
                                                             f"changed; retry later ({exc})")
        return answer

    def _check_agent(self, caller: str, action: str, name: str) -> None:
        """The caller is the agent ``name`` (or an admin)."""
        if caller in self.admins or (caller and caller == name):
            return
        raise PermissionDeniedError(caller, action, agent=name)

    def _check_party(self, caller: str, action: str, source: str, destination: str,
                     reservation_id: str = "") -> None:
        """The caller is the source or destination (or an admin)."""
        if caller in self.admins or (caller and caller in (source, destination)):
            return
        raise PermissionDeniedError(caller, action, reservation_id=reservation_id, source=source,
                                    destination=destination)

    def _check_reservation(self, caller: str, action: str, reservation_id: str) -> Reservation:
        r = self.ledger.get(reservation_id)
        self._check_party(caller, action, r.request.source, r.request.destination, r.id)
        return r

    def prune(self, retention: float) -> int:
        """Forget the reservations released more than ``retention`` seconds ago; save; return how many."""
        now = self.now()
        gone = self.ledger.prune(now - retention)
        if gone:
            self._commit(now)
            log.info("pruned %d reservations released more than %.0f s ago (%s .. %s)", len(gone), retention,
                     gone[0].id, gone[-1].id)
        return len(gone)

    def tick(self) -> None:
        """Let time pass (leases, windows, deadlines) and save if anything changed."""
        now = self.now()
        self.ledger.tick(now)
        self._commit(now, always=False)

    # ------------------------------------------------------------ the RPCs

    async def RegisterAgent(self, request, context):
        caller = caller_name(context)

        def fn(now):
            registration = convert.registration_from_proto(request)
            self._check_agent(caller, "RegisterAgent", registration.name)
            agent = self.ledger.register(registration, now)
            log.info("registered agent %s at %s (%d bit/s)", agent.name, agent.site, agent.capacity_bps)
            return convert.register_response(agent, self.ledger.config.lease_timeout)
        return await self._call(context, fn)

    async def Heartbeat(self, request, context):
        caller = caller_name(context)

        def fn(now):
            name = convert.heartbeat_from_request(request)
            self._check_agent(caller, "Heartbeat", name)
            agent = self.ledger.heartbeat(name, now)
            return convert.heartbeat_response(agent, self.ledger.reservations(agent=agent.name))
        # Not saved unless the ledger moved on (events): the new lease expiry alone is never read
        # back, since a restarted scheduler gives every live agent a fresh lease.
        return await self._call(context, fn, mutating=False)

    async def RequestReservation(self, request, context):
        caller = caller_name(context)

        def fn(now):
            spec = convert.spec_from_request(request)
            self._check_party(caller, "RequestReservation", spec.source, spec.destination)
            decision = self.ledger.request(spec, now)
            r = decision.reservation
            log.info("request %s->%s: %s%s", request.spec.source_agent, request.spec.destination_agent,
                     decision.outcome.value, f" {r.id} at {r.rate_bps} bit/s" if r else "")
            return convert.decision_to_proto(decision)
        return await self._call(context, fn)

    async def StartReservation(self, request, context):
        caller = caller_name(context)

        def fn(now):
            rid = convert.start_from_request(request)
            self._check_reservation(caller, "StartReservation", rid)
            return convert.start_response(self.ledger.start(rid, now))
        return await self._call(context, fn)

    async def ReleaseReservation(self, request, context):
        caller = caller_name(context)

        def fn(now):
            rid, outcome, reason = convert.release_from_proto(request)
            self._check_reservation(caller, "ReleaseReservation", rid)
            admitted = self.ledger.release(rid, outcome, now, reason)
            return convert.release_response(self.ledger.get(rid), admitted)
        return await self._call(context, fn)

    async def ChangeRate(self, request, context):
        caller = caller_name(context)

        def fn(now):
            rid, rate = convert.change_rate_from_request(request)
            self._check_reservation(caller, "ChangeRate", rid)
            return convert.change_rate_response(*self.ledger.change_rate(rid, rate, now))
        return await self._call(context, fn)

    async def WatchReservations(self, request, context):
        caller = caller_name(context)
        agent = convert.watch_from_request(request)
        if not (caller in self.admins or (agent and caller == agent)):
            await _refuse(context, PermissionDeniedError(caller, "WatchReservations", agent=agent or "(all agents)"))
        await context.send_initial_metadata(())  # tells the watcher the stream is open
        self.tick()  # the present: windows that ended and leases that ran out are released first
        current = [r for r in self.ledger.reservations(agent=agent or None) if not r.state.released]
        q: asyncio.Queue = asyncio.Queue()
        self._watchers[q] = agent or None  # from here on (no await in between), every change is queued
        try:
            for r in current:
                yield convert.watch_response(r)
            while True:
                r = await q.get()
                if r is None:
                    return
                yield convert.watch_response(r)
        finally:
            self._watchers.pop(q, None)

    async def GetTopology(self, request, context):
        # Read-only: open to every caller the TLS handshake let in.
        def fn(now):
            self.ledger.tick(now)  # expired leases show as expired, ended windows hold nothing
            return convert.topology_response(self.ledger.sites(), self.ledger.agents(),
                                             [(k, self.ledger.load(k.id, now)) for k in self.ledger.links()])
        return await self._call(context, fn, mutating=False)

    async def ListReservations(self, request, context):
        # Read-only: open to every caller the TLS handshake let in.
        def fn(now):
            agent, states = convert.list_filter_from_proto(request)
            page_size, token = convert.list_page_from_proto(request)
            self.ledger.tick(now)  # show what is true now (expired leases, ended windows)
            try:  # in arrival order (seq): pages neither repeat nor skip while the ledger changes
                rows, next_token = paging.page(self.ledger.reservations(states=states, agent=agent),
                                               lambda r: r.seq, page_size, token)
            except paging.BadPageTokenError as exc:
                raise InvalidRequestError(str(exc)) from None
            return convert.list_response(rows, next_token)
        return await self._call(context, fn, mutating=False)


class ControllerServer:
    """The gRPC server, the ledger restored from ``state_path`` (or new), the ticker.

    ``clock`` and ``config`` (the lease timeout) are injectable for tests.  The topology is
    applied on every start, so a changed capacity takes effect (and may preempt).
    ``admins``: node names (client certificate CNs) that may do every call for any agent
    and any reservation (operators); everyone else acts only as itself.  ``metrics``:
    (host, port) to serve Prometheus metrics on (:mod:`controller_stub.metrics`).
    ``history_retention``: seconds a released reservation is kept as history (None: for
    ever); pruned at start and every ``prune_interval`` seconds.
    """

    def __init__(self, identity: Identity, topology: Topology, state_path: str | Path, *, host: str = "127.0.0.1",
                 port: int = 0, config: LedgerConfig | None = None, clock: Callable[[], float] = time.time,
                 tick_interval: float = 1.0, admins: Iterable[str] = (),
                 metrics: tuple[str, int] | None = None, history_retention: float | None = None,
                 prune_interval: float = 600.0) -> None:
        if history_retention is not None and not (history_retention > 0 and math.isfinite(history_retention)):
            raise ConfigError("history retention must be a positive number of seconds")
        self.history_retention = history_retention
        self.prune_interval = prune_interval
        self.identity = identity
        self.metrics_address = metrics
        self.metrics = None
        self.admins = _admin_names(admins)
        self.topology = topology
        self.state_path = Path(state_path)
        self.host, self.port = host, port
        self.config = config or LedgerConfig()
        self.clock = clock
        self.tick_interval = tick_interval
        self.service: ControllerService | None = None
        self._server: grpc.aio.Server | None = None
        self._ticker: asyncio.Task | None = None

    @property
    def ledger(self) -> Ledger:
        assert self.service is not None, "not started"
        return self.service.ledger

    async def start(self) -> int:
        """Load or create the state, apply the topology, listen; return the bound port."""
        store = LedgerStore(self.state_path)
        try:
            snap = store.load()
            now = self.clock()
            ledger = Ledger.restore(snap, now, self.config) if snap is not None else Ledger(self.config)
            self.topology.apply(ledger, now)
            service = self.service = ControllerService(ledger, store, self.clock, admins=self.admins)
            server, port = bind_server(self.identity, self.host, self.port,
                                       lambda s: convert.add_servicer_to_server(service, s), ListenError)
            await server.start()
        except BaseException:
            store.close()
            raise
        self._server, self.port = server, port
        if self.metrics_address is not None:
            from controller_stub.metrics import SchedulerMetrics

            self.metrics = SchedulerMetrics(clock=self.clock)
            try:
                self.metrics.start(*self.metrics_address, lambda: self.ledger)
            except OSError as exc:
                await server.stop(None)
                self.service.store.close()
                raise ListenError(f"cannot serve metrics on {self.metrics_address[0]}:{self.metrics_address[1]}: "
                                  f"{exc.strerror or exc}") from None
            log.info("metrics at http://%s:%d/metrics", self.metrics.host, self.metrics.port)
        if self.history_retention is not None:
            self.service.prune(self.history_retention)
        self._ticker = asyncio.get_running_loop().create_task(self._tick_forever())
        held = sum(1 for r in self.ledger.reservations() if not r.state.released)
        log.info("controller listening on %s:%d, state %s (%d agents, %d unreleased reservations), admins: %s",
                 self.host, port, self.state_path, len(self.ledger.agents()), held,
                 ", ".join(sorted(self.admins)) or "none")
        return port

    async def _tick_forever(self) -> None:
        assert self.service is not None
        pruned = self.clock()
        while True:
            due = self.service.ledger.next_timer()
            delay = self.tick_interval if due is None else min(self.tick_interval, due - self.clock())
            await asyncio.sleep(max(delay, 0.01))
            try:
                self.service.tick()
                if self.history_retention is not None and self.clock() - pruned >= self.prune_interval:
                    pruned = self.clock()
                    self.service.prune(self.history_retention)
            except Exception:  # the ticker must outlive a failed save; it retries at the next tick
                log.exception("tick failed")

    async def stop(self, grace: float | None = 1.0) -> None:
        """Stop answering (in-flight calls get ``grace`` seconds), save, close the store."""
        if self.metrics is not None:
            await self.metrics.close()
            self.metrics = None
        if self._ticker is not None:
            self._ticker.cancel()
            try:
                await self._ticker
            except asyncio.CancelledError:
                pass
            self._ticker = None
        if self._server is not None:
            if self.service is not None:
                self.service.close_watchers()
            await self._server.stop(grace)
            self._server = None
        if self.service is not None:
            try:
                self.service.tick()
            finally:
                self.service.store.close()
            self.service = None

    async def __aenter__(self) -> ControllerServer:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()
