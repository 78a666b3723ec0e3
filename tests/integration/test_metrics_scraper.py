"""MetricsScraper against real aiohttp servers on 127.0.0.1 serving model-server metric text."""

from __future__ import annotations

import asyncio
import gc
import logging
import time

import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from epp.datalayer.scraper import MetricsScraper

pytestmark = pytest.mark.filterwarnings("error")

INTERVAL = 0.02


def vllm_text(*ranks: tuple[int, int, float], block_size: int = 16) -> str:
    """vLLM 0.33 gauges, one ``engine`` label per (waiting, running, kv usage) tuple, plus
    a histogram the scraper has to skip."""
    out = []
    for name, column in (
        ("vllm:num_requests_running", 1),
        ("vllm:num_requests_waiting", 0),
        ("vllm:kv_cache_usage_perc", 2),
    ):
        out.append(f"# HELP {name} doc\n# TYPE {name} gauge")
        for engine, values in enumerate(ranks):
            out.append(f'{name}{{engine="{engine}",model_name="m"}} {float(values[column])}')
    out.append("# TYPE vllm:time_to_first_token_seconds histogram")
    for engine in range(len(ranks)):
        for le in ("0.1", "1.0", "+Inf"):
            out.append(
                f'vllm:time_to_first_token_seconds_bucket{{engine="{engine}",le="{le}",'
                'model_name="m"} 3.0'
            )
        out.append(
            f'vllm:cache_config_info{{block_size="{block_size}",engine="{engine}",'
            'model_name="m",num_gpu_blocks="4000",prefix_caching_hash_algo="sha256"} 1.0'
        )
    return "\n".join(out) + "\n"


