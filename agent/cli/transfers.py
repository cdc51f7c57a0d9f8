"""``dxa submit / status / watch / cancel / rate``: the CLI of an agent's TransferService (agent.Client).

Kept apart from agent/cli/main.py, which only registers these commands (``add_commands``).
Exit status: 0 ok (``submit --wait``: the transfer is done), 1 the transfer failed (a
submit the scheduler refused too) or was cancelled, 2 refused by the agent (unknown transfer, bad spec, wrong state, a rate the
scheduler does not admit), 4 the agent
cannot be reached or refused our certificate.
"""

from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE, EXIT_NETWORK = 0, 1, 2, 4


def _client(args):
    from agent.cli.main import _identity
    from agent.service.client import Client

    return Client(args.agent, _identity(args), server_name=args.server_name)


def _rate_text(bps: int) -> str:
    if not bps:
        return "unlimited"
    for unit, scale in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if bps >= scale:
            return f"{bps / scale:.4g}{unit}"
    return str(bps)


def _pace_text(t) -> str:
    """The job's pacing rate; a deadline job's before the scheduler granted one says so."""
    if not t.rate_bps and t.spec.deadline is not None:
        return "deadline"
    return _rate_text(t.rate_bps)


def _line(t) -> str:
    pct = f"{100 * t.bytes_done / t.bytes_total:5.1f}%" if t.bytes_total else "    -"
    err = f"  ({t.error})" if t.error else ""
    resv = f"  [{t.reservation_id}]" if t.reservation_id else ""
    return (f"{t.id:<6} {t.state.value:<12} {pct} {t.bytes_done:>14} B  files {t.files_done}/{t.files_total}  "
            f"rate {_pace_text(t):<9} {t.spec.source} -> {t.spec.destination}{resv}{err}")


def _print(args, transfers, *, many: bool = False) -> None:
    if args.json:
        import json

        print(json.dumps([t.as_dict() for t in transfers] if many else transfers[0].as_dict()))
    else:
        for t in transfers:
            print(_line(t))


def run_grpc(where: str, make_client, coro_fn) -> int:
    """Run ``coro_fn(client)`` with ``make_client()`` (an async context manager); a refused call
    prints why and maps to an exit status (shared with agent/cli/controller.py)."""
    import asyncio

    import grpc

    from agent.service.credentials import GrpcCallError

    async def main():
        async with make_client() as c:
            return await coro_fn(c)

    try:
        return asyncio.run(main())
    except GrpcCallError as exc:
        hint = ""
        if exc.code is grpc.StatusCode.UNAVAILABLE and any(
                w in exc.details for w in ("Socket closed", "handshake", "Handshake", "ALPN", "ssl", "SSL")):
            hint = (" (the TLS handshake failed: is this node's certificate signed by the same CA and still "
                    "valid, and is HOST:PORT the service's gRPC port?)")
        print(f"dxa: {where}: {exc}{hint}", file=sys.stderr)
        if exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return EXIT_NETWORK
        if exc.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
                        grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
                        grpc.StatusCode.PERMISSION_DENIED):
            return EXIT_USAGE
        return EXIT_INCOMPLETE


def _run(args, coro_fn) -> int:
    return run_grpc(args.agent, lambda: _client(args), coro_fn)


def _states(args):
    """``--state`` values as JobStates for ListTransfers (None: all)."""
    from agent.service.transfers import JobState

    return {JobState(v) for v in args.states} if args.states else None


STATES = ("submitted", "reserved", "transferring", "done", "failed", "cancelled")
"""JobState values, for --state (kept equal to JobState by a test)."""


def _final_status(t) -> int:
    from agent.service.transfers import JobState

    return EXIT_OK if t.state is JobState.DONE else EXIT_INCOMPLETE if t.state.final else EXIT_OK


def _when(text: str | None) -> float | None:
    """``+SECONDS`` (from now), Unix seconds, or an ISO 8601 time (with its offset) → Unix seconds."""
    import datetime
    import time

    from agent.errors import ConfigError

    if text is None:
        return None
    try:
        if text.startswith("+"):
            return time.time() + float(text[1:])
        try:
            return float(text)
        except ValueError:
            return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ConfigError(f"not a time: {text!r} (+SECONDS, Unix seconds or ISO 8601)") from None


