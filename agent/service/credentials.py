"""gRPC credentials from a ``dxa init`` identity: mutual TLS, the CA as the only trust anchor.

Shared by every gRPC server and client of dxa (the agent's TransferService and the
scheduler's ControllerService), so both refuse a peer whose certificate another CA
signed during the handshake.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from agent.errors import ConfigError, DxaError, ListenError
from agent.store.pki import Identity

__all__ = ["GrpcCallError", "MtlsClient", "bind_server", "caller_name", "channel_credentials",
           "server_credentials"]


def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None


def server_credentials(identity: Identity) -> grpc.ServerCredentials:
    """Mutual TLS: our certificate and key; clients must present one signed by our CA."""
    return grpc.ssl_server_credentials([(_read(identity.key), _read(identity.cert))],
                                       root_certificates=_read(identity.ca_cert), require_client_auth=True)


def bind_server(identity: Identity, host: str, port: int, add_servicer, error: type[ListenError] = ListenError
                ) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server with ``add_servicer(server)`` applied, bound with mutual TLS to
    host:port (not started); its bound port.  No SO_REUSEPORT: a second server on the same
    port must fail, not share it.  A bind that fails raises ``error``."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    add_servicer(server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, server_credentials(identity))
    except RuntimeError as exc:
        raise error(f"cannot listen on {address}: {exc}") from None
    if not bound:
        raise error(f"cannot listen on {address}")
    return server, bound


def channel_credentials(identity: Identity) -> grpc.ChannelCredentials:
    """Our certificate and key for the server to check; the server must be signed by our CA."""
    return grpc.ssl_channel_credentials(root_certificates=_read(identity.ca_cert), private_key=_read(identity.key),
                                        certificate_chain=_read(identity.cert))


class GrpcCallError(DxaError):
    """A dxa gRPC service refused a call, or could not be reached (``code`` UNAVAILABLE).

    ``kind`` is the service's own error class (the ``dxa-error`` trailer)."""

    def __init__(self, code: grpc.StatusCode, details: str, kind: str = "") -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details
        self.kind = kind

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"

    @staticmethod
    def trailers(exc: grpc.aio.AioRpcError) -> dict[str, str]:
        return {k: v for k, v in (exc.trailing_metadata() or ())}


class MtlsClient:
    """What every dxa gRPC client shares: one mutual-TLS channel, ``async with``, a
    per-call timeout, and gRPC errors turned into the subclass's typed error by
    ``_error(exc)``.  Subclasses set ``self._stub`` from ``self._channel``."""

    def __init__(self, target: str, identity: Identity, *, server_name: str | None = None,
                 timeout: float = 10.0) -> None:
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        # gRPC's default reconnect backoff grows to 120 s: a daemon whose scheduler restarted
        # would miss its lease.  Retry a lost connection within a second instead.
        options += [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                    ("grpc.max_reconnect_backoff_ms", 1000)]
        self.timeout = timeout
        self._channel = grpc.aio.secure_channel(target, channel_credentials(identity), options=options)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    @staticmethod
    def _error(exc: grpc.aio.AioRpcError) -> Exception:
        raise NotImplementedError

    async def _call(self, method, request):
        try:
            return await method(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None


def caller_name(context) -> str:
    """The node name (certificate CN) of a gRPC caller whose certificate the handshake
    verified; "" if it has none.  Both services authorize by it."""
    names = context.auth_context().get("x509_common_name") or ()
    try:
        return names[0].decode() if names else ""
    except UnicodeDecodeError:
        return ""
