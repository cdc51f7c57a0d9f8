"""Configuration objects: frozen, validated at construction, never read from env or files here.

The CLI (agent/cli) resolves config file < environment < flags into these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from agent.errors import ConfigError

__all__ = ["TransferOptions", "ServerConfig", "SessionLimits", "parse_size", "MIB"]

MIB = 1 << 20
MAX_CHUNK = 64 * MIB
MAX_STREAMS = 64


def _quantity(original: str, t: str, units: tuple[tuple[str, int], ...], what: str, examples: str) -> float:
    t = t.strip()
    mult = 1
    for suffix, m in units:
        if t.endswith(suffix):
            t, mult = t[: -len(suffix)], m
            break
    try:
        return float(t) * mult
    except ValueError:
        raise ConfigError(f"not a {what}: {original!r} (examples: {examples})") from None


def parse_size(text: str | int) -> int:
    """'4M', '512K', '1G', '1048576' → bytes (binary multiples)."""
    if isinstance(text, int):
        return text
    value = _quantity(text, text.strip().upper().removesuffix("B").removesuffix("I"),
                      (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)), "size", "4M, 512K, 1G")
    if value <= 0 or value != int(value):
        raise ConfigError(f"not a positive whole number of bytes: {text!r}")
    return int(value)


def parse_host_port(text: str, what: str = "address") -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9400`` for IPv6) → (host without brackets, port).

    ``what`` names the flag in the error: ``ConfigError("--listen wants HOST:PORT, got ...")``."""
    host, _, port = str(text).rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{what} wants HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def parse_rate(text: str | int) -> int:
    """'200M', '1.5G', '800k', '100000' → bits per second (decimal multiples, like rsync/FDT)."""
    if isinstance(text, int):
        return text
    raw = text.strip()
    if raw.endswith(("B", "B/s", "Bps")) and not raw.endswith("bps"):  # bytes: ambiguous, say so
        raise ConfigError(f"rate {text!r}: rates are bits per second (200M, 1.5G); for bytes per second "
                          f"multiply by 8 (20MB/s = 160M)")
    value = _quantity(text, raw.lower().removesuffix("bps").removesuffix("bit/s").removesuffix("b"),
                      (("k", 10**3), ("m", 10**6), ("g", 10**9)), "rate", "200M, 1.5G, 800k bits per second")
    if not math.isfinite(value):
        raise ConfigError(f"not a finite rate: {text!r}")
    if value < 0:
        raise ConfigError(f"negative rate: {text!r}")
    return int(value)


@dataclass(frozen=True)
class TransferOptions:
    """How one transfer moves data."""

    streams: int = 4
    """Parallel TCP data connections."""
    chunk_size: int = 4 * MIB
    """Bytes per chunk: the unit of parallelism, verification and resume."""
    compress: str = "auto"
    """'auto' (zstd where a sample shrinks), 'zstd' (always) or 'off'."""
    encrypt: bool = True
    """Seal every chunk with an AEAD; False only by explicit opt-out (--no-encrypt)."""
    cipher: str = "aes256gcm"
    """'aes256gcm' or 'chacha20poly1305' (for CPUs without AES instructions)."""
    recursive: bool = False
    """Copy directory trees."""
    connect_timeout: float = 15.0
    """Seconds to establish the control connection and TLS handshake."""
    fsync: bool = False
    """When pulling (we are the receiver): fsync like ``dxa serve --fsync``."""
    keep_special_bits: bool = False
    """When pulling: keep the setuid, setgid and sticky bits of the server's files (dropped
    by default, like ``dxa serve``)."""
    rate: int = 0
    """Pace the transfer to this many bits per second of wire payload in total, push or
    pull (an aggregate token bucket across the data connections plus SO_MAX_PACING_RATE
    per socket, see agent/aio/pacing.py); 0 = as fast as possible."""
    ack_timeout: float = 30.0
    """Push (we send): seconds a data connection may hold un-acknowledged chunks with no
    progress at all (no ACK, no frame written, no byte acknowledged by TCP) before it is
    given up as lost: closed, its chunks sent again, re-joined; 0 = never.  Catches a
    connection that stays open and delivers nothing (a black-holing middlebox, a stuck
    peer), which TCP keepalive and TCP_USER_TIMEOUT do not.  A pull's sender is the
    server, which uses the default (docs/PROTOCOL.md §5)."""
    server_name: str = ""
    """The name the server's certificate must carry (``--server-name``, a node name); ""
    = the host of the URL, as TLS clients check."""

    def __post_init__(self) -> None:
        # imported here, not with this module: parse_rate and parse_size need no data path
        from agent.wire import CIPHERS

        if not (math.isfinite(self.ack_timeout) and self.ack_timeout >= 0):
            raise ConfigError("ack_timeout must be a finite number of seconds >= 0 (0 = off)")
        if self.rate < 0 or (self.rate and self.rate < 8000 * self.streams):
            raise ConfigError("rate must be 0 (unlimited) or at least 8 kbit/s per stream")
        if not 1 <= self.streams <= MAX_STREAMS:
            raise ConfigError(f"streams must be between 1 and {MAX_STREAMS}")
        if not 4096 <= self.chunk_size <= MAX_CHUNK:
            raise ConfigError(f"chunk size must be between 4K and {MAX_CHUNK // MIB}M")
        if self.compress not in ("auto", "zstd", "off"):
            raise ConfigError("compress must be auto, zstd or off")
        if self.cipher not in CIPHERS or self.cipher == "none":
            raise ConfigError("cipher must be aes256gcm or chacha20poly1305")

    @property
    def wire_cipher(self) -> str:
        return self.cipher if self.encrypt else "none"

    @classmethod
    def for_test(cls, **kw) -> "TransferOptions":
        kw.setdefault("streams", 2)
        kw.setdefault("chunk_size", 64 << 10)
        kw.setdefault("connect_timeout", 5.0)
        return cls(**kw)


