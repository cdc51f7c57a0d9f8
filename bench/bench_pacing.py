"""Issue-4 benchmark: how exactly ``dxa cp --rate R`` holds R, and how fast a rate change lands.

    python -m bench.bench_pacing                          # loopback: 200M and 500M, ~10 s each,
                                                          #   plus 500M -> 200M -> 500M via the library
    python -m bench.bench_pacing --rates 200M --seconds 5 --no-change
    python -m bench.bench_pacing --lab                    # the same over a lab link instead (1 Gbit/s, 20 ms RTT)
    python -m bench.bench_pacing --json out.json          # also every number as JSON ('-': stdout)
    python -m bench.bench_pacing --scheduled --repeat 2   # instead: the rate from the scheduler (below)
    python -m bench.bench_pacing --scheduled --lab        #   ... with the scheduler on a third lab host

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

``--scheduled`` measures the real path instead: ``dxa controller serve`` (with ``--admin
ops`` when this checkout has the flag), a receiving ``dxa serve --controller`` and a
sending ``dxa serve --grpc --controller`` (identities from one ``dxa init`` CA);
``dxa submit --rate`` of the first ``--change`` rate, a file sized for ``--step`` seconds
per rate; the granted rate then changed with the scheduler's ``ChangeRate``
(``ControllerClient.change_rate``, as the operator ``ops``, else as the sending agent, a
party of the reservation) ``--step`` seconds (plus a random 0-0.5 s, so that the changes
land at any phase of the agent's fallback poll) after data starts, and again, which the
sending agent follows as the scheduler pushes it (WatchReservations; polling every 0.5 s
is the fallback).  Per step at its granted rate (from 1 s after
the change): average, highest and lowest 1-second window; per change, measured from the
moment ChangeRate returned: when the agent set its pacer (its log), the first and second
second after, and the first 100 ms sample within 10% of the new rate (goal: within 1 s).
In the lab the scheduler and the operator run on a third host ``ctl``, 20 ms RTT from
both agents over a switch, so only the data crosses the measured link.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.bench_engine import dxa  # the dxa command line, as the engine bench runs it

REPO = Path(__file__).resolve().parent.parent
SAMPLE_S = 0.1
HEADER_LO = 66  # ethernet 14 + IPv4 20 + TCP with timestamps 32
HEADER_TUN = 52  # IPv4 20 + TCP with timestamps 32
NETNS_ENV = "DXA_PACING_NETNS"


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
        self.host = self.ctl_host = self.agent_host = "127.0.0.1"

    def popen(self, side: str, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(argv, env=self.env, **kw)

    def dev(self, server_pid: int) -> tuple[str, str]:
        return "/proc/net/dev", "lo"

    def drops(self) -> int | None:
        return None  # loopback drops nothing

    def close(self) -> None:
        pass


class LabLink:
    """Sender in the lab's ``src`` namespace, receiver in ``dst``, one emulated link between."""

    name = "lab"
    header = HEADER_TUN

    def __init__(self, env: dict, rate: str, rtt: str, control: bool = False) -> None:
        sys.path.insert(0, str(REPO))
        from bench.lab.lab import Lab
        from bench.lab.topology import parse_topology

        self.env = env
        text = (f'name = "pacing"\n[[host]]\nname = "src"\n[[host]]\nname = "dst"\n'
                f'[[link]]\nname = "wan"\na = "src"\nb = "dst"\nrate = "{rate}"\nrtt = "{rtt}"\n')
        self.desc = f"lab link {rate}, RTT {rtt}"
        if control:
            # --scheduled: a third host `ctl` (the scheduler and the operator) on a switch `lan`
            # with src and dst; every spoke uncapped, 10 ms RTT, so host to host 20 ms RTT.
            # The data stays on `wan`; control traffic crosses `lan` and is not counted.
            text += '[[host]]\nname = "ctl"\n[[switch]]\nname = "lan"\n' + "".join(
                f'[[link]]\nname = "l{h}"\na = "{h}"\nb = "lan"\nrtt = "10ms"\n' for h in ("src", "dst", "ctl"))
            self.desc += "; scheduler on host ctl, 20 ms RTT from both agents (switch lan)"
        topo = parse_topology(text)
        self.lab = Lab(topo)
        self.lab.__enter__()
        self.host = self.lab.address("dst", "wan")
        port = next(p for p in topo.ports if p.host == "dst" and p.link == "wan")
        self.iface = self.lab.ifnames[port.index]
        if control:
            self.ctl_host = "ctl"  # named in the scheduler's certificate; /etc/hosts of the lab resolves it
            self.agent_host = self.lab.address("src", "lsrc")  # the sender's gRPC, as ctl reaches it

    def popen(self, side: str, argv: list[str], **kw) -> subprocess.Popen:
        host = {"server": "dst", "client": "src", "ctl": "ctl"}[side]
        return self.lab.popen(host, argv, env=self.env, **kw)

    def dev(self, server_pid: int) -> tuple[str, str]:
        return f"/proc/{server_pid}/net/dev", self.iface

    def drops(self) -> int | None:
        """Packets the relay dropped so far (a full queue or emulated loss), every port."""
        stats = self.lab.relay_stats()
        if not stats:
            return None
        return sum(port[d][k] for port in stats["ports"] for d in ("ingress", "egress")
                   for k in ("drop_queue", "drop_loss"))

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


