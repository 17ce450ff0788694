"""A throwaway PKI for the TLS tests: a self-signed CA, a server certificate for localhost and
127.0.0.1, and a client certificate, made with the ``cryptography`` package (dev extra)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here: clients trusting it must fail


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, obj) -> Path:
    from cryptography.hazmat.primitives import serialization

    if hasattr(obj, "private_bytes"):
        data = obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    else:
        data = obj.public_bytes(serialization.Encoding.PEM)
    path.write_bytes(data)
    return path


def _cert(subject: str, key, issuer_name, issuer_key, ca: bool, sans=None, client: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if not ca:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return b.sign(issuer_key or key, hashes.SHA256()), name


def make_pki(root: Path) -> Pki:
    from cryptography import x509

    root.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca_cert, ca_name = _cert("lmstack test CA", ca_key, None, None, ca=True)
    srv_key = _key()
    srv_cert, _ = _cert("localhost", srv_key, ca_name, ca_key, ca=False,
                        sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cli_key = _key()
    cli_cert, _ = _cert("team-a client", cli_key, ca_name, ca_key, ca=False, client=True)
    other_key = _key()
    other_cert, _ = _cert("some other CA", other_key, None, None, ca=True)
    return Pki(ca=_write(root / "ca.pem", ca_cert), server_cert=_write(root / "server.pem", srv_cert),
               server_key=_write(root / "server.key", srv_key), client_cert=_write(root / "client.pem", cli_cert),
               client_key=_write(root / "client.key", cli_key), other_ca=_write(root / "other-ca.pem", other_cert))