def cmd_submit(args) -> int:
    from agent.config import parse_rate

    rate = parse_rate(args.rate or "0")
    window_start, window_end = _when(args.window_start), _when(args.window_end)
    deadline = _when(args.deadline)

    async def go(c):
        t = await c.submit(args.source, args.destination, rate=rate, recursive=args.recursive,
                           priority=args.priority, request_id=args.request_id or "",
                           window_start=window_start, window_end=window_end, deadline=deadline,
                           no_queue=args.no_queue)
        if args.wait:
            t = await c.wait(t.id)
        _print(args, [t])
        return _final_status(t) if args.wait or t.state.final else EXIT_OK

    return _run(args, go)


def cmd_status(args) -> int:
    async def go(c):
        if args.job:
            t = await c.get(args.job)
            _print(args, [t])
            return EXIT_OK
        transfers = await c.list(_states(args))
        if not args.json and transfers:
            print(_table([(t, t.current_rate_bps if t.state.value == "transferring" else None) for t in transfers]))
            return EXIT_OK
        _print(args, transfers, many=True)
        return EXIT_OK

    return _run(args, go)


def cmd_cancel(args) -> int:
    async def go(c):
        t = await c.cancel(args.job)
        if args.wait:
            t = await c.wait(args.job)
        _print(args, [t])
        return EXIT_OK

    return _run(args, go)


def cmd_rate(args) -> int:
    from agent.config import parse_rate

    rate = parse_rate(args.rate)

    async def go(c):
        _print(args, [await c.set_rate(args.job, rate)])
        return EXIT_OK

    return _run(args, go)


def _table(rows: list[tuple]) -> str:
    """rows: (transfer, current rate in bit/s or None)."""
    from agent.cli.main import _human as _human_bytes

    head = (f"{'ID':<6} {'STATE':<12} {'DONE':>6} {'BYTES':>22} {'NOW':>10} {'PACE':>9} {'FILES':>9}  "
            "SOURCE -> DESTINATION")
    out = [head]
    for t, now in rows:
        pct = f"{100 * t.bytes_done / t.bytes_total:5.1f}%" if t.bytes_total else "     -"
        size = f"{_human_bytes(t.bytes_done)}/{_human_bytes(t.bytes_total)}"
        cur = "-" if now is None or t.state.final else _rate_text(now) + "b/s" if now else "0"
        out.append(f"{t.id:<6} {t.state.value:<12} {pct:>6} {size:>22} {cur:>10} {_pace_text(t):>9} "
                   f"{f'{t.files_done}/{t.files_total}':>9}  {t.spec.source} -> {t.spec.destination}"
                   + (f"  ({t.error})" if t.error else ""))
    return "\n".join(out)


def cmd_watch(args) -> int:
    """A live table: one transfer (following its event stream) or all of them (polled)."""
    import asyncio
    import json

    from agent.service.transfers import Progressed, RateChanged, StateChanged

    tty = sys.stdout.isatty() and not args.json

    def draw(rows) -> None:
        if args.json:
            print(json.dumps([dict(t.as_dict(), current_rate_bps=now) for t, now in rows]), flush=True)
            return
        text = _table(rows)
        print(("\x1b[H\x1b[2J" + text) if tty else text + "\n", flush=True)

    async def one(c):
        t = await c.get(args.job)
        now = None
        async for ev in c.watch(args.job):
            if isinstance(ev, StateChanged):
                t.state, t.error = ev.new, ev.error
            elif isinstance(ev, Progressed):
                t.bytes_done, t.bytes_total = ev.bytes_done, ev.bytes_total
                t.files_done, t.files_total, now = ev.files_done, ev.files_total, ev.current_rate_bps
            elif isinstance(ev, RateChanged):
                t.rate_bps = ev.new_rate_bps
            if not isinstance(ev, StateChanged) or ev.new.final or ev.old is not None:
                draw([(t, now)])
        t = await c.get(args.job)
        draw([(t, None)])
        return _final_status(t)

    async def every(c):
        while True:
            transfers = await c.list(_states(args))
            # the agent's own rate of each transfer, counted as bytes move
            draw([(t, t.current_rate_bps if t.state.value == "transferring" else None) for t in transfers])
            if args.until_done and all(t.state.final for t in transfers):
                return EXIT_OK
            await asyncio.sleep(args.interval)

    return _run(args, one if args.job else every)


