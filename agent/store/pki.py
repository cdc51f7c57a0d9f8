"""Identity and trust under ``$DXA_HOME``: a local CA, this node's key and certificate.

Layout (created by ``dxa init`` when missing, never overwritten)::

    $DXA_HOME/ca.pem        the CA certificate every peer in this trust domain shares
    $DXA_HOME/ca.key        the CA private key (0600; only needed to issue certificates)
    $DXA_HOME/node.pem      this node's certificate, signed by the CA
    $DXA_HOME/node.key      this node's private key (0600)
    $DXA_HOME/issued.txt    on a CA's home: serial, expiry and name of every certificate it issued
    $DXA_HOME/crl.pem       on a CA's home: the revocation list ``dxa init --revoke`` keeps

Keys are ECDSA P-256; node certificates carry both serverAuth and clientAuth, because
every node is client and server, and the names (SANs) a client checks the server's
certificate against: the node name plus ``--san`` values, or by default the loopback
names, the node name and the host name (:func:`default_sans`).  A node's key can stay on
the node: :func:`make_csr` there, :func:`sign_csr` on the CA's machine.  :func:`renew`
re-issues for the same key; :func:`revoke` writes the CRL.  Operators who run their own
PKI pass ``--ca/--cert/--key`` (and ``--crl``).  docs/HARDENING.md, "Identity and
certificates", has the trust model.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from agent.errors import ConfigError

__all__ = ["Identity", "cert_expiry", "default_sans", "init_home", "issue_cert", "load_identity", "make_csr",
           "renew", "revoke", "sign_csr"]

CA_CERT, CA_KEY, NODE_CERT, NODE_KEY = "ca.pem", "ca.key", "node.pem", "node.key"
ISSUED, CRL = "issued.txt", "crl.pem"
_VALID_DAYS_CA = 3650
_VALID_DAYS_NODE = 825
_VALID_DAYS_CRL = 365


@dataclass(frozen=True)
class Identity:
    """Paths to a node's trust anchor, certificate and key, plus its name (the cert CN)."""

    name: str
    ca_cert: Path
    cert: Path
    key: Path
    crl: Path | None = None
    """A PEM revocation list of the CA, checked on every handshake (``--crl``); None: none."""


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


def _parse_sans(sans) -> list:
    """``--san`` values as x509 GeneralNames: an IP address where it parses as one, else a DNS name."""
    from cryptography import x509

    out: list = []
    for raw in sans:
        value = str(raw).strip()
        if not value or len(value) > 253 or any(c in value for c in "/\\\0\n ,"):
            raise ConfigError(f"invalid --san {raw!r}: a DNS name or an IP address")
        try:
            gn = x509.IPAddress(ipaddress.ip_address(value))
        except ValueError:
            gn = x509.DNSName(value)
        if gn not in out:
            out.append(gn)
    return out


def default_sans(name: str) -> list[str]:
    """The names a certificate carries when ``--san`` is not given: loopback (so a fresh
    ``dxa init`` works on one machine), the node name and this machine's host name."""
    names = ["localhost", "127.0.0.1", "::1", name]
    host = socket.gethostname()
    if host and host not in names:
        names.append(host)
    return names


def _sans_for(name: str, sans) -> list:
    """The SANs of a certificate for ``name``: the node name always, plus ``sans``
    (default: :func:`default_sans`)."""
    return _parse_sans(default_sans(name) if not sans else [name, *sans])


def _build_cert(ca_key, ca_cert, public_key, name: str, sans: list, days: float):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = _dt.datetime.now(_dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _record_issued(home: Path, cert) -> None:
    """Append to the CA's register of issued certificates (``issued.txt``: serial, not-after,
    name), which ``dxa init --revoke NAME`` reads to find a name's serials."""
    from cryptography.x509.oid import NameOID

    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    with open(home / ISSUED, "a") as fh:
        fh.write(f"{cert.serial_number:x} {int(_not_after(cert).timestamp())} {cns[0].value if cns else ''}\n")


def _write_cert(path: Path, cert) -> None:
    """Write a certificate atomically (a daemon reloading on SIGHUP never reads half of it)."""
    from cryptography.hazmat.primitives import serialization

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, path)


def _sign_node(home: Path, name: str, cert_path: Path, key_path: Path, sans=(), days: float = _VALID_DAYS_NODE
               ) -> None:
    ca_key, ca_cert = _load_ca(home)
    key = _new_key()
    cert = _build_cert(ca_key, ca_cert, key.public_key(), name, _sans_for(name, sans), days)
    _write_private(key_path, _pem_key(key))
    _write_cert(cert_path, cert)
    _record_issued(home, cert)


