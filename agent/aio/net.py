"""Socket helpers shared by the client and the server (the only socket code outside pumps)."""

from __future__ import annotations

import asyncio
import socket

from agent.errors import BrokenConnectionError

__all__ = ["set_keepalive", "tune_data_socket", "recv_exact_async", "wait_readable"]

TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)


def set_keepalive(sock: socket.socket) -> None:
    """TCP keepalive (first probe after 30 s idle, then every 10 s, 3 lost: gone) and
    ``TCP_USER_TIMEOUT`` 60 s: a peer whose host died or whose path vanished is noticed by
    the kernel, on a control connection as on a data connection."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, val in ((getattr(socket, "TCP_KEEPIDLE", None), 30), (getattr(socket, "TCP_KEEPINTVL", None), 10),
                     (getattr(socket, "TCP_KEEPCNT", None), 3), (TCP_USER_TIMEOUT, 60_000)):
        if opt is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, opt, val)
            except OSError:
                pass


def tune_data_socket(sock: socket.socket) -> None:
    """Blocking mode for a pump thread; dead peers are detected by TCP, not by Python timeouts."""
    sock.setblocking(True)
    sock.settimeout(None)
    set_keepalive(sock)


async def recv_exact_async(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = await loop.sock_recv_into(sock, view[got:])
        if k == 0:
            raise BrokenConnectionError("connection closed during the handshake")
        got += k
    return bytes(buf)


async def wait_readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    loop.add_reader(sock.fileno(), lambda: fut.done() or fut.set_result(None))
    try:
        await fut
    finally:
        loop.remove_reader(sock.fileno())
