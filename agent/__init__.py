"""dxa: chunked, parallel, resumable, end-to-end encrypted and verified bulk data transfer.

Library use::

    import agent
    result = await agent.copy(["./data"], "dxa://gw2:7400/datasets/x", recursive=True)
    result = agent.copy_sync(["./data"], "dxa://gw2:7400/datasets/x", recursive=True)

The library adds no logging handlers and never reads argv; it reads identity files
from ``home`` (default ``$DXA_HOME`` or ``~/.config/dxa``) only when no ``identity``
is passed.
"""

from __future__ import annotations

__version__ = "0.1.0"

from agent.errors import *  # noqa: E402,F403
from agent.errors import __all__ as _errors_all  # noqa: E402

__all__ = ["__version__", "copy", "copy_sync", "bench", "TransferOptions", "CopyResult", "Client", *_errors_all]


def _identity(identity, home):
    import os

    from agent.store.pki import load_identity

    if identity is not None:
        return identity
    return load_identity(os.path.expanduser(home or os.environ.get("DXA_HOME") or "~/.config/dxa"))


async def copy(sources, dest: str, *, identity=None, home: str | None = None, options=None, progress=None,
               pacer=None, **opts):
    """Copy ``sources`` to ``dest`` (one side ``dxa://HOST:PORT/path``); return a CopyResult.

    Keyword options (``streams``, ``chunk_size``, ``compress``, ``encrypt``, ``cipher``,
    ``recursive``, ``rate`` in bits/s) build a TransferOptions when ``options`` is not given.
    ``pacer=agent.aio.pacing.SharedPacer(rate)`` paces a push at a rate the caller may
    change mid-flight with ``pacer.set_rate(bits_per_second)``, from any thread.  Raises
    ConfigError, PathError, AuthenticationError, BrokenConnectionError, DiskFullError...
    A transfer that ends with files missing returns ``verified=False`` (not an exception).
    """
    from agent.aio.client import copy as _copy
    from agent.config import TransferOptions

    if isinstance(sources, str):
        sources = [sources]
    return await _copy(list(sources), dest, identity=_identity(identity, home),
                       options=options or TransferOptions(**opts), progress=progress, pacer=pacer)


def copy_sync(sources, dest: str, **kw):
    """Blocking wrapper of :func:`copy` (do not call from a running event loop)."""
    import asyncio

    return asyncio.run(copy(sources, dest, **kw))


async def bench(url: str, *, seconds: float = 10.0, identity=None, home: str | None = None, **opts):
    from agent.aio.client import bench as _bench
    from agent.config import TransferOptions

    return await _bench(url, identity=_identity(identity, home), seconds=seconds, options=TransferOptions(**opts))


def __getattr__(name):
    if name == "TransferOptions":
        from agent.config import TransferOptions

        return TransferOptions
    if name == "CopyResult":
        from agent.aio.client import CopyResult

        return CopyResult
    if name == "Client":  # async client of an agent's TransferService (imports grpc only when used)
        from agent.service.client import Client

        return Client
    raise AttributeError(name)
