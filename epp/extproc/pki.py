"""A small certificate authority for mutual TLS between the gateway and the EPP.

For tests and for a local stack: :class:`CertificateAuthority` makes a CA and issues the
EPP's serving certificate and the gateway's client certificate, signed by it. Everything
is ECDSA P-256 (made in milliseconds) and carries the extensions a strict verifier looks
for: the CA is marked ``CA:TRUE`` and may sign only leaf certificates; a leaf is marked
``CA:FALSE`` and says what it is for (``serverAuth`` or ``clientAuth``), which OpenSSL
checks: a server certificate presented as a client certificate is refused.

A production cluster would rather have cert-manager or the platform's own CA issue these;
the files have the same shape (``tls.crt``, ``tls.key``, ``ca.crt``).

``python -m epp.extproc.pki DIR`` writes a full set into ``DIR`` (see :func:`write_set`).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_VALIDITY = datetime.timedelta(days=3650)
LEAF_VALIDITY = datetime.timedelta(days=365)
_BACKDATE = datetime.timedelta(minutes=5)  # tolerate a little clock skew between hosts


def _key_pem(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True, slots=True)
class Issued:
    """A private key and its certificate, both PEM."""

    key_pem: bytes
    cert_pem: bytes

    def write(self, directory: str | Path) -> tuple[Path, Path]:
        """Write ``tls.key`` (mode 0600) and ``tls.crt`` into ``directory`` (created if
        missing), the layout ``--cert-path`` and a Kubernetes TLS Secret use; returns
        ``(key path, certificate path)``."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        key_path, cert_path = folder / "tls.key", folder / "tls.crt"
        key_path.touch(mode=0o600)
        key_path.write_bytes(self.key_pem)
        cert_path.write_bytes(self.cert_pem)
        return key_path, cert_path


class CertificateAuthority:
    """A self-signed CA that issues server and client certificates."""

    def __init__(self, name: str = "kvpick test CA", *, validity: datetime.timedelta = CA_VALIDITY):
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        public = self._key.public_key()
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self._key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate: what ``--client-ca`` (or Envoy's ``trusted_ca``) is given."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self._key)

    def issue_server(
        self,
        hostnames: Sequence[str] = ("localhost",),
        ips: Sequence[str] = ("127.0.0.1",),
        *,
        validity: datetime.timedelta = LEAF_VALIDITY,
    ) -> Issued:
        """A serving certificate (``serverAuth``) for ``hostnames`` and ``ips``; the first
        hostname is also its common name."""
        alt: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
        alt += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        common = hostnames[0] if hostnames else (ips[0] if ips else "server")
        return self._issue(common, ExtendedKeyUsageOID.SERVER_AUTH, alt, validity)

    def issue_client(
        self, name: str = "gateway", *, validity: datetime.timedelta = LEAF_VALIDITY
    ) -> Issued:
        """A client certificate (``clientAuth``) with common name and DNS name ``name``."""
        return self._issue(name, ExtendedKeyUsageOID.CLIENT_AUTH, [x509.DNSName(name)], validity)

    def _issue(
        self,
        common_name: str,
        usage: x509.ObjectIdentifier,
        alt: list[x509.GeneralName],
        validity: datetime.timedelta,
    ) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        issuer_ski = self.certificate.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        )
        if alt:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        return Issued(_key_pem(key), cert.public_bytes(serialization.Encoding.PEM))


@dataclass(frozen=True, slots=True)
class MtlsFiles:
    """Where :func:`write_set` put each file."""

    ca: Path
    """The CA certificate: the EPP's ``--client-ca``, and the gateway's ``trusted_ca``."""
    epp_dir: Path
    """The EPP's ``--cert-path`` (``tls.crt``, ``tls.key``)."""
    gateway_cert: Path
    gateway_key: Path


def write_set(
    directory: str | Path,
    *,
    epp_hostnames: Sequence[str] = ("localhost",),
    epp_ips: Sequence[str] = ("127.0.0.1",),
    client_name: str = "gateway",
) -> MtlsFiles:
    """A new CA and the two certificates it signs, written under ``directory``:
    ``ca.crt``, ``epp/tls.{crt,key}`` (the EPP's serving pair) and
    ``gateway/tls.{crt,key}`` (the client pair the gateway presents). The CA's key is not
    written: nothing more can be signed with it, which is what a test or a local stack
    wants."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    ca = CertificateAuthority()
    ca_path = root / "ca.crt"
    ca_path.write_bytes(ca.cert_pem)
    epp_dir = root / "epp"
    ca.issue_server(epp_hostnames, epp_ips).write(epp_dir)
    gateway_key, gateway_cert = ca.issue_client(client_name).write(root / "gateway")
    return MtlsFiles(ca_path, epp_dir, gateway_cert, gateway_key)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m epp.extproc.pki",
        description="Write a CA, the EPP's serving certificate and the gateway's client "
        "certificate (mutual TLS on the ext_proc port).",
    )
    p.add_argument("directory", help="where to write ca.crt, epp/ and gateway/")
    p.add_argument(
        "--epp-hostname",
        action="append",
        default=None,
        help="a DNS name of the EPP for its certificate (repeatable; default localhost)",
    )
    p.add_argument(
        "--epp-ip",
        action="append",
        default=None,
        help="an IP address of the EPP for its certificate (repeatable; default 127.0.0.1)",
    )
    p.add_argument("--client-name", default="gateway", help="the client certificate's name")
    args = p.parse_args(argv)
    files = write_set(
        args.directory,
        epp_hostnames=args.epp_hostname or ("localhost",),
        epp_ips=args.epp_ip or ("127.0.0.1",),
        client_name=args.client_name,
    )
    print(f"CA certificate:        {files.ca}  (EPP --client-ca; gateway trusted CA)")
    print(f"EPP serving pair:      {files.epp_dir}/tls.crt, tls.key  (EPP --cert-path)")
    print(f"gateway client pair:   {files.gateway_cert}, {files.gateway_key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
