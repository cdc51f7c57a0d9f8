"""gRPC credentials from a ``dxa init`` identity: mutual TLS, the CA as the only trust anchor.

Shared by every gRPC server and client of dxa (the agent's TransferService and the
scheduler's ControllerService), so both refuse a peer whose certificate another CA
signed during the handshake.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from agent.errors import ConfigError
from agent.store.pki import Identity

__all__ = ["channel_credentials", "server_credentials"]


def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None


def server_credentials(identity: Identity) -> grpc.ServerCredentials:
    """Mutual TLS: our certificate and key; clients must present one signed by our CA."""
    return grpc.ssl_server_credentials([(_read(identity.key), _read(identity.cert))],
                                       root_certificates=_read(identity.ca_cert), require_client_auth=True)


def channel_credentials(identity: Identity) -> grpc.ChannelCredentials:
    """Our certificate and key for the server to check; the server must be signed by our CA."""
    return grpc.ssl_channel_credentials(root_certificates=_read(identity.ca_cert), private_key=_read(identity.key),
                                        certificate_chain=_read(identity.cert))
