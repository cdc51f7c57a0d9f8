"""Build a topology out of network namespaces, run tools in it, tear it all down.

Rules this module keeps:
- it only creates, enters and deletes namespaces named ``dxalab-<pid>-<host>`` and
  devices named ``dxl<token>p<n>``; it never touches anything else on the machine;
- teardown runs on success, on exceptions, on SIGINT/SIGTERM and at a deadline, is
  idempotent, never raises, and kills only processes living in its own namespaces;
- without root (or without ``ip netns`` / ``/dev/net/tun``) it raises `LabUnavailable`
  with a message a person can act on.

Backends: ``relay`` (TUN devices driven by the C relay; the only choice on kernels
without netem, and the only one that supports switches) and ``netem`` (veth pairs
with a netem qdisc; chosen by ``auto`` when the kernel has netem and the topology
has no switches).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .relay import Relay
from .topology import LinkSpec, Topology

__all__ = [
    "Lab",
    "LabDeadline",
    "LabError",
    "LabUnavailable",
    "cleanup_stale",
    "guard",
    "lab_available",
    "netem_available",
]

log = logging.getLogger(__name__)

NETNS_PREFIX = "dxalab-"
NETNS_DIR = Path("/var/run/netns")


class LabError(RuntimeError):
    """Building or driving the lab failed."""


class LabUnavailable(LabError):
    """This machine or user cannot run the lab (not root, no netns, no TUN)."""


class LabDeadline(BaseException):
    """The run's deadline passed; raised in the main thread to unwind into teardown."""


