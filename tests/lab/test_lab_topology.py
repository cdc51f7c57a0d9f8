"""The topology description: parsing, validation and the plans derived from it (no root)."""

from __future__ import annotations

import pytest

from bench.lab import lab as lab_mod
from bench.lab.__main__ import TOPOLOGIES, main, resolve
from bench.lab.topology import (
    Host,
    Link,
    LinkSpec,
    Topology,
    TopologyError,
    parse_duration,
    parse_loss,
    parse_rate,
    parse_size,
    parse_topology,
)

WAN = """
name = "w"
[[host]]
name = "src"
[[host]]
name = "dst"
[[link]]
name = "wan"
a = "src"
b = "dst"
rate = "300mbit"
rtt = "50ms"
loss = "0.1%"
"""


def test_units() -> None:
    assert parse_rate("300mbit") == 300e6
    assert parse_rate("100Mbit/s") == 100e6
    assert parse_rate("2gbit") == 2e9
    assert parse_rate(1000) == 1000.0
    assert parse_duration("25ms") == pytest.approx(0.025)
    assert parse_duration("1.5s") == 1.5
    assert parse_duration("100us") == pytest.approx(1e-4)
    assert parse_loss("0.1%") == pytest.approx(0.001)
    assert parse_loss(0.01) == 0.01
    assert parse_size("2GiB") == 2 * 1024**3
    assert parse_size("16k") == 16384


@pytest.mark.parametrize("bad", ["fast", "10 furlongs", "-5mbit", ""])
def test_bad_rates_are_refused(bad: str) -> None:
    with pytest.raises(TopologyError):
        parse_rate(bad)


def test_wan_link_becomes_two_ports_with_the_path_asked_for() -> None:
    topo = parse_topology(WAN)
    assert [h.name for h in topo.hosts] == ["src", "dst"]
    assert [(p.host, p.address) for p in topo.ports] == [("src", "10.77.0.1"), ("dst", "10.77.0.2")]
    spec = topo.link("wan").spec
    assert spec.rate_bps == 300e6 and spec.delay_s == pytest.approx(0.025)
    assert spec.loss == pytest.approx(0.001)
    rate, rtt, loss = topo.path_spec("src", "dst")
    assert rate == 300e6
    assert rtt == pytest.approx(0.050)
    assert loss == pytest.approx(0.001)
    # Buffer defaults to one BDP: 300 Mbit/s x 50 ms.
    assert spec.effective_buffer == int(300e6 / 8 * 0.05)


def test_relay_config_names_every_port_and_shapes_only_what_was_asked() -> None:
    topo = parse_topology(WAN)
    text = topo.relay_config(["t0", "t1"])
    lines = text.splitlines()
    assert lines[:2] == ["mtu 1500", "seed 1"]
    assert "port 0 t0 0 10.77.0.1" in lines and "port 1 t1 0 10.77.0.2" in lines
    shapers = [ln for ln in lines if ln.startswith("shaper")]
    # A point-to-point link shapes on the way down into each host, once per direction.
    assert sorted(s.split()[1:3] for s in shapers) == [["0", "down"], ["1", "down"]]
    assert shapers[0].split()[3:6] == ["300000000", "25000000", "0"]


def test_star_paths_cross_two_spokes() -> None:
    topo = resolve("fanout-8")
    assert len(topo.hosts) == 9 and len({p.segment for p in topo.ports}) == 1
    rate, rtt, loss = topo.path_spec("src", "r8")
    assert rate == 100e6
    assert rtt == pytest.approx(0.010)
    assert loss == 0


def test_two_paths_are_disjoint_subnets() -> None:
    topo = resolve("two-paths")
    fast, slow = topo.address("dst", "fast"), topo.address("dst", "slow")
    assert fast.rsplit(".", 1)[0] != slow.rsplit(".", 1)[0]
    assert topo.path_spec("src", "dst", "fast")[:2] == (200e6, pytest.approx(0.040))
    assert topo.path_spec("src", "dst", "slow")[:2] == (100e6, pytest.approx(0.080))


def test_every_shipped_topology_loads() -> None:
    names = sorted(p.stem for p in TOPOLOGIES.glob("*.toml"))
    assert {"wan", "lossy", "two-paths", "fanout-8", "loopback"} <= set(names)
    for name in names:
        assert resolve(name).name == name


def test_events_parse() -> None:
    topo = resolve("wan-flap")
    assert [(e.at_s, e.link, e.action) for e in topo.events] == [(5, "wan", "down"), (8, "wan", "up")]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t + '\n[[link]]\na = "src"\nb = "nowhere"\n', "unknown node"),
        (lambda t: t + '\n[[link]]\na = "src"\nb = "src"\n', "to itself"),
        (lambda t: t.replace('loss = "0.1%"', 'loss = "100%"'), "loss"),
        (lambda t: t.replace('loss = "0.1%"', 'jitter = "40ms"'), "jitter"),
        (lambda t: t.replace('rtt = "50ms"', 'rtt = "50ms"\ndelay = "1ms"'), "rtt or delay"),
        (lambda t: t.replace('rate = "300mbit"', 'speed = "300mbit"'), "unknown keys"),
        (lambda t: "colour = 3\n" + t, "unknown top-level"),
        (lambda t: t.replace('name = "dst"', 'name = "src"'), "unique"),
        (lambda t: t.replace('name = "dst"', 'name = "Dst_1"'), "bad node name"),
        (lambda t: t + '\n[[event]]\nat = "1s"\nlink = "nope"\naction = "down"\n', "unknown link"),
        (lambda t: t + '\n[[event]]\nat = "1s"\nlink = "wan"\naction = "sideways"\n', "action"),
        (lambda t: t.replace('b = "dst"', ""), "missing key"),
        (lambda t: t + "\n[[[", "invalid TOML"),
    ],
)
def test_invalid_descriptions_are_refused_with_a_reason(edit, message: str) -> None:
    with pytest.raises(TopologyError, match=message):
        parse_topology(edit(WAN))


def test_switch_to_switch_and_too_many_ports_are_refused() -> None:
    with pytest.raises(TopologyError, match="switch-to-switch"):
        parse_topology('[[host]]\nname="a"\n[[switch]]\nname="s1"\n[[switch]]\nname="s2"\n'
                       '[[link]]\na="s1"\nb="s2"\n')
    hosts = tuple(Host(f"h{i}") for i in range(66))
    links = tuple(Link(f"l{i}", f"h{i}", f"h{i + 1}") for i in range(65))
    with pytest.raises(TopologyError, match="at most 64"):
        Topology("big", hosts, links)
    with pytest.raises(TopologyError):
        LinkSpec(rate_bps=-1)


def test_show_needs_no_root(capsys) -> None:
    assert main(["show", "two-paths"]) == 0
    out = capsys.readouterr().out
    assert "10.77.1.2" in out and "rate 100 Mbit/s" in out


def test_without_root_the_lab_says_so_and_builds_nothing(monkeypatch, capsys) -> None:
    monkeypatch.setattr(lab_mod.os, "geteuid", lambda: 1000)
    assert "needs root" in (lab_mod.lab_available() or "")
    with pytest.raises(lab_mod.LabUnavailable, match="root"), lab_mod.Lab(resolve("wan")):
        pass  # pragma: no cover - never reached
    assert main(["check", "wan"]) == 2
    assert "needs root" in capsys.readouterr().err
