"""The simulator process: engines (one per data-parallel rank), their KV event publishers
and the HTTP server, started and stopped together."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from epp.kvevents.publisher import ZmqEventPublisher
from epp.tasks import cancel_and_wait
from workers.sim.engine import Engine, EngineConfig
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
        self.runner: web.AppRunner | None = None
        self.port: int | None = None
        self._tasks: list[asyncio.Task[None]] = []

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

    async def start(self) -> None:
        opts = self.opts
        if opts.role != "both":
            raise StartupError(
                f"--role {opts.role} needs the NIXL transfer layer, which is not built yet"
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
                )
                self.engines.append(
                    Engine(
                        config,
                        rank=rank,
                        publish=publisher.publish_events if publisher is not None else None,
                    )
                )
            server = SimServer(
                self.engines,
                model_names=opts.names,
                tokenizer=tokenizer,
                hash_algo=opts.hash_algo,
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
        log.info("kvpick sim engine ready on port %d: %s", self.port, describe(opts))
        for p in self.publishers:
            log.info(
                "rank %d publishes KV events on %s (replay %s)",
                p.dp_rank,
                p.endpoint,
                p.replay_endpoint,
            )

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks)
        self._tasks.clear()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        for p in self.publishers:
            p.close()
        self.publishers.clear()
