"""Issue-4 benchmark: how exactly ``dxa cp --rate R`` holds R, and how fast a rate change lands.

    python -m bench.bench_pacing                          # loopback: 200M and 500M, ~10 s each,
                                                          #   plus 500M -> 200M -> 500M via the library
    python -m bench.bench_pacing --rates 200M --seconds 5 --no-change
    python -m bench.bench_pacing --lab                    # the same over a lab link instead (1 Gbit/s, 20 ms RTT)
    python -m bench.bench_pacing --json out.json          # also every number as JSON ('-': stdout)

What is measured: the received bytes of the receiving side's interface, sampled every
100 ms (``/proc/net/dev``), as TCP payload: rx_bytes minus the per-packet headers
(66 bytes on loopback, 52 on a lab TUN link; ACKs and TLS control traffic are a few
hundred bytes per second).  On loopback everything runs in a fresh network namespace
(``unshare -n``) so no other traffic on the machine is counted; in the lab the
receiver's namespace is its own.  Needs root (exit 2 otherwise).

Reported per run: the average over the active part of the transfer (first to last
sample where bytes move) against R (goal: within 2%), the highest and lowest 1-second
window (goal: highest at most 105% of R), and for a rate change made with
``SharedPacer.set_rate`` from the library: the average of the first second after the
change and of the second after that, against the new rate (goal: the new rate within
one second).  Not a timed test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE_S = 0.1
HEADER_LO = 66  # ethernet 14 + IPv4 20 + TCP with timestamps 32
HEADER_TUN = 52  # IPv4 20 + TCP with timestamps 32
NETNS_ENV = "DXA_PACING_NETNS"


def dxa() -> list[str]:
    return [sys.executable, "-m", "agent.cli.main"]


def parse_rate(text: str) -> int:
    sys.path.insert(0, str(REPO))
    from agent.config import parse_rate as _p

    return _p(text)


def human_rate(bps: float) -> str:
    return f"{bps / 1e6:.1f} Mbit/s"


# -- sampling ------------------------------------------------------------------------------
def read_dev(path: str, iface: str) -> tuple[int, int]:
    """(rx_bytes, rx_packets) of ``iface`` from a /proc/.../net/dev file."""
    with open(path) as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == iface:
                v = rest.split()
                return int(v[0]), int(v[1])
    raise RuntimeError(f"no interface {iface} in {path}")


class Sampler(threading.Thread):
    """Every 100 ms: (monotonic time, payload bytes received so far)."""

    def __init__(self, dev_path: str, iface: str, header: int) -> None:
        super().__init__(daemon=True)
        self.dev_path, self.iface, self.header = dev_path, iface, header
        self.samples: list[tuple[float, int]] = []
        self._halt = threading.Event()
        b, p = read_dev(dev_path, iface)
        self._base = b - p * header

    def run(self) -> None:
        nxt = time.monotonic()
        while not self._halt.is_set():
            try:
                b, p = read_dev(self.dev_path, self.iface)
            except (OSError, RuntimeError):
                break
            self.samples.append((time.monotonic(), b - p * self.header - self._base))
            nxt += SAMPLE_S
            self._halt.wait(max(0.0, nxt - time.monotonic()))

    def stop(self) -> list[tuple[float, int]]:
        self._halt.set()
        self.join(5)
        return self.samples


# -- analysis ----------------------------------------------------------------------------
def active(samples: list[tuple[float, int]], slack: int = 1 << 20) -> list[tuple[float, int]]:
    """The steady part: from the first sample past ``slack`` bytes to the last one ``slack``
    short of the total (the partial first and last 100 ms intervals are left out)."""
    if not samples:
        return []
    total = samples[-1][1]
    i = next((k for k, (_t, b) in enumerate(samples) if b > slack), len(samples) - 1)
    j = max((k for k, (_t, b) in enumerate(samples) if b < total - slack), default=i)
    return samples[i: j + 1]


def windows(samples: list[tuple[float, int]], width: float = 1.0) -> list[tuple[float, float]]:
    """(start time, bits/s) of every window of about ``width`` seconds between samples."""
    out = []
    j = 0
    for i, (t, b) in enumerate(samples):
        while j < len(samples) and samples[j][0] - t < width - SAMPLE_S / 2:
            j += 1
        if j >= len(samples):
            break
        t2, b2 = samples[j]
        out.append((t, (b2 - b) * 8 / (t2 - t)))
    return out


def rate_between(samples: list[tuple[float, int]], a: float, b: float) -> float:
    """bits/s from the first sample at or after time a to the sample nearest to b."""
    sa = next((s for s in samples if s[0] >= a), samples[-1])
    sb = min(samples, key=lambda s: abs(s[0] - b))
    return (sb[1] - sa[1]) * 8 / (sb[0] - sa[0]) if sb[0] > sa[0] else 0.0


@dataclass
class RunResult:
    where: str
    rate_bps: int
    bytes: int = 0
    seconds: float = 0.0
    avg_bps: float = 0.0
    max_1s_bps: float = 0.0
    min_1s_bps: float = 0.0
    cp_json: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def avg_err(self) -> float:
        return self.avg_bps / self.rate_bps - 1 if self.rate_bps else 0.0

    @property
    def max_ratio(self) -> float:
        return self.max_1s_bps / self.rate_bps if self.rate_bps else 0.0


@dataclass
class Change:
    at_s: float
    old_bps: int
    new_bps: int
    first_s_bps: float = 0.0
    second_s_bps: float = 0.0
    after_bps: float = 0.0
    reaction_s: float | None = None


@dataclass
class ChangeResult:
    where: str
    rates: list[int]
    changes: list[Change] = field(default_factory=list)
    error: str | None = None


def analyse(res: RunResult, samples) -> RunResult:
    act = active(samples)
    if len(act) < 12:
        res.error = res.error or f"too few samples ({len(act)})"
        return res
    (t0, b0), (t1, b1) = act[0], act[-1]
    res.bytes, res.seconds = b1 - b0, t1 - t0
    res.avg_bps = (b1 - b0) * 8 / (t1 - t0)
    w = [r for _t, r in windows(act)]
    res.max_1s_bps, res.min_1s_bps = max(w), min(w)
    return res


def analyse_changes(res: ChangeResult, samples, changes: list[tuple[float, int]]) -> ChangeResult:
    act = active(samples)
    end = act[-1][0] if act else 0.0
    start = act[0][0] if act else 0.0
    bounds = [c[0] for c in changes] + [end]
    old = res.rates[0]
    for k, (tc, new) in enumerate(changes):
        nxt = bounds[k + 1]
        ch = Change(round(tc - start, 2), old, new)
        ch.first_s_bps = rate_between(samples, tc, tc + 1)
        ch.second_s_bps = rate_between(samples, tc + 1, min(tc + 2, nxt))
        ch.after_bps = rate_between(samples, tc + 1, nxt)
        # reaction: the first 100 ms interval after the change within 10% of the new rate
        for (ta, ba), (tb, bb) in itertools.pairwise(samples):
            if ta >= tc and tb <= nxt and abs((bb - ba) * 8 / (tb - ta) / new - 1) <= 0.10:
                ch.reaction_s = round(tb - tc, 2)
                break
        res.changes.append(ch)
        old = new
    return res


# -- targets: where the server and the client run ------------------------------------------
class Loopback:
    """Both ends in this process's own network namespace (we re-exec under ``unshare -n``)."""

    name = "loopback"
    header = HEADER_LO

    def __init__(self, env: dict) -> None:
        self.env = env
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        self.host = "127.0.0.1"

    def popen(self, side: str, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(argv, env=self.env, **kw)

    def dev(self, server_pid: int) -> tuple[str, str]:
        return "/proc/net/dev", "lo"

    def close(self) -> None:
        pass


class LabLink:
    """Sender in the lab's ``src`` namespace, receiver in ``dst``, one emulated link between."""

    name = "lab"
    header = HEADER_TUN

    def __init__(self, env: dict, rate: str, rtt: str) -> None:
        sys.path.insert(0, str(REPO))
        from bench.lab.lab import Lab
        from bench.lab.topology import parse_topology

        self.env = env
        topo = parse_topology(f'name = "pacing"\n[[host]]\nname = "src"\n[[host]]\nname = "dst"\n'
                              f'[[link]]\nname = "wan"\na = "src"\nb = "dst"\nrate = "{rate}"\nrtt = "{rtt}"\n')
        self.desc = f"lab link {rate}, RTT {rtt}"
        self.lab = Lab(topo)
        self.lab.__enter__()
        self.host = self.lab.address("dst")
        port = next(p for p in topo.ports if p.host == "dst")
        self.iface = self.lab.ifnames[port.index]

    def popen(self, side: str, argv: list[str], **kw) -> subprocess.Popen:
        return self.lab.popen("dst" if side == "server" else "src", argv, env=self.env, **kw)

    def dev(self, server_pid: int) -> tuple[str, str]:
        return f"/proc/{server_pid}/net/dev", self.iface

    def close(self) -> None:
        self.lab.__exit__(None, None, None)


# -- runs ----------------------------------------------------------------------------------
def make_file(path: Path, size: int) -> None:
    block = os.urandom(16 << 20)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)


