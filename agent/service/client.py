"""``agent.Client``: an async client of an agent's TransferService, over mutual TLS.

    async with agent.Client("gw1:7401") as c:               # identity from $DXA_HOME
        t = await c.submit("datasets/x", "dxa://gw2:7400/incoming/x", rate=200_000_000, recursive=True)
        async for ev in c.watch(t.id):                       # StateChanged, Progressed, RateChanged
            handle(ev)                                       # your code
        await c.set_rate(t.id, 1_000_000_000)

The agent dialled sends its own data (``source`` is a path under its root) to the
destination agent: a third-party copy when the caller is neither.  Answers are
:class:`~agent.service.transfers.Transfer` objects; a refused call raises
:class:`TransferServiceError` (``code``: the gRPC status, ``kind``: the agent's error class).
The agent's certificate must name the host dialled, or pass ``server_name``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

import grpc

from agent.service import convert
from agent.service.credentials import GrpcCallError, MtlsClient
from agent.service.transfers import InvalidTransferError, JobState, Transfer, TransferEvent, TransferSpec
from agent.store.pki import Identity

__all__ = ["Client", "TransferServiceError"]


class TransferServiceError(GrpcCallError):
    """The agent refused a call, or could not be reached (``code`` UNAVAILABLE)."""


def _error(exc: grpc.aio.AioRpcError) -> TransferServiceError:
    return TransferServiceError(exc.code(), exc.details() or "", GrpcCallError.trailers(exc).get("dxa-error", ""))


class Client(MtlsClient):
    """One channel to an agent's TransferService (``target`` = ``HOST:PORT`` of ``dxa serve --grpc``)."""

    _error = staticmethod(_error)

    def __init__(self, target: str, identity: Identity | None = None, *, home: str | None = None,
                 server_name: str | None = None, timeout: float = 10.0) -> None:
        from agent import _identity

        super().__init__(target, _identity(identity, home), server_name=server_name, timeout=timeout)
        self._stub = convert.transfer_stub(self._channel)

    async def submit(self, source: str, destination: str, *, rate: int = 0, recursive: bool = False,
                     priority: int = 0, request_id: str = "", source_agent: str = "",
                     window_start: float | None = None, window_end: float | None = None,
                     deadline: float | None = None, no_queue: bool = False) -> Transfer:
        """Ask the agent to send ``source`` (under its root) to ``destination`` (``dxa://HOST:PORT/path``).

        ``rate`` in bits/s (0: unlimited), or ``deadline`` (Unix time by which the data must be
        there: the scheduler reserves the volume over the time left).  ``deadline`` and
        ``window_start``/``window_end`` (Unix times) need an agent that uses the scheduler
        (``dxa serve --controller``); a job still running when its window or deadline ends is
        stopped and fails, its partial data kept for a resume.  ``no_queue``: fail at once with
        the earliest start that would fit instead of waiting in the scheduler's queue."""
        spec = TransferSpec(source, destination, rate, priority, recursive, source_agent, window_start, window_end,
                            deadline, no_queue)
        try:
            request = convert.submit_request(spec, request_id)
        except InvalidTransferError as exc:  # refused here as the agent would refuse it
            raise TransferServiceError(grpc.StatusCode.INVALID_ARGUMENT, str(exc), type(exc).__name__) from None
        return convert.transfer_from_response(await self._call(self._stub.SubmitTransfer, request))

    async def get(self, transfer_id: str) -> Transfer:
        return convert.transfer_from_response(
            await self._call(self._stub.GetTransfer, convert.id_request("get", transfer_id)))

    async def list(self, states: Iterable[JobState] | None = None) -> list[Transfer]:
        """Every matching transfer, oldest first (all pages)."""
        states = None if states is None else list(states)
        out: list[Transfer] = []
        token = ""
        while True:
            page, token = await self.list_page(states, page_token=token)
            out += page
            if not token:
                return out

    async def list_page(self, states: Iterable[JobState] | None = None, *, page_size: int = 0,
                        page_token: str = "") -> tuple[list[Transfer], str]:
        """One page: (transfers, the next page's token, "" after the last)."""
        msg = convert.list_request(states, page_size, page_token)
        return convert.list_page_from_response(await self._call(self._stub.ListTransfers, msg))

    async def cancel(self, transfer_id: str) -> Transfer:
        """Stop the transfer; it becomes ``cancelled`` once its copy has stopped (watch to see it)."""
        return convert.transfer_from_response(
            await self._call(self._stub.CancelTransfer, convert.id_request("cancel", transfer_id)))

    async def set_rate(self, transfer_id: str, rate_bps: int) -> Transfer:
        """New pacing rate in bits/s (0 = unlimited), effective at once.  A transfer on a
        reservation changes only if the scheduler admits the new rate (else ``code``
        RESOURCE_EXHAUSTED, ``kind`` ``RateRefusedError``)."""
        return convert.transfer_from_response(
            await self._call(self._stub.SetRate, convert.set_rate_request(transfer_id, rate_bps)))

    async def watch(self, transfer_id: str) -> AsyncIterator[TransferEvent]:
        """The current state and progress, then every event until the transfer is final (no timeout)."""
        call = self._stub.WatchTransfer(convert.id_request("watch", transfer_id))
        try:
            async for msg in call:
                yield convert.event_from_proto(msg)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None
        finally:
            call.cancel()

    async def wait(self, transfer_id: str, *, reconnect_for: float = 120.0) -> Transfer:
        """Until the transfer is final; its last state.  An agent that restarts meanwhile (its
        jobs resume) is waited for: the watch is re-opened while the agent answers
        UNAVAILABLE for at most ``reconnect_for`` seconds in a row."""
        import time

        down_since: float | None = None
        backoff = 0.2
        while True:
            try:
                async for _ in self.watch(transfer_id):
                    down_since, backoff = None, 0.2
                t = await self.get(transfer_id)
                if t.state.final:
                    return t
                # the stream ended without a final state: the agent is shutting down
            except TransferServiceError as exc:
                if exc.code is not grpc.StatusCode.UNAVAILABLE:
                    raise
                now = time.monotonic()
                down_since = now if down_since is None else down_since
                if now - down_since >= reconnect_for:
                    raise
            await asyncio.sleep(backoff)
            backoff = min(2.0, backoff * 2)
