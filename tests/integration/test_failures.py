"""Failure paths: corruption on the wire, cut connections, hostile frames, foreign peers,
kill -9 of either side, a source that changes between runs, a full disk."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.aio.client import copy
from agent.config import TransferOptions
from agent.errors import AuthenticationError, BrokenConnectionError, DiskFullError, IntegrityError, TransferError
from agent.store.pki import init_home, load_identity
from agent.wire import FRAME_OVERHEAD, Joined, encode_message
from tests.conftest import REPO, dxa, make_tree, same_tree
from tests.proxy import Proxy, black_hole_after, corrupt_every, cut_after, flip_at, swallow_after

OPTS = TransferOptions.for_test(recursive=True)


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def proxy_factory():
    made: list[Proxy] = []

    def make(port: int, mangle=None) -> Proxy:
        p = Proxy(port, mangle)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def _big(tmp_path: Path, size: int = 3 << 20, name: str = "big.bin") -> Path:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / name).write_bytes(os.urandom(size))
    return src


# -- corruption on the wire --------------------------------------------------------------
@pytest.mark.parametrize("encrypt,chunk", [(True, 64 << 10), (False, 64 << 10), (True, 512 << 10)])
def test_flipped_bit_in_a_chunk_is_resent_and_never_written(tmp_path, server, identity, proxy_factory, encrypt, chunk):
    # 512 KiB encrypted chunks are decrypted in place (mmap): the bad bytes land in the
    # partial file and must be overwritten by the resend, never counted
    src = _big(tmp_path)
    proxy = proxy_factory(server.port, flip_at(5000))
    res = run(copy([str(src)], proxy.url("d"), identity=identity, options=TransferOptions.for_test(
        recursive=True, encrypt=encrypt, compress="off", chunk_size=chunk)))
    assert res.verified and res.chunks_retried >= 1
    assert same_tree(src, server.root / "d")


def test_a_peer_that_keeps_corrupting_is_dropped(tmp_path, server, identity, proxy_factory):
    src = _big(tmp_path)
    proxy = proxy_factory(server.port, corrupt_every(20_000))
    with pytest.raises((IntegrityError, TransferError, BrokenConnectionError)):
        res = run(copy([str(src)], proxy.url("d"), identity=identity, options=OPTS))
        assert not res.verified  # if it returns instead of raising, it must say so
        raise TransferError("incomplete")
    # nothing was renamed into place
    assert not (server.root / "d" / "big.bin").exists()


# -- dropped connections -----------------------------------------------------------------
def test_a_cut_data_connection_is_reopened_and_the_copy_completes(tmp_path, server, identity, proxy_factory):
    src = _big(tmp_path, 4 << 20)
    proxy = proxy_factory(server.port, cut_after(300_000, conn=0))
    res = run(copy([str(src)], proxy.url("d"), identity=identity, options=OPTS))
    assert proxy.cuts >= 1
    assert res.verified and res.streams_reconnected >= 1
    assert same_tree(src, server.root / "d")


FRAME_64K = FRAME_OVERHEAD + (64 << 10)  # one sealed 64 KiB chunk, uncompressed, on the wire


def _copy_within(seconds: float, *args, **kw):
    """copy(), failed (not hung) if it takes longer: this must pass with or without pytest-timeout."""
    return run(asyncio.wait_for(copy(*args, **kw), seconds))


def test_a_connection_that_dies_while_its_sender_waits_idle_for_acks_is_noticed(tmp_path, server, identity,
                                                                                proxy_factory):
    # The tail of what connection 0 carries is swallowed, then the proxy closes it once
    # the sender has been quiet for 0.5 s: the pump has written everything and waits for
    # ACKs.  Only its idle check (pumps.IDLE_CHECK) notices; the ACK timeout is set far
    # beyond the deadline so that it cannot be what rescues the copy.
    src = _big(tmp_path, 4 << 20)
    proxy = proxy_factory(server.port, swallow_after(300_000, conn=0, close_after=0.5))
    opts = TransferOptions.for_test(recursive=True, compress="off", ack_timeout=120)
    res = _copy_within(20, [str(src)], proxy.url("d"), identity=identity, options=opts)
    assert proxy.swallowed == 1 and proxy.closed_quiet == 1
    assert proxy.swallowed_bytes >= FRAME_64K
    assert res.verified and res.streams_reconnected >= 1
    assert res.chunks_retried >= proxy.swallowed_bytes // FRAME_64K  # every swallowed chunk was sent again
    assert same_tree(src, server.root / "d")


def test_a_black_holed_connection_is_given_up_after_the_ack_timeout(tmp_path, server, identity, proxy_factory):
    # Connection 0 stays open but delivers nothing either way after 300 kB: no close, no
    # error, TCP on the sender's side is content.  Only the ACK timeout can notice.
    src = _big(tmp_path, 4 << 20)
    proxy = proxy_factory(server.port, black_hole_after(300_000, conn=0))
    opts = TransferOptions.for_test(recursive=True, compress="off", ack_timeout=1.0)
    t0 = time.monotonic()
    res = _copy_within(20, [str(src)], proxy.url("d"), identity=identity, options=opts)
    assert proxy.swallowed == 1 and proxy.closed_quiet == 0 and proxy.swallowed_bytes >= FRAME_64K
    assert res.verified and res.streams_reconnected >= 1
    assert res.chunks_retried >= proxy.swallowed_bytes // FRAME_64K
    assert same_tree(src, server.root / "d")
    assert time.monotonic() - t0 >= 1.0  # it took the timeout: nothing else gave the connection away


def test_a_pull_through_a_black_hole_recovers_when_the_server_gives_the_connection_up(tmp_path, server, identity,
                                                                                      monkeypatch):
    # A pull: the server sends.  Its one data connection goes silent exactly at a frame
    # boundary, so when the server gives it up (ACK timeout, 1 s here; the server's
    # default otherwise) the client sees a clean close, not a torn frame, and must join
    # again by itself: with one stream there is no other connection to carry the chunks.
    import functools

    from agent.aio import server as server_mod
    from agent.core import SenderCore

    monkeypatch.setattr(server_mod, "SenderCore", functools.partial(SenderCore, ack_timeout=1.0))
    data = os.urandom(2 << 20)
    (server.root / "p").mkdir(parents=True)
    (server.root / "p" / "big.bin").write_bytes(data)
    joined = len(encode_message(Joined()))  # what the server sends before the first DATA frame
    proxy = Proxy(server.port, mangle_down=black_hole_after(joined + 4 * FRAME_64K, conn=0))
    try:
        opts = TransferOptions.for_test(compress="off", streams=1)
        res = _copy_within(20, [proxy.url("p/big.bin")], str(tmp_path / "got.bin"), identity=identity, options=opts)
    finally:
        proxy.close()
    assert proxy.swallowed == 1 and proxy.swallowed_bytes >= FRAME_64K
    assert res.verified and res.streams_reconnected >= 1
    assert (tmp_path / "got.bin").read_bytes() == data


def test_ack_timeout_must_be_a_sane_number():
    for bad in (-1, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            TransferOptions(ack_timeout=bad)
    assert TransferOptions().ack_timeout == 30.0 and TransferOptions(ack_timeout=0).ack_timeout == 0


# -- hostile bytes at the daemon ---------------------------------------------------------
HOSTILE = [
    b"DX" + bytes([9, 0x20]) + (10).to_bytes(4, "big") + b"x" * 10,          # unknown version
    b"DX" + bytes([1, 0x20]) + (0xFFFFFFFF).to_bytes(4, "big") + b"x" * 100,  # oversized JOIN
    b"DX" + bytes([1, 0x20]) + (50).to_bytes(4, "big") + b"\xc1" * 50,        # garbage msgpack
    b"DX" + bytes([1, 0x10]) + (200).to_bytes(4, "big") + os.urandom(200),    # DATA before JOIN
    b"DX\x01",                                                                  # truncated prefix
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",                                      # not TLS, not dxa
    os.urandom(3000),
]


def _poke(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while chunk := s.recv(4096):
                out += chunk
        except ConnectionResetError:
            pass  # closed with our unread garbage still queued: also a close
        return out


def test_malformed_frames_close_that_connection_and_the_daemon_keeps_serving(tmp_path, daemon_factory, home):
    d = daemon_factory()
    held = socket.create_connection(("127.0.0.1", d.port))  # an idle half-open peer
    for payload in HOSTILE:
        _poke(d.port, payload)  # returns once the daemon closed it
    src = make_tree(tmp_path / "src", files=10)
    r = dxa(home, "cp", "-r", "--json", str(src), d.url("ok"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["verified"] is True
    held.close()
    log = d.log_path.read_text()
    assert "unsupported frame version" in log and "refused" in log
    assert d.proc.poll() is None


def test_garbage_on_an_authenticated_control_connection(tmp_path, server, identity):
    from agent.aio.tls import client_context

    ctx = client_context(identity)
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        s.sendall(b"DX\x01\x01" + (0x7FFFFFFF).to_bytes(4, "big"))  # HELLO claiming 2 GiB
        data = b""
        try:
            while chunk := s.recv(4096):
                data += chunk
        except (ssl.SSLError, OSError):
            pass
    assert b"protocol" in data or data == b""
    src = make_tree(tmp_path / "src", files=3)
    assert run(copy([str(src)], server.url("after"), identity=identity, options=OPTS)).verified


# -- authentication ----------------------------------------------------------------------
def test_a_node_of_another_ca_is_refused_before_anything_is_written(tmp_path, server):
    other, _ = init_home(tmp_path / "other-home", "mallory")
    src = make_tree(tmp_path / "src", files=3)
    with pytest.raises(AuthenticationError):
        run(copy([str(src)], server.url("x"), identity=other, options=OPTS))
    assert not [p for p in server.root.rglob("*") if ".dxa" not in p.parts]  # only the daemon's own state


def test_a_client_without_a_certificate_is_refused(tmp_path, server):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with pytest.raises((ssl.SSLError, OSError)):
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", server.port), timeout=5), server_hostname="127.0.0.1") as s:
            s.sendall(b"DX")
            assert s.recv(10) == b""
            raise OSError("closed without a word, as it should be")


# -- nonces across a resume and a changed source -------------------------------------------
def test_no_key_nonce_pair_is_ever_used_twice_across_resume_and_changed_source(tmp_path, server, identity,
                                                                              monkeypatch):
    from agent.wire import _seal

    seen: list[tuple[bytes, bytes, bytes]] = []  # (key, nonce, digest of plaintext)
    original = _seal.Sealer.seal

    def spy(self, *a, **kw):
        sealed = original(self, *a, **kw)
        seen.append((self._key, sealed.nonce, bytes(sealed.frame[:84])))
        return sealed

    monkeypatch.setattr(_seal.Sealer, "seal", spy)
    src = _big(tmp_path, 1 << 20)
    opts = TransferOptions.for_test(recursive=True, compress="off")
    # first run is cut short: the path goes down for good after a few chunks
    proxy = Proxy(server.port)
    proxy.mangle = lambda i, off, data: (proxy.sever(), None)[1] if off > 300_000 else data
    try:
        with pytest.raises(Exception):
            run(copy([str(src)], proxy.url("n"), identity=identity,
                     options=TransferOptions.for_test(recursive=True, compress="off", streams=1, connect_timeout=0.5)))
    finally:
        proxy.close()
    first = len(seen)
    # the source changes in between (same size): it must be sent again whole
    data = bytearray((src / "big.bin").read_bytes())
    data[0] ^= 0xFF
    (src / "big.bin").write_bytes(data)
    os.utime(src / "big.bin", ns=(1_000_000_000, 1_000_000_000))
    res = run(copy([str(src)], server.url("n"), identity=identity, options=opts))
    assert res.verified and res.bytes_skipped == 0
    assert (server.root / "n" / "big.bin").read_bytes() == bytes(data)
    # an identical third run resumes nothing and sends nothing
    res = run(copy([str(src)], server.url("n"), identity=identity, options=opts))
    assert res.bytes_sent == 0
    assert first > 0 and len(seen) > first
    pairs = [(k, n) for k, n, _ in seen]
    assert len(set(pairs)) == len(pairs), "a (key, nonce) pair was used twice"


# -- kill -9 ---------------------------------------------------------------------------
def _wait_for_journal(root: Path, chunks: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Wait until the receiver's journal holds ``chunks`` verified chunks (read from outside, as SQLite allows)."""
    import sqlite3

    jpath = root / ".dxa" / "journal.sqlite"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if jpath.exists():
            try:
                with sqlite3.connect(f"file:{jpath}?mode=ro", uri=True, timeout=0.1) as db:
                    if db.execute("select count(*) from chunks").fetchone()[0] >= chunks:
                        return
            except sqlite3.Error:
                pass
        if proc.poll() is not None:
            proc.communicate()
            pytest.skip("the transfer finished before it could be killed (machine too fast for this size)")
        time.sleep(0.005)
    raise AssertionError("transfer made no progress")


