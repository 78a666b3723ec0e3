"""What kvpick's HTTP/2 server bounds, against real peers (the ``h2`` library, raw sockets,
TLS clients): one connection's backlog against another connection's latency, messages kept
in order across turns, streams a handler ends with a status of its own, and the connection
limits (count, handshake and preface timeouts, idle close)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
import time
from collections.abc import AsyncIterator, Sequence

import h2.config
import h2.connection
import h2.events
import pytest

from epp.extproc import h2server, tls
from epp.extproc.stream_error import INVALID_ARGUMENT, StreamError

pytestmark = pytest.mark.timeout(60)

ECHO = "/test.Echo/Echo"
COUNT = "/test.Echo/Count"
PICKY = "/test.Echo/Picky"
WORK_SECONDS = 20e-6
"""What each message costs the counting handler: a flood of 100,000 is two seconds of work."""


class Counting:
    """Records each message's sequence number, spending :data:`WORK_SECONDS` on each."""

    def __init__(self, seen: list[int]) -> None:
        self.seen = seen

    def handle(self, message: bytes) -> Sequence[bytes]:
        until = time.perf_counter() + WORK_SECONDS
        while time.perf_counter() < until:
            pass
        self.seen.append(int.from_bytes(message, "big"))
        return ()

    def close(self) -> None:
        pass


class Echo:
    def handle(self, message: bytes) -> Sequence[bytes]:
        return (message,)

    def close(self) -> None:
        pass


class Picky:
    """Ends its stream with INVALID_ARGUMENT on an empty message."""

    closed = 0

    def handle(self, message: bytes) -> Sequence[bytes]:
        if not message:
            raise StreamError(INVALID_ARGUMENT, "empty_message", "empty message")
        return (message,)

    def close(self) -> None:
        Picky.closed += 1


@contextlib.asynccontextmanager
async def serving(
    limits: h2server.H2Limits | None = None, secure: bool = False
) -> AsyncIterator[tuple[h2server.H2Server, list[int], list[int]]]:
    seen: list[int] = []
    closes: list[int] = []
    context = None
    if secure:
        key, cert = tls.self_signed()
        context = tls.server_context(key, cert)
    server = h2server.H2Server(
        {
            ECHO: lambda _emit: Echo(),
            COUNT: lambda _emit: Counting(seen),
            PICKY: lambda _emit: Picky(),
        },
        max_message=1 << 20,
        ssl_context=context,
        limits=limits,
        after_close=lambda: closes.append(1),
    )
    await server.start("127.0.0.1", 0)
    try:
        yield server, seen, closes
    finally:
        await server.stop(0)


def _msg(payload: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(payload)) + payload


