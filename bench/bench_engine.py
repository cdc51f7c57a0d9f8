"""Issue-2 benchmark: the transfer engine on loopback, side by side with its peers.

    python -m bench.bench_engine                 # everything, default sizes (~6 min here)
    python -m bench.bench_engine --only big --size 1G --repeat 1
    python -m bench.bench_engine --json out.json --profile prof/

Measured in one run, on the same data and the same loopback:
  big    one file (default 2 GiB): dxa (encrypted + verified, default settings) vs
         GridFTP ``globus-url-copy -p 4 -fast`` (plaintext, unverified) and the same with
         ``-verify-checksum`` (plaintext, the copy checked by MD5), a local ``cp``,
         and ``iperf3 -P 4`` memory to memory (the loopback ceiling);
  small  10,000 files of 16 KiB: files/s of dxa vs ``rsync -a`` (daemon) and
         GridFTP ``-cc 4 -pp``;
  rss    peak RSS of the dxa sender and receiver for a 256 MiB and a 2 GiB file
         (bounded memory means the two are about equal);
  profile (with --profile DIR) py-spy on both dxa processes during a big copy:
         collapsed stacks and the top functions by own CPU samples.
Results are ratios measured side by side; absolute numbers on shared machines are noisy.
Each tool runs ``--repeat`` times (alternating) and the best run counts; all runs are in the JSON.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GiB = 1 << 30


@dataclass
class Run:
    tool: str
    settings: str
    seconds: float = 0.0
    bytes: int = 0
    files: int = 0
    cpu_s: float = 0.0
    peak_rss: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def gbps(self) -> float:
        return self.bytes * 8 / self.seconds / 1e9 if self.seconds else 0.0

    @property
    def files_per_s(self) -> float:
        return self.files / self.seconds if self.seconds else 0.0


# -- helpers -------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
        time.sleep(0.05)
    return False


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def proc_cpu(pid: int) -> float:
    """CPU seconds of a process and all its descendants, alive or reaped (a forking
    server such as globus-gridftp-server does its work in children)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for d in os.listdir("/proc"):
        if d.isdigit() and (f := _stat(int(d))):
            children[int(f[1])].append(int(d))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        f = _stat(p)
        if f:
            total += int(f[11]) + int(f[12]) + (int(f[13]) + int(f[14]) if p == pid else 0)
        todo += children.get(p, [])
    return total / os.sysconf("SC_CLK_TCK")


def proc_hwm(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class ChildCPU:
    """CPU seconds of the children reaped inside the ``with`` block."""

    def __enter__(self):
        import resource

        self._r = resource
        self._u0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        return self

    def __exit__(self, *exc):
        u1 = self._r.getrusage(self._r.RUSAGE_CHILDREN)
        self.cpu = (u1.ru_utime - self._u0.ru_utime) + (u1.ru_stime - self._u0.ru_stime)


LAST_CLIENT_RSS = 0  # peak RSS (VmHWM, sampled every 5 ms) of the last client run_client ran


def run_client(argv: list[str], env: dict | None = None, timeout: float = 900):
    global LAST_CLIENT_RSS
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, env=env, stdout=out, stderr=err, text=True)
        deadline = t0 + timeout
        hwm = 0
        while True:
            # VmHWM of the exec'ed image (rusage's maxrss would include the forked copy of us)
            hwm = max(hwm, proc_hwm(p.pid))
            pid, status, _ = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                p.kill()
            time.sleep(0.005)
        secs = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        LAST_CLIENT_RSS = hwm
        out.seek(0)
        err.seek(0)
        return secs, subprocess.CompletedProcess(argv, p.returncode, out.read(), err.read())


def tree_size(path: Path) -> tuple[int, int]:
    total = n = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
                n += 1
    return total, n


def make_big(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        return
    with open(path, "wb") as f:
        left = size
        block = os.urandom(64 << 20)
        i = 0
        while left:
            # incompressible and not repeating block-for-block (a rotating xor of a random block)
            piece = block[: min(left, len(block))]
            f.write(bytes(piece) if i == 0 else (int.from_bytes(piece[:8], "little") ^ i).to_bytes(8, "little") + piece[8:])
            left -= len(piece)
            i += 1


def make_small(root: Path, count: int, size: int) -> None:
    if root.exists() and sum(1 for _ in root.rglob("*.dat")) == count:
        return
    shutil.rmtree(root, ignore_errors=True)
    for i in range(count):
        d = root / f"d{i // 1000:02d}"
        if i % 1000 == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05d}.dat").write_bytes(os.urandom(size))


