"""Agents that use the scheduler: `dxa serve --controller` (issue 4 §3 lifecycle).

In process: the scheduler (controller_stub.server, short injected lease) on its own loop,
two data daemons ``alpha`` and ``beta`` (certificates from one CA) each on its own loop
with a SchedulerLink; alpha also runs the JobManager.  Tests wait on events and on the
ledger's state, never for fixed wall-clock times.

Under load (CI shares two cores with other work) a heartbeat can be seconds late, so the
scheduler of most tests has a lease far longer than any test (``LEASE``): a lost lease is
the subject of the tests that ask for ``SHORT_LEASE`` only.  Bounds on how fast something
happens are set well below what the wrong behaviour would take (polling every 30 s,
data that needs 16 s), never at a few hundred milliseconds.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
from pathlib import Path

import pytest

from agent.config import TransferOptions
from agent.service.scheduling import SchedulerLink
from agent.service.transfers import (
    JobManager,
    JobState,
    Progressed,
    RateChanged,
    StateChanged,
    TransferSpec,
)
from agent.store.pki import init_home, issue_cert
from controller_stub.client import ControllerClient
from controller_stub.ledger import LedgerConfig, State
from controller_stub.server import ControllerServer
from controller_stub.topology import load_topology
from tests.conftest import InProcessServer

REPO = Path(__file__).resolve().parents[2]
TOPOLOGY = REPO / "controller_stub" / "topology.example.toml"
OPTS = TransferOptions.for_test(compress="off")
M = 10**6
LEASE = 60.0
"""No test loses its lease by accident, however loaded the machine."""
SHORT_LEASE = 1.5
"""For the tests whose subject is a lease running out."""


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Scheduled:
    """The scheduler, alpha (site geneva, sends) and beta (site amsterdam, receives)."""

    def __init__(self, tmp: Path, capacity_bps: int, lease: float = LEASE) -> None:
        self.tmp = tmp
        self.lease = lease
        self.sched_ident, _ = init_home(tmp / "sched", "sched")
        self.alpha_ident = issue_cert(tmp / "sched", "alpha", tmp / "alpha-home")
        self.beta_ident = issue_cert(tmp / "sched", "beta", tmp / "beta-home")
        self.sched_thread = LoopThread()
        self.sched = self._new_scheduler(tmp / "ledger.db", 0, lease)
        self.target = f"127.0.0.1:{self.sched.port}"
        self.a = InProcessServer(tmp / "root-a", self.alpha_ident)
        self.b = InProcessServer(tmp / "root-b", self.beta_ident)

        async def start_a():
            link = SchedulerLink(self.target, self.alpha_ident, site="geneva", capacity_bps=capacity_bps,
                                 interval=0.2, timeout=2.0, backoff_max=0.3)
            await link.start()
            await link.wait_registered(10)
            m = JobManager(str(self.a.root), str(tmp / "root-a" / ".dxa" / "transfers.sqlite"), self.alpha_ident,
                           options=OPTS, retry_delay=0.2, progress_interval=0.1, scheduler=link, poll_interval=0.1)
            await m.start()
            return link, m

        async def start_b():
            link = SchedulerLink(self.target, self.beta_ident, site="amsterdam", capacity_bps=10**10, interval=0.2,
                                 timeout=2.0, backoff_max=0.3)
            await link.start()
            await link.wait_registered(10)
            return link

        self.link_a, self.manager = self.on_a(start_a())
        self.link_b = asyncio.run_coroutine_threadsafe(start_b(), self.b.loop).result(20)

    def _new_scheduler(self, state: Path, port: int, lease: float = LEASE) -> ControllerServer:
        server = ControllerServer(self.sched_ident, load_topology(TOPOLOGY), state, host="127.0.0.1", port=port,
                                  config=LedgerConfig(lease_timeout=lease), tick_interval=0.1,
                                  admins=("sched",))  # the operator in operator_change
        self.sched_thread.run(server.start())
        return server

    def on_a(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.a.loop).result(timeout)

    def reservations(self):
        return {r.id: r for r in self.sched_thread.run(self._list())}

    async def _list(self):
        return self.sched.ledger.reservations()

    def wait_for(self, pred, timeout: float = 30.0, what: str = ""):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = pred()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what or pred}")

    def close(self) -> None:
        async def stop_a():
            await self.manager.close()
            await self.link_a.close()
        self.on_a(stop_a())
        asyncio.run_coroutine_threadsafe(self.link_b.close(), self.b.loop).result(10)
        self.sched_thread.run(self.sched.stop())
        self.sched_thread.close()
        self.a.close()
        self.b.close()


@pytest.fixture
def small(tmp_path):
    s = Scheduled(tmp_path, capacity_bps=6 * M)
    yield s
    s.close()


@pytest.fixture
def short_lease(tmp_path):
    s = Scheduled(tmp_path, capacity_bps=6 * M, lease=SHORT_LEASE)
    yield s
    s.close()


def _released(s, rid: str):
    """The reservation once released: a job's task releases it just after announcing its
    final state, so right after a job ends the scheduler may not have heard yet."""
    return s.wait_for(lambda: (x := s.reservations()[rid]).state.released and x, what=f"{rid} released")


def _reservations_of(s, job_id: str):
    """Every reservation the scheduler holds for one job, in order."""
    return [r for r in s.reservations().values() if r.request.transfer_id == job_id]


def test_a_job_is_reserved_paced_released_and_the_waiter_starts_when_it_ends(small):
    s = small
    (s.a.root / "one.bin").write_bytes(os.urandom(1_000_000))  # 2 s at 4M: still running when two queues
    (s.a.root / "two.bin").write_bytes(os.urandom(300_000))

    async def go():
        m = s.manager
        first = m.submit(TransferSpec("one.bin", s.b.url("one.bin"), rate_bps=4 * M))
        events1 = []
        async for ev in m.watch(first.id):
            events1.append((time.monotonic(), ev))
            if isinstance(ev, StateChanged) and ev.new is JobState.TRANSFERRING:
                break
        # 4M of alpha's 6M are held: another 4M does not fit and waits, `submitted`.
        second = m.submit(TransferSpec("two.bin", s.b.url("two.bin"), rate_bps=4 * M))
        for _ in range(1500):
            if m.get(second.id).reservation_id:
                break
            await asyncio.sleep(0.02)
        waiting, first_then = m.get(second.id), m.get(first.id)
        assert not first_then.state.final, "the first job ended before the second one queued: nothing to show"
        async for ev in m.watch(first.id):
            events1.append((time.monotonic(), ev))
        events2 = [(time.monotonic(), ev) async for ev in m.watch(second.id)]
        return m.get(first.id), waiting, m.get(second.id), events1, events2

    t0 = time.monotonic()
    first, waiting, second, events1, events2 = s.on_a(go())
    assert first.state is JobState.DONE and second.state is JobState.DONE, (first, second)
    assert first.reservation_id and second.reservation_id and first.reservation_id != second.reservation_id
    # The job's task releases right after announcing the final state.
    res = s.wait_for(lambda: (x := s.reservations())[second.reservation_id].state.released and x, what="release")
    r1, r2 = res[first.reservation_id], res[second.reservation_id]
    assert (r1.state, r2.state) == (State.DONE, State.DONE)
    assert r1.request.source == "alpha" and r1.request.destination == "beta" and r1.rate_bps == 4 * M
    assert first.rate_bps == 4 * M  # paced at the granted rate
    assert waiting.state is JobState.SUBMITTED and waiting.reservation_id == second.reservation_id
    states1 = [ev.new for _, ev in events1 if isinstance(ev, StateChanged)]
    assert JobState.RESERVED in states1 and states1[-1] is JobState.DONE
    # The waiter is admitted only after the first released, and then runs.
    done1 = next(t for t, ev in events1 if isinstance(ev, StateChanged) and ev.new is JobState.DONE)
    reserved2 = next(t for t, ev in events2 if isinstance(ev, StateChanged) and ev.new is JobState.RESERVED)
    assert reserved2 >= done1
    # 1 MB at 4 Mbit/s is 2 s at the granted rate: not unlimited.
    assert done1 - t0 > 1.0
    assert (s.b.root / "one.bin").read_bytes() == (s.a.root / "one.bin").read_bytes()
    assert (s.b.root / "two.bin").read_bytes() == (s.a.root / "two.bin").read_bytes()


def test_change_rate_is_followed_and_cancel_releases_and_stays_resumable(small):
    s = small
    src = s.a.root / "big.bin"
    src.write_bytes(os.urandom(2 << 20))

    async def operator_change(rid: str, rate: int):
        async with ControllerClient(s.target, s.sched_ident, timeout=5) as c:
            return await c.change_rate(rid, rate)

    async def go():
        m = s.manager
        t = m.submit(TransferSpec("big.bin", s.b.url("big.bin"), rate_bps=4 * M))
        changed_at = None
        rate_events = []
        async for ev in m.watch(t.id):
            if isinstance(ev, Progressed) and ev.bytes_done >= 200_000 and changed_at is None:
                rid = m.get(t.id).reservation_id
                await operator_change(rid, 2 * M)
                changed_at = time.monotonic()
            if isinstance(ev, RateChanged):
                rate_events.append((time.monotonic() - changed_at, ev))
                await m.cancel_and_wait(t.id)
        return m.get(t.id), rate_events

    t, rate_events = s.on_a(go())
    assert t.state is JobState.CANCELLED
    assert [ev.new_rate_bps for _, ev in rate_events] == [2 * M]
    assert rate_events[0][0] < 10.0  # followed while the copy runs (~8 s left at 2M), not after it
    r = _released(s, t.reservation_id)
    assert r.state is State.CANCELLED and r.rate_bps == 2 * M

    # The partial data stays: a new job sends only what is missing.
    async def again():
        t2 = s.manager.submit(TransferSpec("big.bin", s.b.url("big.bin")))
        return await s.manager.wait(t2.id)

    t2 = s.on_a(again())
    assert t2.state is JobState.DONE and t2.bytes_skipped > 0 and t2.reservation_id == ""
    assert (s.b.root / "big.bin").read_bytes() == src.read_bytes()


def test_an_agent_that_stops_heartbeating_loses_its_reservation_and_resumes_on_a_new_one(short_lease):
    s = short_lease
    src = s.a.root / "big.bin"
    src.write_bytes(os.urandom(2 << 20))

    async def go():
        t = s.manager.submit(TransferSpec("big.bin", s.b.url("big.bin"), rate_bps=4 * M))
        async for ev in s.manager.watch(t.id):
            if isinstance(ev, StateChanged) and ev.new is JobState.TRANSFERRING:
                break
        s.link_a.stop_heartbeats()
        return s.manager.get(t.id)

    t = s.on_a(go())
    first = t.reservation_id
    r = s.wait_for(lambda: (x := s.reservations()[first]).state.released and x, what="lease expiry")
    assert r.state is State.FAILED and "lease" in r.reason
    # The agent stops the copy (its data stays) and waits for a new reservation...
    waiting = s.wait_for(lambda: (x := s.manager.get(t.id)).state is JobState.SUBMITTED and x, what="job paused")
    assert "lease expired" in waiting.error

    # ...which it gets once it heart-beats again; the copy resumes and finishes.
    s.on_a(s.link_a.start())
    t = s.on_a(s.manager.wait(t.id))
    assert t.state is JobState.DONE, t
    assert t.reservation_id != first and _released(s, t.reservation_id).state is State.DONE
    assert t.bytes_skipped > 0  # resumed, not started over
    assert src.read_bytes() == (s.b.root / "big.bin").read_bytes()


def test_the_agent_registers_again_with_a_scheduler_that_lost_its_state(small):
    s = small
    assert s.link_a.registrations == 1
    port = s.sched.port
    s.sched_thread.run(s.sched.stop())
    s.sched = s._new_scheduler(s.tmp / "fresh-ledger.db", port)  # a new state: nobody is registered
    s.wait_for(lambda: s.link_a.registrations >= 2 and s.link_b.registrations >= 2, what="re-registration")
    agents = s.sched_thread.run(_agents(s.sched))
    assert {"alpha", "beta"} <= agents


async def _agents(server):
    return {a.name for a in server.ledger.agents()}


def test_a_job_with_a_window_waits_reserved_until_it_opens(small):
    s = small
    (s.a.root / "w.bin").write_bytes(os.urandom(100_000))

    async def go():
        opens = time.time() + 1.0
        t = s.manager.submit(TransferSpec("w.bin", s.b.url("w.bin"), rate_bps=4 * M, window_start=opens,
                                          window_end=opens + 60))
        events = [(time.time(), ev) async for ev in s.manager.watch(t.id)]
        return opens, await s.manager.wait(t.id), events

    opens, t, events = s.on_a(go())
    assert t.state is JobState.DONE, t
    states = [(at, ev.new) for at, ev in events if isinstance(ev, StateChanged)]
    assert [st for _, st in states][-3:] == [JobState.RESERVED, JobState.TRANSFERRING, JobState.DONE]
    transferring = next(at for at, st in states if st is JobState.TRANSFERRING)
    assert transferring >= opens
    r = _released(s, t.reservation_id)
    # Off-peak mode: a window sized for the volume (+2 % +128 KiB) at the rate, placed at the
    # earliest start that fits within [window_start, window_end) — not the whole hour.
    volume = r.request.volume_bytes
    assert volume == 100_000 + 2_000 + (128 << 10) + 4 * M // 8  # +2 %, +128 KiB, +1 s at the rate (start-up)
    # the earliest start: when the window opens, or when the request arrived if that was later
    # (a loaded machine may take more than the second to submit)
    start = max(opens, r.submitted_at)
    assert r.start == pytest.approx(start, abs=0.01) and r.end == pytest.approx(start + volume * 8 / (4 * M), abs=0.01)
    assert r.state is State.DONE


def test_a_window_without_a_scheduler_or_without_a_rate_is_refused(small, tmp_path):
    from agent.service.transfers import InvalidTransferError

    s = small
    (s.a.root / "x.bin").write_bytes(b"x")
    later = time.time() + 60

    async def submit(spec):
        return s.manager.submit(spec)

    with pytest.raises(InvalidTransferError, match="needs a rate"):
        s.on_a(submit(TransferSpec("x.bin", s.b.url("x.bin"), window_start=later)))
    with pytest.raises(InvalidTransferError, match="ends before"):
        s.on_a(submit(TransferSpec("x.bin", s.b.url("x.bin"), rate_bps=M, window_end=time.time() - 1)))

    async def unscheduled():
        m = JobManager(str(s.a.root), str(tmp_path / "other.sqlite"), s.alpha_ident, options=OPTS)
        await m.start()
        try:
            m.submit(TransferSpec("x.bin", s.b.url("x.bin"), rate_bps=M, window_start=later))
        finally:
            await m.close()

    with pytest.raises(InvalidTransferError, match="need the scheduler"):
        s.on_a(unscheduled())


def test_dxa_serve_controller_registers_and_heartbeats(short_lease, tmp_path):
    import subprocess
    import sys

    s = short_lease
    issue_cert(s.tmp / "sched", "gamma", tmp_path / "gamma-home")
    (tmp_path / "root-g").mkdir()
    env = dict(os.environ, DXA_HOME=str(tmp_path / "gamma-home"), PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli.main", "serve", "--listen", "127.0.0.1:0", "--root",
                             str(tmp_path / "root-g"), "--controller", s.target, "--site", "geneva",
                             "--capacity", "1G"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        agent = s.wait_for(lambda: next((a for a in s.sched_thread.run(_agent_list(s.sched))
                                         if a.name == "gamma"), None), timeout=15, what="gamma registered")
        assert agent.site == "geneva" and agent.capacity_bps == 10**9
        # Heartbeats (every third of the 1.5 s lease) renew the lease: it moves on past two
        # more leases and the agent is live. (How late a loaded machine lets a heartbeat be is
        # not this test's subject: it waits for the renewals, not for a fixed time.)
        first = agent.lease_expires

        def renewed():
            a = next(a for a in s.sched_thread.run(_agent_list(s.sched)) if a.name == "gamma")
            return a.lease_expires >= first + 2 * SHORT_LEASE and not a.expired and a
        assert s.wait_for(renewed, timeout=60, what="gamma's lease renewed by heartbeats")
        assert proc.poll() is None  # the daemon is still up
    finally:
        proc.terminate()
        proc.wait(10)


async def _agent_list(server):
    return server.ledger.agents()


def test_windows_cross_the_wire_and_the_cli_reads_times():
    from agent.cli.transfers import _when
    from agent.errors import ConfigError
    from agent.service import convert

    spec = TransferSpec("a", "dxa://h:1/b", 5 * M, 1, False, "", 1000.5, 2000.25)
    assert convert.spec_from_proto(convert.spec_to_proto(spec)) == spec
    spec = TransferSpec("a", "dxa://h:1/b", 0, 1, False, "", 1000.5, None, deadline=3000.75)
    assert convert.spec_to_proto(spec).WhichOneof("pace") == "deadline"
    assert convert.spec_from_proto(convert.spec_to_proto(spec)) == spec
    assert _when(None) is None and _when("12.5") == 12.5
    assert _when("2026-11-25T14:00:00+00:00") == 1795615200.0
    assert time.time() + 9 < _when("+10") < time.time() + 11
    with pytest.raises(ConfigError):
        _when("tomorrow")


def test_a_restarted_daemon_resumes_its_job_on_the_same_reservation(small):
    s = small
    src = s.a.root / "big.bin"
    src.write_bytes(os.urandom(1 << 20))
    db = str(s.tmp / "root-a" / ".dxa" / "transfers.sqlite")

    async def first_half():
        t = s.manager.submit(TransferSpec("big.bin", s.b.url("big.bin"), rate_bps=4 * M))
        async for ev in s.manager.watch(t.id):
            if isinstance(ev, Progressed) and ev.bytes_done >= 100_000:
                break
        rid = s.manager.get(t.id).reservation_id
        await s.manager.close()  # the daemon stops: the job and its reservation stay unfinished
        s.manager = JobManager(str(s.a.root), db, s.alpha_ident, options=OPTS, retry_delay=0.2,
                               progress_interval=0.1, scheduler=s.link_a, poll_interval=0.1)
        await s.manager.start()
        return rid, await s.manager.wait(t.id)

    rid, t = s.on_a(first_half())
    assert t.state is JobState.DONE and t.reservation_id == rid
    assert _released(s, rid).state is State.DONE
    assert src.read_bytes() == (s.b.root / "big.bin").read_bytes()


def test_a_deadline_job_reserves_the_volume_over_the_time_left(small):
    s = small
    src = s.a.root / "d.bin"
    src.write_bytes(os.urandom(1 << 20))

    async def go():
        deadline = time.time() + 5
        t = s.manager.submit(TransferSpec("d.bin", s.b.url("d.bin"), deadline=deadline))
        return deadline, await s.manager.wait(t.id)

    deadline, t = s.on_a(go())
    assert t.state is JobState.DONE, t
    _released(s, t.reservation_id)
    [r] = _reservations_of(s, t.id)  # one reservation for the whole job (the lease outlives it)
    assert r.id == t.reservation_id
    assert r.request.rate_bps is None and r.request.finish_by == pytest.approx(deadline, abs=0.01)
    volume = r.request.volume_bytes
    base = (1 << 20) + (1 << 20) // 50 + (128 << 10)  # the file plus 2 % and 128 KiB of headroom

    def asked(span: float) -> float:  # finish START_UP (1 s, at most a quarter of the span) early
        return base * span / (span - min(1.0, span / 4))
    # The agent asked with at most 5 s left and at least the time left when the ledger got it.
    left = deadline - r.submitted_at
    assert 0 < left <= 5
    assert asked(5) <= volume <= asked(left) + 1
    # The ledger's rate: the volume over the time left when it was admitted.
    assert r.rate_bps == math.ceil(volume * 8 / (deadline - r.start)) and r.start >= r.submitted_at
    assert r.end == pytest.approx(deadline, abs=0.01) and r.state is State.DONE
    assert t.updated <= deadline
    assert src.read_bytes() == (s.b.root / "d.bin").read_bytes()


def test_deadlines_that_cannot_work_are_refused(small, tmp_path):
    from agent.service.transfers import InvalidTransferError

    s = small
    (s.a.root / "x.bin").write_bytes(os.urandom(4 << 20))
    soon = time.time() + 60

    async def submit(spec):
        t = s.manager.submit(spec)
        return await s.manager.wait(t.id)

    with pytest.raises(InvalidTransferError, match="rate or a deadline, not both"):
        s.on_a(submit(TransferSpec("x.bin", s.b.url("x.bin"), rate_bps=M, deadline=soon)))
    with pytest.raises(InvalidTransferError, match="deadline has passed"):
        s.on_a(submit(TransferSpec("x.bin", s.b.url("x.bin"), deadline=time.time() - 1)))
    with pytest.raises(InvalidTransferError, match="not both"):
        s.on_a(submit(TransferSpec("x.bin", s.b.url("x.bin"), deadline=soon, window_end=soon)))
    # 4 MiB (with headroom, asked to finish 1 s early) in 5 s needs 8.7 Mbit/s: more than the
    # 6 Mbit/s path can ever carry.
    # (5 s: still ahead when the submit runs on a loaded machine; 5 MiB in 5 s is 8.4 Mbit/s)
    t = s.on_a(submit(TransferSpec("x.bin", s.b.url("x.bin"), deadline=time.time() + 5)))
    assert t.state is JobState.FAILED and "refused" in t.error, t
    assert not (s.b.root / "x.bin").exists()

    async def unscheduled():
        m = JobManager(str(s.a.root), str(tmp_path / "other.sqlite"), s.alpha_ident, options=OPTS)
        await m.start()
        try:
            m.submit(TransferSpec("x.bin", s.b.url("x.bin"), deadline=soon))
        finally:
            await m.close()

    with pytest.raises(InvalidTransferError, match="needs the scheduler"):
        s.on_a(unscheduled())


def test_a_job_still_running_when_its_window_ends_is_stopped_and_stays_resumable(small, monkeypatch):
    s = small
    src = s.a.root / "slow.bin"
    src.write_bytes(os.urandom(2 << 20))  # 16 s at 1 Mbit/s

    async def go():
        end = time.time() + 60
        t = s.manager.submit(TransferSpec("slow.bin", s.b.url("slow.bin"), rate_bps=M, window_end=end))
        return await s.manager.wait(t.id)

    # A window that cannot hold the volume at the rate is refused up front, with the reason.
    tiny = s.on_a(_submit_and_wait(s, TransferSpec("slow.bin", s.b.url("slow.bin"), rate_bps=M,
                                                   window_end=time.time() + 10)))
    assert tiny.state is JobState.FAILED and "refused" in tiny.error, tiny
    assert "bytes at 1000000 bit/s need 19.2 s" in tiny.error, tiny
    # A window that ends before the data is through (here: the job under-reports its volume,
    # as a transfer slower than its rate would) stops the copy when it ends.
    monkeypatch.setattr(JobManager, "_volume", lambda self, t: 150_000)  # 1.2 s at 1 Mbit/s
    t = s.on_a(go())
    assert t.state is JobState.FAILED and "ended before the transfer finished" in t.error and "resume" in t.error, t
    r = _released(s, t.reservation_id)
    assert r.state is State.FAILED and r.reason == "window ended"
    assert t.updated - r.end < 8  # stopped when the window closed, not at the end of the data (16 s)
    assert not (s.b.root / "slow.bin").exists()  # never visible under its name while partial

    t2 = s.on_a(_submit_and_wait(s, TransferSpec("slow.bin", s.b.url("slow.bin"), rate_bps=6 * M)))
    assert t2.state is JobState.DONE and t2.bytes_skipped > 0, t2
    assert src.read_bytes() == (s.b.root / "slow.bin").read_bytes()


async def _submit_and_wait(s, spec):
    t = s.manager.submit(spec)
    return await s.manager.wait(t.id)


def test_an_operator_rate_change_on_a_scheduled_job_goes_through_the_scheduler(small):
    from agent.service.transfers import RateRefusedError

    s = small
    (s.a.root / "big.bin").write_bytes(os.urandom(2 << 20))

    async def go():
        m = s.manager
        t = m.submit(TransferSpec("big.bin", s.b.url("big.bin"), rate_bps=2 * M))
        async for ev in m.watch(t.id):
            if isinstance(ev, StateChanged) and ev.new is JobState.TRANSFERRING:
                break
        raised = await m.change_rate(t.id, 5 * M)
        refused = None
        try:
            await m.change_rate(t.id, 50 * M)  # the path holds 6 Mbit/s
        except RateRefusedError as exc:
            refused = exc
        after_refusal = m.get(t.id)
        await m.cancel_and_wait(t.id)
        return raised, refused, after_refusal

    raised, refused, after = s.on_a(go())
    assert raised.rate_bps == 5 * M
    assert refused is not None and "50000000 bit/s is above the capacity" in str(refused), refused
    assert after.rate_bps == 5 * M
    r = _released(s, raised.reservation_id)
    assert r.rate_bps == 5 * M and r.state is State.CANCELLED


def test_a_running_job_continues_while_the_scheduler_restarts_and_resyncs_after(small):
    s = small
    src = s.a.root / "r.bin"
    src.write_bytes(os.urandom(2 << 20))  # ~8 s at 2 Mbit/s: still running when the scheduler is back

    async def until_transferring():
        t = s.manager.submit(TransferSpec("r.bin", s.b.url("r.bin"), rate_bps=2 * M))
        async for ev in s.manager.watch(t.id):
            if isinstance(ev, Progressed) and ev.bytes_done > 0:
                return s.manager.get(t.id)

    t = s.on_a(until_transferring())
    rid, port = t.reservation_id, s.sched.port
    s.sched_thread.run(s.sched.stop())  # the scheduler goes away (its state is saved)
    before = s.manager.get(t.id).bytes_done
    during = s.wait_for(lambda: (x := s.manager.get(t.id)).bytes_done > before and x, what="progress")
    assert during.state is JobState.TRANSFERRING and during.rate_bps == 2 * M  # still moving, at the granted rate

    # Back, from its saved state.
    s.sched = s._new_scheduler(s.tmp / "ledger.db", port)
    assert s.reservations()[rid].state is State.TRANSFERRING

    async def raise_rate():
        async with ControllerClient(s.target, s.sched_ident, timeout=5) as c:
            return await c.change_rate(rid, 4 * M)

    s.sched_thread.run(raise_rate())  # the restarted scheduler is followed again
    s.wait_for(lambda: s.manager.get(t.id).rate_bps == 4 * M or s.manager.get(t.id).state.final,
               what="rate followed")
    t = s.on_a(s.manager.wait(t.id))
    assert t.state is JobState.DONE and t.reservation_id == rid, (t, _reservations_of(s, t.id))
    assert _released(s, rid).state is State.DONE  # released into the restarted scheduler
    assert src.read_bytes() == (s.b.root / "r.bin").read_bytes()


def test_a_job_to_an_agent_the_scheduler_does_not_know_fails_with_the_reason(small):
    s = small
    gamma = InProcessServer(s.tmp / "root-g", issue_cert(s.tmp / "sched", "gamma", s.tmp / "gamma-home"))
    try:
        (s.a.root / "u.bin").write_bytes(os.urandom(10_000))

        async def go():
            t = s.manager.submit(TransferSpec("u.bin", gamma.url("u.bin"), rate_bps=M))
            return await s.manager.wait(t.id)

        t = s.on_a(go())
        assert t.state is JobState.FAILED and "NOT_FOUND" in t.error and "gamma" in t.error, t
        assert "refused" in t.error and t.reservation_id == "" and not (gamma.root / "u.bin").exists()
    finally:
        gamma.close()


def test_an_operator_lists_rerates_and_cancels_reservations_with_the_cli(small):
    import json

    from tests.conftest import dxa

    s = small
    # 32 s at 2 Mbit/s: still running when the last CLI call releases it, even when each
    # `dxa` call takes seconds to start (a loaded CI machine)
    (s.a.root / "op.bin").write_bytes(os.urandom(8 << 20))
    ops = s.tmp / "sched"  # the scheduler's own home: an --admin of this scheduler
    gamma = s.tmp / "gamma-home"
    issue_cert(s.tmp / "sched", "gamma", gamma)  # same CA, not a party, not an admin

    async def until_transferring():
        t = s.manager.submit(TransferSpec("op.bin", s.b.url("op.bin"), rate_bps=2 * M))
        async for ev in s.manager.watch(t.id):
            if isinstance(ev, StateChanged) and ev.new is JobState.TRANSFERRING:
                return s.manager.get(t.id)

    t = s.on_a(until_transferring())
    rid = t.reservation_id
    c = ("--controller", s.target)
    r = dxa(ops, "controller", "list", *c, "--json", "--state", "transferring")
    assert r.returncode == 0, r.stderr
    [row] = json.loads(r.stdout)
    assert (row["id"], row["source"], row["destination"], row["rate_bps"]) == (rid, "alpha", "beta", 2 * M)
    r = dxa(ops, "controller", "list", *c, "--agent", "beta")
    assert r.returncode == 0 and rid in r.stdout and "transferring" in r.stdout and "2M" in r.stdout, r.stdout

    r = dxa(ops, "controller", "show", *c, "--json")
    assert r.returncode == 0, r.stderr
    net = json.loads(r.stdout)
    assert {(a["name"], a["site"], a["expired"]) for a in net["agents"]} >= {("alpha", "geneva", False),
                                                                          ("beta", "amsterdam", False)}
    loads = {k["id"]: (k["capacity_bps"], k["reserved_bps"]) for k in net["links"]}
    assert loads["alpha>geneva"] == (6 * M, 2 * M) and loads["amsterdam>beta"][1] == 2 * M
    assert loads["beta>amsterdam"][1] == 0  # the other direction: not on the path
    r = dxa(gamma, "controller", "show", *c)  # read-only: any node of the CA
    assert r.returncode == 0 and "alpha>geneva" in r.stdout and "33%" in r.stdout, r.stdout

    r = dxa(ops, "controller", "rate", rid, "3M", *c)
    assert r.returncode == 0 and "3M" in r.stdout, r.stderr
    s.wait_for(lambda: s.manager.get(t.id).rate_bps == 3 * M, what="agent follows the new rate")
    r = dxa(ops, "controller", "rate", rid, "60M", *c)
    assert r.returncode == 2 and "above the capacity" in r.stderr, r.stderr
    r = dxa(gamma, "controller", "rate", rid, "1M", *c)
    assert r.returncode == 2 and "PERMISSION_DENIED" in r.stderr and "gamma" in r.stderr, r.stderr
    r = dxa(ops, "controller", "list", "--controller", "127.0.0.1:1")
    assert r.returncode == 4

    r = dxa(ops, "controller", "release", rid, *c, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["reservation"]["state"] == "cancelled", r.stderr
    t = s.on_a(s.manager.wait(t.id))
    assert t.state is JobState.CANCELLED and "cancelled at the scheduler" in t.error, t
    assert not (s.b.root / "op.bin").exists()


def test_rate_changes_are_pushed_to_the_agent_not_polled(small):
    s = small
    (s.a.root / "push.bin").write_bytes(os.urandom(4 << 20))  # 16 s at 2M: never done before the change
    s.manager.poll_interval = 60.0  # polling alone would take a minute

    async def operator_change(rid: str, rate: int):
        async with ControllerClient(s.target, s.sched_ident, timeout=5) as c:
            return await c.change_rate(rid, rate)

    async def go():
        t = s.manager.submit(TransferSpec("push.bin", s.b.url("push.bin"), rate_bps=2 * M))
        async for ev in s.manager.watch(t.id):
            if isinstance(ev, StateChanged) and ev.new is JobState.TRANSFERRING:
                break
        pushed_before = s.link_a.pushed
        changed = time.monotonic()
        await operator_change(s.manager.get(t.id).reservation_id, 5 * M)
        followed = None  # stays None if the job ends without following the change
        async for ev in s.manager.watch(t.id):
            if isinstance(ev, RateChanged):
                followed = time.monotonic() - changed
                break
        ended = s.manager.get(t.id)
        if not ended.state.final:
            await s.manager.cancel_and_wait(t.id)
        return followed, s.link_a.pushed - pushed_before, ended

    followed, pushed, job = s.on_a(go())
    assert followed is not None, f"the job ended without a rate change: {job}"
    # well under the minute polling would take, and the change came on the stream
    assert pushed >= 1 and followed < 15.0, (followed, pushed)


def test_a_lowering_that_cannot_finish_inside_a_sized_window_is_refused(small):
    from agent.service.transfers import RateRefusedError

    s = small
    (s.a.root / "win.bin").write_bytes(os.urandom(2 << 20))

    async def go():
        t = s.manager.submit(TransferSpec("win.bin", s.b.url("win.bin"), rate_bps=4 * M,
                                          window_end=time.time() + 60))
        async for ev in s.manager.watch(t.id):
            if isinstance(ev, StateChanged) and ev.new is JobState.TRANSFERRING:
                break
        try:
            await s.manager.change_rate(t.id, M // 4)  # the reservation is sized for ~5.5 s at 4M
        except RateRefusedError as exc:
            refused = exc
        after = s.manager.get(t.id)
        return refused, after, await s.manager.wait(t.id)

    refused, after, done = s.on_a(go())
    assert "left need" in str(refused) and "ends in" in str(refused), refused
    assert after.rate_bps == 4 * M and s.reservations()[after.reservation_id].rate_bps == 4 * M
    assert done.state is JobState.DONE, done


def test_a_queued_window_that_can_no_longer_fit_fails_with_the_reason(small):
    s = small
    (s.a.root / "hog.bin").write_bytes(os.urandom(8 << 20))  # 11 s at 6M: cancelled once late failed
    (s.a.root / "late.bin").write_bytes(os.urandom(200_000))

    async def go():
        hog = s.manager.submit(TransferSpec("hog.bin", s.b.url("hog.bin"), rate_bps=6 * M))  # the whole 6M link
        async for ev in s.manager.watch(hog.id):
            if isinstance(ev, StateChanged) and ev.new is JobState.TRANSFERRING:
                break
        # Fits its window only if it could start at once: it queues behind hog, then cannot fit.
        late = s.manager.submit(TransferSpec("late.bin", s.b.url("late.bin"), rate_bps=2 * M,
                                             window_end=time.time() + 2.5))
        late = await s.manager.wait(late.id)
        await s.manager.cancel_and_wait(hog.id)
        return late

    late = s.on_a(go())
    assert late.state is JobState.FAILED and "could not fit the transfer in its window" in late.error, late
    assert not (s.b.root / "late.bin").exists()


def test_submit_settled_answers_with_the_schedulers_decision(small):
    s = small
    (s.a.root / "big.bin").write_bytes(os.urandom(2 << 20))
    (s.a.root / "small.bin").write_bytes(os.urandom(100_000))

    async def go():
        m = s.manager
        refused = await m.submit_settled(TransferSpec("big.bin", s.b.url("r.bin"), deadline=time.time() + 1))
        hog = await m.submit_settled(TransferSpec("big.bin", s.b.url("hog.bin"), rate_bps=5 * M))
        queued = await m.submit_settled(TransferSpec("small.bin", s.b.url("q.bin"), rate_bps=3 * M))
        await m.cancel_and_wait(hog.id)
        return refused, hog, queued, await m.wait(queued.id)

    refused, hog, queued, done = s.on_a(go())
    assert refused.state is JobState.FAILED and "refused" in refused.error, refused
    assert hog.state in (JobState.RESERVED, JobState.TRANSFERRING) and hog.reservation_id, hog
    assert queued.state is JobState.SUBMITTED and "queued by the scheduler" in queued.error, queued
    assert done.state is JobState.DONE and done.error == "", done  # admitted once hog let go


def test_no_queue_fails_at_once_with_the_earliest_start(small):
    s = small
    (s.a.root / "big.bin").write_bytes(os.urandom(2 << 20))
    (s.a.root / "small.bin").write_bytes(os.urandom(100_000))

    async def go():
        m = s.manager
        hog = await m.submit_settled(TransferSpec("big.bin", s.b.url("hog.bin"), rate_bps=5 * M,
                                                  window_end=time.time() + 60))
        refused = await m.submit_settled(TransferSpec("small.bin", s.b.url("q.bin"), rate_bps=3 * M, no_queue=True))
        await m.cancel_and_wait(hog.id)
        return hog, refused

    hog, refused = s.on_a(go())
    assert refused.state is JobState.FAILED and "refused" in refused.error, refused
    assert "earliest start that would fit" in refused.error, refused  # when hog's sized window ends
    assert not (s.b.root / "q.bin").exists()


def test_while_the_push_stream_is_open_a_running_job_does_not_poll(small):
    s = small
    (s.a.root / "quiet.bin").write_bytes(os.urandom(1 << 20))  # ~2 s at 4 Mbit/s, polling would ask 20 times
    calls = []
    real = s.link_a.client.list_reservations

    async def counting(*a, **kw):
        calls.append(time.monotonic())
        return await real(*a, **kw)

    s.wait_for(lambda: s.link_a.streaming, what="the push stream open")

    async def go():
        assert s.link_a.streaming
        s.link_a.client.list_reservations = counting
        t = s.manager.submit(TransferSpec("quiet.bin", s.b.url("quiet.bin"), rate_bps=4 * M))
        return await s.manager.wait(t.id)

    try:
        t = s.on_a(go())
    finally:
        s.link_a.client.list_reservations = real
    assert t.state is JobState.DONE, t
    assert len(calls) <= 3, calls  # the first look-up of a new reservation at most, not one per 0.1 s
