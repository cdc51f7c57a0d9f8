"""The ``dxa`` command: the only place that reads argv, the environment and config files.

Settings resolve as: config file (``$DXA_HOME/config.toml`` or ``--config``) <
environment (``DXA_*``) < flags, from the one table in agent/cli/settings.py (every flag
that sets a value has a key there).  Human messages for errors are formatted here.

Start-up time counts (a small ``dxa cp`` is mostly start-up): this module imports only what
building the parser needs; a command imports its implementation, and the standard library
it alone uses (asyncio, json, logging...), inside its function.  ``build_parser`` imports
no implementation module (tests/unit/test_cli_config.py checks that ``dxa cp`` never
imports the scheduler, controller_stub).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from agent import __version__
from agent.errors import (
    AuthenticationError,
    BrokenConnectionError,
    ConfigError,
    DiskFullError,
    DxaError,
    ConnectError,
    ListenError,
    PathError,
    StorageError,
    TransferError,
)

EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE, EXIT_AUTH, EXIT_NETWORK, EXIT_STORAGE = 0, 1, 2, 3, 4, 5
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a command stopped by Ctrl-C

EPILOG = """\
config file ($DXA_HOME/config.toml, or --config FILE), one section per command;
every flag that sets a value has a key (contrib/config.example.toml lists them all):
  [identity]   ca, cert, key, crl                     (--ca/--cert/--key/--crl of every command)
  [init]       name, sans, days
  [serve]      listen, root, state_dir, port_file, fsync, buffered_writes, metrics, max_sessions,
               max_sessions_per_peer, idle_timeout, handshake_timeout, max_unauthenticated, max_handshakes,
               keep_special_bits, max_open_files, grpc, grpc_port_file, clients, controller, site, capacity
  [cp]         streams, chunk_size, compress, cipher, no_encrypt, rate, fsync, ack_timeout,
               no_progress, keep_special_bits
  [bench]      the keys of [cp] but no_progress, and seconds
  [controller] listen, topology, state, port_file, lease_timeout, metrics, admins  (dxa controller serve)
  e.g. [cp] streams = 8, chunk_size = "8M", no_encrypt = false; [controller] admins = ["ops"]
  An unknown section or key, or a value of the wrong type, is an error (exit status 2).
  No key: --home, --config, -v, --json, -q, SRC/DST, -r, the bench URL, --server-name,
  init --issue/--out/--csr/--sign/--renew/--revoke.

environment (wins over the file; flags win over both):
  DXA_HOME            identity, trust, client state and config.toml (default ~/.config/dxa)
  DXA_<KEY>           [cp], [bench] (same variables), [serve] and [identity] keys, e.g.
                      DXA_STREAMS, DXA_CHUNK_SIZE, DXA_LISTEN, DXA_ROOT, DXA_CA; booleans 1/0
                      ([init] name has none)
  DXA_BENCH_SECONDS, DXA_CONTROLLER_<KEY> (e.g. DXA_CONTROLLER_ADMINS=ops,noc)
  DXA_NO_EXTENSIONS=1 use the pure-Python twins of the compiled modules
  dxa config [SECTION...] [--json] shows every setting and where it comes from

exit status:
  0 everything arrived verified   1 transfer incomplete (re-run to resume)
  2 bad usage or configuration    3 authentication refused
  4 network failure               5 local storage failure (e.g. disk full)
  130 interrupted (Ctrl-C; re-run to resume)
  dxa cp --json prints one JSON object on every exit: "ok" and "exit" say how it ended,
  "error" why (when not ok)
