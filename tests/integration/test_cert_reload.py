"""``--enable-cert-reload``: new certificates in ``--cert-path`` are served from the next TLS
handshake on, with both ext_proc servers; a broken pair is refused and the old one kept."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from epp.extproc import tls
from epp.extproc.server import ExtProcServer, ServerConfig


def der(cert_pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)


def rsa_self_signed() -> tuple[bytes, bytes]:
    return tls.self_signed(key=rsa.generate_private_key(public_exponent=65537, key_size=2048))


async def served_cert(port: int) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    _reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    try:
        return writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()


def publish(secret: Path, version: str, key: bytes, cert: bytes) -> None:
    """Write a pair the way a Kubernetes Secret volume updates: a new versioned folder,
    then one atomic swap of the ``..data`` link the file links point through."""
    folder = secret / version
    folder.mkdir()
    (folder / "tls.key").write_bytes(key)
    (folder / "tls.crt").write_bytes(cert)
    tmp = secret / "..data_tmp"
    tmp.symlink_to(version)
    os.replace(tmp, secret / "..data")
    for name in ("tls.key", "tls.crt"):
        if not (secret / name).is_symlink():
            (secret / name).symlink_to(f"..data/{name}")


async def eventually(check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("transport", ["h2", "grpcio"])
async def test_new_certificates_are_served_without_a_restart(tmp_path, transport, caplog):
    secret = tmp_path / "certs"
    secret.mkdir()
    first, second = tls.self_signed(), tls.self_signed()
    publish(secret, "v1", *first)
    server = ExtProcServer(
        None,  # only TLS handshakes here: no stream is ever opened
        ServerConfig(
            grpc_port=0,
            health_port=0,
            host="127.0.0.1",
            cert_path=str(secret),
            cert_reload=True,
            cert_reload_interval=0.05,
            transport=transport,
        ),
        lambda _name: True,
    )
    await server.start()
    try:
        assert await served_cert(server.grpc_port) == der(first[1])
        publish(secret, "v2", *second)

        async def second_served() -> bool:
            return await served_cert(server.grpc_port) == der(second[1])

        await eventually(second_served)
        # A new certificate with a key that is not its own is refused; the last good pair
        # keeps serving (the live context is never touched by a bad pair).
        caplog.set_level(logging.WARNING, logger="epp.extproc.cert_watch")
        third = tls.self_signed()
        publish(secret, "v3", first[0], third[1])
        await asyncio.sleep(0.3)
        assert await served_cert(server.grpc_port) == der(second[1])
        warnings = [r for r in caplog.records if "cannot be used" in r.getMessage()]
        assert len(warnings) == 1  # once, not once per poll
        # Another key type (EC to RSA) is served whole, not beside the old EC pair.
        rsa_pair = rsa_self_signed()
        publish(secret, "v4", *rsa_pair)

        async def rsa_served() -> bool:
            return await served_cert(server.grpc_port) == der(rsa_pair[1])

        await eventually(rsa_served)
    finally:
        await server.stop(0)


def test_a_watcher_without_changes_applies_nothing(tmp_path):
    from epp.extproc.cert_watch import CertWatcher

    (tmp_path / "tls.key").write_bytes(tls.self_signed()[0])
    (tmp_path / "tls.crt").write_bytes(b"")
    applied: list[bytes] = []
    watcher = CertWatcher(tmp_path, lambda key, cert: applied.append(cert), interval=1)
    assert watcher.check() is False  # nothing changed since it started
    key, cert = tls.self_signed()
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    assert watcher.check() is True and applied == [cert]
    assert watcher.check() is False and watcher.reloads == 1
    with pytest.raises(ValueError):
        CertWatcher(tmp_path, lambda k, c: None, interval=0)