def add_commands(sub, common: argparse.ArgumentParser) -> None:
    """Register submit, status, cancel and rate on the ``dxa`` subparsers."""
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("--agent", metavar="HOST:PORT", required=True,
                        help="the agent's TransferService (its dxa serve --grpc address)")
    client.add_argument("--server-name", dest="server_name", metavar="NODE",
                        help="the node name in the agent's certificate, if it does not name HOST")
    client.add_argument("--json", action="store_true", help="print JSON")

    s = sub.add_parser("submit", parents=[common, client], help="ask an agent to send its data to another agent",
                       description="Ask the agent at --agent to push SRC (a path under its --root) to DST "
                                   "(dxa://HOST:PORT/path of the destination agent): a third-party copy when "
                                   "this machine is neither. The job is kept by the agent (it survives a "
                                   "restart of the agent) and resumes what the destination already has. On an "
                                   "agent that uses a scheduler, a job with --rate or --deadline answers once the "
                                   "scheduler has admitted, queued (the reason is shown) or refused it (exit 1).")
    s.add_argument("source", metavar="SRC", help="path under the sending agent's root")
    s.add_argument("destination", metavar="dxa://HOST:PORT/path", help="where the sending agent pushes it")
    s.add_argument("-r", "--recursive", action="store_true", help="send a directory tree")
    s.add_argument("--rate", metavar="BITS", help="pace the transfer to this rate in bits/s (200M, 1.5G)")
    s.add_argument("--deadline", metavar="WHEN",
                   help="instead of --rate, on an agent that uses a scheduler: the data must be there by WHEN "
                        "(+SECONDS, Unix seconds or ISO 8601); the scheduler reserves the volume over the time "
                        "left. A job not done by then is stopped and fails; its partial data stays resumable")
    s.add_argument("--priority", type=int, default=0,
                   help="higher is admitted first when transfers wait for the scheduler")
    s.add_argument("--window-start", dest="window_start", metavar="WHEN",
                   help="with --rate or --deadline, on an agent that uses a scheduler: start no earlier than "
                        "WHEN (+SECONDS, Unix seconds or ISO 8601; an ISO time without an offset is local time)")
    s.add_argument("--window-end", dest="window_end", metavar="WHEN",
                   help="with --rate, on an agent that uses a scheduler: the reservation ends at WHEN; a job "
                        "not done by then is stopped and fails (its partial data stays resumable)")
    s.add_argument("--no-queue", dest="no_queue", action="store_true",
                   help="on an agent that uses a scheduler: when the path has no room now, fail at once with the "
                        "earliest start that would fit instead of waiting in the scheduler's queue")
    s.add_argument("--request-id", dest="request_id", metavar="KEY",
                   help="idempotency key: a retried submit with the same key returns the same job")
    s.add_argument("--wait", action="store_true",
                   help="wait until the transfer is done, failed or cancelled (exit 0 only if done)")
    s.set_defaults(func=cmd_submit)

    s = sub.add_parser("status", parents=[common, client], help="show an agent's transfers, or one of them")
    s.add_argument("job", metavar="JOB", nargs="?", help="a transfer id (default: all, as a table)")
    s.add_argument("--state", dest="states", action="append", metavar="STATE",
                   choices=STATES,
                   help="without JOB: only transfers in this state (repeat for several)")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("cancel", parents=[common, client], help="stop a transfer (its partial data stays resumable)")
    s.add_argument("job", metavar="JOB")
    s.add_argument("--wait", action="store_true", help="wait until the copy has stopped")
    s.set_defaults(func=cmd_cancel)

    s = sub.add_parser("watch", parents=[common, client], help="a live table of an agent's transfers",
                       description="Redraw a table of the agent's transfers (state, progress, current rate, "
                                   "pacing rate, files) every --interval seconds; with JOB, follow that transfer's "
                                   "event stream until it is done, failed or cancelled (exit 0 only if done). "
                                   "--json prints one JSON list per refresh instead.")
    s.add_argument("job", metavar="JOB", nargs="?", help="follow this transfer (default: all, polled)")
    s.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes of all (default 1)")
    s.add_argument("--until-done", dest="until_done", action="store_true",
                   help="without JOB: stop once every transfer is final")
    s.add_argument("--state", dest="states", action="append", metavar="STATE",
                   choices=STATES,
                   help="without JOB: only transfers in this state (repeat for several)")
    s.set_defaults(func=cmd_watch)

    s = sub.add_parser("rate", parents=[common, client], help="change the rate of a running transfer")
    s.add_argument("job", metavar="JOB")
    s.add_argument("rate", metavar="BITS",
                   help="new rate in bits/s (200M, 1.5G; 0 = unlimited). A transfer on a reservation changes "
                        "only if the scheduler admits the new rate on its path (exit 2 and the reason if not)")
    s.set_defaults(func=cmd_rate)
