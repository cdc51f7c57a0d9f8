"""ReceivePump's write-behind: a chunk is reported verified only once written, every write
in flight finishes before the pump reports the end of its connection, and nothing more is
written after a write failed."""

from __future__ import annotations

import os
import queue
import socket
import threading
import time

import pytest

from agent.aio.pumps import ReceivePump
from agent.errors import DiskFullError
from agent.wire import Opener, Sealer, chunk_digest

KEY, SID = os.urandom(32), os.urandom(8)
CHUNK = 64 << 10


def frames(n: int, cipher: str) -> tuple[bytes, list[bytes]]:
    sealer = Sealer(KEY, SID, cipher)
    chunks = [os.urandom(CHUNK) for _ in range(n)]
    wire = b"".join(bytes(sealer.seal(1, i, i * CHUNK, c, chunk_digest(c)).frame) for i, c in enumerate(chunks))
    return wire, chunks


def run_pump(wire: bytes, cipher: str, write) -> list[tuple]:
    a, b = socket.socketpair()
    results: queue.SimpleQueue = queue.SimpleQueue()

    def post(fn, *args):
        fn(*args)

    def on_result(pump, kind, hdr, arg, wire_bytes):
        results.put((kind, None if hdr is None else hdr.chunk))

    pump = ReceivePump(0, b, Opener(KEY, SID, cipher), lambda hdr: None, write, 1 << 20, post, on_result)
    pump.start()
    def send():
        try:
            a.sendall(wire)
        except OSError:  # the pump stopped reading (a failed write)
            pass
        finally:
            a.close()

    threading.Thread(target=send, daemon=True).start()
    pump.join(20)
    assert not pump.is_alive()
    out = []
    while not results.empty():
        out.append(results.get())
    return out


@pytest.mark.parametrize("cipher", ["aes256gcm", "none"])
def test_verified_only_after_the_write_and_all_before_eof(cipher):
    wire, chunks = frames(12, cipher)
    written: dict[int, bytes] = {}

    def slow_write(file_id, offset, data):
        time.sleep(0.01)  # a device slower than the socket: writes are still in flight at EOF
        written[offset // CHUNK] = bytes(data)

    out = run_pump(wire, cipher, slow_write)
    assert out[-1] == ("eof", None)
    assert sorted(c for k, c in out[:-1] if k == "verified") == list(range(12))
    assert written == dict(enumerate(chunks))  # no buffer reused while its write was pending


def test_nothing_written_after_a_failed_write():
    wire, _ = frames(12, "aes256gcm")
    calls = []

    def failing_write(file_id, offset, data):
        calls.append(offset // CHUNK)
        if len(calls) == 3:
            raise DiskFullError(28, "no space left")

    out = run_pump(wire, "aes256gcm", failing_write)
    kinds = [k for k, _ in out]
    assert kinds.count("storage") == 1 and kinds.count("verified") == 2
    assert calls == [0, 1, 2]
    assert kinds[-1] in ("eof", "broken")
