"""The one adapter between the generated dxa.agent.v1 messages and agent.service's types.

Nothing else in agent/service imports agent._proto: the servicer and the client call
these functions at the boundary and work with :mod:`agent.service.transfers` types
inside.  On the wire an endpoint is an agent and a path; here the destination is one
``dxa://HOST:PORT/path`` URL, so the destination's ``agent`` is its ``HOST:PORT`` (there
is no registry of agent names on this side yet).  Times are float Unix seconds inside,
``google.protobuf.Timestamp`` outside.  Malformed messages raise
:class:`~agent.service.transfers.InvalidTransferError`.
"""

from __future__ import annotations

import math

import grpc
from google.protobuf import timestamp_pb2

from agent._proto.dxa.agent.v1 import agent_pb2 as pb
from agent._proto.dxa.agent.v1 import agent_pb2_grpc as pb_grpc
from agent.config import parse_host_port
from agent.errors import ConfigError
from agent.service.transfers import (
    InvalidTransferError,
    JobError,
    JobState,
    Progressed,
    RateChanged,
    RateRefusedError,
    StateChanged,
    Transfer,
    TransferEvent,
    TransferSpec,
    TransferStateError,
    UnknownTransferError,
)

_STATES = {
    JobState.SUBMITTED: pb.TRANSFER_STATE_SUBMITTED,
    JobState.RESERVED: pb.TRANSFER_STATE_RESERVED,
    JobState.TRANSFERRING: pb.TRANSFER_STATE_TRANSFERRING,
    JobState.DONE: pb.TRANSFER_STATE_DONE,
    JobState.FAILED: pb.TRANSFER_STATE_FAILED,
    JobState.CANCELLED: pb.TRANSFER_STATE_CANCELLED,
}
_STATES_BACK = {v: k for k, v in _STATES.items()}


