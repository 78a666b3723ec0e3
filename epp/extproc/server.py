"""The ext_proc gRPC server (:9002) and the health server (:9003).

Two implementations serve the same methods, chosen by ``ServerConfig.transport``:

* ``h2`` (the default): :mod:`epp.extproc.h2server`, gRPC on HTTP/2 inside the event loop,
  no threads; each exchange with the gateway costs one wake-up of the EPP instead of two.
* ``grpcio``: grpc.aio, with ``Process`` registered as a raw-bytes stream-stream handler.

Either way messages go through :mod:`epp.extproc.wire`, not generated protobuf classes,
because the per-message cost bounds how many token streams one EPP relays.

With ``ServerConfig.client_ca`` both transports require a client certificate signed by
that CA (mutual TLS) on the ext_proc port; the health port stays plaintext and open, as
kubelet probes need it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from epp import metrics as M
from epp.extproc import cert_watch, h2server, health, tls
from epp.extproc.stream import ExtProcStream, Router, StreamLimits
from epp.extproc.stream_error import StreamError

log = logging.getLogger(__name__)

SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024
"""Default gRPC send/receive limit: a BUFFERED gateway sends the whole body in one message,
and Python gRPC's own 4 MiB default would fail long prompts."""


@dataclass(slots=True)
class ServerConfig:
    """Where and how to serve. ``cert_path`` None with ``secure`` makes a self-signed
    certificate; ``host`` is the listen address (all interfaces by default)."""

    grpc_port: int = 9002
    health_port: int = 9003
    host: str = "0.0.0.0"
    secure: bool = True
    cert_path: str | None = None
    max_recv: int = DEFAULT_MAX_MESSAGE
    max_send: int = DEFAULT_MAX_MESSAGE
    health_on_grpc_port: bool = False
    transport: str = "h2"
    """``h2`` (kvpick's in-loop HTTP/2 server) or ``grpcio`` (grpc.aio)."""
    cert_reload: bool = False
    """Serve new certificates written to ``cert_path`` (``--enable-cert-reload``)."""
    cert_reload_interval: float = cert_watch.DEFAULT_INTERVAL
    limits: StreamLimits = field(default_factory=StreamLimits)
    """Request body limits applied on every ext_proc stream."""
    listener: h2server.H2Limits = field(default_factory=h2server.H2Limits)
    """What a client of the ext_proc port may do (the ``h2`` transport)."""
    client_ca: str | None = None
    """PEM CA bundle file: when set, ext_proc clients must present a certificate it signed
    (mutual TLS); needs ``secure``. With ``cert_reload`` a changed bundle applies from the
    next handshake, like a changed certificate."""


TRANSPORTS = ("h2", "grpcio")
_STATUS = {status.value[0]: status for status in grpc.StatusCode}


class _HealthCall:
    """A ``Health/Check`` call on :class:`h2server.H2Server`: one answer per request."""

    __slots__ = ("_is_serving",)

    def __init__(self, is_serving: Callable[[str], bool]) -> None:
        self._is_serving = is_serving

    def handle(self, message: bytes) -> tuple[bytes]:
        serving = self._is_serving(health.decode_service(message))
        return (health.encode_status(health.SERVING if serving else health.NOT_SERVING),)

    def close(self) -> None:
        pass


