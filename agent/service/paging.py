"""Paging for the List RPCs (ListTransfers, the scheduler's ListReservations).

Pure functions, no I/O.  A page is the items after a position in a stable order (a job's
number, a reservation's sequence number: both only grow and are never reused), so paging
through a list that changes in between never repeats an item nor skips one that was
there all along; an item added meanwhile shows up on a later page, one pruned meanwhile
is simply gone.  The token is opaque to clients (``v1.<position>``, URL-safe base64);
one that does not decode is refused with :class:`BadPageTokenError`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = ["DEFAULT_PAGE_SIZE", "MAX_PAGE_SIZE", "BadPageTokenError", "page", "page_token", "position"]

T = TypeVar("T")

DEFAULT_PAGE_SIZE = 500
"""Items per page when the caller asks for none (page_size 0)."""
MAX_PAGE_SIZE = 5000
"""A larger page_size is served as this many: one answer stays a few MB at most."""


class BadPageTokenError(ValueError):
    """A page token this server did not hand out."""


def page_token(pos: int) -> str:
    return base64.urlsafe_b64encode(f"v1.{pos}".encode()).decode().rstrip("=")


def position(token: str) -> int:
    """The position a token stands for (items after it come next); "" is the start, -1."""
    if not token:
        return -1
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii")
        version, _, number = text.partition(".")
        pos = int(number)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadPageTokenError(f"invalid page token {token[:40]!r}") from None
    if version != "v1" or pos < 0 or not number.isdigit():
        raise BadPageTokenError(f"invalid page token {token[:40]!r}")
    return pos


def page(items: Sequence[T], key: Callable[[T], int], page_size: int, token: str) -> tuple[list[T], str]:
    """(one page of ``items`` after ``token``, the next page's token or "" after the last).

    ``items`` must be sorted by ``key`` (a non-negative integer, unique per item)."""
    after = position(token)
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    rest = [x for x in items if key(x) > after]
    out = rest[:size]
    return out, (page_token(key(out[-1])) if len(rest) > size else "")