# -- servers ---------------------------------------------------------------------------
class Servers:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[subprocess.Popen] = []
        self.home = work / "dxa-home"
        self.env = dict(os.environ, DXA_HOME=str(self.home), PYTHONPATH=str(REPO))
        subprocess.run([*dxa(), "init", "--name", "bench"], env=self.env, check=True, capture_output=True)

    def start(self, argv: list[str], port: int, log: str) -> subprocess.Popen:
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(self.work / log, "ab"), env=self.env,
                             start_new_session=True)
        self.procs.append(p)
        if not wait_port(port):
            raise RuntimeError(f"{argv[0]} did not start; see {self.work / log}")
        return p

    def dxa_daemon(self, root: Path) -> tuple[subprocess.Popen, int]:
        port = free_port()
        p = self.start([*dxa(), "serve", "--listen", f"127.0.0.1:{port}", "--root", str(root)], port, "dxa-serve.log")
        return p, port

    def gridftp(self) -> tuple[subprocess.Popen, int] | None:
        if not shutil.which("globus-gridftp-server") or os.geteuid() != 0:
            return None
        port = free_port()
        p = self.start(["globus-gridftp-server", "-aa", "-anonymous-user", "nobody", "-p", str(port),
                        "-control-interface", "127.0.0.1", "-d", "error", "-l", str(self.work / "gridftp.log")],
                       port, "gridftp.err")
        return p, port

    def rsyncd(self, path: Path) -> tuple[subprocess.Popen, int] | None:
        if not shutil.which("rsync"):
            return None
        port = free_port()
        conf = self.work / "rsyncd.conf"
        conf.write_text(f"pid file = {self.work}/rsyncd.pid\nuse chroot = no\n[b]\npath = {path}\n"
                        f"read only = no\nuid = root\ngid = root\n")
        p = self.start(["rsync", "--daemon", "--no-detach", f"--config={conf}", "--address=127.0.0.1",
                        f"--port={port}"], port, "rsyncd.log")
        return p, port

    def stop(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)

    def close(self) -> None:
        for p in self.procs:
            self.stop(p)


def dxa() -> list[str]:
    return [sys.executable, "-m", "agent.cli.main"]


def fresh(path: Path, warm: int = 0) -> Path:
    """An empty destination directory.  With ``warm``, first write and delete that many
    bytes there: on this VM, page-cache pages the guest has not touched recently cost
    up to 2 CPU s/GB to fault in (measured), so every tool starts from equally hot pages
    instead of the first tool of a round paying for the rest."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    if warm:
        block = bytes(8 << 20)
        with open(path / ".warm", "wb") as f:
            for _ in range(0, warm, len(block)):
                f.write(block)
        (path / ".warm").unlink()
    return path


WARM = 0  # set from --size in main()


# -- the measurements ------------------------------------------------------------------
def bench_dxa(srv: Servers, src: Path, dst: Path, label: str, extra: list[str] = ()) -> Run:
    run = Run("dxa", label)
    fresh(dst, WARM)
    daemon, port = srv.dxa_daemon(dst)
    try:
        cpu0 = proc_cpu(daemon.pid)
        with ChildCPU() as c:
            secs, r = run_client([*dxa(), "cp", "-r", "--json", "-q", *extra, str(src), f"dxa://127.0.0.1:{port}/x"],
                                 env=srv.env)
        run.cpu_s = c.cpu + proc_cpu(daemon.pid) - cpu0
        run.peak_rss = {"sender": LAST_CLIENT_RSS, "receiver": proc_hwm(daemon.pid)}
        if r.returncode != 0:
            run.error = (r.stderr or r.stdout).strip()[-300:]
            return run
        j = json.loads(r.stdout)
        run.seconds, run.bytes, run.files = secs, j["bytes_sent"], j["files_ok"]
        run.settings += f" ({j['streams']} streams, encrypted={j['encrypted']}, verified={j['verified']})"
        return run
    finally:
        srv.stop(daemon)


def bench_gridftp(srv: Servers, src: Path, dst: Path, label: str, tree: bool, verify: bool = False) -> Run:
    opts = ["-p", "4", "-fast"] + (["-cc", "4", "-pp", "-r"] if tree else []) + (["-verify-checksum"] if verify else [])
    run = Run("gridftp-verify" if verify else "gridftp",
              f"globus-url-copy {' '.join(opts)} (plaintext, {'verified: MD5 of the whole file' if verify else 'unverified'})")
    g = srv.gridftp()
    if g is None:
        run.error = "n/a: globus-gridftp-server not installed (bash bench/setup.sh) or not root"
        return run
    p, port = g
    fresh(dst, WARM)
    os.chmod(dst, 0o777)
    try:
        s = f"file://{src}/" if tree else f"file://{src}"
        d = f"ftp://127.0.0.1:{port}{dst}/" + ("" if tree else src.name)
        return measure_peer(run, p.pid, ["globus-url-copy", *opts, s, d], dst)
    finally:
        srv.stop(p)


def bench_rsync(srv: Servers, src: Path, dst: Path) -> Run:
    run = Run("rsync", "rsync -a --whole-file, daemon mode, 1 stream (plaintext)")
    fresh(dst, WARM)
    g = srv.rsyncd(dst)
    if g is None:
        run.error = "n/a: rsync not installed"
        return run
    p, port = g
    try:
        return measure_peer(run, p.pid, ["rsync", "-a", "--whole-file", f"{src}/", f"rsync://127.0.0.1:{port}/b/"], dst)
    finally:
        srv.stop(p)


def measure_peer(run: Run, server_pid: int, argv: list[str], dst: Path) -> Run:
    """Run a peer's client against its server; time, CPU of both, what arrived in ``dst``."""
    cpu0 = proc_cpu(server_pid)
    with ChildCPU() as c:
        secs, r = run_client(argv)
    run.cpu_s = c.cpu + proc_cpu(server_pid) - cpu0
    if r.returncode != 0:
        run.error = (r.stderr or r.stdout).strip()[-300:]
        return run
    run.seconds = secs
    run.bytes, run.files = tree_size(dst)
    return run


