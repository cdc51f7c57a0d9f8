"""The forwarder core (docs/FORWARDING.md) without sockets: hop frames, bit narrowing over
simulated trees of up to 256 receivers, hostile upstreams, back-pressure and cut branches."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.forwarder import (
    BranchCut,
    BranchRestored,
    ForwardingTable,
    Forwarder,
    FrameRejected,
    HopLost,
    NextHop,
)
from agent.errors import ConfigError, RemoteProtocolError
from agent.wire import (
    DATA_HEADER_LEN,
    PREFIX_LEN,
    FrameType,
    Sealer,
    check_prefix,
    chunk_digest,
    encode_hop_header,
    hop_overhead,
)

KEY = os.urandom(32)
SID = os.urandom(8)


def sealed_frame(chunk: int = 0, size: int = 1000) -> bytes:
    plain = os.urandom(size)
    return bytes(Sealer(KEY, SID).seal(0, chunk, chunk * 4096, plain, chunk_digest(plain)).frame)


def split(frame: bytes) -> tuple[bytes, int, bytes]:
    """A FWD frame as the adapter reads it: (hop part, body length, inner header)."""
    ftype, body_len = check_prefix(frame[:PREFIX_LEN], 1 << 30)
    assert ftype == FrameType.FWD
    bits_len = int.from_bytes(frame[PREFIX_LEN + 8:PREFIX_LEN + 10], "big")
    hop_end = PREFIX_LEN + 10 + bits_len + 16
    return frame[PREFIX_LEN:hop_end], body_len, frame[hop_end:hop_end + DATA_HEADER_LEN]


def wrap(key: bytes, seq: int, bits: int, bits_len: int, inner: bytes) -> bytes:
    return encode_hop_header(key, seq, bits, bits_len, inner[:DATA_HEADER_LEN], len(inner)) + inner


def test_a_hop_frame_carries_the_sealed_frame_unchanged():
    inner = sealed_frame()
    frame = wrap(KEY, 7, 0b101, 1, inner)
    assert len(frame) == len(inner) + hop_overhead(1)
    assert frame.endswith(inner)
    hop_part, body_len, header = split(frame)
    assert header == inner[:DATA_HEADER_LEN] and body_len == len(frame) - PREFIX_LEN


# -- trees -------------------------------------------------------------------------------------

class Tree:
    """A random distribution tree: node 0 is the source, nodes 1..n receivers (bit i-1),
    plus relay-only nodes (no bit), each with its hop key towards its parent."""

    def __init__(self, receivers: int, relays: int, rng: random.Random) -> None:
        self.n = receivers
        self.bits_len = (receivers + 7) // 8
        count = 1 + receivers + relays
        self.parent = {i: rng.randrange(0, i) for i in range(1, count)}
        self.children = {i: [] for i in range(count)}
        for c, p in self.parent.items():
            self.children[p].append(c)
        self.key = {i: os.urandom(32) for i in range(1, count)}  # key of the hop parent -> i
        self.bit = {i: 1 << (i - 1) for i in range(1, receivers + 1)}

    def below(self, i: int) -> int:
        m = self.bit.get(i, 0)
        for c in self.children[i]:
            m |= self.below(c)
        return m

    def forwarders(self) -> dict[int, Forwarder]:
        out = {}
        for i in self.parent:
            hops = tuple(NextHop(f"n{c}", self.below(c), self.key[c]) for c in self.children[i] if self.below(c))
            if not hops and i not in self.bit:
                continue  # a relay with nobody behind it is not part of the session
            out[i] = Forwarder(ForwardingTable(self.bits_len, self.key[i], hops, self.bit.get(i, 0)))
            out[i].stream_opened(0)
        return out

    def send(self, fwd: dict[int, Forwarder], bits: int, inner: bytes, seqs: dict) -> tuple[dict, dict]:
        """Send one frame from the source with ``bits``; return (deliveries per receiver,
        copies per link)."""
        delivered: dict[int, int] = {}
        links: dict[tuple[int, int], int] = {}
        todo = []
        for c in self.children[0]:
            want = bits & self.below(c)
            if want:
                todo.append((0, c, wrap(self.key[c], seqs.setdefault(c, 0), want, self.bits_len, inner)))
                seqs[c] += 1
        while todo:
            p, c, frame = todo.pop()
            links[(p, c)] = links.get((p, c), 0) + 1
            hop_part, body_len, header = split(frame)
            d = fwd[c].frame_received(0, hop_part, body_len, header)
            assert frame[-d.inner_len:] == inner
            if d.local:
                delivered[c] = delivered.get(c, 0) + 1
            for hop, head in d.sends:
                child = int(fwd[c].table.next_hops[hop].name[1:])
                fwd[c].frame_sent(hop, len(head) + d.inner_len)
                todo.append((c, child, head + inner))
        return delivered, links


@pytest.mark.parametrize("receivers,relays", [(1, 0), (1, 3), (8, 0), (16, 4), (100, 20), (256, 0), (256, 40)])
def test_every_receiver_gets_each_chunk_exactly_once_and_no_link_twice(receivers, relays):
    tree = Tree(receivers, relays, random.Random(receivers * 1000 + relays))
    fwd = tree.forwarders()
    inner = sealed_frame()
    everyone = (1 << receivers) - 1
    delivered, links = tree.send(fwd, everyone, inner, {})
    assert delivered == {i: 1 for i in range(1, receivers + 1)}
    assert set(links.values()) == {1}
    # every link with a receiver behind it was used, and only those
    assert set(links) == {(p, c) for c, p in tree.parent.items() if tree.below(c)}


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 256), st.integers(0, 30), st.randoms(use_true_random=False), st.data())
def test_a_resend_to_some_receivers_reaches_only_them(receivers, relays, rng, data):
    tree = Tree(receivers, relays, rng)
    fwd = tree.forwarders()
    bits = data.draw(st.integers(1, (1 << receivers) - 1))
    delivered, links = tree.send(fwd, bits, sealed_frame(size=64), {})
    assert delivered == {i: 1 for i in tree.bit if bits & tree.bit[i]}
    assert set(links.values()) <= {1}
    assert set(links) == {(p, c) for c, p in tree.parent.items() if tree.below(c) & bits}


# -- a hostile upstream --------------------------------------------------------------------------

def relay(next_masks=(0b11,), own_bit=0, **kw) -> tuple[Forwarder, bytes, list[bytes]]:
    up = os.urandom(32)
    downs = [os.urandom(32) for _ in next_masks]
    table = ForwardingTable(1, up, tuple(NextHop(f"h{i}", m, k) for i, (m, k) in enumerate(zip(next_masks, downs))),
                            own_bit)
    f = Forwarder(table, **kw)
    f.stream_opened(0)
    return f, up, downs


def feed(f: Forwarder, frame: bytes, stream: int = 0):
    return f.frame_received(stream, *split(frame))


def test_a_flipped_bit_in_the_bitstring_fails_the_hop_mac_and_is_not_forwarded():
    f, up, _ = relay((0b01, 0b10))
    frame = bytearray(wrap(up, 0, 0b01, 1, sealed_frame()))
    frame[PREFIX_LEN + 10] ^= 0b10  # ask for receiver 1 as well
    d = feed(f, bytes(frame))
    assert d.sends == () and not d.local
    assert isinstance(f.next_event(), FrameRejected) and f.frames_rejected == 1


def test_a_changed_inner_header_fails_the_hop_mac():
    f, up, _ = relay()
    inner = bytearray(sealed_frame())
    frame = bytearray(wrap(up, 0, 0b01, 1, bytes(inner)))
    frame[-len(inner) + 24] ^= 1  # the chunk index, inside the inner header
    assert feed(f, bytes(frame)).sends == ()


def test_bits_for_receivers_not_behind_the_node_are_refused_even_with_a_valid_mac():
    f, up, _ = relay((0b0011,))
    d = feed(f, wrap(up, 0, 0b0100, 1, sealed_frame()))
    assert d.sends == ()
    ev = f.next_event()
    assert isinstance(ev, FrameRejected) and "not behind" in ev.reason


def test_a_replayed_hop_frame_ends_the_connection():
    f, up, _ = relay()
    frame = wrap(up, 5, 0b01, 1, sealed_frame())
    assert len(feed(f, frame).sends) == 1
    with pytest.raises(RemoteProtocolError, match="replayed"):
        feed(f, frame)


def test_too_many_rejections_end_the_connection():
    f, _, _ = relay(max_rejects=3)
    forged = wrap(os.urandom(32), 0, 0b01, 1, sealed_frame())
    feed(f, forged)
    feed(f, forged)
    with pytest.raises(RemoteProtocolError, match="rejected"):
        feed(f, forged)


def test_a_frame_on_a_stream_that_never_joined_is_refused():
    f, up, _ = relay()
    with pytest.raises(RemoteProtocolError):
        feed(f, wrap(up, 0, 0b01, 1, sealed_frame()), stream=9)


def test_the_forwarded_copy_carries_the_narrowed_bits_under_the_next_hops_key():
    f, up, downs = relay((0b0011, 0b1100), own_bit=0)
    inner = sealed_frame()
    d = feed(f, wrap(up, 0, 0b0110, 1, inner))
    assert [hop for hop, _ in d.sends] == [0, 1]
    for (hop, head), key, bits in zip(d.sends, downs, (0b0010, 0b0100)):
        nxt = Forwarder(ForwardingTable(1, key, own_bit=bits))
        nxt.stream_opened(0)
        assert feed(nxt, head + inner).local


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 1 << 20))
def test_hostile_hop_bytes_raise_only_the_protocol_error(data, body_len):
    f, _, _ = relay()
    try:
        f.frame_received(0, data, body_len, b"\0" * DATA_HEADER_LEN)
    except RemoteProtocolError:
        pass


def test_tables_that_would_send_a_receiver_two_copies_are_refused():
    k = os.urandom(32)
    with pytest.raises(ConfigError):
        ForwardingTable(1, k, (NextHop("a", 0b011, k), NextHop("b", 0b110, k)))
    with pytest.raises(ConfigError):
        ForwardingTable(1, k, (NextHop("a", 0b01, k),), own_bit=0b01)
    with pytest.raises(ConfigError):
        ForwardingTable(1, k, (NextHop("a", 0x100, k),))
    with pytest.raises(ConfigError):
        ForwardingTable(1, k)


# -- back-pressure and the slow branch -----------------------------------------------------------

def test_a_full_next_hop_holds_upstream_back_then_is_cut_and_restored():
    inner = sealed_frame(size=1000)
    f, up, _ = relay((0b01, 0b10), queue_bytes=2 * len(inner), slow_branch_grace=2.0)
    size = len(inner) + hop_overhead(1)
    seq = 0
    for _ in range(2):
        d = feed(f, wrap(up, seq, 0b11, 1, inner))
        seq += 1
        f.frame_sent(0, size)  # hop 0 keeps up; hop 1 sends nothing
    assert not f.can_read(10.0)  # hop 1 is full: back-pressure
    assert f.get_timer() == 12.0
    assert not f.can_read(11.9)
    assert f.can_read(12.0)  # grace over: hop 1 is cut, the fast sibling goes on
    ev = f.next_event()
    assert isinstance(ev, BranchCut) and ev.name == "h1" and ev.seconds == 2.0
    d = feed(f, wrap(up, seq, 0b11, 1, inner))
    assert [hop for hop, _ in d.sends] == [0]  # no copy for the cut branch
    f.frame_sent(1, size)
    f.frame_sent(1, size)  # hop 1 drained
    ev = f.next_event()
    assert isinstance(ev, BranchRestored) and ev.dropped_frames == 1
    assert [hop for hop, _ in feed(f, wrap(up, seq + 1, 0b11, 1, inner)).sends] == [0, 1]
    stats = f.hop_stats()
    assert stats[1]["dropped"] == 1 and stats[0]["frames"] == 4 and stats[1]["frames"] == 3


def test_a_lost_next_hop_stops_getting_copies_and_does_not_block():
    inner = sealed_frame()
    f, up, _ = relay((0b01, 0b10), queue_bytes=len(inner))
    feed(f, wrap(up, 0, 0b11, 1, inner))
    f.hop_lost(1)
    assert isinstance(f.next_event(), HopLost)
    f.frame_sent(0, len(inner) + hop_overhead(1))
    assert f.can_read(0.0)
    assert [h for h, _ in feed(f, wrap(up, 1, 0b11, 1, inner)).sends] == [0]
    assert f.hop_stats()[1]["state"] == "lost"
