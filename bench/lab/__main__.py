"""The lab's one command: show, build, self-check and clean up topologies.

    python -m bench.lab show  TOPO               the address and shaper plan (no root)
    python -m bench.lab up    TOPO [--hold S]    build, print how to enter it, hold until
                                                 Ctrl-C or S seconds, tear down
    python -m bench.lab check [TOPO] [--json]    build, measure rate/RTT/loss against what
                                                 was asked (5%), tear down; exit 1 on a miss
    python -m bench.lab clean                    delete namespaces of dead lab processes

TOPO is a TOML file or the name of one in bench/topologies/ (wan, lossy, two-paths,
fanout-8, loopback, wan-flap).  Everything it builds is torn down when it exits,
whichever way it exits; without root it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .lab import Lab, LabDeadline, LabUnavailable, cleanup_stale, guard, lab_available
from .selfcheck import as_dicts, self_check
from .topology import Topology, TopologyError, load_topology

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"


def resolve(name_or_path: str) -> Topology:
    path = Path(name_or_path)
    if not path.exists():
        path = TOPOLOGIES / f"{name_or_path}.toml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in TOPOLOGIES.glob("*.toml")))
        raise TopologyError(f"no topology {name_or_path!r} (known: {known})")
    return load_topology(path)


def _plan(topo: Topology) -> str:
    lines = [f"topology {topo.name}: {len(topo.hosts)} hosts, {len(topo.links)} links"]
    for p in topo.ports:
        spec = p.down
        lines.append(
            f"  {p.host:>6} {p.address:<12} link {p.link:<6} segment {p.segment}  "
            f"rate {spec.rate_bps / 1e6:g} Mbit/s  delay {spec.delay_s * 1e3:g} ms  "
            f"jitter {spec.jitter_s * 1e3:g} ms  loss {spec.loss * 100:g}%"
        )
    for ev in topo.events:
        lines.append(f"  at {ev.at_s:g} s: link {ev.link} {ev.action}")
    return "\n".join(lines)


def _check_lines(results: list) -> list[str]:
    out = []
    for r in results:
        unit, scale = {"rtt_s": ("ms", 1e3), "rate_bps": ("Mbit/s", 1e-6), "loss": ("%", 100)}[
            r.metric
        ]
        measured = "none" if r.measured is None else f"{r.measured * scale:.3f}"
        out.append(
            f"{'ok  ' if r.ok else 'MISS'} {r.path:<18} {r.metric:<9} asked {r.asked * scale:.3f} "
            f"{unit}, measured {measured} {unit}  ({r.detail})"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("show")
    p.add_argument("topology")
    p = sub.add_parser("up")
    p.add_argument("topology")
    p.add_argument("--hold", type=float, default=None, help="tear down after S seconds")
    p.add_argument("--backend", choices=("auto", "relay", "netem"), default="auto")
    p = sub.add_parser("check")
    p.add_argument("topology", nargs="?", default="wan")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--backend", choices=("auto", "relay", "netem"), default="auto")
    sub.add_parser("clean")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")

    try:
        if args.cmd == "show":
            print(_plan(resolve(args.topology)))
            return 0
        reason = lab_available()
        if reason:
            print(f"bench.lab: {reason}", file=sys.stderr)
            return 2
        if args.cmd == "clean":
            removed = cleanup_stale()
            print(f"removed {len(removed)} stale namespaces" + (f": {removed}" if removed else ""))
            return 0
        topo = resolve(args.topology)
        if args.cmd == "up":
            with guard(args.hold), Lab(topo, backend=args.backend) as lab:
                print(_plan(topo))
                print(f"backend {lab.backend}; congestion control {lab.congestion}")
                for host, ns in lab.namespaces.items():
                    print(f"  {host}: ip netns exec {ns} bash")
                lab.start_clock()
                print("up; Ctrl-C tears it down" +
                      (f" (or in {args.hold:g} s)" if args.hold else ""), flush=True)
                while True:
                    time.sleep(3600)
        with guard(300), Lab(topo, backend=args.backend) as lab:
            t0 = time.monotonic()
            results = self_check(lab)
            took = time.monotonic() - t0
        if args.json:
            print(json.dumps(as_dicts(results), indent=2))
        else:
            print(f"self-check of {topo.name} (backend {lab.backend}, {took:.1f} s):")
            print("\n".join(_check_lines(results)) or "  no host-to-host links to check")
        return 0 if all(r.ok for r in results) else 1
    except TopologyError as exc:
        print(f"bench.lab: {exc}", file=sys.stderr)
        return 2
    except LabUnavailable as exc:
        print(f"bench.lab: {exc}", file=sys.stderr)
        return 2
    except LabDeadline as exc:
        print(f"bench.lab: {exc}; torn down", file=sys.stderr)
        return 0 if args.cmd == "up" else 1
    except KeyboardInterrupt:
        print("bench.lab: interrupted; torn down", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
