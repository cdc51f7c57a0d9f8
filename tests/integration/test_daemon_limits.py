"""A daemon that stays up: failed accepts, connection and session limits, idle sessions, and
what the daemon keeps (docs/HARDENING.md, "Daemon limits")."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.aio.client import copy
from agent.aio.control import ControlChannel
from agent.aio.tls import client_context
from agent.config import TransferOptions
from agent.wire import SUPPORTED_VERSIONS, CONTROL_MAX, ErrorMsg, Hello, Welcome, check_prefix, decode_message
from agent.wire import encode_message
from tests.conftest import REPO, InProcessServer, dxa

OPTS = TransferOptions.for_test()


def run(coro):
    return asyncio.run(coro)


class _Daemon:
    """``dxa serve`` as a process, with extra flags and optionally a low descriptor limit."""

    def __init__(self, home: Path, root: Path, *flags: str, nofile: int | None = None) -> None:
        self.log_path = root.parent / "daemon.log"
        port_file = root.parent / f"port-{time.monotonic_ns()}"
        env = dict(os.environ, DXA_HOME=str(home), PYTHONPATH=str(REPO))

        def limit() -> None:  # soft and hard: dxa serve raises its soft limit to the hard one
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli.main", "serve", "--listen", "127.0.0.1:0", "--root", str(root),
             "--port-file", str(port_file), *flags], env=env, stdout=self._log, stderr=self._log,
            preexec_fn=limit if nofile else None)
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start: {self.log_path.read_text()}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())

    def url(self, path: str = "") -> str:
        return f"dxa://127.0.0.1:{self.port}/{path}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


@pytest.fixture
def daemons():
    started: list[_Daemon] = []

    def make(*args, **kw) -> _Daemon:
        d = _Daemon(*args, **kw)
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop()


def _flood(port: int, n: int, first: bytes = b"") -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        if first:
            s.sendall(first)
        out.append(s)
    return out


def _closed_by_peer(socks: list[socket.socket], within: float, enough: int | None = None) -> int:
    """How many of ``socks`` the server closed (EOF or reset) within ``within`` seconds
    (or as soon as ``enough`` of them are)."""
    deadline = time.monotonic() + within
    closed: set[int] = set()
    while time.monotonic() < deadline and len(closed) < (enough or len(socks)):
        for i, s in enumerate(socks):
            if i in closed:
                continue
            s.setblocking(False)
            try:
                if s.recv(4096) == b"":
                    closed.add(i)
            except BlockingIOError:
                pass
            except OSError:
                closed.add(i)
        time.sleep(0.05)
    return len(closed)


# -- 1. a failed accept is waited out ---------------------------------------------------

def test_emfile_from_a_flood_does_not_stop_the_daemon_accepting(tmp_path, home, daemons):
    """A real daemon with 64 descriptors, flooded with plain TCP connections until accept
    fails with EMFILE: once the flood is gone, ``dxa cp`` works (before: the accept loop had
    ended silently and the copy timed out)."""
    root = tmp_path / "root"
    root.mkdir()
    d = daemons(home, root, nofile=64)
    flood = _flood(d.port, 120)
    deadline = time.monotonic() + 20
    while "EMFILE" not in d.log():
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.05)
    for s in flood:
        s.close()
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(300_000))
    res = dxa(home, "cp", str(src), d.url("after-flood.bin"), "--json", timeout=60)
    assert res.returncode == 0, (res.stderr, d.log())
    assert (root / "after-flood.bin").read_bytes() == src.read_bytes()
    assert d.proc.poll() is None
    assert "accept failed (EMFILE" in d.log()


def test_an_accept_that_raises_is_logged_and_retried(tmp_path, identity, caplog):
    """In process: ``sock_accept`` raises OSError(EMFILE) once; the next copy still goes through."""
    srv = InProcessServer(tmp_path / "root", identity)
    try:
        real = srv.loop.sock_accept
        raised = []

        async def failing_once(sock):
            if not raised:
                raised.append(1)
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            return await real(sock)

        srv.loop.sock_accept = failing_once  # the accept loop's next call (after this first copy)
        (tmp_path / "f").write_bytes(os.urandom(100_000))
        with caplog.at_level(logging.ERROR, logger="agent.aio.server"):
            first = run(copy([str(tmp_path / "f")], srv.url("a"), identity=identity, options=OPTS))
            second = run(copy([str(tmp_path / "f")], srv.url("b"), identity=identity, options=OPTS))
        assert first.verified and second.verified and raised
        assert srv.server.accept_errors == 1
        assert any("accept failed (EMFILE" in r.getMessage() for r in caplog.records)
    finally:
        srv.close()


# -- 2. connection and session limits ------------------------------------------------------

async def _hello(identity, port: int, path: str) -> tuple[object, ControlChannel]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(identity),
                                                   limit=CONTROL_MAX)
    ctrl = ControlChannel(reader, writer)
    await ctrl.send(Hello(SUPPORTED_VERSIONS, "push", path, os.urandom(8), os.urandom(32), "aes256gcm", 1,
                          65536, "off"))
    return await asyncio.wait_for(ctrl.recv(allow_error=True), 10), ctrl


def test_one_peer_with_64_idle_sessions_does_not_lock_out_another(tmp_path, home, identity):
    from agent.store.pki import issue_cert

    other = issue_cert(home, "node-b", tmp_path / "home-b")
    srv = InProcessServer(tmp_path / "root", identity)
    try:
        async def scenario():
            replies = await asyncio.gather(*(_hello(identity, srv.port, f"idle/{i}") for i in range(64)))
            try:
                welcomed = sum(isinstance(m, Welcome) for m, _ in replies)
                busy = [m for m, _ in replies if isinstance(m, ErrorMsg)]
                (tmp_path / "f").write_bytes(os.urandom(50_000))
                res = await copy([str(tmp_path / "f")], srv.url("from-b"), identity=other, options=OPTS)
                return welcomed, busy, res
            finally:
                for _, c in replies:
                    await c.close()

        welcomed, busy, res = run(scenario())
        assert welcomed == 32 and len(busy) == 32  # max_sessions_per_peer's default
        assert all("too many sessions of 'node-a'" in m.message for m in busy)
        assert res.verified
    finally:
        srv.close()


def test_a_stopped_client_times_out_and_releases_its_destination(tmp_path, home, daemons):
    """``kill -STOP`` a pushing ``dxa cp``: after --idle-timeout its session ends, and a new
    copy to the same destination is not refused as "being received" (before: forever)."""
    root = tmp_path / "root"
    root.mkdir()
    d = daemons(home, root, "--idle-timeout", "1.5")
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(4 << 20))
    env = dict(os.environ, DXA_HOME=str(home), PYTHONPATH=str(REPO))
    slow = subprocess.Popen([sys.executable, "-m", "agent.cli.main", "cp", str(src), d.url("dst.bin"),
                             "--rate", "2M", "--streams", "1", "--chunk-size", "64K", "-q"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not list(root.glob(".dst.bin*dxa-part")) or "push start" not in d.log():
            assert time.monotonic() < deadline and slow.poll() is None, d.log()
            time.sleep(0.05)
        time.sleep(0.3)  # some chunks on their way
        slow.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 20
        while "idle for" not in d.log():
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.1)
        res = dxa(home, "cp", str(src), d.url("dst.bin"), "--json", timeout=60)
        assert res.returncode == 0, (res.stdout, res.stderr, d.log())
        assert (root / "dst.bin").read_bytes() == src.read_bytes()
    finally:
        slow.kill()
        slow.wait(10)


def test_500_idle_connections_cost_little_and_do_not_block_a_copy(tmp_path, home, daemons, capsys):
    """250 silent TCP connections and 250 that started a TLS record and stopped: the excess
    over the caps is closed at once, a real copy goes through, and RSS stays bounded."""
    root = tmp_path / "root"
    root.mkdir()
    d = daemons(home, root, "--handshake-timeout", "60")  # nothing here is closed for its age
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(1 << 20))
    assert dxa(home, "cp", str(src), d.url("warm.bin"), timeout=60).returncode == 0  # imports, TLS, journal
    before = d.rss_kib()
    silent = _flood(d.port, 250)
    tls = _flood(d.port, 250, first=b"\x16\x03\x01")  # a TLS record header, then nothing
    time.sleep(0.5)
    during = d.rss_kib()
    closed = _closed_by_peer(silent + tls, 15.0, enough=500 - 128)
    t0 = time.monotonic()
    res = dxa(home, "cp", str(src), d.url("during-flood.bin"), "--json", timeout=60)
    took = time.monotonic() - t0
    after = d.rss_kib()
    still_open = 500 - _closed_by_peer(silent + tls, 0.2)
    for s in silent + tls:
        s.close()
    with capsys.disabled():
        print(f"\n[500 idle connections] RSS before {before} KiB, during {during} KiB, after copy {after} KiB; "
              f"closed by the daemon {closed}/500 ({500 - still_open} after the copy); copy took {took:.2f} s")
    assert res.returncode == 0, (res.stderr, d.log())
    assert (root / "during-flood.bin").read_bytes() == src.read_bytes()
    assert closed >= 500 - 128  # max_unauthenticated's default: the rest were closed, not held
    assert still_open <= 128
    assert after - before < 64 * 1024, (before, during, after)


# -- 4. a JOIN whose first segment holds one byte --------------------------------------------

def test_a_join_sent_one_byte_first_is_still_a_data_connection(tmp_path, server, identity, monkeypatch):
    """Every data connection of a real copy sends "D", waits, then the rest of its JOIN: the
    server waits for the second byte instead of taking the connection for TLS."""
    real = socket.create_connection

    class OneByteFirst(socket.socket):
        _split = True

        def sendall(self, data, *args):
            if self._split and len(data) > 1:
                self._split = False
                super().sendall(data[:1], *args)
                time.sleep(0.2)
                data = data[1:]
            return super().sendall(data, *args)

    def create_connection(*a, **kw):
        s = real(*a, **kw)
        t = s.gettimeout()
        out = OneByteFirst(s.family, s.type, s.proto, fileno=s.detach())
        out.settimeout(t)
        out.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # "D" goes out in a segment of its own
        return out

    monkeypatch.setattr(socket, "create_connection", create_connection)
    (tmp_path / "f").write_bytes(os.urandom(200_000))
    res = run(copy([str(tmp_path / "f")], server.url("one-byte"), identity=identity, options=OPTS))
    assert res.verified and res.streams_reconnected == 0
    assert (server.root / "one-byte").read_bytes() == (tmp_path / "f").read_bytes()


def test_a_lone_d_then_a_bad_join_is_answered_as_data(server):
    """Classification alone: "D", a pause, then "X" and a malformed frame: the answer is the
    data path's ERROR frame, not a TLS failure."""
    s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        s.sendall(b"D")
        time.sleep(0.3)
        s.sendall(b"X" + b"\x00" * 30)
        data = b""
        while len(data) < 8:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        ftype, length = check_prefix(data[:8], 4096)
        while len(data) < 8 + length:
            data += s.recv(4096)
        msg = decode_message(ftype, data[8:8 + length])
        assert isinstance(msg, ErrorMsg) and msg.code == "join"
    finally:
        s.close()


