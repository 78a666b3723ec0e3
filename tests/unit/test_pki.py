"""The test CA (epp/extproc/pki.py) and reading a client CA bundle (epp/extproc/tls.py),
checked with cryptography's own RFC 5280 path validation, an independent verifier."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509 import verification as v

from epp.extproc import pki, tls


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def test_issued_certificates_chain_to_the_ca_for_their_purpose() -> None:
    ca = pki.CertificateAuthority()
    store = v.Store([_cert(ca.cert_pem)])
    server = _cert(ca.issue_server(("epp.kvpick.svc",), ("10.0.0.7",)).cert_pem)
    builder = v.PolicyBuilder().store(store)
    for name in (x509.DNSName("epp.kvpick.svc"), x509.IPAddress(ipaddress.ip_address("10.0.0.7"))):
        chain = builder.build_server_verifier(name).verify(server, [])
        assert chain[-1] == _cert(ca.cert_pem)
    client = _cert(ca.issue_client("gateway").cert_pem)
    verified = builder.build_client_verifier().verify(client, [])
    assert verified.subjects == [x509.DNSName("gateway")]
    # Each is only what it says it is: the server certificate is no client certificate.
    with pytest.raises(v.VerificationError):
        builder.build_client_verifier().verify(server, [])
    with pytest.raises(v.VerificationError):
        builder.build_server_verifier(x509.DNSName("gateway")).verify(client, [])
    # Nor does another CA's certificate verify.
    stranger = _cert(pki.CertificateAuthority().issue_client().cert_pem)
    with pytest.raises(v.VerificationError):
        builder.build_client_verifier().verify(stranger, [])


def test_write_set_lays_out_what_the_epp_and_envoy_are_given(tmp_path: Path) -> None:
    files = pki.write_set(tmp_path / "mtls")
    assert files.ca == tmp_path / "mtls" / "ca.crt"
    key, cert = tls.load(files.epp_dir)  # what --cert-path reads
    assert tls.server_context(key, cert, tls.load_client_ca(files.ca)) is not None
    assert stat.S_IMODE(files.gateway_key.stat().st_mode) & 0o077 == 0
    gateway = _cert(files.gateway_cert.read_bytes())
    assert gateway.issuer == _cert(files.ca.read_bytes()).subject
    assert not list((tmp_path / "mtls").rglob("*ca*.key"))  # the CA key is not kept


def test_the_command_writes_a_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert pki.main([str(tmp_path), "--epp-hostname", "epp.example", "--epp-ip", "10.1.2.3"]) == 0
    server = _cert((tmp_path / "epp" / "tls.crt").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["epp.example"]
    assert str(tmp_path / "ca.crt") in capsys.readouterr().out


def test_a_client_ca_bundle_keeps_only_its_certificates(tmp_path: Path) -> None:
    one, two = pki.CertificateAuthority("one"), pki.CertificateAuthority("two")
    path = tmp_path / "bundle.pem"
    path.write_bytes(b"# comment\n" + one.cert_pem + one.key_pem + two.cert_pem)
    bundle = tls.load_client_ca(path)
    assert [c.subject for c in x509.load_pem_x509_certificates(bundle)] == [
        _cert(one.cert_pem).subject,
        _cert(two.cert_pem).subject,
    ]
    assert b"PRIVATE KEY" not in bundle


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        (b"", "holds no certificate"),
        (pki.CertificateAuthority().key_pem, "holds no certificate"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "cannot be read"),
    ],
)
def test_an_unusable_client_ca_bundle_is_refused_naming_the_file(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "ca.crt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(tls.CertificateError) as info:
        tls.load_client_ca(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_a_directory_is_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(tls.CertificateError, match=r"cannot read .*Is a directory"):
        tls.load_client_ca(tmp_path)


def test_a_reload_cannot_change_whether_client_certificates_are_required() -> None:
    ca = pki.CertificateAuthority()
    pair = ca.issue_server()
    mtls = tls.ReloadableContext(pair.key_pem, pair.cert_pem, ca.cert_pem)
    with pytest.raises(ValueError, match="requires client certificates"):
        mtls.replace(pair.key_pem, pair.cert_pem, None)
    mtls.replace(pair.key_pem, pair.cert_pem, pki.CertificateAuthority().cert_pem)  # a new CA
    # The listening context decides whether a certificate is asked for at all, so a
    # listener made without a CA cannot start asking for one either.
    plain = tls.ReloadableContext(pair.key_pem, pair.cert_pem)
    with pytest.raises(ValueError, match="does not ask for client certificates"):
        plain.replace(pair.key_pem, pair.cert_pem, ca.cert_pem)
    plain.replace(pair.key_pem, pair.cert_pem)