"""


def _home(args) -> str:
    return os.path.expanduser(getattr(args, "home", None) or os.environ.get("DXA_HOME") or "~/.config/dxa")


def _config(args):
    """The config file, read and checked once per run (agent.cli.settings.load_config)."""
    from agent.cli.settings import load_config

    cached = getattr(args, "_config_file", None)
    if cached is None:
        explicit = getattr(args, "config", None)
        cached = load_config(explicit or os.path.join(_home(args), "config.toml"), explicit=bool(explicit))
        args._config_file = cached
    return cached


def _settings(args, section: str) -> argparse.Namespace:
    """Every setting of ``section`` (agent/cli/settings.py): default < config file < environment < flag."""
    from agent.cli.settings import resolve

    return argparse.Namespace(**{k: r.value for k, r in resolve(section, _config(args), args).items()})


def _identity(args):
    from agent.store.pki import load_identity

    ident = _settings(args, "identity")
    return load_identity(_home(args), ca=ident.ca, cert=ident.cert, key=ident.key, crl=ident.crl)


def _transfer_options(args, s: argparse.Namespace):
    """``s``: the resolved [cp] or [bench] settings."""
    from agent.config import TransferOptions, parse_rate, parse_size

    return TransferOptions(
        streams=s.streams,
        chunk_size=parse_size(s.chunk_size),
        compress=s.compress,
        encrypt=not s.no_encrypt,
        cipher=s.cipher,
        recursive=getattr(args, "recursive", False),
        rate=parse_rate(s.rate),
        fsync=s.fsync,
        ack_timeout=s.ack_timeout,
        keep_special_bits=bool(getattr(s, "keep_special_bits", False)),  # a [cp] key only
        server_name=getattr(args, "server_name", None) or "",
    )


def _setup_logging(args, *, daemon: bool = False) -> None:
    import logging

    level = logging.DEBUG if args.verbose > 1 else logging.INFO if (args.verbose or daemon) else logging.WARNING
    if getattr(args, "quiet", False) and not daemon:
        level = logging.ERROR
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if daemon else "dxa: %(message)s")


def _raise_fd_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 1 << 20), hard))


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


class _ProgressBar:
    """One line on stderr, redrawn a few times a second: bytes, %, rate, ETA, files."""

    def __init__(self, progress) -> None:
        self.p = progress
        self._last = (time.monotonic(), 0)
        self._rate = 0.0

    def draw(self, final: bool = False) -> None:
        p = self.p
        now = time.monotonic()
        t_last, b_last = self._last
        if now - t_last >= 0.5:
            inst = (p.bytes_done - b_last) / (now - t_last)
            self._rate = inst if not self._rate else 0.7 * self._rate + 0.3 * inst
            self._last = (now, p.bytes_done)
        total = max(p.bytes_total, 1)
        frac = min(p.bytes_done / total, 1.0)
        width = 24
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        left = (p.bytes_total - p.bytes_done) / self._rate if self._rate > 0 else 0
        eta = f"{int(left // 60)}:{int(left % 60):02d}" if self._rate > 0 and not final else "--:--"
        line = (f"\r[{bar}] {frac * 100:5.1f}% {_human(p.bytes_done)}/{_human(p.bytes_total)} "
                f"{self._rate * 8 / 1e9:6.2f} Gbit/s ETA {eta} files {p.files_done}/{p.files_total}")
        sys.stderr.write(line + ("\n" if final else ""))
        sys.stderr.flush()

    async def run(self) -> None:
        import asyncio

        while True:
            self.draw()
            await asyncio.sleep(0.2)


def _write_port_file(path: str | None, port: int) -> None:
    """--port-file: write the bound port atomically, so a reader never sees half of it."""
    if path:
        with open(path + ".tmp", "w") as fh:
            fh.write(str(port))
        os.replace(path + ".tmp", path)


async def _until_stopped(on_hangup=None) -> None:
    """Wait for SIGINT or SIGTERM (daemons stop cleanly on either); SIGHUP calls ``on_hangup``."""
    import asyncio
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if on_hangup is not None:
        loop.add_signal_handler(signal.SIGHUP, on_hangup)
    await stop.wait()


# -- commands --------------------------------------------------------------------------
def cmd_init(args) -> int:
    import json

    from agent.store import pki

    home = _home(args)
    actions = [f for f in ("issue", "csr", "sign", "renew", "revoke") if getattr(args, f)]
    if len(actions) > 1:
        raise ConfigError(f"dxa init: one of --issue, --csr, --sign, --renew, --revoke at a time "
                          f"(got {', '.join('--' + a for a in actions)})")
    s = _settings(args, "init")
    if s.days <= 0:
        raise ConfigError(f"--days must be a positive number of days, got {s.days}")
    sans = list(s.sans or ())
    if args.out and not (args.issue or args.sign or args.revoke):
        raise ConfigError("--out goes with --issue, --sign or --revoke")
    if args.issue:
        if not args.out:
            raise ConfigError("--issue needs --out DIR")
        ident = pki.issue_cert(home, args.issue, args.out, sans, s.days)
        print(f"issued a certificate for {ident.name!r} in {args.out} (CA: {ident.ca_cert})")
        return EXIT_OK
    if args.csr:
        key, created = pki.make_csr(home, s.name, args.csr, sans)
        print(f"wrote the signing request {args.csr} for the key {key} ({'new' if created else 'existing'}); "
              f"have the CA sign it (dxa init --sign {os.path.basename(args.csr)} --out DIR) and put DIR's "
              f"node.pem and ca.pem in {home}")
        return EXIT_OK
    if args.sign:
        if not args.out:
            raise ConfigError("--sign needs --out DIR")
        name, cert = pki.sign_csr(home, args.sign, args.out, sans, s.days)
        print(f"signed a certificate for {name!r}: {cert} (with the CA's ca.pem beside it)")
        return EXIT_OK
    if args.renew:
        ident = _settings(args, "identity")
        cert = pki.renew(home, sans, s.days, cert=ident.cert, key=ident.key)
        print(f"renewed {cert} until {pki.cert_expiry(cert).date().isoformat()} (same key); "
              f"send SIGHUP to a running dxa serve")
        return EXIT_OK
    if args.revoke:
        crl, added = pki.revoke(home, args.revoke, args.out)
        what = ", ".join(f"{n:x}" for n in added) if added else "nothing new"
        print(f"revoked {what}; the revocation list is {crl} (give it to every node: --crl, then SIGHUP)")
        return EXIT_OK
    ident, created = pki.init_home(home, s.name, sans, s.days)
    if args.json:
        print(json.dumps({"home": home, "name": ident.name, "created": [str(p) for p in created],
                          "ca": str(ident.ca_cert), "cert": str(ident.cert), "key": str(ident.key)}))
    elif created:
        print(f"created {len(created)} file(s) in {home} for node {ident.name!r}:")
        for p in created:
            print(f"  {p}")
    else:
        print(f"{home}: identity for {ident.name!r} already present; nothing to do")
    return EXIT_OK


def cmd_serve(args) -> int:
    import asyncio
    import logging

    from agent._native import IMPLEMENTATION
    from agent.aio.server import Server
    from agent.config import ServerConfig, parse_host_port

    _setup_logging(args, daemon=True)
    s = _settings(args, "serve")
    listen, root = s.listen, s.root
    if not root:
        raise ConfigError("dxa serve needs --root DIR (or root = ... in [serve] of the config file)")
    host, port = parse_host_port(listen, "--listen")
    config = ServerConfig(root=root, host=host, port=port,
                          state_dir=s.state_dir or "", fsync=s.fsync, metrics=s.metrics or "",
                          buffered_writes=s.buffered_writes, max_sessions=s.max_sessions,
                          max_sessions_per_peer=s.max_sessions_per_peer, idle_timeout=s.idle_timeout,
                          handshake_timeout=s.handshake_timeout, max_unauthenticated=s.max_unauthenticated,
                          max_handshakes=s.max_handshakes, keep_special_bits=s.keep_special_bits,
                          max_open_files=s.max_open_files)
    controller = _controller_settings(s)
    identity = _identity(args)
    _raise_fd_limit()
    log = logging.getLogger("agent.serve")
    log.info("dxa %s, node %s, native code: %s", __version__, identity.name, IMPLEMENTATION)

    async def main() -> None:
        from agent.service.identity import IdentityKeeper

        server = Server(config, identity)
        await server.start()
        keeper = IdentityKeeper(identity, lambda: _identity(args), server, server.metrics)
        watch = asyncio.get_running_loop().create_task(keeper.run())  # expiry: now and daily
        link = await _start_scheduler_link(controller, identity, f"{config.host}:{server.port}")
        try:
            # --grpc: the TransferService (or None)
            transfers = await _start_transfers(s, config, identity, link, server.metrics)
        except BaseException:
            if link is not None:
                await link.close()
            raise
        _write_port_file(s.port_file, server.port)
        await _until_stopped(on_hangup=keeper.reload)
        log.info("shutting down")
        watch.cancel()
        if transfers is not None:
            await _stop_transfers(*transfers)
        if link is not None:
            await link.close()
        await server.close()

    asyncio.run(main())
    return EXIT_OK


def _controller_settings(s: argparse.Namespace) -> tuple[str, str, int] | None:
    """``--controller HOST:PORT`` with ``--site`` and ``--capacity`` (bits/s), or None (the default: no scheduler)."""
    from agent.config import parse_host_port, parse_rate

    target = s.controller
    if not target:
        if s.site or s.capacity:  # they mean something only to a scheduler
            raise ConfigError("--site and --capacity (site, capacity in [serve]) describe this agent to a "
                              "scheduler: give --controller HOST:PORT too, or drop them")
        return None
    parse_host_port(target, "--controller")
    site, capacity = s.site, s.capacity
    if not site or not capacity:
        raise ConfigError("dxa serve --controller needs --site NAME and --capacity RATE (this agent's link, bits/s)")
    rate = parse_rate(capacity)
    if rate <= 0:
        raise ConfigError(f"--capacity must be positive, got {capacity!r}")
    return target, site, rate


async def _start_scheduler_link(controller, identity, address: str):
    """``dxa serve --controller``: register with the scheduler and heartbeat in the background."""
    if controller is None:
        return None
    from agent.service.scheduling import SchedulerLink

    target, site, capacity = controller
    link = SchedulerLink(target, identity, site=site, capacity_bps=capacity, addresses=[address])
    await link.start()
    return link


async def _start_transfers(s: argparse.Namespace, config, identity, link=None, metrics=None):
    """``dxa serve --grpc``: the TransferService and its jobs, next to the data port, on the same loop."""
    from agent.service.grpc_server import start_daemon_service

    listen = s.grpc
    if not listen:
        return None
    db = os.path.join(os.path.dirname(config.journal_path), "transfers.sqlite")
    service = await start_daemon_service(listen, config.root, db, identity, scheduler=link, clients=s.clients or None,
                                         metrics=metrics)
    _write_port_file(s.grpc_port_file, service[0].port)
    return service


async def _stop_transfers(server, manager) -> None:
    from agent.service.grpc_server import stop_daemon_service

    await stop_daemon_service(server, manager)


def cmd_cp(args) -> int:
    import asyncio

    from agent.aio.client import copy
    from agent.aio.session import Progress

    _setup_logging(args)
    s = _settings(args, "cp")
    opts = _transfer_options(args, s)
    identity = _identity(args)
    _raise_fd_limit()
    progress = Progress()
    show_bar = sys.stderr.isatty() and not args.quiet and not args.json and not s.no_progress
    bar = _ProgressBar(progress) if show_bar else None

    async def main():
        task = asyncio.get_running_loop().create_task(bar.run()) if bar else None
        try:
            return await copy(args.paths[:-1], args.paths[-1], identity=identity, options=opts, progress=progress)
        finally:
            if task:
                task.cancel()
                bar.draw(final=True)

    result = asyncio.run(main())
    code = EXIT_OK if result.verified else EXIT_INCOMPLETE
    if args.json:
        import json

        out = result.as_dict()
        out.update(ok=code == EXIT_OK, exit=code)
        if code != EXIT_OK:
            out["error"] = result.errors[0] if result.errors else "incomplete; re-run the same command to resume"
        print(json.dumps(out))
    elif not args.quiet:
        print(f"{result.files_ok}/{result.files} files, {_human(result.bytes_delivered)} moved, "
              f"{_human(result.bytes_skipped)} already there, in {result.seconds:.2f} s = {result.gbps:.3f} Gbit/s "
              f"({'encrypted' if result.encrypted else 'NOT encrypted'}, "
              f"{'all verified' if result.verified else 'INCOMPLETE'})")
    for e in result.errors[:20]:
        print(f"dxa: {e}", file=sys.stderr)
    return code


def cmd_bench(args) -> int:
    import asyncio
    import json

    from agent.aio.client import bench

    _setup_logging(args)
    s = _settings(args, "bench")
    opts = _transfer_options(args, s)
    identity = _identity(args)

    def interval(iv) -> None:
        if not args.json and not args.quiet:
            print(f"[SUM] {iv.start:6.2f}-{iv.end:6.2f} sec  {_human(iv.bytes):>10}  {iv.gbps:7.3f} Gbit/s", flush=True)

    if not args.json and not args.quiet:
        print(f"dxa bench to {args.url}: {opts.streams} streams, chunk {_human(opts.chunk_size)}, "
              f"{'encrypted (' + opts.cipher + ')' if opts.encrypt else 'NOT encrypted'}, BLAKE3-verified")
    res = asyncio.run(bench(args.url, identity=identity, seconds=s.seconds, options=opts, on_interval=interval))
    if args.json:
        print(json.dumps({"seconds": round(res.seconds, 4), "bytes_sent": res.bytes_sent,
                          "bytes_verified": res.bytes_verified, "gbps": round(res.gbps, 4), "streams": opts.streams,
                          "encrypted": opts.encrypt,
                          "intervals": [{"start": round(i.start, 3), "end": round(i.end, 3), "bytes": i.bytes,
                                         "gbps": round(i.gbps, 4)} for i in res.intervals]}))
    elif not args.quiet:
        print("- " * 30)
        print(f"[SUM]   0.00-{res.seconds:6.2f} sec  {_human(res.bytes_verified):>10}  {res.gbps:7.3f} Gbit/s  "
              f"verified by the receiver")
    return EXIT_OK if res.bytes_verified else EXIT_INCOMPLETE


def cmd_controller_serve(args) -> int:
    """``dxa controller serve``: the scheduler's gRPC server (implemented in controller_stub.server)."""
    import asyncio
    import logging

    from agent.config import parse_host_port
    from controller_stub.errors import LedgerStoreError
    from controller_stub.ledger import LedgerConfig
    from controller_stub.server import ControllerServer
    from controller_stub.topology import load_topology

    _setup_logging(args, daemon=True)
    s = _settings(args, "controller")
    for key in ("listen", "topology", "state"):
        if not getattr(s, key):
            raise ConfigError(f"dxa controller serve needs --{key} (or {key} = ... in [controller] of the config file)")
    host, port = parse_host_port(s.listen, "--listen")
    if not s.lease_timeout > 0:  # finite: the settings table checks floats
        raise ConfigError(f"--lease-timeout must be a positive number of seconds, got {s.lease_timeout}")
    topology = load_topology(s.topology)
    identity = _identity(args)
    metrics = None
    if s.metrics:

        metrics = parse_host_port(s.metrics, "--metrics")
    log = logging.getLogger("controller_stub.serve")
    log.info("dxa %s controller, node %s, topology %s", __version__, identity.name, s.topology)

    async def main() -> None:
        server = ControllerServer(identity, topology, s.state, host=host, port=port,
                                  config=LedgerConfig(lease_timeout=s.lease_timeout), admins=s.admins,
                                  metrics=metrics)
        await server.start()
        try:
            _write_port_file(s.port_file, server.port)
            await _until_stopped()
            log.info("shutting down")
        finally:
            await server.stop()

    try:
        asyncio.run(main())
    except LedgerStoreError as exc:  # a cannot-listen is main()'s ListenError (exit 4)
        print(f"dxa: {exc}", file=sys.stderr)
        return EXIT_STORAGE
    return EXIT_OK


