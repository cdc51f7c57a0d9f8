"""The scheduler's gRPC server (controller_stub.server) through its client, over mutual TLS.

In-process: each test runs one asyncio loop holding the server (127.0.0.1:0) and the
clients.  Nothing waits on wall-clock timing except the ticker test, which polls with a
generous deadline under an injected clock.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from agent.store.pki import init_home, issue_cert, load_identity
from controller_stub.client import ControllerClient, ControllerError
from controller_stub.ledger import LedgerConfig, Outcome, ReservationRequest, State
from controller_stub.server import ControllerServer
from controller_stub.store import LedgerStore
from controller_stub.topology import load_topology
from tests.conftest import expired_identity

REPO = Path(__file__).resolve().parents[2]
TOPOLOGY = REPO / "controller_stub" / "topology.example.toml"
G = 10**9


@pytest.fixture
def pki(tmp_path):
    """The scheduler's home (node "sched") and an agent identity issued by its CA."""
    home = tmp_path / "sched"
    ident, _ = init_home(home, "sched")
    agent = issue_cert(home, "gw1", tmp_path / "gw1")
    return ident, agent


@pytest.fixture
def gw2(pki, tmp_path):
    """A second agent's identity: an agent registers and heartbeats only under its own name."""
    return issue_cert(tmp_path / "sched", "gw2", tmp_path / "gw2")


def _server(ident, state: Path, **kw) -> ControllerServer:
    return ControllerServer(ident, load_topology(TOPOLOGY), state, host="127.0.0.1", port=0, **kw)


def _client(server: ControllerServer, ident) -> ControllerClient:
    return ControllerClient(f"127.0.0.1:{server.port}", ident, timeout=5.0)


async def _register_two(port: int, gw1, gw2) -> None:
    # gw1 in Geneva, gw2 in Amsterdam, 10 Gbit/s each: the path's bottleneck is their own links.
    for ident, site, address in ((gw1, "geneva", "10.0.0.1:7400"), (gw2, "amsterdam", "10.0.1.1:7400")):
        async with ControllerClient(f"127.0.0.1:{port}", ident, timeout=5.0) as c:
            await c.register_agent(ident.name, site, [address], 10 * G)


