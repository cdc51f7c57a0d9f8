"""Declarative lab topologies: hosts, switches, links and timed link events.

A topology is plain data (frozen dataclasses), loaded from TOML or built in Python.
It knows how to turn itself into the relay's port/shaper plan and an address plan,
but it never runs a command: building it is `bench.lab.lab.Lab`'s job.

Link semantics (what a user asking for "300 Mbit/s, 50 ms RTT, 0.1% loss" gets):
- a link between two hosts is a point-to-point path; rate, one-way delay (RTT / 2),
  jitter and loss apply once in each direction;
- a link between a host and a switch is one spoke of a star; a packet from host A
  to host B crosses A's spoke then B's spoke, so both spokes' delays add up and
  both rate caps apply;
- loss is an independent per-packet probability in each direction (like netem);
- jitter is uniform in [-jitter, +jitter] and never reorders packets;
- the bottleneck buffer defaults to one bandwidth-delay product (at least 64 KiB).
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "Host",
    "Link",
    "LinkEvent",
    "LinkSpec",
    "Port",
    "Switch",
    "Topology",
    "TopologyError",
    "load_topology",
    "parse_topology",
    "topology_from_dict",
    "parse_duration",
    "parse_loss",
    "parse_rate",
    "parse_size",
]

_NAME = re.compile(r"^[a-z][a-z0-9]{0,11}$")


class TopologyError(ValueError):
    """The description of a topology is invalid."""


_RATE_UNITS = {
    "": 1.0,
    "bit": 1.0,
    "bps": 1.0,
    "kbit": 1e3,
    "kbps": 1e3,
    "mbit": 1e6,
    "mbps": 1e6,
    "gbit": 1e9,
    "gbps": 1e9,
}
_TIME_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gib": 1024**3,
}


def _split(text: str) -> tuple[float, str]:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z/%]*)\s*", text)
    if not m:
        raise TopologyError(f"not a quantity: {text!r}")
    return float(m.group(1)), m.group(2).lower().removesuffix("/s")


def parse_rate(value: str | float | int) -> float:
    """'300mbit', '2gbit', '100Mbit/s' or a number of bit/s -> bit/s (0 = unlimited)."""
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        number, unit = _split(value)
    if unit not in _RATE_UNITS:
        raise TopologyError(f"unknown rate unit in {value!r}")
    rate = number * _RATE_UNITS[unit]
    if rate < 0:
        raise TopologyError(f"negative rate {value!r}")
    return rate


def parse_duration(value: str | float | int) -> float:
    """'25ms', '1.5s', '100us' or a number of seconds -> seconds."""
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        number, unit = _split(value)
    if unit not in _TIME_UNITS:
        raise TopologyError(f"unknown time unit in {value!r}")
    seconds = number * _TIME_UNITS[unit]
    if seconds < 0:
        raise TopologyError(f"negative duration {value!r}")
    return seconds


def parse_loss(value: str | float | int) -> float:
    """'0.1%' or a probability in [0, 1) -> probability."""
    if isinstance(value, str) and value.strip().endswith("%"):
        number, _ = _split(value.strip().removesuffix("%"))
        loss = number / 100
    elif isinstance(value, str):
        loss, _ = _split(value)
    else:
        loss = float(value)
    if not 0 <= loss < 1:
        raise TopologyError(f"loss must be in [0, 1): {value!r}")
    return loss


def parse_size(value: str | int) -> int:
    """'2GiB', '16k', '64MiB' or a number of bytes -> bytes."""
    if isinstance(value, int):
        return value
    number, unit = _split(value)
    if unit not in _SIZE_UNITS:
        raise TopologyError(f"unknown size unit in {value!r}")
    return int(number * _SIZE_UNITS[unit])


@dataclass(frozen=True)
class LinkSpec:
    """What one direction of a link does to packets."""

    rate_bps: float = 0.0
    """Rate cap in bit/s of IP packets; 0 means unlimited."""
    delay_s: float = 0.0
    """One-way propagation delay."""
    jitter_s: float = 0.0
    """Uniform jitter added to the delay, in [-jitter, +jitter]; never reorders."""
    loss: float = 0.0
    """Independent per-packet drop probability."""
    buffer_bytes: int | None = None
    """Drop-tail buffer in front of the rate cap; None = one BDP, at least 64 KiB."""

    def __post_init__(self) -> None:
        if self.rate_bps < 0 or self.delay_s < 0 or self.jitter_s < 0:
            raise TopologyError("rate, delay and jitter must not be negative")
        if self.jitter_s > self.delay_s:
            raise TopologyError("jitter larger than the delay is not supported")
        if not 0 <= self.loss < 1:
            raise TopologyError("loss must be in [0, 1)")

    @property
    def effective_buffer(self) -> int:
        if self.buffer_bytes is not None:
            return self.buffer_bytes
        bdp = self.rate_bps / 8 * 2 * self.delay_s
        return max(64 * 1024, int(bdp))

    @property
    def is_passthrough(self) -> bool:
        return not (self.rate_bps or self.delay_s or self.jitter_s or self.loss)


@dataclass(frozen=True)
class Host:
    """A network namespace that runs tools."""

    name: str
    congestion: str | None = None
    """TCP congestion control for this host; None = the topology's default."""


