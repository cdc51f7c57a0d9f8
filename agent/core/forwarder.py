"""The forwarding node of docs/FORWARDING.md, sans I/O: sealed frames in, sealed frames out.

A forwarder sits on a relay (one next hop) or on a fan-out tree node (several next hops,
maybe a local receiver too).  For each FWD frame read from upstream it checks the hop
MAC and sequence, and says which next hops get a copy with which narrowed bitstring,
and whether the local receiver gets it.  It keeps no per-transfer state beyond its
forwarding table, per-hop byte counts and a bounded queue count per next hop.

Rules: it never holds the session key (only hop keys), never touches a socket or a
clock (``now`` comes in), never forwards a bit that is not behind the next hop it sends
to, and never lets one slow next hop stop the others for longer than
``slow_branch_grace``: the slow branch is cut (its copies dropped, the source re-sends
what its receivers miss) until it has drained.  On hostile input it raises only
RemoteProtocolError.
"""

from __future__ import annotations

import hmac
from collections import deque
from dataclasses import dataclass, field

from agent.errors import ConfigError, RemoteProtocolError
from agent.wire import MAX_BITS_LEN, decode_hop_header, encode_hop_header, hop_mac

__all__ = [
    "NextHop", "ForwardingTable", "Delivery", "Forwarder",
    "FrameRejected", "BranchCut", "BranchRestored", "HopLost",
]

REJECT_WINDOW = 64
"""Rejections are counted over the last this-many frames of an upstream connection."""


@dataclass(frozen=True, slots=True)
class NextHop:
    name: str
    mask: int
    """The receivers (bits) reached through this next hop."""
    key: bytes
    """The hop key shared with that next hop (delivered over TLS by the source)."""


@dataclass(frozen=True, slots=True)
class ForwardingTable:
    """One node's part of a session's distribution tree (a BIER bit-indexed forwarding table)."""

    bits_len: int
    """Bytes of bitstring in the session's frames (receivers / 8, rounded up)."""
    upstream_key: bytes
    """The hop key of the hop this node reads from."""
    next_hops: tuple[NextHop, ...] = ()
    own_bit: int = 0
    """This node's bit when it is a receiver of the session, 0 for a relay."""

    def __post_init__(self) -> None:
        if not 1 <= self.bits_len <= MAX_BITS_LEN:
            raise ConfigError(f"bits_len must be 1..{MAX_BITS_LEN}")
        limit = 1 << (8 * self.bits_len)
        seen = self.own_bit
        if self.own_bit & (self.own_bit - 1) or self.own_bit >= limit:
            raise ConfigError("own_bit must be one bit inside the bitstring")
        for hop in self.next_hops:
            if hop.mask <= 0 or hop.mask >= limit:
                raise ConfigError(f"next hop {hop.name}: empty mask or bits outside the bitstring")
            if hop.mask & seen:
                raise ConfigError(f"next hop {hop.name}: its receivers are also reached another way")
            if len(hop.key) != 32:
                raise ConfigError(f"next hop {hop.name}: a hop key has 32 bytes")
            seen |= hop.mask
        if len(self.upstream_key) != 32:
            raise ConfigError("the upstream hop key has 32 bytes")
        if not seen:
            raise ConfigError("a forwarding table needs a next hop or an own bit")

    @property
    def reach(self) -> int:
        """Every receiver at or behind this node: the only bits upstream may ask it for."""
        reach = self.own_bit
        for hop in self.next_hops:
            reach |= hop.mask
        return reach


@dataclass(frozen=True, slots=True)
class Delivery:
    """What to do with one frame read from upstream."""

    local: bool
    """The local receiver's bit is set: open and write the inner frame here too."""
    sends: tuple[tuple[int, bytes], ...]
    """(next hop index, FWD header to send before the unchanged inner frame)."""
    inner_len: int


@dataclass(frozen=True, slots=True)
class FrameRejected:
    stream: int
    reason: str


@dataclass(frozen=True, slots=True)
class BranchCut:
    """Next hop ``hop`` stayed full for ``seconds``: its copies are dropped until it drains."""

    hop: int
    name: str
    seconds: float


@dataclass(frozen=True, slots=True)
class BranchRestored:
    hop: int
    name: str
    dropped_frames: int


@dataclass(frozen=True, slots=True)
class HopLost:
    hop: int
    name: str


@dataclass(slots=True)
class _Hop:
    spec: NextHop
    seq: int = 0
    queued: int = 0
    full_since: float | None = None
    cut: bool = False
    lost: bool = False
    frames: int = 0
    bytes: int = 0
    dropped: int = 0
    dropped_since_cut: int = 0


@dataclass(slots=True)
class _Upstream:
    last_seq: int = -1
    recent: deque = field(default_factory=lambda: deque(maxlen=REJECT_WINDOW))


