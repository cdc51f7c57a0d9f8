"""The aggregate pacer (agent/core/pacer.py) with injected time: no clock, no sleeps."""

from __future__ import annotations

import heapq
import math
import random

import pytest

from agent.config import parse_rate
from agent.core.pacer import Pacer, check_rate
from agent.errors import ConfigError

MIB = 1 << 20


def simulate(pacer: Pacer, *, streams: int, chunk: int, seconds: float, quantum: int | None = None,
             jitter: float = 0.0, seed: int = 1, rate_changes: dict[float, float] | None = None, burst_of=None):
    """``streams`` pumps, each: take a chunk, and for every slice of at most ``quantum`` bytes
    reserve it, sleep the delay (waking up to ``jitter`` s late), send it; repeat.

    A rate change wakes the sleeping pumps, which ask again with their ticket (what the
    adapter in agent/aio/pacing.py does).  ``rate_changes`` maps times to rates (bits/s);
    ``burst_of(rate)`` gives the burst for a new rate.  Returns the (time, bytes) of every
    send, in time order.
    """
    q = quantum or chunk
    rng = random.Random(seed)
    heap: list = []
    seq = 0

    def push(t, kind, stream=-1, version=0, arg=None):
        nonlocal seq
        seq += 1
        heapq.heappush(heap, (t, 0 if kind == "rate" else 1, seq, kind, stream, version, arg))

    remaining = [0] * streams
    waiting: dict[int, tuple] = {}  # stream -> (ticket, n, lateness, version)
    version = [0] * streams
    for s in range(streams):
        push(0.0, "ask", s)
    for at, r in (rate_changes or {}).items():
        push(at, "rate", arg=r)
    sends = []
    while heap:
        t, _, _, kind, s, ver, arg = heapq.heappop(heap)
        if t > seconds:
            break
        if kind == "rate":
            pacer.set_rate(arg, t, burst_of(arg) if burst_of else None)
            for s2, (ticket, n, late, _v) in list(waiting.items()):
                version[s2] += 1
                waiting[s2] = (ticket, n, late, version[s2])
                push(t + pacer.wait_time(ticket, t) + late, "send", s2, version[s2])
        elif kind == "ask":
            if remaining[s] == 0:
                remaining[s] = chunk
            n = min(q, remaining[s])
            ticket = pacer.take(n, t)
            late = rng.random() * jitter
            version[s] += 1
            waiting[s] = (ticket, n, late, version[s])
            push(t + pacer.wait_time(ticket, t) + late, "send", s, version[s])
        elif kind == "send" and ver == version[s]:
            _ticket, n, _late, _v = waiting.pop(s)
            sends.append((t, n))
            remaining[s] -= n
            push(t, "ask", s)
    return sends


def max_window(sends, width: float = 1.0) -> float:
    """Most bytes sent in any window [t, t + width) (windows start at a send)."""
    best = 0.0
    j = 0
    total = 0.0
    for i, (t, _n) in enumerate(sends):
        while j < len(sends) and sends[j][0] < t + width:
            total += sends[j][1]
            j += 1
        best = max(best, total)
        total -= sends[i][1]
    return best


def sent_between(sends, a: float, b: float) -> float:
    return sum(n for t, n in sends if a <= t < b)


# -- long-run accuracy ---------------------------------------------------------------------
@pytest.mark.parametrize("rate,streams,chunk,quantum", [
    (200e6, 4, 4 * MIB, None), (200e6, 4, 4 * MIB, 128 << 10), (500e6, 8, 4 * MIB, 256 << 10),
    (1e9, 16, MIB, None), (10e6, 2, 64 << 10, 16 << 10), (100e9, 4, 64 * MIB, 8 * MIB)])
def test_long_run_average_is_exactly_the_rate(rate, streams, chunk, quantum):
    p = Pacer(rate, burst_bytes=rate / 8 * 0.02, now=0.0)
    seconds = 100.0
    sends = simulate(p, streams=streams, chunk=chunk, seconds=seconds, quantum=quantum)
    total = sum(n for _t, n in sends)
    q = quantum or chunk
    # never ahead of the rate, and behind by less than one slice per stream (being paid for)
    assert total <= rate / 8 * seconds + 1e-6
    assert total >= rate / 8 * seconds - streams * q
    # a slice is paid before it goes: any 1 s holds at most rate + burst + the slice at its start
    assert max_window(sends) <= rate / 8 * 1.0 + p.burst_bytes + q + 1e-6
    if quantum:
        assert max_window(sends) <= rate / 8 * 1.05


