"""The named benchmark scenarios: which topology, which data, which tools and settings.

Each scenario builds its topology, self-checks it (a miss is retried once, then the
results are flagged, never silently trusted), makes its data, runs dxa and the peers
that make sense on the same data and links, and returns a `ScenarioResult` of raw
measurements.  Formatting is bench/report.py's job; the command is bench/run.py.

Rules: a tool's failure is a row with an error, never an exception that loses the
other rows; a dxa feature that does not exist yet is a row marked "n/a"; nothing
here invents a number.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .lab.__main__ import resolve
from .lab.lab import Lab
from .lab.peers import (
    Dataset,
    Measurement,
    RunContext,
    _wait_port,
    cpu_snapshot,
    dxa_features,
    dxa_init,
    not_available,
    run_dxa,
    run_gridftp,
    run_iperf3,
    run_rsync,
    run_uftp,
)
from .lab.selfcheck import CheckResult, self_check
from .lab.topology import Topology

__all__ = ["SCENARIOS", "Options", "Scenario", "ScenarioResult", "run_scenario"]

log = logging.getLogger(__name__)

KiB, MiB, GiB = 1024, 1024**2, 1024**3


@dataclass(frozen=True)
class Options:
    """How one run of `python -m bench.run` is sized."""

    quick: bool = False
    """Small data and short iperf3 runs: a smoke test of the whole pipeline."""
    size: int | None = None
    """Override of every scenario's data size (per file for small-files)."""
    cap_s: float = 150.0
    """A tool still running after this many seconds is stopped; its rate is then taken
    from what arrived and the row says so."""
    iperf_s: float = 8.0
    """Duration of each iperf3 run."""
    check: bool = True
    """Self-check each topology before measuring on it."""
    work: Path = Path("/var/tmp/dxa-bench")
    """Data, destination trees and logs; emptied at the end of each scenario."""


@dataclass
class ScenarioResult:
    name: str
    title: str
    topology: str
    data: dict[str, Any]
    link: dict[str, Any]
    """capacity_bps (None on loopback), rtt_s, loss, per-path details."""
    measurements: list[Measurement] = field(default_factory=list)
    checks: list[CheckResult] = field(default_factory=list)
    check_ok: bool | None = None
    congestion: dict[str, str] = field(default_factory=dict)
    fanout: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    """tool -> N -> {last_s, ideal_s, receivers, error}."""
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    topology: str
    size: int
    """Default bytes: of the one file, or of each file when `files` > 1."""
    quick_size: int
    files: int = 1
    quick_files: int = 1
    runner: Callable[[Env], None] | None = None


@dataclass
class Env:
    """What a scenario's runner works with."""

    scenario: Scenario
    options: Options
    lab: Lab
    result: ScenarioResult
    data: Dataset
    workdir: Path
    dxa_home: Path
    features: dict[str, Any]

    def context(self, dsts: list[str], link: str | None = None, port_base: int = 50000,
                src: str = "src") -> RunContext:
        topo = self.lab.topology
        addrs = {d: (topo.address(d, link) if topo.ports else "127.0.0.1") for d in dsts}
        src_addr = topo.address(src, link) if topo.ports and link else None
        return RunContext(self.lab, src, dsts, addrs, self.data, self.workdir,
                          self.options.cap_s, src_addr=src_addr, port_base=port_base,
                          dxa_home=self.dxa_home)

    def add(self, m: Measurement) -> Measurement:
        log.info("%s: %s %s -> %s", self.scenario.name, m.tool, m.settings,
                 f"{m.throughput_bps / 1e6:.1f} Mbit/s" if m.throughput_bps else
                 (m.error or m.note or "n/a"))
        self.result.measurements.append(m)
        return m


# -- data ----------------------------------------------------------------------------


