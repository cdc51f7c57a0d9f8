"""Opening a session's data connections: a cancellation in the middle leaks no socket."""

from __future__ import annotations

import asyncio
import socket

from agent.aio.client import _open_streams


class _Conn:
    """join(0) connects at once, join(1) never does (until cancelled)."""

    def __init__(self) -> None:
        self.opened: list[socket.socket] = []
        self.peers: list[socket.socket] = []

    async def join(self, stream: int, epoch: int = 0) -> socket.socket:
        if stream == 0:
            a, b = socket.socketpair()
            self.opened.append(a)
            self.peers.append(b)
            return a
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def test_a_cancelled_open_closes_the_connections_already_made():
    conn = _Conn()

    async def main():
        task = asyncio.ensure_future(_open_streams(conn, 2))
        while not conn.opened:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.01)  # join(0) has returned; join(1) still waits
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    asyncio.run(main())
    try:
        assert [s.fileno() for s in conn.opened] == [-1]  # closed
    finally:
        for s in conn.opened + conn.peers:
            s.close()
