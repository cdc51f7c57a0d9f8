"""Self-check: measure what a built topology delivers against what was asked.

For each checked path src -> dst it measures, with the UDP probes of probe.py:
- RTT: median of 30 small echo probes, unloaded;
- rate: a 2 s UDP blast at 125% of the asked rate; the receiver's arrival rate of
  IP bytes (the rate cap counts IP bytes): the median over 100 ms windows;
- loss: a 3 s stream of small packets well below the rate cap.

Pass rule: within 5% of what was asked.  For loss, a sample of n packets cannot pin
a probability p to 5% unless n is huge (the standard error is sqrt(p(1-p)/n)), so the
tolerance is the larger of 5% and three standard errors; the report shows which.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .lab import Lab

__all__ = ["CheckResult", "check_path", "self_check"]

PROBE = str(Path(__file__).with_name("probe.py"))
TOLERANCE = 0.05


@dataclass
class CheckResult:
    path: str
    metric: str
    asked: float
    measured: float | None
    tolerance: float
    ok: bool
    detail: str = ""


def _probe(lab: Lab, host: str, *args: str) -> list[str]:
    return [sys.executable, PROBE, *args]


def _run_pair(lab: Lab, server: tuple[str, list[str]], client: tuple[str, list[str]],
              timeout: float) -> tuple[dict[str, Any], dict[str, Any]]:
    srv = lab.popen(server[0], server[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    text=True)
    try:
        time.sleep(0.3)
        cli = lab.run(client[0], client[1], timeout=timeout, capture_output=True, text=True)
        if cli.returncode != 0:
            raise RuntimeError(f"probe client failed: {cli.stderr.strip()}")
        out, err = srv.communicate(timeout=timeout)
    finally:
        lab.stop(srv)
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"probe server printed nothing: {err.strip()}")
    return json.loads(lines[-1]), json.loads(cli.stdout.splitlines()[-1])


def check_path(lab: Lab, src: str, dst: str, link: str | None = None,
               port: int = 45000, checks: tuple[str, ...] = ("rtt", "rate", "loss")
               ) -> list[CheckResult]:
    rate, rtt, loss = lab.topology.path_spec(src, dst, link)
    dst_addr = lab.address(dst, link)
    name = f"{src}->{dst}" + (f" via {link}" if link else "")
    results: list[CheckResult] = []

    if "rtt" in checks:
        _, r = _run_pair(
            lab,
            (dst, _probe(lab, dst, "echo", "--bind", f"{dst_addr}:{port}", "--seconds", "4")),
            (src, _probe(lab, src, "rtt", "--to", f"{dst_addr}:{port}", "--count", "30",
                         "--interval", "0.02")),
            timeout=20,
        )
        measured = r["rtt_median_s"]
        # Serialising two ~88-byte probes at the cap adds a little to the asked RTT.
        expected = rtt + (2 * 88 * 8 / rate if rate else 0)
        ok = measured is not None and abs(measured - expected) <= max(TOLERANCE * expected, 0.0005)
        low = f"{r['rtt_min_s'] * 1e3:.2f} ms" if r["rtt_min_s"] else "none"
        results.append(CheckResult(name, "rtt_s", expected, measured, TOLERANCE, ok,
                                   f"{r['received']}/{r['sent']} echoes, min {low}"))

    if "rate" in checks and rate:
        seconds = 2.0
        s, b = _run_pair(
            lab,
            (dst, _probe(lab, dst, "sink", "--bind", f"{dst_addr}:{port + 1}", "--seconds",
                         str(seconds + 5), "--idle", "0.5")),
            (src, _probe(lab, src, "blast", "--to", f"{dst_addr}:{port + 1}", "--rate",
                         str(rate * 1.25), "--size", str(lab.topology.mtu - 28),
                         "--seconds", str(seconds))),
            timeout=seconds + 15,
        )
        # The median of 100 ms windows: a probe descheduled for a few ms on a busy
        # machine starves a window or two, which must not pass for a slow link.
        measured = s.get("rate_median_bps") or s["rate_bps"]
        expected = rate * (1 - loss)
        ok = measured is not None and abs(measured - expected) <= TOLERANCE * expected
        overall = s["rate_bps"] / 1e6 if s["rate_bps"] else 0.0
        results.append(CheckResult(
            name, "rate_bps", expected, measured, TOLERANCE, ok,
            f"sent {b['sent']} received {s['received']}; median of {s.get('windows')} "
            f"windows, {overall:.1f} Mbit/s over the whole run"))

    if "loss" in checks:
        seconds = 3.0
        pps = 40000 if not rate else min(40000, rate * 0.5 / (88 * 8))
        s, b = _run_pair(
            lab,
            (dst, _probe(lab, dst, "sink", "--bind", f"{dst_addr}:{port + 2}", "--seconds",
                         str(seconds + 5), "--idle", "0.5")),
            (src, _probe(lab, src, "blast", "--to", f"{dst_addr}:{port + 2}", "--rate",
                         str(pps * 88 * 8), "--size", "60", "--seconds", str(seconds))),
            timeout=seconds + 15,
        )
        sent = b["sent"] - b["send_errors"]
        measured = 1 - s["received"] / sent if sent else None
        stderr = math.sqrt(loss * (1 - loss) / sent) if sent else 0.0
        tol = max(TOLERANCE * loss, 3 * stderr)
        ok = measured is not None and abs(measured - loss) <= tol
        results.append(CheckResult(
            name, "loss", loss, measured, tol / loss if loss else tol, ok,
            f"{s['received']}/{sent} packets arrived; tolerance "
            + ("5%" if tol == TOLERANCE * loss else f"3 standard errors = {tol:.2e}"),
        ))
    return results


def self_check(lab: Lab, paths: list[tuple[str, str, str | None]] | None = None,
               checks: tuple[str, ...] = ("rtt", "rate", "loss")) -> list[CheckResult]:
    """Check the given (src, dst, link) paths; default: every host-host link."""
    if paths is None:
        paths = []
        for link in lab.topology.links:
            ports = lab.topology.ports_of_link(link.name)
            if len(ports) == 2:
                paths.append((ports[0].host, ports[1].host, link.name))
    results: list[CheckResult] = []
    for i, (src, dst, link) in enumerate(paths):
        results += check_path(lab, src, dst, link, port=45000 + 10 * i, checks=checks)
    return results


def as_dicts(results: list[CheckResult]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]
