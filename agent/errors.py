"""The one exception hierarchy of dxa.

Rules: every error dxa raises on purpose derives from :class:`DxaError`.
Protocol errors are split by who is at fault (h11 style); "you closed it" is
distinct from "it broke" (trio style).  Messages for people are formatted by
the CLI, not here: exceptions carry facts as attributes.
"""

from __future__ import annotations

__all__ = [
    "ListenError",
    "DxaError",
    "ConfigError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "IntegrityError",
    "AuthenticationError",
    "PathError",
    "TransferError",
    "ClosedResourceError",
    "BrokenConnectionError",
    "ConnectError",
    "StorageError",
    "DiskFullError",
]


class DxaError(Exception):
    """Root of every error dxa raises on purpose."""


class ConfigError(DxaError, ValueError):
    """A configuration value or a command-line argument is invalid."""


class ProtocolError(DxaError):
    """The peer conversation broke the rules of docs/PROTOCOL.md."""


class LocalProtocolError(ProtocolError):
    """We were about to break the protocol (a bug on our side or bad API use)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed, oversized, unknown or out of order."""


class IntegrityError(DxaError):
    """An AEAD tag, a keyed tag or a BLAKE3 digest did not match."""


class AuthenticationError(DxaError):
    """The peer could not prove who it is (TLS, or a data-stream join token)."""


class PathError(DxaError, ValueError):
    """A path escapes the root, crosses a symlink, or is otherwise refused."""


class TransferError(DxaError):
    """A transfer ended without every file arriving verified."""


class ClosedResourceError(DxaError):
    """Used after *we* closed it."""


class BrokenConnectionError(DxaError):
    """The connection broke under us (reset, EOF mid-frame, timeout)."""


class ConnectError(BrokenConnectionError):
    """The peer could not be reached at all (unknown host, nothing listening, no answer):
    nothing was started, so there is nothing to resume."""


class ListenError(DxaError):
    """A daemon could not bind one of its listening addresses (data, gRPC, metrics)."""


class StorageError(DxaError, OSError):
    """Reading or writing local files failed."""


class DiskFullError(StorageError):
    """No space left on the destination device (ENOSPC / EDQUOT)."""
