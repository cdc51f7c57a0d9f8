"""Bounded history: the scheduler prunes released reservations past a retention, its store
writes only what changed, and ListReservations pages (issue 13, "exposed state").

No wall-clock margins: every time is an injected clock or an explicit ``now``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from agent.service import paging
from agent.store.pki import init_home, issue_cert
from controller_stub.client import ControllerClient, ControllerError
from controller_stub.ledger import Ledger, LedgerConfig, ReservationRequest, State
from controller_stub.server import ControllerServer
from controller_stub.store import LedgerStore
from controller_stub.topology import load_topology

REPO = Path(__file__).resolve().parents[2]
TOPOLOGY = REPO / "controller_stub" / "topology.example.toml"
G = 10**9
DAY = 86400.0


@pytest.mark.parametrize("n,size", [(0, 3), (1, 1), (10, 3), (10, 10), (10, 0), (7, 100)])
def test_pages_cover_every_item_once_in_order(n, size):
    items = list(range(0, 3 * n, 3))  # keys with gaps, as after pruning
    seen, token, answers = [], "", 0
    while True:
        got, token = paging.page(items, lambda x: x, size, token)
        answers += 1
        assert len(got) <= (size or paging.DEFAULT_PAGE_SIZE)
        seen += got
        if not token:
            break
    assert seen == items and answers == max(1, -(-n // (size or paging.DEFAULT_PAGE_SIZE)))


def test_an_item_added_between_pages_comes_later_and_none_repeats():
    items = [1, 2, 3, 4]
    first, token = paging.page(items, lambda x: x, 2, "")
    items = [2, 3, 4, 5]  # 1 pruned, 5 added meanwhile
    rest = []
    while token:
        got, token = paging.page(items, lambda x: x, 2, token)
        rest += got
    assert first == [1, 2] and rest == [3, 4, 5]


@pytest.mark.parametrize("token", ["garbage!", "djIuMw", "djEuLTE", "djEueA", "%%%"])
def test_a_token_the_server_never_gave_is_refused(token):
    with pytest.raises(paging.BadPageTokenError):
        paging.page([1, 2], lambda x: x, 1, token)


def _ledger_with_history(now: float) -> Ledger:
    ledger = Ledger(LedgerConfig(lease_timeout=100 * DAY))  # leases are not this test's subject
    ledger.add_link("ge-am", "geneva", "amsterdam", 10 * G)
    ledger.register_agent("gw1", "geneva", [], 10 * G, now)
    ledger.register_agent("gw2", "amsterdam", [], 10 * G, now)
    return ledger


def test_the_ledger_prunes_only_history_released_before_the_cut():
    ledger = _ledger_with_history(0.0)
    old = ledger.request(ReservationRequest("gw1", "gw2", rate_bps=G), 0.0).reservation
    ledger.release(old.id, State.DONE, 10.0)
    recent = ledger.request(ReservationRequest("gw1", "gw2", rate_bps=G), 20.0).reservation
    ledger.release(recent.id, State.CANCELLED, 5 * DAY)
    held = ledger.request(ReservationRequest("gw1", "gw2", rate_bps=G), 30.0).reservation  # still reserved
    assert ledger.get(old.id).released_at == 10.0
    gone = ledger.prune(before=DAY)
    assert [r.id for r in gone] == [old.id]
    assert {r.id for r in ledger.reservations()} == {recent.id, held.id}
    assert ledger.prune(before=10 * DAY) and [r.id for r in ledger.reservations()] == [held.id]  # held stays
    nxt = ledger.request(ReservationRequest("gw1", "gw2", rate_bps=G), 31.0).reservation
    assert nxt.id not in (old.id, recent.id, held.id)  # ids are never reused


def test_the_store_writes_only_what_changed_and_loads_what_was_pruned_away(tmp_path):
    ledger = _ledger_with_history(0.0)
    ids = []
    for i in range(20):
        r = ledger.request(ReservationRequest("gw1", "gw2", rate_bps=G), float(i)).reservation
        ledger.release(r.id, State.DONE, float(i))
        ids.append(r.id)
    with LedgerStore(tmp_path / "l.db") as store:
        store.save(ledger.snapshot())
        changes = store._db.total_changes
        ledger.prune(before=10.0)  # the first ten go
        live = ledger.request(ReservationRequest("gw1", "gw2", rate_bps=G), 30.0).reservation
        store.save(ledger.snapshot())
        written = store._db.total_changes - changes
    # 10 deleted + 1 inserted reservation rows, and the small tables (2 sites, 1 link, 2 agents, meta):
    # not the 11 reservations that stayed the same
    assert written <= 11 + 2 * (2 + 1 + 2) + 1, written
    with LedgerStore(tmp_path / "l.db") as store:
        snap = store.load()
    assert [r.id for r in snap.reservations] == ids[10:] + [live.id]
    assert snap.reservations == tuple(ledger.reservations())


@pytest.fixture
def pki(tmp_path):
    home = tmp_path / "sched"
    ident, _ = init_home(home, "sched")
    return ident, issue_cert(home, "gw1", tmp_path / "gw1"), issue_cert(home, "gw2", tmp_path / "gw2")


def test_list_reservations_pages_over_grpc_and_a_restart_prunes_old_history(pki, tmp_path):
    ident, gw1, gw2 = pki
    clock = [1_000_000.0]
    state = tmp_path / "ledger.db"

    def server(**kw):
        return ControllerServer(ident, load_topology(TOPOLOGY), state, host="127.0.0.1", port=0,
                                clock=lambda: clock[0], admins=("sched",), **kw)

    async def main():
        s = server()
        await s.start()
        try:
            port = s.port
            for who, site in ((gw1, "geneva"), (gw2, "amsterdam")):
                async with ControllerClient(f"127.0.0.1:{port}", who, timeout=10) as c:
                    await c.register_agent(who.name, site, [], 10 * G)
            async with ControllerClient(f"127.0.0.1:{port}", gw1, timeout=10) as c:
                made = []
                for _ in range(11):
                    d = await c.request_reservation(ReservationRequest("gw1", "gw2", rate_bps=G // 100))
                    made.append(d.reservation.id)
                for rid in made[:6]:
                    await c.release_reservation(rid, State.DONE)
                pages, token = [], ""
                while True:
                    got, token = await c.list_reservations_page(page_size=4, page_token=token)
                    pages.append([r.id for r in got])
                    if not token:
                        break
                everything = [r.id for r in await c.list_reservations()]
                held = [r.id for r in await c.list_reservations(states=[State.RESERVED])]
                with pytest.raises(ControllerError) as bad:
                    await c.list_reservations_page(page_token="not-a-token")
        finally:
            await s.stop()
        clock[0] += 8 * DAY  # a week and a day later, restarted with a week's retention
        s = server(history_retention=7 * DAY)
        await s.start()
        try:
            kept = [r.id for r in s.ledger.reservations()]
        finally:
            await s.stop()
        with LedgerStore(state) as store:
            on_disk = [r.id for r in store.load().reservations]
        return made, pages, everything, held, bad.value, kept, on_disk

    made, pages, everything, held, bad, kept, on_disk = asyncio.run(main())
    assert [len(p) for p in pages] == [4, 4, 3] and sum(pages, []) == made == everything
    assert held == made[6:]
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT and "page token" in bad.details, bad
    assert kept == on_disk == made[6:]  # the released ones went; what holds capacity stays
