"""The whole path on simulated engines: a real Envoy, the EPP, and three ``kvpick worker
sim`` engines that hash blocks as vLLM does and publish their KV events over ZMQ. The EPP
maps the engines' hashes to its own keys from the events' token ids, routes follow-ups to
the engine that holds their prefix, and the engine itself reports the prefix-cache hit.
"""

from __future__ import annotations

import contextlib
import pathlib
import random
import sys
from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "unit"))

from epp_stack import epp_stack, until  # noqa: E402
from sim_helpers import loopback, running_sim  # noqa: E402
from tiny_tokenizer import build_tiny_model  # noqa: E402

from epp.datalayer import prom_text  # noqa: E402
from workers.sim.app import SimApp  # noqa: E402

pytestmark = pytest.mark.timeout(180)

BS = 16
EVENTS = '{"enable_kv_cache_events": true, "endpoint": "tcp://*:0", "replay_endpoint": "tcp://*:0"}'


@contextlib.asynccontextmanager
async def sims(n: int, *argv: str) -> AsyncIterator[list[SimApp]]:
    async with contextlib.AsyncExitStack() as stack:
        common = ["--block-size", str(BS), "--num-blocks", "512", "--speedup", "100"]
        common += ["--kv-events-config", EVENTS, *argv]
        apps = [await stack.enter_async_context(running_sim(*common)) for _ in range(n)]
        yield apps


def entry(app: SimApp) -> dict:
    (pub,) = app.publishers
    return {
        "address": f"127.0.0.1:{app.port}",
        "kv_events": loopback(pub.endpoint),
        "replay": loopback(pub.replay_endpoint),
        "engine": "vllm",
        "metrics": f"http://127.0.0.1:{app.port}/metrics",
    }


def served(app: SimApp) -> int:
    return sum(n for reason, n in app.engines[0].stats.finished.items() if reason != "abort")


async def test_follow_ups_land_on_the_engine_holding_their_prefix(tmp_path):
    rng = random.Random(4)
    async with sims(3) as engines:
        entries = [entry(e) for e in engines]
        async with (
            epp_stack(tmp_path, backends=0, extra_endpoints=entries) as st,
            contextlib.AsyncExitStack() as stack,
        ):
            client = openai.AsyncOpenAI(base_url=st.url + "/v1", api_key="x", max_retries=0)
            stack.push_async_callback(client.close)
            prefixes = [[rng.randrange(10, 30000) for _ in range(8 * BS)] for _ in range(6)]
            homes: dict[int, SimApp] = {}
            for i, prefix in enumerate(prefixes):
                counts = [served(e) for e in engines]
                first = await client.completions.create(
                    model="sim-model", prompt=[*prefix, 1, 2, 3], max_tokens=2
                )
                assert first.usage.prompt_tokens_details.cached_tokens == 0
                (home,) = [e for e, c in zip(engines, counts, strict=True) if served(e) > c]
                homes[i] = home
                worker = (f"127.0.0.1:{home.port}", 0)
                await until(
                    lambda w=worker, p=prefix: st.app.index.block_count(w) >= len(p) // BS,
                    what=f"prefix {i}'s KV events",
                )
            # Follow-ups of each prefix go where it is cached, and hit there: the engine's
            # own usage reports the prefix as cached.
            for i, prefix in enumerate(prefixes):
                for tail in ([7, 8, 9, 10], [11] * 20):
                    counts = [served(e) for e in engines]
                    reply = await client.completions.create(
                        model="sim-model", prompt=prefix + tail, max_tokens=2
                    )
                    (went,) = [e for e, c in zip(engines, counts, strict=True) if served(e) > c]
                    assert went is homes[i], f"prefix {i} left the engine holding it"
                    assert reply.usage.prompt_tokens_details.cached_tokens >= len(prefix)
            # Both homes and the spread: six prefixes did not all go to one engine.
            assert len({id(h) for h in homes.values()}) > 1
            await until(lambda: len(st.app.load) == 0, what="bookings released")


async def test_streamed_chat_through_the_gateway_is_intact(tmp_path):
    model = build_tiny_model(tmp_path / "tiny", "llama3")
    async with sims(2, "--tokenizer", str(model), "--served-model-name", "tiny") as engines:
        entries = [entry(e) for e in engines]
        async with (
            epp_stack(tmp_path, backends=0, extra_endpoints=entries, tokenizer=model) as st,
            contextlib.AsyncExitStack() as stack,
        ):
            client = openai.AsyncOpenAI(base_url=st.url + "/v1", api_key="x", max_retries=0)
            stack.push_async_callback(client.close)
            before = await token_sums(st.app.metrics_port, "tiny")
            messages = [
                {"role": "system", "content": "You answer briefly. " * 20},
                {"role": "user", "content": "What is a KV cache?"},
            ]
            stream = await client.chat.completions.create(
                model="tiny",
                messages=messages,
                max_tokens=12,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [c async for c in stream]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert chunks[-1].usage.completion_tokens == 12
            workers = [w for w, _ep in st.app.pool.workers()]
            await until(
                lambda: any(st.app.index.block_count(w) > 0 for w in workers),
                what="the first request's KV events",
            )
            whole = await client.chat.completions.create(
                model="tiny", messages=messages, max_tokens=12
            )
            # Deterministic engines: the same request gives the same text, streamed or not,
            # and the second one found the first one's prefix on the same engine.
            assert whole.choices[0].message.content == text
            assert whole.usage.prompt_tokens_details.cached_tokens > 0
            # The EPP read both responses' usage (the stream's from its last event); it
            # finishes an exchange before Envoy passes the last chunk on, so this is settled.
            after = await token_sums(st.app.metrics_port, "tiny")
            delta = {k: after[k] - before.get(k, 0.0) for k in after}
            assert delta["inference_objective_output_tokens_sum"] == 24
            assert delta["inference_objective_input_tokens_sum"] == 2 * whole.usage.prompt_tokens
            assert delta["inference_objective_input_tokens_count"] == 2
            assert (
                delta["inference_objective_prompt_cached_tokens_sum"]
                == whole.usage.prompt_tokens_details.cached_tokens
                + chunks[-1].usage.prompt_tokens_details.cached_tokens
            )
            assert delta["inference_objective_normalized_time_per_output_token_seconds_count"] == 2


async def token_sums(port: int, model: str) -> dict[str, float]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/metrics") as resp,
    ):
        text = await resp.text()
    return {
        s.name: s.value
        for s in prom_text.parse(text).samples
        if s.name.startswith("inference_objective_")
        and s.name.endswith(("_sum", "_count"))
        and s.labels.get("model_name") == model
    }
