"""Runners for dxa and its peers (iperf3, GridFTP, rsync, uftp) inside a built lab.

Every runner measures the same way: servers start first, then a CPU snapshot of
every process in the lab's namespaces, then the client runs (killed at the
scenario's time cap), then a second snapshot; the bytes that arrived are read
from the destination files.  Throughput is payload bytes / client wall time.
A runner never raises for a tool's failure: it returns a Measurement with
`error` set, and the report prints "n/a (error)".  A dxa feature that does not
exist yet gives `available=False` and prints "n/a".
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .lab import NETNS_DIR, Lab, _netns_pids

__all__ = ["Dataset", "Measurement", "RunContext", "dxa_features"]

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Dataset:
    """What is sent: one file, or a tree of files."""

    path: Path
    bytes: int
    files: int

    @property
    def is_tree(self) -> bool:
        return self.path.is_dir()


@dataclass
class Measurement:
    tool: str
    settings: str
    ok: bool = False
    available: bool = True
    bytes: int = 0
    seconds: float | None = None
    cpu_s: float | None = None
    partial: bool = False
    error: str | None = None
    note: str = ""
    samples: list[tuple[float, int]] = field(default_factory=list)
    """(seconds since start, cumulative bytes received on the wire by the receivers)."""
    receivers: list[dict[str, Any]] = field(default_factory=list)
    """Fan-out: per receiver, completion time (None if it never completed)."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def throughput_bps(self) -> float | None:
        if not self.available or self.error or not self.seconds or not self.bytes:
            return None
        return self.bytes * 8 / self.seconds

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["throughput_bps"] = self.throughput_bps
        return d


@dataclass
class RunContext:
    lab: Lab
    src: str
    dsts: list[str]
    addrs: dict[str, str]
    """Destination address of each receiver (on the path the scenario uses)."""
    data: Dataset
    workdir: Path
    cap_s: float
    src_addr: str | None = None
    port_base: int = 50000
    dxa_home: Path | None = None

    def dst_dir(self, host: str) -> Path:
        return self.workdir / "dst" / host


# -- measuring helpers ----------------------------------------------------------------


def _proc_cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def cpu_snapshot(lab: Lab) -> float:
    """CPU seconds used so far by the processes in the lab's namespaces (and their reaped
    children) plus the children this process has reaped (finished clients)."""
    total = 0.0
    for ns in lab.namespaces.values():
        for pid in _netns_pids(ns):
            total += _proc_cpu(pid)
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return total + ru.ru_utime + ru.ru_stime


def tree_bytes(path: Path) -> tuple[int, int]:
    """(bytes, files) under path, counting only data actually allocated."""
    total = files = 0
    if path.is_file():
        st = path.stat()
        return min(st.st_size, st.st_blocks * 512), 1
    for root, _, names in os.walk(path):
        for name in names:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            total += min(st.st_size, st.st_blocks * 512)
            files += 1
    return total, files


class Sampler:
    """Samples the receivers' interface counters (wire bytes) every `interval` s."""

    def __init__(self, fn: Callable[[], int], interval: float = 0.5) -> None:
        self.fn = fn
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        t0 = time.monotonic()
        try:
            base = self.fn()
        except Exception:
            return
        self.samples.append((0.0, 0))
        while not self._stop.wait(self.interval):
            try:
                self.samples.append((round(time.monotonic() - t0, 3), self.fn() - base))
            except Exception:
                return

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000


