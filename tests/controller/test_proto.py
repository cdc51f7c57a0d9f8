"""proto/ and its generated code: regenerating changes nothing; the adapter
(controller_stub/convert.py) round-trips the ledger's types through the wire format."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import re
from pathlib import Path

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent._proto.dxa.agent.v1 import agent_pb2, agent_pb2_grpc
from agent._proto.dxa.controller.v1 import controller_pb2 as pb
from agent._proto.dxa.controller.v1 import controller_pb2_grpc
from controller_stub import convert
from controller_stub.errors import (
    InsufficientCapacityError,
    InvalidRequestError,
    LeaseExpiredError,
    RateAboveCapacityError,
    UnknownAgentError,
)
from controller_stub.ledger import (
    Ledger,
    LedgerConfig,
    Outcome,
    ReservationRequest,
    State,
)

REPO = Path(__file__).resolve().parents[2]
GENERATED = REPO / "agent" / "_proto"


def _generator():
    spec = importlib.util.spec_from_file_location("proto_generate", REPO / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_what_the_protos_generate(tmp_path):
    import grpc_tools

    stamp = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'",
                      (GENERATED / "dxa/controller/v1/controller_pb2_grpc.py").read_text()).group(1)
    installed = importlib.metadata.version("grpcio-tools")
    if installed != stamp:
        pytest.skip(f"agent/_proto was generated with grpcio-tools {stamp}, {installed} is installed "
                    f"(scripts/install.sh pins {stamp}); {grpc_tools.__name__} output carries its version")
    out = tmp_path / "_proto"
    _generator().generate(out)
    fresh = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    committed = {p.relative_to(GENERATED): p.read_bytes() for p in GENERATED.rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts}
    assert sorted(fresh) == sorted(committed), "files added or removed: run python proto/generate.py"
    stale = [str(p) for p in fresh if fresh[p] != committed[p]]
    assert not stale, f"stale generated code {stale}: run python proto/generate.py"


def test_proto_paths_mirror_their_packages():
    for path in (REPO / "proto").rglob("*.proto"):
        rel = path.relative_to(REPO / "proto")
        package = re.search(r"^package ([\w.]+);", path.read_text(), re.MULTILINE).group(1)
        assert package == ".".join(rel.parent.parts), rel
        assert re.fullmatch(r"dxa\.\w+\.v\d+", package)


def test_services_have_the_issue_4_operations():
    agent = agent_pb2.DESCRIPTOR.services_by_name["TransferService"]
    assert set(agent.methods_by_name) == {"SubmitTransfer", "GetTransfer", "ListTransfers", "WatchTransfer",
                                          "CancelTransfer", "SetRate"}
    assert agent.methods_by_name["WatchTransfer"].server_streaming
    controller = pb.DESCRIPTOR.services_by_name["ControllerService"]
    assert {"RegisterAgent", "Heartbeat", "RequestReservation", "ReleaseReservation", "ChangeRate",
            "ListReservations"} <= set(controller.methods_by_name)
    assert hasattr(agent_pb2_grpc, "TransferServiceServicer")
    assert hasattr(controller_pb2_grpc, "ControllerServiceStub")


def _wire(msg):
    return type(msg).FromString(msg.SerializeToString())


times = st.none() | st.integers(0, 2**33).map(lambda n: n / 4)  # quarters: exact in a float and in nanos


@st.composite
def requests(draw):
    rate = draw(st.none() | st.integers(1, 2**63 - 1))
    not_before, finish_by = draw(times), draw(times)
    if not_before is not None and finish_by is not None and finish_by <= not_before:
        finish_by = not_before + 1
    volume = draw(st.none() | st.integers(1, 2**63 - 1))
    if rate is None:
        volume, finish_by = volume or 1, finish_by if finish_by is not None else (not_before or 0) + 1
    return ReservationRequest(
        draw(st.sampled_from(["a1", "gw-2"])), draw(st.sampled_from(["b1", "gw.3"])), rate_bps=rate,
        volume_bytes=volume, not_before=not_before, finish_by=finish_by, priority=draw(st.integers(-5, 5)),
        wait=draw(st.booleans()), path=draw(st.none() | st.tuples(st.text(min_size=1, max_size=5))),
        transfer_id=draw(st.text(max_size=8)))


@settings(max_examples=200, deadline=None)
@given(requests())
def test_request_round_trips_through_the_wire(request):
    assert convert.spec_from_proto(_wire(convert.spec_to_proto(request))) == request


def test_reservations_and_decisions_round_trip_through_the_wire():
    ledger = Ledger(LedgerConfig(lease_timeout=30.0))
    ledger.add_link("A>B", "A", "B", 10_000)
    for reg in (pb.RegisterAgentRequest(name="a1", site="A", addresses=["10.0.0.1:7400"], link_capacity_bps=10_000),
                pb.RegisterAgentRequest(name="b1", site="B", link_capacity_bps=10_000)):
        agent = ledger.register(convert.registration_from_proto(_wire(reg)), now=1_700_000_000.5)
        back = convert.agent_from_proto(_wire(convert.register_response(agent, 30.0)).agent)
        assert back == agent
    assert ledger.agent("a1").addresses == ("10.0.0.1:7400",)
    decisions = [
        ledger.request(ReservationRequest("a1", "b1", rate_bps=6000, finish_by=1_700_000_100.25), 1_700_000_001.0),
        ledger.request(ReservationRequest("a1", "b1", rate_bps=6000), 1_700_000_001.0),  # queued, open-ended
        ledger.request(ReservationRequest("a1", "b1", rate_bps=5000, wait=False), 1_700_000_001.0),  # refused
    ]
    assert [d.outcome for d in decisions] == [Outcome.ADMITTED, Outcome.QUEUED, Outcome.REFUSED]
    for d in decisions:
        wire = _wire(convert.decision_to_proto(d))
        assert convert.decision_from_proto(wire) == d
    assert not _wire(convert.decision_to_proto(decisions[1])).reservation.HasField("end")  # open-ended
    assert decisions[2].earliest_start == 1_700_000_100.25
    for r in ledger.reservations():
        assert convert.reservation_from_proto(_wire(convert.reservation_to_proto(r))) == r


def test_a_servicer_round_trip_through_the_adapter():
    """What the ControllerService servicer will do, minus the server: messages in, ledger, messages out."""
    ledger = Ledger(LedgerConfig(lease_timeout=30.0))
    ledger.add_link("A>B", "A", "B", 10_000)
    for name, site in (("a1", "A"), ("b1", "B")):
        ledger.register(convert.registration_from_proto(
            pb.RegisterAgentRequest(name=name, site=site, link_capacity_bps=10_000)), now=100.0)
    first = ledger.request(convert.spec_from_proto(pb.ReservationSpec(
        source_agent="a1", destination_agent="b1", rate_bps=8000, wait=True)), now=101.0).reservation
    waiter = ledger.request(convert.spec_from_proto(pb.ReservationSpec(
        source_agent="a1", destination_agent="b1", rate_bps=4000, wait=True)), now=101.0).reservation
    msg = _wire(convert.change_rate_response(*ledger.change_rate(first.id, 6000, now=102.0)))
    assert msg.reservation.rate_bps == 6000 and [r.id for r in msg.admitted] == [waiter.id]
    beat = _wire(convert.heartbeat_response(ledger.heartbeat("b1", now=103.0), ledger.reservations(agent="b1")))
    assert convert.timestamp_to_seconds(beat.lease_expires) == 133.0
    assert [(r.id, r.rate_bps) for r in beat.reservations] == [(first.id, 6000), (waiter.id, 4000)]
    rid, outcome, reason = convert.release_from_proto(
        pb.ReleaseReservationRequest(id=first.id, outcome=pb.RESERVATION_STATE_DONE))
    admitted = ledger.release(rid, outcome, now=104.0, reason=reason)
    msg = _wire(convert.release_response(ledger.get(rid), admitted))
    assert msg.reservation.state == pb.RESERVATION_STATE_DONE and list(msg.admitted) == []
    agent, states = convert.list_filter_from_proto(
        pb.ListReservationsRequest(agent="a1", states=[pb.RESERVATION_STATE_RESERVED]))
    assert [r.id for r in ledger.reservations(agent=agent, states=states)] == [waiter.id]
    assert convert.list_filter_from_proto(pb.ListReservationsRequest()) == (None, None)


def test_release_request_and_states():
    rid, outcome, reason = convert.release_from_proto(
        _wire(pb.ReleaseReservationRequest(id="r7", outcome=pb.RESERVATION_STATE_CANCELLED, reason="user")))
    assert (rid, outcome, reason) == ("r7", State.CANCELLED, "user")
    for bad in (pb.RESERVATION_STATE_RESERVED, pb.RESERVATION_STATE_UNSPECIFIED, 99):
        with pytest.raises(InvalidRequestError):
            convert.release_from_proto(pb.ReleaseReservationRequest(id="r7", outcome=bad))
    assert {convert.state_from_proto(convert.state_to_proto(s)) for s in State} == set(State)


@pytest.mark.parametrize("msg", [
    pb.ReservationSpec(source_agent="a1", destination_agent="b1"),  # no rate, no deadline
    pb.ReservationSpec(source_agent="a1", rate_bps=5),  # no destination
    pb.ReservationSpec(source_agent="a1", destination_agent="b1", volume_bytes=10),  # volume without finish_by
])
def test_malformed_specs_are_invalid_requests(msg):
    with pytest.raises(InvalidRequestError):
        convert.spec_from_proto(msg)


def test_malformed_registration():
    with pytest.raises(InvalidRequestError):
        convert.registration_from_proto(pb.RegisterAgentRequest(name="a1", site="A"))  # no capacity
    with pytest.raises(InvalidRequestError):
        convert.registration_from_proto(pb.RegisterAgentRequest(site="A", link_capacity_bps=1))


def test_timestamps_keep_fractions_and_refuse_infinity():
    for t in (0.0, 1.5, 1_700_000_000.999999999, -2.25):
        assert convert.timestamp_to_seconds(convert.seconds_to_timestamp(t)) == pytest.approx(t, abs=1e-9)
    assert convert.seconds_to_timestamp(1.9999999999).nanos < 1_000_000_000
    with pytest.raises(InvalidRequestError):
        convert.seconds_to_timestamp(math.inf)


def test_errors_map_to_grpc_status_codes():
    assert convert.error_to_status(UnknownAgentError("x")) is grpc.StatusCode.NOT_FOUND
    assert convert.error_to_status(LeaseExpiredError("x", 1.0)) is grpc.StatusCode.FAILED_PRECONDITION
    assert convert.error_to_status(RateAboveCapacityError(2, "l", 1)) is grpc.StatusCode.INVALID_ARGUMENT
    assert convert.error_to_status(InsufficientCapacityError("r1", 2, 1)) is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_only_the_adapter_imports_generated_code():
    # The generated package by name (agent._proto, or _proto imported from agent); the
    # adapter's own function names (spec_from_proto...) may be used anywhere.
    generated = re.compile(r"agent\._proto|from\s+agent\s+import\s+_proto|__import__|importlib")
    importers = [p.relative_to(REPO) for p in (REPO / "controller_stub").rglob("*.py")
                 if generated.search(p.read_text()) and p.name != "convert.py"]
    assert importers == []
