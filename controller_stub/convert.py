"""The one adapter between the generated dxa.controller.v1 messages and the ledger's types.

Nothing else in controller_stub imports agent._proto: servicers and clients call these
functions at the boundary and work with ledger dataclasses inside.  Times on the wire
are ``google.protobuf.Timestamp``; inside they are float seconds of the Unix epoch (the
clock the service layer will feed the ledger).  An open-ended window has no ``end`` on
the wire and ``math.inf`` inside.  Malformed messages raise the ledger's
``InvalidRequestError`` (a ValueError), never a protobuf error.
"""

from __future__ import annotations

import math

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from agent._proto.dxa.controller.v1 import controller_pb2 as pb
from agent._proto.dxa.controller.v1 import controller_pb2_grpc as pb_grpc
from controller_stub.errors import (
    InsufficientCapacityError,
    InvalidRequestError,
    InvalidTransitionError,
    LeaseExpiredError,
    LedgerError,
    NoRouteError,
    RateAboveCapacityError,
    UnknownAgentError,
    UnknownLinkError,
    UnknownReservationError,
)
from controller_stub.ledger import (
    Agent,
    AgentRegistration,
    Decision,
    Link,
    Outcome,
    Reservation,
    ReservationRequest,
    State,
)

__all__ = [
    "timestamp_to_seconds",
    "seconds_to_timestamp",
    "state_to_proto",
    "state_from_proto",
    "registration_from_proto",
    "registration_to_proto",
    "agent_to_proto",
    "agent_from_proto",
    "register_response",
    "spec_from_proto",
    "spec_to_proto",
    "reservation_to_proto",
    "reservation_from_proto",
    "decision_to_proto",
    "decision_from_proto",
    "release_from_proto",
    "release_response",
    "change_rate_response",
    "heartbeat_response",
    "list_filter_from_proto",
    "error_to_status",
    # service plumbing and envelopes for controller_stub.server / controller_stub.client
    "ControllerServicerBase",
    "add_servicer_to_server",
    "controller_stub",
    "register_from_response",
    "heartbeat_request",
    "heartbeat_from_request",
    "heartbeat_from_response",
    "request_reservation_request",
    "spec_from_request",
    "start_request",
    "start_from_request",
    "start_response",
    "start_from_response",
    "release_to_proto",
    "released_from_response",
    "change_rate_request",
    "change_rate_from_request",
    "list_filter_to_proto",
    "list_response",
    "list_page_from_proto",
    "list_page_from_response",
    "list_from_response",
    "watch_request",
    "watch_from_request",
    "watch_response",
    "watch_from_response",
    "topology_request",
    "topology_response",
    "topology_from_response",
]


_STATES = {
    State.SUBMITTED: pb.RESERVATION_STATE_SUBMITTED,
    State.RESERVED: pb.RESERVATION_STATE_RESERVED,
    State.TRANSFERRING: pb.RESERVATION_STATE_TRANSFERRING,
    State.DONE: pb.RESERVATION_STATE_DONE,
    State.FAILED: pb.RESERVATION_STATE_FAILED,
    State.CANCELLED: pb.RESERVATION_STATE_CANCELLED,
}
_STATES_BACK = {v: k for k, v in _STATES.items()}
_OUTCOMES = {
    Outcome.ADMITTED: pb.DECISION_ADMITTED,
    Outcome.QUEUED: pb.DECISION_QUEUED,
    Outcome.REFUSED: pb.DECISION_REFUSED,
}
_OUTCOMES_BACK = {v: k for k, v in _OUTCOMES.items()}


