"""Mutual TLS 1.3 contexts for the control connection (stdlib ``ssl``, OpenSSL underneath).

Both sides present a certificate and require one signed by the trusted CA.  A client
also checks that the server's certificate names the host it dialled (a DNS or IP SAN),
or the node name it was told to expect (``server_hostname``: ``--server-name``), as
any TLS client does: without that check any node of the CA could pose as any daemon.
The server identifies its clients by their certificate's CN (node name), authorized by
the chain alone.  With a revocation list (``Identity.crl``) both sides refuse a peer
whose certificate the CA revoked, on every handshake (OpenSSL's CRL check of the leaf).
"""

from __future__ import annotations

import ssl

from agent.errors import AuthenticationError, ConfigError
from agent.store.pki import Identity

__all__ = ["client_context", "describe_tls_failure", "peer_identity", "server_context"]


def _context(purpose: ssl.Purpose, identity: Identity) -> ssl.SSLContext:
    server = purpose is ssl.Purpose.CLIENT_AUTH
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_cert_chain(str(identity.cert), str(identity.key))
        ctx.load_verify_locations(cafile=str(identity.ca_cert))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot load identity ({identity.cert}, {identity.key}): {exc}") from None
    if identity.crl is not None:
        try:
            ctx.load_verify_locations(cafile=str(identity.crl))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"cannot load the revocation list {identity.crl}: {exc}") from None
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    ctx.check_hostname = not server
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def server_context(identity: Identity) -> ssl.SSLContext:
    return _context(ssl.Purpose.CLIENT_AUTH, identity)


def client_context(identity: Identity) -> ssl.SSLContext:
    """Checks the server's chain and name: pass ``server_hostname`` (the host dialled, or
    ``--server-name``) wherever the context is used."""
    return _context(ssl.Purpose.SERVER_AUTH, identity)


_MISMATCH = (62, 64)  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH


def describe_tls_failure(exc: BaseException, where: str, expected: str) -> str | None:
    """A message for a person when ``exc`` is a failed certificate check, else None."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        if getattr(exc, "verify_code", None) in _MISMATCH:
            return (f"the certificate of {where} does not name {expected!r}: it is not the server you meant, or "
                    f"its certificate lacks that name (dxa init --san); pass --server-name NODE to expect a "
                    f"node name instead")
        if getattr(exc, "verify_code", None) == 23:  # X509_V_ERR_CERT_REVOKED
            return f"the certificate of {where} is revoked (--crl)"
        return f"TLS with {where} failed: {getattr(exc, 'verify_message', '') or exc}"
    if isinstance(exc, ssl.SSLError) or "CERTIFICATE" in str(exc).upper():
        text = str(exc)
        if "REVOKED" in text.upper():
            return f"{where} refused our certificate: it is revoked"
        return f"TLS with {where} failed: {text}"
    return None


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