def process_handler(
    router: Router,
    limits: StreamLimits | None = None,
    after_large: Callable[[], None] | None = None,
) -> grpc.GenericRpcHandler:
    """The ``ExternalProcessor/Process`` handler, one :class:`ExtProcStream` per call.

    Requests are read by a task of their own, so that replies the stream emits later (a
    routing finished off the event loop, a body timeout) go out without waiting for the
    gateway's next message; every reply passes through one queue, in the stream's order.
    """

    async def process(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        out: asyncio.Queue[bytes | None] = asyncio.Queue()
        put = out.put_nowait

        def emit(replies: Sequence[bytes]) -> None:
            for reply in replies:
                put(reply)
            if ended and not stream.pending:
                put(None)

        ended = False
        stream = ExtProcStream(router, limits, emit, after_large)

        async def read() -> None:
            nonlocal ended
            try:
                async for data in requests:
                    for reply in stream.handle(data):
                        put(reply)
            finally:
                ended = True
                if not stream.pending:
                    put(None)  # the gateway is done and nothing is still being decided

        reader = asyncio.ensure_future(read())
        try:
            while (reply := await out.get()) is not None:
                yield reply
            try:
                await reader  # re-raises what ended the request stream, if anything did
            except StreamError as exc:
                M.EXTPROC_STREAMS_ENDED.labels(exc.reason).inc()
                await context.abort(_STATUS[exc.code], str(exc))
        finally:
            reader.cancel()
            stream.close()

    return grpc.method_handlers_generic_handler(
        SERVICE, {"Process": grpc.stream_stream_rpc_method_handler(process)}
    )


class ExtProcServer:
    """The two gRPC servers of the EPP. ``is_serving(service)`` answers health checks."""

    def __init__(
        self,
        router: Router,
        config: ServerConfig,
        is_serving: Callable[[str], bool],
        after_large: Callable[[], None] | None = None,
    ) -> None:
        """``after_large`` runs when a stream's large request body is done with."""
        self.config = config
        self._after_large = after_large
        self._router = router
        self._is_serving = is_serving
        self._grpc: grpc.aio.Server | h2server.H2Server | None = None
        self._health: grpc.aio.Server | h2server.H2Server | None = None
        self._watcher: cert_watch.CertWatcher | None = None
        self._seen: cert_watch.Fingerprint | None = None
        self.grpc_port = config.grpc_port
        self.health_port = config.health_port

    def _credentials(self) -> tuple[bytes, bytes, str] | None:
        cfg = self.config
        if not cfg.secure:
            if cfg.client_ca:
                raise tls.CertificateError(
                    "a client CA (--client-ca) needs TLS on the ext_proc port, which "
                    "--secure-serving=false turns off"
                )
            return None
        if cfg.cert_path:
            key, cert = tls.load(cfg.cert_path)
            return key, cert, cfg.cert_path
        key, cert = tls.self_signed()
        return key, cert, "self-signed"

    def _client_ca(self) -> bytes | None:
        """The client CA bundle as PEM, read now; raises :class:`tls.CertificateError`
        naming the file when it is unusable."""
        path = self.config.client_ca
        if not path:
            return None
        try:
            return tls.load_client_ca(path)
        except tls.CertificateError as exc:
            raise tls.CertificateError(f"--client-ca: {exc}") from None

    async def start(self) -> None:
        """Bind both ports and start serving; raises OSError on bind failure and
        :class:`tls.CertificateError` (a ValueError) on an unusable certificate or client
        CA."""
        cfg = self.config
        if cfg.transport not in TRANSPORTS:
            raise ValueError(
                f"unknown ext_proc transport {cfg.transport!r}; use one of {TRANSPORTS}"
            )
        if cfg.cert_reload and cfg.cert_path and cfg.secure:
            # Taken before the files are read.
            self._seen = cert_watch.fingerprint(cfg.cert_path, self._also())
        creds = self._credentials()
        client_ca = self._client_ca()
        if cfg.transport == "h2":
            await self._start_h2(creds, client_ca)
        else:
            await self._start_grpcio(creds, client_ca)
        if self._watcher is not None:
            self._watcher.start()
            watched = " and ".join((str(cfg.cert_path), *self._also()))
            log.info("watching %s for new certificates every %gs", watched, self._watcher.interval)
        log.info(
            "ext_proc listening on %s:%d (%s, %s); health on :%d",
            cfg.host,
            self.grpc_port,
            creds[2] if creds is not None else "plaintext",
            cfg.transport,
            self.health_port,
        )
        if client_ca is not None:
            log.info(
                "ext_proc clients must present a certificate signed by a CA in %s "
                "(mutual TLS, %d CA certificate(s)); others are refused at the handshake",
                cfg.client_ca,
                client_ca.count(b"-----BEGIN CERTIFICATE-----"),
            )

    async def _start_h2(
        self, creds: tuple[bytes, bytes, str] | None, client_ca: bytes | None
    ) -> None:
        cfg = self.config
        context = None
        if creds is not None:
            reloadable = tls.ReloadableContext(creds[0], creds[1], client_ca)
            context = reloadable.listening

            def swap(key: bytes, cert: bytes) -> None:
                reloadable.replace(key, cert, self._client_ca())

            self._watch(swap)
        router = self._router
        after_large = self._after_large
        handlers: dict[str, h2server.HandlerFactory] = {
            f"/{SERVICE}/Process": lambda emit: ExtProcStream(router, cfg.limits, emit, after_large)
        }
        if cfg.health_on_grpc_port:
            handlers[f"/{health.SERVICE}/Check"] = lambda _emit: _HealthCall(lambda _name: True)
        server = h2server.H2Server(
            handlers,
            max_message=cfg.max_recv,
            ssl_context=context,
            max_send=cfg.max_send,
            limits=cfg.listener,
            # The trimmer: a closed TLS connection frees its buffers to malloc's heap.
            after_close=self._after_large,
        )
        is_serving = self._is_serving
        hserver = h2server.H2Server(
            {f"/{health.SERVICE}/Check": lambda _emit: _HealthCall(is_serving)},
            max_message=64 * 1024,
        )
        self.grpc_port = await server.start(cfg.host, cfg.grpc_port)
        try:
            self.health_port = await hserver.start(cfg.host, cfg.health_port)
        except OSError:
            await server.stop(0)
            raise
        self._grpc, self._health = server, hserver

    async def _start_grpcio(
        self, creds: tuple[bytes, bytes, str] | None, client_ca: bytes | None
    ) -> None:
        cfg = self.config
        options = [
            ("grpc.max_receive_message_length", cfg.max_recv),
            ("grpc.max_send_message_length", cfg.max_send),
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers(
            (process_handler(self._router, cfg.limits, self._after_large),)
        )
        if cfg.health_on_grpc_port:
            server.add_generic_rpc_handlers((health.health_handler(lambda _name: True),))
        address = f"{cfg.host}:{cfg.grpc_port}"
        if creds is not None:
            # grpc asks the fetcher at each handshake; it hands over a new pair once.
            pending: list[Any] = []

            def swap(key: bytes, cert: bytes) -> None:
                ca = self._client_ca() if client_ca is not None else None
                tls.server_context(key, cert, ca)  # raises unless the pair and CA are usable
                pending[:] = [grpc.ssl_server_certificate_configuration([(key, cert)], ca)]

            def fetch() -> Any:
                return pending.pop() if pending else None

            self._watch(swap)
            # With a client CA, grpc requires and verifies a client certificate at every
            # handshake; each configuration fetch() hands over carries the CA it verifies
            # against.
            credentials = grpc.dynamic_ssl_server_credentials(
                grpc.ssl_server_certificate_configuration([(creds[0], creds[1])], client_ca),
                fetch,
                require_client_authentication=client_ca is not None,
            )
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        self.grpc_port = port
        hserver = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        hserver.add_generic_rpc_handlers((health.health_handler(self._is_serving),))
        hport = hserver.add_insecure_port(f"{cfg.host}:{cfg.health_port}")
        if hport == 0:
            raise OSError(f"cannot listen on {cfg.host}:{cfg.health_port}")
        self.health_port = hport
        await server.start()
        await hserver.start()
        self._grpc, self._health = server, hserver

    def _also(self) -> tuple[str, ...]:
        """Files watched with the certificate pair: the client CA bundle, if any."""
        return (self.config.client_ca,) if self.config.client_ca else ()

    def _watch(self, apply: cert_watch.Apply) -> None:
        cfg = self.config
        if cfg.cert_reload and cfg.cert_path:
            self._watcher = cert_watch.CertWatcher(
                cfg.cert_path, apply, cfg.cert_reload_interval, seen=self._seen, also=self._also()
            )

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stop accepting streams; streams in flight get ``grace`` seconds to finish."""
        if self._watcher is not None:
            await self._watcher.stop()
            self._watcher = None
        for server in (self._grpc, self._health):
            if server is not None:
                await server.stop(grace)
        self._grpc = self._health = None
