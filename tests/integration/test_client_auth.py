"""``--client-ca``: the ext_proc port admits only clients holding a certificate its CA
signed (mutual TLS), with both transports, across certificate reloads, and with a real
Envoy presenting the gateway's certificate in front of a ``kvpick epp`` process.

Refused here: a client with no certificate, one whose certificate another CA signed, and
one presenting a server certificate of the right CA (its key usage says it is not a
client). Admitted: a gRPC client with the CA's client certificate. The health port stays
plaintext and open throughout.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
from pathlib import Path

import aiohttp
import grpc
import pytest
from prometheus_client import REGISTRY

from bench.procstat import free_port
from bench.stack import stack
from bench.tiny_tokenizer import build_tiny_model
from epp.extproc import pki, tls
from epp.extproc.h2server import PREFACE
from epp.extproc.server import ExtProcServer, ServerConfig
from gateway.envoy_config import GatewayConfig
from gateway.envoy_proc import EnvoyProcess

pytestmark = pytest.mark.timeout(120)

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
SERVING = b"\x08\x01"
TRANSPORTS = ["h2", "grpcio"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", "llama3")


def refusals() -> float:
    value = REGISTRY.get_sample_value(
        "kvpick_extproc_connections_closed_total", {"reason": "client_certificate"}
    )
    return value or 0.0


class Client:
    """A TLS client of the ext_proc port, with or without a certificate of its own; it
    verifies the EPP's certificate against ``server_ca`` (name ``localhost``)."""

    def __init__(self, directory: Path, server_ca: bytes, pair: pki.Issued | None) -> None:
        self.server_ca = server_ca
        self.pair = pair
        self.files = pair.write(directory) if pair is not None else None

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cadata=self.server_ca.decode())
        ctx.set_alpn_protocols(["h2"])
        if self.files is not None:
            key, cert = self.files
            ctx.load_cert_chain(cert, key)
        return ctx

    async def first_frame(self, port: int) -> str:
        """``admitted`` when the server's first HTTP/2 frame (its SETTINGS) arrives after
        our preface, ``refused`` when the server fails the handshake or closes the
        connection first; ``untrusted server`` when this client refuses the server."""
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=self.ssl_context(), server_hostname="localhost"
            )
        except ssl.SSLCertVerificationError:
            return "untrusted server"  # our verdict, not the server's
        except (ssl.SSLError, ConnectionError):
            return "refused"
        try:
            writer.write(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # empty SETTINGS
            try:
                header = await asyncio.wait_for(reader.readexactly(9), 5)
            except (asyncio.IncompleteReadError, ssl.SSLError, ConnectionError):
                return "refused"
            assert header[3] == 4, header  # a SETTINGS frame
            return "admitted"
        finally:
            writer.close()

    async def health(self, port: int) -> bytes | grpc.StatusCode:
        """A gRPC health check over TLS on the ext_proc port: the reply, or the status."""
        kwargs: dict[str, bytes] = {}
        if self.pair is not None:
            kwargs = {"private_key": self.pair.key_pem, "certificate_chain": self.pair.cert_pem}
        creds = grpc.ssl_channel_credentials(root_certificates=self.server_ca, **kwargs)
        options = [("grpc.ssl_target_name_override", "localhost")]
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=options) as ch:
            try:
                return await ch.unary_unary(HEALTH_CHECK)(b"", timeout=5)
            except grpc.aio.AioRpcError as exc:
                return exc.code()


async def plaintext_health(port: int) -> bytes:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        return await ch.unary_unary(HEALTH_CHECK)(b"", timeout=5)


