"""What the benchmark report shows people (no root): rates against the link and the
best peer, errors and missing dxa features as words rather than numbers, the fan-out
tables, raw JSON and the plots."""

from __future__ import annotations

import json

import pytest

from bench.lab.peers import Measurement, not_available
from bench.report import markdown, plot, to_json
from bench.scenarios import ScenarioResult

HEADER = {"started": "2026-01-01 00:00", "command": "python -m bench.run wan",
          "seconds": 12.0, "machine": "test", "options": {}, "stopped": None}


def ok(tool: str, settings: str, mbit: float, seconds: float = 10.0, cpu: float = 1.0,
       **kw) -> Measurement:
    nbytes = int(mbit * 1e6 / 8 * seconds)
    return Measurement(tool, settings, ok=True, bytes=nbytes, seconds=seconds, cpu_s=cpu,
                       samples=[(0.0, 0), (seconds / 2, nbytes // 2), (seconds, nbytes)], **kw)


def wan_result() -> ScenarioResult:
    r = ScenarioResult(
        "wan", "50 ms RTT", "wan", {"bytes": 2**30, "files": 1, "file_bytes": 2**30},
        {"capacity_bps": 300e6, "rtt_s": 0.05, "loss": 0.001,
         "paths": [{"link": "wan", "rate_bps": 300e6, "rtt_s": 0.05, "loss": 0.001}]},
        congestion={"src": "bbr", "dst": "bbr"},
    )
    r.measurements = [
        ok("iperf3", "ceiling", 280.0, extra={"retransmits": 12}),
        ok("gridftp", "globus-url-copy -p 4", 200.0),
        ok("rsync", "rsync -a", 150.0),
        Measurement("dxa", "dxa cp", error="dxa cp exit 4: connection refused | reset"),
        not_available("dxa", "dxa cp striped", "multipath is not in dxa yet"),
    ]
    return r


def row(text: str, start: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.startswith(start))
    return [c.strip() for c in line.strip("|").split(" | ")]


def test_rows_show_rate_share_of_link_ratio_to_best_peer_and_cpu() -> None:
    text = markdown([wan_result()], HEADER)
    gridftp = row(text, "| gridftp")
    assert gridftp[2:6] == ["200.0 Mbit/s", "67%", "1.00×", "4.0"]
    rsync = row(text, "| rsync")
    assert rsync[2:5] == ["150.0 Mbit/s", "50%", "0.75×"]
    # iperf3 is the ceiling, not a peer: its ratio is against GridFTP, the best peer.
    assert row(text, "| iperf3")[4] == "1.40×"
    assert "12 retransmits" in row(text, "| iperf3")[6]
    assert "Best peer: gridftp" in text


def test_a_failed_tool_shows_its_error_and_a_missing_feature_shows_na() -> None:
    text = markdown([wan_result()], HEADER)
    failed = row(text, "| dxa | dxa cp |")
    assert failed[2].startswith("error: dxa cp exit 4: connection refused")
    assert "\\|" in failed[2], "a | in an error must not break the table"
    assert failed[3:6] == ["—", "—", "—"]
    missing = row(text, "| dxa | dxa cp striped")
    assert missing[2] == "n/a" and missing[6] == "multipath is not in dxa yet"


def test_a_missed_self_check_is_flagged_and_a_failed_scenario_says_why() -> None:
    from bench.lab.selfcheck import CheckResult

    r = wan_result()
    r.checks = [CheckResult("src->dst", "rate_bps", 300e6, 250e6, 0.05, False)]
    r.check_ok = False
    r.error = "LabError: ip netns add: permission denied"
    text = markdown([r], HEADER)
    assert "MISSED (numbers below are suspect)" in text
    assert "**Scenario failed:** LabError" in text


def fanout_result() -> ScenarioResult:
    r = ScenarioResult("fanout-8", "fan-out", "fanout-8",
                       {"bytes": 64 * 2**20, "files": 1, "file_bytes": 64 * 2**20},
                       {"capacity_bps": 100e6, "rtt_s": 0.01, "loss": 0.0, "paths": [],
                        "per_link": True})
    ideal = 64 * 2**20 * 8 / 100e6
    r.fanout = {
        "uftp": {n: {"last_s": ideal * 1.1, "ideal_s": ideal, "receivers": [], "error": None}
                 for n in (1, 2, 4, 8)},
        "gridftp": {n: {"last_s": ideal * n * 1.05, "ideal_s": ideal, "receivers": [],
                        "error": None} for n in (1, 2, 4, 8)},
    }
    u = ok("uftp", "multicast", 700.0)
    u.extra = {"last_receiver_s": ideal * 1.1, "ideal_s": ideal}
    r.measurements = [u, not_available("dxa", "dxa fan-out", "fan-out is not in dxa yet")]
    return r


def test_fanout_shows_last_receiver_against_ideal_and_against_n() -> None:
    text = markdown([fanout_result()], HEADER)
    assert row(text, "| uftp")[2:5] == ["5.9 s", "5.4 s", "1.10"]
    assert row(text, "| dxa")[2] == "n/a"
    assert row(text, "| 8 |") == ["8", "5.9 s", "45.1 s", "5.4 s"]


def test_json_keeps_every_raw_measurement() -> None:
    data = json.loads(to_json([wan_result(), fanout_result()], HEADER))
    wan = data["scenarios"][0]
    assert [m["tool"] for m in wan["measurements"]] == ["iperf3", "gridftp", "rsync", "dxa",
                                                        "dxa"]
    assert wan["measurements"][1]["samples"][-1][1] == wan["measurements"][1]["bytes"]
    assert wan["measurements"][3]["error"].startswith("dxa cp exit 4")
    assert wan["measurements"][4]["available"] is False
    assert data["scenarios"][1]["fanout"]["gridftp"]["8"]["last_s"] > 40


def test_plots_are_written(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    made = plot([wan_result(), fanout_result()], tmp_path)
    assert sorted(p.name for p in made) == ["fanout-8-completion.png", "fanout-8-throughput.png",
                                            "wan-throughput.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in made)
