"""Pacing wired into real transfers on loopback: push, pull (rate in HELLO), a rate change
mid-flight, and the adapter's locking and per-socket kernel pacing.

Only loose bounds here (a paced copy cannot be faster than its rate allows); the real
accuracy is measured by bench/bench_pacing.py, not asserted by a timed test.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time

import pytest

from agent.aio.client import copy
from agent.aio.pacing import SHARE_HEADROOM, TCP_NOTSENT_LOWAT, SharedPacer
from agent.aio.pumps import SO_MAX_PACING_RATE
from agent.config import TransferOptions
from agent.errors import ConfigError


def run(coro):
    return asyncio.run(coro)


def test_push_at_a_rate_takes_at_least_size_over_rate(tmp_path, server, identity):
    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom(600_000))
    opts = TransferOptions.for_test(rate=4_000_000, compress="off")  # 500 kB/s: >= 1.2 s minus 20 ms of burst
    t0 = time.monotonic()
    res = run(copy([str(src)], server.url("a.bin"), identity=identity, options=opts))
    assert res.verified and (server.root / "a.bin").read_bytes() == src.read_bytes()
    assert time.monotonic() - t0 >= 1.1


def test_pull_is_paced_by_the_server_through_hello(tmp_path, server, identity):
    (server.root / "m").mkdir(parents=True)
    (server.root / "m" / "b.bin").write_bytes(os.urandom(600_000))
    out = tmp_path / "b.bin"
    opts = TransferOptions.for_test(rate=4_000_000, compress="off")
    t0 = time.monotonic()
    res = run(copy([server.url("m/b.bin")], str(out), identity=identity, options=opts))
    assert res.verified and out.read_bytes() == (server.root / "m" / "b.bin").read_bytes()
    assert time.monotonic() - t0 >= 1.1


def test_rate_change_mid_flight_takes_effect_at_once(tmp_path, server, identity):
    src = tmp_path / "c.bin"
    src.write_bytes(os.urandom(4_000_000))
    pacer = SharedPacer(4_000_000)  # 500 kB/s: 8 s for the file

    async def go():
        task = asyncio.ensure_future(copy([str(src)], server.url("c.bin"), identity=identity,
                                          options=TransferOptions.for_test(compress="off"), pacer=pacer))
        await asyncio.sleep(0.5)
        assert not task.done()
        pacer.set_rate(0)  # unlimited: the pumps waiting for credit go at once
        return await task

    t0 = time.monotonic()
    res = run(go())
    assert res.verified and (server.root / "c.bin").read_bytes() == src.read_bytes()
    assert time.monotonic() - t0 < 6.0  # well under the 8 s the old rate would take, even on a loaded machine


def test_a_pacer_is_for_pushes_only(tmp_path, server, identity):
    with pytest.raises(ConfigError):
        run(copy([server.url("x")], str(tmp_path), identity=identity, options=TransferOptions.for_test(),
                 pacer=SharedPacer(1e6)))


def _pacing(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE)


def test_every_socket_gets_its_fair_share_times_headroom_and_follows_rate_changes():
    socks, pairs = [], []
    try:
        lsock = socket.create_server(("127.0.0.1", 0))
        for _ in range(4):
            c = socket.create_connection(lsock.getsockname())
            s, _ = lsock.accept()
            socks.append(c)
            pairs.append(s)
        p = SharedPacer(800e6)  # 100 MB/s
        for s in socks:
            p.attach(s)
        share = int(100e6 / 4 * SHARE_HEADROOM)
        assert p.share() == share
        assert all(_pacing(s) == share for s in socks)
        p.set_rate(400e6)
        assert all(_pacing(s) == int(50e6 / 4 * SHARE_HEADROOM) for s in socks)
        p.detach(socks[3])  # a lost stream: the others take its share
        assert all(_pacing(s) == int(50e6 / 3 * SHARE_HEADROOM) for s in socks[:3])
        p.set_busy(socks[:2])  # the end of a transfer: only two streams have work left
        assert all(_pacing(s) == int(50e6 / 2 * SHARE_HEADROOM) for s in socks[:2])
        p.set_busy([])
        assert all(_pacing(s) == int(50e6 / 3 * SHARE_HEADROOM) for s in socks[:3])
        # a paced socket keeps little unsent data: what the bucket grants leaves the host
        assert all(s.getsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT) == p.quantum for s in socks[:3])
        p.set_rate(0)
        assert all(_pacing(s) in (-1, 0xFFFFFFFF) for s in socks[:3])  # unpaced again
        with pytest.raises(ConfigError):
            p.set_rate(-5)
    finally:
        for s in socks + pairs:
            s.close()
        lsock.close()


def test_set_rate_from_another_thread_wakes_a_waiting_pump():
    p = SharedPacer(8_000)  # 1 kB/s: 100 kB would take 100 s
    done = threading.Event()

    def pump():
        p.acquire(100_000)
        done.set()

    threading.Thread(target=pump, daemon=True).start()
    assert not done.wait(0.2)
    p.set_rate(8e9)
    assert done.wait(5)


def test_release_wakes_waiting_pumps_and_the_pacer_stays_usable():
    p = SharedPacer(8_000)
    done = threading.Event()
    threading.Thread(target=lambda: (p.acquire(1_000_000), done.set()), daemon=True).start()
    assert not done.wait(0.1)
    p.release()  # the session ended
    assert done.wait(5)
    # handed to the next transfer (a resume), it still paces: 1 MB more at 1 kB/s waits
    again = threading.Event()
    threading.Thread(target=lambda: (p.acquire(1_000), again.set()), daemon=True).start()
    assert not again.wait(0.2)
    p.release()
    assert again.wait(5)


def test_unlimited_pacer_sends_in_one_call():
    class Counting:
        def __init__(self, sock):
            self.sock, self.calls = sock, 0

        def sendall(self, data):
            self.calls += 1
            self.sock.sendall(data)

    a, b = socket.socketpair()
    try:
        counting = Counting(a)
        SharedPacer(0).sendall(counting, b"x" * 1000)
        assert counting.calls == 1 and b.recv(2000) == b"x" * 1000
        p = SharedPacer(8e9)
        p.sendall(a, memoryview(bytearray(b"y" * 100_000)))
        got = b""
        while len(got) < 100_000:
            got += b.recv(200_000)
        assert got == b"y" * 100_000
    finally:
        a.close()
        b.close()
