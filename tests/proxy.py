"""A TCP proxy for failure tests: sits between client and daemon and misbehaves on cue.

Every accepted connection gets an index; a connection whose first bytes are ``DX`` is a
data connection (the control connection starts with a TLS ClientHello).  ``mangle`` sees
the client->server bytes of each data connection with their stream offset and returns
what to do with them (``mangle_down`` the same for server->client bytes, where a pull's
chunks travel):

* ``bytes``: forward these (the same bytes, or altered ones);
* ``None``: cut the connection (both directions) right there: both sides see it close;
* a ``Swallow``: forward ``Swallow.forward``, then stop forwarding that connection in
  both directions for good.  What the client sends after that is read (so its writes
  complete, as if the peer had received them) and dropped; nothing comes back from the
  server.  With ``close_after`` set, both sides are closed once neither has written
  anything for that many seconds: the sender has finished writing and waits, idle, for
  ACKs that will never come, and the connection dies under it (``swallow_after``).
  Without it the connection stays open until one end closes it: a black hole
  (``black_hole_after``).

Neither is called again for a connection cut or swallowed.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Swallow:
    """Stop forwarding a data connection (see the module docstring)."""

    close_after: float | None = None
    """Close both sides after both have been quiet this long; None: never (a black hole)."""
    forward: bytes = b""
    """Bytes of the current piece still forwarded before the swallowing starts."""


Mangle = Callable[[int, int, bytes], "bytes | None | Swallow"]  # (data-conn index, offset, chunk)


class _Link:
    """The state both directions of one proxied connection share."""

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client, self.server = client, server
        self.index: int | None = None  # data connection number, set at its JOIN
        self.swallowing = False
        self.swallowing_from_client = True  # which side's bytes the swallowing counts
        self.last_heard = time.monotonic()

    def shut(self) -> None:
        for s in (self.client, self.server):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Proxy:
    def __init__(self, upstream_port: int, mangle: Mangle | None = None, mangle_down: Mangle | None = None) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.mangle = mangle
        self.mangle_down = mangle_down
        self.data_conns = 0
        self.cuts = 0
        self.swallowed = 0  # data connections swallowed
        self.swallowed_bytes = 0  # bytes read and dropped by them (from the side that was mangled)
        self.closed_quiet = 0  # swallowed connections closed after both sides went quiet
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
            link = _Link(c, u)
            threading.Thread(target=self._pump, args=(link, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(link, False), daemon=True).start()

    def _pump(self, link: _Link, upstream: bool) -> None:
        src, dst = (link.client, link.server) if upstream else (link.server, link.client)
        offset = 0
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                link.last_heard = time.monotonic()
                if link.swallowing:
                    if upstream == link.swallowing_from_client:
                        with self._lock:
                            self.swallowed_bytes += len(data)
                    continue
                if upstream and offset == 0 and data[:2] == b"DX":
                    with self._lock:
                        link.index = self.data_conns
                        self.data_conns += 1
                mangle = self.mangle if upstream else self.mangle_down
                if link.index is not None and mangle is not None:
                    out = mangle(link.index, offset, data)
                    offset += len(data)
                    if out is None:
                        with self._lock:
                            self.cuts += 1
                        break
                    if isinstance(out, Swallow):
                        self._swallow(link, out, len(data) - len(out.forward), upstream)
                        data = out.forward
                    else:
                        data = out
                else:
                    offset += len(data)
                if data:
                    dst.sendall(data)
        except OSError:
            pass
        link.shut()

    def _swallow(self, link: _Link, how: Swallow, dropped: int, from_client: bool) -> None:
        link.swallowing_from_client = from_client
        link.swallowing = True
        with self._lock:
            self.swallowed += 1
            self.swallowed_bytes += dropped
        if how.close_after is not None:
            threading.Thread(target=self._close_when_quiet, args=(link, how.close_after), daemon=True).start()

    def _close_when_quiet(self, link: _Link, quiet: float) -> None:
        while not self._closed:
            idle = time.monotonic() - link.last_heard
            if idle >= quiet:
                with self._lock:
                    self.closed_quiet += 1
                link.shut()
                return
            time.sleep(quiet - idle)

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


def _swallowing(limit: int, conn: int, close_after: float | None) -> Mangle:
    def mangle(index: int, offset: int, data: bytes) -> bytes | Swallow:
        if index == conn and offset + len(data) > limit:
            return Swallow(close_after, data[: max(0, limit - offset)])
        return data

    return mangle


def swallow_after(limit: int, *, conn: int = 0, close_after: float = 0.5) -> Mangle:
    """Data connection ``conn`` delivers its first ``limit`` bytes, then swallows the rest
    (nothing more reaches the server, nothing comes back) and, once the client has written
    nothing for ``close_after`` seconds, closes both sides.  The sender has then written
    its last frames and sits idle waiting for their ACKs when the connection dies: only an
    idle sender that watches its socket notices."""
    return _swallowing(limit, conn, close_after)


def black_hole_after(limit: int, *, conn: int = 0) -> Mangle:
    """Data connection ``conn`` delivers its first ``limit`` bytes, then forwards nothing
    either way while staying open (TCP still accepts what the client writes): only a
    timeout on the missing ACKs notices."""
    return _swallowing(limit, conn, None)