def test_late_wakeups_are_made_up_within_the_burst_only():
    rate = 200e6
    burst = rate / 8 * 0.04
    p = Pacer(rate, burst, 0.0)
    # pumps wake up to 30 ms late: the burst credit absorbs it, the average holds
    sends = simulate(p, streams=4, chunk=MIB, seconds=60.0, quantum=64 << 10, jitter=0.020, seed=7)
    total = sum(n for _t, n in sends)
    assert abs(total - rate / 8 * 60) / (rate / 8 * 60) < 0.01
    assert max_window(sends) <= rate / 8 * 1.05


@pytest.mark.parametrize("seed", range(5))
def test_no_one_second_window_above_105_percent_with_jitter(seed):
    rate = 500e6
    p = Pacer(rate, rate / 8 * 0.02, 0.0)
    # 4 MiB chunks sent in 128 KiB slices (as SendPump does), pumps waking up to 10 ms late
    sends = simulate(p, streams=8, chunk=4 * MIB, seconds=30.0, quantum=128 << 10, jitter=0.01, seed=seed)
    assert max_window(sends) <= rate / 8 * 1.05
    assert sent_between(sends, 1, 30) >= rate / 8 * 29 * 0.98


def test_burst_is_bounded_after_idle():
    p = Pacer(80e6, burst_bytes=100_000, now=0.0)  # 10 MB/s
    assert p.reserve(1_000_000, 0.0) == pytest.approx(0.1)  # starts empty: pays first
    # an hour idle leaves only the burst as credit
    assert p.reserve(100_000, 3600.0) == 0.0
    assert p.reserve(1, 3600.0) == pytest.approx(1e-7)
    assert p.reserve(999_999, 3600.0) == pytest.approx(0.1)


def test_grants_in_a_window_never_exceed_rate_times_window_plus_burst():
    p = Pacer(80e6, burst_bytes=50_000, now=0.0)
    rng = random.Random(3)
    t = 0.0
    grants = []
    for _ in range(20_000):
        t += rng.expovariate(1000)  # callers at random times, often idle, often eager
        n = rng.choice([1, 1000, 30_000, 200_000])
        d = p.reserve(n, t)
        grants.append((t + d, n))
    grants.sort()
    # a reservation is fully paid before it goes: bytes granted in [a, a+1) <= rate + burst
    # + the one reservation whose payment ended at a
    assert max_window(grants) <= 10e6 + 50_000 + 200_000 + 1e-6


# -- rate changes ------------------------------------------------------------------------------
def test_rate_decrease_takes_effect_at_once_without_stale_burst():
    r1, r2 = 1e9, 100e6
    burst_of = lambda r: r / 8 * 0.02
    p = Pacer(r1, burst_of(r1), 0.0)
    sends = simulate(p, streams=4, chunk=MIB, seconds=20.0, quantum=64 << 10, rate_changes={10.0: r2},
                     burst_of=burst_of)
    before = sent_between(sends, 5, 10) / 5
    after = sent_between(sends, 10.5, 20) / 9.5
    assert before == pytest.approx(r1 / 8, rel=0.02)
    assert after == pytest.approx(r2 / 8, rel=0.02)
    # at once: the first second after the change already holds the new rate
    assert max_window([s for s in sends if s[0] >= 10.0]) <= r2 / 8 * 1.05


def test_rate_increase_takes_effect_at_once_without_catch_up():
    r1, r2 = 10e6, 800e6
    p = Pacer(r1, r1 / 8 * 0.02, 0.0)
    # 4 MiB chunks at 10 Mbit/s: pumps wait seconds; they must be re-timed at the change
    sends = simulate(p, streams=4, chunk=4 * MIB, seconds=20.0, quantum=64 << 10, rate_changes={10.0: r2},
                     burst_of=lambda r: r / 8 * 0.02)
    after = sent_between(sends, 10.0, 11.0)
    assert after == pytest.approx(r2 / 8, rel=0.06)
    assert after <= r2 / 8 * 1.05
    assert sent_between(sends, 11, 20) / 9 == pytest.approx(r2 / 8, rel=0.01)


def test_waiting_reservation_is_retimed_by_a_rate_change():
    p = Pacer(8e6, 0, 0.0)  # 1 MB/s
    ticket = p.take(10_000_000, 0.0)
    assert p.wait_time(ticket, 0.0) == pytest.approx(10.0)
    p.set_rate(80e6, 1.0)  # 10 MB/s from t=1: 1 MB paid, 9 MB left at 10 MB/s
    assert p.wait_time(ticket, 1.0) == pytest.approx(0.9)
    p.set_rate(8e6, 1.5)  # back to 1 MB/s with 4 MB left
    assert p.wait_time(ticket, 1.5) == pytest.approx(4.0)