def test_the_reservation_lifecycle_over_grpc_and_a_restart(pki, gw2, tmp_path):
    ident, agent_ident = pki
    state = tmp_path / "ledger.db"

    async def main():
        server = _server(ident, state)
        await server.start()
        try:
            async with _client(server, agent_ident) as c:
                agent, lease = await c.register_agent("gw1", "geneva", ["10.0.0.1:7400"], 10 * G)
                assert (agent.name, agent.site, agent.capacity_bps, lease) == ("gw1", "geneva", 10 * G, 30.0)
                async with _client(server, gw2) as c2:
                    await c2.register_agent("gw2", "amsterdam", ["10.0.1.1:7400"], 10 * G)
                expires, held = await c.heartbeat("gw1")
                assert expires > time.time() + 25 and held == []

                # 6G for an hour fits; another 6G does not: refused with the earliest start, or queued.
                hour = 6 * G * 3600 // 8
                first = await c.request_reservation(ReservationRequest("gw1", "gw2", rate_bps=6 * G, volume_bytes=hour))
                assert first.outcome is Outcome.ADMITTED
                r1 = first.reservation
                assert r1.state is State.RESERVED and r1.path == ("gw1>geneva", "geneva>amsterdam", "amsterdam>gw2")
                refused = await c.request_reservation(ReservationRequest("gw1", "gw2", rate_bps=6 * G, wait=False))
                assert refused.outcome is Outcome.REFUSED and refused.reservation is None
                assert refused.earliest_start == pytest.approx(r1.end)
                queued = await c.request_reservation(ReservationRequest("gw2", "gw1", rate_bps=3 * G))
                assert queued.outcome is Outcome.ADMITTED  # the other direction is free
                waiter = await c.request_reservation(ReservationRequest("gw1", "gw2", rate_bps=6 * G, priority=1))
                assert waiter.outcome is Outcome.QUEUED and waiter.reservation.state is State.SUBMITTED
                assert waiter.earliest_start == pytest.approx(r1.end)

                # gw1 learns of its reservations by heartbeat; starting one makes it TRANSFERRING.
                _, held = await c.heartbeat("gw1")
                assert [r.id for r in held] == [r1.id, queued.reservation.id, waiter.reservation.id]
                assert (await c.start_reservation(r1.id)).state is State.TRANSFERRING

                # Release: the capacity is free at once and the waiter is admitted in the answer.
                released, admitted = await c.release_reservation(r1.id, State.DONE)
                assert released.state is State.DONE
                assert [r.id for r in admitted] == [waiter.reservation.id]
                assert admitted[0].state is State.RESERVED and admitted[0].rate_bps == 6 * G
                w = admitted[0].id

                # Elastic rate: lower, then a raise that does not fit, then one that does.
                changed, _ = await c.change_rate(w, 2 * G)
                assert changed.rate_bps == 2 * G
                other = await c.request_reservation(ReservationRequest("gw1", "gw2", rate_bps=3 * G))
                assert other.outcome is Outcome.ADMITTED
                with pytest.raises(ControllerError) as err:
                    await c.change_rate(w, 8 * G)
                assert err.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
                assert err.value.kind == "InsufficientCapacityError" and err.value.available_bps == 7 * G
                changed, _ = await c.change_rate(w, 7 * G)
                assert changed.rate_bps == 7 * G

                # Errors carry the ledger's status codes.
                with pytest.raises(ControllerError) as err:
                    await c.request_reservation(ReservationRequest("gw1", "nobody", rate_bps=G))
                assert err.value.code is grpc.StatusCode.NOT_FOUND and err.value.kind == "UnknownAgentError"
                with pytest.raises(ControllerError) as err:
                    await c.request_reservation(ReservationRequest("gw1", "gw2", rate_bps=11 * G))
                assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT
                with pytest.raises(ControllerError) as err:
                    await c.start_reservation(r1.id)
                assert err.value.code is grpc.StatusCode.FAILED_PRECONDITION
                with pytest.raises(ControllerError) as err:
                    await c.release_reservation("r999", State.CANCELLED)
                assert err.value.code is grpc.StatusCode.NOT_FOUND

                before = await c.list_reservations()
                assert [(r.id, r.state) for r in before] == [
                    ("r1", State.DONE), ("r3", State.RESERVED), ("r4", State.RESERVED), ("r5", State.RESERVED)]
                assert [r.id for r in await c.list_reservations(states=[State.DONE])] == ["r1"]
                assert [r.id for r in await c.list_reservations(agent="gw2", states=[State.RESERVED])] == [
                    "r3", "r4", "r5"]
        finally:
            await server.stop()

        # A restarted server on the same state file knows everything it acknowledged.
        server = _server(ident, state)
        await server.start()
        try:
            async with _client(server, agent_ident) as c:
                after = await c.list_reservations()
                assert [(r.id, r.state, r.rate_bps, r.path) for r in after] == [
                    (r.id, r.state, r.rate_bps, r.path) for r in before]
                await c.heartbeat("gw1")  # live agents got a fresh lease
                nxt = await c.request_reservation(ReservationRequest("gw2", "gw1", rate_bps=G))
                assert nxt.reservation.id == "r6"  # ids are never reused
        finally:
            await server.stop()

    asyncio.run(main())


