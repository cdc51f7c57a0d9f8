"""Teardown leaves nothing behind: no dxalab-* namespaces, no processes, no relay, no
work directory, whether the run ends normally, by an exception, at its deadline, by
Ctrl-C or SIGTERM, or is killed outright (then `clean` finds what it left)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bench.lab.__main__ import resolve
from bench.lab.lab import Lab, cleanup_stale, our_namespaces

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("need_lab")]

REPO = Path(__file__).resolve().parents[2]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pids: list[int], seconds: float = 5.0) -> list[int]:
    end = time.monotonic() + seconds
    left = pids
    while left and time.monotonic() < end:
        left = [p for p in left if alive(p)]
        time.sleep(0.05)
    return left


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmd and alive(int(entry)):
                found.append(int(entry))
    return found


def start_detached(lab: Lab, host: str) -> int:
    """A process inside `host` that the lab did not start and is not our child."""
    out = subprocess.run(
        ["ip", "netns", "exec", lab.ns(host), "sh", "-c", "setsid sleep 300 >/dev/null 2>&1 & echo $!"],
        capture_output=True, text=True, check=True,
    ).stdout
    return int(out.strip())


def assert_clean(lab: Lab, pids: list[int], relay_pid: int | None) -> None:
    assert not our_namespaces(os.getpid())
    assert not any((Path("/etc/netns") / ns).exists() for ns in lab.namespaces.values())
    assert not lab.workdir.exists()
    assert wait_gone(pids) == []
    if relay_pid is not None:
        assert wait_gone([relay_pid]) == []
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert f"dxl{lab.token}" not in links


def test_normal_exit_removes_everything() -> None:
    with Lab(resolve("fanout-8")) as lab:
        assert set(our_namespaces(os.getpid())) == set(lab.namespaces.values())
        assert lab.relay is not None
        relay_pid = lab.relay.pid
        pids = [lab.popen("r3", ["sleep", "300"]).pid, start_detached(lab, "src")]
    assert_clean(lab, pids, relay_pid)
    lab.teardown()  # idempotent


def test_exception_inside_the_lab_tears_it_down() -> None:
    with pytest.raises(RuntimeError, match="boom"), Lab(resolve("wan")) as lab:
        relay_pid = lab.relay.pid if lab.relay else None
        pids = [lab.popen("dst", ["sleep", "300"]).pid, start_detached(lab, "dst")]
        raise RuntimeError("boom")
    assert_clean(lab, pids, relay_pid)


def test_a_failed_build_tears_down_what_it_made(monkeypatch) -> None:
    lab = Lab(resolve("wan"))

    def broken(*args: object) -> None:
        raise OSError("device exploded")

    monkeypatch.setattr(lab, "_configure_device", broken)
    with pytest.raises(OSError, match="exploded"), lab:
        pass  # pragma: no cover - never reached
    assert_clean(lab, [], None)


def _start_up(topology: str, *extra: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.lab", "up", topology, *extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("up;"):
            return proc
    raise AssertionError(f"lab did not come up: {proc.stderr.read() if proc.stderr else ''}")


def _leftovers(pid: int) -> tuple[list[str], list[int], list[Path]]:
    prefix = f"dxalab-{pid}-"
    dirs = list(Path(tempfile.gettempdir()).glob(f"{prefix}*"))
    return our_namespaces(pid), processes_mentioning(prefix), dirs


@pytest.mark.parametrize("how", ["deadline", "SIGINT", "SIGTERM"])
def test_the_up_command_tears_down_at_its_deadline_and_on_signals(how: str) -> None:
    proc = _start_up("wan", "--hold", "2" if how == "deadline" else "60")
    assert our_namespaces(proc.pid), "namespaces should exist while it is up"
    if how != "deadline":
        proc.send_signal(getattr(signal, how))
    proc.communicate(timeout=30)
    assert proc.returncode in (0, 130, 128 + signal.SIGTERM)
    assert _leftovers(proc.pid) == ([], [], [])


def test_a_killed_lab_loses_its_relay_and_clean_removes_the_rest() -> None:
    proc = _start_up("wan", "--hold", "60")
    pid = proc.pid
    proc.kill()
    proc.communicate(timeout=10)
    # The relay dies with its parent (PDEATHSIG); namespaces and the work dir stay.
    end = time.monotonic() + 5
    while processes_mentioning(f"dxalab-{pid}-") and time.monotonic() < end:
        time.sleep(0.05)
    namespaces, procs, _ = _leftovers(pid)
    assert procs == []
    assert namespaces
    removed = cleanup_stale()
    assert set(namespaces) <= set(removed)
    assert _leftovers(pid) == ([], [], [])
