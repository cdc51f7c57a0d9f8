"""The receiving store under hostile manifests and unlucky operators: descriptors bounded per
session, part files never opened through a planted name, special mode bits dropped, what an
aborted session created cleaned up, a chmod alone propagated, and one writer per destination
across processes (docs/ARCHITECTURE.md, "Receiving store")."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.aio.client import copy
from agent.config import TransferOptions
from agent.store.journal import Journal
from agent.store.receiving import ReceiverStore
from agent.store.safepath import SafeRoot
from agent.wire import ACTION_RESUME, ACTION_SEND, ManifestEntry, chunk_digest
from tests.conftest import REPO, InProcessServer, dxa, same_tree

OPTS = TransferOptions.for_test(recursive=True)
CHUNK = 4096


def run(coro):
    return asyncio.run(coro)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class _Store:
    """A ReceiverStore on ``tmp/root`` with its journal in ``tmp/state`` (re-openable, as a re-run)."""

    def __init__(self, tmp: Path, **kw) -> None:
        self.root_path = tmp / "root"
        self.journal = Journal(str(tmp / "state" / "journal.sqlite"), ballast=0)
        self.kw = kw
        self.roots: list[SafeRoot] = []

    def new(self) -> ReceiverStore:
        root = SafeRoot(str(self.root_path))
        self.roots.append(root)
        return ReceiverStore(root, self.journal, **self.kw)

    def close(self) -> None:
        for r in self.roots:
            r.close()
        self.journal.close()


def _entry(i: int, rel: str, size: int, mode: int = 0o644) -> ManifestEntry:
    return ManifestEntry(i, rel, "f", size, mode, 1_700_000_000_000_000_000 + i, CHUNK)


def _parts(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.dxa-part"))


# -- 1. descriptors per session ------------------------------------------------------------------
def test_a_manifest_of_30000_files_holds_no_more_descriptors_than_the_cap(tmp_path):
    s = _Store(tmp_path, max_open=16)
    store = s.new()
    before = _fds()
    entries = [_entry(i, f"d/f{i:05d}", 3 * CHUNK) for i in range(30_000)]
    plan = store.plan(entries)
    assert all(p.action == ACTION_SEND for p in plan), {p.reason for p in plan if p.action != ACTION_SEND}
    assert _fds() - before <= 2, "planning holds a descriptor per file"  # the directory d/ only
    peak = 0
    for e in entries[:400]:  # chunks of many files interleaved, as streams deliver them
        store.write_chunk(e.file_id, CHUNK, os.urandom(CHUNK))
        peak = max(peak, _fds() - before)
    assert store.open_descriptors <= 16 and peak <= 16 + 2
    for e in entries[:20]:  # a file evicted from the cache is re-opened, the same file, and finished
        for c in (0, 2):
            store.write_chunk(e.file_id, c * CHUNK, bytes([c]) * CHUNK)
        store.finalize(e)
        assert (s.root_path / e.relpath).stat().st_size == 3 * CHUNK
    store.close()
    assert _fds() - before <= 2
    s.close()


def _serve_with_fd_limit(home: Path, root: Path, log: Path, limit: int) -> tuple[subprocess.Popen, int]:
    def limit_fds():
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    port_file = log.parent / "port"
    env = dict(os.environ, DXA_HOME=str(home), PYTHONPATH=str(REPO))
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli.main", "serve", "--listen", "127.0.0.1:0",
                                 "--root", str(root), "--port-file", str(port_file)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=limit_fds)
    deadline = time.monotonic() + 20
    while not port_file.exists() or not port_file.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"daemon did not start: {log.read_text()}")
        time.sleep(0.05)
    return proc, int(port_file.read_text())


def test_a_3000_file_push_into_a_daemon_with_512_descriptors(tmp_path, home):
    src = tmp_path / "src"
    for d in range(30):
        (src / f"d{d:02d}").mkdir(parents=True)
        for i in range(100):
            (src / f"d{d:02d}" / f"f{i:03d}").write_bytes(os.urandom(64 + i))
    proc, port = _serve_with_fd_limit(home, tmp_path / "root", tmp_path / "daemon.log", 512)
    try:
        r = dxa(home, "cp", "-r", "--json", str(src), f"dxa://127.0.0.1:{port}/many", timeout=110)
        assert r.returncode == 0, r.stderr[-2000:] + (tmp_path / "daemon.log").read_text()[-2000:]
        out = json.loads(r.stdout)
        assert out["verified"] and out["files_failed"] == 0
        assert same_tree(src, tmp_path / "root" / "many")
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(10)


# -- 2. part files are never opened through a planted name ---------------------------------------
def test_a_part_file_hard_linked_outside_the_root_is_never_written_through(tmp_path, server, identity):
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious\n")
    (server.root / "in").mkdir(parents=True)
    os.link(outside, server.root / "in" / ".f.bin.dxa-part")
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(300_000))
    res = run(copy([str(src)], server.url("in/f.bin"), identity=identity, options=OPTS))
    assert res.verified
    assert outside.read_bytes() == b"precious\n" and outside.stat().st_nlink == 1
    assert (server.root / "in" / "f.bin").read_bytes() == src.read_bytes()
    assert not _parts(server.root)


def test_a_resumed_part_file_swapped_for_a_hard_link_is_discarded(tmp_path):
    """The journal says the part file holds chunk 0; someone swaps it for a link to an outside
    file that holds the same bytes (so re-verification alone would accept it)."""
    s = _Store(tmp_path)
    data = os.urandom(3 * CHUNK)
    e = _entry(1, "f.bin", len(data))
    store = s.new()
    assert store.plan([e])[0].action == ACTION_SEND
    store.write_chunk(1, 0, data[:CHUNK])
    store.record(1, 0, chunk_digest(data[:CHUNK]))
    store.close()  # an aborted session: the journaled part file stays for the re-run
    part = s.root_path / ".f.bin.dxa-part"
    outside = tmp_path / "outside"
    outside.write_bytes(data[:CHUNK] + b"precious")
    part.unlink()
    os.link(outside, part)
    store = s.new()
    [p] = store.plan([e])
    assert p.action == ACTION_SEND and not p.have
    for c in range(3):
        store.write_chunk(1, c * CHUNK, data[c * CHUNK:(c + 1) * CHUNK])
    store.finalize(e)
    store.close()
    assert outside.read_bytes() == data[:CHUNK] + b"precious"
    assert (s.root_path / "f.bin").read_bytes() == data
    s.close()


# -- 3. setuid, setgid and sticky bits ------------------------------------------------------------
def _special_tree(src: Path) -> Path:
    (src / "shared").mkdir(parents=True)
    (src / "tool").write_bytes(b"#!/bin/sh\n")
    os.chmod(src / "tool", 0o6755)
    (src / "shared" / "x").write_bytes(b"x")
    os.chmod(src / "shared", 0o3775)
    return src


def _modes(top: Path) -> tuple[int, int]:
    return stat.S_IMODE((top / "tool").stat().st_mode), stat.S_IMODE((top / "shared").stat().st_mode)


@pytest.mark.parametrize("keep", [False, True])
def test_a_push_drops_setuid_setgid_and_sticky_bits_unless_the_daemon_keeps_them(tmp_path, identity, keep):
    src = _special_tree(tmp_path / "src")
    srv = InProcessServer(tmp_path / "root", identity, keep_special_bits=keep)
    try:
        assert run(copy([str(src)], srv.url("t"), identity=identity, options=OPTS)).verified
    finally:
        srv.close()
    assert _modes(tmp_path / "root" / "t") == ((0o6755, 0o3775) if keep else (0o755, 0o775))


@pytest.mark.parametrize("keep", [False, True])
def test_a_pull_drops_setuid_setgid_and_sticky_bits_unless_asked(tmp_path, server, identity, keep):
    _special_tree(server.root / "pub")
    out = tmp_path / "out"
    out.mkdir()
    opts = TransferOptions.for_test(recursive=True, keep_special_bits=keep)
    assert run(copy([server.url("pub")], str(out / "pub"), identity=identity, options=opts)).verified
    assert _modes(out / "pub") == ((0o6755, 0o3775) if keep else (0o755, 0o775))


# -- 4. what an aborted session created ----------------------------------------------------------
def test_a_session_ended_after_its_plan_leaves_no_part_files(tmp_path):
    s = _Store(tmp_path)
    store = s.new()
    entries = [_entry(i, f"d/f{i:03d}", (1 + i % 3) * CHUNK) for i in range(300)]
    store.plan(entries)
    store.close()
    assert not _parts(s.root_path)
    assert all(s.journal.lookup(str(s.root_path / e.relpath)) is None for e in entries)
    s.close()


def test_a_session_aborted_midway_keeps_only_part_files_with_journaled_chunks(tmp_path):
    s = _Store(tmp_path)
    store = s.new()
    multi = [_entry(i, f"m{i}", 3 * CHUNK) for i in range(10)]
    single = [_entry(10 + i, f"s{i}", CHUNK) for i in range(5)]
    store.plan(multi + single)
    blocks = {e.file_id: os.urandom(CHUNK) for e in multi + single}
    for e in multi + single:  # every file gets data; only m0..m4 get their chunk journaled
        store.write_chunk(e.file_id, 0, blocks[e.file_id])
    for e in multi[:5]:
        store.record(e.file_id, 0, chunk_digest(blocks[e.file_id]))
    store.flush()
    store.close()
    assert _parts(s.root_path) == [f".m{i}.dxa-part" for i in range(5)]
    again = s.new().plan(multi)
    assert [p.action for p in again] == [ACTION_RESUME] * 5 + [ACTION_SEND] * 5
    assert all(p.have == [(0, chunk_digest(blocks[p.file_id]))] for p in again[:5])
    s.close()


# -- 5. a chmod alone ----------------------------------------------------------------------------
def test_a_chmod_alone_reaches_a_file_already_complete_on_push_and_pull(tmp_path, server, identity):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.bin").write_bytes(os.urandom(70_000))
    os.chmod(src / "f.bin", 0o644)
    assert run(copy([str(src)], server.url("c"), identity=identity, options=OPTS)).verified
    dst = server.root / "c" / "f.bin"
    for mode, arrives in ((0o600, 0o600), (0o4750, 0o750)):
        os.chmod(src / "f.bin", mode)
        res = run(copy([str(src)], server.url("c"), identity=identity, options=OPTS))
        assert res.verified and res.bytes_sent == 0
        assert stat.S_IMODE(dst.stat().st_mode) == arrives
    out = tmp_path / "out"
    out.mkdir()
    assert run(copy([server.url("c")], str(out), identity=identity, options=OPTS)).verified
    os.chmod(dst, 0o640)
    res = run(copy([server.url("c")], str(out), identity=identity, options=OPTS))
    assert res.verified and res.bytes_sent == 0
    assert stat.S_IMODE((out / "c" / "f.bin").stat().st_mode) == 0o640


# -- 6. one writer per destination, across processes ---------------------------------------------
def test_two_pulls_to_one_path_never_report_content_they_did_not_write(tmp_path, server, home):
    (server.root / "a.bin").write_bytes(os.urandom(8 << 20))
    (server.root / "b.bin").write_bytes(os.urandom(8 << 20))
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, DXA_HOME=str(home), PYTHONPATH=str(REPO))

    def pull(name: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "agent.cli.main", "cp", "--json", "--rate", "16M",
                                 "--chunk-size", "1M", "--compress", "off", server.url(name), str(out / "f.bin")],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = pull("a.bin")
    deadline = time.monotonic() + 60
    while not (out / ".f.bin.dxa-part").exists():  # the first pull is writing
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.02)
    second = pull("b.bin")
    out2, err2 = second.communicate(timeout=100)
    out1, err1 = first.communicate(timeout=100)
    assert first.returncode == 0, err1
    assert json.loads(out1)["verified"]
    assert second.returncode != 0
    assert not json.loads(out2)["verified"]
    assert "being written by another dxa process" in err2 + out2
    assert (out / "f.bin").read_bytes() == (server.root / "a.bin").read_bytes()