# -- through the scheduler (--scheduled) ---------------------------------------------------
SCHED_TOPOLOGY = """# bench_pacing --scheduled: two sites, one backbone link far above the rates asked
[[site]]
name = "here"
[[site]]
name = "there"
[[link]]
a = "here"
b = "there"
capacity = "10G"
"""
AGENT_CAPACITY = "10G"


@dataclass
class Step:
    rate_bps: int
    from_s: float
    to_s: float
    avg_bps: float = 0.0
    max_1s_bps: float = 0.0
    min_1s_bps: float = 0.0


@dataclass
class ScheduledResult:
    where: str
    rates: list[int]
    operator: str = ""
    steps: list[Step] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    call_ms: list[float] = field(default_factory=list)
    applied_s: list[float | None] = field(default_factory=list)
    """When the sending agent set its pacer (its log line), seconds after ChangeRate returned."""
    granted: list[int] = field(default_factory=list)
    job: dict = field(default_factory=dict)
    retransmits: int | None = None
    """TCP segments the sending agent's namespace retransmitted during the run."""
    relay_drops: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return (not self.error and bool(self.steps) and len(self.changes) == len(self.rates) - 1
                and all(abs(s.avg_bps / s.rate_bps - 1) <= 0.02 and s.max_1s_bps <= 1.05 * s.rate_bps
                        for s in self.steps)
                and all(c.reaction_s is not None and c.reaction_s <= 1.0 for c in self.changes))


def analyse_steps(res: ScheduledResult, samples, changes: list[tuple[float, int]], settle: float = 1.0
                  ) -> ScheduledResult:
    """Each step at its granted rate: from the start of the copy (first step) or ``settle``
    seconds after the ChangeRate call returned, to the next change (last step: the end)."""
    act = active(samples)
    if len(act) < 12:
        res.error = res.error or f"too few samples ({len(act)})"
        return res
    start, end = act[0][0], act[-1][0]
    bounds = [start] + [t + settle for t, _r in changes]
    ends = [t for t, _r in changes] + [end]
    for rate, a, b in zip(res.rates, bounds, ends):
        part = [s for s in act if a <= s[0] <= b]
        step = Step(rate, round(a - start, 2), round(b - start, 2))
        if len(part) >= 11:
            step.avg_bps = (part[-1][1] - part[0][1]) * 8 / (part[-1][0] - part[0][0])
            w = [r for _t, r in windows(part)]
            step.max_1s_bps, step.min_1s_bps = max(w), min(w)
        res.steps.append(step)
    return analyse_changes(res, samples, changes)  # type: ignore[arg-type]  # same fields used


