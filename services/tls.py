"""Transport security: TLS (and mTLS) credentials for servers and clients, and the exposure rule.

Servers: ``--tls-cert`` and ``--tls-key`` (PEM) turn TLS on; ``--tls-client-ca`` (PEM) also
requires every client to present a certificate signed by that CA (mutual TLS). Clients and the CLI:
``--tls-ca`` (``LMSTACK_TLS_CA``) is the CA that signed the server's certificate, and
``--tls-cert``/``--tls-key`` the client's own pair when the server wants mTLS.

**The exposure rule** (:func:`check_exposure`, applied by every server before it binds): a server
bound to an address other than loopback must have API keys *and* TLS, or refuses to start and says
why, unless ``--insecure`` is given on purpose (behind a TLS-terminating proxy on a private
network, say). On loopback nothing is required: that is the laptop default.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import grpc

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot read it ({e.strerror or e})") from None


def check_exposure(host: str, has_keys: bool, has_tls: bool, insecure: bool, what: str = "server") -> None:
    """Raise ``ValueError`` (the server exits 2 with this line) when ``host`` is exposed unsafely."""
    if insecure or is_loopback(host):
        return
    missing = [m for m, ok in (("API keys (--api-keys-file or --api-keys)", has_keys),
                               ("TLS (--tls-cert and --tls-key)", has_tls)) if not ok]
    if missing:
        raise ValueError(f"refusing to serve the {what} on {host}, reachable from other machines, without "
                         f"{' and '.join(missing)}; configure them, bind 127.0.0.1, or pass --insecure if "
                         "the network in front of it is trusted")


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials | None:
    """TLS credentials for ``add_secure_port``; None when no certificate is configured."""
    if not cert and not key:
        if client_ca:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (mTLS is TLS plus client certificates)")
        return None
    if not (cert and key):
        raise ValueError("TLS needs both --tls-cert and --tls-key (PEM files)")
    pair = (_read(key, "TLS key"), _read(cert, "TLS certificate"))
    if client_ca:
        return grpc.ssl_server_credentials([pair], root_certificates=_read(client_ca, "TLS client CA"),
                                           require_client_auth=True)
    return grpc.ssl_server_credentials([pair])


def channel_credentials(ca: str = "", cert: str = "", key: str = "") -> grpc.ChannelCredentials | None:
    """Client TLS credentials (``ca``: the server's CA; ``cert``/``key``: this client's, for mTLS);
    None when no TLS option is set (a plaintext channel)."""
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise ValueError("a client certificate needs both --tls-cert and --tls-key")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "TLS CA") if ca else None,
        private_key=_read(key, "TLS key") if key else None,
        certificate_chain=_read(cert, "TLS certificate") if cert else None)
