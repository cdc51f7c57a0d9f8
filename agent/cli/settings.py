"""Every setting of the ``dxa`` command: one table, read by the flags, the environment and the config file.

A setting is a key in a section of the TOML config file (the section is named after the
command: ``[serve]``, ``[cp]``, ``[bench]``, ``[controller]``, ``[init]``; ``[identity]``
for ``--ca/--cert/--key`` of every command), the argparse ``dest`` of its flag, an optional
``DXA_*`` environment variable and a kind: which TOML types it accepts and how text (from
the environment or a flag) converts.  A value resolves as default < config file <
environment < flag.

Rules: the config file is checked whole when it is read, whatever the command: an unknown
section or key, or a value of the wrong type, is a ConfigError naming the file, the section
and the key.  This module reads no file but the one it is given and never touches argparse
beyond reading attributes of a parsed namespace; messages are for people, exit codes are
main.py's business.

Flags that are not settings, so have no key (``ONE_SHOT``): what to act on (SRC/DST, the
bench URL, ``-r``, ``init --issue/--out/--csr/--sign/--renew/--revoke``, ``--server-name``), how to print this run (``--json``, ``-q``,
``-v``), and where the config itself is (``--home``, ``--config``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.errors import ConfigError

__all__ = ["ONE_SHOT", "SECTIONS", "SETTINGS", "Config", "Resolved", "Setting", "load_config", "resolve", "suggest"]


@dataclass(frozen=True)
class Setting:
    """One settable value."""

    section: str
    """Config-file section, named after the command (``identity``: every command)."""
    key: str
    """Key in the section; also the argparse ``dest`` of the flag."""
    kind: str
    """``str``, ``int``, ``float``, ``bool``, ``size`` (``"4M"`` or bytes), ``rate`` (``"1.5G"`` or bits/s),
    ``list`` (of strings; comma-separated in the environment)."""
    default: object = None
    """Used when nothing else says; None: unset (the command decides or refuses)."""
    env: str | None = None
    """``DXA_*`` variable, or None where a name would be ambiguous or pointless."""
    help: str = ""
    """One line for ``dxa config`` and the example file."""
    choices: tuple[str, ...] = ()
    flag: str = ""
    """The flag, for messages (default ``--key-with-dashes``)."""

    @property
    def option(self) -> str:
        return self.flag or "--" + self.key.replace("_", "-")


def _transfer(section: str) -> list[Setting]:
    """cp and bench share the data-path flags (the ``xfer`` parent parser) and their env variables."""
    return [
        Setting(section, "streams", "int", 4, "DXA_STREAMS", "parallel TCP data connections"),
        Setting(section, "chunk_size", "size", "4M", "DXA_CHUNK_SIZE", "chunk size: the unit of parallelism, "
                "verification and resume"),
        Setting(section, "compress", "str", "auto", "DXA_COMPRESS", "auto, off or zstd",
                choices=("auto", "off", "zstd")),
        Setting(section, "cipher", "str", "aes256gcm", "DXA_CIPHER", "AEAD for chunks",
                choices=("aes256gcm", "chacha20poly1305")),
        Setting(section, "no_encrypt", "bool", False, "DXA_NO_ENCRYPT", "send chunks in the clear "
                "(still authenticated and verified)"),
        Setting(section, "rate", "rate", "0", "DXA_RATE", "pace to this total rate, bits/s (0: unlimited)"),
        Setting(section, "fsync", "bool", False, "DXA_FSYNC", "when pulling: fsync files before their final name"),
        Setting(section, "ack_timeout", "float", 30.0, "DXA_ACK_TIMEOUT", "push: seconds a data connection may "
                "make no progress before it is given up and its chunks resent (0: never)"),
    ]


SETTINGS: tuple[Setting, ...] = (
    Setting("identity", "ca", "str", None, "DXA_CA", "CA bundle to trust (default $DXA_HOME/ca.pem)"),
    Setting("identity", "cert", "str", None, "DXA_CERT", "our certificate (default $DXA_HOME/node.pem)"),
    Setting("identity", "key", "str", None, "DXA_KEY", "our private key (default $DXA_HOME/node.key)"),
    Setting("identity", "crl", "str", None, "DXA_CRL", "the CA's revocation list (PEM), checked on every "
            "handshake; dxa serve re-reads it on SIGHUP (default: none)"),

    Setting("init", "name", "str", None, None, "this node's name, the certificate CN (default: the host name)"),
    Setting("init", "sans", "list", (), None, "the DNS names and IP addresses the certificate names besides the "
            "node name (default: localhost, 127.0.0.1, ::1, the host name)", flag="--san"),
    Setting("init", "days", "int", 825, None, "validity of a certificate issued, in days"),

    Setting("serve", "listen", "str", "127.0.0.1:7400", "DXA_LISTEN", "HOST:PORT to listen on"),
    Setting("serve", "root", "str", None, "DXA_ROOT", "directory to serve (required)"),
    Setting("serve", "state_dir", "str", None, "DXA_STATE_DIR", "resume journal location (default ROOT/.dxa)"),
    Setting("serve", "port_file", "str", None, "DXA_PORT_FILE", "write the bound port here"),
    Setting("serve", "fsync", "bool", False, "DXA_FSYNC", "files and journaled chunks survive power loss"),
    Setting("serve", "metrics", "str", None, "DXA_METRICS", "HOST:PORT for Prometheus metrics (off if unset)"),
    Setting("serve", "buffered_writes", "bool", False, "DXA_BUFFERED_WRITES", "write every chunk through the page "
            "cache (default: whole chunks of big files with O_DIRECT where the file system has it)"),
    Setting("serve", "max_sessions", "int", 64, "DXA_MAX_SESSIONS", "concurrent sessions in all; more are "
            "refused (server busy)"),
    Setting("serve", "max_sessions_per_peer", "int", 32, "DXA_MAX_SESSIONS_PER_PEER", "concurrent sessions of "
            "one peer (certificate name)"),
    Setting("serve", "idle_timeout", "float", 600.0, "DXA_IDLE_TIMEOUT", "seconds a session may show no "
            "control message, no data and no work before it ends and releases its files (0: never)"),
    Setting("serve", "handshake_timeout", "float", 10.0, "DXA_HANDSHAKE_TIMEOUT", "seconds from accept to "
            "a complete TLS handshake and HELLO, or a JOIN"),
    Setting("serve", "max_unauthenticated", "int", 128, "DXA_MAX_UNAUTHENTICATED", "connections at once "
            "before TLS or JOIN; one more closes the oldest"),
    Setting("serve", "max_handshakes", "int", 32, "DXA_MAX_HANDSHAKES", "TLS handshakes in progress at once; "
            "one more closes the oldest over 1 s old, or waits"),
    Setting("serve", "keep_special_bits", "bool", False, "DXA_KEEP_SPECIAL_BITS", "keep the setuid, setgid and "
            "sticky bits of received files (default: dropped)"),
    Setting("serve", "max_open_files", "int", 64, "DXA_MAX_OPEN_FILES", "descriptors one session keeps open on "
            "partial files"),
    Setting("serve", "grpc", "str", None, "DXA_GRPC", "HOST:PORT for the TransferService (off if unset)"),
    Setting("serve", "grpc_port_file", "str", None, "DXA_GRPC_PORT_FILE", "write the bound gRPC port here"),
    Setting("serve", "clients", "list", (), "DXA_CLIENTS", "with grpc: the only nodes (certificate CNs) that may "
            "use the TransferService, besides this agent (empty: every node of the CA)", flag="--client"),
    Setting("serve", "controller", "str", None, "DXA_CONTROLLER", "scheduler HOST:PORT (off if unset)"),
    Setting("serve", "site", "str", None, "DXA_SITE", "with controller: this agent's site"),
    Setting("serve", "capacity", "rate", None, "DXA_CAPACITY", "with controller: this agent's link, bits/s"),

    *_transfer("cp"),
    Setting("cp", "no_progress", "bool", False, "DXA_NO_PROGRESS", "no progress bar even on a terminal"),
    Setting("cp", "keep_special_bits", "bool", False, "DXA_KEEP_SPECIAL_BITS", "when pulling: keep setuid, setgid "
            "and sticky bits (default: dropped)"),

    *_transfer("bench"),
    Setting("bench", "seconds", "float", 10.0, "DXA_BENCH_SECONDS", "test duration in seconds"),

    # The scheduler's variables carry a prefix: DXA_LISTEN and DXA_CONTROLLER belong to dxa serve.
    Setting("controller", "listen", "str", None, "DXA_CONTROLLER_LISTEN", "HOST:PORT to listen on (required)"),
    Setting("controller", "topology", "str", None, "DXA_CONTROLLER_TOPOLOGY", "sites and links, TOML (required)"),
    Setting("controller", "state", "str", None, "DXA_CONTROLLER_STATE", "SQLite ledger file (required)"),
    Setting("controller", "port_file", "str", None, "DXA_CONTROLLER_PORT_FILE", "write the bound port here"),
    Setting("controller", "lease_timeout", "float", 30.0, "DXA_CONTROLLER_LEASE_TIMEOUT",
            "seconds without a heartbeat before an agent loses its reservations"),
    Setting("controller", "metrics", "str", None, "DXA_CONTROLLER_METRICS", "HOST:PORT for the scheduler's "
            "Prometheus metrics (off if unset)"),
    Setting("controller", "admins", "list", (), "DXA_CONTROLLER_ADMINS",
            "node names (certificate CNs) allowed every scheduler call", flag="--admin"),
)

SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(s.section for s in SETTINGS))

ONE_SHOT: Mapping[str, str] = {
    "home": "locates the config file, so cannot come from it ($DXA_HOME does)",
    "config": "is the config file",
    "verbose": "log detail is chosen per run",
    "json": "output format of this run",
    "quiet": "output of this run",
    "paths": "what to copy",
    "recursive": "what to copy: depends on SRC",
    "url": "what to measure",
    "issue": "a one-off action of dxa init",
    "out": "goes with --issue and --sign",
    "csr": "a one-off action of dxa init",
    "sign": "a one-off action of dxa init",
    "renew": "a one-off action of dxa init",
    "revoke": "a one-off action of dxa init",
    "server_name": "names the server of this run (its certificate must carry it)",
}
"""argparse ``dest`` of flags that deliberately have no key, and why (tests/unit/test_cli_config.py checks)."""

_BY_KEY = {(s.section, s.key): s for s in SETTINGS}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")
_EXPECTED = {"str": "a string", "int": "a whole number", "float": "a number", "bool": "true or false",
             "size": 'a size such as "4M" or a number of bytes', "rate": 'a rate such as "1.5G" or bits/s',
             "list": "a list of strings"}


@dataclass(frozen=True)
class Config:
    """A config file, checked and converted; ``path`` None: there is none."""

    path: str | None = None
    values: Mapping[str, Mapping[str, object]] = field(default_factory=dict)


@dataclass(frozen=True)
class Resolved:
    value: object
    source: str
    """``flag``, ``env``, ``file`` or ``default``."""
    origin: str = ""
    """The flag, the variable or the file the value came from."""


def suggest(word: str, candidates) -> str:
    import difflib  # only for a mistake: not on every run

    close = difflib.get_close_matches(word, list(candidates), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _convert(s: Setting, value: object, where: str, *, text: bool) -> object:
    """Check ``value`` against the kind of ``s``; text (env, untyped flags) is converted first."""
    if text and isinstance(value, str):
        t = value.strip()
        try:
            if s.kind == "int":
                value = int(t)
            elif s.kind == "float":
                value = float(t)
            elif s.kind == "bool" and t.lower() in _TRUE + _FALSE:
                value = t.lower() in _TRUE
            elif s.kind == "list":
                value = [x.strip() for x in t.split(",") if x.strip()]
        except ValueError:
            pass  # reported below as the wrong type
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "size": isinstance(value, (str, int)) and not isinstance(value, bool),
        "rate": isinstance(value, (str, int)) and not isinstance(value, bool),
        "list": isinstance(value, (list, tuple)) and all(isinstance(x, str) for x in value),
    }[s.kind]
    if not ok:
        raise ConfigError(f"{where}: expected {_EXPECTED[s.kind]}, got {value!r}")
    if s.choices and value not in s.choices:
        raise ConfigError(f"{where}: expected one of {', '.join(s.choices)}, got {value!r}")
    if s.kind == "float":
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    elif s.kind in ("size", "rate"):
        from agent.config import parse_rate, parse_size

        try:
            number = (parse_size if s.kind == "size" else parse_rate)(value)  # a plain number passes unchecked
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if number < 0 or (s.kind == "size" and number == 0):
            bound = "above zero" if s.kind == "size" else "zero or more"
            raise ConfigError(f"{where}: expected {_EXPECTED[s.kind]}, {bound}, got {value!r}")
    elif s.kind == "list":
        value = list(value)
    return value


def load_config(path: str, *, explicit: bool = False) -> Config:
    """Read and check the TOML file at ``path``; a missing file is an empty config unless ``explicit``."""
    if not os.path.exists(path):
        if explicit:
            raise ConfigError(f"{path}: config file not found")
        return Config()
    import tomllib  # not imported when there is no file to read

    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    values: dict[str, dict[str, object]] = {}
    known = ", ".join(f"[{x}]" for x in SECTIONS)
    for section, table in raw.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {section!r} is outside any section; keys go under one of {known}")
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown section [{section}]{suggest(section, SECTIONS)}; known: {known}")
        keys = [s.key for s in SETTINGS if s.section == section]
        for key, value in table.items():
            s = _BY_KEY.get((section, key))
            if s is None:
                raise ConfigError(f"{path}: [{section}] unknown key {key!r}{suggest(key, keys)}")
            values.setdefault(section, {})[key] = _convert(s, value, f"{path}: [{section}] {key}", text=False)
    return Config(path, values)


def resolve(section: str, config: Config, args=None, environ: Mapping[str, str] = os.environ) -> dict[str, Resolved]:
    """Every setting of ``section``: default < file < env < the flag in ``args`` (None: no flags)."""
    out: dict[str, Resolved] = {}
    for s in SETTINGS:
        if s.section != section:
            continue
        flag = getattr(args, s.key, None) if args is not None else None
        if flag is not None:
            out[s.key] = Resolved(_convert(s, flag, s.option, text=True), "flag", s.option)
        elif s.env and s.env in environ:
            out[s.key] = Resolved(_convert(s, environ[s.env], f"environment {s.env}", text=True), "env", s.env)
        elif s.key in config.values.get(section, {}):
            out[s.key] = Resolved(config.values[section][s.key], "file", config.path or "")
        else:
            out[s.key] = Resolved(list(s.default) if s.kind == "list" else s.default, "default")
    return out