def test_leases_expire_in_the_background_and_the_state_is_saved(pki, gw2, tmp_path):
    ident, agent_ident = pki
    state = tmp_path / "ledger.db"
    clock = [1_800_000_000.0]

    async def main():
        server = _server(ident, state, config=LedgerConfig(lease_timeout=2.0), clock=lambda: clock[0],
                         tick_interval=0.02)
        await server.start()
        try:
            async with _client(server, agent_ident) as c, _client(server, gw2) as c2:
                _, lease = await c.register_agent("gw1", "geneva", [], 10 * G)
                assert lease == 2.0
                await c2.register_agent("gw2", "amsterdam", [], 10 * G)
                d = await c.request_reservation(ReservationRequest("gw1", "gw2", rate_bps=G))
                assert d.outcome is Outcome.ADMITTED
                clock[0] += 1.5
                await c2.heartbeat("gw2")  # gw2 stays; gw1 falls silent
                clock[0] += 1.0
                # No RPC from here: only the ticker can notice gw1's lease ran out.
                deadline = time.monotonic() + 10
                while not server.ledger.agent("gw1").expired:
                    assert time.monotonic() < deadline, "the ticker never expired the lease"
                    await asyncio.sleep(0.02)
                with LedgerStore(state) as store:  # saved by the ticker, not by a call
                    snap = store.load()
                assert {a.name: a.expired for a in snap.agents} == {"gw1": True, "gw2": False}
                (r,) = snap.reservations
                assert (r.state, r.reason) == (State.FAILED, "lease expired")

                with pytest.raises(ControllerError) as err:
                    await c.heartbeat("gw1")
                assert err.value.code is grpc.StatusCode.FAILED_PRECONDITION and err.value.kind == "LeaseExpiredError"
                await c2.heartbeat("gw2")
                await c.register_agent("gw1", "geneva", [], 10 * G)  # registering again revives it
                await c.heartbeat("gw1")
        finally:
            await server.stop()

    asyncio.run(main())


def test_a_client_from_another_ca_is_refused(pki, gw2, tmp_path):
    ident, agent_ident = pki
    foreign_home = tmp_path / "foreign"
    init_home(foreign_home, "foreign-ca")
    issue_cert(foreign_home, "intruder", tmp_path / "intruder")
    # The intruder trusts our CA (so only the server's check can stop it) but its own
    # certificate is signed by another CA.
    intruder = load_identity(tmp_path / "intruder", ca=ident.ca_cert)

    async def main():
        server = _server(ident, tmp_path / "ledger.db")
        await server.start()
        try:
            async with _client(server, intruder) as bad:
                with pytest.raises(ControllerError) as err:
                    await bad.register_agent("intruder", "geneva", [], 10 * G)
                assert err.value.code is grpc.StatusCode.UNAVAILABLE
            await _register_two(server.port, agent_ident, gw2)
            assert [a.name for a in server.ledger.agents()] == ["gw1", "gw2"]
        finally:
            await server.stop()

    asyncio.run(main())


def test_dxa_controller_serve(pki, gw2, tmp_path):
    """The CLI: listens with --port-file, answers, stops on SIGTERM with status 0."""
    _, agent_ident = pki
    port_file, state = tmp_path / "port", tmp_path / "ledger.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli.main", "controller", "serve", "--home", str(tmp_path / "sched"),
         "--listen", "127.0.0.1:0", "--topology", str(TOPOLOGY), "--state", str(state),
         "--port-file", str(port_file)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not port_file.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no port file"
            time.sleep(0.05)
        port = int(port_file.read_text())

        async def main():
            await _register_two(port, agent_ident, gw2)
            async with ControllerClient(f"127.0.0.1:{port}", agent_ident, timeout=5.0) as c:
                d = await c.request_reservation(ReservationRequest("gw1", "gw2", rate_bps=G))
                assert d.outcome is Outcome.ADMITTED

        asyncio.run(main())
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    with LedgerStore(state) as store:
        assert [r.id for r in store.load().reservations] == ["r1"]


