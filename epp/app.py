"""The EPP process: every part wired together, started, and stopped in order.

:class:`EppApp` builds the index, the KV event subscriber, the metrics scraper, the pool
and its discovery, the scheduler, the director and the three listeners (ext_proc :9002,
health :9003, Prometheus and debug :9090) from :class:`epp.options.EppOptions`.

Readiness: health checks answer NOT_SERVING until discovery has synced once, and again
from the moment a drain starts (SIGTERM), so the gateway stops sending new streams while
those in flight finish within ``--drain-timeout``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from epp import collector, memory
from epp import metrics as M
from epp.datalayer.scraper import MetricsScraper
from epp.director import Director, DirectorConfig, worker_label
from epp.discovery.kv_sources import sync_event_sources
from epp.discovery.static import EndpointsChange, EndpointsFileWatcher
from epp.extproc.h2server import H2Limits
from epp.extproc.server import DEFAULT_MAX_MESSAGE, ExtProcServer, ServerConfig
from epp.extproc.stream import StreamLimits
from epp.kvevents.subscriber import KvEventSubscriber
from epp.kvindex.index import KvIndex
from epp.options import EppOptions
from epp.pool import Pool
from epp.preprocess import Preprocessor
from epp.scheduling.config import ConfigError, load_scheduler
from epp.scheduling.load import ActiveLoad
from epp.scheduling.scheduler import Scheduler
from epp.tasks import cancel_and_wait
from epp.tokenizer import Tokenizer, TokenizerError

log = logging.getLogger("epp")

SWITCH_INTERVAL = 0.0005
"""The interpreter's thread switch interval while the EPP runs (Python's default is 5 ms)."""


def _has_plugin(scheduler: Scheduler, plugin_type: str) -> bool:
    return any(spec.type == plugin_type for spec in scheduler.config.plugins)


class StartupError(RuntimeError):
    """The EPP cannot start; the message says what to fix."""


class EppApp:
    """One EPP; ``await start()``, then ``await stop()``."""

    def __init__(self, opts: EppOptions, *, host: str = "0.0.0.0") -> None:
        self.opts = opts
        self.host = host
        self.synced = False
        self.draining = False
        self.index = KvIndex(opts.block_size)
        self.pool = Pool()
        self.load = ActiveLoad(expiry_s=opts.active_request_expiry)
        self.subscriber: KvEventSubscriber | None = None
        self.scraper: MetricsScraper | None = None
        self.watcher: EndpointsFileWatcher | None = None
        self.server: ExtProcServer | None = None
        self.director: Director | None = None
        self.preprocessor: Preprocessor | None = None
        self.trimmer = memory.Trimmer()
        self.max_model_len: int | None = None
        self._http: web.AppRunner | None = None
        self.metrics_port = opts.metrics_port
        self._tasks: list[asyncio.Task[Any]] = []

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        opts = self.opts
        memory.tune_allocator()
        # The preprocessing threads hold the GIL for short Python steps; a shorter switch
        # interval gets it back to the event loop within a millisecond when it needs it.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        tokenizer = None
        if opts.tokenizer:
            started = time.monotonic()
            try:
                tokenizer = Tokenizer.load(opts.tokenizer)
            except TokenizerError as exc:
                raise StartupError(f"tokenizer {opts.tokenizer}: {exc}") from None
            log.info("tokenizer %s loaded in %.2fs", opts.tokenizer, time.monotonic() - started)
        else:
            log.warning(
                "no --tokenizer: prompts given as text cannot be matched against the KV "
                "cache (token-id prompts still are); routing falls back to load only"
            )
        self.max_model_len = self._context_length(tokenizer)
        try:
            scheduler = load_scheduler(opts)
        except ConfigError as exc:
            raise StartupError(f"scheduling config: {exc}") from None
        self.preprocessor = Preprocessor(
            opts.preprocess_threads, opts.preprocess_queue, opts.preprocess_timeout
        )
        self.subscriber = KvEventSubscriber(self.index)
        await self.subscriber.start()
        self.scraper = MetricsScraper(
            interval=opts.refresh_metrics_interval, staleness=opts.metrics_staleness_threshold
        )
        await self.scraper.start()
        self.director = Director(
            pool=self.pool,
            index=self.index,
            load=self.load,
            scheduler=scheduler,
            tokenizer=tokenizer,
            scraper=self.scraper,
            config=DirectorConfig(
                block_size=opts.block_size,
                served_model_names=opts.served_model_names,
                lora_adapters=opts.lora_adapters,
                token_data=opts.token_data,
                fallbacks=opts.fallbacks,
                subset_filter=not opts.disable_endpoint_subset_filter,
                testing_filter=_has_plugin(scheduler, "header-based-testing-filter"),
                served_verifier=_has_plugin(scheduler, "destination-endpoint-served-verifier"),
                prefix_text=_has_plugin(scheduler, "prefix-cache-scorer"),
                decision_log_size=opts.decision_log_size,
                max_json_depth=opts.max_json_depth,
                max_model_len=self.max_model_len,
                offload_body_bytes=opts.offload_body_bytes,
            ),
            preprocessor=self.preprocessor,
        )
        if opts.endpoints_file:
            self.watcher = EndpointsFileWatcher(opts.endpoints_file, self._on_change)
            await self.watcher.start()
            self.synced = True
        else:
            raise StartupError(
                "no endpoint discovery configured: pass --endpoints-file FILE (Kubernetes "
                "InferencePool discovery via --pool-name is not built yet)"
            )
        self.server = ExtProcServer(
            self.director,
            ServerConfig(
                grpc_port=opts.grpc_port,
                health_port=opts.grpc_health_port,
                host=self.host,
                secure=opts.secure_serving,
                cert_path=opts.cert_path,
                cert_reload=opts.enable_cert_reload,
                cert_reload_interval=opts.cert_reload_interval,
                max_recv=opts.grpc_max_recv_msg_size or DEFAULT_MAX_MESSAGE,
                max_send=opts.grpc_max_send_msg_size or DEFAULT_MAX_MESSAGE,
                health_on_grpc_port=opts.health_checking,
                transport=opts.ext_proc_server,
                limits=StreamLimits(
                    max_body_bytes=opts.max_body_bytes, body_timeout=opts.request_body_timeout
                ),
                listener=H2Limits(
                    max_connections=opts.max_connections,
                    handshake_timeout=opts.tls_handshake_timeout,
                    idle_timeout=opts.idle_connection_timeout,
                    max_resets_per_second=opts.max_stream_resets,
                    max_control_frames_per_second=opts.max_control_frames,
                ),
                client_ca=opts.client_ca,
            ),
            self.is_serving,
            after_large=self.trimmer.request,
        )
        await self.server.start()
        await self._start_http()
        self._tasks.append(asyncio.create_task(self._expire_loop(), name="load-expiry"))
        self._tasks.append(asyncio.create_task(self._lag_probe(), name="loop-lag"))
        collector.watch()
        frozen = collector.settle()
        log.debug("%d start-up objects moved out of the collector's reach", frozen)
        log.info(
            "kvpick EPP ready: %d endpoints, policy %s, block size %d",
            len(self.pool),
            opts.config_file or ("--config-text" if opts.config_text else opts.policy),
            opts.block_size,
        )

    async def stop(self) -> None:
        self.draining = True
        if self.server is not None:
            await self.server.stop(grace=min(self.opts.drain_timeout, 5.0))
        await cancel_and_wait(*self._tasks)
        if self.watcher is not None:
            await self.watcher.close()
        if self.scraper is not None:
            await self.scraper.close()
        if self.subscriber is not None:
            await self.subscriber.close()
        if self._http is not None:
            await self._http.cleanup()
        if self.preprocessor is not None:
            self.preprocessor.close()
        collector.unwatch()

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, drain, stop."""
        try:
            await self.start()
        except BaseException:
            await self.stop()  # what did start (scraper session, subscriber, ports) is closed
            raise
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info(
            "stopping: health now NOT_SERVING; draining for up to %.0fs", self.opts.drain_timeout
        )
        self.draining = True
        await self.stop()

    def _context_length(self, tokenizer: Tokenizer | None) -> int | None:
        """The context length prompts are checked against (see ``--max-model-len``)."""
        opts = self.opts
        if opts.max_model_len == 0:
            log.info("prompt length check: off (--max-model-len 0)")
            return None
        if opts.max_model_len is not None:
            log.info("prompt length check: %d tokens (--max-model-len)", opts.max_model_len)
            return opts.max_model_len
        if tokenizer is not None and tokenizer.max_model_len is not None:
            log.info(
                "prompt length check: %d tokens (the model's %s; set --max-model-len to the "
                "engines' own if they use a shorter one)",
                tokenizer.max_model_len,
                tokenizer.max_model_len_source,
            )
            return tokenizer.max_model_len
        log.warning(
            "prompt length check: off (no --max-model-len, and the model folder states no "
            "context length); prompts are bounded by --max-body-bytes only"
        )
        return None

    def is_serving(self, _service: str) -> bool:
        return self.synced and not self.draining

    # ------------------------------------------------------------ discovery

    async def _on_change(self, change: EndpointsChange) -> None:
        self.pool.apply(change)
        assert self.subscriber is not None and self.scraper is not None
        await sync_event_sources(self.subscriber, change)
        for ep in change.removed:
            self.scraper.remove_endpoint(ep.address)
            for worker in ep.workers:
                self.load.remove_worker(worker)
                if self.director is not None:
                    self.director.scheduler.remove_worker(worker)
        for ep in (*change.added, *(after for _, after in change.changed)):
            if ep.metrics:
                self.scraper.set_endpoint(ep.address, ep.metrics, ep.engine, ep.dp_size)
            else:
                self.scraper.remove_endpoint(ep.address)
        M.READY_PODS.labels(self.opts.pool_name or "endpoints-file").set(len(self.pool))
        log.info(
            "pool: %d endpoints (+%d -%d ~%d)",
            len(self.pool),
            len(change.added),
            len(change.removed),
            len(change.changed),
        )

    async def _lag_probe(self, period: float = 0.01) -> None:
        """Measures how late the loop wakes up (``kvpick_event_loop_lag_seconds``)."""
        loop = asyncio.get_running_loop()
        worst = 0.0
        while True:
            due = loop.time() + period
            await asyncio.sleep(period)
            lag = max(0.0, loop.time() - due)
            M.LOOP_LAG.observe(lag)
            if lag > worst:
                worst = lag
                M.LOOP_LAG_MAX.set(lag)

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for booking in self.load.expire():
                log.warning("request %s expired without an end; its load was released", booking)

    # ---------------------------------------------------------------- HTTP

    async def _start_http(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/debug/decisions", self._decisions)
        app.router.add_get("/debug/pool", self._pool)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.opts.metrics_port)
        await site.start()
        self._http = runner
        server = site._server
        if server is not None and server.sockets:  # port 0: find the one chosen
            self.metrics_port = server.sockets[0].getsockname()[1]

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _decisions(self, request: web.Request) -> web.Response:
        assert self.director is not None
        try:
            n = int(request.query.get("n", "50"))
        except ValueError:
            return web.json_response({"error": "n must be an integer"}, status=400)
        records = self.director.decisions.recent(n)
        return web.json_response({"decisions": [r.to_json() for r in records]})

    async def _pool(self, request: web.Request) -> web.Response:
        out = []
        for worker, ep in self.pool.workers():
            view = self.load.view(worker)
            m = self.scraper.get(worker) if self.scraper is not None else None
            out.append(
                {
                    "worker": worker_label(worker, ep.dp_size),
                    "role": ep.role,
                    "engine": ep.engine,
                    "reachable": self.scraper is None or not self.scraper.unreachable(worker[0]),
                    "cached_blocks": self.index.block_count(worker)
                    if self.index.has_worker(worker)
                    else 0,
                    "booked": {
                        "requests": view.requests,
                        "prefill_tokens": view.prefill_tokens,
                        "decode_blocks": view.decode_blocks,
                    },
                    "metrics": None
                    if m is None
                    else {"waiting": m.waiting, "running": m.running, "kv_usage": m.kv_usage},
                }
            )
        return web.json_response({"workers": out, "synced": self.synced})
