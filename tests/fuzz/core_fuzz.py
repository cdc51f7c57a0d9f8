"""Drive a sans-I/O core with hostile bytes: the harness of test_cores.py, for any core.

A core does not read sockets: its adapter splits the control stream with
``FrameDecoder``, decodes each frame with the real decoders and hands the message
(or, for DATA, the header) to the core.  A *driver* plays that adapter for one core:

    class MyDriver(CoreDriver):
        def new(self):                      # a fresh core, in the state the test wants
            ...
        def deliver(self, core, ftype, body, now):
            ...                             # decode as the adapter does, call the core,
                                            # play the adapter's side (store, pumps)
        def outputs(self, core):            # what the core said: plain, comparable data
            ...

``feed(driver, pieces)`` runs the pieces through a FrameDecoder into a new core and
returns a :class:`Transcript`: everything the core said after each frame, the error that
ended the run (only an allowed one; any other exception propagates, so the test fails
and Hypothesis shrinks the input) and the core itself, for checks of what it holds.
``assert_split_invariant(driver, data, cuts)`` feeds the same bytes whole, one byte at a
time and cut at ``cuts``, and asserts the three transcripts are equal (h11's
fuzz/afl-server.py does the same).  ``peak_memory(fn)`` measures what a call allocates.

A forwarder core gets the same treatment with a driver of its own: ``new`` builds it,
``deliver`` routes a frame to it the way its adapter will, ``outputs`` lists what it
forwards and answers.
"""

from __future__ import annotations

import tracemalloc
from dataclasses import dataclass, field

from agent.errors import RemoteProtocolError
from agent.wire import CONTROL_MAX, PREFIX_LEN, FrameDecoder, FrameType, decode_message, encode_message

__all__ = ["CoreDriver", "Transcript", "feed", "assert_split_invariant", "peak_memory", "splits",
           "check_sendable"]

TICK = 0.01  # "now" advances this much per frame, whatever the pieces: the same input gives the same times


class CoreDriver:
    """Base of a driver; ``allowed`` is what hostile input may raise out of the core."""

    allowed: tuple[type[BaseException], ...] = (RemoteProtocolError,)
    limit: int = CONTROL_MAX  # the FrameDecoder's body limit, as the adapter sets it

    def new(self):
        raise NotImplementedError

    def start(self, core) -> list:
        """What the core says before any input (a sender's first MANIFEST)."""
        return self.outputs(core)

    def deliver(self, core, ftype: FrameType, body: bytes, now: float) -> None:
        raise NotImplementedError

    def outputs(self, core) -> list:
        raise NotImplementedError


@dataclass
class Transcript:
    said: list = field(default_factory=list)
    error: tuple[type, str] | None = None
    frames: int = 0
    core: object = field(default=None, compare=False, repr=False)


def feed(driver: CoreDriver, pieces) -> Transcript:
    core = driver.new()
    out = Transcript(core=core)
    out.said.append(driver.start(core))
    dec = FrameDecoder(driver.limit)
    try:
        for piece in pieces:
            dec.feed(piece)
            for ftype, body in dec.frames():
                out.frames += 1
                driver.deliver(core, ftype, body, out.frames * TICK)
                out.said.append(driver.outputs(core))
    except driver.allowed as exc:
        out.error = (type(exc), str(exc))
        out.said.append(driver.outputs(core))  # what it queued before it gave up is still comparable
    return out


def splits(data: bytes, cuts) -> list[bytes]:
    bounds = [0, *sorted(c for c in cuts if 0 <= c <= len(data)), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def assert_split_invariant(driver: CoreDriver, data: bytes, cuts=()) -> Transcript:
    """Whole, byte by byte and cut at ``cuts``: the core must say exactly the same."""
    whole = feed(driver, [data])
    assert feed(driver, [data[i : i + 1] for i in range(len(data))]) == whole
    assert feed(driver, splits(data, cuts)) == whole
    return whole


def check_sendable(msgs) -> list[str]:
    """Everything a core hands out must go through the real codec and come back equal."""
    out = []
    for m in msgs:
        frame = encode_message(m)
        assert len(frame) - PREFIX_LEN <= CONTROL_MAX, f"{type(m).__name__} of {len(frame)} bytes cannot be sent"
        assert decode_message(FrameType(frame[3]), frame[PREFIX_LEN:]) == m
        out.append(repr(m))
    return out


def peak_memory(fn, *args):
    """(result or the exception raised, peak bytes traced) of ``fn(*args)``."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        try:
            result = fn(*args)
        except Exception as exc:  # the caller asserts which one
            result = exc
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
