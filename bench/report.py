"""Turn scenario results into what people read: markdown tables, JSON, PNG plots.

Definitions used in every table (also printed under it):
- throughput: payload bytes that arrived / the client's wall time (iperf3: its own
  receiver-side count, memory to memory);
- of link: throughput / the capacity the topology asked for (the sum of both paths for
  two-paths, one link for fan-out); blank on loopback;
- vs best peer: throughput / the best file-moving peer of the scenario (GridFTP,
  rsync, uftp; iperf3 moves no files and is the ceiling, not a peer);
- CPU s/GB: CPU seconds of every process in the lab's namespaces plus the clients,
  per 10^9 payload bytes (kernel softirq time on behalf of a tool is not counted).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .lab.peers import Measurement
from .scenarios import ScenarioResult

__all__ = ["markdown", "plot", "to_json"]

PEERS = ("gridftp", "rsync", "uftp")


def _esc(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _rate(bps: float | None) -> str:
    if bps is None:
        return "—"
    return f"{bps / 1e9:.2f} Gbit/s" if bps >= 1e9 else f"{bps / 1e6:.1f} Mbit/s"


def _best_peer(measurements: list[Measurement]) -> Measurement | None:
    peers = [m for m in measurements if m.tool in PEERS and m.throughput_bps]
    return max(peers, key=lambda m: m.throughput_bps or 0.0, default=None)


def _cell_throughput(m: Measurement) -> str:
    if not m.available:
        return "n/a"
    if m.error and not (m.partial and m.throughput_bps):
        return "error: " + _esc(m.error)[:160]
    text = _rate(m.throughput_bps)
    return text + (" (partial)" if m.partial else "")


def _cpu_per_gb(m: Measurement) -> str:
    if m.cpu_s is None or not m.bytes or not m.throughput_bps:
        return "—"
    return f"{m.cpu_s / (m.bytes / 1e9):.1f}"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"


def _data_line(r: ScenarioResult) -> str:
    d = r.data
    if d["files"] > 1:
        return f"{d['files']:,} files of {_size(d['file_bytes'])} ({_size(d['bytes'])})"
    return f"one file of {_size(d['bytes'])}"


def _link_line(r: ScenarioResult) -> str:
    link = r.link
    if link["capacity_bps"] is None:
        return "loopback (no emulated link)"
    if link.get("per_link"):
        return (f"star: every link {_rate(link['capacity_bps'])}, receiver RTT "
                f"{link['rtt_s'] * 1e3:.0f} ms")
    parts = [f"{p['link']}: {_rate(p['rate_bps'])}, RTT {p['rtt_s'] * 1e3:.0f} ms"
             + (f", loss {p['loss'] * 100:g}%" if p["loss"] else "") for p in link["paths"]]
    return "; ".join(parts)


def _check_line(r: ScenarioResult) -> str:
    if r.check_ok is None:
        return "self-check: not run"
    bits = []
    for c in r.checks:
        if c.measured is None:
            bits.append(f"{c.metric} none")
        elif c.metric == "rtt_s":
            bits.append(f"RTT {c.measured * 1e3:.1f} ms")
        elif c.metric == "rate_bps":
            bits.append(f"rate {c.measured / 1e6:.1f} Mbit/s")
        else:
            bits.append(f"loss {c.measured * 100:.3f}%")
    status = "ok" if r.check_ok else "**MISSED (numbers below are suspect)**"
    return f"self-check {status}: " + ", ".join(bits)


def _scenario_md(r: ScenarioResult) -> list[str]:
    out = [f"### {r.name}: {r.title}", ""]
    out.append(f"Data: {_data_line(r)}. Link: {_link_line(r)}. "
               f"TCP congestion control: {', '.join(sorted(set(r.congestion.values()))) or '—'}. "
               f"{_check_line(r)}. Took {r.seconds:.0f} s.")
    out.append("")
    if r.error:
        out += [f"**Scenario failed:** {_esc(r.error)}", ""]
    for note in r.notes:
        out += [note, ""]
    if r.fanout:
        out += _fanout_md(r)
        return out
    cap = r.link["capacity_bps"]
    best = _best_peer(r.measurements)
    out.append("| tool | settings | throughput | of link | vs best peer | CPU s/GB | note |")
    out.append("|---|---|---:|---:|---:|---:|---|")
    for m in r.measurements:
        tp = m.throughput_bps if m.available else None
        frac = f"{tp / cap:.0%}" if tp and cap else "—"
        ratio = f"{tp / best.throughput_bps:.2f}×" if tp and best and best.throughput_bps else "—"
        note = m.note
        if m.tool == "iperf3" and m.extra.get("retransmits") is not None:
            note = (note + " " if note else "") + f"{m.extra['retransmits']} retransmits"
        if m.tool == "dxa" and m.extra.get("gbps") is not None:
            note = (note + " " if note else "") + f"dxa says {m.extra['gbps'] * 1e3:.0f} Mbit/s"
        out.append(f"| {m.tool} | {_esc(m.settings)} | {_cell_throughput(m)} | {frac} | {ratio} "
                   f"| {_cpu_per_gb(m)} | {_esc(note)} |")
    out.append("")
    if best:
        out.append(f"Best peer: {best.tool} ({best.settings}).")
        out.append("")
    return out


def _fanout_md(r: ScenarioResult) -> list[str]:
    out = [("| tool | settings | last receiver done | ideal (size / link rate) | last / ideal "
            "| aggregate throughput | CPU s/GB | note |"),
           "|---|---|---:|---:|---:|---:|---:|---|"]
    for m in r.measurements:
        last = m.extra.get("last_receiver_s")
        ideal = m.extra.get("ideal_s")
        if not m.available:
            cells = ["n/a", "—", "—", "n/a", "—"]
        else:
            cells = [f"{last:.1f} s" if last else ("error" if m.error else "—"),
                     f"{ideal:.1f} s" if ideal else "—",
                     f"{last / ideal:.2f}" if last and ideal else "—",
                     _cell_throughput(m), _cpu_per_gb(m)]
        out.append(f"| {m.tool} | {_esc(m.settings)} | " + " | ".join(cells)
                   + f" | {_esc(m.note)} |")
    out += ["", "Last receiver's completion against the number of receivers N:", ""]
    ns = sorted({n for per in r.fanout.values() for n in per})
    tools = list(r.fanout)
    out.append("| N | " + " | ".join(tools) + " | ideal |")
    out.append("|---:|" + "---:|" * (len(tools) + 1))
    for n in ns:
        cells = []
        ideal = None
        for t in tools:
            e = r.fanout[t].get(n, {})
            ideal = e.get("ideal_s", ideal)
            cells.append(f"{e['last_s']:.1f} s" if e.get("last_s") else
                         ("error: " + _esc(str(e.get("error")))[:80] if e.get("error") else "—"))
        out.append(f"| {n} | " + " | ".join(cells) + f" | {ideal:.1f} s |")
    out.append("")
    return out


def markdown(results: list[ScenarioResult], header: dict[str, Any]) -> str:
    lines = ["# dxa WAN lab results", ""]
    lines.append(f"Run {header['started']} UTC, command `{header['command']}`, "
                 f"{header['seconds']:.0f} s in all, on {header['machine']}.")
    lines.append("")
    for r in results:
        lines += _scenario_md(r)
    definitions = (__doc__ or "").split("(also printed under it):")[1].strip()
    lines += ["Definitions:", "", definitions, ""]
    return "\n".join(lines)


def to_json(results: list[ScenarioResult], header: dict[str, Any]) -> str:
    def conv(r: ScenarioResult) -> dict[str, Any]:
        d = {k: v for k, v in asdict(r).items() if k not in ("measurements", "checks")}
        d["measurements"] = [m.as_dict() for m in r.measurements]
        d["checks"] = [asdict(c) for c in r.checks]
        return d

    return json.dumps({"run": header, "scenarios": [conv(r) for r in results]}, indent=1,
                      default=str)


def plot(results: list[ScenarioResult], out: Path) -> list[Path]:
    """Throughput over time per tool, one PNG per scenario; fan-out completion vs N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for r in results:
        series = [m for m in r.measurements if len(m.samples) >= 2]
        if series:
            fig, ax = plt.subplots(figsize=(9, 4.5))
            for m in series:
                ts, rates = [], []
                for (t0, b0), (t1, b1) in zip(m.samples, m.samples[1:]):
                    if t1 > t0:
                        ts.append(t1)
                        rates.append((b1 - b0) * 8 / (t1 - t0) / 1e6)
                label = f"{m.tool}: {m.settings}"
                ax.plot(ts, rates, label=label[:70], linewidth=1.2)
            cap = r.link.get("capacity_bps")
            if cap:
                ax.axhline(cap / 1e6, color="grey", linestyle=":", label="link capacity")
            ax.set_xlabel("seconds since start")
            ax.set_ylabel("Mbit/s into the receivers (IP bytes)")
            ax.set_title(f"{r.name}: {r.title}")
            ax.legend(fontsize=7, loc="lower right")
            ax.grid(alpha=0.3)
            fig.tight_layout()
            path = out / f"{r.name}-throughput.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            made.append(path)
        if r.fanout:
            fig, ax = plt.subplots(figsize=(7, 4.5))
            ideal = None
            ns_all: list[int] = []
            for tool, per in r.fanout.items():
                ns = sorted(per)
                ns_all = ns
                ideal = per[ns[0]]["ideal_s"]
                ys = [per[n]["last_s"] if per[n]["last_s"] else math.nan for n in ns]
                ax.plot(ns, ys, marker="o", label=tool)
            ax.set_xlabel("receivers N")
            if ideal:
                ax.plot(ns_all, [ideal] * len(ns_all), "k:", label="ideal: size / link rate")
                ax.plot(ns_all, [ideal * n for n in ns_all], color="grey", linestyle="--",
                        label="N unicast copies through the source's link")
            ax.set_ylabel("last receiver done (s)")
            ax.set_title(f"{r.name}: completion against N")
            ax.set_xticks(ns_all)
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            path = out / f"{r.name}-completion.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            made.append(path)
    return made