def _not_after(cert) -> _dt.datetime:
    try:
        return cert.not_valid_after_utc
    except AttributeError:  # cryptography < 42
        return cert.not_valid_after.replace(tzinfo=_dt.timezone.utc)


def _check_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > 64 or any(c in name for c in "/\\\0\n") :
        raise ConfigError(f"invalid node name {name!r} (1-64 characters, no slashes or control characters)")
    return name


def init_home(home: str | os.PathLike, name: str | None = None, sans=(), days: float = _VALID_DAYS_NODE
              ) -> tuple[Identity, list[Path]]:
    """Create whatever of the CA, node key and node certificate is missing.

    ``sans``: the names (DNS or IP) the node certificate carries besides the node name
    (default :func:`default_sans`, loopback included).  Returns the identity and the list
    of files created (empty when all existed).  Existing files are never overwritten.
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
        _sign_node(h, _check_name(name or socket.gethostname()), h / NODE_CERT, h / NODE_KEY, sans, days)
        created += [h / NODE_KEY, h / NODE_CERT]
    return load_identity(h), created


def issue_cert(home: str | os.PathLike, name: str, out_dir: str | os.PathLike, sans=(),
               days: float = _VALID_DAYS_NODE) -> Identity:
    """Issue a certificate for another node ``name`` from this home's CA into ``out_dir``.

    ``out_dir`` becomes a complete ``$DXA_HOME`` for that node (without the CA key).  The
    key is made here and must travel to the node: :func:`make_csr` and :func:`sign_csr`
    keep it on the node instead.
    """
    h, out = Path(home), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    if (out / NODE_CERT).exists() or (out / NODE_KEY).exists():
        raise ConfigError(f"{out} already holds a node certificate; refusing to overwrite it")
    _sign_node(h, _check_name(name), out / NODE_CERT, out / NODE_KEY, sans, days)
    (out / CA_CERT).write_bytes((h / CA_CERT).read_bytes())
    return load_identity(out)


def make_csr(home: str | os.PathLike, name: str | None, csr_path: str | os.PathLike, sans=()) -> tuple[Path, bool]:
    """A certificate signing request for this node: its key stays in ``home``/node.key.

    The key is made (0600) when the home has none, else the existing one is used (a CSR to
    renew a certificate through another machine's CA).  The CSR carries the node name as CN
    and the SANs (default :func:`default_sans`).  Returns the key's path and whether it was
    created.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    h = Path(home)
    h.mkdir(parents=True, exist_ok=True, mode=0o700)
    node = _check_name(name or socket.gethostname())
    key_path = h / NODE_KEY
    created = not key_path.exists()
    if created:
        key = _new_key()
        _write_private(key_path, _pem_key(key))
    else:
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except ValueError as exc:
            raise ConfigError(f"unreadable key {key_path}: {exc}") from None
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
           .add_extension(x509.SubjectAlternativeName(_sans_for(node, sans)), critical=False)
           .sign(key, hashes.SHA256()))
    Path(csr_path).write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    return key_path, created