def _cp_proc(home: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, DXA_HOME=str(home), PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "agent.cli.main", "cp", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


SIZE = 96 << 20
PACED = ["--rate", "300M"]  # ~37 MB/s: slow enough to be killed mid-way on any machine


@pytest.mark.slow
def test_kill_9_sender_then_rerun_sends_only_what_is_missing(tmp_path, daemon_factory, home):
    d = daemon_factory()
    src = _big(tmp_path, SIZE)
    args = ["-r", "--json", "--streams", "2", "--chunk-size", "1M", "--compress", "off", str(src), d.url("k")]
    p = _cp_proc(home, *PACED, *args)
    _wait_for_journal(d.root, 16, p)
    p.kill()
    p.communicate()
    assert not (d.root / "k" / "big.bin").exists(), "a partial file is visible under its final name"
    # as after a power loss without --fsync: a journaled chunk's bytes never reached the disk
    part = next(d.root.rglob("*.dxa-part"))
    with open(part, "r+b") as fh:
        fh.write(bytes(1 << 20))
    r = dxa(home, "cp", *args)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    # the zeroed chunk is caught by re-verification and sent again; the rest of the journal holds
    assert out["verified"] and 8 << 20 <= out["bytes_skipped"] <= SIZE - (1 << 20) and out["bytes_sent"] < SIZE
    assert out["bytes_sent"] + out["bytes_skipped"] == SIZE
    assert same_tree(src, d.root / "k")


@pytest.mark.slow
def test_kill_9_receiver_then_restart_and_rerun_resumes(tmp_path, daemon_factory, home):
    d = daemon_factory()
    src = _big(tmp_path, SIZE)
    args = ["-r", "--json", "--streams", "2", "--chunk-size", "1M", "--compress", "off", str(src)]
    p = _cp_proc(home, *PACED, *args, d.url("k"))
    _wait_for_journal(d.root, 16, p)
    d.kill()
    out, err = p.communicate(timeout=120)
    assert p.returncode != 0, "the sender must not report success when the receiver died"
    d2 = daemon_factory(d.root)
    r = dxa(home, "cp", *args, d2.url("k"))
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["verified"] and res["bytes_skipped"] >= 16 << 20
    assert res["bytes_sent"] + res["bytes_skipped"] == SIZE
    assert same_tree(src, d2.root / "k")


# -- disk full ---------------------------------------------------------------------------
@pytest.mark.root
def test_disk_full_is_a_clear_error_and_resume_works_once_space_is_freed(tmp_path, home, daemon_factory):
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a small tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount tmpfs here")
    d = None
    try:
        root = mnt / "root"
        d = daemon_factory(root, log_dir=tmp_path)
        src = tmp_path / "src"
        src.mkdir()
        (src / "a.bin").write_bytes(os.urandom(12 << 20))
        (src / "b.bin").write_bytes(os.urandom(16 << 20))
        args = ["-r", "--json", "--compress", "off", "--chunk-size", "1M", str(src), d.url("full")]
        r = dxa(home, "cp", *args)
        assert r.returncode == 5, (r.returncode, r.stdout, r.stderr, d.log_path.read_text())
        assert "space" in r.stderr.lower()
        # the journal is intact and readable
        import sqlite3

        jpath = next(root.rglob("journal.sqlite"))
        db = sqlite3.connect(jpath)
        assert db.execute("pragma integrity_check").fetchone()[0] == "ok"
        db.close()
        subprocess.run(["mount", "-o", "remount,size=96m", str(mnt)], check=True)
        r = dxa(home, "cp", *args)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["verified"] and out["bytes_skipped"] > 0
        assert same_tree(src, root / "full")
    finally:
        if d is not None:
            d.stop()
        subprocess.run(["umount", "-l", str(mnt)])


def test_hello_with_an_unknown_cipher_gets_a_protocol_error(server, identity):
    from agent.aio.tls import client_context
    from agent.wire import Hello, encode_message

    raw = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    with client_context(identity).wrap_socket(raw, server_hostname="127.0.0.1") as s:
        s.sendall(encode_message(Hello((1, 1), "push", "x", os.urandom(8), os.urandom(32), "rot13", 2, 1 << 20, "off")))
        data = b""
        with contextlib.suppress(ssl.SSLError, OSError):
            while chunk := s.recv(4096):
                data += chunk
    assert b"unknown cipher" in data