def make_file(path: Path, size: int) -> None:
    """Incompressible data (dxa compresses where it helps; random data gives it no edge)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    block = 4 * MiB
    with open(path, "wb") as fh:
        left = size
        while left:
            n = min(block, left)
            fh.write(os.urandom(n))
            left -= n


def make_tree(path: Path, files: int, size: int) -> None:
    """`files` files of `size` bytes, 100 to a directory."""
    for i in range(files):
        d = path / f"d{i // 100:03d}"
        if i % 100 == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05d}.bin").write_bytes(os.urandom(size))


# -- shared tool sets ----------------------------------------------------------------


def iperf_pair(env: Env, ctx: RunContext) -> None:
    """The ceiling (8 streams, the hosts' congestion control) and the naive floor
    (one cubic stream)."""
    secs = env.options.iperf_s
    cc = env.lab.congestion.get(ctx.dsts[0], "bbr")
    env.add(run_iperf3(ctx, 8, cc, secs, "ceiling"))
    env.add(run_iperf3(ctx, 1, "cubic", secs, "floor"))


def file_tools(env: Env, ctx: RunContext) -> None:
    """GridFTP (parallel, and with checksums), rsync, dxa: one file or one tree.  For a
    tree of small files GridFTP gets what its users give it for that case: one stream
    per file and 32 files in flight (-cc 32 -pp); -cc 4 was ten times slower here."""
    tree = ctx.data.is_tree
    parallel, concurrency = (1, 32) if tree else (4, 1)
    env.add(run_gridftp(ctx, parallel=parallel, concurrency=concurrency))
    env.add(run_gridftp(ctx, parallel=parallel, concurrency=concurrency, verify=True))
    env.add(run_rsync(ctx))
    env.add(dxa_row(env, ctx))


def dxa_row(env: Env, ctx: RunContext, **kw: Any) -> Measurement:
    if env.features.get("init_error"):
        return Measurement("dxa", "dxa cp", error=env.features["init_error"])
    return run_dxa(ctx, **kw)


# -- scenario runners ----------------------------------------------------------------


def run_point_to_point(env: Env) -> None:
    topo = env.lab.topology
    dst = "src" if not topo.ports else "dst"
    ctx = env.context([dst])
    if env.data.files == 1:
        iperf_pair(env, ctx)
    else:
        env.result.notes.append("Same link as wan: its iperf3 ceiling and floor are in the "
                                "wan table.")
    file_tools(env, ctx)


def run_two_paths(env: Env) -> None:
    fast = env.context(["dst"], link="fast", port_base=50000)
    slow = env.context(["dst"], link="slow", port_base=50100)
    secs = env.options.iperf_s
    cc = env.lab.congestion.get("dst", "bbr")
    env.add(run_iperf3(fast, 8, cc, secs, "ceiling, fast path"))
    env.add(run_iperf3(slow, 8, cc, secs, "ceiling, slow path"))
    env.add(iperf_both_paths(env, fast, slow, cc, secs))
    env.add(run_iperf3(fast, 1, "cubic", secs, "floor, fast path"))
    env.add(run_gridftp(fast, parallel=4))
    env.add(run_rsync(fast))
    m = dxa_row(env, fast, label=" on the fast path only")
    env.add(m)
    if env.features.get("multipath"):
        env.add(dxa_row(env, fast, extra=("--path", env.lab.address("dst", "slow")),
                        label=" striped over both paths"))
    else:
        env.add(not_available("dxa", "dxa cp striped over both paths",
                              "multipath is not in dxa yet"))


def iperf_both_paths(env: Env, fast: RunContext, slow: RunContext, cc: str,
                     secs: float) -> Measurement:
    """Two iperf3 clients at once, one per path: the aggregate ceiling multipath aims at."""
    m = Measurement("iperf3", f"ceiling, both paths at once: 2 x (-P 8 -C {cc}), "
                              f"{secs:.0f} s memory to memory")
    lab = env.lab
    servers: list[subprocess.Popen[str]] = []
    clients: list[subprocess.Popen[str]] = []
    try:
        for ctx in (fast, slow):
            addr = ctx.addrs["dst"]
            servers.append(lab.popen("dst", ["iperf3", "-s", "-p", str(ctx.port_base), "-B",
                                              addr], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL))
            if not _wait_port(lab, "src", addr, ctx.port_base):
                m.error = "iperf3 server did not start"
                return m
        cpu0 = cpu_snapshot(lab)
        for ctx in (fast, slow):
            clients.append(lab.popen("src", [
                "iperf3", "-c", ctx.addrs["dst"], "-p", str(ctx.port_base), "-B",
                str(ctx.src_addr), "-t", str(secs), "-P", "8", "-C", cc, "-J"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        total = 0
        seconds = 0.0
        for c in clients:
            out, err = c.communicate(timeout=secs + 30)
            j = json.loads(out or "{}")
            recv = j.get("end", {}).get("sum_received")
            if not recv:
                m.error = f"iperf3: {j.get('error') or err.strip()[-200:] or 'no result'}"
                return m
            total += int(recv["bytes"])
            seconds = max(seconds, float(recv["seconds"]))
        for c in clients:
            c.wait()
        m.cpu_s = cpu_snapshot(lab) - cpu0
        m.bytes, m.seconds, m.ok = total, seconds, True
        return m
    finally:
        for p in clients + servers:
            lab.stop(p)
            for stream in (p.stdout, p.stderr):
                if stream:
                    stream.close()


FANOUT_NS = (1, 2, 4, 8)


def run_fanout(env: Env) -> None:
    topo = env.lab.topology
    receivers = sorted((h.name for h in topo.hosts if h.name != "src"),
                       key=lambda n: int(n[1:]))
    rate = topo.link("src").spec.rate_bps
    ideal = env.data.bytes * 8 / rate
    for tool in ("uftp", "gridftp"):
        env.result.fanout[tool] = {}
        for n in FANOUT_NS:
            ctx = env.context(receivers[:n])
            if tool == "uftp":
                m = run_uftp(ctx, rate)
            else:
                m = run_gridftp(ctx, parallel=4)
                m.settings = f"{n} x globus-url-copy -p 4 -fast at once (unicast, plaintext)"
            m.extra["receivers_n"] = n
            times = [r["seconds"] for r in m.receivers]
            last = max(times) if times and all(t is not None for t in times) and m.ok else None
            env.result.fanout[tool][n] = {"last_s": last, "ideal_s": ideal,
                                          "receivers": m.receivers, "error": m.error}
            if n == max(FANOUT_NS):
                m.extra["last_receiver_s"] = last
                m.extra["ideal_s"] = ideal
                env.add(m)
            else:
                log.info("fanout %s N=%d: last receiver %s s", tool, n, last)
    env.add(not_available("dxa", "dxa fan-out (source -> relay tree -> 8 receivers)",
                          "fan-out is not in dxa yet"))


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("loopback-2g", "one 2 GiB file on loopback", "loopback", 2 * GiB, 256 * MiB,
                 runner=run_point_to_point),
        Scenario("wan", "50 ms RTT, 0.1% loss, 300 Mbit/s bottleneck", "wan", 2 * GiB,
                 64 * MiB, runner=run_point_to_point),
        Scenario("lossy", "50 ms RTT, 1% loss, 300 Mbit/s", "lossy", 256 * MiB, 32 * MiB,
                 runner=run_point_to_point),
        Scenario("small-files", "10,000 files of 16 KiB over the wan link", "wan", 16 * KiB,
                 16 * KiB, files=10_000, quick_files=500, runner=run_point_to_point),
        Scenario("two-paths", "200 Mbit/s at 40 ms RTT plus 100 Mbit/s at 80 ms RTT",
                 "two-paths", 256 * MiB, 32 * MiB, runner=run_two_paths),
        Scenario("fanout-8", "one source, 8 receivers, 100 Mbit/s per link", "fanout-8",
                 64 * MiB, 8 * MiB, runner=run_fanout),
    )
}


def _link_summary(topo: Topology, name: str) -> dict[str, Any]:
    if not topo.ports:
        return {"capacity_bps": None, "rtt_s": 0.0, "loss": 0.0, "paths": []}
    if name == "fanout-8":
        rate, rtt, loss = topo.path_spec("src", "r1")
        return {"capacity_bps": rate, "rtt_s": rtt, "loss": loss, "paths": [],
                "per_link": True}
    paths = []
    for link in topo.links:
        rate, rtt, loss = topo.path_spec("src", "dst", link.name)
        paths.append({"link": link.name, "rate_bps": rate, "rtt_s": rtt, "loss": loss})
    return {"capacity_bps": sum(p["rate_bps"] for p in paths), "rtt_s": paths[0]["rtt_s"],
            "loss": paths[0]["loss"], "paths": paths}


def _checked_paths(topo: Topology, name: str) -> list[tuple[str, str, str | None]]:
    if name == "fanout-8":
        return [("src", "r8", None)]
    return [("src", "dst", link.name) for link in topo.links]


def run_scenario(scenario: Scenario, options: Options) -> ScenarioResult:
    """Build, check, measure, tear down.  Never raises for a tool; a lab that cannot be
    built is the result's `error`."""
    topo = resolve(scenario.topology)
    files = scenario.quick_files if options.quick else scenario.files
    size = options.size or (scenario.quick_size if options.quick else scenario.size)
    workdir = options.work / scenario.name
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    result = ScenarioResult(scenario.name, scenario.title, topo.name,
                            {"bytes": size * files, "files": files, "file_bytes": size},
                            _link_summary(topo, scenario.name))
    t0 = time.monotonic()
    try:
        if files > 1:
            path = workdir / "src" / "tree"
            make_tree(path, files, size)
        else:
            path = workdir / "src" / f"data-{size}.bin"
            make_file(path, size)
        data = Dataset(path, size * files, files)
        home = workdir / "dxa-home"
        init_error = dxa_init(home)
        features = {"init_error": init_error}
        if not init_error:
            features.update(dxa_features(home))
        result.data["dxa_features"] = features
        with Lab(topo) as lab:
            result.congestion = dict(lab.congestion)
            if options.check and topo.ports:
                checks = ("rtt", "rate") if options.quick else ("rtt", "rate", "loss")
                paths = _checked_paths(topo, scenario.name)
                result.checks = self_check(lab, paths, checks=checks)
                if not all(c.ok for c in result.checks):
                    log.warning("%s: self-check missed; checking again", scenario.name)
                    missed = [f"{c.path} {c.metric} {c.measured:.4g} (asked {c.asked:.4g})"
                              for c in result.checks if not c.ok and c.measured is not None]
                    result.checks = self_check(lab, paths, checks=checks)
                    result.notes.append("The first self-check missed (" + "; ".join(missed)
                                        + "); the figures in the header are the second's.")
                result.check_ok = all(c.ok for c in result.checks)
            env = Env(scenario, options, lab, result, data, workdir, home, features)
            assert scenario.runner is not None
            scenario.runner(env)
    except Exception as exc:  # the run goes on to the next scenario
        log.exception("%s failed", scenario.name)
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.seconds = time.monotonic() - t0
        shutil.rmtree(workdir, ignore_errors=True)
    return result
