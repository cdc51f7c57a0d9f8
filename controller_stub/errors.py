"""Errors of the scheduler, all under dxa's one root (:class:`agent.errors.DxaError`).

Exceptions carry facts as attributes; the CLI or the gRPC servicer turns them into
messages and status codes.
"""

from __future__ import annotations

from agent.errors import ConfigError, DxaError, StorageError

__all__ = [
    "LedgerError",
    "UnknownAgentError",
    "UnknownLinkError",
    "UnknownReservationError",
    "NoRouteError",
    "LeaseExpiredError",
    "InvalidRequestError",
    "InvalidPathError",
    "DeadlineUnreachableError",
    "RateAboveCapacityError",
    "InsufficientCapacityError",
    "InvalidTransitionError",
    "TopologyError",
    "LedgerStoreError",
    "PermissionDeniedError",
]


class LedgerError(DxaError):
    """The reservation ledger refused an operation."""


class UnknownAgentError(LedgerError, LookupError):
    """No agent of that name ever registered."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class UnknownLinkError(LedgerError, LookupError):
    """A path names a link the ledger does not know."""

    def __init__(self, link: str) -> None:
        super().__init__(link)
        self.link = link


class UnknownReservationError(LedgerError, LookupError):
    """No reservation has that id."""

    def __init__(self, reservation_id: str) -> None:
        super().__init__(reservation_id)
        self.reservation_id = reservation_id


class NoRouteError(LedgerError):
    """No chain of links leads from the source agent to the destination agent."""

    def __init__(self, source: str, destination: str) -> None:
        super().__init__(source, destination)
        self.source = source
        self.destination = destination


class LeaseExpiredError(LedgerError):
    """The agent stopped heart-beating and lost its lease; it must register again."""

    def __init__(self, name: str, expired_at: float) -> None:
        super().__init__(name, expired_at)
        self.name = name
        self.expired_at = expired_at


class InvalidRequestError(LedgerError, ValueError):
    """A request is malformed: no rate and no deadline, an empty window, a rate of zero..."""

    def __str__(self) -> str:
        return ": ".join(str(a) for a in self.args)


class InvalidPathError(InvalidRequestError):
    """An explicit path does not lead, link after link, from the source to the destination."""


class DeadlineUnreachableError(InvalidRequestError):
    """The finish-by time is already past, or too close for the volume at any admissible rate."""

    def __init__(self, finish_by: float, now: float) -> None:
        super().__init__(finish_by, now)
        self.finish_by = finish_by
        self.now = now

    def __str__(self) -> str:
        return "the window's end is already past, or too close for the volume at the rate"


class RateAboveCapacityError(LedgerError, ValueError):
    """The rate asked for exceeds the capacity of a link on the path: it could never fit."""

    def __init__(self, rate_bps: int, link: str, capacity_bps: int) -> None:
        super().__init__(rate_bps, link, capacity_bps)
        self.rate_bps = rate_bps
        self.link = link
        self.capacity_bps = capacity_bps


class InsufficientCapacityError(LedgerError):
    """A rate change does not fit: ``available_bps`` is the most the reservation could get."""

    def __init__(self, reservation_id: str, rate_bps: int, available_bps: int) -> None:
        super().__init__(reservation_id, rate_bps, available_bps)
        self.reservation_id = reservation_id
        self.rate_bps = rate_bps
        self.available_bps = available_bps


class InvalidTransitionError(LedgerError):
    """The reservation's state does not allow that step (e.g. starting a released one)."""

    def __init__(self, reservation_id: str, state: str, action: str) -> None:
        super().__init__(reservation_id, state, action)
        self.reservation_id = reservation_id
        self.state = state
        self.action = action


class TopologyError(ConfigError):
    """The topology file is malformed or inconsistent (also a ValueError)."""


class LedgerStoreError(StorageError):
    """The scheduler's SQLite database could not be read or written."""


class PermissionDeniedError(DxaError):
    """The caller may not do that: it is not the agent it names, nor a source or destination
    of the reservation, nor an admin.  Not a ledger error: the ledger was never asked.

    ``caller`` is the common name of the caller's certificate (its node name; ``""`` when
    the certificate has none), ``action`` the RPC it called (``"ChangeRate"``); ``agent``
    is the name it gave (RegisterAgent, Heartbeat), ``reservation_id`` the reservation it
    named, ``source`` and ``destination`` the parties it is not.
    """

    def __init__(self, caller: str, action: str, *, agent: str = "", reservation_id: str = "",
                 source: str = "", destination: str = "") -> None:
        super().__init__(caller, action, agent or reservation_id or f"{source}->{destination}")
        self.caller = caller
        self.action = action
        self.agent = agent
        self.reservation_id = reservation_id
        self.source = source
        self.destination = destination
