"""Identity and trust under ``$DXA_HOME``: a local CA, this node's key and certificate.

Layout (created by ``dxa init`` when missing, never overwritten)::

    $DXA_HOME/ca.pem        the CA certificate every peer in this trust domain shares
    $DXA_HOME/ca.key        the CA private key (0600; only needed to issue certificates)
    $DXA_HOME/node.pem      this node's certificate, signed by the CA
    $DXA_HOME/node.key      this node's private key (0600)

Keys are ECDSA P-256; node certificates carry both serverAuth and clientAuth and the
SANs ``localhost``/``127.0.0.1`` plus the node name, because every node is client and
server.  Two processes sharing a home trust each other; a node signed by another CA
fails the TLS handshake.  Operators who run their own PKI pass ``--ca/--cert/--key``.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from agent.errors import ConfigError

__all__ = ["Identity", "init_home", "load_identity", "issue_cert"]

CA_CERT, CA_KEY, NODE_CERT, NODE_KEY = "ca.pem", "ca.key", "node.pem", "node.key"
_VALID_DAYS_CA = 3650
_VALID_DAYS_NODE = 825


@dataclass(frozen=True)
class Identity:
    """Paths to a node's trust anchor, certificate and key, plus its name (the cert CN)."""

    name: str
    ca_cert: Path
    cert: Path
    key: Path


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _new_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _make_ca(home: Path, name: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"dxa CA ({name})")])
    now = _dt.datetime.now(_dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=_VALID_DAYS_CA))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    _write_private(home / CA_KEY, _pem_key(key))
    (home / CA_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _load_ca(home: Path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        ca_key = serialization.load_pem_private_key((home / CA_KEY).read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate((home / CA_CERT).read_bytes())
    except FileNotFoundError as exc:
        raise ConfigError(f"{home}: no CA key to issue certificates with ({exc.filename})") from None
    return ca_key, ca_cert


def _sign_node(home: Path, name: str, cert_path: Path, key_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key, ca_cert = _load_ca(home)
    key = _new_key()
    now = _dt.datetime.now(_dt.timezone.utc)
    sans: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                    x509.IPAddress(ipaddress.ip_address("::1"))]
    try:
        sans.append(x509.IPAddress(ipaddress.ip_address(name)))
    except ValueError:
        sans.append(x509.DNSName(name))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=_VALID_DAYS_NODE))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(key_path, _pem_key(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _check_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > 64 or any(c in name for c in "/\\\0\n") :
        raise ConfigError(f"invalid node name {name!r} (1-64 characters, no slashes or control characters)")
    return name


def init_home(home: str | os.PathLike, name: str | None = None) -> tuple[Identity, list[Path]]:
    """Create whatever of the CA, node key and node certificate is missing.

    Returns the identity and the list of files created (empty when all existed).
    Existing files are never overwritten.
    """
    h = Path(home)
    h.mkdir(parents=True, exist_ok=True, mode=0o700)
    created: list[Path] = []
    if not (h / CA_CERT).exists():
        if (h / NODE_CERT).exists():
            raise ConfigError(f"{h}: {NODE_CERT} exists but {CA_CERT} does not; refusing to guess the trust anchor")
        _make_ca(h, name or socket.gethostname())
        created += [h / CA_KEY, h / CA_CERT]
    if not (h / NODE_CERT).exists() or not (h / NODE_KEY).exists():
        for p in (h / NODE_CERT, h / NODE_KEY):
            if p.exists():
                p.unlink()
        _sign_node(h, _check_name(name or socket.gethostname()), h / NODE_CERT, h / NODE_KEY)
        created += [h / NODE_KEY, h / NODE_CERT]
    return load_identity(h), created


def issue_cert(home: str | os.PathLike, name: str, out_dir: str | os.PathLike) -> Identity:
    """Issue a certificate for another node ``name`` from this home's CA into ``out_dir``.

    ``out_dir`` becomes a complete ``$DXA_HOME`` for that node (without the CA key).
    """
    h, out = Path(home), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    if (out / NODE_CERT).exists() or (out / NODE_KEY).exists():
        raise ConfigError(f"{out} already holds a node certificate; refusing to overwrite it")
    _sign_node(h, _check_name(name), out / NODE_CERT, out / NODE_KEY)
    (out / CA_CERT).write_bytes((h / CA_CERT).read_bytes())
    return load_identity(out)


def load_identity(home: str | os.PathLike, *, ca=None, cert=None, key=None) -> Identity:
    """Load (and check) the identity in ``home``; explicit paths override the home's files."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    h = Path(home)
    paths = {"CA certificate": Path(ca) if ca else h / CA_CERT,
             "certificate": Path(cert) if cert else h / NODE_CERT,
             "key": Path(key) if key else h / NODE_KEY}
    for what, p in paths.items():
        if not p.is_file():
            hint = "" if (ca or cert or key) else "; run `dxa init` (or set DXA_HOME / --home)"
            raise ConfigError(f"no {what} at {p}{hint}")
    try:
        c = x509.load_pem_x509_certificate(paths["certificate"].read_bytes())
        x509.load_pem_x509_certificate(paths["CA certificate"].read_bytes())
    except ValueError as exc:
        raise ConfigError(f"unreadable certificate: {exc}") from None
    cns = c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = str(cns[0].value) if cns else paths["certificate"].stem
    return Identity(name, paths["CA certificate"], paths["certificate"], paths["key"])