class Peer:
    """A client connection driven with the ``h2`` library."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.events: list[h2.events.Event] = []

    @classmethod
    async def open(cls, port: int, tls_context: ssl.SSLContext | None = None) -> Peer:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=tls_context, server_hostname="localhost" if tls_context else None
        )
        peer = cls(reader, writer)
        peer.conn.initiate_connection()
        await peer.flush()
        await peer.pump(lambda: peer.of(h2.events.RemoteSettingsChanged))
        return peer

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def pump(self, until, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
        deadline = asyncio.get_running_loop().time() + timeout
        while not until():
            left = deadline - asyncio.get_running_loop().time()
            assert left > 0, f"timed out; events so far: {self.events[-5:]}"
            try:
                data = await asyncio.wait_for(self.reader.read(1 << 16), left)
            except TimeoutError:
                continue
            if not data:
                return
            self.events.extend(self.conn.receive_data(data))
            await self.flush()

    def start(self, path: str) -> int:
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

    def status(self, sid: int) -> bytes | None:
        for e in self.of(h2.events.TrailersReceived, sid) + self.of(
            h2.events.ResponseReceived, sid
        ):
            found = dict(e.headers).get(b"grpc-status")
            if found is not None:
                return found
        return None

    def close(self) -> None:
        self.writer.close()


async def _echo_seconds(peer: Peer, payload: bytes = b"ping") -> float:
    started = time.perf_counter()
    sid = peer.start(ECHO)
    peer.conn.send_data(sid, _msg(payload), end_stream=True)
    await peer.flush()
    await peer.pump(lambda: bool(peer.of(h2.events.StreamEnded, sid)))
    assert peer.status(sid) == b"0"
    return time.perf_counter() - started


# ------------------------------------------------------------------------------- fairness


async def test_a_backlog_of_tiny_messages_does_not_delay_another_connection() -> None:
    """100,000 messages in a few large DATA frames are two seconds of handler work; another
    connection's echo meanwhile answers in milliseconds, and every message of the flood is
    delivered once, in order, with the stream's end after the last of them."""
    n = 100_000
    async with serving() as (server, seen, _):
        victim = await Peer.open(server.port)
        unloaded = min([await _echo_seconds(victim) for _ in range(5)])
        flooder = await Peer.open(server.port)
        sid = flooder.start(COUNT)
        payload = b"".join(_msg(i.to_bytes(4, "big")) for i in range(n))
        flooder.conn.send_data(sid, payload, end_stream=True)  # 900 KB: within the windows
        await flooder.flush()
        await asyncio.sleep(0.05)  # the flood has arrived and is being worked off
        assert len(seen) < n // 2
        during = [await _echo_seconds(victim) for _ in range(10)]
        assert len(seen) < n, "the flood was over before the victim was measured"
        await flooder.pump(lambda: bool(flooder.of(h2.events.StreamEnded, sid)), timeout=30)
        assert flooder.status(sid) == b"0"
        assert seen == list(range(n))
        # Each echo waits for at most a turn of the flooder's (0.3 ms) and its own.
        assert sorted(during)[len(during) // 2] < unloaded + 0.02, (unloaded, during)
        victim.close()
        flooder.close()


async def test_a_stream_error_from_the_handler_ends_only_that_stream() -> None:
    async with serving() as (server, _, _):
        peer = await Peer.open(server.port)
        bad = peer.start(PICKY)
        peer.conn.send_data(bad, _msg(b""))
        await peer.flush()
        await peer.pump(lambda: peer.status(bad) is not None)
        assert peer.status(bad) == b"3"  # INVALID_ARGUMENT
        assert peer.of(h2.events.StreamReset, bad) or peer.of(h2.events.StreamEnded, bad)
        assert await _echo_seconds(peer) < 5  # the connection goes on
        peer.close()


# -------------------------------------------------------------------------- connections


async def _closed_by_server(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection."""
    got = b""
    async with asyncio.timeout(timeout):
        while chunk := await reader.read(1 << 16):
            got += chunk
    return got


def _goaway_code(data: bytes) -> int | None:
    pos = 0
    code = None
    while len(data) - pos >= 9:
        length = int.from_bytes(data[pos : pos + 3], "big")
        if data[pos + 3] == h2server.GOAWAY:
            code = int.from_bytes(data[pos + 13 : pos + 17], "big")
        pos += 9 + length
    return code


async def test_connections_beyond_the_limit_are_closed_at_once() -> None:
    async with serving(h2server.H2Limits(max_connections=2)) as (server, _, _):
        a = await Peer.open(server.port)
        b = await Peer.open(server.port)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(h2server.PREFACE)
        assert await _closed_by_server(reader, 5) == b""  # not even SETTINGS
        writer.close()
        assert await _echo_seconds(a) < 5 and await _echo_seconds(b) < 5
        a.close()
        await asyncio.sleep(0.1)
        c = await Peer.open(server.port)  # room again once one has gone
        assert await _echo_seconds(c) < 5
        b.close()
        c.close()


async def test_plaintext_without_a_preface_is_closed_after_the_handshake_timeout() -> None:
    limits = h2server.H2Limits(handshake_timeout=0.5)
    async with serving(limits) as (server, _, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        started = time.monotonic()
        got = await _closed_by_server(reader, 5)
        assert 0.4 < time.monotonic() - started < 3
        assert _goaway_code(got) == h2server.NO_ERROR
        writer.close()


async def test_tls_without_a_hello_is_closed_after_the_handshake_timeout() -> None:
    limits = h2server.H2Limits(handshake_timeout=0.5)
    async with serving(limits, secure=True) as (server, _, _):
        conns = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(20)]
        started = time.monotonic()
        for reader, _writer in conns:
            assert await _closed_by_server(reader, 5) == b""
        assert 0.4 < time.monotonic() - started < 3
        for _reader, writer in conns:
            writer.close()


async def test_an_idle_connection_gets_goaway_and_is_closed() -> None:
    limits = h2server.H2Limits(idle_timeout=0.5)
    async with serving(limits) as (server, _, closes):
        peer = await Peer.open(server.port)
        assert await _echo_seconds(peer) < 5
        started = time.monotonic()
        await peer.pump(lambda: len(peer.of(h2.events.ConnectionTerminated)) >= 1, timeout=10)
        first = peer.of(h2.events.ConnectionTerminated)[0]
        assert first.error_code == 0 and first.last_stream_id == 2**31 - 1
        got = await _closed_by_server(peer.reader, 10)
        assert _goaway_code(got) == h2server.NO_ERROR
        assert 0.4 < time.monotonic() - started < 6
        peer.close()
        deadline = time.monotonic() + 3
        while not closes and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert closes  # the listener's after_close ran


async def test_a_connection_with_an_open_stream_is_not_idle() -> None:
    limits = h2server.H2Limits(idle_timeout=0.3)
    async with serving(limits) as (server, seen, _):
        peer = await Peer.open(server.port)
        sid = peer.start(COUNT)
        peer.conn.send_data(sid, _msg(b"\x00\x00\x00\x07"))
        await peer.flush()
        await asyncio.sleep(2.0)  # several sweeps
        assert not peer.of(h2.events.ConnectionTerminated)
        peer.conn.end_stream(sid)
        await peer.flush()
        await peer.pump(lambda: bool(peer.of(h2.events.StreamEnded, sid)))
        assert seen == [7]
        peer.close()


async def test_a_stream_sent_after_the_first_idle_goaway_is_still_served() -> None:
    limits = h2server.H2Limits(idle_timeout=0.3)
    async with serving(limits) as (server, _, _):
        peer = await Peer.open(server.port)
        await peer.pump(lambda: bool(peer.of(h2.events.ConnectionTerminated)), timeout=10)
        # The peer had not seen the GOAWAY when it sent this one (the race the two-step
        # close is for): h2 would refuse to send it now, so it goes out as raw frames.
        enc = peer.conn.encoder
        block = enc.encode(
            [
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", ECHO.encode()),
                (b":authority", b"test"),
                (b"content-type", b"application/grpc"),
            ]
        )

        def frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
            return (
                len(payload).to_bytes(3, "big")
                + bytes((ftype, flags))
                + sid.to_bytes(4, "big")
                + payload
            )

        peer.writer.write(frame(1, 0x4, 99, block) + frame(0, 0x1, 99, _msg(b"late")))
        got = await _closed_by_server(peer.reader, 10)
        assert b"late" in got  # the echo came back before the final GOAWAY
        peer.close()


async def test_an_idle_tls_connection_holds_a_small_read_buffer() -> None:
    async with serving(secure=True) as (server, _, _):
        client = ssl.create_default_context()
        client.check_hostname = False
        client.verify_mode = ssl.CERT_NONE
        client.set_alpn_protocols(["h2"])
        _reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=client, server_hostname="localhost"
        )
        await asyncio.sleep(0.05)
        (conn,) = server._connections
        transport = conn._transport
        assert transport is not None
        protocol = transport._ssl_protocol  # type: ignore[attr-defined]
        assert len(protocol._ssl_buffer) == h2server.TLS_READ_BUFFER
        writer.close()


async def test_a_tls_connection_reads_a_large_body_in_large_steps_then_shrinks_back() -> None:
    async with serving(secure=True) as (server, _, _):
        client = ssl.create_default_context()
        client.check_hostname = False
        client.verify_mode = ssl.CERT_NONE
        client.set_alpn_protocols(["h2"])
        peer = await Peer.open(server.port, client)
        (conn,) = server._connections
        protocol = conn._transport._ssl_protocol  # type: ignore[union-attr]
        sizes: list[int] = []
        get_buffer = protocol.get_buffer

        def recording(n: int) -> memoryview:
            view = get_buffer(n)
            sizes.append(len(view))
            return view

        protocol.get_buffer = recording
        big = b"b" * 900_000
        sid = peer.start(ECHO)
        peer.conn.send_data(sid, _msg(big), end_stream=True)
        await peer.flush()

        def echoed() -> bool:
            for e in peer.of(h2.events.DataReceived, sid):
                if not getattr(e, "_acked", False):
                    peer.conn.acknowledge_received_data(e.flow_controlled_length, sid)
                    e._acked = True  # type: ignore[attr-defined]
            return bool(peer.of(h2.events.StreamEnded, sid))

        await peer.pump(echoed)
        assert peer.status(sid) == b"0"
        assert max(sizes) == h2server.TLS_BULK_READ_BUFFER  # it grew while the body came
        assert await _echo_seconds(peer) < 5  # a small read: back to the small buffer
        assert len(protocol._ssl_buffer) == h2server.TLS_READ_BUFFER
        peer.close()
