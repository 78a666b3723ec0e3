"""The EPP's serving certificate: the given one, or a self-signed one made at start.

Gateways connect to the EPP over TLS and, as with the reference EPP, do not verify the
certificate (specs/epp-protocol.md §1), so a fresh self-signed certificate is what the
default deployment uses. It is an ECDSA P-256 key rather than the reference's RSA-4096:
the gateway accepts either, and P-256 is made in milliseconds where RSA-4096 takes
seconds of start-up. :func:`server_context` makes the TLS context kvpick's own HTTP/2
server uses (ALPN ``h2``); grpc.aio negotiates ALPN itself.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import tempfile
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ORGANIZATION = "Inference Ext"
VALIDITY = datetime.timedelta(days=3650)


class CertificateError(ValueError):
    """The configured certificate cannot be used; the message says which file and why."""


def self_signed(
    hostnames: tuple[str, ...] = ("localhost",), *, key: Any = None
) -> tuple[bytes, bytes]:
    """A new self-signed server certificate: ``(private key PEM, certificate PEM)``, for
    ``key`` (a ``cryptography`` private key; by default a new P-256 one)."""
    if key is None:
        key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)])
    now = datetime.datetime.now(datetime.UTC)
    alt: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    alt.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def load(cert_dir: str | Path) -> tuple[bytes, bytes]:
    """``(key PEM, certificate PEM)`` from ``cert_dir/tls.key`` and ``cert_dir/tls.crt``."""
    directory = Path(cert_dir)
    out = []
    for name in ("tls.key", "tls.crt"):
        path = directory / name
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CertificateError(f"cannot read {path}: {exc.strerror or exc}") from None
        if b"-----BEGIN" not in data:
            raise CertificateError(f"{path} is not PEM")
        out.append(data)
    try:
        x509.load_pem_x509_certificate(out[1])
        serialization.load_pem_private_key(out[0], password=None)
    except ValueError as exc:
        raise CertificateError(f"bad certificate or key in {directory}: {exc}") from None
    return out[0], out[1]


def server_context(key_pem: bytes, cert_pem: bytes) -> ssl.SSLContext:
    """A TLS 1.2+ server context offering ALPN ``h2``, from PEM key and certificate.
    Raises :class:`ssl.SSLError` when they do not match."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    # load_cert_chain reads only files; these live just long enough to be read.
    with tempfile.TemporaryDirectory() as tmp:
        key_file, cert_file = os.path.join(tmp, "tls.key"), os.path.join(tmp, "tls.crt")
        Path(key_file).write_bytes(key_pem)
        Path(cert_file).write_bytes(cert_pem)
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


class ReloadableContext:
    """A listening context whose certificate can be replaced while it serves.

    Loading a new pair into a live context is unsafe: OpenSSL installs the certificate
    before it checks the key, so a bad pair would leave the context broken, and a key of
    another type would sit beside the old one. Instead each pair gets a fresh context,
    built and checked on its own, and every handshake switches to the newest one from the
    ClientHello callback (which runs with or without SNI). Connections already open keep
    theirs.
    """

    def __init__(self, key_pem: bytes, cert_pem: bytes) -> None:
        self.listening = server_context(key_pem, cert_pem)
        self._current = self.listening
        self.listening.sni_callback = self._select

    def _select(self, ssl_object: ssl.SSLObject, _server_name: str | None, _ctx: Any) -> None:
        if self._current is not self.listening:
            ssl_object.context = self._current

    def replace(self, key_pem: bytes, cert_pem: bytes) -> None:
        """Serve this pair from the next handshake on; raises (changing nothing) when the
        pair is not usable."""
        self._current = server_context(key_pem, cert_pem)
