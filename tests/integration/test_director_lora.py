"""A LoRA adapter the engines report in ``vllm:lora_requests_info`` is recognized without
``--lora-adapter``: the request's block keys carry the adapter, read through the real
metrics scraper from real HTTP servers."""

from __future__ import annotations

import asyncio
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "unit"))
from test_director import BS, Setup, cache_for_adapter, comp, eps, prompt
from test_metrics_scraper import MetricsServer

from epp.datalayer.scraper import MetricsScraper


def lora_text(running: str) -> str:
    return (
        f'vllm:lora_requests_info{{max_lora="4",running_lora_adapters="{running}",'
        'waiting_lora_adapters=""} 100.0\n'
        'vllm:num_requests_waiting{engine="0",model_name="m"} 0.0\n'
    )


async def test_an_adapter_reported_by_an_engine_gets_adapter_keys():
    a, b = (
        await MetricsServer(lora_text("")).start(),
        await MetricsServer(lora_text("sql-lora")).start(),
    )
    scraper = MetricsScraper(interval=0.02)
    try:
        s = Setup(eps(a.address, b.address))
        s.director.scraper = scraper
        for server in (a, b):
            scraper.set_endpoint(server.address, server.url, "vllm")
        await scraper.start()
        while any(scraper.get((srv.address, 0)) is None for srv in (a, b)):
            await asyncio.sleep(0.02)
        p = prompt(5 * BS)
        s.cache((a.address, 0), p)  # base-model KV
        cache_for_adapter(s, (b.address, 0), p, "sql-lora")
        routed = s.route({"model": "sql-lora", "prompt": p})
        cached = {c.worker: c.cached_blocks for c in s.director.decisions.recent(1)[0].candidates}
        assert routed.destination == b.address
        assert cached == {a.address: 0, b.address: 5}
        s.complete(routed)
        # A name no engine reports is the base model: it matches the base blocks.
        routed = s.route(comp(p))
        assert routed.destination == a.address
    finally:
        await scraper.close()
        await a.stop()
        await b.stop()
