"""The client side of a session: ``copy`` (push or pull) and ``bench``.

Opens the TLS control connection, says HELLO with a fresh per-session key, joins N
data connections, then runs the sender or receiver driver.  Data connections that
break are re-opened with bounded retries and backoff (a new epoch each time).

``copy(..., metrics=...)`` reports the copy's session to a daemon's metrics (a
:class:`SessionObserver` such as ``agent.service.metrics.ServerMetrics``) for as long as
it runs, as the Server does for the sessions it serves.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from agent.aio.control import ControlChannel
from agent.aio.pacing import SharedPacer
from agent.aio.net import tune_data_socket
from agent.aio.pumps import SourceReader, recv_exactly
from agent.aio.session import Progress, ReceiverSession, SenderSession, SessionStats
from agent.aio.tls import client_context, describe_tls_failure, peer_identity
from agent.config import TransferOptions
from agent.core import ReceiverCore, SenderCore
from agent.errors import (
    AuthenticationError,
    BrokenConnectionError,
    ConfigError,
    ConnectError,
    DxaError,
    RemoteProtocolError,
    TransferError,
)
from agent.store.journal import Journal
from agent.store.pki import Identity
from agent.store.receiving import ReceiverStore
from agent.store.safepath import SafeRoot
from agent.store.tree import scan_sources
from agent.wire import (
    CONTROL_MAX,
    DATA_HEADER_LEN,
    PREFIX_LEN,
    SUPPORTED_VERSIONS,
    Done,
    ErrorMsg,
    Hello,
    Join,
    Joined,
    Opener,
    Sealer,
    Summary,
    Welcome,
    check_prefix,
    decode_message,
    encode_message,
    join_mac,
)

if TYPE_CHECKING:
    from agent.aio.bench import BenchResult

__all__ = ["Remote", "parse_remote", "copy", "bench", "CopyResult", "SessionObserver"]

log = logging.getLogger(__name__)


class SessionObserver(Protocol):
    """What ``copy(metrics=...)`` reports to (``agent.service.metrics.ServerMetrics`` is one);
    called on the event loop that runs the copy."""

    def session_started(self, sid: str, mode: str, peer: str, driver) -> None: ...

    def session_ended(self, sid: str, outcome: str) -> None: ...


@dataclass(frozen=True)
class Remote:
    host: str
    port: int
    path: str  # relative to the server's root, no leading slash
    trailing_slash: bool = False


def parse_remote(url: str) -> Remote:
    """``dxa://HOST:PORT/path`` → Remote.  IPv6 hosts in brackets."""
    parts = urlsplit(url)
    if parts.scheme != "dxa" or not parts.hostname:
        raise ConfigError(f"not a dxa URL: {url!r} (expected dxa://HOST:PORT/path)")
    try:
        port = parts.port or 7400
    except ValueError:
        raise ConfigError(f"bad port in {url!r}") from None
    path = parts.path.strip("/")
    return Remote(parts.hostname, port, path, parts.path.endswith("/"))


def is_remote(s: str) -> bool:
    return s.startswith("dxa://")


@dataclass
class CopyResult:
    """What ``dxa cp --json`` prints and ``agent.copy`` returns."""

    direction: str
    bytes_total: int
    bytes_sent: int
    bytes_skipped: int
    files: int
    files_ok: int
    files_failed: int
    seconds: float
    encrypted: bool
    verified: bool
    chunks_retried: int
    streams: int
    streams_reconnected: int
    errors: list[str]
    warnings: list[str]
    bytes_delivered: int = 0
    """File bytes that arrived verified at the destination in this run (skipped and
    resumed bytes not included): what moved, whatever the wire carried."""

    @property
    def gbps(self) -> float:
        """Bytes delivered in this run over the time this run took: 0 when nothing moved
        (a refused copy, or one with everything already there)."""
        return self.bytes_delivered * 8 / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["gbps"] = round(self.gbps, 4)
        d["seconds"] = round(self.seconds, 4)
        return d


ALPN_DXA = "dxa/1"
"""The ALPN name a dxa client offers for its control connection (a server may select it or none)."""

_NOT_TLS = {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST",
            "UNKNOWN_PROTOCOL", "HTTPS_PROXY_REQUEST"}
"""OpenSSL's reasons for an answer to our ClientHello that is not TLS at all."""


