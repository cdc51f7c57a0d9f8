"""The agent daemon's TransferService: jobs on agent A push to agent B, driven through gRPC.

Two in-process daemons (A and B, each a Server on its own loop); A also runs a JobManager
and the gRPC TransferServer on its loop, as ``dxa serve --grpc`` does.  The client runs in
the test's own loop.  Paced jobs make "in the middle of a transfer" reachable without
timing assumptions: the tests wait for progress events, never for wall-clock time.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time

import grpc
import pytest

from agent.config import TransferOptions
from agent.service.client import Client, TransferServiceError
from agent.service.grpc_server import TransferServer
from agent.service.transfers import (
    JobManager,
    JobState,
    Progressed,
    RateChanged,
    StateChanged,
    TransferSpec,
)
from tests.conftest import InProcessServer, make_tree, same_tree

OPTS = TransferOptions.for_test(compress="off")
SLOW = 4_000_000  # 500 kB/s: a 2 MiB file takes 4 s, so a test can act while it moves


class Agents:
    def __init__(self, tmp_path, identity) -> None:
        self.tmp, self.identity = tmp_path, identity
        self.a = InProcessServer(tmp_path / "root-a", identity)
        self.b = InProcessServer(tmp_path / "root-b", identity)
        self.db = str(tmp_path / "root-a" / ".dxa" / "transfers.sqlite")
        self.manager: JobManager | None = None
        self.grpc: TransferServer | None = None
        self.start_manager()

    def on_a(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.a.loop).result(timeout)

    def start_manager(self, port: int = 0) -> None:
        async def start():
            m = JobManager(str(self.a.root), self.db, self.identity, options=OPTS, retry_delay=0.2)
            await m.start()
            g = TransferServer(m, self.identity, port=port)
            await g.start()
            return m, g
        self.manager, self.grpc = self.on_a(start())

    def stop_manager(self) -> None:
        async def stop():
            await self.grpc.stop()
            await self.manager.close()
        self.on_a(stop())

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc.port}"

    def dest(self, path: str) -> str:
        return self.b.url(path)

    def close(self) -> None:
        self.stop_manager()
        self.a.close()
        self.b.close()


@pytest.fixture
def agents(tmp_path, identity):
    ag = Agents(tmp_path, identity)
    yield ag
    ag.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_third_party_push_through_grpc_arrives_identical(agents, identity):
    make_tree(agents.a.root / "data", files=12, big=300_000)

    async def go():
        async with Client(agents.target, identity) as c:
            t = await c.submit("data", agents.dest("incoming/data"), recursive=True)
            assert t.id and t.state in (JobState.SUBMITTED, JobState.TRANSFERRING)
            events = [ev async for ev in c.watch(t.id)]
            return t, events, await c.get(t.id), await c.list(), await c.list([JobState.FAILED])

    t, events, final, everything, failed = run(go())
    assert isinstance(events[0], StateChanged) and isinstance(events[-1], StateChanged)
    assert events[-1].new is JobState.DONE, events[-1]
    assert final.state is JobState.DONE and final.bytes_done == final.bytes_total > 300_000
    assert final.files_done == final.files_total >= 13  # files and directories
    assert [x.id for x in everything] == [t.id] and failed == []
    assert same_tree(agents.a.root / "data", agents.b.root / "incoming" / "data")


def test_set_rate_then_cancel_then_resubmit_resumes(agents, identity):
    src = agents.a.root / "big.bin"
    src.write_bytes(os.urandom(2 << 20))

    async def go():
        async with Client(agents.target, identity) as c:
            t = await c.submit("big.bin", agents.dest("big.bin"), rate=SLOW)
            seen, cancelled = [], False
            async for ev in c.watch(t.id):
                seen.append(ev)
                if isinstance(ev, Progressed) and ev.bytes_done >= 400_000 and not cancelled:
                    changed = await c.set_rate(t.id, SLOW // 2)
                    assert changed.rate_bps == SLOW // 2
                    await c.cancel(t.id)
                    cancelled = True
            first = await c.get(t.id)
            again = await c.submit("big.bin", agents.dest("big.bin"))  # unpaced: finishes at once
            return seen, first, await c.wait(again.id)

    seen, first, second = run(go())
    assert any(isinstance(ev, RateChanged) and ev.new_rate_bps == SLOW // 2 for ev in seen)
    assert seen[-1].new is JobState.CANCELLED and first.state is JobState.CANCELLED
    assert first.bytes_done < first.bytes_total or first.bytes_total == 0
    assert second.state is JobState.DONE, second.error
    assert second.bytes_skipped > 0, "the re-submitted job should resume the cancelled one"
    assert (agents.b.root / "big.bin").read_bytes() == src.read_bytes()


def test_restarted_manager_resumes_unfinished_job(agents, identity):
    src = agents.a.root / "big.bin"
    src.write_bytes(os.urandom(2 << 20))

    async def submit_and_wait_for_progress():
        t = agents.manager.submit(TransferSpec(
            "big.bin", agents.dest("big.bin"), rate_bps=SLOW))
        async for ev in agents.manager.watch(t.id):
            if isinstance(ev, Progressed) and ev.bytes_done >= 600_000:
                break
        return t.id

    tid = agents.on_a(submit_and_wait_for_progress())
    agents.stop_manager()  # the daemon stops: the job is left unfinished in SQLite
    with sqlite3.connect(agents.db) as db:
        assert db.execute("SELECT state FROM transfers").fetchall() == [("transferring",)]

    agents.start_manager()  # same database: the job is picked up again

    async def finish():
        async with Client(agents.target, identity) as c:
            await c.set_rate(tid, 0)  # unlimited from here on
            return await c.wait(tid)

    done = run(finish())
    assert done.state is JobState.DONE, done.error
    assert done.bytes_skipped > 0
    assert (agents.b.root / "big.bin").read_bytes() == src.read_bytes()


def test_refusals_have_grpc_status_codes(agents, identity):
    (agents.a.root / "f.bin").write_bytes(b"x" * 1000)
    (agents.a.root / "link").symlink_to("f.bin")

    async def go():
        codes = {}
        async with Client(agents.target, identity) as c:
            for name, call in [("unknown", c.get("t999")), ("escape", c.submit("../etc", agents.dest("x"))),
                               ("missing", c.submit("nope", agents.dest("x"))),
                               ("state", c.submit(".dxa/transfers.sqlite", agents.dest("x"))),
                               ("not a url", c.submit("f.bin", "/tmp/x")),
                               ("other source", c.submit("f.bin", agents.dest("x"), source_agent="elsewhere"))]:
                with pytest.raises(TransferServiceError) as ei:
                    await call
                codes[name] = ei.value.code
            done = await c.wait((await c.submit("f.bin", agents.dest("f.bin"))).id)
            with pytest.raises(TransferServiceError) as ei:
                await c.cancel(done.id)
            codes["cancel done"] = ei.value.code
            with pytest.raises(TransferServiceError) as ei:
                async for _ in c.watch("t999"):
                    pass
            codes["watch unknown"] = ei.value.code
            again = await c.submit("f.bin", agents.dest("f2.bin"), request_id="req-1")
            same = await c.submit("f.bin", agents.dest("f2.bin"), request_id="req-1")
            await c.wait(same.id)
            return codes, done, again, same

    codes, done, again, same = run(go())
    assert codes == {"unknown": grpc.StatusCode.NOT_FOUND, "escape": grpc.StatusCode.INVALID_ARGUMENT,
                     "missing": grpc.StatusCode.INVALID_ARGUMENT,
                     "state": grpc.StatusCode.INVALID_ARGUMENT, "not a url": grpc.StatusCode.INVALID_ARGUMENT,
                     "other source": grpc.StatusCode.INVALID_ARGUMENT,
                     "cancel done": grpc.StatusCode.FAILED_PRECONDITION,
                     "watch unknown": grpc.StatusCode.NOT_FOUND}
    assert done.state is JobState.DONE and again.id == same.id


def test_client_from_a_foreign_ca_is_refused(agents, tmp_path):
    from agent.store.pki import init_home, load_identity

    init_home(tmp_path / "intruder", "intruder")
    (agents.a.root / "f.bin").write_bytes(b"x" * 1000)

    async def go():
        async with Client(agents.target, load_identity(tmp_path / "intruder"), timeout=5) as c:
            await c.submit("f.bin", agents.dest("stolen.bin"))

    with pytest.raises(TransferServiceError) as ei:
        run(go())
    assert ei.value.code is grpc.StatusCode.UNAVAILABLE
    assert agents.manager.list() == [] and not (agents.b.root / "stolen.bin").exists()


def test_client_with_an_expired_certificate_is_refused(agents, home, tmp_path):
    from tests.conftest import expired_identity

    late = expired_identity(home, tmp_path / "late")  # signed by the agents' own CA, but expired
    (agents.a.root / "f.bin").write_bytes(b"x" * 1000)

    async def go():
        async with Client(agents.target, late, timeout=5) as c:
            await c.submit("f.bin", agents.dest("late.bin"))

    with pytest.raises(TransferServiceError) as ei:
        run(go())
    assert ei.value.code is grpc.StatusCode.UNAVAILABLE
    assert agents.manager.list() == [] and not (agents.b.root / "late.bin").exists()


def test_only_the_listed_clients_may_use_an_agent(agents, home, tmp_path):
    from agent.store.pki import issue_cert

    ops = issue_cert(home, "ops", tmp_path / "ops")
    stranger = issue_cert(home, "stranger", tmp_path / "stranger")  # same CA, not listed
    (agents.a.root / "f.bin").write_bytes(os.urandom(10_000))

    async def start():
        g = TransferServer(agents.manager, agents.identity, clients=("ops",))
        await g.start()
        return g

    limited = agents.on_a(start())
    target = f"127.0.0.1:{limited.port}"

    async def go():
        async with Client(target, stranger, timeout=5) as c:
            for call in (c.submit("f.bin", agents.dest("x.bin")), c.list(), c.get("t1"), c.cancel("t1")):
                with pytest.raises(TransferServiceError) as ei:
                    await call
                assert ei.value.code is grpc.StatusCode.PERMISSION_DENIED and "stranger" in ei.value.details
            with pytest.raises(TransferServiceError) as ei:
                async for _ in c.watch("t1"):
                    pass
            assert ei.value.code is grpc.StatusCode.PERMISSION_DENIED
        async with Client(target, ops, timeout=5) as c:  # listed
            t = await c.wait((await c.submit("f.bin", agents.dest("ops.bin"))).id)
        async with Client(target, agents.identity, timeout=5) as c:  # the agent itself
            mine = await c.list()
        return t, mine

    try:
        t, mine = run(go())
    finally:
        agents.on_a(limited.stop())
    assert t.state is JobState.DONE and [x.id for x in mine] == [t.id]
    assert not (agents.b.root / "x.bin").exists()


def test_cli_serve_grpc_submit_status_rate_cancel(tmp_path, home, daemon_factory):
    """dxa serve --grpc on agent A, dxa submit/status/rate/cancel against it, pushing to agent B."""
    import json
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO, dxa

    b = daemon_factory(tmp_path / "root-b")
    root_a = tmp_path / "root-a"
    root_a.mkdir()
    (root_a / "f.bin").write_bytes(os.urandom(200_000))
    port_file, grpc_file = tmp_path / "a.port", tmp_path / "a.grpc"
    env = dict(os.environ, DXA_HOME=str(home), PYTHONPATH=str(REPO))
    with open(tmp_path / "a.log", "wb") as log:
        a = subprocess.Popen([sys.executable, "-m", "agent.cli.main", "serve", "--listen", "127.0.0.1:0", "--root",
                              str(root_a), "--port-file", str(port_file), "--grpc", "127.0.0.1:0",
                              "--grpc-port-file", str(grpc_file)], env=env, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 20
            while not grpc_file.exists():
                assert a.poll() is None and time.monotonic() < deadline, (tmp_path / "a.log").read_text()
                time.sleep(0.05)
            agent_addr = f"127.0.0.1:{grpc_file.read_text()}"

            r = dxa(home, "submit", "f.bin", b.url("in/f.bin"), "--agent", agent_addr, "--wait", "--json",
                    "--rate", "800M")
            assert r.returncode == 0, r.stderr
            job = json.loads(r.stdout)
            assert job["state"] == "done" and job["bytes_done"] == 200_000 and job["rate_bps"] == 800_000_000
            assert (b.root / "in" / "f.bin").read_bytes() == (root_a / "f.bin").read_bytes()

            r = dxa(home, "status", "--agent", agent_addr, "--json")
            assert r.returncode == 0 and [t["id"] for t in json.loads(r.stdout)] == [job["id"]]
            r = dxa(home, "status", "--agent", agent_addr)  # a table with a header
            assert r.returncode == 0 and r.stdout.startswith("ID ") and job["id"] in r.stdout, r.stdout
            r = dxa(home, "status", "--agent", agent_addr, "--state", "failed", "--json")
            assert r.returncode == 0 and json.loads(r.stdout) == [], r.stdout
            r = dxa(home, "status", job["id"], "--agent", agent_addr)
            assert r.returncode == 0 and "done" in r.stdout and "f.bin" in r.stdout
            r = dxa(home, "rate", job["id"], "100M", "--agent", agent_addr)
            assert r.returncode == 2 and "FAILED_PRECONDITION" in r.stderr
            r = dxa(home, "cancel", "t99", "--agent", agent_addr)
            assert r.returncode == 2 and "NOT_FOUND" in r.stderr
            r = dxa(home, "submit", "../x", b.url("x"), "--agent", agent_addr)
            assert r.returncode == 2 and "INVALID_ARGUMENT" in r.stderr
            r = dxa(home, "submit", "f.bin", b.url("x"), "--agent", agent_addr, "--deadline", "+60")
            assert r.returncode == 2 and "needs the scheduler" in r.stderr, r.stderr
            r = dxa(home, "submit", "f.bin", b.url("x"), "--agent", agent_addr, "--deadline", "+60", "--rate", "1M")
            assert r.returncode == 2 and "not both" in r.stderr, r.stderr
            r = dxa(home, "status", "--agent", "127.0.0.1:1")
            assert r.returncode == 4

            # dxa watch: follow a paced job (200 kB at 4 Mbit/s: ~0.4 s) until it is done
            r = dxa(home, "submit", "f.bin", b.url("in/g.bin"), "--agent", agent_addr, "--json", "--rate", "4M")
            assert r.returncode == 0, r.stderr
            paced = json.loads(r.stdout)["id"]
            r = dxa(home, "watch", paced, "--agent", agent_addr, "--json")
            assert r.returncode == 0, r.stderr
            frames = [json.loads(line) for line in r.stdout.splitlines()]
            assert frames[-1][0]["state"] == "done" and frames[-1][0]["bytes_done"] == 200_000
            r = dxa(home, "watch", "--agent", agent_addr, "--until-done", "--interval", "0.1")
            assert r.returncode == 0 and "ID" in r.stdout and paced in r.stdout and "done" in r.stdout
            r = dxa(home, "watch", "t99", "--agent", agent_addr)
            assert r.returncode == 2
        finally:
            a.send_signal(signal.SIGTERM)
            assert a.wait(20) == 0


def test_a_job_outlives_a_restart_of_its_destination(agents, identity, tmp_path):
    """A destination daemon restarting (kill -9, then systemd's RestartSec) must not fail the
    jobs into it: network failures are retried with backoff while the job can progress."""
    src = agents.a.root / "big.bin"
    src.write_bytes(os.urandom(2 << 20))
    port = agents.b.port

    async def until_moving():
        t = agents.manager.submit(TransferSpec("big.bin", agents.dest("big.bin"), rate_bps=SLOW))
        async for ev in agents.manager.watch(t.id):
            if isinstance(ev, Progressed) and ev.bytes_done >= 400_000:
                return t.id

    tid = agents.on_a(until_moving())
    agents.b.close()  # the destination goes away mid-transfer...
    time.sleep(2.0)  # ...for longer than the old 3 quick attempts lasted
    give_up = time.monotonic() + 30  # (a loaded machine may be slow to notice the loss)
    while "retrying" not in (retrying := agents.manager.get(tid)).error and time.monotonic() < give_up:
        time.sleep(0.05)
    assert retrying.state is JobState.TRANSFERRING and "retrying" in retrying.error, retrying
    agents.b = InProcessServer(agents.tmp / "root-b", identity, port=port)  # back on the same port
    done = agents.on_a(agents.manager.wait(tid), timeout=60)
    assert done.state is JobState.DONE and done.error == "", done
    assert (agents.b.root / "big.bin").read_bytes() == src.read_bytes()


def test_a_job_gives_up_after_the_retry_window_without_progress(tmp_path, identity):
    async def go():
        m = JobManager(str(tmp_path / "root"), str(tmp_path / "t.sqlite"), identity, options=OPTS, retry_delay=0.1,
                       retry_window=1.0)
        (tmp_path / "root").mkdir()
        (tmp_path / "root" / "f.bin").write_bytes(b"x" * 1000)
        await m.start()
        try:
            t = m.submit(TransferSpec("f.bin", "dxa://127.0.0.1:1/f.bin"))  # nobody listens there
            return await asyncio.wait_for(m.wait(t.id), 20)
        finally:
            await m.close()

    t = run(go())
    assert t.state is JobState.FAILED and "gave up after" in t.error, t


def test_submit_refuses_what_cannot_work_before_running_it(agents, identity):
    (agents.a.root / "dir").mkdir()
    (agents.a.root / "dir" / "f.bin").write_bytes(b"x")
    (agents.a.root / "f.bin").write_bytes(b"y" * 100)

    async def go():
        async with Client(agents.target, identity) as c:
            errors = {}
            for name, call in {
                "http url": lambda: c.submit("f.bin", "http://127.0.0.1:1/x.bin"),
                "escaping destination": lambda: c.submit("f.bin", agents.dest("../x.bin")),
                "directory without -r": lambda: c.submit("dir", agents.dest("d")),
            }.items():
                try:
                    await call()
                except (TransferServiceError, ValueError) as exc:
                    errors[name] = exc
            first = await c.submit("f.bin", agents.dest("a.bin"), request_id="k1")
            again = await c.submit("f.bin", agents.dest("a.bin"), request_id="k1")
            try:
                await c.submit("dir", agents.dest("b"), recursive=True, request_id="k1")
            except TransferServiceError as exc:
                errors["request id reused"] = exc
            await c.wait(first.id)
            return errors, first, again, await c.list()

    errors, first, again, jobs = run(go())
    assert set(errors) == {"http url", "escaping destination", "directory without -r", "request id reused"}
    assert "is a directory" in str(errors["directory without -r"]) and str(agents.a.root) not in str(
        errors["directory without -r"])
    assert "k1" in str(errors["request id reused"]) and first.id in str(errors["request id reused"])
    assert again.id == first.id and [t.id for t in jobs] == [first.id]  # nothing else was accepted


def test_waiting_for_a_job_outlives_a_restart_of_its_agent(agents, identity):
    src = agents.a.root / "big.bin"
    src.write_bytes(os.urandom(1 << 20))  # ~2 s at SLOW

    def restart(port: int) -> None:
        agents.stop_manager()
        time.sleep(0.5)
        agents.start_manager(port=port)  # the job resumes; the client's watch is re-opened

    async def go():
        async with Client(agents.target, identity) as c:
            t = await c.submit("big.bin", agents.dest("big.bin"), rate=SLOW)
            waiter = asyncio.create_task(c.wait(t.id))
            await asyncio.sleep(0.5)
            await asyncio.get_running_loop().run_in_executor(None, restart, agents.grpc.port)
            return await asyncio.wait_for(waiter, 40)

    t = asyncio.run(go())
    assert t.state is JobState.DONE, t
    assert (agents.b.root / "big.bin").read_bytes() == src.read_bytes()


def test_a_paced_job_reports_its_rate_as_bytes_move_and_the_daemons_metrics_count_it(tmp_path, identity):
    """At 4 Mbit/s with 64 KiB chunks over 2 streams, verified chunks arrive in bursts; the
    job's current rate must follow the bytes on the wire, and the sending daemon's
    Prometheus metrics must count its own job."""
    from agent.service import convert
    from agent.service.metrics import ServerMetrics

    b = InProcessServer(tmp_path / "root-b", identity)
    (tmp_path / "root-a").mkdir()
    (tmp_path / "root-a" / "f.bin").write_bytes(os.urandom(1_500_000))  # 3 s at 4 Mbit/s

    async def go():
        metrics = ServerMetrics()
        m = JobManager(str(tmp_path / "root-a"), str(tmp_path / "t.sqlite"), identity, options=OPTS,
                       progress_interval=0.5, metrics=metrics)
        await m.start()
        try:
            t = m.submit(TransferSpec("f.bin", b.url("f.bin"), rate_bps=SLOW))
            rates, live = [], []
            async for ev in m.watch(t.id):
                if isinstance(ev, Progressed) and ev.current_rate_bps:
                    rates.append(ev.current_rate_bps)
                    row = m.get(t.id)  # what GetTransfer/ListTransfers (dxa status, dxa watch) show
                    assert row.current_rate_bps == ev.current_rate_bps
                    assert convert.transfer_from_proto(convert.transfer_to_proto(row)) == row
                    if not live:
                        live = [(f.name, s.labels, s.value) for f in metrics.collect() for s in f.samples]
            return await m.wait(t.id), rates, live, list(metrics.collect())
        finally:
            await m.close()

    try:
        t, rates, live, after = run(go())
    finally:
        b.close()
    assert t.state is JobState.DONE, t
    middle = sorted(rates)[len(rates) // 4: -len(rates) // 4 or None]  # drop the ramp and the tail
    assert middle and all(0.5 * SLOW < r < 1.5 * SLOW for r in middle), rates
    assert any(name == "dxa_active_transfers" and value == 1 for name, _labels, value in live), live
    sent = {s.labels.get("direction"): s.value for f in after if f.name == "dxa_bytes" for s in f.samples}
    assert sent.get("sent", 0) >= 1_500_000, sent


def test_the_cli_state_choices_are_the_job_states():
    from agent.cli.transfers import STATES

    assert STATES == tuple(s.value for s in JobState)