class Forwarder:
    """``delivery = fwd.frame_received(stream, hop_part, body_len, inner_header)`` per frame;
    ``fwd.frame_sent(hop, nbytes)`` when a copy left; read upstream only while
    ``fwd.can_read(now)``; re-arm ``get_timer()`` / ``handle_timer(now)``."""

    def __init__(self, table: ForwardingTable, *, queue_bytes: int = 16 << 20,
                 slow_branch_grace: float = 2.0, max_rejects: int = 8) -> None:
        if queue_bytes <= 0 or slow_branch_grace < 0 or max_rejects < 1:
            raise ConfigError("queue_bytes, slow_branch_grace and max_rejects must be positive")
        self.table = table
        self._hops = [_Hop(h) for h in table.next_hops]
        self._reach = table.reach
        self._queue_bytes = queue_bytes
        self._grace = slow_branch_grace
        self._max_rejects = max_rejects
        self._up: dict[int, _Upstream] = {}
        self._events: deque = deque()
        self.frames_in = 0
        self.frames_local = 0
        self.frames_rejected = 0

    # -- upstream ---------------------------------------------------------------------
    def stream_opened(self, stream: int) -> None:
        """A new upstream connection: its hop_seq starts afresh."""
        self._up[stream] = _Upstream()

    def frame_received(self, stream: int, hop_part, body_len: int, inner_header) -> Delivery:
        """``hop_part``: the FWD frame after its prefix, up to the inner frame; ``inner_header``:
        the inner frame's first 84 bytes.  A frame that fails its MAC or asks for receivers
        not behind this node is dropped (an empty Delivery and a FrameRejected event); too
        many of those, or a sequence number that goes backwards, raise RemoteProtocolError."""
        up = self._up.get(stream)
        if up is None:
            raise RemoteProtocolError("FWD frame on a connection that did not join")
        hdr = decode_hop_header(hop_part, body_len)
        self.frames_in += 1
        reason = None
        if hdr.bits_len != self.table.bits_len:
            reason = "bitstring length differs from the session's"
        elif not hmac.compare_digest(hdr.mac, hop_mac(self.table.upstream_key, hdr.hop_seq, hdr.bits,
                                                      self.table.bits_len, inner_header)):
            reason = "bad hop MAC"  # a corrupting path or a forger: hop_seq is not trusted either
        elif hdr.hop_seq <= up.last_seq:
            raise RemoteProtocolError(f"FWD hop_seq {hdr.hop_seq} after {up.last_seq}: replayed or reordered")
        elif hdr.bits & ~self._reach:
            reason = "bitstring names receivers not behind this node"
        if reason is None or reason.startswith("bitstring names"):  # the MAC held: its hop_seq is real
            up.last_seq = hdr.hop_seq
        up.recent.append(reason is not None)
        if reason is not None:
            self.frames_rejected += 1
            self._events.append(FrameRejected(stream, reason))
            if sum(up.recent) >= self._max_rejects:
                raise RemoteProtocolError(f"{sum(up.recent)} of the last {len(up.recent)} forwarded frames "
                                          f"were rejected ({reason})")
            return Delivery(False, (), hdr.inner_len)
        local = bool(hdr.bits & self.table.own_bit)
        if local:
            self.frames_local += 1
        sends = []
        for i, hop in enumerate(self._hops):
            bits = hdr.bits & hop.spec.mask
            if not bits:
                continue
            if hop.cut or hop.lost:
                hop.dropped += 1
                hop.dropped_since_cut += 1
                continue
            head = encode_hop_header(hop.spec.key, hop.seq, bits, self.table.bits_len, inner_header, hdr.inner_len)
            hop.seq += 1
            size = len(head) + hdr.inner_len
            hop.queued += size
            hop.frames += 1
            hop.bytes += size
            sends.append((i, head))
        return Delivery(local, tuple(sends), hdr.inner_len)

    # -- next hops ----------------------------------------------------------------------
    def frame_sent(self, hop: int, nbytes: int) -> None:
        """A copy of ``nbytes`` (FWD header + inner frame) left for next hop ``hop``."""
        h = self._hops[hop]
        h.queued = max(0, h.queued - nbytes)
        if h.queued < self._queue_bytes:
            h.full_since = None
        if h.cut and h.queued == 0:
            h.cut = False
            self._events.append(BranchRestored(hop, h.spec.name, h.dropped_since_cut))
            h.dropped_since_cut = 0

    def hop_lost(self, hop: int) -> None:
        """Next hop ``hop`` is gone: its copies are dropped (the source re-sends what its
        receivers miss once it is re-routed); what was queued for it is forgotten."""
        h = self._hops[hop]
        if not h.lost:
            h.lost, h.queued, h.full_since = True, 0, None
            self._events.append(HopLost(hop, h.spec.name))

    def can_read(self, now: float) -> bool:
        """May the adapter read the next upstream frame?  Not while a next hop is full
        (back-pressure), except that a hop full for longer than the grace is cut."""
        ok = True
        for i, h in enumerate(self._hops):
            if h.cut or h.lost or h.queued < self._queue_bytes:
                continue
            if h.full_since is None:
                h.full_since = now
            if now - h.full_since >= self._grace:
                h.cut = True
                h.dropped_since_cut = 0
                self._events.append(BranchCut(i, h.spec.name, now - h.full_since))
                continue
            ok = False
        return ok

    def get_timer(self) -> float | None:
        """When the earliest full hop's grace runs out (call ``can_read`` then)."""
        due = [h.full_since + self._grace for h in self._hops
               if h.full_since is not None and not (h.cut or h.lost)]
        return min(due) if due else None

    def handle_timer(self, now: float) -> None:
        self.can_read(now)

    def next_event(self):
        return self._events.popleft() if self._events else None

    def hop_stats(self) -> list[dict]:
        """Per next hop: frames and bytes forwarded, frames dropped, state (for metrics and logs)."""
        return [{"name": h.spec.name, "frames": h.frames, "bytes": h.bytes, "dropped": h.dropped,
                 "queued": h.queued, "state": "lost" if h.lost else "cut" if h.cut else "up"}
                for h in self._hops]
