"""kvpick's HTTP/2 gRPC server (epp/extproc/h2server.py) against independent peers.

The peers are grpcio's C-core client and the ``h2`` library; frames the library will not
produce (CONTINUATION, padding, a bad preface) are written by hand. What is checked: echoes
of small and multi-megabyte messages both ways under flow control, gRPC status codes for
unknown methods, oversized and compressed messages and failing handlers, cancellation and
lost connections closing the handler exactly once, PING, TLS with ALPN, and a graceful stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Sequence

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import pytest

from epp.extproc import h2server, tls

pytestmark = pytest.mark.timeout(60)

ECHO = "/test.Echo/Echo"
BOOM = "/test.Echo/Boom"


class Recorder:
    def __init__(self) -> None:
        self.handlers: list[EchoHandler] = []


class EchoHandler:
    """Echoes each message; ``b"twice"`` is answered with two messages."""

    def __init__(self, recorder: Recorder, fail: bool = False) -> None:
        self.closed = 0
        self.messages: list[bytes] = []
        self.fail = fail
        recorder.handlers.append(self)

    def handle(self, message: bytes) -> Sequence[bytes]:
        if self.fail:
            raise RuntimeError("planted failure")
        self.messages.append(message)
        if message == b"twice":
            return (b"one", b"two")
        return (message,)

    def close(self) -> None:
        self.closed += 1


@contextlib.asynccontextmanager
async def serving(
    max_message: int = 8 << 20, secure: bool = False, max_send: int | None = None
) -> AsyncIterator[tuple[h2server.H2Server, Recorder, bytes | None]]:
    rec = Recorder()
    context = None
    cert = None
    if secure:
        key, cert = tls.self_signed()
        context = tls.server_context(key, cert)
    server = h2server.H2Server(
        {ECHO: lambda _emit: EchoHandler(rec), BOOM: lambda _emit: EchoHandler(rec, fail=True)},
        max_message=max_message,
        ssl_context=context,
        max_send=max_send,
    )
    await server.start("127.0.0.1", 0)
    try:
        yield server, rec, cert
    finally:
        await server.stop(0)


def _channel(port: int, cert: bytes | None = None) -> grpc.aio.Channel:
    options = [
        ("grpc.max_receive_message_length", 64 << 20),
        ("grpc.max_send_message_length", 64 << 20),
    ]
    if cert is None:
        return grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)
    options.append(("grpc.ssl_target_name_override", "localhost"))
    creds = grpc.ssl_channel_credentials(root_certificates=cert)
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=options)


async def _until(check, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


# ------------------------------------------------------------------ grpcio client


@pytest.mark.parametrize("secure", [False, True])
async def test_bidi_echo_small_and_large_messages(secure: bool) -> None:
    async with serving(secure=secure) as (server, rec, cert), _channel(server.port, cert) as ch:
        call = ch.stream_stream(ECHO)()
        big = bytes(range(256)) * (3 * 4096 + 7)  # ~3 MiB: many frames and window updates
        for msg in (b"a", b"", big, b"twice", b"z" * 70_000):
            await call.write(msg)
        got = [await call.read() for _ in range(6)]
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
    assert got == [b"a", b"", big, b"one", b"two", b"z" * 70_000]
    assert [h.closed for h in rec.handlers] == [1]


async def test_many_concurrent_streams_on_one_connection() -> None:
    async with serving() as (server, rec, _), _channel(server.port) as ch:

        async def one(i: int) -> bytes:
            call = ch.stream_stream(ECHO)()
            await call.write(f"m{i}".encode() * 1000)
            out = await call.read()
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
            return out

        outs = await asyncio.gather(*(one(i) for i in range(50)))
    assert outs == [f"m{i}".encode() * 1000 for i in range(50)]
    assert len(rec.handlers) == 50 and all(h.closed == 1 for h in rec.handlers)


async def test_unknown_method_is_unimplemented() -> None:
    async with serving() as (server, rec, _), _channel(server.port) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary("/test.Echo/Nope")(b"x")
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "/test.Echo/Nope" in (err.value.details() or "")
    assert rec.handlers == []


async def test_message_over_the_limit_is_resource_exhausted_and_connection_survives() -> None:
    async with serving(max_message=1000) as (server, rec, _), _channel(server.port) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary(ECHO)(b"x" * 1001)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "1001" in (err.value.details() or "")
        assert await ch.unary_unary(ECHO)(b"x" * 1000) == b"x" * 1000
    assert [h.closed for h in rec.handlers] == [1, 1]


async def test_reply_over_the_send_limit_is_resource_exhausted() -> None:
    async with (
        serving(max_message=1 << 20, max_send=1000) as (server, rec, _),
        _channel(server.port) as ch,
    ):
        assert await ch.unary_unary(ECHO)(b"y" * 1000) == b"y" * 1000
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary(ECHO)(b"y" * 1001)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "1001 bytes is over the send limit of 1000" in (err.value.details() or "")
        # A stream whose second reply is too big gets the first one, then the status.
        call = ch.stream_stream(ECHO)()
        await call.write(b"ok")
        assert await call.read() == b"ok"
        await call.write(b"z" * 2000)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await ch.unary_unary(ECHO)(b"after") == b"after"
    assert all(h.closed == 1 for h in rec.handlers)


async def test_failing_handler_is_internal_and_closed_once() -> None:
    async with serving() as (server, rec, _), _channel(server.port) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary(BOOM)(b"x")
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert await ch.unary_unary(ECHO)(b"still") == b"still"
    assert [h.closed for h in rec.handlers] == [1, 1]


async def test_client_cancel_closes_the_handler() -> None:
    async with serving() as (server, rec, _), _channel(server.port) as ch:
        call = ch.stream_stream(ECHO)()
        await call.write(b"hello")
        assert await call.read() == b"hello"
        call.cancel()
        await _until(lambda: rec.handlers and rec.handlers[0].closed == 1)
        assert await ch.unary_unary(ECHO)(b"after") == b"after"
    assert [h.closed for h in rec.handlers] == [1, 1]


# ------------------------------------------------------------------ h2 / raw peers


class RawPeer:
    """A client connection driven by hand with the ``h2`` library."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.events: list[h2.events.Event] = []
        self.eof = False

    @classmethod
    async def open(cls, port: int, window: int | None = None) -> RawPeer:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        peer = cls(reader, writer)
        peer.conn.initiate_connection()
        if window is not None:
            peer.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        await peer.flush()
        return peer

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def pump(self, until, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
        deadline = asyncio.get_running_loop().time() + timeout
        while not until():
            await self.flush()  # what ``until`` queued (window updates) goes out first
            left = deadline - asyncio.get_running_loop().time()
            assert left > 0, f"timed out; events so far: {self.events}"
            try:
                data = await asyncio.wait_for(self.reader.read(65536), left)
            except TimeoutError:
                continue
            if not data:
                self.eof = True
                return
            self.events.extend(self.conn.receive_data(data))
            await self.flush()

    def start(self, path: str = ECHO) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            sid,
            [
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", path.encode()),
                (b":authority", b"test"),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
            ],
        )
        return sid

    def of(self, kind: type, sid: int | None = None) -> list:  # type: ignore[type-arg]
        return [
            e
            for e in self.events
            if isinstance(e, kind) and (sid is None or getattr(e, "stream_id", None) == sid)
        ]

    def body(self, sid: int) -> bytes:
        return b"".join(e.data for e in self.of(h2.events.DataReceived, sid))

    def trailers(self, sid: int) -> dict[bytes, bytes]:
        found = self.of(h2.events.TrailersReceived, sid)
        if found:
            return dict(found[-1].headers)
        # trailers-only response: the status is in the (only) header block
        return dict(self.of(h2.events.ResponseReceived, sid)[-1].headers)


