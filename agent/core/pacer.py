"""Sans-I/O pacer: one aggregate token bucket shared by all streams of a transfer.

The bucket is kept as a schedule of byte *positions*: every byte ever reserved has a
position (0, 1, 2, ... in reservation order) and position ``p`` may leave at
``t0 + (p - p0) / rate``.  A reservation of ``n`` bytes is paid before it is sent: the
caller waits until the *end* of its bytes is due.  Unused credit (a caller that could
not keep up, or an idle transfer) is capped at ``burst`` bytes, so in any window of
``T`` seconds at most ``rate * T + burst`` bytes are granted, and over a long run the
grants follow ``rate`` exactly (the bucket starts empty).

A rate change rebases the schedule at ``now``: credit above the new burst is dropped
(no stale burst after a decrease), nothing owed from before is forgiven and no
under-run is made up (no catch-up burst after an increase), and reservations already
waiting are re-timed at the new rate when their holder asks again
(:meth:`Pacer.wait_time` with the ticket from :meth:`Pacer.take`).

No clock, no I/O, no locks: time comes in as ``now`` (seconds, monotonic), and the
adapter (agent/aio/pacing.py) serialises calls with a lock.
"""

from __future__ import annotations

import math

from agent.errors import ConfigError

__all__ = ["Pacer", "check_rate"]


def check_rate(rate_bps) -> float:
    """A rate in bits/s: a finite number >= 0 (0 = unlimited), else ConfigError."""
    if isinstance(rate_bps, bool) or not isinstance(rate_bps, (int, float)):
        raise ConfigError(f"rate must be a number of bits per second, not {type(rate_bps).__name__}")
    if math.isnan(rate_bps) or math.isinf(rate_bps) or rate_bps < 0:
        raise ConfigError(f"rate must be a finite number >= 0 bits/s (0 = unlimited), not {rate_bps!r}")
    return float(rate_bps)


def _check_burst(burst_bytes) -> float:
    if isinstance(burst_bytes, bool) or not isinstance(burst_bytes, (int, float)) \
            or math.isnan(burst_bytes) or math.isinf(burst_bytes) or burst_bytes < 0:
        raise ConfigError(f"burst must be a finite number of bytes >= 0, not {burst_bytes!r}")
    return float(burst_bytes)


class Pacer:
    """``Pacer(rate_bps, burst_bytes, now)``; ``reserve(n, now)`` → seconds to wait before sending."""

    __slots__ = ("_burst", "_last", "_p0", "_rate", "_reserved", "_t0")

    def __init__(self, rate_bps: float, burst_bytes: float, now: float) -> None:
        self._rate = check_rate(rate_bps) / 8.0  # bytes per second; 0 = unlimited
        self._burst = _check_burst(burst_bytes)
        self._reserved = 0.0  # position after the last reserved byte
        self._t0 = float(now)  # the schedule: position _p0 is due at _t0
        self._p0 = 0.0  # bucket starts empty: no credit at the start
        self._last = float(now)

    # -- inspection ----------------------------------------------------------------------
    @property
    def rate_bps(self) -> float:
        return self._rate * 8.0

    @property
    def burst_bytes(self) -> float:
        return self._burst

    @property
    def reserved_bytes(self) -> float:
        """Bytes reserved since the pacer was made."""
        return self._reserved

    # -- the schedule ----------------------------------------------------------------------
    def _now(self, now: float) -> float:
        # a clock that steps back (another thread read it earlier) counts as no time passing
        if now < self._last:
            return self._last
        self._last = now
        return now

    def _paid(self, now: float) -> float:
        """Position paid for by ``now``, credit capped at ``burst`` above what was reserved."""
        return min(self._p0 + (now - self._t0) * self._rate, self._reserved + self._burst)

    def _rebase(self, now: float) -> None:
        self._p0 = self._paid(now)
        self._t0 = now

    def take(self, nbytes: int, now: float) -> float:
        """Reserve ``nbytes``; returns a ticket for :meth:`wait_time`."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, (int, float)) or not nbytes >= 0 \
                or math.isinf(nbytes):
            raise ValueError(f"cannot reserve {nbytes!r} bytes")
        now = self._now(now)
        # idle credit beyond the burst is lost: rebase so that the cap sticks
        if self._rate and self._p0 + (now - self._t0) * self._rate > self._reserved + self._burst:
            self._rebase(now)
        self._reserved += nbytes
        return self._reserved

    def wait_time(self, ticket: float, now: float) -> float:
        """Seconds until the reservation with this ticket may be sent (0: now), at the current rate."""
        now = self._now(now)
        if not self._rate:
            return 0.0
        due = self._t0 + (ticket - self._p0) / self._rate
        return max(0.0, due - now)

    def reserve(self, nbytes: int, now: float) -> float:
        """Reserve ``nbytes`` and return how long the caller must wait before sending them."""
        return self.wait_time(self.take(nbytes, now), now)

    def set_rate(self, rate_bps: float, now: float, burst_bytes: float | None = None) -> None:
        """Change the rate (and optionally the burst) from ``now`` on."""
        rate = check_rate(rate_bps) / 8.0
        burst = self._burst if burst_bytes is None else _check_burst(burst_bytes)
        now = self._now(now)
        if self._rate:
            self._rebase(now)  # settle what the old rate paid for up to now
            self._burst = burst
            # no stale burst: credit is capped by the new burst at once
            self._p0 = min(self._p0, self._reserved + burst)
        else:
            # from unlimited: everything reserved so far counts as sent, start with no credit
            self._burst = burst
            self._t0, self._p0 = now, self._reserved
        self._rate = rate