# -- 3. what the daemon keeps ----------------------------------------------------------------

def test_completed_sessions_are_a_bounded_ring_with_short_error_lists(tmp_path, server, identity):
    from agent.aio import server as server_mod
    from agent.aio.session import SessionStats

    srv = server.server
    # a real session first, so the record's shape is the real one
    (tmp_path / "f").write_bytes(b"x" * 1000)
    assert run(copy([str(tmp_path / "f")], server.url("f"), identity=identity, options=OPTS)).verified
    deadline = time.monotonic() + 10
    while not srv.completed:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    rec = srv.completed[-1]
    assert rec["outcome"] == "ok" and rec["errors_total"] == 0 and isinstance(rec["stats"], SessionStats)
    # many sessions, each with many refused files: what is kept stays small
    assert srv.completed.maxlen == server_mod.COMPLETED_KEPT


def test_many_refusing_sessions_keep_little(tmp_path, server, identity):
    """A tree with 300 files onto a destination where each is refused (a directory is in the
    way of every file), three times: ``completed`` keeps at most 20 errors per session and the
    whole count."""
    from agent.aio.server import COMPLETED_ERRORS_KEPT

    src = tmp_path / "src"
    src.mkdir()
    for i in range(300):
        (src / f"f{i}").write_bytes(b"y")
        (server.root / "t" / f"f{i}" / "in-the-way").mkdir(parents=True)
    opts = TransferOptions.for_test(recursive=True)
    for _ in range(3):
        res = run(copy([str(src)], server.url("t"), identity=identity, options=opts))
        assert not res.verified
    deadline = time.monotonic() + 10
    while len(server.server.completed) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    for rec in server.server.completed:
        assert rec["errors_total"] >= 300
        assert len(rec["stats"].errors) == COMPLETED_ERRORS_KEPT


# -- 5. the log says why a handshake failed ----------------------------------------------------

def test_a_failed_handshake_is_logged_with_a_reason(server, caplog):
    """A TLS ClientHello that never completes: the timeout's text is empty, so the log must
    name the exception (before: "TLS handshake with 127.0.0.1 failed: " and nothing)."""
    import agent.aio.server as server_mod

    srv = server.server
    srv.config.__dict__["handshake_timeout"] = 0.5  # frozen dataclass: this test only
    s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    try:
        with caplog.at_level(logging.WARNING, logger=server_mod.__name__):
            s.sendall(b"\x16\x03\x01")
            deadline = time.monotonic() + 10
            while not any("TLS handshake with" in r.getMessage() for r in caplog.records):
                assert time.monotonic() < deadline
                time.sleep(0.05)
        line = next(r.getMessage() for r in caplog.records if "TLS handshake with" in r.getMessage())
        assert line.split("failed: ", 1)[1].strip(), line
        assert "TimeoutError" in line
    finally:
        s.close()
