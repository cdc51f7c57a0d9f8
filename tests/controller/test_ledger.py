"""The reservation ledger (controller_stub/ledger.py): admission, queue order, lifecycle,
leases, elastic rate.  Sans-I/O: time is a number the test passes in."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agent.errors import DxaError
from controller_stub import (
    DeadlineUnreachableError,
    InsufficientCapacityError,
    InvalidPathError,
    InvalidRequestError,
    InvalidTransitionError,
    LeaseExpired,
    LeaseExpiredError,
    Ledger,
    LedgerConfig,
    NoRouteError,
    Outcome,
    RateAboveCapacityError,
    RateChanged,
    ReservationAdmitted,
    ReservationReleased,
    ReservationRequest,
    State,
    UnknownAgentError,
    UnknownLinkError,
    UnknownReservationError,
)

G = 1_000_000_000


def two_sites(backbone: int = 10 * G, access: int = 100 * G, lease: float = 1e6) -> Ledger:
    """Sites A and B joined by a full-duplex backbone; agents a1, a2 at A and b1, b2 at B."""
    ledger = Ledger(LedgerConfig(lease_timeout=lease))
    ledger.add_link("A>B", "A", "B", backbone)
    ledger.add_link("B>A", "B", "A", backbone)
    for name, site in (("a1", "A"), ("a2", "A"), ("b1", "B"), ("b2", "B")):
        ledger.register_agent(name, site, [f"{name}.example:7400"], access, now=0.0)
    return ledger


def req(rate: int | None = None, src: str = "a1", dst: str = "b1", **kw) -> ReservationRequest:
    return ReservationRequest(src, dst, rate_bps=rate, **kw)


def assert_within_capacity(ledger: Ledger, now: float) -> None:
    """Brute force, independent of Ledger.peak: the load at every breakpoint from now on."""
    holding = ledger.reservations(states={State.RESERVED, State.TRANSFERRING})
    instants = {now} | {r.start for r in holding if r.start >= now} | {r.end for r in holding if now <= r.end < math.inf}
    for link in ledger.links():
        for t in instants:
            load = sum(r.rate_bps for r in holding if link.id in r.path and r.start <= t < r.end)
            assert load <= link.capacity_bps, (link, t, load)


# ------------------------------------------------------------------ admission


def test_admitted_while_the_backbone_has_room_then_queued():
    ledger = two_sites()
    first = ledger.request(req(6 * G), now=0)
    second = ledger.request(req(4 * G, src="a2", dst="b2"), now=0)
    third = ledger.request(req(1 * G), now=0)
    assert first.outcome is second.outcome is Outcome.ADMITTED
    assert first.reservation.path == ("a1>A", "A>B", "B>b1")
    assert ledger.load("A>B", 0) == 10 * G
    assert third.outcome is Outcome.QUEUED and third.reservation.state is State.SUBMITTED
    assert ledger.load("A>B", 0) == 10 * G
    # The other direction is a different link: untouched.
    assert ledger.request(req(10 * G, src="b1", dst="a1"), now=0).outcome is Outcome.ADMITTED


def test_refused_with_the_earliest_start_that_would_fit():
    ledger = two_sites()
    ledger.request(req(8 * G, finish_by=100.0), now=0)  # holds 8G until 100
    ledger.request(req(1 * G, src="a2", finish_by=50.0), now=0)  # 1G until 50
    d = ledger.request(req(2 * G, src="a2", dst="b2", wait=False), now=10)
    assert d.outcome is Outcome.REFUSED and d.reservation is None
    assert d.earliest_start == 50.0
    d = ledger.request(req(3 * G, src="a2", dst="b2", wait=False), now=10)
    assert d.earliest_start == 100.0
    # Nothing of a refusal stays behind.
    assert ledger.waiting() == [] and len(ledger.reservations()) == 2


def test_refusal_against_an_open_ended_reservation_has_no_earliest_start():
    ledger = two_sites()
    ledger.request(req(10 * G), now=0)
    d = ledger.request(req(1 * G, src="a2", wait=False), now=0)
    assert d.outcome is Outcome.REFUSED and d.earliest_start is None


def test_half_open_windows_back_to_back_do_not_overlap():
    ledger = two_sites()
    assert ledger.request(req(10 * G, finish_by=10.0), now=0).outcome is Outcome.ADMITTED
    later = ledger.request(req(10 * G, src="a2", not_before=10.0, finish_by=20.0), now=0)
    assert later.outcome is Outcome.ADMITTED
    assert (later.reservation.start, later.reservation.end) == (10.0, 20.0)
    # ...but one window overlapping both by a second does not fit.
    d = ledger.request(req(1 * G, src="a2", not_before=9.0, finish_by=11.0, wait=False), now=0)
    assert d.outcome is Outcome.REFUSED and d.earliest_start == 20.0
    assert_within_capacity(ledger, 0)


def test_overlapping_windows_add_up_only_where_they_overlap():
    ledger = two_sites()
    ledger.request(req(6 * G, not_before=0.0, finish_by=10.0), now=0)
    ledger.request(req(6 * G, src="a2", not_before=10.0, finish_by=20.0), now=0)
    assert ledger.peak("A>B", 0, 20) == 6 * G
    # 4G fits across both; 5G does not fit anywhere in [5, 15).
    assert ledger.request(req(4 * G, src="a2", not_before=5.0, finish_by=15.0), now=0).outcome is Outcome.ADMITTED
    d = ledger.request(req(1 * G, src="a2", not_before=5.0, finish_by=15.0, wait=False), now=0)
    assert d.outcome is Outcome.REFUSED
    assert ledger.load("A>B", 7) == 10 * G and ledger.load("A>B", 15) == 6 * G and ledger.load("A>B", 20) == 0


def test_deadline_mode_reserves_volume_over_the_time_left():
    ledger = two_sites()
    d = ledger.request(req(volume_bytes=10**9, finish_by=100.0), now=20)
    r = d.reservation
    assert d.outcome is Outcome.ADMITTED
    assert r.rate_bps == 100_000_000  # 8e9 bits over 80 s
    assert (r.start, r.end) == (20, 100.0)


def test_deadline_that_no_path_could_meet_is_refused_at_once():
    ledger = two_sites()
    with pytest.raises(RateAboveCapacityError) as exc:
        ledger.request(req(volume_bytes=100 * 10**9, finish_by=10.0), now=0)  # 80 Gbit/s > 10G backbone
    assert exc.value.link == "A>B" and exc.value.capacity_bps == 10 * G
    with pytest.raises(DeadlineUnreachableError):
        ledger.request(req(volume_bytes=10**6, finish_by=5.0), now=5.0)
    with pytest.raises(DeadlineUnreachableError):
        ledger.request(req(G, volume_bytes=10 * 10**9, finish_by=50.0), now=0)  # needs 80 s


def test_off_peak_window_slides_to_the_earliest_slot_that_fits():
    ledger = two_sites()
    ledger.request(req(8 * G, finish_by=3600.0), now=0)  # busy hours
    # 9 GB at 5 Gbit/s takes 14.4 s; allowed any time in [1000, 7200].
    d = ledger.request(req(5 * G, src="a2", volume_bytes=9 * 10**9, not_before=1000.0, finish_by=7200.0), now=0)
    assert d.outcome is Outcome.ADMITTED
    assert d.reservation.start == 3600.0 and d.reservation.end == pytest.approx(3614.4)
    # A slot that would end after finish_by is not taken: it waits (or is refused).
    d = ledger.request(req(5 * G, src="a2", volume_bytes=9 * 10**9, not_before=1000.0, finish_by=3610.0, wait=False),
                       now=0)
    assert d.outcome is Outcome.REFUSED and d.earliest_start == 3600.0


def test_rate_above_path_capacity_is_an_error_not_a_wait():
    ledger = two_sites(backbone=10 * G, access=1 * G)
    with pytest.raises(RateAboveCapacityError) as exc:
        ledger.request(req(2 * G), now=0)
    assert exc.value.link == "a1>A"
    assert isinstance(exc.value, DxaError) and isinstance(exc.value, ValueError)
    assert ledger.reservations() == []


def test_unknown_agents_links_and_reservations():
    ledger = two_sites()
    with pytest.raises(UnknownAgentError) as exc:
        ledger.request(req(G, dst="nobody"), now=0)
    assert exc.value.name == "nobody"
    with pytest.raises(UnknownAgentError):
        ledger.heartbeat("nobody", now=0)
    with pytest.raises(UnknownLinkError) as exc:
        ledger.request(req(G, path=("a1>A", "A>C", "B>b1")), now=0)
    assert exc.value.link == "A>C"
    with pytest.raises(UnknownReservationError):
        ledger.release("r999", State.DONE, now=0)
    with pytest.raises(UnknownReservationError):
        ledger.change_rate("r999", G, now=0)


def test_explicit_path_must_lead_from_source_to_destination():
    ledger = two_sites()
    ledger.add_link("A>B:2", "A", "B", 40 * G)
    ok = ledger.request(req(20 * G, path=("a1>A", "A>B:2", "B>b1")), now=0)
    assert ok.outcome is Outcome.ADMITTED and ledger.load("A>B", 0) == 0
    with pytest.raises(InvalidPathError):
        ledger.request(req(G, path=("a1>A", "B>A", "A>a2")), now=0)  # B>A does not start at A
    with pytest.raises(InvalidPathError):
        ledger.request(req(G, path=("a1>A", "A>B")), now=0)  # ends at B, not b1


def test_no_route_between_disconnected_sites():
    ledger = two_sites()
    ledger.register_agent("c1", "C", [], 10 * G, now=0)
    with pytest.raises(NoRouteError):
        ledger.request(req(G, dst="c1"), now=0)
    # Agents are leaves: no path runs through another agent.
    assert ledger.route("a1", "a2") == ("a1>A", "A>a2")


@pytest.mark.parametrize("kw", [
    {"rate_bps": 0},
    {"rate_bps": -5},
    {},  # neither a rate nor a deadline
    {"volume_bytes": 10},  # volume without finish_by
    {"rate_bps": 5, "not_before": 10.0, "finish_by": 10.0},  # empty window
    {"rate_bps": 5, "finish_by": math.inf},
])
def test_malformed_requests(kw):
    with pytest.raises(InvalidRequestError):
        ReservationRequest("a1", "b1", **kw)
    with pytest.raises(InvalidRequestError):
        ReservationRequest("a1", "a1", rate_bps=1)


# ----------------------------------------------------------- queue and release


def test_release_admits_waiters_at_once_in_priority_then_arrival_order():
    ledger = two_sites()
    running = ledger.request(req(10 * G), now=0).reservation
    low = ledger.request(req(3 * G, src="a2", priority=0), now=1).reservation
    high = ledger.request(req(3 * G, src="a2", priority=5), now=2).reservation
    low2 = ledger.request(req(3 * G, src="a2", priority=0), now=3).reservation
    last = ledger.request(req(3 * G, src="a2", priority=0), now=4).reservation
    assert [r.id for r in ledger.waiting()] == [high.id, low.id, low2.id, last.id]
    ledger.start(running.id, now=5)
    admitted = ledger.release(running.id, State.DONE, now=6)
    assert [r.id for r in admitted] == [high.id, low.id, low2.id]
    assert all(r.state is State.RESERVED and r.start == 6 for r in admitted)
    assert [r.id for r in ledger.waiting()] == [last.id]
    assert ledger.get(running.id).state is State.DONE
    assert ledger.load("A>B", 6) == 9 * G


def test_a_blocked_waiter_holds_back_smaller_ones_behind_it_on_the_same_links():
    ledger = two_sites()
    first = ledger.request(req(6 * G), now=0).reservation
    big = ledger.request(req(8 * G, src="a2"), now=1).reservation  # waits
    small = ledger.request(req(2 * G, src="a2"), now=2)  # would fit, but big is first
    assert small.outcome is Outcome.QUEUED and small.blocked_by_queue and small.earliest_start == 2
    # A waiter on other links is not held back: b1 -> a1 uses B>A.
    assert ledger.request(req(2 * G, src="b1", dst="a1"), now=3).outcome is Outcome.ADMITTED
    admitted = ledger.release(first.id, State.CANCELLED, now=4)
    assert [r.id for r in admitted] == [big.id, small.reservation.id]


def test_withdrawing_a_waiter_and_release_rules():
    ledger = two_sites()
    ledger.request(req(10 * G), now=0)
    waiter = ledger.request(req(G, src="a2"), now=0).reservation
    with pytest.raises(InvalidTransitionError):
        ledger.release(waiter.id, State.DONE, now=1)  # a waiter cannot be done
    assert ledger.release(waiter.id, State.CANCELLED, now=1) == []
    assert ledger.waiting() == []
    with pytest.raises(InvalidTransitionError):
        ledger.release(waiter.id, State.CANCELLED, now=2)  # released is final
    with pytest.raises(InvalidRequestError):
        ledger.release(waiter.id, State.RESERVED, now=2)


def test_lifecycle_submitted_reserved_transferring_released():
    ledger = two_sites()
    r = ledger.request(req(G, not_before=10.0), now=0).reservation
    assert r.state is State.RESERVED and r.start == 10.0
    with pytest.raises(InvalidTransitionError):
        ledger.start(r.id, now=5)  # the window is not open yet
    assert ledger.start(r.id, now=10).state is State.TRANSFERRING
    with pytest.raises(InvalidTransitionError):
        ledger.start(r.id, now=11)
    ledger.release(r.id, State.FAILED, now=12, reason="disk full")
    assert ledger.get(r.id).state is State.FAILED and ledger.get(r.id).reason == "disk full"
    kinds = [type(e).__name__ for e in ledger.drain_events() if getattr(e, "reservation", None) is not None
             and e.reservation.id == r.id]
    assert kinds == ["ReservationAdmitted", "ReservationStarted", "ReservationReleased"]


def test_a_window_that_closes_releases_its_capacity():
    ledger = two_sites(lease=10.0)
    r = ledger.request(req(10 * G, finish_by=30.0), now=0).reservation
    waiter = ledger.request(req(10 * G, src="a2"), now=1).reservation
    assert ledger.next_timer() == 10.0  # the first lease to run out (lease_timeout 10)
    for t in (5.0, 14.0, 23.0):
        for name in ("a1", "a2", "b1", "b2"):
            ledger.heartbeat(name, now=t)
    ledger.tick(29.9)
    assert ledger.get(r.id).state is State.RESERVED
    ledger.tick(30.0)
    assert ledger.get(r.id).state is State.FAILED and ledger.get(r.id).reason == "window ended"
    assert ledger.get(waiter.id).state is State.RESERVED


def test_a_deadline_waiter_fails_as_soon_as_its_path_could_no_longer_carry_the_rate():
    ledger = two_sites()
    ledger.request(req(10 * G), now=0)
    # 10 GB by t=100 needs 0.8 Gbit/s now; over the 10G backbone it is hopeless after t=92.
    w = ledger.request(req(volume_bytes=10 * 10**9, finish_by=100.0, src="a2"), now=0).reservation
    assert ledger.next_timer() == 92.0
    ledger.tick(92.0)
    assert ledger.get(w.id).state is State.SUBMITTED
    ledger.tick(92.5)
    assert ledger.get(w.id).state is State.FAILED and ledger.get(w.id).reason == "deadline unreachable"


def test_a_closed_window_cannot_start():
    ledger = two_sites()
    r = ledger.request(req(G, finish_by=10.0), now=0).reservation
    with pytest.raises(InvalidTransitionError):
        ledger.start(r.id, now=10.0)
    assert ledger.get(r.id).state is State.FAILED and ledger.get(r.id).reason == "window ended"


def test_a_waiter_whose_deadline_passes_fails():
    ledger = two_sites()
    ledger.request(req(10 * G), now=0)
    w = ledger.request(req(volume_bytes=10**9, finish_by=8.0, src="a2"), now=0).reservation
    ledger.tick(8.0)
    assert ledger.get(w.id).state is State.FAILED and ledger.get(w.id).reason == "deadline unreachable"


# ------------------------------------------------------------------- leases


def test_an_agent_that_stops_heartbeating_loses_its_reservations():
    ledger = two_sites(lease=10.0)
    mine = ledger.request(req(10 * G), now=0).reservation  # a1 -> b1
    waiter = ledger.request(req(5 * G, src="a2", dst="b2"), now=1).reservation
    for t in (4.0, 8.0):
        for name in ("a2", "b1", "b2"):
            ledger.heartbeat(name, now=t)
    ledger.drain_events()
    ledger.tick(10.0)  # a1 last heart-beat at 0: its 10 s lease ran out
    assert ledger.get(mine.id).state is State.FAILED and ledger.get(mine.id).reason == "lease expired"
    assert ledger.get(waiter.id).state is State.RESERVED  # the freed rate went to the waiter
    events = ledger.drain_events()
    assert [e.agent.name for e in events if isinstance(e, LeaseExpired)] == ["a1"]
    with pytest.raises(LeaseExpiredError) as exc:
        ledger.heartbeat("a1", now=11)
    assert exc.value.expired_at == 10.0
    with pytest.raises(LeaseExpiredError):
        ledger.request(req(G), now=11)
    ledger.register_agent("a1", "A", [], 100 * G, now=12)  # a new registration revives it
    assert ledger.request(req(G), now=12).outcome is Outcome.ADMITTED


def test_heartbeat_renews_the_lease_and_time_comes_only_from_the_caller():
    ledger = two_sites(lease=10.0)
    r = ledger.request(req(G), now=0).reservation
    for t in range(1, 100):
        for name in ("a1", "b1", "a2", "b2"):
            ledger.heartbeat(name, now=float(t))
    ledger.tick(100.0)
    assert ledger.get(r.id).state is State.RESERVED
    assert ledger.agent("a1").lease_expires == 109.0


def test_a_late_heartbeat_is_refused_even_before_anyone_ticked():
    ledger = two_sites(lease=10.0)
    r = ledger.request(req(G), now=0).reservation
    with pytest.raises(LeaseExpiredError):
        ledger.heartbeat("a1", now=10.0)
    assert ledger.get(r.id).state is State.FAILED


# -------------------------------------------------------------- elastic rate


def test_raise_a_running_transfer_only_if_every_link_has_room():
    ledger = two_sites()
    r = ledger.request(req(100_000_000), now=0).reservation  # 100 Mbit/s
    ledger.start(r.id, now=0)
    other = ledger.request(req(4 * G, src="a2", dst="b2"), now=0).reservation
    r2, admitted = ledger.change_rate(r.id, 6 * G, now=1)
    assert r2.rate_bps == 6 * G and r2.state is State.TRANSFERRING and admitted == []
    with pytest.raises(InsufficientCapacityError) as exc:
        ledger.change_rate(r.id, 7 * G, now=2)
    assert exc.value.available_bps == 6 * G
    assert ledger.get(r.id).rate_bps == 6 * G
    with pytest.raises(RateAboveCapacityError):
        ledger.change_rate(r.id, 11 * G, now=2)
    events = [e for e in ledger.drain_events() if isinstance(e, RateChanged)]
    assert [(e.old_rate_bps, e.reservation.rate_bps) for e in events] == [(100_000_000, 6 * G)]
    assert ledger.get(other.id).rate_bps == 4 * G


def test_lowering_a_rate_hands_the_difference_to_waiters():
    ledger = two_sites()
    r = ledger.request(req(10 * G), now=0).reservation
    w = ledger.request(req(3 * G, src="a2"), now=0).reservation
    _, admitted = ledger.change_rate(r.id, 7 * G, now=1)
    assert [a.id for a in admitted] == [w.id]
    with pytest.raises(InvalidTransitionError):
        ledger.release(r.id, State.DONE, now=2) or ledger.change_rate(r.id, G, now=3)


def test_a_raise_counts_future_reservations_in_the_rest_of_the_window():
    ledger = two_sites()
    r = ledger.request(req(2 * G), now=0).reservation
    ledger.request(req(7 * G, src="a2", not_before=100.0, finish_by=200.0), now=0)
    with pytest.raises(InsufficientCapacityError) as exc:
        ledger.change_rate(r.id, 5 * G, now=1)  # room now, not at 100
    assert exc.value.available_bps == 3 * G


def test_lowering_a_link_capacity_preempts_lowest_priority_newest_first():
    ledger = two_sites()
    keep = ledger.request(req(4 * G, priority=1), now=0).reservation
    old = ledger.request(req(3 * G, src="a2"), now=0).reservation
    new = ledger.request(req(3 * G, src="a2"), now=0).reservation
    ledger.add_link("A>B", "A", "B", 7 * G, now=1)
    assert ledger.get(new.id).state is State.FAILED and ledger.get(new.id).reason.startswith("preempted")
    assert ledger.get(old.id).state is ledger.get(keep.id).state is State.RESERVED
    assert_within_capacity(ledger, 1)


# ---------------------------------------------------------------- properties


class LedgerMachine(RuleBasedStateMachine):
    """Random requests, starts, releases, rate changes, heartbeats and time passing
    against a small topology; after every step no link is over capacity at any instant."""

    AGENTS = ("a1", "a2", "b1", "b2", "c1")

    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger(LedgerConfig(lease_timeout=50.0))
        for src, dst, cap in (("A", "B", 10), ("B", "A", 10), ("B", "C", 6), ("C", "B", 8), ("A", "C", 3)):
            self.ledger.add_link(f"{src}>{dst}", src, dst, cap)
        for name in self.AGENTS:
            self.ledger.register_agent(name, name[0].upper(), [], 7, now=0.0)
        self.now = 0.0

    def _ids(self, *states: State) -> list[str]:
        return [r.id for r in self.ledger.reservations(states=set(states))]

    @rule(src=st.sampled_from(AGENTS), dst=st.sampled_from(AGENTS), rate=st.integers(1, 8),
          volume=st.none() | st.integers(1, 40), not_before=st.none() | st.floats(0, 60),
          span=st.none() | st.floats(1, 60), priority=st.integers(0, 2), wait=st.booleans())
    def request(self, src, dst, rate, volume, not_before, span, priority, wait):
        finish_by = None if span is None else (not_before if not_before is not None else self.now) + span
        deadline_mode = volume is not None and finish_by is not None and rate % 2 == 0
        try:
            r = ReservationRequest(src, dst, rate_bps=None if deadline_mode else rate, volume_bytes=volume,
                                   not_before=not_before, finish_by=finish_by, priority=priority, wait=wait)
            d = self.ledger.request(r, self.now)
        except (InvalidRequestError, RateAboveCapacityError, LeaseExpiredError, NoRouteError):
            return
        if d.outcome is Outcome.REFUSED:
            assert d.reservation is None
            if d.earliest_start is not None:
                assert d.earliest_start >= self.now

    @precondition(lambda self: self._ids(State.RESERVED))
    @rule(data=st.data())
    def start(self, data):
        rid = data.draw(st.sampled_from(self._ids(State.RESERVED)))
        r = self.ledger.get(rid)
        if r.start <= self.now:
            assert self.ledger.start(rid, self.now).state is State.TRANSFERRING

    @precondition(lambda self: self._ids(State.SUBMITTED, State.RESERVED, State.TRANSFERRING))
    @rule(data=st.data(), outcome=st.sampled_from([State.DONE, State.FAILED, State.CANCELLED]))
    def release(self, data, outcome):
        rid = data.draw(st.sampled_from(self._ids(State.SUBMITTED, State.RESERVED, State.TRANSFERRING)))
        r = self.ledger.get(rid)
        if r.state is State.SUBMITTED and outcome is State.DONE:
            outcome = State.CANCELLED
        queue_before = [w.id for w in self.ledger.waiting() if w.id != rid]
        admitted = self.ledger.release(rid, outcome, self.now)
        ids = [a.id for a in admitted]
        # Admitted in queue order, and never past an earlier waiter that still waits on a shared link.
        assert ids == [i for i in queue_before if i in ids]
        still = {w.id for w in self.ledger.waiting()}
        for i in ids:
            earlier = queue_before[: queue_before.index(i)]
            for e in earlier:
                if e in still:
                    assert set(self.ledger.get(e).path).isdisjoint(self.ledger.get(i).path)

    @precondition(lambda self: self._ids(State.RESERVED, State.TRANSFERRING))
    @rule(data=st.data(), rate=st.integers(1, 9))
    def change_rate(self, data, rate):
        rid = data.draw(st.sampled_from(self._ids(State.RESERVED, State.TRANSFERRING)))
        try:
            self.ledger.change_rate(rid, rate, self.now)
        except (InsufficientCapacityError, RateAboveCapacityError, InvalidTransitionError):
            pass  # InvalidTransition: the tick inside change_rate may have ended it

    @rule(dt=st.floats(0.0, 30.0), beat=st.sets(st.sampled_from(AGENTS)))
    def time_passes(self, dt, beat):
        self.now += dt
        for name in beat:
            try:
                self.ledger.heartbeat(name, self.now)
            except LeaseExpiredError:
                self.ledger.register_agent(name, name[0].upper(), [], 7, self.now)
        self.ledger.tick(self.now)

    @rule(link=st.sampled_from(["A>B", "B>C"]), cap=st.integers(2, 12))
    def capacity_changes(self, link, cap):
        old = self.ledger.link(link)
        self.ledger.add_link(link, old.src, old.dst, cap, now=self.now)

    @invariant()
    def no_link_over_capacity(self):
        assert_within_capacity(self.ledger, self.now)

    @invariant()
    def states_are_consistent(self):
        waiting = self.ledger.waiting()
        assert all(r.state is State.SUBMITTED for r in waiting)
        assert [r.queue_key for r in waiting] == sorted(r.queue_key for r in waiting)
        assert len(waiting) == len(self.ledger.reservations(states={State.SUBMITTED}))
        for r in self.ledger.reservations(states={State.RESERVED, State.TRANSFERRING}):
            assert r.end > self.now  # a closed window is released by the tick that passes it
        for e in self.ledger.drain_events():
            if isinstance(e, ReservationReleased):
                assert e.reservation.state.released
            if isinstance(e, ReservationAdmitted):
                assert e.reservation.state is State.RESERVED


LedgerMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                                           suppress_health_check=[HealthCheck.too_slow])
test_ledger_properties = LedgerMachine.TestCase
