"""The receiving daemon's network side: one port for TLS control and plain data connections.

A new connection is classified by its first bytes: ``DX`` starts a data connection
(its first frame must be a valid JOIN), anything else must be a TLS 1.3 handshake
with a certificate from a trusted CA.  Nothing is written to disk for a peer that
has not completed both.  One bad connection never takes the daemon down.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import socket
import ssl
import time
from dataclasses import dataclass, field

from agent.aio.control import ControlChannel, error_code
from agent.aio.net import recv_exact_async, tune_data_socket, wait_readable
from agent.aio.pumps import SourceReader
from agent.aio.session import ReceiverSession, SenderSession
from agent.aio.tls import peer_identity, server_context
from agent.config import ServerConfig
from agent.core import ReceiverCore, SenderCore
from agent.errors import ConfigError, DxaError, ListenError, RemoteProtocolError
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
        self.completed: list[dict] = []
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
        while True:
            conn, addr = await loop.sock_accept(self._sock)
            t = loop.create_task(self._handle(conn, addr))
            self._conns.add(t)
            t.add_done_callback(self._conns.discard)

    async def _handle(self, conn: socket.socket, addr) -> None:
        timeout = self.config.handshake_timeout
        try:
            await asyncio.wait_for(wait_readable(conn), timeout)
            first = conn.recv(2, socket.MSG_PEEK)
        except (asyncio.TimeoutError, OSError):
            conn.close()
            return
        if first == b"DX":
            await self._data_conn(conn, addr)
        else:
            # asyncio leaves Nagle on for an accepted socket (measured: TCP_NODELAY 0 after
            # connect_accepted_socket); with it a short control message sent while the
            # previous one is un-ACKed waits for the peer's delayed ACK, about 40 ms.
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await self._control_conn(conn, addr)

    # -- data connections --------------------------------------------------------
    async def _data_conn(self, conn: socket.socket, addr) -> None:
        try:
            join = await asyncio.wait_for(self._read_join(conn), self.config.handshake_timeout)
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
            log.warning("data connection from %s refused: %s", addr[0], exc)
            await self._send_error_raw(conn, "join", str(exc))
            conn.close()
            return
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
    async def _control_conn(self, conn: socket.socket, addr) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=CONTROL_MAX)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, sock=conn, ssl=self._ssl, ssl_handshake_timeout=self.config.handshake_timeout)
        except (ssl.SSLError, OSError, asyncio.TimeoutError, ConnectionError) as exc:
            log.warning("TLS handshake with %s failed: %s", addr[0], exc or exc.__class__.__name__)
            conn.close()
            return
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        ctrl = ControlChannel(reader, writer)
        try:
            peer = peer_identity(writer.get_extra_info("ssl_object"))
            hello = await asyncio.wait_for(ctrl.recv(), self.config.handshake_timeout)
            if not isinstance(hello, Hello):
                raise RemoteProtocolError("first control message must be HELLO")
            await self._run_session(ctrl, hello, peer, addr)
        except (DxaError, asyncio.TimeoutError, OSError) as exc:
            log.warning("control connection from %s ended: %s", addr[0], exc or exc.__class__.__name__)
            code = error_code(exc)
            try:
                await asyncio.wait_for(ctrl.send(ErrorMsg(code, str(exc)[:500])), 1)
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
                                      direct=not cfg.buffered_writes)
                sess.driver = ReceiverSession(ctrl, ReceiverCore(max_chunk=cfg.max_chunk), store,
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
            stats = await sess.driver.run()
            secs = time.monotonic() - sess.started
            outcome = stats.outcome
            tlog.info("%s end: outcome=%s files=%d/%d bytes_wire=%d bytes_skipped=%d retried=%d %.2fs",
                      hello.mode, outcome, stats.files_ok, stats.files, stats.bytes_wire, stats.bytes_skipped,
                      stats.chunks_retried, secs)
            self.completed.append({"session": tid, "mode": hello.mode, "outcome": outcome, "stats": stats})
        except BaseException as exc:
            tlog.warning("%s end: outcome=failed (%s)", hello.mode, exc or exc.__class__.__name__)
            raise
        finally:
            self._sessions.pop(hello.session_id, None)
            if self.metrics is not None:
                self.metrics.session_ended(tid, outcome)
            if root is not None:
                root.close()

    @staticmethod
    def _source_path(root: SafeRoot, rel: str) -> str:
        return root.existing(rel, "on the server") if rel else root.path