def netns_rx_bytes(ns: str, ifnames: list[str]) -> int:
    """Bytes received on `ifnames` inside namespace `ns`, read by moving the calling
    thread (only it) into the namespace and back.  No subprocess: the sampler must not
    add CPU time to what it measures."""
    target = os.open(NETNS_DIR / ns, os.O_RDONLY)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if _libc.setns(target, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns}")
        try:
            with open("/proc/thread-self/net/dev") as fh:
                text = fh.read()
        finally:
            if _libc.setns(home, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(target)
        os.close(home)
    total = 0
    for line in text.splitlines()[2:]:
        name, _, rest = line.partition(":")
        if name.strip() in ifnames:
            total += int(rest.split()[0])
    return total


def _wire_counter(ctx: RunContext) -> Callable[[], int]:
    """Bytes arrived at the receivers (IP packets, headers included); on a loopback-only
    topology, bytes through the source's `lo`."""
    lab = ctx.lab
    if not lab.topology.ports:
        ns = lab.ns(ctx.src)
        return lambda: netns_rx_bytes(ns, ["lo"])
    per_ns: dict[str, list[str]] = {}
    for p in lab.topology.ports:
        if p.host in ctx.dsts:
            per_ns.setdefault(lab.ns(p.host), []).append(lab.ifnames[p.index])
    return lambda: sum(netns_rx_bytes(ns, ifs) for ns, ifs in per_ns.items())


def _wait_port(lab: Lab, host: str, addr: str, port: int, timeout: float = 15.0) -> bool:
    code = (
        "import socket,sys,time\n"
        f"end=time.time()+{timeout}\n"
        "while time.time()<end:\n"
        "    try:\n"
        f"        socket.create_connection(('{addr}',{port}),0.5).close(); sys.exit(0)\n"
        "    except OSError: time.sleep(0.1)\n"
        "sys.exit(1)\n"
    )
    r = lab.run(host, [sys.executable, "-c", code], timeout=timeout + 5,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return r.returncode == 0


def _tail(text: str | bytes | None, n: int = 400) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "").strip()[-n:]


def _reset_dirs(ctx: RunContext) -> None:
    for host in ctx.dsts:
        d = ctx.dst_dir(host)
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        d.chmod(0o777)  # GridFTP's anonymous user (nobody) writes here


def _measure_client(ctx: RunContext, m: Measurement, argv: list[str], env: dict[str, str] |
                    None = None, host: str | None = None) -> subprocess.CompletedProcess[str] | None:
    """Run one client under the cap; fill seconds, cpu, samples, partial."""
    lab = ctx.lab
    cpu0 = cpu_snapshot(lab)
    t0 = time.monotonic()
    result = None
    with Sampler(_wire_counter(ctx)) as sampler:
        try:
            result = lab.run(host or ctx.src, argv, timeout=ctx.cap_s, capture_output=True,
                             text=True, env=env)
        except subprocess.TimeoutExpired:
            m.partial = True
    m.seconds = time.monotonic() - t0
    m.cpu_s = cpu_snapshot(lab) - cpu0
    m.samples = sampler.samples
    return result


def _finish_files(ctx: RunContext, m: Measurement) -> None:
    """Count what arrived; a complete copy is one whose bytes and file count match."""
    got = files = 0
    for host in ctx.dsts:
        b, f = tree_bytes(ctx.dst_dir(host))
        got += b
        files += f
    m.bytes = got
    want = ctx.data.bytes * len(ctx.dsts)
    if m.partial:
        m.ok = False
        m.note = (f"stopped at the {ctx.cap_s:.0f} s cap with {got / 2**20:.0f} of "
                  f"{want / 2**20:.0f} MiB; rate from what arrived")
    elif m.error is None and got == want and files >= ctx.data.files * len(ctx.dsts):
        m.ok = True
    elif m.error is None:
        m.error = f"incomplete: {got} of {want} bytes, {files} files"


def _cleanup(ctx: RunContext) -> None:
    for host in ctx.dsts:
        shutil.rmtree(ctx.dst_dir(host), ignore_errors=True)


# -- iperf3 ---------------------------------------------------------------------------


def run_iperf3(ctx: RunContext, streams: int, cc: str, seconds: float, label: str) -> Measurement:
    m = Measurement("iperf3", f"{label}: -P {streams} -C {cc}, {seconds:.0f} s memory to memory")
    lab, dst = ctx.lab, ctx.dsts[0]
    port = ctx.port_base
    srv = lab.popen(dst, ["iperf3", "-s", "-p", str(port), "-B", ctx.addrs[dst]],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        if not _wait_port(lab, ctx.src, ctx.addrs[dst], port):
            m.error = "iperf3 server did not start"
            return m
        argv = ["iperf3", "-c", ctx.addrs[dst], "-p", str(port), "-t", str(seconds), "-P",
                str(streams), "-C", cc, "-J", "-i", "0.5"]
        if ctx.src_addr:
            argv += ["-B", ctx.src_addr]
        cap, ctx.cap_s = ctx.cap_s, seconds + 20
        try:
            r = _measure_client(ctx, m, argv)
        finally:
            ctx.cap_s = cap
        if r is None or r.returncode != 0:
            m.error = f"iperf3 failed: {_tail(r.stdout if r else '')}"
            return m
        j = json.loads(r.stdout)
        if "sum_received" not in j.get("end", {}):
            m.error = f"iperf3: {j.get('error') or 'no result'}"
            return m
        recv = j["end"]["sum_received"]
        m.bytes = int(recv["bytes"])
        m.seconds = float(recv["seconds"])
        m.ok = True
        # m.samples stay the receiver interface's counters, as for every other tool
        # (iperf3's own intervals count what the sender wrote into its socket).
        m.extra = {"retransmits": j["end"]["sum_sent"].get("retransmits"),
                   "cpu": j["end"].get("cpu_utilization_percent")}
        return m
    finally:
        lab.stop(srv)


# -- GridFTP --------------------------------------------------------------------------


def run_gridftp(ctx: RunContext, parallel: int = 4, verify: bool = False,
                concurrency: int = 1) -> Measurement:
    opts = f"-p {parallel} -fast" + (f" -cc {concurrency} -pp" if ctx.data.is_tree else "")
    opts += " -verify-checksum" if verify else ""
    m = Measurement("gridftp", f"globus-url-copy {opts} (plaintext)")
    lab = ctx.lab
    _reset_dirs(ctx)
    port = ctx.port_base + 1
    servers = []
    try:
        for dst in ctx.dsts:
            log = ctx.workdir / f"gridftp-{dst}.log"
            servers.append(lab.popen(dst, [
                "globus-gridftp-server", "-aa", "-anonymous-user", "nobody", "-p", str(port),
                "-control-interface", ctx.addrs[dst], "-data-interface", ctx.addrs[dst],
                "-d", "error", "-l", str(log)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        for dst in ctx.dsts:
            if not _wait_port(lab, ctx.src, ctx.addrs[dst], port):
                lab.stop(servers[0])
                m.error = "globus-gridftp-server did not start: " + _tail(
                    servers[0].stderr.read() if servers[0].stderr else "")
                return m
        procs_argv = []
        for dst in ctx.dsts:
            argv = ["globus-url-copy", "-p", str(parallel), "-fast"]
            if verify:
                argv.append("-verify-checksum")
            if ctx.data.is_tree:
                argv += ["-cc", str(concurrency), "-pp", "-r",
                         f"file://{ctx.data.path}/",
                         f"ftp://{ctx.addrs[dst]}:{port}{ctx.dst_dir(dst)}/"]
            else:
                argv += [f"file://{ctx.data.path}",
                         f"ftp://{ctx.addrs[dst]}:{port}{ctx.dst_dir(dst)}/{ctx.data.path.name}"]
            procs_argv.append(argv)
        r = _measure_parallel(ctx, m, procs_argv)
        if r:
            m.error = f"globus-url-copy failed: {r}"
        _finish_files(ctx, m)
        return m
    finally:
        for s in servers:
            lab.stop(s)
        _cleanup(ctx)


def _measure_parallel(ctx: RunContext, m: Measurement, argvs: list[list[str]]) -> str | None:
    """One client per receiver, all at once (one receiver: just one client).
    Records each receiver's completion time; returns an error text or None."""
    if len(argvs) == 1:
        r = _measure_client(ctx, m, argvs[0])
        if r is not None and r.returncode != 0:
            return _tail(r.stderr or r.stdout)
        if r is not None:
            m.receivers = [{"host": ctx.dsts[0], "seconds": m.seconds}]
        return None
    lab = ctx.lab
    cpu0 = cpu_snapshot(lab)
    t0 = time.monotonic()
    procs = [lab.popen(ctx.src, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True) for argv in argvs]
    done: dict[int, float] = {}
    errors = []
    with Sampler(_wire_counter(ctx)) as sampler:
        while len(done) < len(procs):
            for i, p in enumerate(procs):
                if i not in done and p.poll() is not None:
                    done[i] = time.monotonic() - t0
                    if p.returncode != 0:
                        errors.append(f"{ctx.dsts[i]}: {_tail(p.stderr.read() if p.stderr else '')}")
            if time.monotonic() - t0 > ctx.cap_s:
                m.partial = True
                break
            time.sleep(0.05)
    m.seconds = time.monotonic() - t0
    for p in procs:
        ctx.lab.stop(p)
        for stream in (p.stdout, p.stderr):
            if stream:
                stream.close()
    m.cpu_s = cpu_snapshot(lab) - cpu0
    m.samples = sampler.samples
    m.receivers = [{"host": h, "seconds": done.get(i)} for i, h in enumerate(ctx.dsts)]
    return "; ".join(errors) or None


# -- rsync ----------------------------------------------------------------------------


def run_rsync(ctx: RunContext) -> Measurement:
    m = Measurement("rsync", "rsync -a --whole-file, daemon mode, 1 TCP stream (plaintext)")
    lab = ctx.lab
    dst = ctx.dsts[0]
    _reset_dirs(ctx)
    port = ctx.port_base + 2
    conf = ctx.workdir / "rsyncd.conf"
    conf.write_text(
        f"pid file = {ctx.workdir}/rsyncd.pid\nuse chroot = no\n"
        f"[lab]\npath = {ctx.dst_dir(dst)}\nread only = no\nuid = root\ngid = root\n"
    )
    srv = lab.popen(dst, ["rsync", "--daemon", "--no-detach", f"--config={conf}",
                          f"--address={ctx.addrs[dst]}", f"--port={port}"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        if not _wait_port(lab, ctx.src, ctx.addrs[dst], port):
            m.error = "rsync daemon did not start"
            return m
        src = f"{ctx.data.path}/" if ctx.data.is_tree else str(ctx.data.path)
        r = _measure_client(ctx, m, ["rsync", "-a", "--whole-file", src,
                                     f"rsync://{ctx.addrs[dst]}:{port}/lab/"])
        if r is not None and r.returncode != 0:
            m.error = f"rsync failed: {_tail(r.stderr)}"
        if m.partial:
            # rsync writes into a hidden temporary file first; count it.
            pass
        _finish_files(ctx, m)
        return m
    finally:
        lab.stop(srv)
        _cleanup(ctx)


# -- uftp (multicast fan-out) ---------------------------------------------------------


def run_uftp(ctx: RunContext, rate_bps: float) -> Measurement:
    kbps = int(rate_bps * 0.95 / 1000)
    m = Measurement("uftp", f"multicast, -R {kbps} kbit/s (95% of a link), -Y none")
    lab = ctx.lab
    _reset_dirs(ctx)
    servers = []
    port = 1044
    try:
        for dst in ctx.dsts:
            ifname = lab.ifnames[next(p.index for p in lab.topology.ports if p.host == dst)]
            servers.append(lab.popen(dst, [
                "uftpd", "-d", "-D", str(ctx.dst_dir(dst)), "-I", ifname, "-p", str(port),
                "-x", "1"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1.0)
        src_if = lab.ifnames[next(p.index for p in lab.topology.ports if p.host == ctx.src)]
        argv = ["uftp", "-R", str(kbps), "-Y", "none", "-I", src_if, "-p", str(port),
                "-H", ",".join(_uftp_ids(ctx)), "-x", "2", str(ctx.data.path)]
        # Per-receiver completion: watch each receiver's file reach its full size in
        # allocated blocks (a preallocated or sparse file is not a delivered one).
        t0 = time.monotonic()
        done: dict[str, float] = {}
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(0.02):
                for h in ctx.dsts:
                    if h not in done:
                        f = ctx.dst_dir(h) / ctx.data.path.name
                        try:
                            st = f.stat()
                        except OSError:
                            continue
                        if min(st.st_size, st.st_blocks * 512) == ctx.data.bytes:
                            done[h] = time.monotonic() - t0
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        r = _measure_client(ctx, m, argv)
        stop.set()
        watcher.join()
        # A receiver that finished between the watcher's last look and uftp's exit
        # finished no later than that exit.
        for h in ctx.dsts:
            f = ctx.dst_dir(h) / ctx.data.path.name
            if h not in done and f.exists() and tree_bytes(f)[0] == ctx.data.bytes:
                done[h] = m.seconds or 0.0
        if r is not None and r.returncode != 0:
            m.error = f"uftp failed ({r.returncode}): {_tail(r.stderr)}"
        # uftp's own view: per receiver, time from the file's start to its COMPLETE.
        said: dict[str, float] = {}
        for line in (r.stderr if r is not None else "").splitlines():
            parts = line.split()
            if len(parts) >= 6 and parts[0] == "Host:" and "time:" in parts:
                said[parts[1].upper()] = float(parts[parts.index("time:") + 1])
        ids = dict(zip(ctx.dsts, _uftp_ids(ctx)))
        m.receivers = [{"host": h, "seconds": done.get(h), "uftp_says_s": said.get(ids[h].upper())}
                       for h in ctx.dsts]
        _finish_files(ctx, m)
        return m
    finally:
        for s in servers:
            lab.stop(s)
        _cleanup(ctx)


def _uftp_ids(ctx: RunContext) -> list[str]:
    """uftpd's default client id is its IPv4 address as 0xAABBCCDD; the closed group is
    exactly the receivers, so uftp waits for every one of them."""
    ids = []
    for h in ctx.dsts:
        a, b, c, d = (int(x) for x in ctx.addrs[h].split("."))
        ids.append(f"0x{a:02X}{b:02X}{c:02X}{d:02X}")
    return ids


# -- dxa ------------------------------------------------------------------------------


def dxa_argv() -> list[str]:
    exe = shutil.which("dxa")
    return [exe] if exe else [sys.executable, "-m", "agent.cli.main"]


def dxa_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["DXA_HOME"] = str(home)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def dxa_features(home: Path) -> dict[str, Any]:
    """Probe which dxa commands and options exist now (by --help and exit codes)."""
    env = dxa_env(home)

    def helptext(*args: str) -> tuple[int, str]:
        try:
            r = subprocess.run([*dxa_argv(), *args, "--help"], capture_output=True, text=True,
                               env=env, cwd=REPO, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return 1, str(exc)
        return r.returncode, r.stdout + r.stderr

    rc_cp, cp_help = helptext("cp")
    rc_top, top_help = helptext()
    return {
        "cp": rc_cp == 0,
        "multipath": rc_cp == 0 and "--path" in cp_help,
        "fanout": rc_top == 0 and "fanout" in top_help,
        "rate": rc_cp == 0 and "--rate" in cp_help,
    }


def dxa_init(home: Path) -> str | None:
    home.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run([*dxa_argv(), "init"], capture_output=True, text=True,
                           env=dxa_env(home), cwd=REPO, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"dxa init: {exc}"
    return None if r.returncode == 0 else f"dxa init failed: {_tail(r.stderr or r.stdout)}"


def run_dxa(ctx: RunContext, streams: int = 4, extra: tuple[str, ...] = (),
            label: str = " (AES-256-GCM, BLAKE3-verified)") -> Measurement:
    """`dxa serve --port-file` in the receiver, `dxa cp --json` from the source.  The
    rate is payload bytes over the client's wall time, as for every peer; what dxa says
    of itself (bytes_total, seconds, gbps) is kept in `extra` next to it."""
    settings = f"dxa cp --streams {streams} {' '.join(extra)}".strip() + label
    m = Measurement("dxa", settings)
    assert ctx.dxa_home is not None
    lab = ctx.lab
    dst = ctx.dsts[0]
    env = dxa_env(ctx.dxa_home)
    _reset_dirs(ctx)
    port = ctx.port_base + 3
    port_file = ctx.workdir / f"dxa-port-{dst}"
    port_file.unlink(missing_ok=True)
    log_path = ctx.workdir / f"dxa-serve-{dst}.log"
    log = open(log_path, "w")  # noqa: SIM115 - the daemon writes to it until stopped
    srv = lab.popen(dst, [*dxa_argv(), "serve", "--listen", f"{ctx.addrs[dst]}:{port}",
                          "--root", str(ctx.dst_dir(dst)), "--port-file", str(port_file)],
                    stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if srv.poll() is not None or time.monotonic() > deadline:
                m.error = "dxa serve did not start: " + _tail(log_path.read_text())
                return m
            time.sleep(0.05)
        port = int(port_file.read_text())
        argv = [*dxa_argv(), "cp"]
        if ctx.data.is_tree:
            argv.append("-r")
        argv += [str(ctx.data.path), f"dxa://{ctx.addrs[dst]}:{port}/{ctx.data.path.name}",
                 "--streams", str(streams), *extra, "--json", "-q"]
        r = _measure_client(ctx, m, argv, env=env)
        if r is not None:
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
            if lines:
                try:
                    m.extra = json.loads(lines[-1])
                except ValueError:
                    pass
            if r.returncode != 0:
                why = "; ".join(str(e) for e in m.extra.get("errors", [])) if m.extra else ""
                m.error = f"dxa cp exit {r.returncode}: {why or _tail(r.stderr or r.stdout)}"
            elif not m.extra:
                m.error = "dxa cp printed no JSON summary"
            elif not m.extra.get("verified", False):
                m.error = "dxa cp reported verified=false"
        _finish_files_dxa(ctx, m)
        return m
    finally:
        lab.stop(srv)
        log.close()
        _cleanup(ctx)


def _finish_files_dxa(ctx: RunContext, m: Measurement) -> None:
    """dxa keeps its resume state under ROOT/.dxa; count only the delivered data."""
    dst = ctx.dsts[0]
    target = ctx.dst_dir(dst) / ctx.data.path.name
    b, f = tree_bytes(target) if target.exists() else (0, 0)
    if m.partial:
        b = max(b, tree_bytes(ctx.dst_dir(dst))[0])
    m.bytes = b
    if m.partial:
        m.note = (f"stopped at the {ctx.cap_s:.0f} s cap with {b / 2**20:.0f} of "
                  f"{ctx.data.bytes / 2**20:.0f} MiB; rate from what arrived")
    elif m.error is None and b == ctx.data.bytes and f >= ctx.data.files:
        m.ok = True
    elif m.error is None:
        m.error = f"incomplete: {b} of {ctx.data.bytes} bytes, {f} files"


def not_available(tool: str, settings: str, why: str) -> Measurement:
    return Measurement(tool, settings, available=False, note=why)
