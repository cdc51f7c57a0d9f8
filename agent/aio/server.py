"""The receiving daemon's network side: one port for TLS control and plain data connections.

A new connection is classified by its first bytes: ``DX`` starts a data connection
(its first frame must be a valid JOIN), anything else must be a TLS 1.3 handshake
with a certificate from a trusted CA.  Nothing is written to disk for a peer that
has not completed both.  One bad connection never takes the daemon down, and neither
do many: connections that have not authenticated yet, TLS handshakes in progress and
sessions (in all and per peer) are bounded, every stage before a session has one
deadline, an idle session ends, and a failed ``accept`` (``EMFILE`` ...) is waited out,
not fatal (docs/HARDENING.md, "Daemon limits").
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import errno
import hmac
import logging
import os
import socket
import ssl
import time
from dataclasses import dataclass, field

from agent.aio.control import ControlChannel, error_code
from agent.aio.net import recv_exact_async, set_keepalive, tune_data_socket, wait_readable
from agent.aio.pumps import SourceReader
from agent.aio.session import ReceiverSession, SenderSession
from agent.aio.tls import peer_identity, server_context
from agent.config import ServerConfig
from agent.core import ReceiverCore, SenderCore
from agent.errors import BrokenConnectionError, ConfigError, DxaError, ListenError, RemoteProtocolError
from agent.store.journal import Journal
from agent.store.pki import Identity
from agent.wire._seal import CIPHERS
from agent.store.receiving import ReceiverStore
from agent.store.safepath import SafeRoot, split_relpath
from agent.store.tree import scan_sources
from agent.wire import (
    CONTROL_MAX,
    DATA_HEADER_LEN,
    PREFIX_LEN,
    SUPPORTED_VERSIONS,
    ErrorMsg,
    Hello,
    Join,
    Joined,
    Opener,
    Sealer,
    Welcome,
    check_prefix,
    decode_message,
    encode_message,
    join_mac,
)

__all__ = ["Server"]

log = logging.getLogger(__name__)

COMPLETED_KEPT = 100
"""Finished sessions ``Server.completed`` remembers (the newest; for tests and inspection)."""
COMPLETED_ERRORS_KEPT = 20
"""Error strings kept per finished session in ``Server.completed`` (the count is kept whole)."""
ACCEPT_BACKOFF = (0.1, 1.0)
"""A failed accept (EMFILE, ENFILE, ENOBUFS, ENOMEM, ...) waits this long, doubling to the max."""
HANDSHAKE_GRACE = 1.0
"""Seconds a TLS handshake in progress is safe from eviction: with every slot taken, a new
connection closes the oldest handshake older than this (one stuck on a half-sent
ClientHello), while a burst of real handshakes, each done in milliseconds, just waits."""
ACCEPT_LOG_EVERY = 10.0
"""Seconds between two log lines about failing accepts (the rest are counted)."""


def _reason(exc: BaseException) -> str:
    """What to log for ``exc``: its text, or its type where the text is empty (a timeout)."""
    return str(exc) or type(exc).__name__


class _CountingChannel(ControlChannel):
    """A control channel that counts the messages it received (the idle timeout's signal)."""

    received = 0

    async def recv(self, *, allow_error: bool = False):
        msg = await super().recv(allow_error=allow_error)
        self.received += 1
        return msg


class _TransferLog(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        return f"[{self.extra['tid']}] {msg}", kwargs


@dataclass
class _Session:
    hello: Hello
    peer: str
    driver: object = None
    joined: set = field(default_factory=set)
    started: float = field(default_factory=time.monotonic)


class Server:
    """``await Server(config, identity).start()``; ``await server.close()``."""

    def __init__(self, config: ServerConfig, identity: Identity) -> None:
        self.config = config
        self.identity = identity
        self._ssl = server_context(identity)
        self._sessions: dict[bytes, _Session] = {}
        self._sock: socket.socket | None = None
        self._accept_task: asyncio.Task | None = None
        self._conns: set[asyncio.Task] = set()
        self.port = config.port
        self.completed: collections.deque[dict] = collections.deque(maxlen=COMPLETED_KEPT)
        """The newest finished sessions: session, mode, outcome, stats (errors cut to
        COMPLETED_ERRORS_KEPT; ``errors_total`` has the count)."""
        # connections not yet through TLS or JOIN, and those in a TLS handshake: oldest first
        self._unauth: dict[asyncio.Task, socket.socket] = {}
        self._handshaking: dict[asyncio.Task, float] = {}  # holding a slot: when it started
        self.accept_errors = 0
        self.evicted = 0
        """Connections closed to make room (unauthenticated or in a handshake)."""
        self.journal: Journal | None = None
        self.metrics = None  # agent.service.metrics.ServerMetrics when config.metrics is set

    async def start(self) -> None:
        os.makedirs(self.config.root, exist_ok=True)
        SafeRoot(self.config.root).close()
        self.journal = Journal(self.config.journal_path)  # one per daemon, shared by its sessions
        try:
            sock = socket.create_server((self.config.host, self.config.port), reuse_port=False, backlog=256)
        except OSError as exc:
            self.journal.close()
            self.journal = None
            raise ListenError(f"cannot listen on {self.config.host}:{self.config.port}: "
                              f"{exc.strerror or exc}") from None
        sock.setblocking(False)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())
        log.info("listening on %s:%d, root %s", self.config.host, self.port, os.path.realpath(self.config.root))
        if self.config.metrics:
            await self._start_metrics()

    # -- metrics (--metrics HOST:PORT; agent/service/metrics.py) ----------------------------
    async def _start_metrics(self) -> None:
        from agent.config import parse_host_port
        from agent.service.metrics import ServerMetrics

        metrics = ServerMetrics()
        try:
            host, port = parse_host_port(self.config.metrics, "--metrics")
            metrics.start(host, port)
        except ConfigError:
            await self.close()
            raise
        except OSError as exc:
            await self.close()
            raise ListenError(f"cannot serve metrics on {self.config.metrics}: {exc.strerror or exc}") from None
        self.metrics = metrics
        log.info("metrics on http://%s:%d/metrics", host if ":" not in host else f"[{host}]", self.metrics.port)

    def reload_tls(self, identity: Identity) -> None:
        """Use ``identity`` (certificate, key, CA, CRL) for every handshake from now on;
        connections already up keep theirs.  Raises ConfigError, keeping the old one."""
        self._ssl = server_context(identity)
        self.identity = identity

    async def serve_forever(self) -> None:
        assert self._accept_task is not None
        await self._accept_task

    async def close(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            await asyncio.gather(self._accept_task, return_exceptions=True)
        for t in list(self._conns):
            t.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
        if self.journal is not None:
            self.journal.close()
            self.journal = None
        if self.metrics is not None:
            await self.metrics.close()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        delay = 0.0
        failed = 0
        logged = -ACCEPT_LOG_EVERY
        while True:
            try:
                conn, addr = await loop.sock_accept(self._sock)
            except OSError as exc:
                # out of descriptors or kernel memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) or a
                # connection reset before we took it: the listening socket stays good, the
                # connections wait in its backlog; wait a little and accept again
                self.accept_errors += 1
                failed += 1
                delay = min(ACCEPT_BACKOFF[1], delay * 2 or ACCEPT_BACKOFF[0])
                now = loop.time()
                if now - logged >= ACCEPT_LOG_EVERY:
                    name = errno.errorcode.get(exc.errno or 0, "")
                    log.error("accept failed (%s%s), %d time(s) since the last report; retrying in %.1f s",
                              f"{name}: " if name else "", exc.strerror or _reason(exc), failed, delay)
                    logged, failed = now, 0
                await asyncio.sleep(delay)
                continue
            delay = 0.0
            self._admit(loop, conn, addr)

    def _admit(self, loop, conn: socket.socket, addr) -> None:
        """Start handling a new connection; at the cap of unauthenticated ones, close the oldest."""
        while len(self._unauth) >= self.config.max_unauthenticated:
            self._evict(self._unauth)
        try:
            set_keepalive(conn)
        except OSError:
            conn.close()
            return
        t = loop.create_task(self._handle(conn, addr))
        self._unauth[t] = conn
        self._conns.add(t)
        t.add_done_callback(self._conn_done)

    def _conn_done(self, t: asyncio.Task) -> None:
        self._conns.discard(t)
        self._unauth.pop(t, None)
        self._handshaking.pop(t, None)

    def _evict(self, pool: dict) -> None:
        """Close the oldest connection of ``pool``: it had the longest time to speak."""
        t, conn = next(iter(pool.items()))
        pool.pop(t)
        self._unauth.pop(t, None)
        self._handshaking.pop(t, None)
        self.evicted += 1
        # its task closes the socket; a task cancelled before it ever ran cannot: close it then
        t.add_done_callback(lambda done, c=conn: done.cancelled() and c.close())
        t.cancel()

    def _authenticated(self) -> None:
        self._unauth.pop(asyncio.current_task(), None)

    async def _classify(self, conn: socket.socket, deadline: float) -> bytes:
        """Peek at the first two bytes (``DX``: data); a first segment of one byte is waited on."""
        loop = asyncio.get_running_loop()
        pause = 0.005
        while True:
            await asyncio.wait_for(wait_readable(conn), max(0.0, deadline - loop.time()))
            first = conn.recv(2, socket.MSG_PEEK)
            if len(first) != 1 or first != b"D":
                return first  # two bytes, EOF (b""), or one byte that cannot start "DX" (TLS: 0x16)
            # "D" alone: the rest of the magic is on its way (readable stays true: poll)
            if loop.time() + pause > deadline:
                raise asyncio.TimeoutError
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.1)

    async def _handle(self, conn: socket.socket, addr) -> None:
        deadline = asyncio.get_running_loop().time() + self.config.handshake_timeout
        try:
            first = await self._classify(conn, deadline)
        except (asyncio.TimeoutError, OSError):
            conn.close()
            return
        except asyncio.CancelledError:
            conn.close()
            raise
        if not first:
            conn.close()
        elif first == b"DX":
            await self._data_conn(conn, addr, deadline)
        else:
            # asyncio leaves Nagle on for an accepted socket (measured: TCP_NODELAY 0 after
            # connect_accepted_socket); with it a short control message sent while the
            # previous one is un-ACKed waits for the peer's delayed ACK, about 40 ms.
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await self._control_conn(conn, addr, deadline)

    # -- data connections --------------------------------------------------------
    async def _data_conn(self, conn: socket.socket, addr, deadline: float) -> None:
        try:
            join = await asyncio.wait_for(self._read_join(conn),
                                          max(0.0, deadline - asyncio.get_running_loop().time()))
            sess = self._sessions.get(join.session_id)
            if sess is None or sess.driver is None:
                raise RemoteProtocolError("JOIN for an unknown session")
            expect = join_mac(sess.hello.key, join.session_id, join.stream, join.epoch)
            if not hmac.compare_digest(expect, join.mac):
                raise RemoteProtocolError("JOIN with a bad MAC")
            if (join.stream, join.epoch) in sess.joined or join.stream >= self.config.max_streams:
                raise RemoteProtocolError("JOIN replayed or stream out of range")
            sess.joined.add((join.stream, join.epoch))
            await asyncio.get_running_loop().sock_sendall(conn, encode_message(Joined()))
        except (asyncio.TimeoutError, OSError, DxaError) as exc:
            log.warning("data connection from %s refused: %s", addr[0], _reason(exc))
            await self._send_error_raw(conn, "join", str(exc))
            conn.close()
            return
        except asyncio.CancelledError:
            conn.close()
            raise
        self._authenticated()
        tune_data_socket(conn)
        sess.driver.add_stream(join.stream, conn)

    async def _read_join(self, conn: socket.socket) -> Join:
        prefix = await recv_exact_async(conn, PREFIX_LEN)
        ftype, length = check_prefix(prefix, 4096)
        msg = decode_message(ftype, await recv_exact_async(conn, length))
        if not isinstance(msg, Join):
            raise RemoteProtocolError("first frame on a data connection must be JOIN")
        return msg

    @staticmethod
    async def _send_error_raw(conn: socket.socket, code: str, message: str) -> None:
        try:
            conn.setblocking(False)
            await asyncio.wait_for(asyncio.get_running_loop().sock_sendall(
                conn, encode_message(ErrorMsg(code, message[:500]))), 1)
        except (OSError, asyncio.TimeoutError):
            pass

    # -- control connections --------------------------------------------------------
    async def _control_conn(self, conn: socket.socket, addr, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=CONTROL_MAX)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            # one deadline from accept: the first bytes, a handshake slot, the handshake and
            # HELLO together.  Waiting for a slot costs a socket and a task (and counts against
            # max_unauthenticated); the OpenSSL state is made only once a slot is free.
            async with asyncio.timeout_at(deadline):
                # a slot: free, or taken from the oldest handshake past its grace; no queue
                # (a FIFO would put a real client behind every stuck one that came first)
                while len(self._handshaking) >= self.config.max_handshakes:
                    if loop.time() - next(iter(self._handshaking.values())) > HANDSHAKE_GRACE:
                        self._evict(self._handshaking)
                    else:
                        await asyncio.sleep(0.05)
                me = asyncio.current_task()
                self._handshaking[me] = loop.time()
                try:
                    transport, _ = await loop.connect_accepted_socket(
                        lambda: protocol, sock=conn, ssl=self._ssl, ssl_handshake_timeout=self.config.handshake_timeout)
                finally:
                    self._handshaking.pop(me, None)
        except (ssl.SSLError, OSError, asyncio.TimeoutError, ConnectionError) as exc:
            log.warning("TLS handshake with %s failed: %s", addr[0], _reason(exc))
            conn.close()
            return
        except asyncio.CancelledError:
            conn.close()
            raise
        self._authenticated()
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        ctrl = _CountingChannel(reader, writer)
        try:
            peer = peer_identity(writer.get_extra_info("ssl_object"))
            hello = await asyncio.wait_for(ctrl.recv(), max(0.0, deadline - loop.time()))
            if not isinstance(hello, Hello):
                raise RemoteProtocolError("first control message must be HELLO")
            await self._run_session(ctrl, hello, peer, addr)
        except (DxaError, asyncio.TimeoutError, OSError) as exc:
            log.warning("control connection from %s ended: %s", addr[0], _reason(exc))
            code = error_code(exc)
            try:
                await asyncio.wait_for(ctrl.send(ErrorMsg(code, self._for_peer(str(exc))[:500])), 1)
            except (OSError, asyncio.TimeoutError, ConnectionError, RuntimeError):
                pass
        finally:
            await ctrl.close()

    async def _run_session(self, ctrl: ControlChannel, hello: Hello, peer: str, addr) -> None:
        cfg = self.config
        lo, hi = hello.versions
        if not (lo <= SUPPORTED_VERSIONS[1] and hi >= SUPPORTED_VERSIONS[0]):
            raise RemoteProtocolError(f"no common protocol version (offered {lo}..{hi})")
        if len(hello.session_id) != 8 or len(hello.key) != 32 or hello.session_id in self._sessions:
            raise RemoteProtocolError("bad or duplicate session id or key")
        if hello.cipher not in CIPHERS:
            raise RemoteProtocolError(f"unknown cipher {hello.cipher[:40]!r}")
        if hello.mode not in ("push", "pull", "bench"):
            raise RemoteProtocolError(f"unknown mode {hello.mode!r}")
        if not 4096 <= hello.chunk_size <= cfg.max_chunk or hello.streams < 1:
            raise RemoteProtocolError("chunk size or stream count out of range")
        if len(self._sessions) >= cfg.max_sessions:
            raise RemoteProtocolError("server busy: too many sessions")
        if sum(1 for x in self._sessions.values() if x.peer == peer) >= cfg.max_sessions_per_peer:
            raise RemoteProtocolError(f"server busy: too many sessions of {peer[:64]!r}")
        if hello.path:
            split_relpath(hello.path)
        tid = hello.session_id.hex()
        tlog = _TransferLog(log, {"tid": tid})
        streams = min(hello.streams, cfg.max_streams)
        sess = _Session(hello, peer)
        max_frame = hello.chunk_size + DATA_HEADER_LEN + 1024
        store = root = None
        outcome = "failed"
        try:
            if hello.mode == "pull":
                root = SafeRoot(cfg.root, create=False)
                src = self._source_path(root, hello.path)
                tree = await asyncio.get_running_loop().run_in_executor(
                    None, lambda: scan_sources([src], recursive=hello.recursive, chunk_size=hello.chunk_size))
                core = SenderCore(tree.entries)
                reader = SourceReader(tree.paths, {e.file_id: e for e in tree.entries}, tree.versions)
                sess.driver = SenderSession(ctrl, core, reader, Sealer(hello.key, hello.session_id, hello.cipher),
                                            hello.compress, files_total=len(tree.entries), logger=tlog,
                                            rate=hello.rate)
            elif hello.mode == "push":
                root = SafeRoot(cfg.root)
                store = ReceiverStore(root, self.journal, base=hello.path, fsync=cfg.fsync,
                                      direct=not cfg.buffered_writes, max_open=cfg.max_open_files,
                                      keep_special_bits=cfg.keep_special_bits)
                sess.driver = ReceiverSession(ctrl, ReceiverCore(chunk_size=hello.chunk_size, limits=cfg.limits), store,
                                              Opener(hello.key, hello.session_id, hello.cipher), max_frame, logger=tlog)
            else:
                from agent.aio.bench import BenchReceiver

                sess.driver = BenchReceiver(ctrl, Opener(hello.key, hello.session_id, hello.cipher), max_frame, logger=tlog)
            self._sessions[hello.session_id] = sess
            if self.metrics is not None:
                self.metrics.session_started(tid, hello.mode, peer, sess.driver)
            tlog.info("%s %s from %s (%s): path=%r streams=%d chunk=%d cipher=%s%s", hello.mode, "start", peer,
                      addr[0], hello.path, streams, hello.chunk_size, hello.cipher,
                      f" rate={hello.rate}" if hello.rate and hello.mode == "pull" else "")
            await ctrl.send(Welcome(1, streams, max_frame, self.identity.name))
            watch = (asyncio.get_running_loop().create_task(self._watch_idle(sess.driver, ctrl, hello.mode))
                     if cfg.idle_timeout else None)
            try:
                stats = await sess.driver.run()
            finally:
                if watch is not None:
                    watch.cancel()
            secs = time.monotonic() - sess.started
            outcome = stats.outcome
            tlog.info("%s end: outcome=%s files=%d/%d bytes_wire=%d bytes_skipped=%d retried=%d %.2fs",
                      hello.mode, outcome, stats.files_ok, stats.files, stats.bytes_wire, stats.bytes_skipped,
                      stats.chunks_retried, secs)
            self.completed.append({"session": tid, "mode": hello.mode, "outcome": outcome, "errors_total":
                                   len(stats.errors), "stats": dataclasses.replace(
                                       stats, errors=stats.errors[:COMPLETED_ERRORS_KEPT])})
        except BaseException as exc:
            tlog.warning("%s end: outcome=failed (%s)", hello.mode, _reason(exc))
            raise
        finally:
            self._sessions.pop(hello.session_id, None)
            if self.metrics is not None:
                self.metrics.session_ended(tid, outcome)
            if root is not None:
                root.close()

    async def _watch_idle(self, driver, ctrl: _CountingChannel, mode: str) -> None:
        """End the session after ``idle_timeout`` s with no control message, no byte moved on a
        data connection, no chunk verified or file finished, and no work of ours in progress."""
        loop = asyncio.get_running_loop()
        limit = self.config.idle_timeout
        last, since = None, loop.time()
        while True:
            await asyncio.sleep(min(limit / 4, 5.0))
            p = driver.progress
            mark = (ctrl.received, p.bytes_moved, p.bytes_done, p.files_done)
            now = loop.time()
            if mark != last or driver.working:
                last, since = mark, now
            elif now - since >= limit:
                driver.abort(BrokenConnectionError(
                    f"{mode} session idle for {now - since:.0f} s (no control message, no data; "
                    f"idle timeout {limit:g} s)"))
                return

    def _for_peer(self, message: str) -> str:
        """A message as a peer may see it: where the root lies on this machine is none of its
        business, so the root's absolute path becomes the root itself, ``/``."""
        for where in {os.path.realpath(self.config.root), os.path.abspath(self.config.root)}:
            message = message.replace(where + os.sep, "").replace(where, "/")
        return message

    @staticmethod
    def _source_path(root: SafeRoot, rel: str) -> str:
        return root.existing(rel, "on the server") if rel else root.path
