"""The agent daemon's gRPC TransferService (``dxa serve --grpc HOST:PORT``) over a JobManager.

Each RPC converts the request (:mod:`agent.service.convert`), makes one JobManager call
and converts the answer; WatchTransfer streams the manager's events until the transfer is
final.  It runs on the daemon's event loop, next to the data port, and shares its identity:
mutual TLS with the ``dxa init`` certificates (a client from another CA is refused during
the handshake).  ``clients`` (``dxa serve --client NAME``): when given, only those nodes
(certificate CNs) and the agent itself may call any RPC; others get ``PERMISSION_DENIED``
before anything is read or changed.  Without it every node of the CA may (the default).
Refusals carry trailing metadata ``dxa-error`` (the error class).
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Iterable

import grpc

from agent.errors import ListenError
from agent.service import convert, paging
from agent.service.credentials import bind_server, caller_name
from agent.service.transfers import InvalidTransferError, JobError, JobManager
from agent.store.pki import Identity

__all__ = ["GrpcListenError", "TransferServer", "TransferServicer"]

log = logging.getLogger(__name__)


class GrpcListenError(ListenError):
    """The gRPC server could not bind its address."""


class TransferServicer(convert.TransferServicerBase):
    def __init__(self, manager: JobManager, clients: Iterable[str] | None = None) -> None:
        self.manager = manager
        self.clients = None if clients is None else frozenset(clients) | {manager.identity.name}

    async def _authorize(self, context, rpc: str) -> None:
        if self.clients is None:
            return
        caller = caller_name(context)
        if caller not in self.clients:
            text = (f"node {caller or '(no name)'!r} may not call {rpc} on agent {self.manager.identity.name!r} "
                    f"(its clients: {', '.join(sorted(self.clients))})")
            log.warning("refused: %s", text)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, text,
                                trailing_metadata=(("dxa-error", "PermissionDeniedError"),))

    async def _call(self, context, fn):
        await self._authorize(context, sys._getframe(1).f_code.co_name)  # the RPC calling us
        try:
            answer = fn()
            return await answer if inspect.isawaitable(answer) else answer
        except JobError as exc:
            await context.abort(convert.error_to_status(exc), str(exc),
                                trailing_metadata=(("dxa-error", type(exc).__name__),))

    async def SubmitTransfer(self, request, context):
        async def submit():  # a scheduled job answers once the scheduler has (admitted, queued, refused)
            return convert.transfer_response(
                "submit", await self.manager.submit_settled(*convert.submit_from_request(request)))
        return await self._call(context, submit)

    async def GetTransfer(self, request, context):
        return await self._call(context, lambda: convert.transfer_response(
            "get", self.manager.get(convert.id_from_request(request))))

    async def ListTransfers(self, request, context):
        def list_page():
            page_size, token = convert.list_page_from_request(request)
            try:  # in job-number order: pages neither repeat nor skip while jobs come and go
                rows, next_token = paging.page(self.manager.list(convert.list_from_request(request)),
                                               lambda t: int(t.id[1:]), page_size, token)
            except paging.BadPageTokenError as exc:
                raise InvalidTransferError(str(exc)) from None
            return convert.list_response(rows, next_token)
        return await self._call(context, list_page)

    async def CancelTransfer(self, request, context):
        return await self._call(context, lambda: convert.transfer_response(
            "cancel", self.manager.cancel(convert.id_from_request(request))))

    async def SetRate(self, request, context):
        async def change():
            return convert.transfer_response(
                "set_rate", await self.manager.change_rate(*convert.set_rate_from_request(request)))
        return await self._call(context, change)

    async def WatchTransfer(self, request, context):
        events = await self._call(context, lambda: self.manager.watch(convert.id_from_request(request)))
        try:
            first = await self._call(context, events.__anext__)  # NOT_FOUND is raised here
            yield convert.event_to_proto(first)
            async for ev in events:
                yield convert.event_to_proto(ev)
        finally:
            await events.aclose()


class TransferServer:
    """``await TransferServer(manager, identity, host, port).start()`` → the bound port; ``await stop()``.

    The manager's lifecycle is the caller's (the daemon starts it before and closes it after).
    """

    def __init__(self, manager: JobManager, identity: Identity, host: str = "127.0.0.1", port: int = 0, *,
                 clients: Iterable[str] | None = None) -> None:
        self.manager = manager
        self.clients = clients
        self.identity = identity
        self.host, self.port = host, port
        self._server: grpc.aio.Server | None = None

    async def start(self) -> int:
        servicer = TransferServicer(self.manager, self.clients)
        server, port = bind_server(self.identity, self.host, self.port,
                                   lambda s: convert.add_servicer_to_server(servicer, s), GrpcListenError)
        await server.start()
        self._server, self.port = server, port
        log.info("TransferService (gRPC) listening on %s:%d", self.host, port)
        return port

    async def stop(self, grace: float | None = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None


async def start_daemon_service(listen: str, root: str, db_path: str, identity: Identity, *, scheduler=None,
                               clients: Iterable[str] | None = None, metrics=None
                               ) -> tuple[TransferServer, JobManager]:
    """What ``dxa serve --grpc HOST:PORT`` starts next to the data port: the jobs of ``db_path``
    (unfinished ones resume) and the gRPC server.  Stop with :func:`stop_daemon_service`."""
    from agent.config import parse_host_port

    host, port = parse_host_port(listen, "--grpc")
    manager = JobManager(root, db_path, identity, scheduler=scheduler, metrics=metrics)
    await manager.start()
    server = TransferServer(manager, identity, host, port, clients=clients)
    try:
        await server.start()
    except BaseException:
        await manager.close()
        raise
    return server, manager


async def stop_daemon_service(server: TransferServer, manager: JobManager) -> None:
    """Stop answering, then stop the running copies (they stay unfinished and resume at the next start)."""
    try:
        await server.stop()
    finally:
        await manager.close()
