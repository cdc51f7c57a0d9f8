"""The topology file (controller_stub/topology.py) and the example shipped with it."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller_stub.errors import TopologyError
from controller_stub.ledger import Ledger, Outcome, ReservationRequest
from controller_stub.topology import load_topology, parse_topology

EXAMPLE = Path(__file__).resolve().parents[2] / "controller_stub" / "topology.example.toml"
G = 10**9


def test_the_example_loads_and_routes_agents_over_it():
    topo = load_topology(EXAMPLE)
    assert topo.sites == ("geneva", "amsterdam", "chicago")
    by_id = {link.id: link for link in topo.links}
    assert by_id["geneva>amsterdam"].capacity_bps == by_id["amsterdam>geneva"].capacity_bps == 100 * G
    assert by_id["ta1:chicago>amsterdam"].capacity_bps == 40 * G
    assert "chicago>geneva" not in by_id  # one-way link
    ledger = Ledger()
    topo.apply(ledger, now=0)
    ledger.register_agent("gva1", "geneva", ["10.1.0.1:7400"], 100 * G, now=0)
    ledger.register_agent("chi1", "chicago", ["10.3.0.1:7400"], 100 * G, now=0)
    assert ledger.route("gva1", "chi1") == ("gva1>geneva", "geneva>chicago", "chicago>chi1")
    # No link chicago -> geneva: two hops back, over the first of the parallel links by id.
    assert ledger.route("chi1", "gva1") == ("chi1>chicago", "ta1:chicago>amsterdam", "amsterdam>geneva", "geneva>gva1")
    assert ledger.request(ReservationRequest("gva1", "chi1", rate_bps=10 * G), now=0).outcome is Outcome.ADMITTED
    assert ledger.request(ReservationRequest("gva1", "chi1", rate_bps=1, wait=False), now=0).outcome \
        is Outcome.REFUSED


def test_capacities_as_numbers_or_text():
    topo = parse_topology({"site": [{"name": "x"}, {"name": "y"}],
                           "link": [{"a": "x", "b": "y", "capacity": 1_500_000}, {"a": "y", "b": "x", "capacity": "1.5G",
                                                                                  "duplex": False, "name": "back"}]})
    assert [(link.id, link.capacity_bps) for link in topo.links] == [
        ("x>y", 1_500_000), ("y>x", 1_500_000), ("back:y>x", 1_500_000_000)]


def test_applying_again_updates_capacities():
    ledger = Ledger()
    doc = {"site": [{"name": "x"}, {"name": "y"}], "link": [{"a": "x", "b": "y", "capacity": "10G"}]}
    parse_topology(doc).apply(ledger, now=0)
    doc["link"][0]["capacity"] = "20G"
    parse_topology(doc).apply(ledger, now=1)
    assert ledger.link("x>y").capacity_bps == 20 * G


@pytest.mark.parametrize("doc, words", [
    ({"sites": []}, "unknown key(s) sites"),
    ({"site": [{"name": "x", "capacity": 1}]}, "unknown key(s) capacity"),
    ({"site": [{"name": "x"}, {"name": "x"}]}, "declared twice"),
    ({"site": [{"name": ""}]}, "non-empty name"),
    ({"site": [{"name": "a>b"}]}, "reserved"),
    ({"site": [{"name": "x"}], "link": [{"a": "x", "b": "z", "capacity": 1}]}, "'z' is not declared"),
    ({"site": [{"name": "x"}], "link": [{"a": "x", "b": "x", "capacity": 1}]}, "to itself"),
    ({"site": [{"name": "x"}, {"name": "y"}], "link": [{"a": "x", "b": "y"}]}, "capacity is required"),
    ({"site": [{"name": "x"}, {"name": "y"}], "link": [{"a": "x", "b": "y", "capacity": "fast"}]}, "not a rate"),
    ({"site": [{"name": "x"}, {"name": "y"}], "link": [{"a": "x", "b": "y", "capacity": 0}]}, "positive"),
    ({"site": [{"name": "x"}, {"name": "y"}], "link": [{"a": "x", "b": "y", "capacity": True}]}, "bits per second"),
    ({"site": [{"name": "x"}, {"name": "y"}], "link": [{"a": "x", "b": "y", "capacity": 1, "duplex": "yes"}]},
     "true or false"),
    ({"site": [{"name": "x"}, {"name": "y"}],
      "link": [{"a": "x", "b": "y", "capacity": 1}, {"a": "y", "b": "x", "capacity": 2}]}, "declared twice"),
    ({"site": {"name": "x"}}, "[[site]]"),
])
def test_mistakes_are_named(doc, words):
    with pytest.raises(TopologyError) as exc:
        parse_topology(doc)
    assert words in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "t.toml"
    bad.write_text("[[site]\nname = 1\n")
    with pytest.raises(TopologyError, match="t.toml: not valid TOML"):
        load_topology(bad)
    with pytest.raises(TopologyError, match="cannot read"):
        load_topology(tmp_path / "missing.toml")
    bad.write_text('[[site]]\nname = "x"\n[[link]]\na = "x"\nb = "nowhere"\ncapacity = "1G"\n')
    with pytest.raises(TopologyError, match="t.toml: link #1: site 'nowhere'"):
        load_topology(bad)
