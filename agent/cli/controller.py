"""``dxa controller list / show / rate / release``: an operator's view of the scheduler's ledger.

Kept apart from agent/cli/main.py, which registers these commands (``add_commands``) next
to ``dxa controller serve``.  They are thin wrappers over
:class:`controller_stub.client.ControllerClient`; the scheduler decides who may do what
(an agent for its own reservations, an ``--admin`` node for all of them).

Exit status: 0 ok, 1 another error of the scheduler, 2 refused by the scheduler (unknown
reservation, not allowed, no room for the rate, wrong state), 4 the scheduler cannot be
reached or refused our certificate.

Registering the commands imports nothing of the scheduler (``dxa --help`` builds every
command's parser): controller_stub is imported by the command that runs.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

EXIT_OK = 0

STATES = ("submitted", "reserved", "transferring", "done", "failed", "cancelled")
"""controller_stub.ledger.State values, for --state (kept equal to State by a test)."""


def _target(args) -> str:
    from agent.cli.main import _settings
    from agent.errors import ConfigError

    target = args.controller or _settings(args, "serve").controller
    if not target:
        raise ConfigError("which scheduler? give --controller HOST:PORT (or controller = ... in [serve] of the "
                          "config file, the one this node's agent registers with)")
    return target


def reservation_dict(r) -> dict:
    """A reservation as JSON: times in Unix seconds, an open end as null."""
    return {"id": r.id, "state": r.state.value, "source": r.request.source, "destination": r.request.destination,
            "rate_bps": r.rate_bps, "start": r.start, "end": None if math.isinf(r.end) else r.end,
            "path": list(r.path), "priority": r.request.priority, "volume_bytes": r.request.volume_bytes,
            "transfer_id": r.request.transfer_id, "submitted_at": r.submitted_at, "reason": r.reason}


def _when(t: float | None) -> str:
    return "-" if t is None or math.isinf(t) else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _table(reservations) -> str:
    from agent.cli.transfers import _rate_text

    rows = [("ID", "STATE", "SOURCE -> DESTINATION", "RATE", "START", "END", "REASON")]
    for r in reservations:
        rows.append((r.id, r.state.value, f"{r.request.source} -> {r.request.destination}", _rate_text(r.rate_bps),
                     _when(r.start), _when(r.end), r.reason))
    return _columns(rows)


def _run(args, coro_fn) -> int:
    from agent.cli.main import _identity
    from agent.cli.transfers import run_grpc
    from controller_stub.client import ControllerClient

    target = _target(args)
    identity = _identity(args)
    return run_grpc(f"scheduler {target}", lambda: ControllerClient(target, identity, server_name=args.server_name,
                                                                     timeout=10), coro_fn)


def cmd_list(args) -> int:
    from controller_stub.ledger import State

    states = [State(s) for s in args.states] if args.states else None

    async def go(c):
        reservations = await c.list_reservations(args.agent, states)
        if args.json:
            import json

            print(json.dumps([reservation_dict(r) for r in reservations]))
        else:
            sys.stdout.write(_table(reservations))
        return EXIT_OK

    return _run(args, go)


def cmd_show(args) -> int:
    from agent.cli.transfers import _rate_text

    async def go(c):
        sites, agents, links = await c.topology()
        now = time.time()
        if args.json:
            import json

            print(json.dumps({
                "sites": sites,
                "agents": [{"name": a.name, "site": a.site, "addresses": list(a.addresses),
                            "capacity_bps": a.capacity_bps, "lease_expires": a.lease_expires, "expired": a.expired}
                           for a in agents],
                "links": [{"id": k.id, "source": k.src, "destination": k.dst, "capacity_bps": k.capacity_bps,
                           "reserved_bps": load} for k, load in links]}))
            return EXIT_OK
        rows = [("AGENT", "SITE", "CAPACITY", "LEASE", "ADDRESSES")]
        for a in agents:
            lease = "expired" if a.expired else f"live, {max(0.0, a.lease_expires - now):.0f} s left"
            rows.append((a.name, a.site, _rate_text(a.capacity_bps), lease, " ".join(a.addresses)))
        sys.stdout.write(_columns(rows))
        print()
        rows = [("LINK", "CAPACITY", "RESERVED NOW", "USED")]
        for k, load in links:
            rows.append((k.id, _rate_text(k.capacity_bps), _rate_text(load) if load else "0",
                         f"{100 * load / k.capacity_bps:.0f}%"))
        sys.stdout.write(_columns(rows))
        print(f"\nsites: {', '.join(sites)}")
        return EXIT_OK

    return _run(args, go)


def _columns(rows) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n" for row in rows)


def cmd_rate(args) -> int:
    from agent.cli.transfers import _rate_text
    from agent.config import parse_rate

    rate = parse_rate(args.rate)

    async def go(c):
        r, admitted = await c.change_rate(args.reservation, rate)
        _print_change(args, r, admitted, f"{r.id} now {_rate_text(r.rate_bps)} ({r.request.source} -> "
                      f"{r.request.destination}); its agent follows within a second")
        return EXIT_OK

    return _run(args, go)


def cmd_release(args) -> int:
    from controller_stub.ledger import State

    async def go(c):
        r, admitted = await c.release_reservation(args.reservation, State.CANCELLED, args.reason)
        _print_change(args, r, admitted, f"{r.id} released (cancelled); its agent stops the transfer")
        return EXIT_OK

    return _run(args, go)


def _print_change(args, r, admitted, headline: str) -> None:
    """A changed reservation and the waiters it let in: JSON, or the headline and one line each."""
    if args.json:
        import json

        print(json.dumps({"reservation": reservation_dict(r), "admitted": [reservation_dict(a) for a in admitted]}))
        return
    print(headline + "".join(f"\nadmitted {a.id} ({a.request.source} -> {a.request.destination})" for a in admitted))


def add_commands(controller_sub, common: argparse.ArgumentParser) -> None:
    """Register list, show, rate and release under ``dxa controller``."""
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("--controller", metavar="HOST:PORT",
                        help="the scheduler (dxa controller serve); default: controller in [serve] of the config "
                             "file (or DXA_CONTROLLER)")
    client.add_argument("--server-name", dest="server_name", metavar="NODE",
                        help="the node name in the scheduler's certificate, if it does not name HOST")
    client.add_argument("--json", action="store_true", help="print JSON")
    epilog = ("exit status:\n  0 ok   1 another error of the scheduler   4 the scheduler cannot be reached\n"
              "  2 refused by the scheduler (unknown reservation, not a party and not an admin,\n"
              "    no room for the rate, wrong state)")

    s = controller_sub.add_parser(
        "list", parents=[common, client], help="the scheduler's reservations",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog,
        description="List the scheduler's reservations in arrival order: state, agents, granted rate, window "
                    "and,\nfor a released one, why (done, lease expired, window ended, preempted...).")
    s.add_argument("--agent", metavar="NAME", help="only reservations this agent sends or receives")
    s.add_argument("--state", dest="states", action="append", choices=list(STATES),
                   help="only reservations in this state (repeat for several)")
    s.set_defaults(func=cmd_list)

    s = controller_sub.add_parser(
        "show", parents=[common, client], help="the scheduler's agents and links, and what is reserved now",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog,
        description="Show the network as the scheduler sees it: registered agents (site, link capacity, "
                    "lease),\nevery directed link with its capacity and the rate reserved on it at this moment, "
                    "and the sites.")
    s.set_defaults(func=cmd_show)

    s = controller_sub.add_parser(
        "rate", parents=[common, client], help="change a reservation's rate (its transfer follows)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog,
        description="Raise or lower a reserved or running reservation's rate for the rest of its window. A "
                    "raise is\nadmitted only if every link of its path has room; a lowering gives the difference "
                    "to waiting\nreservations at once. The sending agent paces its transfer to the new rate "
                    "within a second.\nAllowed to the reservation's agents and to the scheduler's --admin nodes.")
    s.add_argument("reservation", metavar="RESERVATION", help="a reservation id (dxa controller list)")
    s.add_argument("rate", metavar="BITS", help="the new rate in bits/s (200M, 1.5G)")
    s.set_defaults(func=cmd_rate)

    s = controller_sub.add_parser(
        "release", parents=[common, client], help="cancel a reservation (its transfer stops, resumable)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog,
        description="Release a reservation as cancelled: its rate goes to waiting reservations at once, and "
                    "the agent\nrunning its transfer stops it (state cancelled; the partial data stays resumable). "
                    "Allowed to\nthe reservation's agents and to the scheduler's --admin nodes.")
    s.add_argument("reservation", metavar="RESERVATION", help="a reservation id (dxa controller list)")
    s.add_argument("--reason", default="cancelled by an operator", help="recorded with the reservation")
    s.set_defaults(func=cmd_release)