def cmd_config(args) -> int:
    """``dxa config [SECTION...]``: the effective settings, without flags, and where each comes from."""
    import json

    from agent.cli.settings import SECTIONS, resolve, suggest

    for section in args.sections:
        if section not in SECTIONS:
            raise ConfigError(f"no section {section!r}{suggest(section, SECTIONS)}; sections: {', '.join(SECTIONS)}")
    cfg = _config(args)
    shown = {section: resolve(section, cfg) for section in (args.sections or SECTIONS)}
    if args.json:
        print(json.dumps({"config": cfg.path, "settings": {
            section: {key: {"value": r.value, "source": r.source, "origin": r.origin or None} for key, r in rs.items()}
            for section, rs in shown.items()}}))
        return EXIT_OK

    def text(value) -> str:
        if value is None or value == []:
            return "-"
        if isinstance(value, bool):
            return "true" if value else "false"
        return ", ".join(value) if isinstance(value, list) else str(value)

    print(f"config file: {cfg.path or os.path.join(_home(args), 'config.toml') + ' (none)'}")
    rows = [("SECTION", "KEY", "VALUE", "FROM")] + [
        (section, key, text(r.value), {"file": "file", "env": f"env {r.origin}"}.get(r.source, r.source))
        for section, rs in shown.items() for key, r in rs.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
    return EXIT_OK


# -- argument parsing --------------------------------------------------------------------
def _keys_epilog(section: str) -> str:
    return (f"Options that set a value can also come from [{section}] of the config file or DXA_* variables "
            f"(flags win; see dxa --help); dxa config {section} shows the effective values.")


def build_parser() -> argparse.ArgumentParser:
    # Every flag that sets a value has a key in agent/cli/settings.py (flags default to None: "not given").
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--home", metavar="DIR",
                       help="identity and state directory (default $DXA_HOME or ~/.config/dxa)")
    where.add_argument("--config", metavar="FILE", help="TOML config file (default $DXA_HOME/config.toml)")
    common = argparse.ArgumentParser(add_help=False, parents=[where])
    common.add_argument("--ca", metavar="PEM", help="trust this CA bundle instead of $DXA_HOME/ca.pem")
    common.add_argument("--cert", metavar="PEM", help="our certificate instead of $DXA_HOME/node.pem")
    common.add_argument("--key", metavar="PEM", help="our private key instead of $DXA_HOME/node.key")
    common.add_argument("--crl", metavar="PEM",
                        help="refuse peers whose certificate this revocation list of the CA names (checked on "
                             "every handshake; dxa serve re-reads it on SIGHUP)")
    common.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")

    xfer = argparse.ArgumentParser(add_help=False)
    xfer.add_argument("--streams", "-P", metavar="N", help="parallel TCP data connections (default 4)")
    xfer.add_argument("--chunk-size", dest="chunk_size", metavar="SIZE",
                      help="chunk size, e.g. 4M (default); the unit of parallelism, verification and resume")
    xfer.add_argument("--compress", choices=("auto", "off", "zstd"),
                      help="auto: zstd where a sample of the chunk shrinks (default); zstd: always; off: never")
    xfer.add_argument("--cipher", choices=("aes256gcm", "chacha20poly1305"),
                      help="AEAD for chunks (default aes256gcm; chacha20poly1305 for CPUs without AES-NI)")
    xfer.add_argument("--no-encrypt", action="store_true", default=None,
                      help="send chunks in the clear (still authenticated and BLAKE3-verified)")
    xfer.add_argument("--encrypt", dest="no_encrypt", action="store_false", default=None,
                      help="encrypt even if the config file or DXA_NO_ENCRYPT says no_encrypt (the default)")
    xfer.add_argument("--rate", metavar="BITS",
                      help="pace the copy (push or pull) to this total rate in bits/s, e.g. 200M, 1.5G: one "
                           "token bucket across the connections plus kernel pacing per connection "
                           "(default: unlimited)")
    xfer.add_argument("--fsync", action=argparse.BooleanOptionalAction,
                      help="when pulling: fsync files before they take their final name (see dxa serve --fsync)")
    xfer.add_argument("--ack-timeout", dest="ack_timeout", type=float, metavar="SECONDS",
                      help="when pushing: a data connection that makes no progress for this long (no ACK, "
                           "nothing written, nothing acknowledged by TCP) is given up, its chunks sent again on "
                           "a new one (default 30; 0: never)")
    xfer.add_argument("--server-name", dest="server_name", metavar="NODE",
                      help="the name the server's certificate must carry, e.g. its node name (default: the HOST "
                           "of the URL; a certificate that names neither is refused, exit status 3)")
    xfer.add_argument("--json", action="store_true", help="print one JSON object at the end")
    xfer.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary line")

    p = argparse.ArgumentParser(
        prog="dxa", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="dxa: chunked, parallel, resumable, end-to-end encrypted and verified bulk data transfer.")
    p.add_argument("--version", action="version", version=f"dxa {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("init", parents=[common], help="create a local CA and this node's certificate (if missing)",
                       epilog=_keys_epilog("init"),
                       description="Create, if missing, a certificate authority (ca.pem, ca.key) and this node's key "
                                   "and certificate (node.pem, node.key) in $DXA_HOME. Processes sharing a $DXA_HOME "
                                   "trust each other; a node signed by another CA is refused. A client checks that "
                                   "the server's certificate names the host it dialled (--san). To let another "
                                   "machine in, keeping its key there: dxa init --csr FILE on it, dxa init --sign "
                                   "FILE --out DIR here, then copy DIR's node.pem and ca.pem to it (or --issue, "
                                   "which makes the key here).")
    s.add_argument("--name", help="this node's name (certificate CN; default: the host name)")
    s.add_argument("--san", dest="sans", action="append", metavar="DNS_OR_IP",
                   help="a DNS name or IP address clients dial this node by; repeat for several (the node name is "
                        "always one; default: localhost, 127.0.0.1, ::1 and the host name too)")
    s.add_argument("--days", type=int, metavar="N", help="validity of the certificate issued (default 825)")
    s.add_argument("--issue", metavar="NAME", help="instead: sign a certificate (and make a key) for another node NAME")
    s.add_argument("--csr", metavar="FILE",
                   help="instead: write a signing request for this node to FILE (the key, made if missing, stays "
                        "in $DXA_HOME/node.key)")
    s.add_argument("--sign", metavar="CSR", help="instead: sign the request CSR with this home's CA (needs --out)")
    s.add_argument("--renew", action="store_true",
                   help="instead: a new certificate for this node's key, name and names (this home's CA), then "
                        "SIGHUP a running dxa serve")
    s.add_argument("--revoke", metavar="NAME_OR_SERIAL",
                   help="instead: add every certificate this CA issued to node NAME (or the one with this hex "
                        "serial) to its revocation list, $DXA_HOME/crl.pem or --out FILE")
    s.add_argument("--out", metavar="DIR",
                   help="with --issue or --sign: where to write node.pem and ca.pem (and node.key for --issue); "
                        "with --revoke: the revocation list's file")
    s.add_argument("--json", action="store_true", help="print what was created as JSON")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("serve", parents=[common], help="run the receiving daemon", epilog=_keys_epilog("serve"),
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Serve transfers on one TCP port (TLS 1.3 control connection, plain-TCP data "
                                   "connections carrying sealed chunks). Writes only under --root. Logs each "
                                   "transfer's start and end with bytes and outcome. Stops on SIGTERM/SIGINT. "
                                   "SIGHUP re-reads the certificate, key, CA and --crl: new handshakes use them, "
                                   "running transfers go on. Warns of a certificate that expires within 30 days "
                                   "(at start, on SIGHUP and daily).")
    s.add_argument("--listen", metavar="HOST:PORT", help="address to listen on (default 127.0.0.1:7400)")
    s.add_argument("--root", metavar="DIR", help="directory to serve; nothing is written outside it")
    s.add_argument("--state-dir", dest="state_dir", metavar="DIR", help="resume journal location (default ROOT/.dxa)")
    s.add_argument("--port-file", metavar="FILE", help="write the bound port here once listening (useful with :0)")
    s.add_argument("--fsync", action=argparse.BooleanOptionalAction,
                   help="make every finished file and every journaled chunk survive power loss (fsync before "
                        "rename, fdatasync before journaling); costs disk-speed writes. Without it a killed "
                        "daemon still loses nothing and resumed chunks are re-verified from disk")
    s.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (bytes, files, retries, active "
                        "transfers, rate per transfer, RTT and retransmits per peer); off by default")
    s.add_argument("--buffered-writes", dest="buffered_writes", action="store_true", default=None,
                   help="write every chunk through the page cache; by default whole chunks of files of 8 MiB "
                        "and more go to the disk with O_DIRECT where the file system supports it (no copy into "
                        "the page cache, the receiver's largest CPU cost)")
    limits = s.add_argument_group("limits (docs/HARDENING.md, \"Daemon limits\")")
    limits.add_argument("--max-sessions", dest="max_sessions", metavar="N",
                        help="concurrent sessions in all; more are refused with \"server busy\" (default 64)")
    limits.add_argument("--max-sessions-per-peer", dest="max_sessions_per_peer", metavar="N",
                        help="concurrent sessions of one peer (certificate name), so that one node cannot "
                             "take every slot (default 32)")
    limits.add_argument("--idle-timeout", dest="idle_timeout", metavar="SECONDS",
                        help="end a session that shows no control message, no data and no work of ours for "
                             "this long, releasing its destination files (a stopped or vanished client); "
                             "0: never (default 600)")
    limits.add_argument("--handshake-timeout", dest="handshake_timeout", metavar="SECONDS",
                        help="time a new connection has, from accept, to complete TLS and HELLO, or its "
                             "JOIN (default 10)")
    limits.add_argument("--max-unauthenticated", dest="max_unauthenticated", metavar="N",
                        help="connections at once that have not completed TLS or a JOIN; one more closes the "
                             "oldest of them (default 128)")
    limits.add_argument("--max-handshakes", dest="max_handshakes", metavar="N",
                        help="TLS handshakes in progress at once; one more closes the oldest that has run for "
                             "over a second, or waits for a slot (default 32)")
    s.add_argument("--keep-special-bits", dest="keep_special_bits", action="store_true", default=None,
                   help="keep the setuid, setgid and sticky bits of received files and directories (dropped by "
                        "default: a client must not hand this daemon's user a setuid program)")
    s.add_argument("--max-open-files", dest="max_open_files", type=int, metavar="N",
                   help="descriptors one transfer keeps open on partial files, least recently written closed "
                        "first (default 64)")
    s.add_argument("--grpc", metavar="HOST:PORT",
                   help="also serve the TransferService (gRPC, mutual TLS) here: transfer jobs from this agent "
                        "to others, kept in STATE_DIR/transfers.sqlite (dxa submit/status/watch/cancel/rate); "
                        "off by default")
    s.add_argument("--grpc-port-file", dest="grpc_port_file", metavar="FILE", help="write the bound gRPC port here")
    s.add_argument("--client", dest="clients", action="append", metavar="NAME",
                   help="with --grpc: a node (certificate CN) allowed to submit, see, rate and cancel this agent's "
                        "jobs; repeat for several; others are refused (default: every node of the CA)")
    s.add_argument("--controller", metavar="HOST:PORT",
                   help="register with the scheduler (dxa controller serve) here and heartbeat; jobs with a rate "
                        "then wait for a reservation and run at the granted rate; off by default")
    s.add_argument("--site", metavar="NAME", help="with --controller: this agent's site in the scheduler's topology")
    s.add_argument("--capacity", metavar="RATE",
                   help="with --controller: this agent's link capacity, bits/s (e.g. 10G)")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("cp", parents=[common, xfer], help="copy files to or from a dxa daemon",
                       epilog=_keys_epilog("cp"),
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Copy files and trees (-r) to a daemon (push) or from one (pull):\n"
                                   "  dxa cp -r ./data dxa://HOST:PORT/datasets/x   ./data becomes datasets/x\n"
                                   "  dxa cp a b dxa://HOST:PORT/dir/               a and b go into dir/\n"
                                   "  dxa cp dxa://HOST:PORT/models/m ./m           pull (add -r for a tree)\n\n"
                                   "Chunks are sealed with AES-256-GCM and verified with BLAKE3 at the receiver; "
                                   "modes and mtimes are kept (setuid, setgid and sticky bits only with --keep-special-bits on "
                                   "the receiving side). Re-running the same command after a failure or a "
                                   "kill sends only what is missing. Symlinks are never followed: inside a tree "
                                   "they are recreated when their target stays inside the tree, else skipped "
                                   "with a warning.")
    s.add_argument("paths", nargs="+", metavar="PATH",
                   help="one or more sources, then the destination; exactly one side is a dxa://HOST:PORT/path URL")
    s.add_argument("-r", "--recursive", action="store_true", help="copy directories recursively")
    s.add_argument("--no-progress", action="store_true", default=None, help="no progress bar even on a terminal")
    s.add_argument("--progress", dest="no_progress", action="store_false", default=None,
                   help="a progress bar on a terminal even if the config file says no_progress")
    s.add_argument("--keep-special-bits", dest="keep_special_bits", action="store_true", default=None,
                   help="when pulling: keep the setuid, setgid and sticky bits of the server's files (dropped "
                        "by default; for a push the daemon decides, see dxa serve --keep-special-bits)")
    s.set_defaults(func=cmd_cp)

    s = sub.add_parser("bench", parents=[common, xfer], help="memory-to-memory throughput through the data path",
                       epilog=_keys_epilog("bench"),
                       description="Like iperf3, but through dxa's data path: chunks are hashed, sealed, sent on N "
                                   "streams, opened and verified by the daemon, then discarded.")
    s.add_argument("url", metavar="dxa://HOST:PORT", help="a running dxa serve")
    s.add_argument("--seconds", "-t", type=float, help="test duration (default 10)")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("controller", help="the bandwidth scheduler: dxa controller serve / list / show / rate / release",
                       description="The scheduler that agents register with and that grants, queues and releases "
                                   "reservations of bandwidth on their path (docs/CONTROL.md).")
    controller = s.add_subparsers(dest="controller_command", required=True, metavar="SUBCOMMAND")
    s = controller.add_parser(
        "serve", parents=[common], help="run the scheduler's gRPC server (ControllerService)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve dxa.controller.v1.ControllerService over gRPC with mutual TLS: the identity of\n"
                    "$DXA_HOME (or --ca/--cert/--key) is the server's certificate, and a client must present\n"
                    "a certificate signed by the same CA (others are refused during the handshake).\n\n"
                    "Agents register and heartbeat; reservations are admitted, queued or refused by the\n"
                    "ledger against the links of --topology plus the agents' own links. Every change is\n"
                    "saved to the SQLite file --state before it is answered; a restarted server loads it\n"
                    "(agents get a fresh lease) and re-applies the topology. Leases, windows and deadlines\n"
                    "are checked in the background. Stops on SIGTERM/SIGINT.",
        epilog="example:\n"
               "  dxa controller serve --listen 0.0.0.0:7500 --topology topology.toml --state /var/lib/dxa/ledger.db\n"
               "  (or listen, topology, state, admins = [...] in [controller] of the config file)\n\n"
               "exit status:\n"
               "  0 stopped by SIGTERM/SIGINT    2 bad usage, topology or identity\n"
               "  4 cannot listen on the address 5 the state file cannot be read or written")
    s.add_argument("--listen", metavar="HOST:PORT",
                   help="address to listen on; port 0 picks a free one (see --port-file); required")
    s.add_argument("--topology", metavar="FILE",
                   help="sites and backbone links in TOML (controller_stub/topology.example.toml); required")
    s.add_argument("--state", metavar="FILE",
                   help="SQLite file holding agents and reservations (created if missing); required")
    s.add_argument("--port-file", metavar="FILE", help="write the bound port here once listening (useful with :0)")
    s.add_argument("--lease-timeout", dest="lease_timeout", type=float, metavar="SECONDS",
                   help="an agent that does not heartbeat for this long loses its reservations (default 30)")
    s.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (agents, reservations by state, the "
                        "queue, capacity and reserved rate per link); off by default")
    s.add_argument("--admin", dest="admins", action="append", metavar="NAME",
                   help="a node name (certificate CN) allowed every scheduler call on any agent's behalf, "
                        "e.g. an operator's; repeat for several (replaces admins = [...] of the config file)")
    s.set_defaults(func=cmd_controller_serve)
    from agent.cli.controller import (
        add_commands as _add_controller_commands,  # list / rate / release
    )

    _add_controller_commands(controller, common)

    from agent.cli.settings import SECTIONS

    s = sub.add_parser("config", parents=[where], help="show the effective settings and where each comes from",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Check the config file ($DXA_HOME/config.toml or --config) and print every "
                                   "setting of the\ngiven sections (default: all) with its value and where it comes "
                                   "from: the file,\nthe environment (DXA_*) or the default. Flags of a command win "
                                   "over all of these.\nExit status 2 if the file has an unknown section or key or "
                                   "a value of the wrong type.")
    s.add_argument("sections", nargs="*", metavar="SECTION",  # no choices=: argparse refuses an empty list then
                   help=f"one of {', '.join(SECTIONS)} (identity: --ca/--cert/--key of every command)")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=cmd_config)

    from agent.cli.transfers import (
        add_commands as _add_transfer_commands,  # dxa submit/status/watch/cancel/rate
    )

    _add_transfer_commands(sub, common)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "verbose", 0) < 2:  # gRPC's C core logs to stderr on its own; our messages say it
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    if args.command == "cp" and len(args.paths) < 2:
        parser.error("cp needs at least one source and a destination")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return _failed(args, EXIT_INTERRUPTED, "interrupted; re-run the same command to resume")
    except ConfigError as exc:
        return _failed(args, EXIT_USAGE, str(exc))
    except AuthenticationError as exc:
        return _failed(args, EXIT_AUTH, f"authentication failed: {exc}")
    except DiskFullError as exc:
        return _failed(args, EXIT_STORAGE, str(exc.strerror or exc))
    except ListenError as exc:
        return _failed(args, EXIT_NETWORK, str(exc))
    except ConnectError as exc:  # nothing started: nothing to resume
        return _failed(args, EXIT_NETWORK, f"{exc}; nothing was copied")
    except (BrokenConnectionError, ConnectionError) as exc:
        return _failed(args, EXIT_NETWORK, f"network failure: {exc}; re-run the same command to resume")
    except PathError as exc:
        return _failed(args, EXIT_USAGE, str(exc))
    except StorageError as exc:
        return _failed(args, EXIT_STORAGE, str(exc.strerror or exc))
    except TransferError as exc:
        return _failed(args, EXIT_INCOMPLETE, str(exc))
    except DxaError as exc:
        return _failed(args, EXIT_INCOMPLETE, f"{exc.__class__.__name__}: {exc}")


def _failed(args, code: int, message: str) -> int:
    """Say why on stderr; ``dxa cp --json`` also prints its one JSON object (ok false) on stdout."""
    print(f"dxa: {message}", file=sys.stderr)
    if getattr(args, "command", None) == "cp" and getattr(args, "json", False):
        import json

        print(json.dumps({"ok": False, "exit": code, "error": message}), flush=True)
    return code

if __name__ == "__main__":
    sys.exit(main())