def timestamp_to_seconds(ts: timestamp_pb2.Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


def seconds_to_timestamp(t: float) -> timestamp_pb2.Timestamp:
    seconds = math.floor(t)
    nanos = min(round((t - seconds) * 1e9), 999_999_999)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def state_to_proto(state: JobState | None) -> int:
    return pb.TRANSFER_STATE_UNSPECIFIED if state is None else _STATES[state]


def state_from_proto(value: int) -> JobState | None:
    if value == pb.TRANSFER_STATE_UNSPECIFIED:
        return None
    try:
        return _STATES_BACK[value]
    except KeyError:
        raise InvalidTransferError(f"unknown transfer state {value}") from None


# ------------------------------------------------------------------- spec and transfer

def _split_url(url: str) -> tuple[str, str]:
    """``dxa://HOST:PORT/a/b/`` → (``HOST:PORT``, ``a/b/``)."""
    if not url.startswith("dxa://"):
        raise InvalidTransferError(f"the destination must be dxa://HOST:PORT/path, got {url!r}")
    agent, _, path = url.removeprefix("dxa://").partition("/")
    return agent, path


def spec_to_proto(spec: TransferSpec) -> pb.TransferSpec:
    agent, path = _split_url(spec.destination)
    msg = pb.TransferSpec(source=pb.Endpoint(agent=spec.source_agent, path=spec.source),
                          destination=pb.Endpoint(agent=agent, path=path), priority=spec.priority,
                          recursive=spec.recursive, no_queue=spec.no_queue)
    if spec.rate_bps and spec.deadline is not None:  # one oneof on the wire: refuse, never drop one
        raise InvalidTransferError("give a rate or a deadline, not both")
    if spec.rate_bps:
        msg.rate_bps = spec.rate_bps
    elif spec.deadline is not None:
        msg.deadline.CopyFrom(seconds_to_timestamp(spec.deadline))
    if spec.window_start is not None:
        msg.window_start.CopyFrom(seconds_to_timestamp(spec.window_start))
    if spec.window_end is not None:
        msg.window_end.CopyFrom(seconds_to_timestamp(spec.window_end))
    return msg


def spec_from_proto(msg: pb.TransferSpec) -> TransferSpec:
    try:
        parse_host_port(msg.destination.agent)
    except ConfigError:
        raise InvalidTransferError(f"the destination agent must be HOST:PORT of its dxa serve, got "
                                   f"{msg.destination.agent!r}") from None
    destination = f"dxa://{msg.destination.agent}/{msg.destination.path.lstrip('/')}"
    return TransferSpec(source=msg.source.path, destination=destination,
                        rate_bps=msg.rate_bps if msg.HasField("rate_bps") else 0, priority=msg.priority,
                        recursive=msg.recursive, source_agent=msg.source.agent,
                        window_start=timestamp_to_seconds(msg.window_start) if msg.HasField("window_start") else None,
                        window_end=timestamp_to_seconds(msg.window_end) if msg.HasField("window_end") else None,
                        deadline=timestamp_to_seconds(msg.deadline) if msg.HasField("deadline") else None,
                        no_queue=msg.no_queue)


def transfer_to_proto(t: Transfer) -> pb.Transfer:
    return pb.Transfer(id=t.id, spec=spec_to_proto(t.spec), state=state_to_proto(t.state), bytes_total=t.bytes_total,
                       bytes_done=t.bytes_done, files_total=t.files_total, files_done=t.files_done,
                       granted_rate_bps=t.rate_bps, created=seconds_to_timestamp(t.created),
                       updated=seconds_to_timestamp(t.updated), error=t.error, bytes_skipped=t.bytes_skipped,
                       reservation_id=t.reservation_id, current_rate_bps=t.current_rate_bps)


def transfer_from_proto(msg: pb.Transfer) -> Transfer:
    state = state_from_proto(msg.state) or JobState.SUBMITTED
    return Transfer(id=msg.id, spec=spec_from_proto(msg.spec), state=state, rate_bps=msg.granted_rate_bps,
                    bytes_total=msg.bytes_total, bytes_done=msg.bytes_done, bytes_skipped=msg.bytes_skipped,
                    files_total=msg.files_total, files_done=msg.files_done, error=msg.error,
                    created=timestamp_to_seconds(msg.created), updated=timestamp_to_seconds(msg.updated),
                    reservation_id=msg.reservation_id, current_rate_bps=msg.current_rate_bps)


# ------------------------------------------------------------------- events

def event_to_proto(ev: TransferEvent) -> pb.WatchTransferResponse:
    msg = pb.WatchTransferResponse(transfer_id=ev.transfer_id, time=seconds_to_timestamp(ev.time))
    if isinstance(ev, StateChanged):
        msg.state_changed.CopyFrom(pb.TransferStateChanged(old_state=state_to_proto(ev.old),
                                                           new_state=state_to_proto(ev.new), error=ev.error))
    elif isinstance(ev, Progressed):
        msg.progressed.CopyFrom(pb.TransferProgressed(
            bytes_done=ev.bytes_done, bytes_total=ev.bytes_total, files_done=ev.files_done,
            files_total=ev.files_total, current_rate_bps=ev.current_rate_bps, chunks_retried=ev.chunks_retried))
    else:
        msg.rate_changed.CopyFrom(pb.TransferRateChanged(old_rate_bps=ev.old_rate_bps, new_rate_bps=ev.new_rate_bps))
    return msg


def event_from_proto(msg: pb.WatchTransferResponse) -> TransferEvent:
    t, kind = timestamp_to_seconds(msg.time), msg.WhichOneof("event")
    if kind == "state_changed":
        e = msg.state_changed
        return StateChanged(msg.transfer_id, t, state_from_proto(e.old_state),
                            state_from_proto(e.new_state) or JobState.SUBMITTED, e.error)
    if kind == "progressed":
        e = msg.progressed
        return Progressed(msg.transfer_id, t, e.bytes_done, e.bytes_total, e.files_done, e.files_total,
                          e.current_rate_bps, e.chunks_retried)
    if kind == "rate_changed":
        e = msg.rate_changed
        return RateChanged(msg.transfer_id, t, e.old_rate_bps, e.new_rate_bps)
    raise InvalidTransferError("a watch event without an event")


# ------------------------------------------------------------------- requests and responses

def submit_request(spec: TransferSpec, request_id: str = "") -> pb.SubmitTransferRequest:
    return pb.SubmitTransferRequest(spec=spec_to_proto(spec), request_id=request_id)


def submit_from_request(msg: pb.SubmitTransferRequest) -> tuple[TransferSpec, str]:
    if not msg.HasField("spec"):
        raise InvalidTransferError("a submit needs a spec")
    return spec_from_proto(msg.spec), msg.request_id


def id_request(kind: str, transfer_id: str):
    """A GetTransfer, WatchTransfer or CancelTransfer request (``kind``: get, watch, cancel)."""
    cls = {"get": pb.GetTransferRequest, "watch": pb.WatchTransferRequest, "cancel": pb.CancelTransferRequest}[kind]
    return cls(id=transfer_id)


def id_from_request(msg) -> str:
    if not msg.id:
        raise InvalidTransferError("a transfer id is required")
    return msg.id


def set_rate_request(transfer_id: str, rate_bps: int) -> pb.SetRateRequest:
    return pb.SetRateRequest(id=transfer_id, rate_bps=rate_bps)


def set_rate_from_request(msg: pb.SetRateRequest) -> tuple[str, int]:
    return id_from_request(msg), msg.rate_bps


def list_request(states=None, page_size: int = 0, page_token: str = "") -> pb.ListTransfersRequest:
    return pb.ListTransfersRequest(states=[state_to_proto(s) for s in states or ()], page_size=page_size,
                                   page_token=page_token)


def list_page_from_request(msg: pb.ListTransfersRequest) -> tuple[int, str]:
    """(page_size, page_token) of a ListTransfers request."""
    return msg.page_size, msg.page_token


def list_from_request(msg: pb.ListTransfersRequest) -> frozenset[JobState] | None:
    states = frozenset(s for s in (state_from_proto(v) for v in msg.states) if s is not None)
    return states or None


def transfer_response(kind: str, t: Transfer):
    """A Submit, Get, Cancel or SetRate response (``kind``: submit, get, cancel, set_rate)."""
    cls = {"submit": pb.SubmitTransferResponse, "get": pb.GetTransferResponse, "cancel": pb.CancelTransferResponse,
           "set_rate": pb.SetRateResponse}[kind]
    return cls(transfer=transfer_to_proto(t))


def transfer_from_response(msg) -> Transfer:
    return transfer_from_proto(msg.transfer)


def list_response(transfers: list[Transfer], next_page_token: str = "") -> pb.ListTransfersResponse:
    return pb.ListTransfersResponse(transfers=[transfer_to_proto(t) for t in transfers],
                                    next_page_token=next_page_token)


def list_from_response(msg: pb.ListTransfersResponse) -> list[Transfer]:
    return [transfer_from_proto(m) for m in msg.transfers]


def list_page_from_response(msg: pb.ListTransfersResponse) -> tuple[list[Transfer], str]:
    """(one page of transfers, the next page's token or "" after the last)."""
    return list_from_response(msg), msg.next_page_token


# ------------------------------------------------------------------- errors and plumbing

def error_to_status(exc: JobError) -> grpc.StatusCode:
    if isinstance(exc, UnknownTransferError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, InvalidTransferError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, TransferStateError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, RateRefusedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.INTERNAL


TransferServicerBase = pb_grpc.TransferServiceServicer
"""Base class of the agent's servicer (one method per RPC of TransferService)."""


def add_servicer_to_server(servicer, server) -> None:
    pb_grpc.add_TransferServiceServicer_to_server(servicer, server)


def transfer_stub(channel) -> pb_grpc.TransferServiceStub:
    return pb_grpc.TransferServiceStub(channel)
