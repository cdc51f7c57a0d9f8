"""The agent's side of the scheduler (``dxa serve --controller HOST:PORT``).

:class:`SchedulerLink` registers this agent with the scheduler (name = the CN of its
certificate, its site, its link capacity) and heartbeats every third of the lease.  A
failed heartbeat is logged and retried with exponential backoff (capped), never raised;
when the scheduler answers that the agent is unknown or its lease expired (the scheduler
was restarted from an old state, or the agent was away too long) the agent registers
again.  The JobManager uses the same link for reservations (request, poll, start,
release); see :mod:`agent.service.transfers`.  Changes of this agent's reservations (a new
rate, an admission, a release) arrive on the scheduler's WatchReservations stream the
moment they are saved (:meth:`SchedulerLink.wait_update`); polling remains the fallback
while the stream is down.

The destination of a scheduled job is named for the scheduler by the common name of the
destination daemon's certificate: :func:`peer_name` opens a TLS connection to its data
port and reads it, so a submit needs nothing beyond the usual ``dxa://HOST:PORT/path``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Iterable

import grpc

from agent.aio.tls import client_context, peer_identity
from agent.store.pki import Identity
from controller_stub.client import ControllerClient, ControllerError
from controller_stub.ledger import Reservation

__all__ = ["SchedulerLink", "peer_name"]

log = logging.getLogger(__name__)

RE_REGISTER = ("UnknownAgentError", "LeaseExpiredError")
WATCH_MEMORY = 1024
"""Pushed reservations remembered (the newest), for jobs that look one up."""


async def peer_name(host: str, port: int, identity: Identity, timeout: float = 10.0) -> str:
    """The node name (certificate CN) of the dxa daemon at ``host:port``, verified against our CA."""
    _reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=client_context(identity), ssl_handshake_timeout=timeout), timeout)
    try:
        return peer_identity(writer.get_extra_info("ssl_object"))
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (OSError, ConnectionError):
            pass


class SchedulerLink:
    """Registration and heartbeats of one agent; ``await start()``, ``await close()``.

    ``interval`` (seconds between heartbeats) defaults to a third of the lease the
    scheduler answers; ``backoff_max`` caps the wait between failed attempts.
    """

    def __init__(self, target: str, identity: Identity, *, site: str, capacity_bps: int,
                 addresses: Iterable[str] = (), server_name: str | None = None, interval: float | None = None,
                 timeout: float = 5.0, backoff_max: float = 5.0) -> None:
        self.target = target
        self.identity = identity
        self.name = identity.name
        self.site = site
        self.capacity_bps = int(capacity_bps)
        self.addresses = tuple(addresses)
        self.interval = interval
        self.backoff_max = backoff_max
        self.client = ControllerClient(target, identity, server_name=server_name, timeout=timeout)
        self.registered = asyncio.Event()
        self.lease_timeout: float | None = None
        self.registrations = 0
        self.pushed = 0
        """Reservation changes received on the WatchReservations stream (tests and logs)."""
        self.streaming = False
        """The push stream is open: :meth:`lookup` answers from what it pushed."""
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._watch_task: asyncio.Task | None = None
        self._latest: OrderedDict[str, Reservation] = OrderedDict()
        self._updated: dict[str, asyncio.Event] = {}

    async def start(self) -> None:
        """Start registering and heart-beating in the background (the scheduler may be down),
        and following this agent's reservations on the scheduler's push stream."""
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._loop(), name="dxa-scheduler-link")
        if self._watch_task is None:
            self._watch_task = loop.create_task(self._watch(), name="dxa-scheduler-watch")

    async def wait_registered(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self.registered.wait(), timeout)

    def stop_heartbeats(self) -> None:
        """Stop registering and heart-beating (the scheduler will expire the lease); tests use it."""
        if self._task is not None:
            self._task.cancel()

    async def close(self) -> None:
        for task in (self._task, self._watch_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._task = self._watch_task = None
        await self.client.close()

    async def _register(self) -> None:
        agent, lease = await self.client.register_agent(self.name, self.site, self.addresses, self.capacity_bps)
        self.lease_timeout = lease
        self.registrations += 1
        self.registered.set()
        log.info("registered with the scheduler %s as %s (site %s, %d bit/s, lease %.1f s)",
                 self.target, agent.name, agent.site, agent.capacity_bps, lease)

    async def _loop(self) -> None:
        backoff = 0.0
        need_register = True
        while True:
            try:
                if need_register:
                    await self._register()
                    need_register = False
                else:
                    await self.client.heartbeat(self.name)
                backoff = 0.0
                try:  # until the next heartbeat, or until a job finds the scheduler forgot us
                    await asyncio.wait_for(self._wake.wait(), self.interval or (self.lease_timeout or 30.0) / 3)
                    self._wake.clear()
                    need_register = True
                except TimeoutError:
                    pass
            except asyncio.CancelledError:
                raise
            except ControllerError as exc:
                if exc.kind in RE_REGISTER or exc.code is grpc.StatusCode.NOT_FOUND:
                    log.warning("scheduler %s: %s; registering again", self.target, exc)
                    self.registered.clear()
                    need_register = True
                else:
                    log.warning("scheduler %s: %s%s", self.target, "registration" if need_register else "heartbeat",
                                f" failed ({exc}); retrying")
                backoff = min(self.backoff_max, max(0.1, backoff * 2))
                await asyncio.sleep(backoff)
            except Exception:  # never take the daemon down
                log.exception("scheduler %s: unexpected error; retrying", self.target)
                backoff = min(self.backoff_max, max(0.1, backoff * 2))
                await asyncio.sleep(backoff)

    async def reservation(self, reservation_id: str) -> Reservation | None:
        """The reservation as the scheduler has it now (None: unknown to it): asked for."""
        for r in await self.client.list_reservations(self.name):
            if r.id == reservation_id:
                self._remember(r)
                return r
        return None

    async def lookup(self, reservation_id: str) -> Reservation | None:
        """The reservation as last pushed while the push stream is open (no call), else as
        :meth:`reservation` asks for it: polling is the fallback while the stream is down."""
        if self.streaming:
            r = self._latest.get(reservation_id)
            if r is not None:
                return r
        return await self.reservation(reservation_id)

    def _stream_opened(self) -> None:
        # What was pushed before may be stale (changes during a gap are not replayed): start
        # over from the stream's snapshot of the unreleased reservations, and ask for the rest.
        self._latest.clear()
        self.streaming = True

    def _remember(self, r: Reservation) -> None:
        self._latest[r.id] = r
        self._latest.move_to_end(r.id)
        while len(self._latest) > WATCH_MEMORY:
            self._latest.popitem(last=False)

    def register_again(self) -> None:
        """Register at once instead of at the next heartbeat (the scheduler answered a job that
        it does not know this agent: it lost its state, or our lease ran out)."""
        self.registered.clear()
        self._wake.set()

    async def wait_update(self, reservation_id: str, timeout: float) -> Reservation | None:
        """The reservation as last pushed by the scheduler, as soon as a change of it arrives
        (None: nothing within ``timeout``; the caller polls then)."""
        event = self._updated.get(reservation_id)
        if event is None:  # kept between calls, so a change that lands in between is not missed
            event = self._updated[reservation_id] = asyncio.Event()
            if len(self._updated) > WATCH_MEMORY:
                for rid in [rid for rid in self._updated if rid not in self._latest and rid != reservation_id]:
                    del self._updated[rid]
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return None
        event.clear()
        return self._latest.get(reservation_id)

    async def _watch(self) -> None:
        """Follow WatchReservations (re-opened with backoff); a scheduler without it is polled only."""
        backoff = 0.0
        while True:
            await self.registered.wait()
            try:
                async for r in self.client.watch_reservations(self.name, on_open=self._stream_opened):
                    backoff = 0.0
                    self.pushed += 1
                    self._remember(r)
                    event = self._updated.get(r.id)
                    if event is not None:
                        event.set()
            except asyncio.CancelledError:
                self.streaming = False
                raise
            except ControllerError as exc:
                self.streaming = False
                if exc.code is grpc.StatusCode.UNIMPLEMENTED:
                    log.info("scheduler %s pushes no reservation changes: polling only", self.target)
                    return
                log.debug("scheduler %s: reservation stream: %s; re-opening", self.target, exc)
            except Exception:  # never take the daemon down
                log.exception("scheduler %s: reservation stream failed; re-opening", self.target)
            self.streaming = False
            backoff = min(self.backoff_max, max(0.1, backoff * 2))
            await asyncio.sleep(backoff)
