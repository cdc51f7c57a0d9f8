"""The scheduler's topology file: sites and the links between them, with capacities.

Agents are not listed here: they register themselves (name, site, addresses, their own
link capacity) and the ledger adds their access links.  A link is full duplex by default
(the capacity holds in each direction, as two directed ledger links) and may be one-way.
``parse_topology`` is pure (a dict in, a Topology out, everything validated, unknown keys
refused so that a typo is an error and not a silently missing link); ``load_topology``
only reads the file.  See topology.example.toml.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import parse_rate
from agent.errors import ConfigError
from controller_stub.errors import TopologyError
from controller_stub.ledger import Ledger, Link

__all__ = ["Topology", "parse_topology", "load_topology"]

_TOP_KEYS = {"site", "link"}
_SITE_KEYS = {"name", "description"}
_LINK_KEYS = {"name", "a", "b", "capacity", "duplex", "description"}


@dataclass(frozen=True)
class Topology:
    sites: tuple[str, ...]
    links: tuple[Link, ...]
    """Directed: a duplex link of the file appears twice, once per direction."""

    def apply(self, ledger: Ledger, now: float) -> None:
        """Add the sites and links to a ledger (a link already there gets the new capacity)."""
        for site in self.sites:
            ledger.add_site(site)
        for link in self.links:
            ledger.add_link(link.id, link.src, link.dst, link.capacity_bps, now)


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip() or value != value.strip():
        raise TopologyError(f"{what}: a non-empty name without surrounding blanks is required, got {value!r}")
    if ">" in value:
        raise TopologyError(f"{what}: '>' is reserved for link ids: {value!r}")
    return value


def _unknown(table: dict, allowed: set[str], what: str) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise TopologyError(f"{what}: unknown key(s) {', '.join(extra)} (allowed: {', '.join(sorted(allowed))})")


def _capacity(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TopologyError(f"{what}: capacity must be bits per second, a number or text like '10G', got {value!r}")
    try:
        capacity = parse_rate(value)
    except ConfigError as exc:
        raise TopologyError(f"{what}: {exc}") from None
    if capacity <= 0:
        raise TopologyError(f"{what}: capacity must be positive, got {value!r}")
    return capacity


def parse_topology(data: dict[str, Any]) -> Topology:
    """Validate a parsed TOML document into a Topology; raise TopologyError (a ValueError)."""
    if not isinstance(data, dict):
        raise TopologyError("the topology must be a table")
    _unknown(data, _TOP_KEYS, "topology")
    site_tables = data.get("site", [])
    link_tables = data.get("link", [])
    if not isinstance(site_tables, list) or not isinstance(link_tables, list):
        raise TopologyError("write sites as [[site]] and links as [[link]]")
    sites: list[str] = []
    for i, table in enumerate(site_tables):
        what = f"site #{i + 1}"
        if not isinstance(table, dict):
            raise TopologyError(f"{what}: must be a table")
        _unknown(table, _SITE_KEYS, what)
        name = _name(table.get("name"), what)
        if name in sites:
            raise TopologyError(f"{what}: site {name!r} is declared twice")
        sites.append(name)
    links: list[Link] = []
    for i, table in enumerate(link_tables):
        what = f"link #{i + 1}"
        if not isinstance(table, dict):
            raise TopologyError(f"{what}: must be a table")
        _unknown(table, _LINK_KEYS, what)
        a, b = _name(table.get("a"), f"{what} a"), _name(table.get("b"), f"{what} b")
        for end in (a, b):
            if end not in sites:
                raise TopologyError(f"{what}: site {end!r} is not declared with [[site]]")
        if a == b:
            raise TopologyError(f"{what}: a link joins two different sites, not {a!r} to itself")
        if "capacity" not in table:
            raise TopologyError(f"{what}: capacity is required")
        capacity = _capacity(table["capacity"], what)
        duplex = table.get("duplex", True)
        if not isinstance(duplex, bool):
            raise TopologyError(f"{what}: duplex must be true or false")
        prefix = f"{_name(table['name'], f'{what} name')}:" if "name" in table else ""
        for src, dst in ((a, b), (b, a)) if duplex else ((a, b),):
            link = Link(f"{prefix}{src}>{dst}", src, dst, capacity)
            if any(other.id == link.id for other in links):
                raise TopologyError(f"{what}: link {link.id!r} is declared twice (name parallel links)")
            links.append(link)
    return Topology(tuple(sites), tuple(links))


def load_topology(path: str | Path) -> Topology:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise TopologyError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise TopologyError(f"{path}: cannot read the topology: {exc.strerror or exc}") from None
    try:
        return parse_topology(data)
    except TopologyError as exc:
        raise TopologyError(f"{path}: {exc}") from None