def timestamp_to_seconds(ts: timestamp_pb2.Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


def seconds_to_timestamp(t: float) -> timestamp_pb2.Timestamp:
    if not math.isfinite(t):
        raise InvalidRequestError("a timestamp must be finite", t)
    seconds = math.floor(t)
    nanos = round((t - seconds) * 1e9)
    if nanos >= 1_000_000_000:
        seconds, nanos = seconds + 1, nanos - 1_000_000_000
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def _optional_time(msg, name: str) -> float | None:
    return timestamp_to_seconds(getattr(msg, name)) if msg.HasField(name) else None


def state_to_proto(state: State) -> int:
    return _STATES[state]


def state_from_proto(value: int) -> State:
    try:
        return _STATES_BACK[value]
    except KeyError:
        raise InvalidRequestError("unknown reservation state", value) from None


# ------------------------------------------------------------------- agents


def registration_from_proto(msg: pb.RegisterAgentRequest) -> AgentRegistration:
    if not msg.name or not msg.site:
        raise InvalidRequestError("agent name and site are required")
    if msg.link_capacity_bps <= 0:
        raise InvalidRequestError("link_capacity_bps must be positive")
    return AgentRegistration(msg.name, msg.site, tuple(msg.addresses), msg.link_capacity_bps)


def registration_to_proto(reg: AgentRegistration) -> pb.RegisterAgentRequest:
    return pb.RegisterAgentRequest(name=reg.name, site=reg.site, addresses=reg.addresses,
                                   link_capacity_bps=reg.capacity_bps)


def agent_to_proto(agent: Agent) -> pb.Agent:
    return pb.Agent(name=agent.name, site=agent.site, addresses=agent.addresses,
                    link_capacity_bps=agent.capacity_bps,
                    lease_expires=seconds_to_timestamp(agent.lease_expires), expired=agent.expired)


def agent_from_proto(msg: pb.Agent) -> Agent:
    return Agent(msg.name, msg.site, tuple(msg.addresses), msg.link_capacity_bps,
                 timestamp_to_seconds(msg.lease_expires), msg.expired)


def register_response(agent: Agent, lease_timeout: float) -> pb.RegisterAgentResponse:
    timeout = duration_pb2.Duration()
    timeout.FromNanoseconds(round(lease_timeout * 1e9))
    return pb.RegisterAgentResponse(agent=agent_to_proto(agent), lease_timeout=timeout)


# ------------------------------------------------------------- reservations


def spec_from_proto(msg: pb.ReservationSpec) -> ReservationRequest:
    if not msg.source_agent or not msg.destination_agent:
        raise InvalidRequestError("source_agent and destination_agent are required")
    return ReservationRequest(
        source=msg.source_agent,
        destination=msg.destination_agent,
        rate_bps=msg.rate_bps or None,
        volume_bytes=msg.volume_bytes or None,
        not_before=_optional_time(msg, "not_before"),
        finish_by=_optional_time(msg, "finish_by"),
        priority=msg.priority,
        wait=msg.wait,
        path=tuple(msg.path) or None,
        transfer_id=msg.transfer_id,
    )


def spec_to_proto(req: ReservationRequest) -> pb.ReservationSpec:
    msg = pb.ReservationSpec(source_agent=req.source, destination_agent=req.destination,
                             rate_bps=req.rate_bps or 0, volume_bytes=req.volume_bytes or 0,
                             priority=req.priority, wait=req.wait, path=req.path or (),
                             transfer_id=req.transfer_id)
    if req.not_before is not None:
        msg.not_before.CopyFrom(seconds_to_timestamp(req.not_before))
    if req.finish_by is not None:
        msg.finish_by.CopyFrom(seconds_to_timestamp(req.finish_by))
    return msg


def reservation_to_proto(r: Reservation) -> pb.Reservation:
    msg = pb.Reservation(id=r.id, spec=spec_to_proto(r.request), path=r.path, rate_bps=r.rate_bps,
                         start=seconds_to_timestamp(r.start), state=state_to_proto(r.state),
                         submitted=seconds_to_timestamp(r.submitted_at), reason=r.reason)
    if r.end < math.inf:
        msg.end.CopyFrom(seconds_to_timestamp(r.end))
    return msg


def reservation_from_proto(msg: pb.Reservation) -> Reservation:
    """For clients (agents): the scheduler's view of one reservation.

    ``seq`` is not on the wire; it is taken from the id ("r<seq>") when it has that form."""
    seq = int(msg.id[1:]) if msg.id[:1] == "r" and msg.id[1:].isdigit() else 0
    return Reservation(
        id=msg.id,
        request=spec_from_proto(msg.spec),
        path=tuple(msg.path),
        rate_bps=msg.rate_bps,
        start=timestamp_to_seconds(msg.start),
        end=timestamp_to_seconds(msg.end) if msg.HasField("end") else math.inf,
        state=state_from_proto(msg.state),
        seq=seq,
        submitted_at=timestamp_to_seconds(msg.submitted),
        reason=msg.reason,
    )


def decision_to_proto(d: Decision) -> pb.RequestReservationResponse:
    msg = pb.RequestReservationResponse(decision=_OUTCOMES[d.outcome], blocked_by_queue=d.blocked_by_queue)
    if d.reservation is not None:
        msg.reservation.CopyFrom(reservation_to_proto(d.reservation))
    if d.earliest_start is not None:
        msg.earliest_start.CopyFrom(seconds_to_timestamp(d.earliest_start))
    return msg


def decision_from_proto(msg: pb.RequestReservationResponse) -> Decision:
    try:
        outcome = _OUTCOMES_BACK[msg.decision]
    except KeyError:
        raise InvalidRequestError("unknown decision", msg.decision) from None
    return Decision(
        outcome=outcome,
        reservation=reservation_from_proto(msg.reservation) if msg.HasField("reservation") else None,
        earliest_start=_optional_time(msg, "earliest_start"),
        blocked_by_queue=msg.blocked_by_queue,
    )


def release_from_proto(msg: pb.ReleaseReservationRequest) -> tuple[str, State, str]:
    """(reservation id, outcome, reason) for ``Ledger.release``."""
    outcome = state_from_proto(msg.outcome)
    if not outcome.released:
        raise InvalidRequestError("outcome must be DONE, FAILED or CANCELLED", msg.outcome)
    return msg.id, outcome, msg.reason


def release_response(released: Reservation, admitted: list[Reservation]) -> pb.ReleaseReservationResponse:
    return pb.ReleaseReservationResponse(reservation=reservation_to_proto(released),
                                         admitted=[reservation_to_proto(r) for r in admitted])


def change_rate_response(changed: Reservation, admitted: list[Reservation]) -> pb.ChangeRateResponse:
    return pb.ChangeRateResponse(reservation=reservation_to_proto(changed),
                                 admitted=[reservation_to_proto(r) for r in admitted])


def heartbeat_response(agent: Agent, reservations: list[Reservation]) -> pb.HeartbeatResponse:
    """The renewed lease and the agent's unreleased reservations (how it learns of admissions
    and rate changes)."""
    return pb.HeartbeatResponse(lease_expires=seconds_to_timestamp(agent.lease_expires),
                                reservations=[reservation_to_proto(r) for r in reservations
                                              if not r.state.released])


def list_filter_from_proto(msg: pb.ListReservationsRequest) -> tuple[str | None, frozenset[State] | None]:
    """(agent, states) for ``Ledger.reservations``; empty fields mean no filter."""
    states = frozenset(state_from_proto(s) for s in msg.states)
    return msg.agent or None, states or None


# ------------------------------------------------------------------- errors


_STATUS: tuple[tuple[type[LedgerError], grpc.StatusCode], ...] = (
    (UnknownAgentError, grpc.StatusCode.NOT_FOUND),
    (UnknownLinkError, grpc.StatusCode.NOT_FOUND),
    (UnknownReservationError, grpc.StatusCode.NOT_FOUND),
    (LeaseExpiredError, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidTransitionError, grpc.StatusCode.FAILED_PRECONDITION),
    (NoRouteError, grpc.StatusCode.FAILED_PRECONDITION),
    (InsufficientCapacityError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (RateAboveCapacityError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
)


def error_to_status(exc: LedgerError) -> grpc.StatusCode:
    """The gRPC status a servicer answers a ledger error with (the CLI words the message)."""
    for kind, code in _STATUS:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


# ------------------------------------------------- service plumbing, envelopes
#
# controller_stub.server and controller_stub.client never touch generated code: the
# servicer base class, the stub and every request/response envelope come from here.

ControllerServicerBase = pb_grpc.ControllerServiceServicer
"""Base class of the scheduler's servicer (one method per RPC of ControllerService)."""


def add_servicer_to_server(servicer, server) -> None:
    pb_grpc.add_ControllerServiceServicer_to_server(servicer, server)


def controller_stub(channel) -> pb_grpc.ControllerServiceStub:
    return pb_grpc.ControllerServiceStub(channel)


def register_from_response(msg: pb.RegisterAgentResponse) -> tuple[Agent, float]:
    """(the agent as registered, the lease timeout in seconds)."""
    return agent_from_proto(msg.agent), msg.lease_timeout.ToNanoseconds() / 1e9


def heartbeat_request(name: str) -> pb.HeartbeatRequest:
    return pb.HeartbeatRequest(name=name)


def heartbeat_from_request(msg: pb.HeartbeatRequest) -> str:
    if not msg.name:
        raise InvalidRequestError("agent name is required")
    return msg.name


def heartbeat_from_response(msg: pb.HeartbeatResponse) -> tuple[float, list[Reservation]]:
    """(the new lease expiry, the agent's unreleased reservations)."""
    return timestamp_to_seconds(msg.lease_expires), [reservation_from_proto(r) for r in msg.reservations]


def request_reservation_request(req: ReservationRequest) -> pb.RequestReservationRequest:
    return pb.RequestReservationRequest(spec=spec_to_proto(req))


def spec_from_request(msg: pb.RequestReservationRequest) -> ReservationRequest:
    if not msg.HasField("spec"):
        raise InvalidRequestError("spec is required")
    return spec_from_proto(msg.spec)


def _id(msg) -> str:
    if not msg.id:
        raise InvalidRequestError("reservation id is required")
    return msg.id


def start_request(reservation_id: str) -> pb.StartReservationRequest:
    return pb.StartReservationRequest(id=reservation_id)


def start_from_request(msg: pb.StartReservationRequest) -> str:
    return _id(msg)


def start_response(r: Reservation) -> pb.StartReservationResponse:
    return pb.StartReservationResponse(reservation=reservation_to_proto(r))


def start_from_response(msg: pb.StartReservationResponse) -> Reservation:
    return reservation_from_proto(msg.reservation)


def release_to_proto(reservation_id: str, outcome: State, reason: str = "") -> pb.ReleaseReservationRequest:
    if not outcome.released:
        raise InvalidRequestError("outcome must be DONE, FAILED or CANCELLED", outcome)
    return pb.ReleaseReservationRequest(id=reservation_id, outcome=state_to_proto(outcome), reason=reason)


def released_from_response(msg: pb.ReleaseReservationResponse | pb.ChangeRateResponse
                           ) -> tuple[Reservation, list[Reservation]]:
    """(the reservation released or changed, the waiters admitted as a result)."""
    return reservation_from_proto(msg.reservation), [reservation_from_proto(r) for r in msg.admitted]


def change_rate_request(reservation_id: str, rate_bps: int) -> pb.ChangeRateRequest:
    return pb.ChangeRateRequest(id=reservation_id, rate_bps=rate_bps)


def change_rate_from_request(msg: pb.ChangeRateRequest) -> tuple[str, int]:
    return _id(msg), msg.rate_bps


def list_filter_to_proto(agent: str | None = None, states=None, page_size: int = 0,
                         page_token: str = "") -> pb.ListReservationsRequest:
    return pb.ListReservationsRequest(agent=agent or "", states=[state_to_proto(s) for s in states or ()],
                                      page_size=page_size, page_token=page_token)


def list_page_from_proto(msg: pb.ListReservationsRequest) -> tuple[int, str]:
    """(page_size, page_token) of a ListReservations request."""
    return msg.page_size, msg.page_token


def list_response(reservations: list[Reservation], next_page_token: str = "") -> pb.ListReservationsResponse:
    return pb.ListReservationsResponse(reservations=[reservation_to_proto(r) for r in reservations],
                                       next_page_token=next_page_token)


def list_from_response(msg: pb.ListReservationsResponse) -> list[Reservation]:
    return [reservation_from_proto(r) for r in msg.reservations]


def list_page_from_response(msg: pb.ListReservationsResponse) -> tuple[list[Reservation], str]:
    """(one page of reservations, the next page's token or "" after the last)."""
    return list_from_response(msg), msg.next_page_token


def watch_request(agent: str) -> pb.WatchReservationsRequest:
    return pb.WatchReservationsRequest(agent=agent)


def watch_from_request(msg: pb.WatchReservationsRequest) -> str:
    return msg.agent


def watch_response(r: Reservation) -> pb.WatchReservationsResponse:
    return pb.WatchReservationsResponse(reservation=reservation_to_proto(r))


def watch_from_response(msg: pb.WatchReservationsResponse) -> Reservation:
    return reservation_from_proto(msg.reservation)


def topology_request() -> pb.GetTopologyRequest:
    return pb.GetTopologyRequest()


def topology_response(sites: list[str], agents: list[Agent], links: list[tuple[Link, int]]
                      ) -> pb.GetTopologyResponse:
    """``links``: (link, rate reserved on it now)."""
    return pb.GetTopologyResponse(
        sites=sites, agents=[agent_to_proto(a) for a in agents],
        links=[pb.Link(id=k.id, source=k.src, destination=k.dst, capacity_bps=k.capacity_bps, reserved_bps=load)
               for k, load in links])


def topology_from_response(msg: pb.GetTopologyResponse) -> tuple[list[str], list[Agent], list[tuple[Link, int]]]:
    return (list(msg.sites), [agent_from_proto(a) for a in msg.agents],
            [(Link(k.id, k.source, k.destination, k.capacity_bps), k.reserved_bps) for k in msg.links])