def _wait_file(path: Path, proc: subprocess.Popen, what: str, log: Path, needle: str | None = None,
               timeout: float = 20.0) -> str:
    """The port in ``path`` (or, with ``needle``, wait for that text in ``log``) once ``proc`` wrote it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle is None and path.exists() and path.read_text().strip():
            return path.read_text().strip()
        if needle is not None and needle in log.read_text(errors="replace"):
            return needle
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-600:] if log.exists() else ""
    raise RuntimeError(f"{what} did not start (see {log}): {tail}")


def _identities(work: Path, env: dict, operator: str) -> dict[str, Path]:
    """One CA (the scheduler's home) and a certificate for each node, as `dxa init` makes them."""
    homes = {n: work / "homes" / n for n in ("ctl", "src", "dst", operator)}
    subprocess.run([*dxa(), "init", "--home", str(homes["ctl"]), "--name", "ctl"], env=env, check=True,
                   capture_output=True)
    for name in ("src", "dst", operator):
        if not (homes[name] / "node.pem").exists():
            subprocess.run([*dxa(), "init", "--home", str(homes["ctl"]), "--issue", name, "--out", str(homes[name])],
                           env=env, check=True, capture_output=True)
    return homes


def admin_flag_available(env: dict) -> bool:
    """True if this checkout's `dxa controller serve` has --admin (else the sender's own
    identity changes the rate: a party of the reservation may)."""
    p = subprocess.run([*dxa(), "controller", "serve", "--help"], check=False, env=env, capture_output=True,
                       text=True)
    return "--admin" in p.stdout


def run_scheduled(target, work: Path, rates: list[int], step: float, env: dict) -> ScheduledResult:
    """`dxa controller serve`, a receiving `dxa serve --controller`, a sending `dxa serve --grpc
    --controller`; `dxa submit --rate R0` of a file sized for the steps, then ChangeRate on the
    scheduler every ``step`` seconds after data starts (made by the --scheduled-child)."""
    operator = "ops" if admin_flag_available(env) else "src"
    res = ScheduledResult(f"{target.name}, scheduler", rates, operator=operator)
    run_dir = work / "sched"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    homes = _identities(work, env, operator)
    (run_dir / "topology.toml").write_text(SCHED_TOPOLOGY)
    src_root, dst_root = run_dir / "root-src", run_dir / "root-dst"
    src_root.mkdir()
    dst_root.mkdir()
    listen = "0.0.0.0" if target.name == "lab" else "127.0.0.1"
    procs: list[subprocess.Popen] = []
    sampler = None

    def start(side: str, name: str, argv: list[str]) -> tuple[subprocess.Popen, Path]:
        log = run_dir / f"{name}.log"
        with open(log, "ab") as f:
            p = target.popen(side, argv, stdout=subprocess.DEVNULL, stderr=f)
        procs.append(p)
        return p, log

    try:
        ctl, ctl_log = start("ctl", "controller", [
            *dxa(), "controller", "serve", "--home", str(homes["ctl"]), "--listen", f"{listen}:0",
            "--port-file", str(run_dir / "ctl.port"), "--topology", str(run_dir / "topology.toml"),
            "--state", str(run_dir / "ledger.db"), *(["--admin", operator] if operator != "src" else [])])
        ctl_target = f"{target.ctl_host}:{_wait_file(run_dir / 'ctl.port', ctl, 'dxa controller serve', ctl_log)}"
        dst, dst_log = start("server", "serve-dst", [
            *dxa(), "serve", "--home", str(homes["dst"]), "--listen", f"{listen}:0", "--port-file",
            str(run_dir / "dst.port"), "--root", str(dst_root), "--controller", ctl_target, "--site", "there",
            "--capacity", AGENT_CAPACITY])
        src, src_log = start("client", "serve-src", [
            *dxa(), "serve", "--home", str(homes["src"]), "--listen", f"{listen}:0", "--port-file",
            str(run_dir / "src.port"), "--root", str(src_root), "--grpc", f"{listen}:0", "--grpc-port-file",
            str(run_dir / "src.grpc"), "--controller", ctl_target, "--site", "here", "--capacity", AGENT_CAPACITY])
        dst_port = _wait_file(run_dir / "dst.port", dst, "the receiving dxa serve", dst_log)
        _wait_file(run_dir / "src.port", src, "the sending dxa serve", src_log)
        grpc_port = _wait_file(run_dir / "src.grpc", src, "the sending dxa serve --grpc", src_log)
        for p, log, name in ((dst, dst_log, "dst"), (src, src_log, "src")):
            _wait_file(log, p, f"{name}'s registration", log, needle=f"with the scheduler {ctl_target} as {name}")
        size = int(sum(rates) / 8 * step)
        make_file(src_root / "sched.bin", size)
        dev_path, iface = target.dev(dst.pid)
        spec = {"controller": ctl_target, "home": str(homes[operator]), "agent": f"{target.agent_host}:{grpc_port}",
                "source": "sched.bin", "destination": f"dxa://{target.host}:{dst_port}/sched.bin",
                "rates": rates, "step": step, "dev": dev_path, "iface": iface, "header": target.header}
        snmp = f"/proc/{src.pid}/net/snmp"
        retrans0, drops0 = tcp_retransmits(snmp), target.drops()
        sampler = Sampler(dev_path, iface, target.header)
        sampler.start()
        child = target.popen("ctl", [sys.executable, "-m", "bench.bench_pacing", "--scheduled-child", json.dumps(spec)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(child)
        out, err = child.communicate(timeout=step * len(rates) * 4 + 60)
        samples = sampler.stop()
        sampler = None
        res.retransmits = tcp_retransmits(snmp) - retrans0
        drops1 = target.drops()
        res.relay_drops = drops1 - drops0 if drops0 is not None and drops1 is not None else None
        try:
            doc = json.loads(out)
        except ValueError:
            res.error = f"the scheduled client failed ({child.returncode}): {err.decode()[-400:]}"
            return res
        res.job = doc.get("job", {})
        res.granted = [c["granted"] for c in doc["changes"]]
        res.call_ms = [round((c["returned"] - c["called"]) * 1000, 1) for c in doc["changes"]]
        applied = _rate_log_times(src_log)
        res.applied_s = [round(applied[k] - c["wall"], 3) if k < len(applied) else None
                         for k, c in enumerate(doc["changes"])]
        if doc.get("error"):
            res.error = doc["error"]
        elif res.granted != rates[1:len(res.granted) + 1]:
            res.error = f"the scheduler granted {res.granted}, not {rates[1:]}"
        elif res.job.get("state") != "done":
            res.error = f"the job did not finish: {res.job}"
        elif (dst_root / "sched.bin").stat().st_size != size:
            res.error = f"received {(dst_root / 'sched.bin').stat().st_size} bytes of {size}"
        res.samples = samples  # type: ignore[attr-defined]
        return analyse_steps(res, samples, [(c["returned"], c["rate"]) for c in doc["changes"]])
    finally:
        if sampler is not None:
            sampler.stop()
        for p in reversed(procs):  # the child, then the senders, the receiver, the scheduler
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        shutil.rmtree(src_root, ignore_errors=True)
        shutil.rmtree(dst_root, ignore_errors=True)


def tcp_retransmits(snmp: str) -> int:
    """RetransSegs of the Tcp line of a /proc/.../net/snmp file."""
    with open(snmp) as f:
        head, values = [line.split() for line in f if line.startswith("Tcp:")][:2]
    return int(values[head.index("RetransSegs")])


def _rate_log_times(log: Path) -> list[float]:
    """Wall-clock times of the sending agent's "transfer t1: rate A -> B bit/s" lines (its
    pushed or polled new rate reached the pacer), in order."""
    from datetime import datetime

    out = []
    for line in log.read_text(errors="replace").splitlines():
        if ": rate " in line and " bit/s" in line and "agent.service.transfers" in line:
            out.append(datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return out


def _payload(dev: str, iface: str, header: int) -> int:
    b, p = read_dev(dev, iface)
    return b - p * header


async def _scheduled_child(spec: dict) -> dict:
    """In the scheduler's host: `dxa submit --wait` the job, find its reservation, and change
    the reservation's rate through the scheduler every ``step`` seconds after data starts."""
    sys.path.insert(0, str(REPO))
    from agent.store.pki import load_identity
    from controller_stub.client import ControllerClient, ControllerError
    from controller_stub.ledger import State

    rates, step = spec["rates"], spec["step"]
    out: dict = {"changes": []}
    submit = await asyncio.create_subprocess_exec(
        *dxa(), "submit", "--home", spec["home"], "--agent", spec["agent"], "--server-name", "src", "--rate",
        str(rates[0]), "--wait", "--json", spec["source"], spec["destination"],
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    waiting = asyncio.ensure_future(submit.communicate())
    try:
        async with ControllerClient(spec["controller"], load_identity(spec["home"]), timeout=5) as c:
            rid = None
            base = _payload(spec["dev"], spec["iface"], spec["header"])
            while rid is None and not waiting.done():
                held = await c.list_reservations("src", [State.TRANSFERRING])
                rid = held[0].id if held else None
                await asyncio.sleep(0.02)
            # data starts: the receiver's counter passes 1 MiB (what the analysis calls the start)
            while not waiting.done() and _payload(spec["dev"], spec["iface"], spec["header"]) - base < 1 << 20:
                await asyncio.sleep(0.01)
            t_data = time.monotonic()
            out["reservation"] = rid
            for k, r in enumerate(rates[1:], 1):
                # a random extra 0-0.5 s: the changes land at any phase of the agent's 0.5 s fallback poll
                # (at exact multiples of `step` they would always hit the same phase)
                await asyncio.sleep(max(0.0, t_data + k * step + random.uniform(0, 0.5) - time.monotonic()))
                if waiting.done() or rid is None:
                    break
                called = time.monotonic()
                granted, _admitted = await c.change_rate(rid, r)
                out["changes"].append({"called": called, "returned": time.monotonic(), "wall": time.time(),
                                       "rate": r, "granted": granted.rate_bps})
    except (OSError, ValueError, ControllerError) as exc:  # report it; the parent tears everything down
        out["error"] = f"{type(exc).__name__}: {exc}"
    stdout, stderr = await waiting
    try:
        job = json.loads(stdout)
        out["job"] = job[0] if isinstance(job, list) else job
    except ValueError:
        out["error"] = out.get("error") or f"dxa submit exited {submit.returncode}: {stderr.decode()[-300:]}"
    return out


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


def scheduled_table(results: list[ScheduledResult]) -> str:
    lines = ["| where | run | step at the granted rate | s | average | error | max 1-s window | min 1-s window |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for n, r in enumerate(results, 1):
        if r.error:
            lines.append(f"| {r.where} | {n} | error: {' '.join(r.error.split()).replace('|', '/')} | | | | | |")
        for st in r.steps:
            if not st.avg_bps:
                lines.append(f"| {r.where} | {n} | {human_rate(st.rate_bps)} | {st.from_s:.1f}–{st.to_s:.1f} | "
                             "too short | | | |")
                continue
            lines.append(f"| {r.where} | {n} | {human_rate(st.rate_bps)} | {st.from_s:.1f}–{st.to_s:.1f} | "
                         f"{human_rate(st.avg_bps)} | {(st.avg_bps / st.rate_bps - 1) * 100:+.2f}% | "
                         f"{human_rate(st.max_1s_bps)} ({st.max_1s_bps / st.rate_bps * 100:.1f}%) | "
                         f"{human_rate(st.min_1s_bps)} ({st.min_1s_bps / st.rate_bps * 100:.1f}%) |")
    lines += ["", ("| where | run | change (scheduler `ChangeRate`) | returned at s | call | agent's pacer set after | "
                   "first 1 s after | second 1 s after | first 100 ms within 10% |"),
              "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for n, r in enumerate(results, 1):
        for ch, ms, ap in zip(r.changes, r.call_ms, r.applied_s):
            lines.append(
                f"| {r.where} | {n} | {human_rate(ch.old_bps)} → {human_rate(ch.new_bps)} | {ch.at_s:.1f} | "
                f"{ms:.0f} ms | {f'{ap:.2f} s' if ap is not None else '?'} | "
                f"{human_rate(ch.first_s_bps)} ({ch.first_s_bps / ch.new_bps * 100:.1f}%) | "
                f"{human_rate(ch.second_s_bps)} ({ch.second_s_bps / ch.new_bps * 100:.1f}%) | "
                f"{f'{ch.reaction_s:.1f} s' if ch.reaction_s is not None else 'never'} |")
    lines += ["", "| where | run | ChangeRate called as | job | active s | TCP retransmits (sender) | relay drops |",
              "|---|---:|---|---|---:|---:|---:|"]
    for n, r in enumerate(results, 1):
        lines.append(f"| {r.where} | {n} | {r.operator} | {r.job.get('state', '?')} | "
                     f"{r.steps[-1].to_s if r.steps else 0:.1f} | "
                     f"{r.retransmits if r.retransmits is not None else '?'} | "
                     f"{r.relay_drops if r.relay_drops is not None else '-'} |")
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
                    help="rates for the library run (and --scheduled), one step of --step seconds each "
                         "(default 500M,200M,500M)")
    ap.add_argument("--step", type=float, default=4.0, help="seconds per step of --change (default 4)")
    ap.add_argument("--no-change", action="store_true", help="skip the rate-change run")
    ap.add_argument("--lab", action="store_true",
                    help="over a lab link instead of loopback (bench/lab; needs bench/setup.sh's relay)")
    ap.add_argument("--lab-rate", default="1gbit", help="lab link capacity (default 1gbit)")
    ap.add_argument("--lab-rtt", default="20ms")
    ap.add_argument("--json", nargs="?", const="-", metavar="PATH", help="write the results as JSON ('-': stdout)")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--scheduled", action="store_true",
                    help="instead of the runs above: the rate granted and changed by the scheduler (dxa controller "
                         "serve, two dxa serve --controller agents, dxa submit, ChangeRate to the --change rates "
                         "every --step seconds; the job has the daemon's 4 streams, --streams does not apply); "
                         "~15 s per run on loopback, ~20 s in the lab")
    ap.add_argument("--repeat", type=int, default=1, help="with --scheduled: runs (default 1)")
    ap.add_argument("--library-child", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--scheduled-child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.scheduled_child:
        print(json.dumps(asyncio.run(_scheduled_child(json.loads(a.scheduled_child)))))
        return 0
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
        child = subprocess.Popen(["unshare", "-n", sys.executable, "-m", "bench.bench_pacing", *(argv or sys.argv[1:])],
                                 env=env, cwd=str(REPO))
        # SIGTERM is passed on; Ctrl-C reaches the child by itself: either way let it tear down
        signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:
                continue
    # SIGTERM unwinds like Ctrl-C, through the finally blocks that stop what we started
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))

    rates = [parse_rate(r) for r in a.rates.split(",") if r]
    change_rates = [parse_rate(r) for r in a.change.split(",") if r]
    pull_rates = [parse_rate(r) for r in a.pull_rates.split(",") if r]
    work = a.workdir or Path(tempfile.mkdtemp(prefix="dxa-pacing-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, DXA_HOME=str(work / "home"), PYTHONPATH=str(REPO))
    env.pop(NETNS_ENV, None)
    subprocess.run([*dxa(), "init", "--name", "pacing"], env=env, check=True, capture_output=True)
    targets = [lambda: LabLink(env, a.lab_rate, a.lab_rtt, control=a.scheduled)] if a.lab else [lambda: Loopback(env)]
    runs: list[RunResult] = []
    changes: list[ChangeResult] = []
    scheduled: list[ScheduledResult] = []
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
                if a.scheduled:
                    for n in range(1, a.repeat + 1):
                        print(f"[{target.name}] through the scheduler {change_rates}, run {n} ...", file=sys.stderr)
                        scheduled.append(run_scheduled(target, work, change_rates, a.step, env))
                    continue
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
    print(scheduled_table(scheduled) if a.scheduled else table(runs, changes))
    if a.json:
        doc = {"meta": meta,
               "runs": [asdict(r) | {"avg_err": r.avg_err, "max_ratio": r.max_ratio,
                                      "samples": getattr(r, "samples", [])} for r in runs],
               "changes": [asdict(c) | {"samples": getattr(c, "samples", [])} for c in changes],
               "scheduled": [asdict(r) | {"ok": r.ok, "samples": getattr(r, "samples", [])} for r in scheduled]}
        text = json.dumps(doc, indent=1)
        if a.json == "-":
            print(text)
        else:
            Path(a.json).write_text(text)
    ok = (all(not r.error and abs(r.avg_err) <= 0.02 and r.max_ratio <= 1.05 for r in runs)
          and all(r.ok for r in scheduled))
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # everything started was stopped on the way out
        print("interrupted", file=sys.stderr)
        sys.exit(130)