def lab_available() -> str | None:
    """None if the lab can run here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "the WAN lab needs root (network namespaces and TUN devices): run it with sudo"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is missing: run bench/setup.sh"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing: load the tun module"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns` does not work here: {probe.stderr.strip()}"
    return None


_netem_cache: bool | None = None


def netem_available() -> bool:
    """True if `tc qdisc add ... netem` works on this kernel (probed once, in a scratch netns)."""
    global _netem_cache
    if _netem_cache is None:
        ns = f"{NETNS_PREFIX}{os.getpid()}-netemprobe"
        try:
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
            r = subprocess.run(
                ["tc", "-n", ns, "qdisc", "add", "dev", "p0", "root", "netem", "delay", "1ms"],
                capture_output=True,
            )
            _netem_cache = r.returncode == 0
        except (LabError, OSError):
            _netem_cache = False
        finally:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    return _netem_cache


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_pids(ns: str) -> list[int]:
    proc = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(x) for x in proc.stdout.split() if x.isdigit()]


def _kill_netns_processes(ns: str) -> None:
    """SIGTERM then SIGKILL every process inside one of our namespaces."""
    pids = _netns_pids(ns)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 2
    while pids and time.monotonic() < deadline:
        time.sleep(0.05)
        pids = [p for p in _netns_pids(ns)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def our_namespaces(pid: int | None = None) -> list[str]:
    """Namespaces made by the lab process `pid` (default: any lab process)."""
    prefix = NETNS_PREFIX if pid is None else f"{NETNS_PREFIX}{pid}-"
    if not NETNS_DIR.is_dir():
        return []
    return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))


def cleanup_stale() -> list[str]:
    """Delete namespaces left by lab processes that no longer exist; returns their names."""
    removed = []
    for ns in our_namespaces():
        try:
            owner = int(ns[len(NETNS_PREFIX) :].split("-", 1)[0])
        except ValueError:
            continue
        if owner != os.getpid() and not _pid_alive(owner):
            _kill_netns_processes(ns)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
            removed.append(ns)
    # Work directories (relay config, logs) of dead lab processes.
    tmp = Path(tempfile.gettempdir())
    for d in tmp.glob(f"{NETNS_PREFIX}*-*"):
        try:
            owner = int(d.name[len(NETNS_PREFIX) :].split("-", 1)[0])
        except ValueError:
            continue
        if d.is_dir() and owner != os.getpid() and not _pid_alive(owner):
            shutil.rmtree(d, ignore_errors=True)
    return removed


@contextlib.contextmanager
def guard(deadline_s: float | None = None) -> Iterator[None]:
    """Turn SIGTERM into SystemExit and a deadline into LabDeadline in the main thread,
    so that `with Lab(...)` unwinds and tears down.  SIGINT already raises
    KeyboardInterrupt."""

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    def on_alarm(signum: int, frame: Any) -> None:
        raise LabDeadline(f"deadline of {deadline_s:.0f} s reached")

    old_term = signal.signal(signal.SIGTERM, on_term)
    old_alarm = signal.signal(signal.SIGALRM, on_alarm)
    if deadline_s:
        signal.setitimer(signal.ITIMER_REAL, deadline_s)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGALRM, old_alarm)


class Lab:
    """A built topology.  Use as a context manager; `teardown()` is always safe."""

    def __init__(
        self,
        topology: Topology,
        *,
        backend: str = "auto",
        workdir: Path | None = None,
        sysctls: dict[str, str] | None = None,
    ) -> None:
        self.topology = topology
        self.requested_backend = backend
        self.backend = "relay"
        self.prefix = f"{NETNS_PREFIX}{os.getpid()}-"
        self.token = os.urandom(3).hex()[:5]
        self.ifnames = [f"dxl{self.token}p{p.index}" for p in topology.ports]
        self.namespaces = {h.name: f"{self.prefix}{h.name}" for h in topology.hosts}
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"{self.prefix}"))
        self.relay: Relay | None = None
        self._procs: list[subprocess.Popen[Any]] = []
        self._timers: list[threading.Timer] = []
        self._created: list[str] = []
        self._extra_sysctls = sysctls or {}
        self.event_log: list[dict[str, Any]] = []
        self.congestion: dict[str, str] = {}
        self.clock0: float | None = None
        self.built = False

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> Lab:
        try:
            self.build()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def build(self) -> None:
        reason = lab_available()
        if reason:
            raise LabUnavailable(reason)
        self.backend = self._choose_backend()
        atexit.register(self.teardown)
        for ns in self.namespaces.values():
            _ip("netns", "add", ns)
            self._created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            self._write_etc(ns)
        self._configure_sysctls()
        if self.backend == "relay":
            self._build_relay_links()
        else:
            self._build_netem_links()
        self.built = True
        log.info("lab %s built: backend=%s namespaces=%s", self.topology.name, self.backend,
                 list(self.namespaces.values()))

    def _write_etc(self, ns: str) -> None:
        """`ip netns exec` bind-mounts /etc/netns/NS/* over /etc: give each host a hosts
        file naming every lab address (tools such as GridFTP resolve their own address)
        and no DNS server (there is none in the lab; lookups must fail fast)."""
        etc = Path("/etc/netns") / ns
        etc.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost"]
        seen = set()
        for p in self.topology.ports:
            names = [f"{p.host}-{p.link}"]
            if p.host not in seen:
                names.append(p.host)
                seen.add(p.host)
            lines.append(f"{p.address} {' '.join(names)}")
        # The machine's own name resolves, in each host, to that host's first address.
        me = next((p.address for p in self.topology.ports
                   if self.namespaces[p.host] == ns), "127.0.0.1")
        lines.append(f"{me} {socket.gethostname()}")
        (etc / "hosts").write_text("\n".join(lines) + "\n")
        (etc / "resolv.conf").write_text("# dxa lab: no DNS inside the lab\noptions timeout:1 attempts:1\n")

    def _choose_backend(self) -> str:
        if self.requested_backend == "relay":
            return "relay"
        wants_netem = self.requested_backend == "netem"
        if self.topology.switches:
            if wants_netem:
                raise LabError("the netem backend does not support switches")
            return "relay"
        if netem_available():
            return "netem"
        if wants_netem:
            raise LabUnavailable("this kernel has no netem qdisc")
        return "relay"

    def _configure_sysctls(self) -> None:
        for host in self.topology.hosts:
            ns = self.namespaces[host.name]
            settings = {
                "net/ipv6/conf/all/disable_ipv6": "1",
                "net/ipv6/conf/default/disable_ipv6": "1",
                # Socket buffers large enough for a few BDPs of the paths we emulate,
                # so that buffer autotuning, not a sysctl, limits a tool.
                "net/ipv4/tcp_rmem": "4096 131072 67108864",
                "net/ipv4/tcp_wmem": "4096 65536 67108864",
                **self._extra_sysctls,
            }
            script = "; ".join(f"echo '{v}' > /proc/sys/{k}" for k, v in settings.items())
            proc = subprocess.run(["ip", "netns", "exec", ns, "sh", "-ec", script],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise LabError(f"sysctls in {host.name}: {proc.stderr.strip()}")
            # A namespace may only default to an algorithm in the machine's
            # tcp_allowed_congestion_control; cubic often is not.  Then the host keeps
            # the machine's default and the report says which one was in force.
            cc = host.congestion or self.topology.congestion
            if cc:
                subprocess.run(
                    ["ip", "netns", "exec", ns, "sh", "-c",
                     f"echo {cc} > /proc/sys/net/ipv4/tcp_congestion_control"],
                    capture_output=True,
                )
            actual = subprocess.run(
                ["ip", "netns", "exec", ns, "cat", "/proc/sys/net/ipv4/tcp_congestion_control"],
                capture_output=True, text=True,
            ).stdout.strip()
            if cc and actual != cc:
                log.warning("%s: cannot default to %s in a namespace; using %s", host.name,
                            cc, actual)
            self.congestion[host.name] = actual

    def _build_relay_links(self) -> None:
        if not self.topology.ports:
            return
        self.relay = Relay(self.topology.relay_config(self.ifnames), self.workdir)
        self.relay.start()
        for port, ifname in zip(self.topology.ports, self.ifnames):
            ns = self.namespaces[port.host]
            _ip("link", "set", "dev", ifname, "netns", ns)
            self._configure_device(ns, ifname, port.address, port.prefix_len)

    def _configure_device(self, ns: str, ifname: str, address: str, prefix_len: int) -> None:
        _ip("-n", ns, "addr", "add", f"{address}/{prefix_len}", "dev", ifname)
        _ip("-n", ns, "link", "set", "dev", ifname, "mtu", str(self.topology.mtu),
            "txqueuelen", "10000", "up")
        # Multicast (uftp) leaves through the host's first link.
        _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", ifname, check=False)

    def _build_netem_links(self) -> None:
        ports = self.topology.ports
        for link in self.topology.links:
            a, b = self.topology.ports_of_link(link.name)
            ia, ib = self.ifnames[a.index], self.ifnames[b.index]
            _ip("link", "add", ia, "type", "veth", "peer", "name", ib)
            for port, ifname in ((a, ia), (b, ib)):
                ns = self.namespaces[port.host]
                _ip("link", "set", "dev", ifname, "netns", ns)
                self._configure_device(ns, ifname, port.address, port.prefix_len)
                self._set_netem(ns, ifname, port.down, "add")
        del ports

    @staticmethod
    def _netem_args(spec: LinkSpec, force_loss: float | None = None) -> list[str]:
        args = ["netem", "limit", str(max(1000, spec.effective_buffer // 1000))]
        if spec.delay_s:
            args += ["delay", f"{spec.delay_s * 1e6:.0f}us"]
            if spec.jitter_s:
                args += [f"{spec.jitter_s * 1e6:.0f}us", "distribution", "uniform"]
        loss = spec.loss if force_loss is None else force_loss
        if loss:
            args += ["loss", f"{loss * 100:.6f}%"]
        if spec.rate_bps:
            args += ["rate", f"{spec.rate_bps:.0f}bit"]
        return args

    def _set_netem(self, ns: str, ifname: str, spec: LinkSpec, verb: str,
                   force_loss: float | None = None) -> None:
        r = subprocess.run(
            ["tc", "-n", ns, "qdisc", verb, "dev", ifname, "root",
             *self._netem_args(spec, force_loss)],
            capture_output=True, text=True,
        )
        if r.returncode != 0:
            raise LabError(f"tc netem on {ifname}: {r.stderr.strip()}")

    def teardown(self) -> None:
        """Stop everything this lab started and delete its namespaces.  Never raises."""
        blocked = {signal.SIGINT, signal.SIGTERM, signal.SIGALRM}
        in_main = threading.current_thread() is threading.main_thread()
        old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked) if in_main else None
        try:
            for timer in self._timers:
                timer.cancel()
            self._timers.clear()
            for proc in self._procs:
                self._stop_proc(proc)
            self._procs.clear()
            for ns in self._created:
                try:
                    _kill_netns_processes(ns)
                except Exception as exc:  # teardown must go on
                    log.warning("killing processes in %s: %s", ns, exc)
            if self.relay is not None:
                try:
                    self.relay.stop()
                except Exception as exc:
                    log.warning("stopping relay: %s", exc)
                self.relay = None
            for ns in self._created:
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
                shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
            self._created.clear()
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            self.built = False
            atexit.unregister(self.teardown)
        finally:
            if old is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)

    @staticmethod
    def _stop_proc(proc: subprocess.Popen[Any]) -> None:
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    # -- running things ----------------------------------------------------------------

    def ns(self, host: str) -> str:
        return self.namespaces[host]

    def address(self, host: str, link: str | None = None) -> str:
        return self.topology.address(host, link)

    def _argv(self, host: str | None, argv: Sequence[str]) -> list[str]:
        if host is None:
            return list(argv)
        return ["ip", "netns", "exec", self.namespaces[host], *argv]

    def popen(self, host: str | None, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a long-running process in `host` (None = the machine itself); it is
        stopped at teardown if still running."""
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(self._argv(host, argv), **kw)
        self._procs.append(proc)
        return proc

    def run(self, host: str | None, argv: Sequence[str], timeout: float | None = None,
            **kw: Any) -> subprocess.CompletedProcess[Any]:
        """Run a command in `host` to completion (killed at `timeout`)."""
        if kw.pop("capture_output", False):
            kw["stdout"] = kw["stderr"] = subprocess.PIPE
        proc = self.popen(host, argv, **kw)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._stop_proc(proc)
            out, err = proc.communicate()
            raise
        finally:
            if proc in self._procs and proc.poll() is not None:
                self._procs.remove(proc)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def stop(self, proc: subprocess.Popen[Any]) -> None:
        self._stop_proc(proc)
        if proc in self._procs:
            self._procs.remove(proc)

    # -- links and counters ------------------------------------------------------------

    def set_link(self, link: str, up: bool) -> None:
        """Take a link down (drops everything, in flight too) or bring it back up."""
        ports = self.topology.ports_of_link(link)
        if self.backend == "relay":
            assert self.relay is not None
            for port in ports:
                self.relay.set_port(port.index, up)
        else:
            for port in ports:
                self._set_netem(self.namespaces[port.host], self.ifnames[port.index],
                                port.down, "change", None if up else 1.0)
        self.event_log.append({"t": self.elapsed(), "link": link, "up": up})

    def elapsed(self) -> float | None:
        return None if self.clock0 is None else time.monotonic() - self.clock0

    def start_clock(self) -> None:
        """Start the topology's timed events (link down/up) from now."""
        self.clock0 = time.monotonic()
        for ev in self.topology.events:
            timer = threading.Timer(ev.at_s, self._fire, args=(ev.link, ev.action == "up"))
            timer.daemon = True
            timer.start()
            self._timers.append(timer)

    def _fire(self, link: str, up: bool) -> None:
        try:
            self.set_link(link, up)
        except Exception as exc:
            log.error("link event on %s failed: %s", link, exc)

    def rx_bytes(self, host: str, link: str | None = None) -> int:
        """Bytes received by `host` on `link` (IP packets, headers included)."""
        port = next(p for p in self.topology.ports
                    if p.host == host and (link is None or p.link == link))
        proc = _ip("-n", self.namespaces[host], "-s", "-j", "link", "show", "dev",
                   self.ifnames[port.index])
        return int(json.loads(proc.stdout)[0]["stats64"]["rx"]["bytes"])

    def relay_stats(self) -> dict[str, Any] | None:
        return self.relay.stats() if self.relay else None
