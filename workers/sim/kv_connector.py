"""The simulator's KV connector: vLLM's NixlConnector request protocol (pull mode) on top
of the NIXL transfer layer in :mod:`workers.sim.kv_transfer`.

Prefill role (:class:`PrefillConnector`): a request with ``kv_transfer_params``
``do_remote_decode`` runs its prompt, returns one token and keeps its blocks. The connector
writes each block's content into the engine's NIXL region, leases the blocks and answers
with the ``kv_transfer_params`` a decode engine needs (vLLM's field names). The lease ends
when the decode engine's NIXL notification arrives or it expires; the blocks go back to the
engine's cache either way.

Decode role (:class:`DecodeConnector`): a request with ``do_remote_prefill`` is admitted with
blocks for its whole prompt; the connector reads the prompt blocks this engine does not have
cached from the prefill engine over NIXL, checks every byte against the content the block's
key implies, and hands the sequence back to the engine, which then decodes. A failed or
unverifiable read is reported to the engine, whose load-failure policy decides (recompute
the prompt locally, or fail the request).

Block content keys: a full block's key is its engine hash as published in KV events; the
last, partial block of a prompt (vLLM transfers it too) gets the same chained hash over its
partial tokens. Both sides compute the keys from the prompt alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from workers.sim.engine_hash import BlockHasher, block_digest, event_value
from workers.sim.kv_transfer import KvConsumer, KvProducer, KvRegion, KvTransferError
from workers.sim.metrics import TransferStats

if TYPE_CHECKING:
    from workers.sim.engine import Engine, Sequence_

log = logging.getLogger(__name__)


def content_keys(
    hasher: BlockHasher, prompt: Sequence[int], known: Sequence[bytes] = ()
) -> list[int]:
    """One content key per block the prompt occupies (see the module docstring). ``known``
    may hold the digests of the prompt's leading full blocks (the engine computed them at
    submit), which are then not hashed again."""
    bs = hasher.block_size
    full = len(prompt) // bs
    digests = list(known[:full])
    if len(digests) < full:
        digests += hasher.digests(prompt, len(digests), digests[-1] if digests else None)
    keys = [event_value(d) for d in digests]
    rest = len(prompt) - len(digests) * bs
    if rest:
        parent = digests[-1] if digests else hasher.root
        keys.append(event_value(block_digest(parent, prompt[-rest:], hasher.algo)))
    return keys


@dataclass(frozen=True, slots=True)
class RemotePrefill:
    """Where a decode request's prompt KV is: the prefill engine's answer, as parsed from
    ``kv_transfer_params``."""

    engine_id: str
    host: str
    port: int
    request_id: str
    block_ids: tuple[int, ...]
    expiry_time: float | None

    def __str__(self) -> str:
        return f"engine {self.engine_id} at {self.host}:{self.port}"

    @classmethod
    def from_params(cls, params: dict[str, Any], prompt_len: int, block_size: int) -> RemotePrefill:
        """Parse and check the fields; raises ValueError naming the field at fault."""

        def need(name: str, kind: type | tuple[type, ...]) -> Any:
            value = params.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"kv_transfer_params.{name} is missing or malformed")
            return value

        engine_id = need("remote_engine_id", str)
        host = need("remote_host", str)
        if not host or not host.isascii() or not host.isprintable() or " " in host:
            raise ValueError(f"kv_transfer_params.remote_host {host!r} is not a host name")
        port = need("remote_port", int)
        if not 0 < port < 65536:
            raise ValueError(f"kv_transfer_params.remote_port {port} is not a port")
        request_id = need("remote_request_id", str)
        ids: Any = params.get("remote_block_ids")
        # vLLM >= 0.11 sends one list per KV-cache group; older versions a flat list.
        if isinstance(ids, list) and ids and all(isinstance(g, list) for g in ids):
            if len(ids) != 1:
                raise ValueError(
                    f"kv_transfer_params.remote_block_ids has {len(ids)} KV-cache groups; "
                    "the simulator has one"
                )
            ids = ids[0]
        if not (
            isinstance(ids, list)
            and all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in ids)
        ):
            raise ValueError("kv_transfer_params.remote_block_ids must be block numbers")
        want = -(-prompt_len // block_size)
        if len(ids) != want:
            raise ValueError(
                f"kv_transfer_params.remote_block_ids has {len(ids)} blocks but the prompt of "
                f"{prompt_len} tokens fills {want} blocks of {block_size}"
            )
        expiry = params.get("remote_blocks_expiry_time")
        if expiry is not None and (isinstance(expiry, bool) or not isinstance(expiry, int | float)):
            raise ValueError("kv_transfer_params.remote_blocks_expiry_time must be a number")
        return cls(engine_id, host, port, request_id, tuple(ids), expiry)


class PrefillConnector:
    """The prefill role of one rank: region, side channel, leases (module docstring)."""

    def __init__(
        self, engine: Engine, region: KvRegion, producer: KvProducer, advertised_host: str
    ) -> None:
        self.engine = engine
        self.region = region
        self.producer = producer
        self.host = advertised_host
        self.stats = TransferStats()
        self._lease_added = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.producer.start()
        self._task = asyncio.create_task(self._watch(), name=f"kv-leases-{self.engine.rank}")

    def handoff(self, seq: Sequence_) -> dict[str, Any]:
        """Lease a finished prefill's blocks and return the ``kv_transfer_params`` that let a
        decode engine read them. The engine must hold the blocks (``hold_blocks``)."""
        engine = self.engine
        blocks = engine.lease_blocks(seq.request_id)
        keys = content_keys(engine.hasher, seq.tokens[: seq.prompt_len], seq.prompt_digests)
        if len(blocks) < len(keys):
            raise RuntimeError(
                f"request {seq.request_id} holds {len(blocks)} blocks for {len(keys)} prompt blocks"
            )
        blocks = blocks[: len(keys)]
        # The simulator computes a block's "KV" when it hands it over; the content depends
        # on the key alone, so writing it again for a block shared by requests is harmless.
        for block, key in zip(blocks, keys, strict=True):
            self.region.fill(block, key)
        lease = self.producer.lease(seq.request_id, blocks)
        self._lease_added.set()
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": [blocks],
            "remote_engine_id": self.producer.engine_id,
            "remote_request_id": seq.request_id,
            "remote_host": self.host,
            "remote_port": self.producer.port,
            "tp_size": 1,
            "dcp_size": 1,
            "pp_size": 1,
            "remote_num_tokens": seq.prompt_len,
            "remote_blocks_expiry_time": lease.expiry_time,
            "remote_registration_generation": 0,
            "transfer_mode": "pull",
        }

    async def _watch(self) -> None:
        """Free the blocks of every lease that ends, as soon as it ends."""
        while True:
            if not self.producer.leases:
                self._lease_added.clear()
                await self._lease_added.wait()
            for end in self.producer.poll():
                if end.reason == "expired":
                    self.stats.expired_leases += 1
                    log.warning(
                        "rank %d: no decode engine read the KV of request %s before its lease "
                        "expired; freeing its %d blocks",
                        self.engine.rank,
                        end.request_id,
                        len(end.block_ids),
                    )
                else:
                    log.debug("rank %d: request %s read; freeing its blocks",
                              self.engine.rank, end.request_id)  # fmt: skip
                self.engine.release_lease(end.request_id)
            await asyncio.sleep(0.002)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
            self._task = None
        await self.producer.close()
        self.region.close()


class DecodeConnector:
    """The decode role of one rank: reads prompt KV over NIXL for the engine
    (:class:`workers.sim.engine.KvLoader`)."""

    def __init__(self, region: KvRegion, consumer: KvConsumer) -> None:
        self.region = region
        self.consumer = consumer
        self.stats = TransferStats()
        self._loads: set[asyncio.Task[None]] = set()
        self._abandons: set[asyncio.Task[None]] = set()

    @staticmethod
    def _spawn(tasks: set[asyncio.Task[None]], coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def start_load(self, engine: Engine, seq: Sequence_, local_hits: int) -> None:
        self._spawn(self._loads, self._load(engine, seq, local_hits), f"kv-load-{seq.request_id}")

    def abandon(self, remote: RemotePrefill) -> None:
        self._spawn(self._abandons, self._abandon(remote), f"kv-abandon-{remote.request_id}")

    async def _abandon(self, remote: RemotePrefill) -> None:
        try:
            await self.consumer.abort(remote.host, remote.port, remote.engine_id, remote.request_id)
        except Exception as exc:  # any failure: the lease expires on its own
            self.stats.failed_notifications += 1
            log.warning("cannot tell %s to free request %s's blocks (its lease will expire): %s",
                        remote, remote.request_id, exc)  # fmt: skip

    async def _load(self, engine: Engine, seq: Sequence_, local_hits: int) -> None:
        remote: RemotePrefill = seq.remote
        error: str | None = None
        try:
            keys = content_keys(engine.hasher, seq.tokens[: seq.prompt_len], seq.prompt_digests)
            local = seq.kv.blocks[local_hits : len(keys)]
            t0 = time.perf_counter()
            stats = await self.consumer.read_blocks(
                remote.host,
                remote.port,
                remote.engine_id,
                remote.request_id,
                remote.block_ids[local_hits:],
                local,
                remote_blocks_expiry_time=remote.expiry_time,
            )
            bad = [
                i
                for i, (block, key) in enumerate(zip(local, keys[local_hits:], strict=True))
                if not self.region.verify(block, key)
            ]
            if bad:
                error = (
                    f"{len(bad)} of {len(local)} blocks arrived with content that does not "
                    f"match the prompt (first: prompt block {local_hits + bad[0]})"
                )
            else:
                self.stats.xfer_seconds.add(stats.transfer_s)
                self.stats.bytes_transferred.add(stats.nbytes)
                self.stats.loaded_tokens += seq.prompt_len - local_hits * engine.config.block_size
                log.debug("rank %d: request %s read %d blocks (%d bytes) from %s in %.2f ms",
                          engine.rank, seq.request_id, len(local), stats.nbytes, remote,
                          (time.perf_counter() - t0) * 1e3)  # fmt: skip
        except KvTransferError as exc:
            error = str(exc)
        except Exception as exc:  # a bug here must not strand the sequence in "loading"
            log.exception("rank %d: KV load of request %s", engine.rank, seq.request_id)
            error = f"{type(exc).__name__}: {exc}"
        except asyncio.CancelledError:
            engine.finish_load(seq, "the engine is stopping")
            raise
        if error is not None:
            self.stats.failed_transfers += 1
        engine.finish_load(seq, error)

    async def close(self) -> None:
        """Let pending lease releases go out (for up to a second), cancel loads (their
        sequences end and free their blocks), then close the NIXL side."""
        if self._abandons:
            await asyncio.wait(list(self._abandons), timeout=1.0)
        tasks = [*self._loads, *self._abandons]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        await self.consumer.close()
        self.region.close()