@dataclass(frozen=True)
class Switch:
    """A star centre inside the relay: forwards by destination, copies multicast."""

    name: str


@dataclass(frozen=True)
class Link:
    """A host-host path, or a host-switch spoke, with the same spec both ways."""

    name: str
    a: str
    b: str
    spec: LinkSpec = LinkSpec()


@dataclass(frozen=True)
class LinkEvent:
    """Take a link down or bring it back up `at_s` seconds after the clock starts."""

    at_s: float
    link: str
    action: Literal["down", "up"]


@dataclass(frozen=True)
class Port:
    """One TUN device: `host`'s attachment to `segment`, as the relay sees it."""

    index: int
    host: str
    link: str
    segment: int
    address: str
    prefix_len: int
    up: LinkSpec
    down: LinkSpec


@dataclass(frozen=True)
class Topology:
    """Hosts, switches, links and events; validated at construction."""

    name: str
    hosts: tuple[Host, ...]
    links: tuple[Link, ...]
    switches: tuple[Switch, ...] = ()
    events: tuple[LinkEvent, ...] = ()
    mtu: int = 1500
    congestion: str | None = None
    """Default TCP congestion control of every host; None keeps the machine's default."""
    seed: int = 1
    """Seed of the relay's loss and jitter generator: runs are reproducible."""
    base_net: str = "10.77.0.0/16"
    """Each segment gets the next /24 of this network."""
    ports: tuple[Port, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        names = [h.name for h in self.hosts] + [s.name for s in self.switches]
        for n in names:
            if not _NAME.match(n):
                raise TopologyError(f"bad node name {n!r}: lowercase letters/digits, at most 12")
        if len(set(names)) != len(names):
            raise TopologyError("node names must be unique")
        if not self.hosts:
            raise TopologyError("a topology needs at least one host")
        link_names = [link.name for link in self.links]
        if len(set(link_names)) != len(link_names):
            raise TopologyError("link names must be unique")
        if not 576 <= self.mtu <= 9000:
            raise TopologyError("mtu must be within 576..9000")
        hosts = {h.name for h in self.hosts}
        switches = {s.name for s in self.switches}
        for link in self.links:
            for end in (link.a, link.b):
                if end not in hosts | switches:
                    raise TopologyError(f"link {link.name!r}: unknown node {end!r}")
            if link.a == link.b:
                raise TopologyError(f"link {link.name!r} connects {link.a!r} to itself")
            if link.a in switches and link.b in switches:
                raise TopologyError(f"link {link.name!r}: switch-to-switch links are not supported")
        for ev in self.events:
            if ev.link not in link_names:
                raise TopologyError(f"event on unknown link {ev.link!r}")
            if ev.action not in ("down", "up"):
                raise TopologyError(f"event action must be 'down' or 'up', not {ev.action!r}")
            if ev.at_s < 0:
                raise TopologyError("event time must not be negative")
        object.__setattr__(self, "ports", self._plan_ports(switches))

    def _plan_ports(self, switches: set[str]) -> tuple[Port, ...]:
        net = ipaddress.ip_network(self.base_net)
        subnets = net.subnets(new_prefix=24)
        ports: list[Port] = []
        segment_of_switch: dict[str, tuple[int, ipaddress.IPv4Network]] = {}
        host_count: dict[int, int] = {}
        segment = 0
        passthrough = LinkSpec()

        def add(host: str, link: Link, seg: int, subnet: Any, up: LinkSpec, down: LinkSpec) -> None:
            host_count[seg] = host_count.get(seg, 0) + 1
            if host_count[seg] > 250:
                raise TopologyError("more than 250 hosts on one segment")
            address = str(subnet.network_address + host_count[seg])
            ports.append(Port(len(ports), host, link.name, seg, address, 24, up, down))

        try:
            for link in self.links:
                if link.a in switches or link.b in switches:
                    sw, host = (link.a, link.b) if link.a in switches else (link.b, link.a)
                    if sw not in segment_of_switch:
                        segment_of_switch[sw] = (segment, next(subnets))
                        segment += 1
                    seg, subnet = segment_of_switch[sw]
                    add(host, link, seg, subnet, link.spec, link.spec)
                else:
                    subnet = next(subnets)
                    add(link.a, link, segment, subnet, passthrough, link.spec)
                    add(link.b, link, segment, subnet, passthrough, link.spec)
                    segment += 1
        except StopIteration:
            raise TopologyError(f"{self.base_net} has too few /24 subnets") from None
        if len(ports) > 64:
            raise TopologyError("the relay supports at most 64 ports")
        return tuple(ports)

    # -- queries ---------------------------------------------------------------------

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def link(self, name: str) -> Link:
        for link in self.links:
            if link.name == name:
                return link
        raise KeyError(name)

    def address(self, host: str, link: str | None = None) -> str:
        """The address of `host` on `link` (default: its first link)."""
        for p in self.ports:
            if p.host == host and (link is None or p.link == link):
                return p.address
        raise KeyError(f"{host} has no port" + (f" on {link}" if link else ""))

    def ports_of_link(self, link: str) -> tuple[Port, ...]:
        return tuple(p for p in self.ports if p.link == link)

    def path_spec(self, src: str, dst: str, link: str | None = None) -> tuple[float, float, float]:
        """(bottleneck rate bit/s, RTT s, one-way loss) that src->dst should see."""
        dst_port = next(
            p for p in self.ports if p.host == dst and (link is None or p.link == link)
        )
        src_port = next(
            p
            for p in self.ports
            if p.host == src and p.segment == dst_port.segment and p.index != dst_port.index
        )
        fwd = [src_port.up, dst_port.down]
        rev = [dst_port.up, src_port.down]
        rates = [s.rate_bps for s in fwd if s.rate_bps > 0]
        rtt = sum(s.delay_s for s in fwd + rev)
        keep = 1.0
        for s in fwd:
            keep *= 1 - s.loss
        return (min(rates) if rates else 0.0, rtt, 1 - keep)

    def relay_config(self, ifnames: list[str]) -> str:
        """The relay's config text, given one device name per port."""
        lines = [f"mtu {self.mtu}", f"seed {self.seed}"]
        for p in self.ports:
            lines.append(f"port {p.index} {ifnames[p.index]} {p.segment} {p.address}")
        for p in self.ports:
            for direction, spec in (("up", p.up), ("down", p.down)):
                if spec.is_passthrough:
                    continue
                lines.append(
                    f"shaper {p.index} {direction} {spec.rate_bps:.0f} "
                    f"{int(spec.delay_s * 1e9)} {int(spec.jitter_s * 1e9)} "
                    f"{spec.loss:.9f} {spec.effective_buffer}"
                )
        return "\n".join(lines) + "\n"


# -- TOML ------------------------------------------------------------------------------


def _spec_from(table: dict[str, Any], where: str) -> LinkSpec:
    if "rtt" in table and "delay" in table:
        raise TopologyError(f"{where}: give either rtt or delay, not both")
    delay = parse_duration(table["delay"]) if "delay" in table else 0.0
    if "rtt" in table:
        delay = parse_duration(table["rtt"]) / 2
    buffer = table.get("buffer")
    return LinkSpec(
        rate_bps=parse_rate(table.get("rate", 0)),
        delay_s=delay,
        jitter_s=parse_duration(table.get("jitter", 0)),
        loss=parse_loss(table.get("loss", 0)),
        buffer_bytes=parse_size(buffer) if buffer is not None else None,
    )


_TOP_KEYS = {"name", "mtu", "congestion", "seed", "base_net", "host", "switch", "link", "event"}
_LINK_KEYS = {"name", "a", "b", "rate", "rtt", "delay", "jitter", "loss", "buffer"}


def topology_from_dict(data: dict[str, Any], default_name: str = "topology") -> Topology:
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise TopologyError(f"unknown top-level keys: {sorted(unknown)}")
    try:
        hosts = tuple(Host(h["name"], h.get("congestion")) for h in data.get("host", []))
        switches = tuple(Switch(s["name"]) for s in data.get("switch", []))
        links = []
        for i, table in enumerate(data.get("link", [])):
            bad = set(table) - _LINK_KEYS
            if bad:
                raise TopologyError(f"link #{i}: unknown keys {sorted(bad)}")
            name = table.get("name", f"l{i}")
            links.append(Link(name, table["a"], table["b"], _spec_from(table, f"link {name}")))
        events = tuple(
            LinkEvent(parse_duration(e["at"]), e["link"], e["action"]) for e in data.get("event", [])
        )
    except KeyError as exc:
        raise TopologyError(f"missing key {exc}") from None
    return Topology(
        name=data.get("name", default_name),
        hosts=hosts,
        switches=switches,
        links=tuple(links),
        events=events,
        mtu=int(data.get("mtu", 1500)),
        congestion=data.get("congestion"),
        seed=int(data.get("seed", 1)),
        base_net=data.get("base_net", "10.77.0.0/16"),
    )


def parse_topology(text: str, default_name: str = "topology") -> Topology:
    """Parse a topology from TOML text."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TopologyError(f"invalid TOML: {exc}") from None
    return topology_from_dict(data, default_name)


def load_topology(path: str | Path) -> Topology:
    """Load a topology from a TOML file; its name defaults to the file's stem."""
    path = Path(path)
    return parse_topology(path.read_text(), path.stem)
