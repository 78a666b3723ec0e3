"""The simulator's HTTP API through the real ``openai`` client and raw HTTP: vLLM's
response shapes, streaming, cached-token usage, the chat path with a tokenizer, metrics the
EPP's scraper reads, data-parallel ranks, and bad input answered as vLLM answers it."""

from __future__ import annotations

import asyncio
import pathlib
import sys

import aiohttp
import openai

from epp.datalayer import engine_metrics, prom_text

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "unit"))
from sim_helpers import running_sim, wait_for
from tiny_tokenizer import build_tiny_model

FAST = ("--block-size", "4", "--num-blocks", "64", "--speedup", "1000")
PROMPT = list(range(1, 18))


def client(app) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{app.port}/v1", api_key="x")


async def test_completions_repeat_hits_the_prefix_cache_and_is_deterministic():
    async with running_sim(*FAST) as app:
        c = client(app)
        first = await c.completions.create(
            model="sim-model", prompt=PROMPT, max_tokens=5, extra_body={"return_token_ids": True}
        )
        second = await c.completions.create(
            model="sim-model", prompt=PROMPT, max_tokens=5, extra_body={"return_token_ids": True}
        )
        assert first.usage.prompt_tokens == 17 and first.usage.completion_tokens == 5
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        assert second.usage.prompt_tokens_details.cached_tokens == 16  # 4 full blocks
        ids = first.choices[0].model_extra["token_ids"]
        assert len(ids) == 5 and ids == second.choices[0].model_extra["token_ids"]
        assert first.choices[0].finish_reason == "length"


async def test_streaming_with_usage_ends_with_done():
    async with running_sim(*FAST) as app:
        stream = await client(app).completions.create(
            model="sim-model",
            prompt=PROMPT,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        token_chunks = [c for c in chunks if c.choices]
        assert len(token_chunks) == 4
        assert [c.choices[0].finish_reason for c in token_chunks] == [None, None, None, "length"]
        assert chunks[-1].usage.completion_tokens == 4


async def test_chat_with_a_tokenizer(tmp_path):
    model = build_tiny_model(tmp_path / "tiny")
    async with running_sim(*FAST, "--tokenizer", str(model), "--model", "tiny") as app:
        reply = await client(app).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hello there"}], max_tokens=6
        )
        assert reply.choices[0].message.role == "assistant"
        assert isinstance(reply.choices[0].message.content, str)
        assert reply.usage.completion_tokens == 6 and reply.usage.prompt_tokens > 3
        text = await client(app).completions.create(model="tiny", prompt="hello", max_tokens=2)
        assert text.usage.completion_tokens == 2


async def test_bad_input_gets_vllm_status_codes():
    args = (*FAST, "--max-num-seqs", "1", "--max-waiting", "1", "--speedup", "1")
    async with running_sim(*args) as app:
        url = f"http://127.0.0.1:{app.port}"
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{url}/v1/completions", data=b"{not json") as r:
                assert r.status == 400
                assert (await r.json())["error"]["type"] == "BadRequestError"
            too_long = {"prompt": list(range(300)), "max_tokens": 1}
            async with s.post(f"{url}/v1/completions", json=too_long) as r:
                assert r.status == 400
                assert "maximum context length" in (await r.json())["error"]["message"]
            async with s.post(f"{url}/v1/completions", json={"model": "x", "prompt": [1]}) as r:
                assert r.status == 404
            async with s.post(f"{url}/v1/chat/completions", json={"messages": []}) as r:
                assert r.status == 400
            # One running, one waiting: the third is refused with 503.
            slow = {"prompt": PROMPT, "max_tokens": 200}
            running = [asyncio.create_task(s.post(f"{url}/v1/completions", json=slow))]
            await wait_for(lambda: app.engines[0].num_running == 1, what="one running")
            running.append(asyncio.create_task(s.post(f"{url}/v1/completions", json=slow)))
            await wait_for(lambda: app.engines[0].num_waiting == 1, what="one waiting")
            async with s.post(f"{url}/v1/completions", json=slow) as r:
                assert r.status == 503
            for t in running:
                t.cancel()
            await asyncio.gather(*running, return_exceptions=True)
        # The clients went away: their sequences are cancelled and every block freed.
        await wait_for(lambda: app.engines[0].load == 0, what="aborts")
        assert app.engines[0].cache.used_blocks == 0
        assert app.engines[0].stats.finished.get("abort", 0) == 2


async def test_metrics_as_the_epp_reads_them_and_dp_ranks():
    async with running_sim(*FAST, "--dp-size", "2") as app:
        url = f"http://127.0.0.1:{app.port}"
        async with aiohttp.ClientSession() as s:
            headers = {"X-data-parallel-rank": "1"}
            body = {"prompt": PROMPT, "max_tokens": 2}
            async with s.post(f"{url}/v1/completions", json=body, headers=headers) as r:
                assert r.status == 200
            bad = {"X-data-parallel-rank": "2"}
            async with s.post(f"{url}/v1/completions", json=body, headers=bad) as r:
                assert r.status == 400
            async with s.get(f"{url}/metrics") as r:
                text = await r.text()
            async with s.get(f"{url}/v1/models") as r:
                assert (await r.json())["data"][0]["id"] == "sim-model"
            async with s.get(f"{url}/health") as r:
                assert r.status == 200
        assert app.engines[1].stats.generation_tokens == 2
        assert app.engines[0].stats.generation_tokens == 0
        samples = prom_text.parse(text).samples
        per_rank = engine_metrics.extract("vllm", samples, 2)
        assert set(per_rank) == {0, 1}
        assert per_rank[1].block_size == 4 and per_rank[1].num_blocks == 64
        hits = {
            x.labels["engine"]: x.value
            for x in samples
            if x.name == "vllm:prefix_cache_queries_total"
        }
        assert hits == {"0": 0.0, "1": 16.0}
