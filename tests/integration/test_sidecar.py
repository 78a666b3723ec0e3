"""The sidecar in front of real simulated engines over HTTP: the OpenAI client through it
(chat, completions, responses; stream and not), direct-mode routing to the named rank, the
token path and the passthrough path, and every failure answer."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import sys

import aiohttp
import openai
import pytest

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "unit"))

from sidecar_helpers import gauge, in_flight, running_sidecar  # noqa: E402
from sim_helpers import running_sim, wait_for  # noqa: E402
from tiny_tokenizer import build_tiny_model  # noqa: E402

from bench.epp import free_port  # noqa: E402
from epp.tokenizer import Tokenizer  # noqa: E402

pytestmark = pytest.mark.timeout(120)

SIM = ("--block-size", "16", "--num-blocks", "512", "--speedup", "100")
PROMPT = [(7 * i) % 900 + 40 for i in range(40)]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> pathlib.Path:
    return build_tiny_model(tmp_path_factory.mktemp("tok") / "m")


@pytest.fixture(scope="module")
def tok(model) -> Tokenizer:
    return Tokenizer.load(str(model))


def served(app) -> list[int]:
    return [sum(n for r, n in e.stats.finished.items() if r != "abort") for e in app.engines]


@contextlib.asynccontextmanager
async def pod(model, tok, *sim_args: str, sidecar_args: tuple[str, ...] = ()):
    async with running_sim(*SIM, "--tokenizer", str(model), *sim_args) as sim:
        dp = sim_args[sim_args.index("--dp-size") + 1] if "--dp-size" in sim_args else "1"
        worker = f"127.0.0.1:{sim.port},kind=sim,dp={dp}"
        async with running_sidecar("--worker", worker, *sidecar_args, tokenizer=tok) as sc:
            yield sim, sc


def client(sc) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{sc.port}/v1", api_key="x", max_retries=0)


async def test_completions_through_the_sidecar_match_the_engine(model, tok):
    async with pod(model, tok) as (sim, sc):
        direct = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{sim.port}/v1", api_key="x")
        via = client(sc)
        want = await direct.completions.create(
            model="sim-model", prompt=PROMPT, max_tokens=6, seed=3
        )
        got = await via.completions.create(model="sim-model", prompt=PROMPT, max_tokens=6, seed=3)
        assert got.choices[0].text == want.choices[0].text and got.choices[0].text
        assert got.choices[0].finish_reason == "length"
        assert got.usage.completion_tokens == 6 and got.usage.prompt_tokens == len(PROMPT)
        # the second time the prompt's full blocks are in the engine's cache
        assert got.usage.prompt_tokens_details.cached_tokens == 32
        parts = []
        stream = await via.completions.create(
            model="sim-model",
            prompt=PROMPT,
            max_tokens=6,
            seed=3,
            stream=True,
            stream_options={"include_usage": True},
        )
        usage = None
        async for chunk in stream:
            parts += [c.text for c in chunk.choices]
            usage = chunk.usage or usage
        assert "".join(parts) == want.choices[0].text
        assert usage is not None and usage.completion_tokens == 6
        sync = openai.OpenAI(base_url=f"http://127.0.0.1:{sc.port}/v1", api_key="x")
        text = await asyncio.to_thread(
            lambda: sync.completions.create(model="sim-model", prompt=PROMPT, max_tokens=6, seed=3)
        )
        assert text.choices[0].text == want.choices[0].text
        await direct.close()
        await via.close()
        assert in_flight(sc) == 0


async def test_chat_on_the_token_path_uses_the_epps_ids_and_shapes_the_answer(model, tok):
    messages = [{"role": "user", "content": "tell me about the fibonacci numbers please"}]
    ids = tok.encode_chat(messages)
    async with pod(model, tok) as (sim, sc):
        direct = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{sim.port}/v1", api_key="x")
        want = await direct.completions.create(model="sim-model", prompt=ids, max_tokens=5, seed=9)
        via = client(sc)
        got = await via.chat.completions.create(
            model="sim-model",
            messages=messages,
            max_tokens=5,
            seed=9,
            extra_body={"nvext": {"token_data": ids}},
        )
        assert got.object == "chat.completion" and got.id.startswith("chatcmpl-")
        assert got.choices[0].message.content == want.choices[0].text
        assert got.choices[0].finish_reason == "length"
        assert got.usage.prompt_tokens == len(ids)
        assert got.usage.prompt_tokens_details.cached_tokens == (len(ids) // 16) * 16 - (
            16 if len(ids) % 16 == 0 else 0
        )
        assert gauge(sc, "kvpick_sidecar_token_data_total", result="used") == 1
        # without token_data the sidecar tokenizes itself, to the same ids
        stream = await via.chat.completions.create(
            model="sim-model",
            messages=messages,
            max_tokens=5,
            seed=9,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, finish, usage = "", None, None
        async for chunk in stream:
            for c in chunk.choices:
                text += c.delta.content or ""
                finish = c.finish_reason or finish
            usage = chunk.usage or usage
        assert text == want.choices[0].text and finish == "length"
        assert usage is not None and usage.completion_tokens == 5
        assert gauge(sc, "kvpick_sidecar_token_data_total", result="tokenized") == 1
        assert gauge(sc, "kvpick_sidecar_requests_total", api="chat", path="token", code="200") == 2
        await direct.close()
        await via.close()


async def test_responses_on_the_token_path(model, tok):
    async with pod(model, tok) as (_sim, sc):
        via = client(sc)
        got = await via.responses.create(
            model="sim-model", input="what is a prefix cache", max_output_tokens=4
        )
        assert got.status == "incomplete" and got.output_text
        assert got.usage.output_tokens == 4
        events = []
        stream = await via.responses.create(
            model="sim-model", input="what is a prefix cache", max_output_tokens=4, stream=True
        )
        async for ev in stream:
            events.append(ev)
        assert events[0].type == "response.created"
        assert events[-1].type in ("response.completed", "response.incomplete")
        deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert deltas == got.output_text
        await via.close()


async def test_requests_the_token_path_cannot_carry_go_to_the_engines_own_endpoint(model, tok):
    async with pod(model, tok) as (_sim, sc):
        async with aiohttp.ClientSession() as http:
            body = {
                "model": "sim-model",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 3,
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            }
            async with http.post(f"http://127.0.0.1:{sc.port}/v1/chat/completions", json=body) as r:
                doc = await r.json()
            assert r.status == 200 and doc["object"] == "chat.completion"
        assert (
            gauge(sc, "kvpick_sidecar_requests_total", api="chat", path="passthrough", code="200")
            == 1
        )


async def test_each_request_lands_on_the_rank_the_headers_name(model, tok):
    async with pod(model, tok, "--dp-size", "2") as (sim, sc), aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{sc.port}/v1/completions"
        body = {"prompt": PROMPT, "max_tokens": 2}
        for rank in (1, 0, 1, 1):
            before = served(sim)
            hdrs = {
                "x-worker-instance-id": str(sc.opts.pod_instance_id),
                "x-dp-rank": str(rank),
            }
            async with http.post(url, json=body, headers=hdrs) as r:
                assert r.status == 200, await r.text()
            after = served(sim)
            assert after[rank] == before[rank] + 1 and after[1 - rank] == before[1 - rank]
        # the Dynamo spelling, and nvext fields (a header beats the body)
        before = served(sim)
        async with http.post(
            url,
            json={**body, "nvext": {"dp_rank": 1}},
            headers={"x-dynamo-dp-rank": "0"},
        ) as r:
            assert r.status == 200
        assert served(sim)[0] == before[0] + 1
        # names this pod does not have: 400 with the reason
        for hdrs, why in (
            ({"x-worker-instance-id": "12345"}, "not served here"),
            ({"x-dp-rank": "2"}, "no data-parallel rank 2"),
            ({"x-worker-instance-id": str(sc.opts.pod_instance_id)}, "name one with x-dp-rank"),
            ({"x-dp-rank": "one"}, "non-negative integer"),
        ):
            async with http.post(url, json=body, headers=hdrs) as r:
                doc = await r.json()
            assert r.status == 400 and why in doc["error"]["message"], doc


async def test_routing_headers_never_reach_the_engine(model, tok, tmp_path):
    seen: list[dict[str, str]] = []

    async def record(request: aiohttp.web.Request) -> aiohttp.web.Response:
        if request.path not in ("/health", "/v1/models"):  # the sidecar's own health checks
            seen.append(dict(request.headers))
        return aiohttp.web.json_response(
            {"choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}], "usage": {}}
        )

    from aiohttp import web

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with (
            running_sidecar("--worker", f"127.0.0.1:{port}") as sc,
            aiohttp.ClientSession() as http,
        ):
            hdrs = {
                "x-dp-rank": "0",
                "x-dynamo-routing-mode": "aggregated",
                "x-gateway-destination-endpoint": "1.2.3.4:80",
                "x-prefill-dp-rank": "0",
                "x-data-parallel-rank": "0",
                "authorization": "Bearer kept",
            }
            async with http.post(
                f"http://127.0.0.1:{sc.port}/v1/completions",
                json={"prompt": [1, 2, 3]},
                headers=hdrs,
            ) as r:
                assert r.status == 200
            async with http.get(f"http://127.0.0.1:{sc.port}/tokenize", headers=hdrs) as r:
                assert r.status == 200
    finally:
        await runner.cleanup()
    assert len(seen) == 2
    for got in seen:
        names = {k.lower() for k in got}
        assert not names & {k.lower() for k in hdrs if k != "authorization"}
        assert got["Authorization"] == "Bearer kept"
    assert "x-request-id" in {k.lower() for k in seen[0]}


async def test_bad_input_and_failures_get_clear_answers(model, tok):
    async with pod(model, tok, sidecar_args=("--max-body-bytes", "4096")) as (sim, sc):
        url = f"http://127.0.0.1:{sc.port}"
        async with aiohttp.ClientSession() as http:
            async with http.post(url + "/v1/completions", data=b"{nope") as r:
                doc = await r.json()
            assert r.status == 400 and "not valid JSON" in doc["error"]["message"]
            async with http.post(url + "/v1/completions", data=b"[1]") as r:
                assert r.status == 400
            async with http.post(url + "/v1/completions", json={"prompt": list(range(5000))}) as r:
                doc = await r.json()
            assert r.status == 413 and "--max-body-bytes" in doc["error"]["message"]
            async with http.get(url + "/live") as r:
                assert r.status == 200
            async with http.get(url + "/health") as r:
                assert r.status == 200
            async with http.get(url + "/v1/models") as r:
                doc = await r.json()
            assert doc["data"][0]["id"] == "sim-model"
            async with http.get(url + "/metrics") as r:
                assert "kvpick_sidecar_requests_total" in await r.text()
            # a client that goes away mid-stream cancels the engine's request
            body = {"prompt": PROMPT, "max_tokens": 4000, "stream": True}
            async with http.post(url + "/v1/completions", json=body) as r:
                await r.content.readline()
            await wait_for(lambda: sim.engines[0].load == 0, what="engine request aborted")
            await wait_for(lambda: in_flight(sc) == 0, what="in-flight back to zero")
            assert sim.engines[0].stats.finished.get("abort", 0) >= 1
        # an engine that dies mid-stream: an error event, no [DONE]
        body = {"prompt": PROMPT, "max_tokens": 4000, "stream": True}
        async with (
            aiohttp.ClientSession() as http,
            http.post(url + "/v1/completions", json=body) as r,
        ):
            await r.content.readline()
            await sim.stop()
            rest = await r.content.read()
        assert b"[DONE]" not in rest
        assert b'"error"' in rest
        assert in_flight(sc) == 0
        # and then is unreachable: 503 with the reason; /health says not ready
        async with aiohttp.ClientSession() as http:
            async with http.post(url + "/v1/completions", json={"prompt": PROMPT}) as r:
                doc = await r.json()
            assert r.status == 503 and "unreachable" in doc["error"]["message"]
            await sc.check_workers()
            async with http.get(url + "/health") as r:
                assert r.status == 503
        assert in_flight(sc) == 0
