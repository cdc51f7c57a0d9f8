"""The scheduler's SQLite store (controller_stub/store.py): a restarted scheduler knows
its agents, links and reservations, and goes on exactly where it stopped."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller_stub.errors import (
    InsufficientCapacityError,
    InvalidTransitionError,
    LedgerStoreError,
)
from controller_stub.ledger import (
    Ledger,
    LedgerConfig,
    Link,
    Outcome,
    ReservationRequest,
    State,
)
from controller_stub.store import LedgerStore
from controller_stub.topology import load_topology

EXAMPLE = Path(__file__).resolve().parents[2] / "controller_stub" / "topology.example.toml"

G = 10**9


def busy_ledger() -> Ledger:
    ledger = Ledger(LedgerConfig(lease_timeout=30.0))
    load_topology(EXAMPLE).apply(ledger, now=0)
    ledger.register_agent("gva1", "geneva", ["10.1.0.1:7400", "[2001:db8::1]:7400"], 100 * G, now=0)
    ledger.register_agent("chi1", "chicago", ["10.3.0.1:7400"], 100 * G, now=0)
    ledger.register_agent("ams1", "amsterdam", [], 20 * G, now=0)
    ledger.register_agent("new1", "elsewhere", [], G, now=0)  # a site only an agent reported
    done = ledger.request(ReservationRequest("gva1", "ams1", rate_bps=5 * G), now=1).reservation
    ledger.start(done.id, now=1)
    ledger.release(done.id, State.DONE, now=2)
    running = ledger.request(ReservationRequest("gva1", "chi1", rate_bps=6 * G, transfer_id="t-1"), now=3).reservation
    ledger.start(running.id, now=3)
    ledger.request(ReservationRequest("gva1", "chi1", volume_bytes=10**9, finish_by=500.5, priority=2), now=3)
    ledger.request(ReservationRequest("ams1", "chi1", rate_bps=G, volume_bytes=10**10, not_before=1000.0,
                                      finish_by=2000.0, path=("ams1>amsterdam", "ta2:amsterdam>chicago",
                                                              "chicago>chi1")), now=4)
    ledger.request(ReservationRequest("gva1", "chi1", rate_bps=4 * G), now=5)  # queued, open-ended
    ledger.request(ReservationRequest("gva1", "chi1", rate_bps=4 * G, priority=1), now=6)  # queued ahead of it
    return ledger


def test_save_and_load_round_trip(tmp_path):
    ledger = busy_ledger()
    snap = ledger.snapshot()
    assert {r.state for r in snap.reservations} == {State.DONE, State.TRANSFERRING, State.RESERVED, State.SUBMITTED}
    with LedgerStore(tmp_path / "controller.sqlite") as store:
        assert store.load() is None
        store.save(snap)
    with LedgerStore(tmp_path / "controller.sqlite") as store:
        assert store.load() == snap
        assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_restarted_scheduler_goes_on_where_it_stopped(tmp_path):
    before = busy_ledger()
    with LedgerStore(tmp_path / "c.sqlite") as store:
        store.save(before.snapshot())
    # The scheduler was away from t=6 to t=100; running transfers went on at their rate.
    with LedgerStore(tmp_path / "c.sqlite") as store:
        after = Ledger.restore(store.load(), now=100.0, config=LedgerConfig(lease_timeout=30.0))
    assert after.reservations() == before.reservations()
    assert [r.id for r in after.waiting()] == [r.id for r in before.waiting()]
    assert after.load("geneva>chicago", 100.0) == before.load("geneva>chicago", 100.0)
    # Agents could not heartbeat while it was away: their leases start again from now.
    assert all(a.lease_expires == 130.0 for a in after.agents())
    # The same operations give the same results on the restored ledger and the original.
    for ledger in (before, after):
        for name in ("gva1", "chi1", "ams1", "new1"):
            ledger.register_agent(name, ledger.agent(name).site, ledger.agent(name).addresses,
                                  ledger.agent(name).capacity_bps, now=100.0)
    running = next(r for r in before.reservations() if r.state is State.TRANSFERRING)
    assert [r.id for r in before.release(running.id, State.DONE, now=101.0)] == \
        [r.id for r in after.release(running.id, State.DONE, now=101.0)]
    d1 = before.request(ReservationRequest("chi1", "gva1", rate_bps=G), now=102.0)
    d2 = after.request(ReservationRequest("chi1", "gva1", rate_bps=G), now=102.0)
    assert d1 == d2 and d2.outcome is Outcome.ADMITTED
    assert d2.reservation.id == f"r{len(before.reservations())}"  # ids are never reused
    assert after.snapshot() == before.snapshot()


def test_a_failed_save_leaves_the_previous_state(tmp_path):
    ledger = busy_ledger()
    with LedgerStore(tmp_path / "c.sqlite") as store:
        store.save(ledger.snapshot())
        good = store.load()
        broken = replace(good, links=(*good.links, Link("huge", "geneva", "chicago", 2**64)))
        with pytest.raises(LedgerStoreError, match="saving the ledger failed"):
            store.save(broken)
        assert store.load() == good


def test_unreadable_or_foreign_databases_are_refused(tmp_path):
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LedgerStoreError):
        LedgerStore(garbage)
    path = tmp_path / "c.sqlite"
    LedgerStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(LedgerStoreError, match="schema version 99"):
        LedgerStore(path)
    (tmp_path / "file").write_text("")
    with pytest.raises(LedgerStoreError):
        LedgerStore(tmp_path / "file" / "c.sqlite")


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["req", "start", "release", "rate"]), st.integers(1, 30),
                          st.integers(0, 3), st.booleans()), max_size=25))
def test_any_ledger_state_round_trips(tmp_path_factory, ops):
    ledger = Ledger()
    ledger.add_link("A>B", "A", "B", 40)
    ledger.register_agent("a", "A", ["x:1"], 50, now=0)
    ledger.register_agent("b", "B", [], 50, now=0)
    now = 0.0
    for op, n, prio, flag in ops:
        now += 0.5
        live = ledger.reservations(states={State.SUBMITTED, State.RESERVED, State.TRANSFERRING})
        if op == "req":
            ledger.request(ReservationRequest("a", "b", rate_bps=n, priority=prio, wait=flag,
                                              finish_by=now + n if flag else None), now)
        elif op == "start" and live:
            r = live[n % len(live)]
            if r.state is State.RESERVED and r.start <= now:
                try:
                    ledger.start(r.id, now)
                except InvalidTransitionError:  # its window ended since: released as FAILED
                    pass
        elif op == "release" and live:
            ledger.release(live[n % len(live)].id, State.CANCELLED, now)
        elif op == "rate" and live and live[n % len(live)].state.holds_capacity:
            try:
                ledger.change_rate(live[n % len(live)].id, n, now)
            except (InsufficientCapacityError, InvalidTransitionError):  # no room; or its window just ended
                pass
    path = tmp_path_factory.mktemp("store") / "c.sqlite"
    with LedgerStore(path) as store:
        store.save(ledger.snapshot())
    with LedgerStore(path) as store:
        assert store.load() == ledger.snapshot()
