"""Mutual TLS 1.3 contexts for the control connection (stdlib ``ssl``, OpenSSL underneath).

Both sides present a certificate and require one signed by the trusted CA.  Hostname
checking is off because peers are identified by their certificate's CN (node name),
not by DNS: the CA is private to the trust domain, so a valid chain *is* the identity.
"""

from __future__ import annotations

import ssl

from agent.errors import AuthenticationError, ConfigError
from agent.store.pki import Identity

__all__ = ["server_context", "client_context", "peer_identity"]


def _context(purpose: ssl.Purpose, identity: Identity) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_cert_chain(str(identity.cert), str(identity.key))
        ctx.load_verify_locations(cafile=str(identity.ca_cert))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot load identity ({identity.cert}, {identity.key}): {exc}") from None
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def server_context(identity: Identity) -> ssl.SSLContext:
    return _context(ssl.Purpose.CLIENT_AUTH, identity)


def client_context(identity: Identity) -> ssl.SSLContext:
    return _context(ssl.Purpose.SERVER_AUTH, identity)


def peer_identity(ssl_object) -> str:
    """The verified peer's node name (certificate CN); refuses a connection without one."""
    if ssl_object is None:
        raise AuthenticationError("connection is not TLS")
    cert = ssl_object.getpeercert()
    if not cert:
        raise AuthenticationError("peer presented no certificate")
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    raise AuthenticationError("peer certificate has no common name")
