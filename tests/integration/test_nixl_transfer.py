"""KV blocks moving prefill → decode with real NIXL (UCX, host memory) between two processes.

The prefill side runs in nixl_prefill_proc.py (its own NIXL agent, side channel and leases);
this process is the decode side. No mocks: if NIXL cannot be imported these tests fail,
they do not skip (CI installs NIXL through the Makefile).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import pathlib
import subprocess
import sys
import threading
import time

import msgpack
import pytest
import zmq
import zmq.asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.sim.block_content import block_content
from workers.sim.kv_transfer import (
    GET_META_MSG,
    NIXL_CONNECTOR_VERSION,
    KvConsumer,
    KvRegion,
    KvTransferError,
    nixl_available,
)

PROC = pathlib.Path(__file__).resolve().parent / "nixl_prefill_proc.py"
BLOCK_BYTES = 64 * 1024 + 8  # not a power of two, so an off-by-a-block address shows
BLOCK_SIZE = 16
P_BLOCKS = 32
D_BLOCKS = 24


class PrefillProc:
    """A prefill engine's KV side in another process (nixl_prefill_proc.py)."""

    def __init__(self, engine_id: str, port: int = 0) -> None:
        self.engine_id = engine_id
        self.port = port

    async def start(self) -> PrefillProc:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(PROC),
            str(self.port),
            self.engine_id,
            str(P_BLOCKS),
            str(BLOCK_BYTES),
            str(BLOCK_SIZE),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        hello = await self._reply()
        self.port = hello["port"]
        return self

    async def _reply(self) -> dict:
        async with asyncio.timeout(30):
            while True:
                line = (await self.proc.stdout.readline()).decode()
                assert line, "prefill process exited"
                if line.startswith("@@ "):
                    return json.loads(line[3:])

    async def command(self, **cmd) -> dict:
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.proc.stdin.drain()
        return await self._reply()

    async def fill(self, slots: dict[int, int]) -> None:
        await self.command(op="fill", slots=list(slots.items()))

    async def lease(self, request_id: str, block_ids: list[int], ttl: float = 30.0) -> float:
        return (
            await self.command(op="lease", request_id=request_id, block_ids=block_ids, ttl=ttl)
        )["expiry_time"]

    async def wait_ended(self, timeout: float) -> list[tuple[str, list[int], str]]:
        return [tuple(e) for e in (await self.command(op="wait_ended", timeout=timeout))["ended"]]

    def kill(self) -> None:
        self.proc.kill()

    async def close(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.proc.stdin.write(b'{"op": "exit"}\n')
                await self.proc.stdin.drain()
            try:
                async with asyncio.timeout(10):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
        await self.proc.wait()


@pytest.fixture
async def prefill():
    proc = await PrefillProc("prefill-engine-1").start()
    yield proc
    await proc.close()


@pytest.fixture
def region():
    r = KvRegion(D_BLOCKS, BLOCK_BYTES)
    yield r
    r.close()


@pytest.fixture
async def consumer(region):
    c = KvConsumer(region, block_size=BLOCK_SIZE, handshake_timeout_s=1.0, transfer_timeout_s=10.0)
    yield c
    await c.close()


def test_nixl_is_installed():
    assert nixl_available() is None, nixl_available()


# ---------------------------------------------------------------------------------------
# block_content
# ---------------------------------------------------------------------------------------

MASK64 = (1 << 64) - 1


@settings(max_examples=200, deadline=None)
@given(
    a=st.integers(min_value=-(2**63), max_value=MASK64),
    b=st.integers(min_value=-(2**63), max_value=MASK64),
    nbytes=st.integers(min_value=0, max_value=4096),
)
def test_block_content_deterministic_and_distinct_in_every_word(a, b, nbytes):
    ca, cb = block_content(a, nbytes), block_content(b, nbytes)
    assert len(ca) == nbytes
    assert ca == block_content(a, nbytes)
    # A shorter block is a prefix of a longer one: content depends on the offset only.
    assert ca[: nbytes // 2] == block_content(a, nbytes // 2)
    if (a - b) & MASK64:
        full = nbytes // 8 * 8
        words_a = [ca[i : i + 8] for i in range(0, full, 8)]
        words_b = [cb[i : i + 8] for i in range(0, full, 8)]
        assert all(x != y for x, y in zip(words_a, words_b, strict=True))
    else:
        assert ca == cb


def test_block_content_is_not_periodic():
    c = block_content(42, 4096)
    words = {c[i : i + 8] for i in range(0, 4096, 8)}
    assert len(words) == 512


def test_block_content_same_in_another_process():
    hashes = [0, 1, 2**64 - 1, 0x1234_5678_9ABC_DEF0, -5]
    code = (
        "import hashlib, sys\n"
        "from workers.sim.block_content import block_content\n"
        f"for h in {hashes!r}:\n"
        "    print(hashlib.sha256(block_content(h, 100_003)).hexdigest())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60
    ).stdout.split()
    assert out == [hashlib.sha256(block_content(h, 100_003)).hexdigest() for h in hashes]


def test_region_fill_read_verify(region):
    assert region.read(3) == bytes(BLOCK_BYTES)
    region.fill(3, 77)
    assert region.read(3) == block_content(77, BLOCK_BYTES)
    assert region.verify(3, 77)
    assert not region.verify(3, 78)
    assert not region.verify(4, 77)
    with pytest.raises(IndexError):
        region.fill(D_BLOCKS, 1)


# ---------------------------------------------------------------------------------------
# Transfers
# ---------------------------------------------------------------------------------------


def endpoint(p: PrefillProc) -> tuple[str, int, str]:
    return "127.0.0.1", p.port, p.engine_id


async def test_read_verifies_notifies_and_reuses_the_handshake(prefill, region, consumer):
    hashes = {3: 0xA1, 7: 0xA2, 8: 0xA3, 12: 0xA4, 20: 0xB1, 21: 0xB2}
    await prefill.fill(hashes)
    await prefill.lease("req-1", [3, 7, 8, 12])
    await prefill.lease("req-2", [20, 21])

    stats = await consumer.read_blocks(*endpoint(prefill), "req-1", [3, 7, 8, 12], [0, 1, 2, 5])
    assert stats.nbytes == 4 * BLOCK_BYTES and stats.handshake_s > 0 and not stats.retried
    for local, remote in zip([0, 1, 2, 5], [3, 7, 8, 12], strict=True):
        assert region.read(local) == block_content(hashes[remote], BLOCK_BYTES)
    for untouched in (3, 4, 6, 23):
        assert region.read(untouched) == bytes(BLOCK_BYTES)
    assert await prefill.wait_ended(5.0) == [("req-1", [3, 7, 8, 12], "notified")]

    # Second read from the same engine: no new handshake.
    stats = await consumer.read_blocks(*endpoint(prefill), "req-2", [20, 21], [10, 11])
    assert stats.handshake_s == 0.0
    assert consumer.handshakes == 1
    assert consumer.peers == {prefill.engine_id: ("127.0.0.1", prefill.port)}
    assert region.verify(10, 0xB1) and region.verify(11, 0xB2)
    assert await prefill.wait_ended(5.0) == [("req-2", [20, 21], "notified")]


async def test_abort_frees_the_blocks_and_close_leaves_no_thread(prefill, consumer):
    await prefill.lease("req-a", [1, 2])
    await consumer.abort(*endpoint(prefill), "req-a")
    assert await prefill.wait_ended(5.0) == [("req-a", [1, 2], "notified")]
    # An empty read is the same message.
    await prefill.lease("req-b", [3])
    stats = await consumer.read_blocks(*endpoint(prefill), "req-b", [], [])
    assert stats.nbytes == 0
    assert await prefill.wait_ended(5.0) == [("req-b", [3], "notified")]

    await consumer.close()
    assert consumer.peers == {}
    assert not [t.name for t in threading.enumerate() if t.name.startswith("kvpick-nixl")]
    with pytest.raises(KvTransferError, match="closed"):
        await consumer.abort(*endpoint(prefill), "req-c")


async def test_lease_expires_without_notification(prefill):
    t0 = time.perf_counter()
    await prefill.lease("req-x", [4, 5, 6], ttl=0.3)
    assert await prefill.wait_ended(5.0) == [("req-x", [4, 5, 6], "expired")]
    assert 0.25 < time.perf_counter() - t0 < 3.0


async def test_bad_reads_raise_promptly(prefill, region, consumer):
    host, port, engine = endpoint(prefill)
    expiry = await prefill.lease("req-e", [0, 1])

    # Nobody listening: bounded by the handshake timeout.
    with socket_free_port() as dead:
        t0 = time.perf_counter()
        with pytest.raises(KvTransferError, match="timed out"):
            await consumer.read_blocks(host, dead, "nobody", "r", [0], [0])
        assert time.perf_counter() - t0 < 3.0

    with pytest.raises(KvTransferError, match="out of range"):
        await consumer.read_blocks(host, port, engine, "req-e", [0, P_BLOCKS], [0, 1])
    with pytest.raises(KvTransferError, match="out of range"):
        await consumer.read_blocks(host, port, engine, "req-e", [0], [D_BLOCKS])
    with pytest.raises(KvTransferError, match="2 remote block ids but 1 local"):
        await consumer.read_blocks(host, port, engine, "req-e", [0, 1], [0])
    with pytest.raises(KvTransferError, match="engine id mismatch"):
        await consumer.read_blocks(host, port, "someone-else", "req-e", [0], [0])
    with pytest.raises(KvTransferError, match=r"lease .* expired"):
        await consumer.read_blocks(
            host, port, engine, "req-e", [0], [0], remote_blocks_expiry_time=expiry - 31.0
        )
    # None of these read anything or ended the lease.
    assert region.read(0) == bytes(BLOCK_BYTES)
    assert await prefill.wait_ended(0.1) == []

    other = KvConsumer(region, block_size=BLOCK_SIZE * 2, handshake_timeout_s=2.0)
    try:
        with pytest.raises(KvTransferError, match="block geometry mismatch"):
            await other.read_blocks(host, port, engine, "req-e", [0], [0])
    finally:
        await other.close()


@contextlib.contextmanager
def socket_free_port():
    """A loopback port that was free a moment ago and has no listener."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield port


async def test_side_channel_wire_format(prefill):
    """What a vLLM decode worker would see: its exact request, two reply frames."""
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{prefill.port}")
    try:
        async with asyncio.timeout(5):
            await sock.send(msgpack.packb((GET_META_MSG, 0, 0)))
            payload, ts = await sock.recv_multipart()
            await sock.send(msgpack.packb((GET_META_MSG, 0, 1)))
            refused = await sock.recv_multipart()
    finally:
        sock.close(linger=0)
        ctx.term()
    outer = msgpack.unpackb(payload)
    assert set(outer) == {"compatibility_hash", "agent_metadata_bytes"}
    meta = msgpack.unpackb(outer["agent_metadata_bytes"])
    assert meta["engine_id"] == prefill.engine_id
    assert meta["connector_version"] == NIXL_CONNECTOR_VERSION
    assert meta["num_blocks"] == P_BLOCKS
    assert meta["block_lens"] == [BLOCK_BYTES]
    assert meta["block_size"] == BLOCK_SIZE
    assert isinstance(meta["agent_metadata"], bytes) and meta["agent_name"]
    assert isinstance(meta["kv_caches_base_addr"][0], int)
    assert isinstance(msgpack.unpackb(ts), float)
    assert len(refused) == 1 and "no KV cache" in msgpack.unpackb(refused[0])["error"]


async def test_restarted_prefill_engine(region, consumer):
    first = await PrefillProc("engine-A").start()
    host, port = "127.0.0.1", first.port
    try:
        await first.fill({0: 1})
        await consumer.read_blocks(host, port, "engine-A", "r1", [0], [0])
        assert region.verify(0, 1)
    finally:
        first.kill()
        await first.close()

    # A new engine on the same address: a new engine id means a new handshake, and the
    # stale request naming the old engine fails with a clear message.
    second = await PrefillProc("engine-B", port).start()
    try:
        await second.fill({0: 2})
        stats = await consumer.read_blocks(host, port, "engine-B", "r2", [0], [1])
        assert region.verify(1, 2) and stats.handshake_s > 0
        with pytest.raises(KvTransferError, match="engine id mismatch"):
            await consumer.read_blocks(host, port, "engine-A", "r1", [0], [2])
    finally:
        second.kill()
        await second.close()

    # Same engine id, new process: the cached peer fails the READ, the consumer
    # handshakes again and the read succeeds.
    third = await PrefillProc("engine-B", port).start()
    try:
        await third.fill({0: 3})
        await third.lease("r3", [0])
        stats = await consumer.read_blocks(host, port, "engine-B", "r3", [0], [3])
        assert stats.retried and region.verify(3, 3)
        assert await third.wait_ended(5.0) == [("r3", [0], "notified")]
    finally:
        await third.close()
    assert consumer.handshakes == 3