def _msg(payload: bytes, compressed: bool = False) -> bytes:
    return bytes((1 if compressed else 0,)) + struct.pack(">I", len(payload)) + payload


async def test_small_peer_window_is_respected() -> None:
    """The peer allows 1,000 bytes per stream; a 50 KB answer must wait for its
    WINDOW_UPDATEs (h2 raises on any frame beyond the window)."""
    async with serving() as (server, rec, _):
        peer = await RawPeer.open(server.port, window=1000)
        await peer.pump(lambda: peer.of(h2.events.SettingsAcknowledged))
        sid = peer.start()
        payload = b"w" * 50_000
        peer.conn.send_data(sid, _msg(payload), end_stream=True)
        await peer.flush()

        def acked() -> bool:
            for e in peer.of(h2.events.DataReceived, sid):
                if not getattr(e, "_acked", False):
                    peer.conn.acknowledge_received_data(e.flow_controlled_length, sid)
                    e._acked = True  # type: ignore[attr-defined]
            return bool(peer.of(h2.events.StreamEnded, sid))

        await peer.pump(acked)
        assert peer.body(sid) == _msg(payload)
        assert peer.trailers(sid)[b"grpc-status"] == b"0"
        peer.writer.close()
    assert [h.closed for h in rec.handlers] == [1]