def mtls_server(transport: str, cert_path: Path, client_ca: Path, **extra) -> ExtProcServer:
    return ExtProcServer(
        None,  # health checks and handshakes only: no ext_proc stream is opened
        ServerConfig(
            grpc_port=0,
            health_port=0,
            host="127.0.0.1",
            cert_path=str(cert_path),
            client_ca=str(client_ca),
            transport=transport,
            health_on_grpc_port=True,
            **extra,
        ),
        lambda _name: True,
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_only_clients_with_a_certificate_from_the_ca_are_admitted(
    tmp_path: Path, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    files = pki.write_set(tmp_path / "certs")
    ca = files.ca.read_bytes()
    server = mtls_server(transport, files.epp_dir, files.ca)
    caplog.set_level(logging.INFO, logger="epp.extproc.server")
    await server.start()
    try:
        port = server.grpc_port
        issuer = pki.CertificateAuthority("a CA the EPP does not trust")
        nobody = Client(tmp_path / "none", ca, None)
        stranger = Client(tmp_path / "other", ca, issuer.issue_client())
        gateway = Client(
            tmp_path / "gw",
            ca,
            pki.Issued(files.gateway_key.read_bytes(), files.gateway_cert.read_bytes()),
        )
        assert await nobody.first_frame(port) == "refused"
        assert await stranger.first_frame(port) == "refused"
        assert await gateway.first_frame(port) == "admitted"
        # Through real gRPC clients too: only the gateway's call is answered.
        assert await nobody.health(port) == grpc.StatusCode.UNAVAILABLE
        assert await stranger.health(port) == grpc.StatusCode.UNAVAILABLE
        assert await gateway.health(port) == SERVING
        # The health port needs no certificate (kubelet probes it in plaintext).
        assert await plaintext_health(server.health_port) == SERVING
        started = [r.getMessage() for r in caplog.records if r.name == "epp.extproc.server"]
        assert any(
            "must present a certificate signed by a CA in " + str(files.ca) in m for m in started
        )
    finally:
        await server.stop(0)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_server_certificate_of_the_right_ca_is_no_client_certificate(
    tmp_path: Path, transport: str
) -> None:
    ca = pki.CertificateAuthority()
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    ca.issue_server().write(tmp_path / "epp")
    server = mtls_server(transport, tmp_path / "epp", tmp_path / "ca.crt")
    await server.start()
    try:
        posing = Client(tmp_path / "posing", ca.cert_pem, ca.issue_server(("gateway",)))
        assert await posing.first_frame(server.grpc_port) == "refused"
        real = Client(tmp_path / "real", ca.cert_pem, ca.issue_client())
        assert await real.first_frame(server.grpc_port) == "admitted"
    finally:
        await server.stop(0)


async def test_refusals_are_counted_and_logged_at_most_once_per_interval(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    fresh = tls.RefusedClients(interval=60.0)
    monkeypatch.setattr(tls, "REFUSED", fresh)
    files = pki.write_set(tmp_path / "certs")
    ca = files.ca.read_bytes()
    server = mtls_server("h2", files.epp_dir, files.ca)
    await server.start()
    caplog.set_level(logging.DEBUG)
    try:
        before = refusals()
        nobody = Client(tmp_path / "none", ca, None)
        stranger = Client(tmp_path / "other", ca, pki.CertificateAuthority().issue_client())
        for _ in range(15):
            assert await nobody.first_frame(server.grpc_port) == "refused"
            assert await stranger.first_frame(server.grpc_port) == "refused"
        assert refusals() - before == 30
        assert fresh.refused == 30
        lines = [r for r in caplog.records if r.levelno >= logging.INFO]
        # One line for thirty refusals, at INFO, from kvpick; nothing from asyncio.
        assert [(r.name, r.levelname) for r in lines] == [("epp.extproc.tls", "INFO")]
        assert "it presented no certificate" in lines[0].getMessage()
        # Once the interval has passed, the next refusal is logged with the count of those
        # that were not.
        fresh.interval = 0.2
        await asyncio.sleep(0.25)
        assert await stranger.first_frame(server.grpc_port) == "refused"
        second = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO][1:]
        assert len(second) == 1
        assert "did not verify (unable to get local issuer certificate)" in second[0]
        assert "29 more refused since the last such line" in second[0]
    finally:
        await server.stop(0)


def publish(secret: Path, version: str, files: dict[str, bytes]) -> None:
    """Write files the way a Kubernetes Secret volume updates (cert-manager's ``tls.crt``,
    ``tls.key`` and ``ca.crt``): a new versioned folder, then one atomic swap of the
    ``..data`` link every file link points through."""
    folder = secret / version
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    tmp = secret / "..data_tmp"
    tmp.symlink_to(version)
    os.replace(tmp, secret / "..data")
    for name in files:
        if not (secret / name).is_symlink():
            (secret / name).symlink_to(f"..data/{name}")


def secret_files(ca: pki.CertificateAuthority) -> dict[str, bytes]:
    pair = ca.issue_server()
    return {"tls.crt": pair.cert_pem, "tls.key": pair.key_pem, "ca.crt": ca.cert_pem}


async def eventually(check, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_reload_keeps_requiring_client_certificates_and_takes_the_new_ca(
    tmp_path: Path, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    first, second = pki.CertificateAuthority("first"), pki.CertificateAuthority("second")
    publish(secret, "v1", secret_files(first))
    server = mtls_server(
        transport, secret, secret / "ca.crt", cert_reload=True, cert_reload_interval=0.05
    )
    await server.start()
    try:
        port = server.grpc_port
        # Each client also verifies the EPP's certificate, so it tells which pair is served.
        old_gateway = Client(tmp_path / "old", first.cert_pem, first.issue_client())
        new_gateway = Client(tmp_path / "new", second.cert_pem, second.issue_client())
        assert await old_gateway.health(port) == SERVING
        assert await new_gateway.health(port) == grpc.StatusCode.UNAVAILABLE
        # Serving certificate and CA both rotate, as when cert-manager renews a Secret.
        publish(secret, "v2", secret_files(second))

        async def new_admitted() -> bool:
            return await new_gateway.first_frame(port) == "admitted"

        await eventually(new_admitted)
        assert await new_gateway.health(port) == SERVING
        nobody = Client(tmp_path / "n1", second.cert_pem, None)
        assert await nobody.first_frame(port) == "refused"
        assert await nobody.health(port) == grpc.StatusCode.UNAVAILABLE
        # The old CA's client is refused now (it would also reject the new serving
        # certificate, so it is made to trust that one: the refusal is the EPP's).
        old_client = Client(tmp_path / "old2", second.cert_pem, old_gateway.pair)
        assert await old_client.first_frame(port) == "refused"
        # A CA file that holds no certificate is not applied; the last good set stays.
        caplog.set_level(logging.WARNING, logger="epp.extproc.cert_watch")
        broken = secret_files(pki.CertificateAuthority("third"))
        broken["ca.crt"] = b"not a certificate\n"
        publish(secret, "v3", broken)
        await asyncio.sleep(0.4)
        assert await new_gateway.health(port) == SERVING
        assert await nobody.first_frame(port) == "refused"
        warnings = [r.getMessage() for r in caplog.records if "cannot be used" in r.getMessage()]
        assert len(warnings) == 1
        assert "holds no certificate" in warnings[0]
    finally:
        await server.stop(0)


def connect_blocking(
    port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[str, bool, ssl.SSLSession | None]:
    """One TLS connection offering ``session`` for resumption: (``admitted`` or
    ``refused``, whether the session was resumed, the session to offer next time)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            conn = ctx.wrap_socket(raw, server_hostname="localhost", session=session)
        except (ssl.SSLError, ConnectionError):
            return "refused", False, None
        with conn:
            try:
                conn.sendall(PREFACE)
                first = conn.recv(9)
            except (ssl.SSLError, ConnectionError):
                first = b""
            verdict = "admitted" if first[3:4] == b"\x04" else "refused"
            return verdict, conn.session_reused, conn.session


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"]
)
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_session_from_before_a_ca_change_is_not_resumed(
    tmp_path: Path, transport: str, version: ssl.TLSVersion
) -> None:
    # A resumed TLS session skips the client certificate: one made under the old CA must
    # not outlive it.
    secret = tmp_path / "secret"
    secret.mkdir()
    first, second = pki.CertificateAuthority("first"), pki.CertificateAuthority("second")
    publish(secret, "v1", secret_files(first))
    server = mtls_server(
        transport, secret, secret / "ca.crt", cert_reload=True, cert_reload_interval=0.05
    )
    await server.start()
    try:
        port = server.grpc_port
        old = Client(tmp_path / "old", first.cert_pem + second.cert_pem, first.issue_client())
        ctx = old.ssl_context()
        ctx.maximum_version = version
        verdict, _, session = await asyncio.to_thread(connect_blocking, port, ctx)
        assert verdict == "admitted" and session is not None
        publish(secret, "v2", secret_files(second))
        new = Client(tmp_path / "new", second.cert_pem, second.issue_client())

        async def new_admitted() -> bool:
            return await new.first_frame(port) == "admitted"

        await eventually(new_admitted)
        verdict, resumed, _ = await asyncio.to_thread(connect_blocking, port, ctx, session)
        assert (verdict, resumed) == ("refused", False)
    finally:
        await server.stop(0)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_envoy_with_the_gateway_certificate_routes_through_an_epp_requiring_one(
    tmp_path: Path, tiny_model: Path, transport: str
) -> None:
    files = pki.write_set(tmp_path / "certs")
    epp_args = [
        "--client-ca",
        str(files.ca),
        "--cert-path",
        str(files.epp_dir),
        "--ext-proc-server",
        transport,
    ]
    gateway = {
        "epp_client_cert": str(files.gateway_cert),
        "epp_client_key": str(files.gateway_key),
        "epp_ca": str(files.ca),  # Envoy verifies the EPP in turn
        "epp_server_name": "localhost",
    }
    chat = {
        "model": "tiny",
        "max_tokens": 4,
        "messages": [{"role": "user", "content": "a question that goes through the EPP"}],
    }
    async with (
        stack(tmp_path, tiny_model, sims=1, epp_args=epp_args, gateway=gateway) as st,
        aiohttp.ClientSession() as s,
    ):
        for _ in range(3):
            async with s.post(st.url + "/v1/chat/completions", json=chat) as resp:
                body = await resp.read()
                # 200 means the EPP picked the engine: Envoy has no other route to it.
                assert resp.status == 200, body[:300]
        stats = st.envoy.stats("cluster.ext_proc.ssl.handshake")
        assert stats.get("cluster.ext_proc.ssl.handshake", 0) >= 1
        # An Envoy without the client certificate is refused by the same EPP: requests
        # through it fail (the gateway fails closed), and the EPP keeps serving the first.
        cfg = GatewayConfig(
            listen_port=free_port(), admin_port=free_port(), epp_port=st.epp.grpc_port
        )
        (tmp_path / "envoy-nocert").mkdir()
        other = EnvoyProcess(cfg, workdir=str(tmp_path / "envoy-nocert"))
        await asyncio.to_thread(other.start)
        try:
            async with s.post(other.url + "/v1/chat/completions", json=chat) as resp:
                assert resp.status >= 500, resp.status
            errors = other.stats("cluster.ext_proc.ssl")
            assert errors.get("cluster.ext_proc.ssl.handshake", 0) == 0
        finally:
            other.stop()
        async with s.post(st.url + "/v1/chat/completions", json=chat) as resp:
            assert resp.status == 200
        log = st.epp.log()
        assert "must present a certificate signed by a CA in" in log
        assert "Handshake failed" not in log  # grpc's per-connection line stays quiet
        # However often the Envoy without a certificate tried, one line said so (kvpick's
        # own server; grpcio's refusals are not seen by kvpick).
        assert log.count("refused a TLS client") == (1 if transport == "h2" else 0)
