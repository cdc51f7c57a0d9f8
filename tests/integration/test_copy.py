"""Real transfers on loopback: push and pull, trees, metadata, resume, refusal."""

from __future__ import annotations

import asyncio
import os
import stat
import time

import pytest

from agent.aio.client import copy
from agent.config import TransferOptions
from agent.errors import ConfigError, PathError
from tests.conftest import make_tree, same_tree

OPTS = TransferOptions.for_test(recursive=True)


def run(coro):
    return asyncio.run(coro)


def test_push_tree_arrives_identical_with_modes_and_mtimes(tmp_path, server, identity):
    src = make_tree(tmp_path / "src", files=30, big=700_000)
    os.symlink("f0002.bin", src / "link-inside")
    os.symlink("/etc/passwd", src / "link-outside")
    res = run(copy([str(src)], server.url("datasets/x"), identity=identity, options=OPTS))
    dst = server.root / "datasets" / "x"
    assert res.verified and res.files_failed == 0
    assert res.bytes_total == sum(p.stat().st_size for p in src.rglob("*") if p.is_file() and not p.is_symlink())
    assert res.bytes_skipped == 0 and res.encrypted
    assert os.readlink(dst / "link-inside") == "f0002.bin"
    assert not os.path.lexists(dst / "link-outside")
    assert any("outside the tree" in w for w in res.warnings)
    os.unlink(src / "link-outside")
    assert same_tree(src, dst)
    for p in src.rglob("*"):
        if p.is_file() and not p.is_symlink():
            q = dst / p.relative_to(src)
            assert stat.S_IMODE(p.stat().st_mode) == stat.S_IMODE(q.stat().st_mode)
            assert p.stat().st_mtime_ns == q.stat().st_mtime_ns
    assert not list(dst.rglob("*.dxa-part"))


def test_second_run_skips_everything(tmp_path, server, identity):
    src = make_tree(tmp_path / "src", files=10, big=300_000)
    run(copy([str(src)], server.url("d"), identity=identity, options=OPTS))
    res = run(copy([str(src)], server.url("d"), identity=identity, options=OPTS))
    assert res.verified and res.bytes_sent == 0 and res.bytes_skipped == res.bytes_total > 0


def test_pull_file_and_tree(tmp_path, server, identity):
    make_tree(server.root / "models" / "m", files=12, big=400_000)
    out = tmp_path / "out"
    out.mkdir()
    res = run(copy([server.url("models/m")], str(out / "m"), identity=identity, options=OPTS))
    assert res.verified and res.direction == "pull"
    assert same_tree(server.root / "models" / "m", out / "m")
    res = run(copy([server.url("models/m/big.bin")], str(out / "single.bin"), identity=identity,
                   options=TransferOptions.for_test()))
    assert res.verified and (out / "single.bin").read_bytes() == (server.root / "models/m/big.bin").read_bytes()


@pytest.mark.parametrize("compress,encrypt", [("zstd", True), ("off", False), ("auto", True)])
def test_modes(tmp_path, server, identity, compress, encrypt):
    src = tmp_path / "src"
    src.mkdir()
    (src / "text.txt").write_bytes(b"the same line again\n" * 50_000)
    (src / "rand.bin").write_bytes(os.urandom(300_000))
    opts = TransferOptions.for_test(recursive=True, compress=compress, encrypt=encrypt)
    res = run(copy([str(src)], server.url("m"), identity=identity, options=opts))
    assert res.verified and res.encrypted == encrypt
    assert same_tree(src, server.root / "m")
    if compress != "off":
        assert res.bytes_sent < res.bytes_total  # the text compressed
    else:
        assert res.bytes_sent == res.bytes_total


def test_paths_escaping_the_root_are_refused(tmp_path, server, identity):
    f = tmp_path / "f"
    f.write_bytes(b"x")
    with pytest.raises(PathError):
        run(copy([str(f)], server.url("../escape"), identity=identity, options=OPTS))
    # a symlink planted inside the destination root pointing outside of it
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, server.root / "trap")
    res = run(copy([str(f)], server.url("trap/f"), identity=identity, options=OPTS))
    assert not res.verified and any("symlink" in e for e in res.errors)
    assert not list(outside.iterdir())


def test_bad_arguments_are_config_errors(tmp_path, identity):
    with pytest.raises(ConfigError):
        run(copy(["a"], "b", identity=identity))
    with pytest.raises(ConfigError):
        TransferOptions(streams=0)
    with pytest.raises(ConfigError):
        TransferOptions(chunk_size=10)


def test_the_daemon_serves_many_transfers_at_once(tmp_path, server, identity):
    trees = [make_tree(tmp_path / f"src{i}", files=15, big=300_000, seed=i) for i in range(4)]

    async def all_at_once():
        return await asyncio.gather(*(copy([str(t)], server.url(f"many/{i}"), identity=identity, options=OPTS)
                                      for i, t in enumerate(trees)))

    results = run(all_at_once())
    assert all(r.verified for r in results)
    for i, t in enumerate(trees):
        assert same_tree(t, server.root / "many" / str(i))
    # each transfer was logged with its outcome (the daemon closes its books just after SUMMARY)
    deadline = time.monotonic() + 10
    while len([c for c in server.server.completed if c["outcome"] == "ok"]) < 4:
        assert time.monotonic() < deadline, server.server.completed
        time.sleep(0.02)