async def test_ping_is_answered_with_the_same_payload() -> None:
    async with serving() as (server, _, _):
        peer = await RawPeer.open(server.port)
        peer.conn.ping(b"12345678")
        await peer.flush()
        await peer.pump(lambda: peer.of(h2.events.PingAckReceived))
        assert peer.of(h2.events.PingAckReceived)[0].ping_data == b"12345678"
        peer.writer.close()


async def test_compressed_message_is_unimplemented() -> None:
    async with serving() as (server, rec, _):
        peer = await RawPeer.open(server.port)
        sid = peer.start()
        peer.conn.send_data(sid, _msg(b"zz", compressed=True))
        await peer.flush()
        await peer.pump(lambda: bool(peer.of(h2.events.StreamEnded, sid)))
        assert peer.trailers(sid)[b"grpc-status"] == b"12"
        peer.writer.close()
        await _until(lambda: rec.handlers and rec.handlers[0].closed == 1)
    assert rec.handlers[0].messages == []


async def test_lost_connection_closes_open_handlers() -> None:
    async with serving() as (server, rec, _):
        peer = await RawPeer.open(server.port)
        sids = [peer.start() for _ in range(3)]
        for sid in sids:
            peer.conn.send_data(sid, _msg(b"open"))
        await peer.flush()
        await peer.pump(lambda: all(peer.of(h2.events.DataReceived, s) for s in sids))
        assert [h.closed for h in rec.handlers] == [0, 0, 0]
        peer.writer.transport.abort()
        await _until(lambda: [h.closed for h in rec.handlers] == [1, 1, 1])


async def test_graceful_stop_finishes_open_streams_and_refuses_new_ones() -> None:
    async with serving() as (server, rec, _), _channel(server.port) as ch:
        call = ch.stream_stream(ECHO)()
        await call.write(b"before")
        assert await call.read() == b"before"
        stopping = asyncio.create_task(server.stop(5.0))
        await asyncio.sleep(0.2)
        assert not stopping.done()  # waiting for the open stream
        # The open stream still works to its end.
        await call.write(b"after")
        assert await call.read() == b"after"
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
        await asyncio.wait_for(stopping, 5)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary(ECHO)(b"new", timeout=2)
        assert err.value.code() in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )
    assert [h.closed for h in rec.handlers] == [1]


async def test_new_stream_after_goaway_is_refused() -> None:
    async with serving() as (server, rec, _):
        peer = await RawPeer.open(server.port)
        sid = peer.start()
        peer.conn.send_data(sid, _msg(b"open"))
        await peer.flush()
        await peer.pump(lambda: bool(peer.of(h2.events.DataReceived, sid)))
        stopping = asyncio.create_task(server.stop(5.0))
        await peer.pump(lambda: bool(peer.of(h2.events.ConnectionTerminated)))
        assert peer.of(h2.events.ConnectionTerminated)[0].error_code == 0
        # h2 will not open streams after GOAWAY; write one by hand.
        block = hpack.Encoder().encode([(":method", "POST"), (":path", ECHO)])
        peer.writer.write(_frame(h2server.HEADERS, h2server.END_HEADERS, 3, block))
        await peer.writer.drain()
        got = await asyncio.wait_for(peer.reader.read(65536), 5)
        resets = [f for f in _frames(got) if f[0] == h2server.RST_STREAM and f[2] == 3]
        assert resets and int.from_bytes(resets[0][3], "big") == h2server.REFUSED_STREAM
        peer.writer.transport.abort()
        await asyncio.wait_for(stopping, 5)
    assert len(rec.handlers) == 1 and rec.handlers[0].closed == 1


# ------------------------------------------------------------------ hand-made frames


def _frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes((ftype, flags))
        + struct.pack(">I", sid)
        + payload
    )


async def _raw_exchange(port: int, data: bytes, wait_for: bytes | None = None) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    got = b""
    with contextlib.suppress(asyncio.TimeoutError, ConnectionResetError):
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), 2.0)
            if not chunk:
                break
            got += chunk
            if wait_for is not None and wait_for in got:
                break
    writer.close()
    return got


def _frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    out = []
    while len(data) >= 9:
        n = int.from_bytes(data[:3], "big")
        out.append(
            (data[3], data[4], int.from_bytes(data[5:9], "big") & 0x7FFFFFFF, data[9 : 9 + n])
        )
        data = data[9 + n :]
    return out


