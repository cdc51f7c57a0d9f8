"""Run WAN lab scenarios and write their report.

    python -m bench.run [SCENARIO ...|all] [--out DIR] [--size SIZE] [--quick]

Scenarios: loopback-2g, wan, lossy, small-files, two-paths, fanout-8 (bench/README.md
describes each and its default size).  `all` with default sizes fits in 15 minutes on
the 2-core lab machine; --quick shrinks every dataset for a 3-4 minute smoke run.

Writes DIR/report.md (also printed), DIR/results.json (every raw measurement) and
DIR/*.png.  Needs root; tears down everything it built on exit, on Ctrl-C, on SIGTERM
and at --deadline, then still writes the report of what finished.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from .lab.lab import LabDeadline, cleanup_stale, guard, lab_available
from .lab.topology import TopologyError, parse_size
from .report import markdown, plot, to_json
from .scenarios import SCENARIOS, Options, ScenarioResult, run_scenario

log = logging.getLogger("bench.run")

RESULTS = Path(__file__).resolve().parent / "results"


def _machine() -> str:
    cpus = os.cpu_count()
    return f"{platform.node() or 'host'} ({cpus} CPUs, Linux {platform.release()})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenarios", nargs="*", default=["all"],
                        help="scenario names, or all (default)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default bench/results/<UTC time>)")
    parser.add_argument("--size", default=None,
                        help="data size for every scenario, e.g. 256MiB (per file for "
                             "small-files); default: each scenario's own")
    parser.add_argument("--quick", action="store_true",
                        help="small data, 3 s iperf3 runs (8 s otherwise), RTT+rate self-check only")
    parser.add_argument("--cap", type=float, default=None,
                        help="stop a tool after this many seconds (default 150, quick 60)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="tear down and report after this many seconds in all "
                             "(default 1200, quick 480)")
    parser.add_argument("--no-check", action="store_true", help="skip the self-checks")
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/dxa-bench"),
                        help="scratch directory for data and copies (emptied after use)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress log")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    names = list(SCENARIOS) if "all" in args.scenarios else args.scenarios
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}, all")
    try:
        size = parse_size(args.size) if args.size else None
    except TopologyError as exc:
        parser.error(str(exc))
    reason = lab_available()
    if reason:
        print(f"bench.run: {reason}", file=sys.stderr)
        return 2
    removed = cleanup_stale()
    if removed:
        log.info("removed namespaces of dead lab runs: %s", removed)

    options = Options(
        quick=args.quick, size=size,
        cap_s=args.cap or (60.0 if args.quick else 150.0),
        iperf_s=3.0 if args.quick else 8.0,
        check=not args.no_check, work=args.work,
    )
    deadline = args.deadline or (480.0 if args.quick else 1200.0)
    started = datetime.now(UTC)
    out = args.out or RESULTS / started.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)

    results: list[ScenarioResult] = []
    stopped = None
    t0 = time.monotonic()
    try:
        with guard(deadline):
            for name in names:
                log.info("=== %s ===", name)
                results.append(run_scenario(SCENARIOS[name], options))
    except LabDeadline as exc:
        stopped = f"stopped: {exc}"
    except KeyboardInterrupt:
        stopped = "stopped: interrupted"
    if stopped:
        log.warning("%s; reporting what finished", stopped)

    header = {
        "started": started.strftime("%Y-%m-%d %H:%M"),
        "command": "python -m bench.run " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "seconds": time.monotonic() - t0,
        "machine": _machine(),
        "options": {k: str(v) for k, v in vars(options).items()},
        "stopped": stopped,
    }
    text = markdown(results, header)
    if stopped:
        text += f"\n**Run {stopped}; scenarios not listed did not finish.**\n"
    (out / "report.md").write_text(text)
    (out / "results.json").write_text(to_json(results, header))
    try:
        pngs = plot(results, out)
    except Exception as exc:  # noqa: BLE001 - plots are a convenience; the tables stand
        log.warning("plots failed: %s", exc)
        pngs = []
    print(text)
    print(f"wrote {out / 'report.md'}, {out / 'results.json'}"
          + (", " + ", ".join(p.name for p in pngs) if pngs else ""))
    if stopped:
        return 130 if "interrupted" in stopped else 1
    return 0 if all(r.error is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
