"""Who may call what on the scheduler: the caller is the CN of its client certificate.

One scheduler with admins=("ops",) and four nodes issued by its CA: gw1 (geneva) and gw2
(amsterdam) are the parties of the reservations, gw3 (geneva) is registered but a
bystander, ops is the operator.  Every refusal is PERMISSION_DENIED, names the caller and
what it tried, is logged at WARNING, and leaves the ledger (and its file) as it was.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import pytest

from agent.errors import ConfigError
from agent.store.pki import Identity, init_home, issue_cert
from controller_stub.client import ControllerClient, ControllerError
from controller_stub.ledger import LedgerConfig, Outcome, ReservationRequest, State
from controller_stub.server import ControllerServer
from controller_stub.store import LedgerStore
from controller_stub.topology import load_topology

REPO = Path(__file__).resolve().parents[2]
TOPOLOGY = REPO / "controller_stub" / "topology.example.toml"
G = 10**9
SITES = {"gw1": "geneva", "gw2": "amsterdam", "gw3": "geneva"}


@pytest.fixture
def nodes(tmp_path) -> dict[str, Identity]:
    home = tmp_path / "sched"
    sched, _ = init_home(home, "sched")
    out = {"sched": sched}
    for name in ("gw1", "gw2", "gw3", "ops"):
        out[name] = issue_cert(home, name, tmp_path / name)
    return out


class Bench:
    """The server and one client per node, inside one event loop."""

    def __init__(self, server: ControllerServer, clients: dict[str, ControllerClient]) -> None:
        self.server, self.c = server, clients

    async def register_all(self) -> None:
        for name, site in SITES.items():
            await self.c[name].register_agent(name, site, [f"{name}:7400"], 10 * G)

    def state_on_disk(self):
        with LedgerStore(self.server.state_path) as store:
            return store.load()


def run(nodes, tmp_path, body, **kw) -> None:
    async def main():
        server = ControllerServer(nodes["sched"], load_topology(TOPOLOGY), tmp_path / "ledger.db",
                                  admins=("ops",), **kw)
        await server.start()
        clients = {n: ControllerClient(f"127.0.0.1:{server.port}", ident, timeout=5.0)
                   for n, ident in nodes.items() if n != "sched"}
        try:
            await body(Bench(server, clients))
        finally:
            for c in clients.values():
                await c.close()
            await server.stop()

    asyncio.run(main())


async def refused(call) -> ControllerError:
    with pytest.raises(ControllerError) as err:
        await call
    assert err.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert err.value.kind == "PermissionDeniedError"
    return err.value


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "controller_stub.server" and r.levelno == logging.WARNING]


def test_a_node_cannot_register_or_heartbeat_as_another(nodes, tmp_path, caplog):
    clock = [1_800_000_000.0]

    async def body(b: Bench):
        await b.register_all()
        before = b.server.ledger.agent("gw1")
        clock[0] += 5

        err = await refused(b.c["gw2"].register_agent("gw1", "amsterdam", ["evil:7400"], G))
        assert err.details == "node 'gw2' may not register as 'gw1'"
        err = await refused(b.c["gw2"].heartbeat("gw1"))
        assert err.details == "node 'gw2' may not heartbeat as 'gw1'"
        # A name nobody registered yet is no different: gw3 may not claim it either.
        err = await refused(b.c["gw3"].register_agent("gw9", "geneva", [], G))
        assert err.details == "node 'gw3' may not register as 'gw9'"

        # gw1 kept its site, addresses, capacity and lease; gw9 does not exist.
        assert b.server.ledger.agent("gw1") == before
        assert sorted(a.name for a in b.state_on_disk().agents) == ["gw1", "gw2", "gw3"]
        assert warnings(caplog) == ["refused: node 'gw2' may not register as 'gw1'",
                                    "refused: node 'gw2' may not heartbeat as 'gw1'",
                                    "refused: node 'gw3' may not register as 'gw9'"]

        # Each node may still speak for itself.
        expires, _ = await b.c["gw1"].heartbeat("gw1")
        assert expires == pytest.approx(clock[0] + 30)

    run(nodes, tmp_path, body, clock=lambda: clock[0], config=LedgerConfig(lease_timeout=30.0))


def test_a_non_party_cannot_touch_a_reservation_and_it_stays_unchanged(nodes, tmp_path, caplog):
    async def body(b: Bench):
        await b.register_all()
        d = await b.c["gw1"].request_reservation(ReservationRequest("gw1", "gw2", rate_bps=2 * G))
        assert d.outcome is Outcome.ADMITTED
        r = d.reservation
        before, saved = b.server.ledger.get(r.id), b.state_on_disk()

        gw3 = b.c["gw3"]
        err = await refused(gw3.start_reservation(r.id))
        assert err.details == f"node 'gw3' is not a party of reservation {r.id} (gw1 -> gw2): it may not start it"
        err = await refused(gw3.release_reservation(r.id, State.CANCELLED, "mine now"))
        assert err.details.startswith(f"node 'gw3' is not a party of reservation {r.id} ")
        assert err.details.endswith("it may not release it")
        err = await refused(gw3.change_rate(r.id, G))
        assert err.details.endswith("it may not change the rate of it")
        # Nor may it ask for a reservation on others' behalf.
        err = await refused(gw3.request_reservation(ReservationRequest("gw1", "gw2", rate_bps=G)))
        assert err.details == ("node 'gw3' may not request a reservation from 'gw1' to 'gw2': "
                               "it is neither the source nor the destination")

        assert b.server.ledger.get(r.id) == before  # still RESERVED at 2G
        assert before.state is State.RESERVED and before.rate_bps == 2 * G
        assert b.state_on_disk() == saved
        assert len(warnings(caplog)) == 4 and all("node 'gw3'" in w for w in warnings(caplog))

        # Reading stays open to every caller.
        assert [(x.id, x.state) for x in await gw3.list_reservations()] == [(r.id, State.RESERVED)]
        assert [x.id for x in await gw3.list_reservations(agent="gw1")] == [r.id]

        # An unknown reservation is still NOT_FOUND, whoever asks.
        with pytest.raises(ControllerError) as nf:
            await gw3.release_reservation("r999")
        assert nf.value.code is grpc.StatusCode.NOT_FOUND

    run(nodes, tmp_path, body)


def test_the_parties_may_start_re_rate_and_release(nodes, tmp_path, caplog):
    async def body(b: Bench):
        await b.register_all()
        # The destination may ask too (a pull); either end may act on the reservation.
        d = await b.c["gw2"].request_reservation(ReservationRequest("gw1", "gw2", rate_bps=2 * G))
        rid = d.reservation.id
        assert (await b.c["gw1"].start_reservation(rid)).state is State.TRANSFERRING
        changed, _ = await b.c["gw2"].change_rate(rid, 3 * G)
        assert changed.rate_bps == 3 * G
        released, _ = await b.c["gw1"].release_reservation(rid, State.DONE)
        assert released.state is State.DONE
        # ... and in the other direction the roles swap.
        back = await b.c["gw2"].request_reservation(ReservationRequest("gw2", "gw1", rate_bps=G))
        released, _ = await b.c["gw1"].release_reservation(back.reservation.id, State.CANCELLED)
        assert released.state is State.CANCELLED
        assert warnings(caplog) == []

    run(nodes, tmp_path, body)


def test_an_admin_may_do_everything(nodes, tmp_path, caplog):
    async def body(b: Bench):
        await b.register_all()
        ops = b.c["ops"]
        r1 = (await b.c["gw1"].request_reservation(ReservationRequest("gw1", "gw2", rate_bps=2 * G))).reservation
        changed, _ = await ops.change_rate(r1.id, 4 * G)
        assert changed.rate_bps == 4 * G
        released, _ = await ops.release_reservation(r1.id, State.CANCELLED, "maintenance")
        assert (released.state, released.reason) == (State.CANCELLED, "maintenance")

        r2 = (await ops.request_reservation(ReservationRequest("gw2", "gw1", rate_bps=G))).reservation
        assert (await ops.start_reservation(r2.id)).state is State.TRANSFERRING
        await ops.heartbeat("gw3")
        agent, _ = await ops.register_agent("gw4", "amsterdam", [], G)
        assert agent.name == "gw4"
        assert warnings(caplog) == []

        # The same calls from a bystander that is not in ``admins`` are refused.
        await refused(b.c["gw3"].change_rate(r2.id, G))
        await refused(b.c["gw3"].heartbeat("gw4"))
        assert b.server.ledger.get(r2.id).rate_bps == G

    run(nodes, tmp_path, body)


def test_admins_must_be_node_names(nodes, tmp_path):
    topo = load_topology(TOPOLOGY)
    with pytest.raises(ConfigError, match="not the string"):
        ControllerServer(nodes["sched"], topo, tmp_path / "a.db", admins="ops")
    with pytest.raises(ConfigError):
        ControllerServer(nodes["sched"], topo, tmp_path / "a.db", admins=("ops", ""))
    assert ControllerServer(nodes["sched"], topo, tmp_path / "a.db", admins=["ops", "ops2"]).admins == {"ops", "ops2"}


def _identity_without_common_name(home: Path, out: Path) -> Identity:
    """A valid certificate from ``home``'s CA whose subject has no CN (only an organization)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_key = serialization.load_pem_private_key((home / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((home / "ca.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nameless")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=1))
            .sign(ca_key, hashes.SHA256()))
    out.mkdir()
    (out / "node.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    (out / "node.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Identity("", home / "ca.pem", out / "node.pem", out / "node.key")


def test_a_certificate_without_a_common_name_acts_for_nobody(nodes, tmp_path, caplog):
    nameless = _identity_without_common_name(tmp_path / "sched", tmp_path / "nameless")

    async def body(b: Bench):
        await b.register_all()
        async with ControllerClient(f"127.0.0.1:{b.server.port}", nameless, timeout=5.0) as c:
            err = await refused(c.register_agent("gw1", "geneva", [], G))
            assert err.details == "the caller's certificate has no common name (node name): it may not register"
            await refused(c.request_reservation(ReservationRequest("gw1", "gw2", rate_bps=G)))
            assert await c.list_reservations() == []  # authenticated by the CA: it may read
        assert len(warnings(caplog)) == 2

    run(nodes, tmp_path, body)


def test_watch_reservations_pushes_each_saved_change_to_the_agents_it_concerns(nodes, tmp_path):
    async def collect(stream, into: list, n: int):
        async for r in stream:
            into.append((r.id, r.state, r.rate_bps))
            if len(into) == n:
                return

    async def body(b: Bench):
        await b.register_all()
        early = await b.c["gw1"].request_reservation(ReservationRequest("gw1", "gw2", rate_bps=G))
        gw1, gw2, gw3, everyone = [], [], [], []
        watchers = [asyncio.create_task(collect(b.c["gw1"].watch_reservations("gw1"), gw1, 5)),
                    asyncio.create_task(collect(b.c["gw2"].watch_reservations("gw2"), gw2, 5)),
                    asyncio.create_task(collect(b.c["gw3"].watch_reservations("gw3"), gw3, 1)),
                    asyncio.create_task(collect(b.c["ops"].watch_reservations(""), everyone, 5))]
        while len(b.server.service._watchers) < 4:  # every stream open before the changes
            await asyncio.sleep(0.01)
        rid = early.reservation.id
        await b.c["gw1"].start_reservation(rid)
        await b.c["gw1"].change_rate(rid, 3 * G)
        await b.c["gw2"].change_rate(rid, 2 * G)
        await b.c["gw1"].release_reservation(rid, State.DONE)
        await asyncio.wait_for(asyncio.gather(*watchers[:2], watchers[3]), 5)
        expected = [(rid, State.RESERVED, G), (rid, State.TRANSFERRING, G), (rid, State.TRANSFERRING, 3 * G),
                    (rid, State.TRANSFERRING, 2 * G), (rid, State.DONE, 2 * G)]
        assert gw1 == gw2 == everyone == expected  # the current one first, then every change in order
        assert gw3 == [] and not watchers[2].done()  # a bystander hears nothing of it
        watchers[2].cancel()

        # Only the agent itself (or an admin) may watch an agent; only an admin may watch all.
        with pytest.raises(ControllerError) as err:
            async for _ in b.c["gw3"].watch_reservations("gw1"):
                pass
        assert err.value.code is grpc.StatusCode.PERMISSION_DENIED and "gw3" in err.value.details
        with pytest.raises(ControllerError) as err:
            async for _ in b.c["gw3"].watch_reservations(""):
                pass
        assert err.value.code is grpc.StatusCode.PERMISSION_DENIED

    run(nodes, tmp_path, body)


def test_a_stopping_scheduler_ends_the_watch_streams(nodes, tmp_path):
    async def main():
        server = ControllerServer(nodes["sched"], load_topology(TOPOLOGY), tmp_path / "ledger.db")
        await server.start()
        async with ControllerClient(f"127.0.0.1:{server.port}", nodes["gw1"], timeout=5.0) as c:
            await c.register_agent("gw1", "geneva", [], 10 * G)
            seen = []

            async def watch():
                async for r in c.watch_reservations("gw1"):
                    seen.append(r)

            task = asyncio.create_task(watch())
            while not server.service._watchers:
                await asyncio.sleep(0.01)
            await server.stop()
            await asyncio.wait_for(task, 5)  # ended, without an error
            assert seen == []

    asyncio.run(main())