class MetricsServer:
    """A model server's metrics endpoint whose reply the test controls."""

    def __init__(self, text: str = "", path: str = "/metrics") -> None:
        self.text = text
        self.body: bytes | None = None
        self.status = 200
        self.delay = 0.0
        self.path = path
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.clients: set[tuple[str, int]] = set()
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.clients.add(request.transport.get_extra_info("peername")[:2])
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            # Sleep in steps so that clearing `delay` also releases requests already waiting
            # (the server's shutdown would otherwise wait for them).
            start = time.monotonic()
            while self.delay and time.monotonic() - start < self.delay:
                await asyncio.sleep(0.01)
            if self.body is not None:
                return web.Response(body=self.body, status=self.status)
            return web.Response(text=self.text, status=self.status, content_type="text/plain")
        finally:
            self.in_flight -= 1

    async def start(self) -> MetricsServer:
        app = web.Application()
        app.router.add_get(self.path, self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"


def errors(reason: str) -> float:
    value = REGISTRY.get_sample_value("kvpick_metrics_scrape_errors_total", {"reason": reason})
    return value or 0.0


async def wait_for(condition, timeout: float, what: str) -> float:
    """Wait until ``condition()`` is true; the seconds it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


@pytest.fixture
async def servers():
    started: list[MetricsServer] = []

    async def make(text: str = "", path: str = "/metrics") -> MetricsServer:
        server = await MetricsServer(text, path).start()
        started.append(server)
        return server

    yield make
    for server in started:
        await server.stop()


@pytest.fixture
async def scrapers():
    made: list[MetricsScraper] = []

    def make(**kw) -> MetricsScraper:
        kw.setdefault("interval", INTERVAL)
        scraper = MetricsScraper(**kw)
        made.append(scraper)
        return scraper

    yield make
    for scraper in made:
        await scraper.close()


async def test_values_appear_quickly_and_follow_changes(servers, scrapers):
    server = await servers(vllm_text((3, 12, 0.25)))
    scraper = scrapers()
    scraper.set_endpoint(server.address, server.url, "vllm")
    worker = (server.address, 0)
    assert scraper.get(worker) is None
    await scraper.start()
    took = await wait_for(lambda: scraper.get(worker) is not None, 5, "first values")
    assert took < 0.5
    m = scraper.get(worker)
    assert (m.waiting, m.running, m.kv_usage, m.block_size, m.num_blocks) == (3, 12, 0.25, 16, 4000)
    assert not m.stale and scraper.state(server.address) == "ok"

    server.text = vllm_text((0, 20, 0.75), block_size=32)
    await wait_for(lambda: scraper.get(worker).running == 20, 5, "changed values")
    m = scraper.get(worker)
    assert (m.waiting, m.kv_usage, m.block_size) == (0, 0.75, 32)

    # Many polls, one keep-alive connection, never two requests at once.
    await wait_for(lambda: server.requests >= 20, 5, "20 polls")
    assert len(server.clients) == 1
    assert server.max_in_flight == 1


async def test_polls_at_the_interval(servers, scrapers):
    server = await servers(vllm_text((1, 1, 0.1)))
    scraper = scrapers(interval=0.05)
    scraper.set_endpoint(server.address, server.url, "vllm")
    await scraper.start()
    await wait_for(lambda: server.requests >= 1, 5, "the first poll")
    first = server.requests
    await asyncio.sleep(1.0)
    # 20 polls a second; a loaded CI machine may fall behind a little, never run ahead.
    assert 12 <= server.requests - first <= 21


async def test_vllm_data_parallel_ranks(servers, scrapers):
    server = await servers(vllm_text((3, 12, 0.25), (8, 1, 0.5)))
    scraper = scrapers()
    scraper.set_endpoint(server.address, server.url, "vllm", dp_size=2)
    await scraper.start()
    await wait_for(lambda: scraper.get((server.address, 1)) is not None, 5, "rank 1")
    r0, r1 = scraper.get((server.address, 0)), scraper.get((server.address, 1))
    assert (r0.waiting, r0.running, r0.kv_usage) == (3, 12, 0.25)
    assert (r1.waiting, r1.running, r1.kv_usage) == (8, 1, 0.5)
    assert scraper.get((server.address, 2)) is None
    assert scraper.get(("10.9.9.9:8000", 0)) is None


async def test_sglang_and_trtllm_endpoints(servers, scrapers):
    sglang = await servers(
        'sglang:num_queue_reqs{dp_rank="0",model_name="q",tp_rank="0"} 4.0\n'
        'sglang:num_running_reqs{dp_rank="0",model_name="q",tp_rank="0"} 9.0\n'
        'sglang:token_usage{dp_rank="0",model_name="q",tp_rank="0"} 0.5\n'
        'sglang:page_size{model_name="q"} 1.0\n'
        'sglang:num_pages{model_name="q"} 123456.0\n'
    )
    trtllm = await servers(
        "trtllm_num_requests_waiting 2\n"
        "trtllm_num_requests_running 5\n"
        "trtllm_kv_cache_utilization 0.125\n"
        "trtllm_kv_cache_tokens_per_block 32\n"
        "trtllm_kv_cache_max_blocks 7000\n",
        path="/prometheus/metrics",
    )
    scraper = scrapers()
    scraper.set_endpoint(sglang.address, sglang.url, "sglang")
    scraper.set_endpoint(trtllm.address, trtllm.url, "trtllm")
    await scraper.start()
    await wait_for(
        lambda: all(scraper.get((s.address, 0)) for s in (sglang, trtllm)), 5, "both engines"
    )
    s = scraper.get((sglang.address, 0))
    assert (s.waiting, s.running, s.kv_usage, s.block_size, s.num_blocks) == (4, 9, 0.5, 1, 123456)
    t = scraper.get((trtllm.address, 0))
    assert (t.waiting, t.running, t.kv_usage, t.block_size, t.num_blocks) == (2, 5, 0.125, 32, 7000)


async def test_server_gone_goes_stale_keeps_values_and_recovers(servers, scrapers, caplog):
    caplog.set_level(logging.INFO, logger="epp.datalayer.scraper")
    server = await servers(vllm_text((5, 6, 0.5)))
    scraper = scrapers(staleness=0.3)
    scraper.set_endpoint(server.address, server.url, "vllm")
    await scraper.start()
    worker = (server.address, 0)
    await wait_for(lambda: scraper.get(worker) is not None, 5, "first values")
    before = errors("connect")

    await server.stop()
    await wait_for(lambda: scraper.state(server.address) == "connect", 5, "a failed poll")
    went_stale = await wait_for(lambda: scraper.get(worker).stale, 5, "staleness")
    m = scraper.get(worker)
    assert (m.waiting, m.running, m.kv_usage) == (5, 6, 0.5)
    assert time.monotonic() - m.scraped_at >= 0.3
    assert went_stale < 2.0
    # Keep failing for a while: counted every time, logged once.
    await asyncio.sleep(0.3)
    assert errors("connect") - before >= 3
    failing = [r for r in caplog.records if "failing" in r.getMessage()]
    assert len(failing) == 1 and server.address in failing[0].getMessage()

    server.text = vllm_text((1, 2, 0.125))
    await server.start()  # the same port again
    await wait_for(lambda: not scraper.get(worker).stale, 5, "fresh values")
    assert scraper.get(worker).kv_usage == 0.125
    assert any("recovered" in r.getMessage() for r in caplog.records)


async def test_staleness_follows_the_injected_clock(servers, scrapers):
    now = [1000.0]
    server = await servers(vllm_text((1, 1, 0.5)))
    scraper = scrapers(staleness=2.0, clock=lambda: now[0])
    scraper.set_endpoint(server.address, server.url, "vllm")
    await scraper.start()
    worker = (server.address, 0)
    await wait_for(lambda: scraper.get(worker) is not None, 5, "first values")
    assert scraper.get(worker).scraped_at == 1000.0
    await server.stop()
    await wait_for(lambda: scraper.state(server.address) == "connect", 5, "a failed poll")
    now[0] += 1.9
    assert not scraper.get(worker).stale
    now[0] += 0.2
    stale = scraper.get(worker)
    assert stale.stale and stale.kv_usage == 0.5 and stale.scraped_at == 1000.0


async def test_http_errors_and_garbage_are_counted(servers, scrapers):
    server = await servers(vllm_text((1, 1, 0.5)))
    server.status = 500
    scraper = scrapers()
    scraper.set_endpoint(server.address, server.url, "vllm")
    status_before, garbage_before = errors("http_status"), errors("no_metrics")
    await scraper.start()
    await wait_for(lambda: scraper.state(server.address) == "http_status", 5, "the 500")
    assert scraper.get((server.address, 0)) is None
    assert errors("http_status") > status_before

    server.status = 200
    server.body = b"\xff\xfe\x00garbage{{{\nvllm:num_requests_waiting{ 1\n\x80\x81 2\n" * 50
    await wait_for(lambda: scraper.state(server.address) == "no_metrics", 5, "the garbage")
    assert errors("no_metrics") > garbage_before
    assert scraper.get((server.address, 0)) is None

    server.body = None
    await wait_for(lambda: scraper.get((server.address, 0)) is not None, 5, "good values")
    # Garbage after good values: the good values stay.
    server.body = b"<html>not metrics</html>"
    await wait_for(lambda: scraper.state(server.address) == "no_metrics", 5, "garbage again")
    assert scraper.get((server.address, 0)).kv_usage == 0.5


async def test_oversized_body_is_refused(servers, scrapers):
    server = await servers(vllm_text((1, 1, 0.5)) + "# padding " + "x" * 5000 + "\n")
    scraper = scrapers(max_body_bytes=4096)
    scraper.set_endpoint(server.address, server.url, "vllm")
    before = errors("too_large")
    await scraper.start()
    await wait_for(lambda: scraper.state(server.address) == "too_large", 5, "the refusal")
    assert errors("too_large") > before
    assert scraper.get((server.address, 0)) is None


async def test_slow_server_times_out_without_overlapping_polls(servers, scrapers):
    server = await servers(vllm_text((1, 1, 0.5)))
    server.delay = 5.0
    scraper = scrapers(timeout=0.2, max_backoff=0.05)
    scraper.set_endpoint(server.address, server.url, "vllm")
    before = errors("timeout")
    await scraper.start()
    start = time.monotonic()
    await wait_for(lambda: scraper.state(server.address) == "timeout", 5, "a timeout")
    assert time.monotonic() - start < 1.0
    await asyncio.sleep(0.8)
    elapsed = time.monotonic() - start
    # Polls wait for the previous one: at most one per timeout plus backoff, where
    # overlapping 20 ms polls would have sent dozens.
    assert server.requests <= elapsed / 0.2 + 2
    assert errors("timeout") - before >= 2
    assert scraper.get((server.address, 0)) is None

    server.delay = 0.0
    await wait_for(lambda: scraper.get((server.address, 0)) is not None, 5, "values")


async def test_remove_endpoint_stops_polling(servers, scrapers):
    server = await servers(vllm_text((1, 1, 0.5)))
    scraper = scrapers()
    scraper.set_endpoint(server.address, server.url, "vllm")
    await scraper.start()
    await wait_for(lambda: server.requests >= 3, 5, "polls")
    scraper.remove_endpoint(server.address)
    assert scraper.get((server.address, 0)) is None
    assert scraper.endpoints() == []
    seen = server.requests
    await asyncio.sleep(INTERVAL * 15)
    # A request already on the wire when the task was cancelled may still arrive.
    assert server.requests <= seen + 1
    scraper.remove_endpoint(server.address)  # unknown now: no error


async def test_set_endpoint_replaces_the_source(servers, scrapers):
    old = await servers(vllm_text((1, 1, 0.25)))
    new = await servers(vllm_text((7, 7, 0.75)))
    scraper = scrapers()
    address = "10.0.0.1:8000"
    scraper.set_endpoint(address, old.url, "vllm")
    await scraper.start()
    await wait_for(lambda: scraper.get((address, 0)) is not None, 5, "old values")
    # The same registration again is not a restart: the values stay, polling goes on.
    scraper.set_endpoint(address, old.url, "vllm")
    assert scraper.get((address, 0)).kv_usage == 0.25
    scraper.set_endpoint(address, new.url, "vllm")
    # Until the new source answers, the last values are kept.
    assert scraper.get((address, 0)).kv_usage == 0.25
    await wait_for(lambda: scraper.get((address, 0)).kv_usage == 0.75, 5, "new values")
    seen = old.requests
    await asyncio.sleep(INTERVAL * 15)
    assert old.requests <= seen + 1
    with pytest.raises(ValueError):
        scraper.set_endpoint(address, new.url, "nonsense")
    with pytest.raises(ValueError):
        scraper.set_endpoint(address, new.url, "vllm", dp_size=0)


async def test_on_update_hook_and_a_failing_hook(servers, scrapers, caplog):
    server = await servers(vllm_text((2, 3, 0.5), (4, 5, 0.25)))
    updates: list[tuple[str, dict]] = []

    def hook(address, values):
        updates.append((address, values))
        raise RuntimeError("hook bug")

    scraper = scrapers(on_update=hook)
    scraper.set_endpoint(server.address, server.url, "vllm", dp_size=2)
    await scraper.start()
    await wait_for(lambda: len(updates) >= 5, 5, "hook calls")
    address, values = updates[0]
    assert address == server.address
    assert {rank: m.waiting for rank, m in values.items()} == {0: 2, 1: 4}
    # The hook's exception neither stopped polling nor got logged on every poll.
    assert scraper.get((server.address, 1)).running == 5
    assert sum("on_update hook failed" in r.getMessage() for r in caplog.records) == 1


async def test_close_is_clean(servers):
    loop = asyncio.get_running_loop()
    problems: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: problems.append(context))
    server = await servers(vllm_text((1, 1, 0.5)))
    scraper = MetricsScraper(interval=INTERVAL)
    scraper.set_endpoint(server.address, server.url, "vllm")
    scraper.set_endpoint("127.0.0.1:1", "http://127.0.0.1:1/metrics", "vllm")
    await scraper.start()
    await wait_for(lambda: scraper.get((server.address, 0)) is not None, 5, "values")
    # One endpoint removed just before close: its cancelled task is awaited too.
    scraper.remove_endpoint(server.address)
    await scraper.close()
    # Right after close() returns, not one loop turn later.
    assert [t for t in asyncio.all_tasks() if t.get_name().startswith("metrics-scrape")] == []
    await scraper.close()
    await server.stop()
    await asyncio.sleep(0)
    assert {t for t in asyncio.all_tasks() if t is not asyncio.current_task()} == set()
    gc.collect()
    assert problems == []
    closed = MetricsScraper()
    await closed.close()
    with pytest.raises(RuntimeError):
        closed.set_endpoint("a:1", "http://a:1/metrics", "vllm")
