"""An async client of the scheduler's ControllerService, over mutual TLS.

    async with ControllerClient("sched:7500", load_identity(home)) as c:
        agent, lease_timeout = await c.register_agent("gw1", "geneva", ["gw1:7400"], 10**10)
        decision = await c.request_reservation(ReservationRequest("gw1", "gw2", rate_bps=10**9))

Answers are the ledger's own types (``Agent``, ``Decision``, ``Reservation``); a refused
call raises :class:`ControllerError` with the gRPC status, the scheduler's error class
(``kind``, e.g. ``"LeaseExpiredError"``) and, for a raise that does not fit,
``available_bps``.  The server's certificate must name the host dialled (``dxa init``
certificates name ``localhost``, ``127.0.0.1`` and the node), or pass ``server_name``:
the node name in the scheduler's certificate.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import grpc

from agent.service.credentials import GrpcCallError, MtlsClient
from agent.store.pki import Identity
from controller_stub import convert
from controller_stub.ledger import (
    Agent,
    AgentRegistration,
    Decision,
    Link,
    Reservation,
    ReservationRequest,
    State,
)

__all__ = ["ControllerClient", "ControllerError"]


class ControllerError(GrpcCallError):
    """The scheduler refused a call, or could not be reached (``code`` UNAVAILABLE)."""

    def __init__(self, code: grpc.StatusCode, details: str, kind: str = "", available_bps: int | None = None) -> None:
        super().__init__(code, details, kind)
        self.available_bps = available_bps


def _error(exc: grpc.aio.AioRpcError) -> ControllerError:
    meta = GrpcCallError.trailers(exc)
    available = meta.get("dxa-available-bps")
    return ControllerError(exc.code(), exc.details() or "", meta.get("dxa-error", ""),
                           int(available) if available and available.isdigit() else None)


class ControllerClient(MtlsClient):
    """One channel to the scheduler; every method is one RPC with a ``timeout`` (seconds)."""

    _error = staticmethod(_error)

    def __init__(self, target: str, identity: Identity, *, server_name: str | None = None,
                 timeout: float = 10.0) -> None:
        super().__init__(target, identity, server_name=server_name, timeout=timeout)
        self._stub = convert.controller_stub(self._channel)

    async def register_agent(self, name: str, site: str, addresses: Iterable[str], capacity_bps: int
                             ) -> tuple[Agent, float]:
        """(the agent, the lease timeout in seconds: heartbeat well within it)."""
        msg = convert.registration_to_proto(AgentRegistration(name, site, tuple(addresses), capacity_bps))
        return convert.register_from_response(await self._call(self._stub.RegisterAgent, msg))

    async def heartbeat(self, name: str) -> tuple[float, list[Reservation]]:
        """(the new lease expiry, the agent's unreleased reservations with their granted rates)."""
        return convert.heartbeat_from_response(await self._call(self._stub.Heartbeat, convert.heartbeat_request(name)))

    async def request_reservation(self, request: ReservationRequest) -> Decision:
        msg = convert.request_reservation_request(request)
        return convert.decision_from_proto(await self._call(self._stub.RequestReservation, msg))

    async def start_reservation(self, reservation_id: str) -> Reservation:
        msg = convert.start_request(reservation_id)
        return convert.start_from_response(await self._call(self._stub.StartReservation, msg))

    async def release_reservation(self, reservation_id: str, outcome: State = State.DONE, reason: str = ""
                                  ) -> tuple[Reservation, list[Reservation]]:
        """(the released reservation, the waiters admitted with the freed rate)."""
        msg = convert.release_to_proto(reservation_id, outcome, reason)
        return convert.released_from_response(await self._call(self._stub.ReleaseReservation, msg))

    async def change_rate(self, reservation_id: str, rate_bps: int) -> tuple[Reservation, list[Reservation]]:
        """(the reservation at its new rate, the waiters admitted by a lowering)."""
        msg = convert.change_rate_request(reservation_id, rate_bps)
        return convert.released_from_response(await self._call(self._stub.ChangeRate, msg))

    async def list_reservations(self, agent: str | None = None, states: Iterable[State] | None = None
                                ) -> list[Reservation]:
        """Every matching reservation, in arrival order (all pages)."""
        states = None if states is None else list(states)
        out: list[Reservation] = []
        token = ""
        while True:
            page, token = await self.list_reservations_page(agent, states, page_token=token)
            out += page
            if not token:
                return out

    async def list_reservations_page(self, agent: str | None = None, states: Iterable[State] | None = None, *,
                                     page_size: int = 0, page_token: str = "") -> tuple[list[Reservation], str]:
        """One page: (reservations, the next page's token, "" after the last)."""
        msg = convert.list_filter_to_proto(agent, states and list(states), page_size, page_token)
        return convert.list_page_from_response(await self._call(self._stub.ListReservations, msg))

    async def topology(self) -> tuple[list[str], list[Agent], list[tuple[Link, int]]]:
        """(sites, agents, [(link, rate reserved on it now)]) as the scheduler sees them."""
        return convert.topology_from_response(await self._call(self._stub.GetTopology, convert.topology_request()))

    async def watch_reservations(self, agent: str, on_open=None) -> AsyncIterator[Reservation]:
        """The agent's unreleased reservations, then each change as the scheduler saves it
        (no timeout; ends when the scheduler stops; ``agent`` empty: all, for admins).
        ``on_open()`` is called once the scheduler has accepted the stream."""
        call = self._stub.WatchReservations(convert.watch_request(agent))
        try:
            await call.initial_metadata()
            if on_open is not None:
                on_open()
            async for msg in call:
                yield convert.watch_from_response(msg)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        finally:
            call.cancel()