def test_two_transfers_to_the_same_file_never_mix(tmp_path, server, identity):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f.bin").write_bytes(os.urandom(3 << 20))
    (b / "f.bin").write_bytes(os.urandom(3 << 20))
    opts = TransferOptions.for_test(recursive=True, rate=40_000_000)  # slow enough to overlap

    async def both():
        return await asyncio.gather(copy([str(a / "f.bin")], server.url("same/f.bin"), identity=identity, options=opts),
                                    copy([str(b / "f.bin")], server.url("same/f.bin"), identity=identity, options=opts))

    ra, rb = run(both())
    assert ra.verified != rb.verified, "exactly one of two overlapping writers may win"
    loser = rb if ra.verified else ra
    assert any("another transfer" in e for e in loser.errors)
    got = (server.root / "same" / "f.bin").read_bytes()
    assert got == (a / "f.bin").read_bytes() if ra.verified else got == (b / "f.bin").read_bytes()


def test_fsync_mode_delivers_the_same_bytes(tmp_path, identity):
    from tests.conftest import InProcessServer

    srv = InProcessServer(tmp_path / "root", identity, fsync=True)
    try:
        src = make_tree(tmp_path / "src", files=6, big=(1 << 20) + 5)
        res = run(copy([str(src)], srv.url("d"), identity=identity,
                       options=TransferOptions.for_test(recursive=True, chunk_size=256 << 10)))
        assert res.verified and same_tree(src, srv.root / "d")
    finally:
        srv.close()


def test_dxa_bench_reports_intervals_and_a_verified_total(tmp_path, home, daemon_factory):
    import json

    from tests.conftest import dxa

    d = daemon_factory(tmp_path / "root")
    r = dxa(home, "bench", d.url(""), "--seconds", "1.5", "--streams", "2", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["encrypted"] is True and out["streams"] == 2 and out["seconds"] >= 1.4
    assert out["bytes_verified"] == out["bytes_sent"] > 0 and out["gbps"] > 0
    assert out["intervals"] and all(i["bytes"] > 0 for i in out["intervals"])
    r = dxa(home, "bench", d.url(""), "--seconds", "1", "--no-encrypt")
    assert r.returncode == 0 and "[SUM]" in r.stdout and "verified by the receiver" in r.stdout, r.stdout
    assert list((tmp_path / "root").iterdir()) in ([], [tmp_path / "root" / ".dxa"])  # nothing written


@pytest.mark.parametrize("encrypt", [True, False])
def test_big_files_are_written_with_o_direct_and_arrive_identical(tmp_path, identity, monkeypatch, encrypt):
    """Whole aligned chunks of a file of 8 MiB or more go through the O_DIRECT descriptor
    (where the file system has it); the unaligned tail through the page cache.  Sealed or
    not (--no-encrypt), the plaintext sits page-aligned in the pump's slot."""
    import os as _os

    from agent.store import receiving
    from tests.conftest import InProcessServer

    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    fd = receiving._open_direct("probe", _os.open(tmp_path, _os.O_RDONLY))
    if fd < 0:
        pytest.skip("no O_DIRECT on this file system")
    _os.close(fd)
    writes = {"direct": 0, "buffered": 0}
    real_pwrite = receiving.os.pwrite

    def counting_pwrite(fd, data, offset):
        import fcntl

        kind = "direct" if fcntl.fcntl(fd, fcntl.F_GETFL) & _os.O_DIRECT else "buffered"
        writes[kind] += 1
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(receiving.os, "pwrite", counting_pwrite)
    srv = InProcessServer(tmp_path / "root", identity)
    try:
        src = tmp_path / "big.bin"
        src.write_bytes(_os.urandom((9 << 20) + 1234))  # 9 MiB + an unaligned tail
        opts = TransferOptions.for_test(compress="off", chunk_size=1 << 20, encrypt=encrypt)
        res = asyncio.run(copy([str(src)], srv.url("big.bin"), identity=identity, options=opts))
    finally:
        srv.close()
    assert res.verified and res.encrypted == encrypt
    assert (tmp_path / "root" / "big.bin").read_bytes() == src.read_bytes()
    assert writes["direct"] >= 9 and writes["buffered"] >= 1, writes


def test_the_server_turns_nagle_off_on_control_connections(tmp_path, server, identity, monkeypatch):
    """A control message written while the previous one is un-ACKed must not wait for the
    peer's delayed ACK (about 40 ms per exchange with Nagle on).  The client's end is
    asyncio.open_connection's, which turns Nagle off itself."""
    import socket

    from agent.aio.server import Server

    seen = []
    real = Server._control_conn

    async def spy(self, conn, addr, *rest):
        seen.append(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        return await real(self, conn, addr, *rest)

    monkeypatch.setattr(Server, "_control_conn", spy)
    (tmp_path / "f").write_bytes(b"x" * 1000)
    res = run(copy([str(tmp_path / "f")], server.url("f"), identity=identity, options=OPTS))
    assert res.verified and seen and all(seen)