def test_dxa_controller_serve_refuses_bad_configuration(pki, tmp_path, capsys):
    from agent.cli.main import EXIT_USAGE, main

    home = str(tmp_path / "sched")
    base = ["controller", "serve", "--home", home, "--state", str(tmp_path / "s.db")]
    assert main([*base, "--listen", "nonsense", "--topology", str(TOPOLOGY)]) == EXIT_USAGE
    assert "--listen wants HOST:PORT" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[[site]]\nname = 'a'\n[[link]]\na = 'a'\nb = 'z'\ncapacity = '1G'\n")
    assert main([*base, "--listen", "127.0.0.1:0", "--topology", str(bad)]) == EXIT_USAGE
    assert "not declared" in capsys.readouterr().err


def test_a_second_server_cannot_share_the_port(pki, tmp_path):
    from controller_stub.server import ListenError

    ident, _ = pki

    async def main():
        async with _server(ident, tmp_path / "a.db") as first:
            second = ControllerServer(ident, load_topology(TOPOLOGY), tmp_path / "b.db", port=first.port)
            with pytest.raises(ListenError):
                await second.start()

    asyncio.run(main())


def test_an_expired_client_certificate_is_refused(pki, tmp_path):
    ident, _ = pki
    late = expired_identity(tmp_path / "sched", tmp_path / "late")

    async def main():
        async with _server(ident, tmp_path / "ledger.db") as server, _client(server, late) as c:
            with pytest.raises(ControllerError) as err:
                await c.register_agent("late", "geneva", [], 10 * G)
            assert err.value.code is grpc.StatusCode.UNAVAILABLE
            assert server.ledger.agents() == []

    asyncio.run(main())


def test_a_failed_save_is_not_acknowledged_and_leaves_no_trace(pki, gw2, tmp_path):
    from controller_stub.errors import LedgerStoreError

    ident, agent_ident = pki

    async def main():
        async with _server(ident, tmp_path / "ledger.db") as server, _client(server, agent_ident) as c:
            await _register_two(server.port, agent_ident, gw2)
            store = server.service.store
            real_save = store.save

            def broken(snap):
                raise LedgerStoreError("disk on fire")

            store.save = broken
            with pytest.raises(ControllerError) as err:
                await c.request_reservation(ReservationRequest("gw1", "gw2", rate_bps=G))
            assert err.value.code is grpc.StatusCode.UNAVAILABLE
            store.save = real_save
            assert await c.list_reservations() == []  # rolled back to what is on disk
            d = await c.request_reservation(ReservationRequest("gw1", "gw2", rate_bps=G))
            assert d.outcome is Outcome.ADMITTED and d.reservation.id == "r1"

    asyncio.run(main())


def test_the_scheduler_exports_prometheus_metrics(pki, gw2, tmp_path):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    ident, gw1 = pki

    def scrape(port: int) -> dict:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    async def main():
        async with _server(ident, tmp_path / "ledger.db", metrics=("127.0.0.1", 0)) as server:
            await _register_two(server.port, gw1, gw2)
            async with _client(server, gw1) as c:
                await c.request_reservation(ReservationRequest("gw1", "gw2", rate_bps=3 * G))
                await c.request_reservation(ReservationRequest("gw1", "gw2", rate_bps=8 * G))  # waits: gw1 is 10G
            server.metrics.sample()
            m = await asyncio.get_running_loop().run_in_executor(None, scrape, server.metrics.port)
            port = server.metrics.port
        return m, port

    m, port = asyncio.run(main())
    assert m[("dxa_scheduler_agents", (("state", "live"),))] == 2
    assert m[("dxa_scheduler_reservations", (("state", "reserved"),))] == 1
    assert m[("dxa_scheduler_reservations", (("state", "submitted"),))] == 1
    assert m[("dxa_scheduler_waiting_reservations", ())] == 1
    assert m[("dxa_scheduler_link_capacity_bps", (("link", "gw1>geneva"),))] == 10 * G
    assert m[("dxa_scheduler_link_reserved_bps", (("link", "gw1>geneva"),))] == 3 * G
    with pytest.raises(OSError):  # stopped with the scheduler
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