def bench_cp(src: Path, dst: Path) -> Run:
    run = Run("cp", "cp (local copy, same disk)")
    fresh(dst, WARM)
    with ChildCPU() as c:
        secs, r = run_client(["cp", "-r", str(src), str(dst / "copy")])
    run.cpu_s = c.cpu
    if r.returncode != 0:
        run.error = r.stderr.strip()
        return run
    run.seconds = secs
    run.bytes, run.files = tree_size(dst)
    return run


def bench_iperf3(seconds: int = 5) -> Run:
    run = Run("iperf3", f"iperf3 -P 4 -t {seconds}, memory to memory (ceiling)")
    if not shutil.which("iperf3"):
        run.error = "n/a: iperf3 not installed (bash bench/setup.sh)"
        return run
    port = free_port()
    s = subprocess.Popen(["iperf3", "-s", "-p", str(port), "-B", "127.0.0.1"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        time.sleep(0.2)
        _, r = run_client(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-P", "4", "-t", str(seconds), "-J"])
        j = json.loads(r.stdout)
        if "error" in j:
            raise ValueError(j["error"])
        e = j["end"]["sum_received"]
        run.bytes, run.seconds = int(e["bytes"]), float(e["seconds"])
        return run
    except (ValueError, KeyError) as exc:
        run.error = f"iperf3 failed: {exc}"
        return run
    finally:
        s.kill()
        s.wait()


def best(runs: list[Run], key) -> Run:
    ok = [r for r in runs if not r.error]
    return max(ok, key=key) if ok else runs[-1]


def profile(srv: Servers, src: Path, dst: Path, out: Path, seconds: int = 20) -> dict:
    """py-spy both dxa processes during one big copy; return the top own-time functions."""
    if not shutil.which("py-spy"):
        return {"error": "py-spy not installed"}
    out.mkdir(parents=True, exist_ok=True)
    fresh(dst)
    daemon, port = srv.dxa_daemon(dst)
    try:
        client = subprocess.Popen([*dxa(), "cp", "-q", str(src), f"dxa://127.0.0.1:{port}/x"], env=srv.env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        spies = []
        for name, pid in (("sender", client.pid), ("receiver", daemon.pid)):
            spies.append((name, subprocess.Popen(
                ["py-spy", "record", "--native", "--threads", "-r", "200", "-d", str(seconds), "-p",
                 str(pid), "-f", "raw", "-o", str(out / f"{name}.folded")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
        client.wait(900)
        for _, s in spies:
            s.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                s.wait(30)
    finally:
        srv.stop(daemon)
    result = {}
    for name, _ in spies:
        f = out / f"{name}.folded"
        result[name] = top_functions(f) if f.exists() else {"error": "no profile written"}
    return result


def top_functions(folded: Path, n: int = 12) -> list[tuple[str, float]]:
    own: collections.Counter = collections.Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = [f.split(" (")[0] for f in stack.split(";")]
        py = [f for f, full in zip(frames, stack.split(";")) if ".py:" in full]
        leaf = frames[-1]
        key = f"{py[-1]}→{leaf}" if py and py[-1] != leaf else leaf
        own[key[:80]] += int(count)
        total += int(count)
    return [(f, round(100 * c / total, 1)) for f, c in own.most_common(n)] if total else []


# -- report ----------------------------------------------------------------------------
def ceiling(src: Path, dst: Path, gridftp_cpu_per_gb: float, chunk: int = 4 << 20) -> dict:
    """How close to GridFTP dxa can get on this machine at best, from measured parts.

    When both tools are CPU-bound on the same cores (loopback, sender and receiver on one
    machine), their throughput ratio is at most the inverse ratio of their CPU per byte.
    dxa must do what GridFTP does (read, send, receive, write) plus what GridFTP does not:
    BLAKE3 on both sides and AES-256-GCM both ways (F, measured single-threaded here on
    the same data, from memory).  It writes with ``O_DIRECT`` where GridFTP copies into
    the page cache, which saves about W_pc − W_direct.  W_pc is measured as an overwrite
    of pages already in the cache: a write into fresh pages costs far more on this VM
    (up to 2 CPU s/GB, see ``fresh``) and is too noisy to measure, so this is the cheapest
    case and the saving may be larger in a given GridFTP run.  dxa then needs about
    G − (W_pc − W_direct) + F CPU s/GB against GridFTP's G, and ``ceiling`` = G / that:
    an estimate that assumes dxa's own overhead (Python, the event loop, the journal) is
    zero."""
    import mmap

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from agent.wire import DATA_HEADER_LEN, TAG_LEN, chunk_digest

    size = src.stat().st_size
    aead, nonce, aad = AESGCM(os.urandom(32)), bytes(12), bytes(DATA_HEADER_LEN)
    plain = mmap.mmap(-1, chunk)  # page-aligned: the O_DIRECT write takes it as is
    sealed = bytearray(chunk + TAG_LEN)
    cost = {"blake3": 0.0, "aes_encrypt": 0.0, "aes_decrypt": 0.0, "write_page_cache": 0.0, "write_direct": 0.0}

    def timed(key: str, fn) -> None:
        t = time.process_time()
        fn()
        cost[key] += time.process_time() - t

    fresh(dst, size)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    with open(src, "rb", buffering=0) as f:
        pc = os.open(dst / "pc", flags, 0o644)
        direct = os.open(dst / "direct", flags | getattr(os, "O_DIRECT", 0), 0o644)
        try:
            for off in range(0, size - size % chunk, chunk):
                f.readinto(plain)
                timed("blake3", lambda: chunk_digest(plain))
                timed("aes_encrypt", lambda: aead.encrypt_into(nonce, plain, aad, sealed))
                timed("aes_decrypt", lambda: aead.decrypt_into(nonce, sealed, aad, plain))
                os.pwrite(pc, plain, off)  # into fresh pages: not timed (see above)
                timed("write_page_cache", lambda: os.pwrite(pc, plain, off))  # the same pages again
                timed("write_direct", lambda: os.pwrite(direct, plain, off))
        finally:
            os.close(pc)
            os.close(direct)
    gb = (size - size % chunk) / 1e9
    per_gb = {k: v / gb for k, v in cost.items()}
    extra = 2 * per_gb["blake3"] + per_gb["aes_encrypt"] + per_gb["aes_decrypt"]
    saved = per_gb["write_page_cache"] - per_gb["write_direct"]
    need = gridftp_cpu_per_gb - saved + extra
    shutil.rmtree(dst, ignore_errors=True)
    return {"cpu_s_per_gb": {k: round(v, 3) for k, v in per_gb.items()}, "gridftp": round(gridftp_cpu_per_gb, 3),
            "crypto_floor": round(extra, 3), "direct_write_saves": round(saved, 3),
            "dxa_floor": round(need, 3), "ceiling": round(gridftp_cpu_per_gb / need, 3)}


def fmt_rate(r: Run) -> str:
    return r.error if r.error else f"{r.gbps:.2f} Gbit/s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_engine", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("big", "small", "rss", "all"), default="all")
    ap.add_argument("--size", default="2G", help="big file size (default 2G)")
    ap.add_argument("--files", type=int, default=10_000, help="small files (default 10000)")
    ap.add_argument("--file-size", type=int, default=16 << 10, help="bytes per small file (default 16384)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per tool, best counts (default 2)")
    ap.add_argument("--workdir", type=Path, help="where data goes (default: a temp dir, removed after)")
    ap.add_argument("--json", type=Path, help="write every run here")
    ap.add_argument("--profile", type=Path, metavar="DIR", help="also profile dxa with py-spy into DIR")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from agent.config import parse_size

    global WARM
    size = parse_size(a.size)
    # dxa's start-up counts in every timed run: byte-compile it first, as `pip install`
    # does for a regular install (an editable install under PYTHONDONTWRITEBYTECODE=1
    # would otherwise recompile ~40 modules, ~50-70 ms, on every run)
    subprocess.run([sys.executable, "-m", "compileall", "-q", "agent", "controller_stub"], cwd=REPO, check=False,
                   stdout=subprocess.DEVNULL, env={k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"})
    work = a.workdir or Path(tempfile.mkdtemp(prefix="dxa-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o755)  # the GridFTP server runs as nobody
    srv = Servers(work)
    report: dict = {"size": size, "files": a.files, "file_size": a.file_size, "runs": {}}
    lines: list[str] = []
    try:
        if a.only in ("big", "all"):
            src = work / "src-big"
            src.mkdir(exist_ok=True)
            make_big(src / "big.bin", size)
            runs: dict[str, list[Run]] = collections.defaultdict(list)
            WARM = size
            tools = {
                "dxa": lambda: bench_dxa(srv, src / "big.bin", work / "dst", "dxa cp, defaults"),
                "gridftp": lambda: bench_gridftp(srv, src / "big.bin", work / "dst", "", tree=False),
                # the same peer doing comparable work: it checks the copy (an MD5 of the file at both ends)
                "gridftp-verify": lambda: bench_gridftp(srv, src / "big.bin", work / "dst", "", tree=False,
                                                        verify=True),
                "cp": lambda: bench_cp(src / "big.bin", work / "dst"),
            }
            for i in range(a.repeat):
                print(f"[big] round {i + 1}/{a.repeat}", file=sys.stderr)
                order = list(tools)[i % len(tools):] + list(tools)[: i % len(tools)]  # rotate who goes first
                for name in order:
                    runs[name].append(tools[name]())
            runs["iperf3"].append(bench_iperf3())
            shutil.rmtree(work / "dst", ignore_errors=True)
            b = {k: best(v, lambda r: r.gbps) for k, v in runs.items()}
            report["runs"]["big"] = {k: [asdict(r) | {"gbps": r.gbps} for r in v] for k, v in runs.items()}
            lines += [f"### One {size / GiB:.2f} GiB file on loopback (best of {a.repeat})", "",
                      "| tool | settings | throughput | CPU s/GB | dxa ÷ tool |", "|---|---|---|---|---|"]
            for k in ("dxa", "gridftp", "gridftp-verify", "cp", "iperf3"):
                r = b[k]
                ratio = f"{b['dxa'].gbps / r.gbps:.2f}×" if r.gbps and not b["dxa"].error else "n/a"
                cpu = f"{r.cpu_s / (r.bytes / 1e9):.2f}" if r.bytes and r.cpu_s else "-"
                lines.append(f"| {k} | {r.settings} | {fmt_rate(r)} | {cpu} | {ratio} |")
            lines.append("")
            g = b["gridftp"]
            if g.bytes and g.cpu_s and not b["dxa"].error:
                c = ceiling(src / "big.bin", work / "dst", g.cpu_s / (g.bytes / 1e9))
                d = b["dxa"]
                c["dxa"] = round(d.cpu_s / (d.bytes / 1e9), 3)
                report["ceiling"] = c
                lines += ["Ceiling on this machine (CPU s/GB; the parts measured single-threaded just now, "
                          "see `ceiling()` for the method and its limits):", "",
                          f"- GridFTP's best round G = {c['gridftp']:.2f}; what dxa adds, F = 2 × BLAKE3 "
                          f"({c['cpu_s_per_gb']['blake3']:.3f}) + AES-GCM encrypt ({c['cpu_s_per_gb']['aes_encrypt']:.3f}) "
                          f"+ decrypt ({c['cpu_s_per_gb']['aes_decrypt']:.3f}) = {c['crypto_floor']:.2f}; "
                          f"what direct writes save, W = W_pc − W_direct = {c['cpu_s_per_gb']['write_page_cache']:.3f} − "
                          f"{c['cpu_s_per_gb']['write_direct']:.3f} = {c['direct_write_saves']:.2f}",
                          f"- dxa needs about G − W + F = {c['dxa_floor']:.2f} (measured: {c['dxa']:.2f}), so "
                          f"**dxa ÷ GridFTP ≈ {c['ceiling']:.2f}× at best** while both are CPU-bound on these cores", ""]
        if a.only in ("small", "all"):
            src = work / "src-small"
            make_small(src, a.files, a.file_size)
            runs = collections.defaultdict(list)
            WARM = a.files * a.file_size
            tools = {
                "dxa": lambda: bench_dxa(srv, src, work / "dst", "dxa cp -r, defaults"),
                "rsync": lambda: bench_rsync(srv, src, work / "dst"),
                "gridftp": lambda: bench_gridftp(srv, src, work / "dst", "", tree=True),
            }
            for i in range(a.repeat):
                print(f"[small] round {i + 1}/{a.repeat}", file=sys.stderr)
                order = list(tools)[i % len(tools):] + list(tools)[: i % len(tools)]
                for name in order:
                    runs[name].append(tools[name]())
            shutil.rmtree(work / "dst", ignore_errors=True)
            b = {k: best(v, lambda r: r.files_per_s) for k, v in runs.items()}
            report["runs"]["small"] = {k: [asdict(r) | {"files_per_s": r.files_per_s} for r in v]
                                       for k, v in runs.items()}
            lines += [f"### {a.files} files of {a.file_size // 1024} KiB on loopback (best of {a.repeat})", "",
                      "| tool | settings | files/s | seconds | dxa ÷ tool |", "|---|---|---|---|---|"]
            for k in ("dxa", "rsync", "gridftp"):
                r = b[k]
                val = r.error if r.error else f"{r.files_per_s:.0f}"
                ratio = f"{b['dxa'].files_per_s / r.files_per_s:.2f}×" if r.files_per_s and not b["dxa"].error else "n/a"
                lines.append(f"| {k} | {r.settings} | {val} | {r.seconds:.2f} | {ratio} |")
            lines.append("")
        if a.only in ("rss", "all"):
            rows = []
            for sz in (256 << 20, size):
                src = work / f"src-rss-{sz}"
                src.mkdir(exist_ok=True)
                if sz == size and (work / "src-big" / "big.bin").exists():
                    f = work / "src-big" / "big.bin"
                else:
                    f = src / "f.bin"
                    make_big(f, sz)
                r = bench_dxa(srv, f, work / "dst", "dxa cp")
                rows.append((sz, r))
                shutil.rmtree(work / "dst", ignore_errors=True)
            report["runs"]["rss"] = [{"size": sz, **asdict(r)} for sz, r in rows]
            lines += ["### Peak memory (RSS) against file size", "", "| file | sender peak RSS | receiver peak RSS |",
                      "|---|---|---|"]
            for sz, r in rows:
                lines.append(f"| {sz / GiB:.2f} GiB | {r.peak_rss.get('sender', 0) / 2**20:.0f} MiB | "
                             f"{r.peak_rss.get('receiver', 0) / 2**20:.0f} MiB |" if not r.error else
                             f"| {sz / GiB:.2f} GiB | {r.error} | |")
            lines.append("")
        if a.profile:
            src = work / "src-big" / "big.bin"
            if not src.exists():
                (work / "src-big").mkdir(exist_ok=True)
                make_big(src, size)
            prof = profile(srv, src, work / "dst", a.profile)
            report["profile"] = prof
            lines += ["### Where the CPU goes (py-spy --native, running threads: deepest Python frame → native leaf)", ""]
            for side, top in prof.items():
                lines.append(f"**{side}**: " + ", ".join(f"{fn} {pct}%" for fn, pct in top) if isinstance(top, list)
                             else f"**{side}**: {top}")
                lines.append("")
    finally:
        srv.close()
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print("\n".join(lines))
    if a.json:
        a.json.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