def start_server(target, work: Path) -> tuple[subprocess.Popen, int]:
    root = work / "root"
    root.mkdir(exist_ok=True)
    port_file = work / "port"
    port_file.unlink(missing_ok=True)
    listen = "0.0.0.0" if target.name == "lab" else "127.0.0.1"
    with open(work / f"serve-{target.name}.log", "ab") as log:
        p = target.popen("server", [*dxa(), "serve", "--listen", f"{listen}:0", "--port-file", str(port_file),
                                    "--root", str(root)], stdout=subprocess.DEVNULL, stderr=log)
    for _ in range(200):
        if port_file.exists() and port_file.read_text().strip():
            return p, int(port_file.read_text())
        if p.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"dxa serve did not start; see {work / f'serve-{target.name}.log'}")


def run_cp(target, work: Path, port: int, server_pid: int, rate: int, seconds: float, streams: int,
           pull: bool = False) -> RunResult:
    res = RunResult(f"{target.name}, {'pull' if pull else 'push'}", rate)
    (work / "root" / "in").mkdir(parents=True, exist_ok=True)
    src = work / "root" / "in" / "src.bin" if pull else work / "src.bin"
    make_file(src, int(rate / 8 * seconds))
    remote = f"dxa://{target.host}:{port}/in/src.bin"
    argv = [*dxa(), "cp", "--rate", str(rate), "--compress", "off", "--streams", str(streams), "-q", "--json",
            *((remote, str(work / "pulled.bin")) if pull else (str(src), remote))]
    sampler = Sampler(*target.dev(server_pid), target.header)
    sampler.start()
    try:
        p = target.popen("client", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = p.communicate(timeout=seconds * 4 + 60)
    finally:
        samples = sampler.stop()
    if p.returncode != 0:
        res.error = f"dxa cp exited {p.returncode}: {err.decode()[-300:]}"
    with contextlib.suppress(ValueError):
        res.cp_json = json.loads(out)
    src.unlink(missing_ok=True)
    (work / "pulled.bin").unlink(missing_ok=True)
    shutil.rmtree(work / "root" / "in", ignore_errors=True)
    res.samples = samples  # type: ignore[attr-defined]
    return analyse(res, samples)


def run_change(target, work: Path, port: int, server_pid: int, rates: list[int], step: float,
               streams: int) -> ChangeResult:
    res = ChangeResult(target.name, rates)
    src = work / "src.bin"
    make_file(src, int(sum(rates) / 8 * step))
    argv = [sys.executable, "-m", "bench.bench_pacing", "--library-child", f"dxa://{target.host}:{port}/in/c.bin",
            str(src), ",".join(map(str, rates)), str(step), str(streams)]
    sampler = Sampler(*target.dev(server_pid), target.header)
    sampler.start()
    try:
        p = target.popen("client", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = p.communicate(timeout=step * len(rates) * 4 + 60)
    finally:
        samples = sampler.stop()
    src.unlink()
    shutil.rmtree(work / "root" / "in", ignore_errors=True)
    try:
        child = json.loads(out)
    except ValueError:
        res.error = f"library client failed ({p.returncode}): {err.decode()[-300:]}"
        return res
    if not child.get("verified"):
        res.error = f"copy not verified: {child}"
    res.samples = samples  # type: ignore[attr-defined]
    return analyse_changes(res, samples, [(t, r) for t, r in child["changes"]])


async def _library_child(url: str, src: str, rates: list[int], step: float, streams: int) -> dict:
    sys.path.insert(0, str(REPO))
    import agent
    from agent.aio.pacing import SharedPacer

    pacer = SharedPacer(rates[0])
    task = asyncio.ensure_future(agent.copy([src], url, pacer=pacer, compress="off", streams=streams))
    changes = []
    # the first change comes `step` seconds after data starts to flow (setup takes a moment)
    while pacer.reserved_bytes == 0 and not task.done():
        await asyncio.sleep(0.01)
    for r in rates[1:]:
        await asyncio.sleep(step)
        if task.done():
            break
        pacer.set_rate(r)  # what a controller does: from the event loop, mid-flight
        changes.append((time.monotonic(), r))
    res = await task
    return {"verified": res.verified, "seconds": res.seconds, "bytes": res.bytes_sent, "changes": changes}


# -- report ----------------------------------------------------------------------------------
def table(runs: list[RunResult], changes: list[ChangeResult]) -> str:
    lines = [("| where | rate asked | average measured | error | max 1-s window | min 1-s window | s | "
              "dxa cp --json gbps |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        if r.error and not r.avg_bps:
            lines.append(f"| {r.where} | {human_rate(r.rate_bps)} | error: {r.error} | | | | | |")
            continue
        lines.append(f"| {r.where} | {human_rate(r.rate_bps)} | {human_rate(r.avg_bps)} | {r.avg_err * 100:+.2f}% | "
                     f"{human_rate(r.max_1s_bps)} ({r.max_ratio * 100:.1f}%) | {human_rate(r.min_1s_bps)} "
                     f"({r.min_1s_bps / r.rate_bps * 100:.1f}%) | {r.seconds:.1f} | "
                     f"{r.cp_json.get('gbps', '')} |")
    if changes:
        lines += ["", ("| where | change (library `set_rate`) | at s | first 1 s after | second 1 s after | "
                       "rest of the step | first 100 ms within 10% |"),
                  "|---|---|---:|---:|---:|---:|---:|"]
        for c in changes:
            if c.error and not c.changes:
                lines.append(f"| {c.where} | error: {c.error} | | | | | |")
            for ch in c.changes:
                lines.append(
                    f"| {c.where} | {human_rate(ch.old_bps)} → {human_rate(ch.new_bps)} | {ch.at_s:.1f} | "
                    f"{human_rate(ch.first_s_bps)} ({ch.first_s_bps / ch.new_bps * 100:.1f}%) | "
                    f"{human_rate(ch.second_s_bps)} ({ch.second_s_bps / ch.new_bps * 100:.1f}%) | "
                    f"{human_rate(ch.after_bps)} ({ch.after_bps / ch.new_bps * 100:.1f}%) | "
                    f"{f'{ch.reaction_s:.1f} s' if ch.reaction_s is not None else 'never'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_pacing", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="200M,500M", help="rates to hold, bits/s (default 200M,500M)")
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds per run (the file is sized for it)")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--pull-rates", default="200M",
                    help="rates to hold pulling (the server paces, from HELLO); loopback only (default 200M)")
    ap.add_argument("--change", default="500M,200M,500M",
                    help="rates for the library run, one step of --step seconds each (default 500M,200M,500M)")
    ap.add_argument("--step", type=float, default=4.0)
    ap.add_argument("--no-change", action="store_true", help="skip the rate-change run")
    ap.add_argument("--lab", action="store_true",
                    help="over a lab link instead of loopback (bench/lab; needs bench/setup.sh's relay)")
    ap.add_argument("--lab-rate", default="1gbit", help="lab link capacity (default 1gbit)")
    ap.add_argument("--lab-rtt", default="20ms")
    ap.add_argument("--json", nargs="?", const="-", metavar="PATH", help="write the results as JSON ('-': stdout)")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--library-child", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.library_child:
        url, src, rates, step, streams = a.library_child
        out = asyncio.run(_library_child(url, src, [int(r) for r in rates.split(",")], float(step), int(streams)))
        print(json.dumps(out))
        return 0

    if os.geteuid() != 0:
        print("bench_pacing needs root (a private network namespace for clean counters)", file=sys.stderr)
        return 2
    if not a.lab and os.environ.get(NETNS_ENV) != "1":
        # re-run in a fresh network namespace: loopback counters then count only our traffic
        env = dict(os.environ, **{NETNS_ENV: "1"})
        return subprocess.call(["unshare", "-n", sys.executable, "-m", "bench.bench_pacing", *(argv or sys.argv[1:])],
                               env=env, cwd=str(REPO))

    rates = [parse_rate(r) for r in a.rates.split(",") if r]
    change_rates = [parse_rate(r) for r in a.change.split(",") if r]
    pull_rates = [parse_rate(r) for r in a.pull_rates.split(",") if r]
    work = a.workdir or Path(tempfile.mkdtemp(prefix="dxa-pacing-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, DXA_HOME=str(work / "home"), PYTHONPATH=str(REPO))
    env.pop(NETNS_ENV, None)
    subprocess.run([*dxa(), "init", "--name", "pacing"], env=env, check=True, capture_output=True)
    targets = [lambda: LabLink(env, a.lab_rate, a.lab_rtt)] if a.lab else [lambda: Loopback(env)]
    runs: list[RunResult] = []
    changes: list[ChangeResult] = []
    meta = {"seconds": a.seconds, "streams": a.streams, "sample_s": SAMPLE_S, "where": {}}
    try:
        for make in targets:
            try:
                target = make()
            except (OSError, RuntimeError, ValueError, ImportError) as exc:  # the lab may be unavailable
                print(f"skipping a target: {exc}", file=sys.stderr)
                continue
            meta["where"][target.name] = getattr(target, "desc", "loopback in a private network namespace")
            server = None
            try:
                server, port = start_server(target, work)
                for r in rates:
                    print(f"[{target.name}] dxa cp --rate {r} ...", file=sys.stderr)
                    runs.append(run_cp(target, work, port, server.pid, r, a.seconds, a.streams))
                for r in pull_rates if target.name == "loopback" else []:
                    print(f"[{target.name}] dxa cp --rate {r} (pull) ...", file=sys.stderr)
                    runs.append(run_cp(target, work, port, server.pid, r, a.seconds, a.streams, pull=True))
                if not a.no_change and len(change_rates) > 1:
                    print(f"[{target.name}] library set_rate {change_rates} ...", file=sys.stderr)
                    changes.append(run_change(target, work, port, server.pid, change_rates, a.step, a.streams))
            finally:
                if server is not None and server.poll() is None:
                    server.terminate()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        server.wait(10)
                target.close()
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(table(runs, changes))
    if a.json:
        doc = {"meta": meta,
               "runs": [asdict(r) | {"avg_err": r.avg_err, "max_ratio": r.max_ratio,
                                      "samples": getattr(r, "samples", [])} for r in runs],
               "changes": [asdict(c) | {"samples": getattr(c, "samples", [])} for c in changes]}
        text = json.dumps(doc, indent=1)
        if a.json == "-":
            print(text)
        else:
            Path(a.json).write_text(text)
    ok = all(not r.error and abs(r.avg_err) <= 0.02 and r.max_ratio <= 1.05 for r in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
