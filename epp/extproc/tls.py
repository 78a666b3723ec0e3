"""The EPP's serving certificate: the given one, or a self-signed one made at start.

Gateways connect to the EPP over TLS and, as with the reference EPP, do not verify the
certificate (specs/epp-protocol.md §1), so a fresh self-signed certificate is what the
default deployment uses. It is an ECDSA P-256 key rather than the reference's RSA-4096:
the gateway accepts either, and P-256 is made in milliseconds where RSA-4096 takes
seconds of start-up. :func:`server_context` makes the TLS context kvpick's own HTTP/2
server uses (ALPN ``h2``); grpc.aio negotiates ALPN itself.

With ``--client-ca`` the port also authenticates its clients (mutual TLS): a client must
present a certificate that chains to the given CA bundle (:func:`load_client_ca`), or the
handshake fails and the connection is closed before a single HTTP/2 frame is exchanged.
Such refusals are counted and logged at INFO at most once a minute
(:class:`RefusedClients`), so that a client retrying in a loop cannot fill the log.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import ssl
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from epp import metrics

log = logging.getLogger(__name__)

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


def load_client_ca(path: str | Path) -> bytes:
    """The certificates of the PEM bundle at ``path``, re-encoded as PEM (anything else in
    the file, such as a stray key, is dropped). Raises :class:`CertificateError` naming the
    file when it cannot be read, holds no certificate, or holds one that does not parse."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CertificateError(f"cannot read {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise CertificateError(
            f"{path} holds no certificate (no PEM '-----BEGIN CERTIFICATE-----' block)"
        )
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CertificateError(f"{path} holds a certificate that cannot be read: {exc}") from None
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def server_context(
    key_pem: bytes, cert_pem: bytes, client_ca: bytes | None = None
) -> ssl.SSLContext:
    """A TLS 1.2+ server context offering ALPN ``h2``, from PEM key and certificate.
    With ``client_ca`` (PEM, from :func:`load_client_ca`) every client must present a
    certificate that chains to it; the handshake of one that does not fails.
    Raises :class:`ssl.SSLError` when key and certificate do not match."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    # load_cert_chain reads only files; these live just long enough to be read.
    with tempfile.TemporaryDirectory() as tmp:
        key_file, cert_file = os.path.join(tmp, "tls.key"), os.path.join(tmp, "tls.crt")
        Path(key_file).write_bytes(key_pem)
        Path(cert_file).write_bytes(cert_pem)
        ctx.load_cert_chain(cert_file, key_file)
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=client_ca.decode("ascii"))
        # No session resumption: a resumed session skips the client's certificate, so a
        # session ticket made before the CA was replaced would still admit its holder
        # (tickets outlive the switch to a new context). A gateway keeps its connections
        # open, so a full handshake now and then costs it nothing that matters.
        ctx.options |= ssl.OP_NO_TICKET
        ctx.num_tickets = 0
        # Only the handshake passes through this class, so the refusals it reports cost
        # nothing once a connection is up.
        ctx.sslobject_class = _ClientCheckedSSLObject
    return ctx


class RefusedClients:
    """Counts TLS clients refused for their certificate and logs them at INFO, at most
    once per ``interval`` seconds: the first refusal at once, later ones summed into the
    next line. Every refusal is counted in ``kvpick_extproc_connections_closed``
    (reason ``client_certificate``)."""

    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self.refused = 0  # since start
        self._unlogged = 0
        self._logged_at: float | None = None

    def note(self, why: str) -> None:
        self.refused += 1
        metrics.EXTPROC_CONNECTIONS_CLOSED.labels("client_certificate").inc()
        now = time.monotonic()
        if self._logged_at is not None and now - self._logged_at < self.interval:
            self._unlogged += 1
            return
        earlier = self._unlogged
        self._logged_at, self._unlogged = now, 0
        log.info(
            "refused a TLS client of the ext_proc port: %s (only clients holding a "
            "certificate signed by --client-ca are admitted)%s",
            why,
            f"; {earlier} more refused since the last such line" if earlier else "",
        )


REFUSED = RefusedClients()
"""The process's refusals (kvpick's own HTTP/2 server; grpcio does its TLS in C)."""


def _refusal_reason(exc: ssl.SSLError) -> str | None:
    """Why the client's certificate was refused, or None when ``exc`` is about something
    else (no common protocol version, not TLS at all, the client hung up)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"its certificate did not verify ({exc.verify_message})"
    if exc.reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "NO_CERTIFICATE_RETURNED"):
        return "it presented no certificate"
    return None


class _ClientCheckedSSLObject(ssl.SSLObject):
    """An :class:`ssl.SSLObject` that reports handshakes refused for the client's
    certificate to :data:`REFUSED` (asyncio itself logs failed handshakes only in debug
    mode, and then with a traceback per connection)."""

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise  # the handshake is only waiting for more bytes
        except ssl.SSLError as exc:
            why = _refusal_reason(exc)
            if why is not None:
                REFUSED.note(why)
            raise


class ReloadableContext:
    """A listening context whose certificate can be replaced while it serves.

    Loading a new pair into a live context is unsafe: OpenSSL installs the certificate
    before it checks the key, so a bad pair would leave the context broken, and a key of
    another type would sit beside the old one. Instead each pair gets a fresh context,
    built and checked on its own, and every handshake switches to the newest one from the
    ClientHello callback (which runs with or without SNI). Connections already open keep
    theirs.

    With a client CA, the switched-to context's CA store is the one client certificates
    are verified against (a replaced CA bundle applies from the next handshake), while
    whether a certificate is required at all stays that of the listening context: so a
    listener made with a client CA keeps requiring client certificates after any reload.
    """

    def __init__(self, key_pem: bytes, cert_pem: bytes, client_ca: bytes | None = None) -> None:
        self.client_ca = client_ca
        self.listening = server_context(key_pem, cert_pem, client_ca)
        self._current = self.listening
        self.listening.sni_callback = self._select

    def _select(self, ssl_object: ssl.SSLObject, _server_name: str | None, _ctx: Any) -> None:
        if self._current is not self.listening:
            ssl_object.context = self._current

    def replace(self, key_pem: bytes, cert_pem: bytes, client_ca: bytes | None = None) -> None:
        """Serve this pair (and verify clients against ``client_ca``) from the next
        handshake on; raises, changing nothing, when the pair is not usable, or when
        ``client_ca`` would change whether client certificates are required (fixed when the
        listener was made: see the class docstring)."""
        if (self.client_ca is None) != (client_ca is None):
            needed = "requires" if self.client_ca is not None else "does not ask for"
            raise ValueError(
                f"this listener {needed} client certificates; a reload cannot change that"
            )
        self._current = server_context(key_pem, cert_pem, client_ca)
        self.client_ca = client_ca
