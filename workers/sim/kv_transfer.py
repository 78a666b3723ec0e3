"""KV block transfer between simulated engines: NIXL over UCX in host memory, the way vLLM's
NixlConnector (pull mode) does prefill → decode.

The pieces, one engine each:

* :class:`KvRegion` — the engine's KV cache: ``num_blocks`` slots of ``block_bytes`` in one
  host-memory buffer registered (``"DRAM"``) with the engine's NIXL agent (UCX backend,
  progress thread on). Slots are filled with :func:`block_content` of the block's hash.
* :class:`KvProducer` — the prefill side. Serves the handshake on vLLM's side channel (a ZMQ
  ROUTER at ``VLLM_NIXL_SIDE_CHANNEL_HOST:VLLM_NIXL_SIDE_CHANNEL_PORT``; the caller reads the
  environment) and keeps the blocks of finished prefills leased until the decode side's NIXL
  notification arrives or the lease expires; :meth:`KvProducer.poll` reports ended leases.
* :class:`KvConsumer` — the decode side. Handshakes once per remote engine (cached), NIXL
  READs remote blocks into local slots with the notification riding on the transfer, and
  can send the notification alone when it gives up (vLLM's "empty read").

Wire format (what a vLLM peer would see):

* request, decode → prefill: msgpack ``[b"get_meta_msg", pp_rank, tp_rank]`` on a REQ socket;
* reply: two frames, msgpack :class:`HandshakePayload` (a map) and msgpack of the prefill
  process's ``time.perf_counter()`` at reply time (used to translate lease expiry times);
  a refused request gets one frame, a msgpack map ``{"error": reason}``;
* notification, decode → prefill: ``b"<remote_request_id>:<decode tp_size>"``.

Threading: every NIXL call is made from the event loop's thread except the one-off peer
setup at handshake (loading the peer's metadata, preparing its descriptor list: tens of
milliseconds for a large cache), which runs on a one-thread executor owned by the consumer.
The agent is created with NIXL's reader/writer lock for that reason. Transfers are polled
with short sleeps, so the event loop is never blocked waiting on data.

NIXL is imported lazily: importing this module works without it, and
:func:`nixl_available` says whether (and how) it can be used.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import msgspec
import zmq
import zmq.asyncio

from workers.sim.block_content import block_array, block_content

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "DEFAULT_KV_LEASE_S",
    "DEFAULT_SIDE_CHANNEL_HOST",
    "DEFAULT_SIDE_CHANNEL_PORT",
    "GET_META_MSG",
    "NIXL_CONNECTOR_VERSION",
    "NIXL_INSTALL_HINT",
    "AgentMetadata",
    "HandshakePayload",
    "KvConsumer",
    "KvProducer",
    "KvRegion",
    "KvTransferError",
    "Lease",
    "LeaseEnd",
    "ReadStats",
    "block_content",
    "compatibility_hash",
    "nixl_available",
]

log = logging.getLogger(__name__)

# vLLM's values (nixl/metadata.py, envs.py, kv_connector_extra_config defaults, and the
# side-channel receive timeout of its handshake).
NIXL_CONNECTOR_VERSION = 15
GET_META_MSG = b"get_meta_msg"
DEFAULT_SIDE_CHANNEL_HOST = "localhost"
DEFAULT_SIDE_CHANNEL_PORT = 5600
DEFAULT_KV_LEASE_S = 30.0
DEFAULT_HANDSHAKE_TIMEOUT_S = 5.0
# kvpick's: vLLM has no per-transfer deadline; one lease's worth is the longest a decode
# engine could usefully wait for blocks that are then freed anyway.
DEFAULT_TRANSFER_TIMEOUT_S = 30.0

NIXL_INSTALL_HINT = "pip install --no-deps nixl==1.5.1 nixl-cu12==1.5.1 && pip install numpy"

# Values vLLM's NixlAgentMetadata carries that have no meaning for a simulated cache; fixed
# so that the map has vLLM's shape.
_SIM_ATTN_BACKEND = "KVPICK_SIM"
_SIM_KV_LAYOUT = "NHD"


class KvTransferError(RuntimeError):
    """A KV transfer step failed; the message says which step, with which peer, and why."""


# ---------------------------------------------------------------------------------------
# NIXL loading
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Nixl:
    agent: Any
    config: Any
    sync_rw: Any


@functools.cache  # a failed import raises, so it is not cached and is retried next time
def _load_nixl() -> _Nixl:
    try:
        from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t
    except Exception as e:  # ImportError, or a wheel whose native libraries fail to load
        raise KvTransferError(
            f"NIXL is not installed or cannot be loaded ({type(e).__name__}: {e}); "
            f"install it with: {NIXL_INSTALL_HINT}"
        ) from e
    # NIXL's Python logger writes INFO lines to stdout; keep them out of the engine's
    # output unless the user asked for them with NIXL's own variable.
    if not os.environ.get("NIXL_LOG_LEVEL"):
        logging.getLogger("nixl").setLevel(logging.WARNING)
    return _Nixl(nixl_agent, nixl_agent_config, nixl_thread_sync_t.NIXL_THREAD_SYNC_RW)


def nixl_available() -> str | None:
    """None when NIXL can be imported, otherwise a message saying it is missing and the exact
    pip command that installs it (for refusing the prefill/decode roles at start)."""
    try:
        _load_nixl()
    except KvTransferError as e:
        return str(e)
    return None


def _nixl_error(what: str, e: BaseException) -> KvTransferError:
    # NIXL's exceptions are named after its status codes (nixlRemoteDisconnectError, ...),
    # which is the useful part of the message.
    return KvTransferError(f"{what}: {type(e).__name__}: {e}")


# ---------------------------------------------------------------------------------------
# Handshake protocol objects
# ---------------------------------------------------------------------------------------


@dataclass
class AgentMetadata:
    """What the prefill engine tells a decode engine about its KV cache (vLLM's
    ``NixlAgentMetadata`` fields, plus kvpick's ``agent_name`` and ``connector_version``).

    The cache is one region: ``kv_caches_base_addr[0]`` is the address of slot 0 in the
    prefill process, slot ``i`` starts ``i * block_lens[0]`` bytes after it, and there are
    ``num_blocks`` slots of ``block_size`` tokens each.
    """

    engine_id: str
    agent_metadata: bytes
    kv_caches_base_addr: list[int]
    device_id: int
    num_blocks: int
    block_lens: list[int]
    block_strides: list[int]
    kv_cache_layout: str
    block_size: int
    ssm_sizes: tuple[int, int]
    attn_backend_name: str
    physical_blocks_per_logical_kv_block: int
    agent_name: str
    connector_version: int

    @property
    def base_addr(self) -> int:
        return self.kv_caches_base_addr[0]

    @property
    def block_len(self) -> int:
        return self.block_lens[0]


@dataclass
class HandshakePayload:
    """The first reply frame (vLLM's ``NixlHandshakePayload``): the compatibility hash is
    checked before the metadata inside is trusted."""

    compatibility_hash: str
    agent_metadata_bytes: bytes


def compatibility_hash(model_name: str, block_hashing: str = "") -> str:
    """SHA-256 over what must match for two engines to exchange blocks: the connector
    version, the transfer mode, the model and how block hashes (hence block contents) are
    computed. Block geometry is checked separately, so that a mismatch there gets its own
    message."""
    factors = {
        "engine": "kvpick-sim",
        "nixl_connector_version": NIXL_CONNECTOR_VERSION,
        "transfer_mode": "pull",
        "model": model_name,
        "block_hashing": block_hashing,
    }
    return hashlib.sha256(json.dumps(factors, sort_keys=True).encode()).hexdigest()


def _zmq_path(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"tcp://{host}:{port}"


def _notif(request_id: str, tp_size: int) -> bytes:
    return f"{request_id}:{tp_size}".encode()


def _parse_notif(msg: bytes) -> tuple[str, int]:
    """(request id, number of decode ranks that will notify); a bare request id counts as
    one rank."""
    text = msg.decode("utf-8", "replace")
    req_id, sep, tp = text.rpartition(":")
    if sep and tp.isdigit() and int(tp) > 0:
        return req_id, int(tp)
    return text, 1


# ---------------------------------------------------------------------------------------
# The region
# ---------------------------------------------------------------------------------------


def _slot_descriptors(base_addr: int, block_bytes: int, num_blocks: int) -> np.ndarray:
    """NIXL's N×3 descriptor array for ``num_blocks`` consecutive slots. An array, not a list
    of tuples: NIXL converts it in C, which for a large cache is ~10x faster (and holds the
    GIL for a millisecond instead of tens)."""
    import numpy as np

    descs = np.empty((num_blocks, 3), dtype=np.uint64)
    descs[:, 0] = np.arange(num_blocks, dtype=np.uint64) * np.uint64(block_bytes)
    descs[:, 0] += np.uint64(base_addr)
    descs[:, 1] = block_bytes
    descs[:, 2] = 0
    return descs


class KvRegion:
    """One engine's KV cache in host memory, registered with the engine's NIXL agent.

    Guarantees: the buffer stays at ``base_addr`` and registered until :meth:`close`; slot
    ``i`` is ``block_bytes`` bytes at ``base_addr + i * block_bytes``; a new region is all
    zeros. Raises :class:`KvTransferError` if NIXL is missing or its UCX backend cannot start
    (for instance with ``UCX_TLS`` lacking ``tcp``).
    """

    def __init__(self, num_blocks: int, block_bytes: int, *, agent_name: str | None = None):
        if num_blocks <= 0 or block_bytes <= 0:
            raise ValueError(
                f"need num_blocks > 0 and block_bytes > 0, got {num_blocks}, {block_bytes}"
            )
        nixl = _load_nixl()
        import numpy as np

        self.num_blocks = num_blocks
        self.block_bytes = block_bytes
        # vLLM names agents with a uuid4; names must be unique among the peers of an agent.
        self.agent_name = agent_name or str(uuid.uuid4())
        # np.zeros maps fresh pages lazily, so a large cache costs nothing until written.
        self._buf: np.ndarray | None = np.zeros(num_blocks * block_bytes, dtype=np.uint8)
        self.base_addr: int = self._buf.ctypes.data
        try:
            config = nixl.config(enable_prog_thread=True, backends=["UCX"], sync_mode=nixl.sync_rw)
            self.agent = nixl.agent(self.agent_name, config)
        except Exception as e:
            raise _nixl_error(
                "cannot create the NIXL agent with the UCX backend (UCX_TLS must include tcp)", e
            ) from e
        if "UCX" not in self.agent.backends:
            raise KvTransferError(
                "NIXL loaded but its UCX plugin did not; available plugins: "
                f"{self.agent.plugin_list} (reinstall with: {NIXL_INSTALL_HINT})"
            )
        try:
            self._reg = self.agent.register_memory(
                [(self.base_addr, self._buf.nbytes, 0, "")], "DRAM"
            )
        except Exception as e:
            raise _nixl_error("cannot register the KV region with NIXL", e) from e

    # -- slots ----------------------------------------------------------------------------

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_blocks:
            raise IndexError(f"slot {slot} out of range [0, {self.num_blocks})")

    def view(self, slot: int) -> np.ndarray:
        """A writable view of one slot (no copy)."""
        self._check_slot(slot)
        if self._buf is None:
            raise KvTransferError("the KV region is closed")
        start = slot * self.block_bytes
        return self._buf[start : start + self.block_bytes]

    def fill(self, slot: int, engine_hash: int) -> None:
        """Write the content of the block with ``engine_hash`` into ``slot``."""
        self.view(slot)[:] = block_array(engine_hash, self.block_bytes)

    def read(self, slot: int) -> bytes:
        """A copy of the slot's bytes."""
        return self.view(slot).tobytes()

    def verify(self, slot: int, engine_hash: int) -> bool:
        """Whether ``slot`` holds exactly the content of the block with ``engine_hash``."""
        import numpy as np

        return bool(np.array_equal(self.view(slot), block_array(engine_hash, self.block_bytes)))

    def descriptors(self) -> np.ndarray:
        """One NIXL transfer descriptor per slot: rows of ``(address, length, device 0)``."""
        return _slot_descriptors(self.base_addr, self.block_bytes, self.num_blocks)

    # -- lifetime -------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._buf is None

    def close(self) -> None:
        """Deregister the memory and drop the agent (its UCX worker and progress thread go
        with it). Producers and consumers using the region must be closed first. Idempotent."""
        if self._buf is None:
            return
        try:
            self.agent.deregister_memory(self._reg)
        except Exception as e:
            log.warning("NIXL deregister_memory failed: %s: %s", type(e).__name__, e)
        del self._reg
        del self.agent
        self._buf = None


# ---------------------------------------------------------------------------------------
# Prefill side
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lease:
    """Blocks kept for a decode engine to read. ``expiry_time`` is in the prefill process's
    ``time.perf_counter()`` clock, as vLLM's ``remote_blocks_expiry_time``; the decode side
    translates it with the clock offset measured at handshake."""

    request_id: str
    block_ids: tuple[int, ...]
    expiry_time: float


@dataclass(frozen=True, slots=True)
class LeaseEnd:
    """A lease is over and its blocks may be freed: the decode side notified (it read them,
    or gave up and said so) or nobody came before ``expiry_time``."""

    request_id: str
    block_ids: tuple[int, ...]
    reason: Literal["notified", "expired"]


class KvProducer:
    """The prefill engine's side: the NIXL side channel and the leases.

    Use ``async with KvProducer(...) as producer`` (or :meth:`start` / :meth:`close`) inside
    the engine's event loop. The side channel answers every ``get_meta_msg`` for rank (0, 0)
    with the same pre-encoded payload; other ranks get an error reply (the simulator has one
    rank). Leases end exactly once, reported by :meth:`poll` / :meth:`wait_ended`.
    """

    def __init__(
        self,
        region: KvRegion,
        *,
        engine_id: str,
        block_size: int,
        host: str = DEFAULT_SIDE_CHANNEL_HOST,
        port: int = DEFAULT_SIDE_CHANNEL_PORT,
        model_name: str = "",
        lease_s: float = DEFAULT_KV_LEASE_S,
        block_hashing: str = "",
    ) -> None:
        self.region = region
        self.engine_id = engine_id
        self.block_size = block_size
        self.host = host
        self.port = port  # replaced by the bound port after start() (useful with port 0)
        self.model_name = model_name
        self.block_hashing = block_hashing
        self.lease_s = lease_s
        self.stale_notifications = 0  # notifications for requests with no lease (any more)
        self._leases: dict[str, Lease] = {}
        self._notified: dict[str, int] = {}  # request id -> notifications so far
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._payload = b""

    # -- side channel -------------------------------------------------------------------

    def handshake_metadata(self) -> AgentMetadata:
        r = self.region
        return AgentMetadata(
            engine_id=self.engine_id,
            agent_metadata=r.agent.get_agent_metadata(),
            kv_caches_base_addr=[r.base_addr],
            device_id=0,
            num_blocks=r.num_blocks,
            block_lens=[r.block_bytes],
            block_strides=[r.block_bytes],
            kv_cache_layout=_SIM_KV_LAYOUT,
            block_size=self.block_size,
            ssm_sizes=(0, 0),
            attn_backend_name=_SIM_ATTN_BACKEND,
            physical_blocks_per_logical_kv_block=1,
            agent_name=r.agent_name,
            connector_version=NIXL_CONNECTOR_VERSION,
        )

    def start(self) -> None:
        """Bind the side channel and start answering (needs a running event loop). Raises
        :class:`KvTransferError` if the address cannot be bound."""
        if self._task is not None:
            raise RuntimeError("KvProducer already started")
        # Encoded once: the agent metadata (which includes the registered region) does not
        # change while the engine runs.
        inner = msgspec.msgpack.encode(self.handshake_metadata())
        self._payload = msgspec.msgpack.encode(
            HandshakePayload(compatibility_hash(self.model_name, self.block_hashing), inner)
        )
        self._ctx = zmq.asyncio.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        if ":" in self.host:
            sock.setsockopt(zmq.IPV6, 1)
        try:
            sock.bind(_zmq_path(self.host, self.port))
        except zmq.ZMQError as e:
            sock.close(linger=0)
            self._ctx.term()
            self._ctx = None
            raise KvTransferError(
                f"cannot bind the NIXL side channel on {self.host}:{self.port}: {e}"
            ) from e
        endpoint = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.port = int(endpoint.rsplit(":", 1)[1])
        self._sock = sock
        self._task = asyncio.get_running_loop().create_task(
            self._serve(), name=f"nixl-side-channel:{self.port}"
        )
        log.info("NIXL side channel for engine %s on %s", self.engine_id, endpoint)

    def _reply(self, frames: list[bytes]) -> list[bytes]:
        identity, msg = frames[0], frames[-1]
        # REQ peers put an empty delimiter before the message; DEALER peers may not.
        head = [identity, b""] if len(frames) >= 3 and frames[-2] == b"" else [identity]
        error = None
        if msg == GET_META_MSG:  # pre-rank clients sent the bare tag
            ranks: Any = (0, 0)
        else:
            try:
                parts = msgspec.msgpack.decode(msg)
            except msgspec.DecodeError:
                parts = None
            if (
                isinstance(parts, list)
                and len(parts) == 3
                and parts[0] in (GET_META_MSG, GET_META_MSG.decode())
            ):
                ranks = (parts[1], parts[2])
            else:
                ranks = None
                error = f"unexpected side-channel message {msg[:64]!r}"
        if error is None and ranks != (0, 0):
            error = f"no KV cache for (pp_rank, tp_rank) = {ranks}; this engine has only (0, 0)"
        if error is not None:
            log.warning("NIXL side channel: %s", error)
            return [*head, msgspec.msgpack.encode({"error": error})]
        return [*head, self._payload, msgspec.msgpack.encode(time.perf_counter())]

    async def _serve(self) -> None:
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart()
            try:
                reply = self._reply(frames)
            except Exception:
                log.exception("NIXL side channel: failed to answer %r", frames[-1][:64])
                continue
            await self._sock.send_multipart(reply)

    # -- leases ---------------------------------------------------------------------------

    def lease(self, request_id: str, block_ids: Sequence[int], ttl_s: float | None = None) -> Lease:
        """Keep ``block_ids`` for ``request_id`` until the decode side notifies or ``ttl_s``
        (default: the producer's ``lease_s``) passes. One lease per request id."""
        if request_id in self._leases:
            raise ValueError(f"request {request_id!r} already holds a lease")
        n = self.region.num_blocks
        bad = [b for b in block_ids if not 0 <= b < n]
        if bad:
            raise ValueError(f"block ids {bad[:8]} out of range [0, {n})")
        ttl = self.lease_s if ttl_s is None else ttl_s
        lease = Lease(request_id, tuple(block_ids), time.perf_counter() + ttl)
        self._leases[request_id] = lease
        return lease

    @property
    def leases(self) -> dict[str, Lease]:
        """The live leases by request id (a copy)."""
        return dict(self._leases)

    def poll(self) -> list[LeaseEnd]:
        """Collect NIXL notifications and expired leases; each lease is reported once.
        Non-blocking; call it from the engine's step loop."""
        ended: list[LeaseEnd] = []
        try:
            notifs = self.region.agent.get_new_notifs()
        except Exception as e:
            log.warning("NIXL get_new_notifs failed: %s: %s", type(e).__name__, e)
            notifs = {}
        # Keys are the decode agents' names (str); the request id is in the message.
        for messages in notifs.values():
            for msg in messages:
                req_id, ranks = _parse_notif(msg)
                lease = self._leases.get(req_id)
                if lease is None:
                    self.stale_notifications += 1
                    log.debug("NIXL notification for unknown request %r", req_id)
                    continue
                # With a decode engine of tp_size N, each of its N ranks reads and notifies.
                count = self._notified.get(req_id, 0) + 1
                if count < ranks:
                    self._notified[req_id] = count
                    continue
                self._notified.pop(req_id, None)
                del self._leases[req_id]
                ended.append(LeaseEnd(req_id, lease.block_ids, "notified"))
        now = time.perf_counter()
        for req_id in [r for r, lease in self._leases.items() if lease.expiry_time <= now]:
            lease = self._leases.pop(req_id)
            self._notified.pop(req_id, None)
            ended.append(LeaseEnd(req_id, lease.block_ids, "expired"))
        return ended

    async def wait_ended(self, timeout: float, interval: float = 0.005) -> list[LeaseEnd]:
        """Poll until some lease ends or ``timeout`` seconds pass (then ``[]``)."""
        deadline = time.perf_counter() + timeout
        while True:
            ended = self.poll()
            left = deadline - time.perf_counter()
            if ended or left <= 0:
                return ended
            await asyncio.sleep(min(interval, left))

    # -- lifetime -------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop the side channel and close its socket. Leases are dropped unreported.
        Idempotent; does not close the region."""
        if self._task is not None:
            self._task.cancel()
            # asyncio.wait does not raise the task's CancelledError, but a cancellation of
            # the caller still propagates.
            await asyncio.wait([self._task])
            self._task = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    async def __aenter__(self) -> KvProducer:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# ---------------------------------------------------------------------------------------
# Decode side
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadStats:
    """What one :meth:`KvConsumer.read_blocks` did."""

    nbytes: int
    transfer_s: float
    handshake_s: float  # 0.0 when the cached handshake was used
    retried: bool  # the cached peer had gone stale; re-handshook and read again


@dataclass(slots=True)
class _Peer:
    host: str
    port: int
    meta: AgentMetadata
    clock_offset: float  # remote perf_counter − local perf_counter
    dlist: Any  # NIXL prepared descriptor list of the peer's slots


class KvConsumer:
    """The decode engine's side: handshakes (cached per remote engine id) and NIXL READs.

    Every failure raises :class:`KvTransferError`; nothing waits longer than
    ``handshake_timeout_s`` for the side channel or ``transfer_timeout_s`` for data.
    """

    def __init__(
        self,
        region: KvRegion,
        *,
        block_size: int,
        model_name: str = "",
        tp_size: int = 1,
        handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S,
        transfer_timeout_s: float = DEFAULT_TRANSFER_TIMEOUT_S,
        block_hashing: str = "",
    ) -> None:
        self.region = region
        self.block_size = block_size
        self.model_name = model_name
        self.tp_size = tp_size
        self.handshake_timeout_s = handshake_timeout_s
        self.transfer_timeout_s = transfer_timeout_s
        self.handshakes = 0  # completed handshakes, for tests and metrics
        self._closed = False
        self._compat = compatibility_hash(model_name, block_hashing)
        self._peers: dict[str, _Peer] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._ctx = zmq.asyncio.Context()
        # Peer setup (metadata load, descriptor preparation) is the one slow NIXL step;
        # it gets its own thread so that the event loop keeps running meanwhile.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="kvpick-nixl-peer-setup"
        )
        try:
            self._local = region.agent.prep_xfer_dlist(
                "NIXL_INIT_AGENT", region.descriptors(), "DRAM"
            )
        except Exception as e:
            self._executor.shutdown()
            self._ctx.term()
            raise _nixl_error("cannot prepare the local NIXL descriptor list", e) from e

    @property
    def peers(self) -> dict[str, tuple[str, int]]:
        """Cached remote engines: engine id → (host, port)."""
        return {eid: (p.host, p.port) for eid, p in self._peers.items()}

    # -- handshake ----------------------------------------------------------------------

    async def _fetch_handshake(self, host: str, port: int) -> tuple[list[bytes], float, float]:
        path = _zmq_path(host, port)
        sock = self._ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        if ":" in host:
            sock.setsockopt(zmq.IPV6, 1)
        try:
            sock.connect(path)
            t0 = time.perf_counter()
            async with asyncio.timeout(self.handshake_timeout_s):
                await sock.send(msgspec.msgpack.encode((GET_META_MSG, 0, 0)))
                frames = await sock.recv_multipart()
            return frames, t0, time.perf_counter()
        except TimeoutError:
            raise KvTransferError(
                f"NIXL handshake with {host}:{port} timed out after "
                f"{self.handshake_timeout_s:g}s: no side channel answering there"
            ) from None
        except zmq.ZMQError as e:
            raise KvTransferError(f"NIXL handshake with {host}:{port} failed: {e}") from e
        finally:
            sock.close(linger=0)

    def _check_handshake(
        self, host: str, port: int, expected_engine_id: str, frames: list[bytes]
    ) -> tuple[AgentMetadata, float]:
        where = f"NIXL handshake with {host}:{port}"
        if len(frames) == 1:
            try:
                reason = msgspec.msgpack.decode(frames[0])["error"]
            except Exception:
                reason = repr(frames[0][:64])
            raise KvTransferError(f"{where} refused: {reason}")
        if len(frames) != 2:
            raise KvTransferError(f"{where}: expected 2 reply frames, got {len(frames)}")
        try:
            payload = msgspec.msgpack.decode(frames[0], type=HandshakePayload)
            remote_ts = msgspec.msgpack.decode(frames[1], type=float)
            raw = msgspec.msgpack.decode(payload.agent_metadata_bytes)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise KvTransferError(f"{where}: malformed handshake payload: {e}") from e
        version = raw.get("connector_version") if isinstance(raw, dict) else None
        if version != NIXL_CONNECTOR_VERSION:
            raise KvTransferError(
                f"{where}: connector version mismatch: the peer speaks {version!r}, "
                f"this engine {NIXL_CONNECTOR_VERSION}"
            )
        if payload.compatibility_hash != self._compat:
            raise KvTransferError(
                f"{where}: incompatible engines (compatibility hash "
                f"{payload.compatibility_hash[:12]}… != {self._compat[:12]}…): "
                "different model, block hash algorithm or PYTHONHASHSEED, or kvpick version"
            )
        try:
            meta = msgspec.convert(raw, AgentMetadata)
        except msgspec.ValidationError as e:
            raise KvTransferError(f"{where}: malformed agent metadata: {e}") from e
        if meta.engine_id != expected_engine_id:
            raise KvTransferError(
                f"{where}: engine id mismatch: expected {expected_engine_id!r}, the engine "
                f"there is {meta.engine_id!r} (restarted?)"
            )
        if meta.block_len != self.region.block_bytes or meta.block_size != self.block_size:
            raise KvTransferError(
                f"{where}: block geometry mismatch: the peer has {meta.block_len} bytes per "
                f"block of {meta.block_size} tokens, this engine {self.region.block_bytes} "
                f"bytes per block of {self.block_size} tokens"
            )
        return meta, remote_ts

    def _attach(self, meta: AgentMetadata) -> Any:
        """Load the peer's agent metadata and prepare its slots' descriptors (runs on the
        executor thread)."""
        agent = self.region.agent
        try:
            name = agent.add_remote_agent(meta.agent_metadata)
        except Exception as e:
            raise _nixl_error(f"cannot load the NIXL metadata of engine {meta.engine_id}", e) from e
        # add_remote_agent answers with bytes, while notifications and descriptor lists
        # name agents with str.
        name = name.decode() if isinstance(name, bytes) else name
        if name != meta.agent_name:
            with contextlib.suppress(Exception):
                agent.remove_remote_agent(name)
            raise KvTransferError(
                f"engine {meta.engine_id}: agent metadata is for {name!r}, "
                f"the handshake says {meta.agent_name!r}"
            )
        descs = _slot_descriptors(meta.base_addr, meta.block_len, meta.num_blocks)
        try:
            dlist = agent.prep_xfer_dlist(name, descs, "DRAM")
        except Exception as e:
            with contextlib.suppress(Exception):
                agent.remove_remote_agent(name)
            raise _nixl_error(
                f"cannot prepare the descriptors of engine {meta.engine_id}", e
            ) from e
        try:
            # Connecting here, off the event loop, spares the first READ the UCX endpoint
            # setup (~0.1 s on loopback).
            agent.make_connection(name)
        except Exception as e:  # not fatal: the first transfer connects anyway
            log.debug("NIXL make_connection(%s): %s: %s", name, type(e).__name__, e)
        return dlist

    async def _peer(self, host: str, port: int, engine_id: str) -> tuple[_Peer, float | None]:
        """The cached peer for ``engine_id`` (seconds: None), or a fresh handshake (seconds
        it took)."""
        lock = self._locks.setdefault(engine_id, asyncio.Lock())
        async with lock:
            if self._closed:
                raise KvTransferError("the KV consumer is closed")
            peer = self._peers.get(engine_id)
            if peer is not None:
                return peer, None
            t0 = time.perf_counter()
            frames, sent, received = await self._fetch_handshake(host, port)
            meta, remote_ts = self._check_handshake(host, port, engine_id, frames)
            loop = asyncio.get_running_loop()
            dlist = await loop.run_in_executor(self._executor, self._attach, meta)
            if self._closed:  # closed while the setup thread ran
                with contextlib.suppress(Exception):
                    dlist.release()
                    self.region.agent.remove_remote_agent(meta.agent_name)
                raise KvTransferError("the KV consumer is closed")
            # An engine that answered at this address before under another id is gone
            # (restarted): drop it rather than keep its agent loaded until a read fails.
            for old in [p for p in self._peers.values() if (p.host, p.port) == (host, port)]:
                self._forget_peer(old)
            # Midpoint estimate: the peer stamped its clock about halfway through the trip.
            offset = remote_ts - (sent + received) / 2
            peer = _Peer(host, port, meta, offset, dlist)
            self._peers[engine_id] = peer
            self.handshakes += 1
            log.info(
                "NIXL handshake with engine %s at %s:%d: agent %s, %d blocks of %d bytes",
                engine_id, host, port, meta.agent_name, meta.num_blocks, meta.block_len,
            )  # fmt: skip
            return peer, time.perf_counter() - t0

    def forget(self, engine_id: str) -> None:
        """Drop the cached handshake with ``engine_id`` (the next read handshakes again)."""
        peer = self._peers.get(engine_id)
        if peer is not None:
            self._forget_peer(peer)

    def _forget_peer(self, peer: _Peer) -> None:
        # Only if still cached: a concurrent read that failed on the same stale peer must
        # not drop the fresh handshake another read has made since.
        if self._peers.get(peer.meta.engine_id) is not peer:
            return
        del self._peers[peer.meta.engine_id]
        with contextlib.suppress(Exception):
            peer.dlist.release()
        try:
            self.region.agent.remove_remote_agent(peer.meta.agent_name)
        except Exception as e:
            log.debug("NIXL remove_remote_agent(%s): %s", peer.meta.agent_name, e)

    # -- reads ------------------------------------------------------------------------------

    def _check_ids(self, peer: _Peer, remote: Sequence[int], local: Sequence[int]) -> None:
        if len(remote) != len(local):
            raise KvTransferError(
                f"{len(remote)} remote block ids but {len(local)} local block ids"
            )
        n_remote, n_local = peer.meta.num_blocks, self.region.num_blocks
        bad = [b for b in remote if not 0 <= b < n_remote]
        if bad:
            raise KvTransferError(
                f"remote block ids {bad[:8]} out of range: engine {peer.meta.engine_id} has "
                f"{n_remote} blocks"
            )
        bad = [b for b in local if not 0 <= b < n_local]
        if bad:
            raise KvTransferError(f"local block ids {bad[:8]} out of range [0, {n_local})")
        if len(set(local)) != len(local):
            raise KvTransferError("local block ids repeat: two blocks cannot land in one slot")

    async def _transfer(
        self, peer: _Peer, remote: Sequence[int], local: Sequence[int], notif: bytes
    ) -> None:
        agent = self.region.agent
        where = f"NIXL READ of {len(remote)} blocks from engine {peer.meta.engine_id}"
        try:
            handle = agent.make_prepped_xfer(
                "READ", self._local, list(local), peer.dlist, list(remote), notif
            )
        except Exception as e:
            raise _nixl_error(f"{where}: cannot create the transfer", e) from e
        try:
            state = agent.transfer(handle)
            deadline = time.perf_counter() + self.transfer_timeout_s
            delay = 0.0
            while state == "PROC":
                if time.perf_counter() >= deadline:
                    raise KvTransferError(f"{where}: not done after {self.transfer_timeout_s:g}s")
                await asyncio.sleep(delay)
                # Small transfers finish in well under a millisecond; back off from a bare
                # yield to 2 ms, so a long one costs few wake-ups and is seen done at most
                # 2 ms late.
                delay = min(max(delay * 2, 0.0002), 0.002)
                state = agent.check_xfer_state(handle)
            if state != "DONE":
                raise KvTransferError(f"{where}: transfer state {state}")
        except KvTransferError:
            raise
        except Exception as e:
            raise _nixl_error(where, e) from e
        finally:
            try:
                # Releasing an unfinished transfer asks NIXL to cancel it.
                handle.release()
            except Exception as e:
                log.warning("NIXL release of a transfer handle: %s: %s", type(e).__name__, e)

    async def read_blocks(
        self,
        remote_host: str,
        remote_port: int,
        remote_engine_id: str,
        remote_request_id: str,
        remote_block_ids: Sequence[int],
        local_block_ids: Sequence[int],
        *,
        remote_blocks_expiry_time: float | None = None,
    ) -> ReadStats:
        """READ ``remote_block_ids`` of the prefill engine into ``local_block_ids`` (pairwise)
        and notify the prefill engine so that it frees them.

        Handshakes first unless ``remote_engine_id`` is cached. If a cached peer fails the
        transfer (for instance it restarted), the handshake is redone once and the read
        retried. ``remote_blocks_expiry_time`` (the prefill side's lease expiry, its clock)
        refuses a read whose lease has already run out. With empty id lists nothing is
        read and the notification is sent alone. Raises :class:`KvTransferError`.
        """
        if self.region.closed:
            raise KvTransferError("the KV region is closed")
        notif = _notif(remote_request_id, self.tp_size)
        peer, handshake_s = await self._peer(remote_host, remote_port, remote_engine_id)
        self._check_ids(peer, remote_block_ids, local_block_ids)
        if remote_blocks_expiry_time is not None:
            late = time.perf_counter() + peer.clock_offset - remote_blocks_expiry_time
            if late > 0:
                raise KvTransferError(
                    f"the lease of request {remote_request_id!r} on engine {remote_engine_id} "
                    f"expired {late:.3f}s ago; its blocks may have been reused"
                )
        if not remote_block_ids:
            self._send_notif(peer, notif)
            return ReadStats(0, 0.0, handshake_s or 0.0, False)
        t0 = time.perf_counter()
        retried = False
        try:
            await self._transfer(peer, remote_block_ids, local_block_ids, notif)
        except KvTransferError as e:
            self._forget_peer(peer)
            if handshake_s is not None:  # the handshake was fresh: no stale cache to blame
                raise
            log.info("NIXL read from cached engine %s failed (%s); handshaking again",
                     remote_engine_id, e)  # fmt: skip
            peer, handshake_s = await self._peer(remote_host, remote_port, remote_engine_id)
            self._check_ids(peer, remote_block_ids, local_block_ids)
            t0 = time.perf_counter()
            retried = True
            try:
                await self._transfer(peer, remote_block_ids, local_block_ids, notif)
            except KvTransferError:
                self._forget_peer(peer)
                raise
        nbytes = len(remote_block_ids) * self.region.block_bytes
        return ReadStats(nbytes, time.perf_counter() - t0, handshake_s or 0.0, retried)

    def _send_notif(self, peer: _Peer, notif: bytes) -> None:
        try:
            self.region.agent.send_notif(peer.meta.agent_name, notif)
        except Exception as e:
            self._forget_peer(peer)
            raise _nixl_error(
                f"cannot notify engine {peer.meta.engine_id} at {peer.host}:{peer.port}", e
            ) from e

    async def abort(
        self,
        remote_host: str,
        remote_port: int,
        remote_engine_id: str,
        remote_request_id: str,
    ) -> None:
        """Tell the prefill engine that this request will not read its blocks, so that it
        frees them now instead of at lease expiry (vLLM's empty read). Raises
        :class:`KvTransferError` if the engine cannot be reached; the lease then expires on
        its own, so callers usually log and move on."""
        peer, _ = await self._peer(remote_host, remote_port, remote_engine_id)
        self._send_notif(peer, _notif(remote_request_id, self.tp_size))

    # -- lifetime -------------------------------------------------------------------------

    async def close(self) -> None:
        """Forget all peers, release the local descriptors, stop the setup thread and the
        ZMQ context. Idempotent; does not close the region."""
        if self._closed:
            return
        self._closed = True
        # Waits for a peer setup in progress (no network I/O there: tens of ms at most).
        self._executor.shutdown(wait=True)
        for engine_id in list(self._peers):
            self.forget(engine_id)
        with contextlib.suppress(Exception):
            self._local.release()
        self._ctx.term()

    async def __aenter__(self) -> KvConsumer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