def test_increase_after_an_under_run_gives_no_catch_up():
    p = Pacer(80e6, 10_000, 0.0)
    p.reserve(1000, 0.0)
    # nobody asked for 50 s; then the rate doubles: only the burst is available
    p.set_rate(160e6, 50.0)
    assert p.reserve(10_000, 50.0) == 0.0
    assert p.reserve(20_000_000, 50.0) == pytest.approx(1.0)


def test_decrease_drops_credit_above_the_new_burst():
    p = Pacer(8e9, 100_000_000, 0.0)
    # idle: 100 MB of credit at 1 GB/s; the rate drops to 1 MB/s with a 10 kB burst
    p.set_rate(8e6, 10.0, burst_bytes=10_000)
    assert p.reserve(10_000, 10.0) == 0.0
    assert p.reserve(1_000_000, 10.0) == pytest.approx(1.0)


def test_debt_is_not_forgiven_by_a_rate_change():
    p = Pacer(8e6, 0, 0.0)
    p.reserve(5_000_000, 0.0)  # due at 5 s
    p.set_rate(16e6, 1.0)  # 1 MB paid, 4 MB owed at 2 MB/s: due at 3 s
    assert p.reserve(2_000_000, 1.0) == pytest.approx(3.0)


# -- unlimited and edge cases --------------------------------------------------------------------
def test_rate_zero_is_unlimited_and_can_be_switched_on_and_off():
    p = Pacer(0, 0, 0.0)
    assert all(p.reserve(64 * MIB, 0.0) == 0.0 for _ in range(100))
    p.set_rate(8e6, 1.0, burst_bytes=0)  # 1 MB/s from now, nothing owed from the unlimited time
    assert p.reserve(1_000_000, 1.0) == pytest.approx(1.0)
    t = p.take(1_000_000, 1.0)
    assert p.wait_time(t, 1.0) == pytest.approx(2.0)
    p.set_rate(0, 1.5)  # back to unlimited: waiters go at once
    assert p.wait_time(t, 1.5) == 0.0
    assert p.rate_bps == 0


def test_huge_chunk_at_a_tiny_rate():
    p = Pacer(8000, 0, 0.0)  # 1 kB/s
    assert p.reserve(64 * MIB, 0.0) == pytest.approx(64 * MIB / 1000)
    assert p.reserve(1, 0.0) == pytest.approx(64 * MIB / 1000 + 0.001)
    assert math.isfinite(p.reserve(1 << 40, 0.0))


def test_zero_byte_reservation_costs_nothing_and_clock_going_back_is_harmless():
    p = Pacer(8e6, 0, 10.0)
    assert p.reserve(0, 10.0) == 0.0
    assert p.reserve(1_000_000, 10.0) == pytest.approx(1.0)
    assert p.reserve(1_000_000, 9.0) == pytest.approx(2.0)  # treated as 10.0


@pytest.mark.parametrize("bad", [-1, -0.5, float("nan"), float("inf"), "200M", None, True])
def test_invalid_rates_are_config_errors(bad):
    with pytest.raises(ConfigError):
        Pacer(bad, 0, 0.0)
    p = Pacer(8e6, 0, 0.0)
    with pytest.raises(ConfigError):
        p.set_rate(bad, 1.0)
    assert p.rate_bps == 8e6  # unchanged
    with pytest.raises(ConfigError):
        check_rate(bad)


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "1M"])
def test_invalid_bursts_are_config_errors(bad):
    with pytest.raises(ConfigError):
        Pacer(8e6, bad, 0.0)
    with pytest.raises(ConfigError):
        Pacer(8e6, 0, 0.0).set_rate(8e6, 1.0, burst_bytes=bad)


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "10", None])
def test_invalid_reservations_are_refused(bad):
    with pytest.raises(ValueError):
        Pacer(8e6, 0, 0.0).reserve(bad, 0.0)


@pytest.mark.parametrize("bad", ["nan", "inf", "-1M", "fast"])
def test_parse_rate_refuses_what_the_pacer_cannot_use(bad):
    with pytest.raises(ConfigError):
        parse_rate(bad)


def test_parse_rate_reads_bits_and_refuses_bytes():
    assert [parse_rate(t) for t in ("200M", "1.5G", "1Gbps", "20Mb", "800k", "100")] == [
        200_000_000, 1_500_000_000, 10**9, 20_000_000, 800_000, 100]
    for ambiguous in ("20MB", "20MB/s", "100MBps", "1GB"):  # bytes: refused with the conversion
        with pytest.raises(ConfigError, match="multiply by 8"):
            parse_rate(ambiguous)