def sign_csr(home: str | os.PathLike, csr_path: str | os.PathLike, out_dir: str | os.PathLike, sans=(),
             days: float = _VALID_DAYS_NODE) -> tuple[str, Path]:
    """The CA of ``home`` signs the CSR: ``out_dir``/node.pem and ``out_dir``/ca.pem.

    The certificate takes the CSR's CN and SANs (or ``sans`` plus the CN when given: the CA
    decides which names a node may claim).  Returns the node name and the certificate's
    path; ``out_dir``'s node.pem is replaced only if it is for the same key (a renewal).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    h, out = Path(home), Path(out_dir)
    try:
        csr = x509.load_pem_x509_csr(Path(csr_path).read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read {csr_path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{csr_path} is not a PEM certificate signing request: {exc}") from None
    if not csr.is_signature_valid:
        raise ConfigError(f"{csr_path}: the request's signature does not match its key")
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cns:
        raise ConfigError(f"{csr_path}: the request has no common name (node name)")
    name = _check_name(str(cns[0].value))
    if sans:
        names = _sans_for(name, sans)
    else:
        try:
            names = list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
        except x509.ExtensionNotFound:
            names = _sans_for(name, ())
    ca_key, ca_cert = _load_ca(h)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = out / NODE_CERT
    pub = csr.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if target.exists():
        try:
            old = x509.load_pem_x509_certificate(target.read_bytes()).public_key()
            same = old.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == pub
        except ValueError:
            same = False
        if not same:
            raise ConfigError(f"{target} exists for another key; refusing to overwrite it")
    cert = _build_cert(ca_key, ca_cert, csr.public_key(), name, names, days)
    _write_cert(target, cert)
    _record_issued(h, cert)
    (out / CA_CERT).write_bytes((h / CA_CERT).read_bytes())
    return name, target


def renew(home: str | os.PathLike, sans=(), days: float = _VALID_DAYS_NODE, *, cert=None, key=None) -> Path:
    """A new certificate for the same key, name and SANs (or ``sans``) from this home's CA,
    written over node.pem atomically; a daemon picks it up on SIGHUP."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    h = Path(home)
    cert_path, key_path = Path(cert) if cert else h / NODE_CERT, Path(key) if key else h / NODE_KEY
    try:
        old = x509.load_pem_x509_certificate(cert_path.read_bytes())
        priv = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise ConfigError(f"nothing to renew: no {exc.filename}; run `dxa init` first") from None
    except ValueError as exc:
        raise ConfigError(f"unreadable certificate or key: {exc}") from None
    pub = priv.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if old.public_key().public_bytes(serialization.Encoding.DER,
                                     serialization.PublicFormat.SubjectPublicKeyInfo) != pub:
        raise ConfigError(f"{cert_path} is not the certificate of {key_path}")
    from cryptography.x509.oid import NameOID

    cns = old.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = _check_name(str(cns[0].value) if cns else socket.gethostname())
    if sans:
        names = _sans_for(name, sans)
    else:
        try:
            names = list(old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
        except x509.ExtensionNotFound:
            names = _sans_for(name, ())
    ca_key, ca_cert = _load_ca(h)
    new = _build_cert(ca_key, ca_cert, priv.public_key(), name, names, days)
    _write_cert(cert_path, new)
    _record_issued(h, new)
    return cert_path


def revoke(home: str | os.PathLike, what: str, crl_path: str | os.PathLike | None = None,
           days: float = _VALID_DAYS_CRL) -> tuple[Path, list[int]]:
    """Add to the CA's revocation list (``home``/crl.pem, or ``crl_path``) every certificate
    issued to the node named ``what`` (from ``issued.txt``), or the one with serial ``what``
    (hex, as ``dxa init --revoke`` prints, or ``0x``...).  The list is re-signed with the
    next CRL number and valid for ``days``: re-run (``--revoke`` of a revoked serial only
    re-signs) before it runs out, or every handshake is refused.  Returns the CRL's path
    and the serials added."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    h = Path(home)
    out = Path(crl_path) if crl_path else h / CRL
    ca_key, ca_cert = _load_ca(h)
    serials: list[int] = []
    try:
        lines = (h / ISSUED).read_text().splitlines()
    except FileNotFoundError:
        lines = []
    for line in lines:
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[2] == what:
            serials.append(int(parts[0], 16))
    if not serials:
        try:
            serials = [int(what[2:] if what.lower().startswith("0x") else what, 16)]
        except ValueError:
            raise ConfigError(f"--revoke {what!r}: no certificate issued by this CA to that name, "
                              "and not a serial number (hex)") from None
    revoked: dict[int, x509.RevokedCertificate] = {}
    number = 1
    if out.exists():
        try:
            old = x509.load_pem_x509_crl(out.read_bytes())
        except ValueError as exc:
            raise ConfigError(f"{out} is not a PEM CRL: {exc}") from None
        if not old.is_signature_valid(ca_cert.public_key()):
            raise ConfigError(f"{out} was not signed by this CA")
        revoked = {r.serial_number: r for r in old}
        try:
            number = old.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
        except x509.ExtensionNotFound:
            pass
    now = _dt.datetime.now(_dt.timezone.utc)
    added = [s for s in serials if s not in revoked]
    for s in added:
        revoked[s] = x509.RevokedCertificateBuilder().serial_number(s).revocation_date(now).build()
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
               .last_update(now - _dt.timedelta(minutes=5)).next_update(now + _dt.timedelta(days=days))
               .add_extension(x509.CRLNumber(number), critical=False))
    for r in revoked.values():
        builder = builder.add_revoked_certificate(r)
    crl = builder.sign(ca_key, hashes.SHA256())
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, out)
    return out, added


def cert_expiry(path: str | os.PathLike) -> _dt.datetime:
    """When the (first) certificate in the PEM file ``path`` expires (UTC)."""
    from cryptography import x509

    try:
        return _not_after(x509.load_pem_x509_certificate(Path(path).read_bytes()))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"unreadable certificate {path}: {exc}") from None


def load_identity(home: str | os.PathLike, *, ca=None, cert=None, key=None, crl=None) -> Identity:
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
    crl_path = None
    if crl:
        crl_path = Path(crl)
        try:
            x509.load_pem_x509_crl(crl_path.read_bytes())
        except OSError as exc:
            raise ConfigError(f"cannot read the revocation list {crl}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise ConfigError(f"{crl} is not a PEM revocation list (CRL): {exc}") from None
    return Identity(name, paths["CA certificate"], paths["certificate"], paths["key"], crl_path)