async def test_bad_preface_gets_goaway_protocol_error() -> None:
    async with serving() as (server, _, _):
        got = await _raw_exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    goaways = [f for f in _frames(got) if f[0] == h2server.GOAWAY]
    assert goaways and int.from_bytes(goaways[0][3][4:8], "big") == h2server.PROTOCOL_ERROR


async def test_continuation_and_padding_are_understood() -> None:
    enc = hpack.Encoder()
    block = enc.encode(
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", ECHO),
            (":authority", "test"),
            ("content-type", "application/grpc"),
            ("x-filler", "f" * 300),
        ]
    )
    first, rest = block[:20], block[20:]
    pad = 7
    data = _msg(b"padded")
    stream = (
        h2server.PREFACE
        + _frame(h2server.SETTINGS, 0, 0, b"")
        # HEADERS, padded, without END_HEADERS, then two CONTINUATIONs
        + _frame(h2server.HEADERS, h2server.PADDED, 1, bytes((pad,)) + first + b"\0" * pad)
        + _frame(h2server.CONTINUATION, 0, 1, rest[:50])
        + _frame(h2server.CONTINUATION, h2server.END_HEADERS, 1, rest[50:])
        + _frame(
            h2server.DATA, h2server.PADDED | h2server.END_STREAM, 1, bytes((3,)) + data + b"\0\0\0"
        )
    )
    async with serving() as (server, rec, _):
        got = await _raw_exchange(server.port, stream, wait_for=b"grpc-status")
    frames = _frames(got)
    body = b"".join(f[3] for f in frames if f[0] == h2server.DATA and f[2] == 1)
    assert body == data
    assert rec.handlers[0].messages == [b"padded"] and rec.handlers[0].closed == 1


async def test_bytes_arriving_one_at_a_time() -> None:
    """Preface, frames and messages split at every byte boundary still make one echo."""
    block = hpack.Encoder().encode(
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", ECHO),
            (":authority", "t"),
            ("content-type", "application/grpc"),
        ]
    )
    data = _msg(b"one byte at a time")
    stream = (
        h2server.PREFACE
        + _frame(h2server.SETTINGS, 0, 0, b"")
        + _frame(h2server.HEADERS, h2server.END_HEADERS, 1, block)
        + _frame(h2server.DATA, h2server.END_STREAM, 1, data)
    )
    async with serving() as (server, rec, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        for i in range(len(stream)):
            writer.write(stream[i : i + 1])
            await writer.drain()
            await asyncio.sleep(0.001)
        got = b""
        while b"grpc-status" not in got:
            got += await asyncio.wait_for(reader.read(65536), 5)
        writer.close()
    body = b"".join(f[3] for f in _frames(got) if f[0] == h2server.DATA and f[2] == 1)
    assert body == data
    assert rec.handlers[0].messages == [b"one byte at a time"]


async def test_interrupted_header_block_is_a_protocol_error() -> None:
    enc = hpack.Encoder()
    block = enc.encode([(":method", "POST"), (":path", ECHO)])
    stream = (
        h2server.PREFACE
        + _frame(h2server.SETTINGS, 0, 0, b"")
        + _frame(h2server.HEADERS, 0, 1, block)  # no END_HEADERS
        + _frame(h2server.PING, 0, 0, b"8bytes!!")  # not a CONTINUATION
    )
    async with serving() as (server, rec, _):
        got = await _raw_exchange(server.port, stream)
    goaways = [f for f in _frames(got) if f[0] == h2server.GOAWAY]
    assert goaways and int.from_bytes(goaways[0][3][4:8], "big") == h2server.PROTOCOL_ERROR
    assert rec.handlers == []


async def test_ssl_context_offers_h2_only() -> None:
    key, cert = tls.self_signed()
    ctx = tls.server_context(key, cert)
    server = h2server.H2Server(
        {ECHO: lambda _emit: EchoHandler(Recorder())}, max_message=1 << 20, ssl_context=ctx
    )
    await server.start("127.0.0.1", 0)
    try:
        client = ssl.create_default_context()
        client.check_hostname = False
        client.verify_mode = ssl.CERT_NONE
        client.set_alpn_protocols(["h2", "http/1.1"])
        _, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=client)
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        writer.close()
    finally:
        await server.stop(0)


def test_port_in_use_is_an_oserror() -> None:
    async def main() -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            port = s.getsockname()[1]
            server = h2server.H2Server({}, max_message=1)
            with pytest.raises(OSError):
                await server.start("127.0.0.1", port)

    asyncio.run(main())