@dataclass(frozen=True)
class SessionLimits:
    """What a peer may make one receiving session hold (docs/PROTOCOL.md, "Limits").

    A MANIFEST that goes past any of them ends the session with a RemoteProtocolError
    before anything is planned, opened or allocated for it."""

    max_file_chunks: int = 524_160
    """Chunks in one file.  Its chunk manifest (FILE_END, 32 bytes a chunk) must fit one
    16 MiB control frame: 2 TiB at the default 4 MiB chunk size, 32 TiB at 64 MiB."""
    max_entries: int = 1 << 21
    """Manifest entries (files, directories, links) in one session: 2,097,152."""
    max_chunks: int = 1 << 23
    """Chunks of all the files of one session together: 8,388,608 (32 TiB at 4 MiB).  The
    receiver keeps about 9 bytes per chunk from the moment a file is listed."""

    def __post_init__(self) -> None:
        for name in ("max_file_chunks", "max_entries", "max_chunks"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a whole number >= 1")


@dataclass(frozen=True)
class ServerConfig:
    """The receiving daemon."""

    root: str
    """Directory the daemon serves; it writes nowhere else (except its journal)."""
    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 7400
    """TCP port for control and data connections (0: pick a free one)."""
    state_dir: str = ""
    fsync: bool = False
    """fsync each file before renaming it into place and fdatasync partial files before
    the journal records their chunks: survives power loss, costs disk-speed writes.
    Without it, a killed daemon loses nothing (the page cache outlives the process) and
    resumed chunks are re-verified from disk, but a power loss may cost recently
    finished files (the same contract as rsync and GridFTP by default)."""
    """Where the resume journal lives; default ``<root>/.dxa``."""
    max_streams: int = 16
    """Upper bound on data connections per session."""
    max_chunk: int = MAX_CHUNK
    """Largest chunk accepted from a client."""
    limits: SessionLimits = SessionLimits()
    """What one client may make a session hold (entries, chunks)."""
    handshake_timeout: float = 10.0
    """Seconds a new connection has, from accept, to send its first bytes and complete TLS
    and HELLO, or its JOIN: one deadline for all of it (docs/HARDENING.md, "Daemon limits")."""
    max_sessions: int = 64
    """Concurrent sessions in all; more are refused with ERROR ("server busy")."""
    max_sessions_per_peer: int = 32
    """Concurrent sessions of one peer (certificate name): one node cannot take every slot."""
    idle_timeout: float = 600.0
    """Seconds a session may go with no control message, no data byte and no work of our own
    (planning, verifying, finishing files) before it is ended and its destinations released;
    0 = never.  Catches a stopped or vanished client whose TCP connection stays up."""
    max_unauthenticated: int = 128
    """Connections at once that have not yet completed TLS (control) or a valid JOIN (data);
    a new one beyond this closes the oldest such connection."""
    max_handshakes: int = 32
    """TLS handshakes in progress at once (each holds OpenSSL state); one more takes the slot
    of the oldest handshake that has run for over a second, or waits for one (holding only a
    socket) within its handshake timeout."""
    metrics: str = ""
    """``HOST:PORT`` to serve Prometheus metrics on (port 0: a free one); empty: off."""
    buffered_writes: bool = False
    """Write every chunk through the page cache.  By default whole aligned chunks of files
    of 8 MiB and more are written with O_DIRECT where the file system has it (no copy into
    the page cache: the receiver's largest CPU cost); see docs/ARCHITECTURE.md, "Durability"."""
    max_open_files: int = 64
    """Descriptors one session keeps open on partial files (least recently written closed
    first, re-opened when written again): a manifest of many files costs no descriptor per
    file; see docs/ARCHITECTURE.md, "Receiving store"."""
    keep_special_bits: bool = False
    """Keep the setuid, setgid and sticky bits a client's files and directories carry; by
    default they are dropped (a peer must not hand the daemon's user a setuid program)."""

    def __post_init__(self) -> None:
        if not self.root:
            raise ConfigError("a root directory is required")
        if not 0 <= self.port <= 65535:
            raise ConfigError("port must be 0..65535")
        if not 1 <= self.max_streams <= MAX_STREAMS:
            raise ConfigError(f"max_streams must be between 1 and {MAX_STREAMS}")
        for name in ("max_sessions", "max_sessions_per_peer", "max_unauthenticated", "max_handshakes"):
            if not 1 <= getattr(self, name) <= 1_000_000:
                raise ConfigError(f"{name} must be between 1 and 1000000")
        if not (math.isfinite(self.handshake_timeout) and self.handshake_timeout > 0):
            raise ConfigError("handshake_timeout must be a finite number of seconds > 0")
        if not (math.isfinite(self.idle_timeout) and self.idle_timeout >= 0):
            raise ConfigError("idle_timeout must be a finite number of seconds >= 0 (0 = never)")
        if self.max_open_files < 4:
            raise ConfigError("max_open_files must be at least 4")

    @property
    def journal_path(self) -> str:
        import os

        return os.path.join(self.state_dir or os.path.join(self.root, ".dxa"), "journal.sqlite")

    @classmethod
    def for_test(cls, root: str, **kw) -> "ServerConfig":
        kw.setdefault("port", 0)
        kw.setdefault("handshake_timeout", 5.0)
        return cls(root=root, **kw)
