"""Hardening of what is read and named (issue 13): sources that change mid-copy, symlinks
that climb through other symlinks, the daemon's own state directory, remote path syntax."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path

import pytest

from agent.aio.client import copy
from agent.aio.session import Progress
from agent.config import TransferOptions
from tests.conftest import dxa


def run(coro):
    return asyncio.run(coro)


# -- 1. a source rewritten during the copy, its mtime put back ---------------------------------
SIZE = 2 << 20  # 32 chunks of 64 KiB; at 16 Mbit/s the copy takes about a second


def _rewrite_when(cond, path: Path, new: bytes, timeout: float = 30) -> threading.Thread:
    """Once ``cond()`` holds, overwrite ``path`` in place with ``new`` (same size) and put its
    mtime back, as `touch -d @OLD` would: size and mtime are then what they were when listed."""
    def work():
        deadline = time.monotonic() + timeout
        while not cond() and time.monotonic() < deadline:
            time.sleep(0.005)
        st = path.stat()
        with open(path, "r+b") as f:
            f.write(new)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    t = threading.Thread(target=work, daemon=True)
    t.start()
    return t


def test_push_of_a_source_rewritten_mid_copy_fails_that_file_and_a_rerun_sends_the_new_version(
        tmp_path, home, daemon_factory):
    old, new = os.urandom(SIZE), os.urandom(SIZE)
    src = tmp_path / "f.bin"
    src.write_bytes(old)
    root = tmp_path / "root"
    d = daemon_factory(root)
    part = root / ".f.bin.dxa-part"
    t = _rewrite_when(lambda: part.exists() and part.stat().st_size > 0, src, new)
    r = dxa(home, "cp", "--json", "-q", "--rate", "16M", "--chunk-size", "64K", str(src), d.url("f.bin"))
    t.join(30)
    out = json.loads(r.stdout)
    assert r.returncode == 1, r.stderr
    assert not out["verified"] and out["files_failed"] == 1
    assert any("source changed during transfer" in e for e in out["errors"]), out["errors"]
    assert not (root / "f.bin").exists()  # never a mixed file under its final name
    r = dxa(home, "cp", "--json", "-q", "--chunk-size", "64K", str(src), d.url("f.bin"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["verified"] and (root / "f.bin").read_bytes() == new


def test_pull_of_a_source_rewritten_mid_copy_on_the_server_fails_that_file(tmp_path, server, identity):
    old, new = os.urandom(SIZE), os.urandom(SIZE)
    src = server.root / "f.bin"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(old)
    dest = tmp_path / "out.bin"
    progress = Progress()
    t = _rewrite_when(lambda: progress.bytes_done > 0, src, new)
    opts = TransferOptions.for_test(rate=16_000_000)
    res = run(copy([server.url("f.bin")], str(dest), identity=identity, options=opts, progress=progress))
    t.join(30)
    assert not res.verified and res.files_failed == 1
    assert any("source changed during transfer" in e for e in res.errors), res.errors
    assert not dest.exists()
    res = run(copy([server.url("f.bin")], str(dest), identity=identity, options=TransferOptions.for_test()))
    assert res.verified and dest.read_bytes() == new


def test_done_carries_why_the_sender_gave_up_on_a_file():
    from agent.errors import RemoteProtocolError
    from agent.wire import Done, FrameType, decode_message, encode_control, encode_message
    from agent.wire._codec import PREFIX_LEN

    for msg in (Done(), Done([(3, "source changed during transfer")])):
        frame = encode_message(msg)
        assert decode_message(FrameType.DONE, frame[PREFIX_LEN:]) == msg
    assert encode_message(Done()) == encode_control(FrameType.DONE, {})  # unchanged for older peers
    for bad in ({"failed": [[1]]}, {"failed": [["x", "r"]]}, {"failed": [[1, 2]]}, {"failed": 5}):
        with pytest.raises(RemoteProtocolError):
            decode_message(FrameType.DONE, encode_control(FrameType.DONE, bad)[PREFIX_LEN:])