async def _what_is_there(host: str, port: int, timeout: float) -> str:
    """After a TLS handshake that got no TLS back: ask in plain HTTP what answered (only to
    say so in the error; nothing of ours is sent)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return "it does not speak TLS"
    try:
        writer.write(b"HEAD / HTTP/1.0\r\n\r\n")
        head = await asyncio.wait_for(reader.read(5), min(timeout, 3.0))
    except (OSError, asyncio.TimeoutError):
        head = b""
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
    if head == b"HTTP/":
        return "this is an HTTP server (the metrics port? dxa cp wants dxa serve --listen's port)"
    return "it does not speak TLS"


class _Connection:
    """Control connection + data connection factory for one session."""

    def __init__(self, remote: Remote, identity: Identity, opts: TransferOptions) -> None:
        self.remote = remote
        self.identity = identity
        self.opts = opts
        self.key = os.urandom(32)
        self.session_id = os.urandom(8)
        self.ctrl: ControlChannel | None = None
        self.welcome: Welcome | None = None

    async def open(self, mode: str, path: str, *, bench_seconds: float = 0.0) -> Welcome:
        r, o = self.remote, self.opts
        ctx = client_context(self.identity)
        # dxa itself selects no ALPN protocol; offering h2 makes a gRPC (HTTP/2) server
        # say what it is instead of closing on our HELLO like a server that refused us
        ctx.set_alpn_protocols([ALPN_DXA, "h2"])
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(r.host, r.port, ssl=ctx, limit=CONTROL_MAX,
                                        server_hostname=o.server_name or r.host,
                                        ssl_handshake_timeout=o.connect_timeout), o.connect_timeout)
        except asyncio.TimeoutError:
            raise ConnectError(f"timed out connecting to {r.host}:{r.port}") from None
        except ssl.SSLError as exc:
            if exc.reason in _NOT_TLS:
                raise ConfigError(f"{r.host}:{r.port} is not a dxa port: "
                                  f"{await _what_is_there(r.host, r.port, o.connect_timeout)}") from None
            failed = describe_tls_failure(exc, f"{r.host}:{r.port}", o.server_name or r.host)
            raise AuthenticationError(failed or f"TLS with {r.host}:{r.port} failed: {exc}") from None
        except OSError as exc:
            failed = describe_tls_failure(exc, f"{r.host}:{r.port}", o.server_name or r.host)
            if failed:
                raise AuthenticationError(failed) from None
            if "CERTIFICATE" in str(exc).upper() or exc.__class__.__name__.startswith("SSL"):
                raise AuthenticationError(f"TLS with {r.host}:{r.port} failed: {exc}") from None
            raise ConnectError(f"cannot connect to {r.host}:{r.port}: {exc.strerror or exc}") from None
        self.ctrl = ControlChannel(reader, writer)
        tls = writer.get_extra_info("ssl_object")
        if tls is not None and tls.selected_alpn_protocol() == "h2":
            await self.ctrl.close()
            raise ConfigError(f"{r.host}:{r.port} is not a dxa port: this is a gRPC/HTTP2 server, not a dxa "
                              "data port (dxa serve --grpc's port? dxa cp wants --listen's)")
        await self.ctrl.send(Hello(SUPPORTED_VERSIONS, mode, path, self.session_id, self.key, o.wire_cipher,
                                   o.streams, o.chunk_size, o.compress, o.recursive, socket.gethostname(),
                                   bench_seconds, o.rate if mode == "pull" else 0))
        try:
            msg = await asyncio.wait_for(self.ctrl.recv(), o.connect_timeout)
        except BrokenConnectionError:
            raise AuthenticationError(f"{r.host}:{r.port} closed the connection during the handshake "
                                      "(certificate not trusted by the server?)") from None
        if not isinstance(msg, Welcome):
            raise RemoteProtocolError(f"expected WELCOME, got {type(msg).__name__}")
        self.welcome = msg
        return msg

    def _join_blocking(self, stream: int, epoch: int) -> socket.socket:
        sock = socket.create_connection((self.remote.host, self.remote.port), timeout=self.opts.connect_timeout)
        try:
            sock.sendall(encode_message(Join(self.session_id, stream, epoch,
                                             join_mac(self.key, self.session_id, stream, epoch))))
            prefix = recv_exactly(sock, PREFIX_LEN)
            if prefix is None:
                raise BrokenConnectionError("server closed a data connection during JOIN")
            ftype, length = check_prefix(prefix, 4096)
            body = recv_exactly(sock, length) if length else b""
            msg = decode_message(ftype, bytes(body or b""))
            if isinstance(msg, ErrorMsg):
                raise RemoteProtocolError(f"data connection refused: {msg.message}")
            if not isinstance(msg, Joined):
                raise RemoteProtocolError("expected JOINED")
        except BaseException:
            sock.close()
            raise
        tune_data_socket(sock)
        return sock

    async def join(self, stream: int, epoch: int = 0) -> socket.socket:
        fut = asyncio.get_running_loop().run_in_executor(None, self._join_blocking, stream, epoch)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:  # the thread goes on: close the socket it opens (a cancelled job)
            fut.add_done_callback(lambda f: f.cancelled() or f.exception() is not None or f.result().close())
            raise

    async def close(self) -> None:
        if self.ctrl is not None:
            await self.ctrl.close()


async def copy(sources: list[str], dest: str, *, identity: Identity, options: TransferOptions | None = None,
               progress: Progress | None = None, journal_path: str | None = None,
               pacer: SharedPacer | None = None, metrics: SessionObserver | None = None,
               metrics_label: str = "") -> CopyResult:
    """Copy local sources to ``dxa://`` (push) or one ``dxa://`` source to a local path (pull).

    ``options.rate`` paces either direction (a pull through HELLO: the server paces).
    ``pacer``: a push paced by this SharedPacer, whose ``set_rate`` the caller may call
    at any time, from any thread, to change the rate mid-flight (it starts at
    ``options.rate`` if that is set, else at the pacer's own rate).
    ``progress.bytes_moved`` counts bytes as they move (for a current rate);
    ``progress.bytes_done`` the verified ones.
    ``metrics``: the session is reported to it from the moment its data connections are
    open until it ends (``session_started`` with mode ``send`` for a push, ``fetch`` for a
    pull, the peer's certificate name and the session driver; ``session_ended`` with
    ``ok``, ``incomplete`` or ``failed``), under ``metrics_label`` (e.g. the job's id; it
    must be unique among the observer's live sessions) or else ``MODE-SESSIONID``."""
    opts = options or TransferOptions()
    if not sources:
        raise ConfigError("nothing to copy")
    observe = _Observe(metrics, metrics_label)
    remote_src = [s for s in sources if is_remote(s)]
    if is_remote(dest) and not remote_src:
        return await _push(sources, parse_remote(dest), identity, opts, progress, pacer, observe)
    if pacer is not None:
        raise ConfigError("a pacer paces pushes only; a pull is paced by the server at options.rate")
    if not is_remote(dest) and len(remote_src) == len(sources) == 1:
        return await _pull(parse_remote(sources[0]), dest, identity, opts, progress, journal_path, observe)
    raise ConfigError("exactly one side must be remote: dxa cp LOCAL... dxa://HOST:PORT/DIR, "
                      "or dxa cp dxa://HOST:PORT/PATH LOCAL")


class _Observe:
    """Runs a session driver, reporting it to a SessionObserver (when there is one) while it runs."""

    def __init__(self, observer: SessionObserver | None, label: str) -> None:
        self.observer = observer
        self.label = label

    async def run(self, driver, conn: _Connection, mode: str) -> SessionStats:
        if self.observer is None:
            return await driver.run()
        sid = self.label or f"{mode}-{conn.session_id.hex()}"
        try:
            peer = peer_identity(conn.ctrl.peer_cert())
        except DxaError:  # cannot happen after a verified handshake; still, never fail a copy for a label
            peer = conn.welcome.server if conn.welcome is not None and conn.welcome.server else conn.remote.host
        self.observer.session_started(sid, mode, peer, driver)
        outcome = "failed"
        try:
            stats = await driver.run()
            outcome = stats.outcome
            return stats
        finally:
            self.observer.session_ended(sid, outcome)


def _result(direction: str, stats: SessionStats, seconds: float, opts: TransferOptions, warnings: list[str],
            streams: int) -> CopyResult:
    ok = stats.files_failed == 0 and not stats.errors and stats.files_ok == stats.files
    return CopyResult(direction, stats.bytes_total, stats.bytes_wire, stats.bytes_skipped, stats.files,
                      stats.files_ok, stats.files_failed, seconds, opts.encrypt, ok, stats.chunks_retried, streams,
                      stats.streams_reconnected, stats.errors, warnings, stats.bytes_delivered)


async def _open_streams(conn: _Connection, n: int) -> list[socket.socket]:
    joins = [asyncio.ensure_future(conn.join(i)) for i in range(n)]
    try:
        socks = await asyncio.gather(*joins, return_exceptions=True)
        errors = [s for s in socks if isinstance(s, BaseException)]
        if errors:
            raise errors[0]
        return list(socks)
    except BaseException:
        # a join failed, or this was cancelled (gather cancels the joins still running, and
        # each closes the socket it opens): close the connections already made
        for j in joins:
            if j.done() and not j.cancelled() and j.exception() is None:
                j.result().close()
        raise


async def _push(sources: list[str], remote: Remote, identity: Identity, opts: TransferOptions,
                progress: Progress | None, pacer: SharedPacer | None = None,
                observe: _Observe | None = None) -> CopyResult:
    t0 = time.monotonic()
    if len(sources) == 1 and not remote.trailing_slash and remote.path:
        base, _, name = remote.path.rpartition("/")
        name_as: str | None = name
    else:
        base, name_as = remote.path, None
    loop = asyncio.get_running_loop()
    tree = await loop.run_in_executor(None, lambda: scan_sources(
        sources, recursive=opts.recursive, chunk_size=opts.chunk_size, name_as=name_as))
    for w in tree.warnings:
        log.warning("%s", w)
    conn = _Connection(remote, identity, opts)
    try:
        welcome = await conn.open("push", base)
        socks = await _open_streams(conn, welcome.streams)
        core = SenderCore(tree.entries, ack_timeout=opts.ack_timeout)
        reader = SourceReader(tree.paths, {e.file_id: e for e in tree.entries}, tree.versions)
        sender = SenderSession(conn.ctrl, core, reader, Sealer(conn.key, conn.session_id, opts.wire_cipher),
                               opts.compress, files_total=len(tree.entries), progress=progress, reconnect=conn.join,
                               rate=opts.rate, pacer=pacer)
        for i, s in enumerate(socks):
            sender.add_stream(i, s)
        stats = await (observe or _Observe(None, "")).run(sender, conn, "send")
    finally:
        await conn.close()
    return _result("push", stats, time.monotonic() - t0, opts, tree.warnings, welcome.streams)


async def _pull(remote: Remote, dest: str, identity: Identity, opts: TransferOptions, progress: Progress | None,
                journal_path: str | None, observe: _Observe | None = None) -> CopyResult:
    t0 = time.monotonic()
    dest = os.path.abspath(dest)
    if os.path.isdir(dest) and not os.path.islink(dest):
        base_dir, rename_top = dest, None
    else:
        base_dir, rename_top = os.path.dirname(dest), os.path.basename(dest)
    if not os.path.isdir(base_dir):
        raise ConfigError(f"{base_dir}: destination directory does not exist")
    conn = _Connection(remote, identity, opts)
    root = journal = None
    try:
        welcome = await conn.open("pull", remote.path)
        socks = await _open_streams(conn, welcome.streams)
        root = SafeRoot(base_dir, create=False)
        journal = Journal(journal_path or os.path.join(base_dir, ".dxa", "journal.sqlite"))
        store = ReceiverStore(root, journal, rename_top=rename_top, fsync=opts.fsync,
                              keep_special_bits=opts.keep_special_bits)
        max_frame = opts.chunk_size + DATA_HEADER_LEN + 1024
        receiver = ReceiverSession(conn.ctrl, ReceiverCore(chunk_size=opts.chunk_size), store,
                                   Opener(conn.key, conn.session_id, opts.wire_cipher), max_frame,
                                   progress=progress, reconnect=conn.join)
        for i, s in enumerate(socks):
            receiver.add_stream(i, s)
        stats = await (observe or _Observe(None, "")).run(receiver, conn, "fetch")
    finally:
        await conn.close()
        if journal is not None:
            journal.close()
        if root is not None:
            root.close()
    return _result("pull", stats, time.monotonic() - t0, opts, [], welcome.streams)


async def bench(url: str, *, identity: Identity, seconds: float = 10.0, options: TransferOptions | None = None,
                on_interval=None) -> BenchResult:
    """Memory-to-memory throughput through the data path (sealed and verified unless encrypt=False)."""
    from agent.aio.bench import BenchResult, BenchSender  # dxa cp does not need it

    opts = options or TransferOptions()
    remote = parse_remote(url)
    conn = _Connection(remote, identity, opts)
    try:
        welcome = await conn.open("bench", "", bench_seconds=seconds)
        socks = await _open_streams(conn, welcome.streams)
        sender = BenchSender(socks, Sealer(conn.key, conn.session_id, opts.wire_cipher), opts.chunk_size)
        secs, sent, intervals = await sender.run(seconds, on_interval)
        await conn.ctrl.send(Done())
        summary = await asyncio.wait_for(conn.ctrl.recv(), 30)
        if not isinstance(summary, Summary):
            raise RemoteProtocolError("expected SUMMARY")
        if sender.errors and not summary.bytes_written:
            raise TransferError(f"bench failed: {sender.errors[0]}")
    finally:
        await conn.close()
    return BenchResult(secs, sent, summary.bytes_written, intervals)
