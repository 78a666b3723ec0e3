"""The simulator process: engines (one per data-parallel rank), their KV event publishers,
their KV connectors (prefill or decode role) and the HTTP server, started and stopped
together."""

from __future__ import annotations

import asyncio
import gc
import logging
import uuid
from typing import Any

from aiohttp import web

from epp.kvevents.publisher import ZmqEventPublisher
from epp.tasks import cancel_and_wait
from workers.sim.engine import Engine, EngineConfig, Sequence_
from workers.sim.kv_connector import DecodeConnector, PrefillConnector
from workers.sim.options import SimOptions, describe
from workers.sim.server import SimServer, bound_port, serve

log = logging.getLogger("workers.sim")


class StartupError(RuntimeError):
    """The simulator cannot start; the message says why."""


class SimApp:
    def __init__(self, opts: SimOptions) -> None:
        self.opts = opts
        self.engines: list[Engine] = []
        self.publishers: list[ZmqEventPublisher] = []
        self.prefill: list[PrefillConnector] = []
        self.decode: list[DecodeConnector] = []
        self.runner: web.AppRunner | None = None
        self.port: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.engine_id = opts.engine_id or str(uuid.uuid4())

    def _publisher(self, rank: int) -> ZmqEventPublisher | None:
        cfg = self.opts.kv_events
        if not cfg.active:
            return None
        try:
            return ZmqEventPublisher(
                cfg.endpoint,
                cfg.replay_endpoint,
                topic=cfg.topic,
                buffer_steps=cfg.buffer_steps,
                hwm=cfg.hwm,
                dp_rank=rank,
                shape="map" if self.opts.kv_events_shape == "map" else "array",
            )
        except Exception as exc:
            raise StartupError(f"KV event publisher for rank {rank}: {exc}") from exc

    def _tokenizer(self) -> Any:
        if self.opts.tokenizer is None:
            return None
        from epp.tokenizer import Tokenizer

        try:
            return Tokenizer.load(self.opts.tokenizer)
        except Exception as exc:
            raise StartupError(f"cannot load tokenizer {self.opts.tokenizer!r}: {exc}") from exc

    def _connector(self, engine: Engine, engine_id: str) -> None:
        """Give ``engine`` its NIXL side for the prefill or decode role."""
        from workers.sim.kv_transfer import KvConsumer, KvProducer, KvRegion, KvTransferError

        opts = self.opts
        # Both engines must derive the same block contents from a prompt.
        hashing = f"{opts.hash_algo}:{engine.hasher.root.hex()}"
        try:
            region = KvRegion(opts.num_blocks, opts.kv_block_bytes)
        except KvTransferError as exc:
            raise StartupError(f"--role {opts.role}: {exc}") from exc
        try:
            if opts.role == "prefill":
                port = opts.side_channel_port + engine.rank if opts.side_channel_port else 0
                producer = KvProducer(
                    region,
                    engine_id=engine_id,
                    block_size=opts.block_size,
                    host=opts.side_channel_host,
                    port=port,
                    model_name=opts.names[0],
                    lease_s=opts.kv_lease_s,
                    block_hashing=hashing,
                )
                connector = PrefillConnector(engine, region, producer, opts.side_channel_host)
                connector.start()
                self.prefill.append(connector)
            else:
                consumer = KvConsumer(
                    region,
                    block_size=opts.block_size,
                    model_name=opts.names[0],
                    block_hashing=hashing,
                )
                decode = DecodeConnector(region, consumer)
                engine.loader = decode
                self.decode.append(decode)
        except KvTransferError as exc:
            region.close()
            raise StartupError(f"--role {opts.role}: {exc}") from exc

    def _handoff(self, engine: Engine, seq: Sequence_) -> dict[str, Any]:
        return self.prefill[engine.rank].handoff(seq)

    async def start(self) -> None:
        opts = self.opts
        if opts.role != "both":
            from workers.sim.kv_transfer import nixl_available

            missing = nixl_available()
            if missing is not None:
                raise StartupError(
                    f"--role {opts.role} moves KV blocks with NIXL, which is not usable here: "
                    f"{missing}"
                )
        tokenizer = self._tokenizer()
        vocab = tokenizer.vocab_size if tokenizer is not None else opts.vocab_size
        try:
            for rank in range(opts.dp_size):
                publisher = self._publisher(rank)
                if publisher is not None:
                    self.publishers.append(publisher)
                config = EngineConfig(
                    num_blocks=opts.num_blocks,
                    block_size=opts.block_size,
                    max_num_seqs=opts.max_num_seqs,
                    max_num_batched_tokens=opts.max_num_batched_tokens,
                    max_model_len=opts.max_model_len,
                    max_waiting=opts.max_waiting,
                    speedup=opts.speedup,
                    hash_algo=opts.hash_algo,  # type: ignore[arg-type]
                    vocab_size=vocab,
                    load_failure_policy=opts.kv_load_failure_policy,  # type: ignore[arg-type]
                )
                engine = Engine(
                    config,
                    rank=rank,
                    publish=publisher.publish_events if publisher is not None else None,
                )
                self.engines.append(engine)
                if opts.role != "both":
                    # vLLM names each data-parallel rank's engine apart with a suffix.
                    suffix = f"_dp{rank}" if opts.dp_size > 1 else ""
                    self._connector(engine, f"{self.engine_id}{suffix}")
            transfers = [c.stats for c in (self.prefill or self.decode)] or None
            server = SimServer(
                self.engines,
                model_names=opts.names,
                tokenizer=tokenizer,
                hash_algo=opts.hash_algo,
                handoff=self._handoff if self.prefill else None,
                transfers=transfers,
            )
            try:
                self.runner = await serve(server, opts.host, opts.port)
            except OSError as exc:
                raise StartupError(f"cannot listen on {opts.host}:{opts.port}: {exc}") from exc
            self.port = bound_port(self.runner)
        except BaseException:
            await self.stop()
            raise
        for engine in self.engines:
            self._tasks.append(asyncio.create_task(engine.run(), name=f"engine-{engine.rank}"))
        # What start-up made (modules, the tokenizer) lives as long as the process: out of
        # every later full collection, which stops the engine loop while it runs.
        gc.collect()
        gc.freeze()
        log.info("kvpick sim engine ready on port %d: %s", self.port, describe(opts))
        for p in self.publishers:
            log.info(
                "rank %d publishes KV events on %s (replay %s)",
                p.dp_rank,
                p.endpoint,
                p.replay_endpoint,
            )
        for c in self.prefill:
            log.info(
                "rank %d is a prefill engine %s: NIXL side channel on %s:%d, %d blocks of %d "
                "bytes, leases expire after %gs",
                c.engine.rank,
                c.producer.engine_id,
                c.producer.host,
                c.producer.port,
                c.region.num_blocks,
                c.region.block_bytes,
                c.producer.lease_s,
            )
        for engine in self.engines:
            if engine.loader is not None:
                log.info(
                    "rank %d is a decode engine: reads prompt KV over NIXL into %d blocks of %d "
                    "bytes; a failed load %s",
                    engine.rank,
                    opts.num_blocks,
                    opts.kv_block_bytes,
                    "recomputes the prompt"
                    if opts.kv_load_failure_policy == "recompute"
                    else "fails the request",
                )

    async def stop(self) -> None:
        """Abort what is in flight (so that handlers answer at once and decode engines tell
        prefill engines to free their leases), close the server, the connectors, then the
        engines."""
        aborted = sum(engine.abort_all() for engine in self.engines)
        if aborted:
            log.info("stopping: aborted %d request(s) in flight", aborted)
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        for c in [*self.prefill, *self.decode]:
            try:
                await c.close()
            except Exception:
                log.exception("closing a KV connector")
        self.prefill.clear()
        self.decode.clear()
        await cancel_and_wait(*self._tasks)
        self._tasks.clear()
        for p in self.publishers:
            p.close()
        self.publishers.clear()
