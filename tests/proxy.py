"""A TCP proxy for failure tests: sits between client and daemon and misbehaves on cue.

Every accepted connection gets an index; a connection whose first bytes are ``DX`` is a
data connection (the control connection starts with a TLS ClientHello).  ``mangle`` sees
the client->server bytes of each data connection with their stream offset and returns
the bytes to forward, or ``None`` to cut the connection (both directions) right there.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

Mangle = Callable[[int, int, bytes], "bytes | None"]  # (data-conn index, offset, chunk) -> bytes | None


class Proxy:
    def __init__(self, upstream_port: int, mangle: Mangle | None = None) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.mangle = mangle
        self.data_conns = 0
        self.cuts = 0
        self._lock = threading.Lock()
        self._lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self._lsock.getsockname()[1]
        self._socks: list[socket.socket] = []
        self._closed = False
        self.severed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path: str = "") -> str:
        return f"dxa://127.0.0.1:{self.port}/{path}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                c, _ = self._lsock.accept()
            except OSError:
                return
            if self.severed:
                c.close()
                continue
            try:
                u = socket.create_connection(self.upstream)
            except OSError:
                c.close()
                continue
            with self._lock:
                self._socks += [c, u]
            threading.Thread(target=self._pump, args=(c, u, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        index, offset = None, 0
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if upstream and offset == 0 and data[:2] == b"DX":
                    with self._lock:
                        index = self.data_conns
                        self.data_conns += 1
                if upstream and index is not None and self.mangle is not None:
                    out = self.mangle(index, offset, data)
                    offset += len(data)
                    if out is None:
                        with self._lock:
                            self.cuts += 1
                        break
                    data = out
                else:
                    offset += len(data)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def sever(self) -> None:
        """The path goes down: every connection is cut and new ones are refused."""
        self.severed = True
        with self._lock:
            for s in self._socks:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        self._lsock.close()
        with self._lock:
            for s in self._socks:
                try:
                    s.close()
                except OSError:
                    pass


def flip_at(position: int, *, conn: int = 0, times: int = 1) -> Mangle:
    """Flip one bit at stream ``position`` of the first ``times`` data connections from ``conn`` on."""

    def mangle(index: int, offset: int, data: bytes) -> bytes:
        if conn <= index < conn + times and offset <= position < offset + len(data):
            b = bytearray(data)
            b[position - offset] ^= 0x10
            return bytes(b)
        return data

    return mangle


def corrupt_every(period: int) -> Mangle:
    """Flip a bit every ``period`` bytes of every data connection (a hopeless middlebox)."""

    def mangle(index: int, offset: int, data: bytes) -> bytes:
        b = bytearray(data)
        first = (-offset) % period
        for i in range(first, len(b), period):
            b[i] ^= 0x01
        return bytes(b)

    return mangle


def cut_after(limit: int, *, conn: int = 0) -> Mangle:
    """Cut data connection ``conn`` once it has carried ``limit`` bytes."""

    def mangle(index: int, offset: int, data: bytes) -> bytes | None:
        if index == conn and offset + len(data) > limit:
            return None
        return data

    return mangle
