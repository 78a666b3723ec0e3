"""The whole pod side behind the gateway: a real Envoy, the EPP, and two pods, each a sidecar
in front of a simulated engine. The EPP's headers pick the pod's worker, the sidecar serves
exactly that one with the EPP's token ids, and follow-ups land where their prefix is cached."""

from __future__ import annotations

import contextlib
import pathlib
import sys

import openai
import pytest

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "unit"))

from epp_stack import epp_stack  # noqa: E402
from sidecar_helpers import gauge, running_sidecar  # noqa: E402
from sim_helpers import loopback, running_sim  # noqa: E402
from tiny_tokenizer import build_tiny_model  # noqa: E402

from bench.epp import free_port  # noqa: E402
from epp.tokenizer import Tokenizer  # noqa: E402

pytestmark = pytest.mark.timeout(180)

EVENTS = '{"enable_kv_cache_events": true, "endpoint": "tcp://*:0", "replay_endpoint": "tcp://*:0"}'


async def test_envoy_and_the_epp_route_through_two_sidecar_pods(tmp_path):
    model = build_tiny_model(tmp_path / "m")
    tok = Tokenizer.load(str(model))
    async with contextlib.AsyncExitStack() as stack:
        pods = []
        for _ in range(2):
            sim = await stack.enter_async_context(
                running_sim(
                    "--block-size",
                    "16",
                    "--num-blocks",
                    "512",
                    "--speedup",
                    "100",
                    "--tokenizer",
                    str(model),
                    "--kv-events-config",
                    EVENTS,
                )
            )
            port = free_port()
            sc = await stack.enter_async_context(
                running_sidecar(
                    "--port",
                    str(port),
                    "--pod-address",
                    f"127.0.0.1:{port}",
                    "--worker",
                    f"127.0.0.1:{sim.port},kind=sim",
                    tokenizer=tok,
                )
            )
            pods.append((sim, sc))
        entries = []
        for sim, sc in pods:
            (pub,) = sim.publishers
            entries.append(
                {
                    "address": sc.opts.pod_address,
                    "kv_events": loopback(pub.endpoint),
                    "replay": loopback(pub.replay_endpoint),
                    "engine": "vllm",
                }
            )
        st = await stack.enter_async_context(
            epp_stack(tmp_path, backends=0, extra_endpoints=entries, tokenizer=model)
        )
        client = openai.AsyncOpenAI(base_url=st.url + "/v1", api_key="x", max_retries=0)
        stack.push_async_callback(client.close)

        def served() -> list[int]:
            return [
                sum(n for r, n in sim.engines[0].stats.finished.items() if r != "abort")
                for sim, _ in pods
            ]

        messages = [{"role": "user", "content": "a long shared system prompt about caches " * 12}]
        before = served()
        first = await client.chat.completions.create(
            model="sim-model", messages=messages, max_tokens=3
        )
        assert first.choices[0].message.content is not None
        after = served()
        (home,) = [i for i in range(2) if after[i] > before[i]]
        _, home_sc = pods[home]
        # the sidecar used the EPP's ids, on the token path
        assert gauge(home_sc, "kvpick_sidecar_token_data_total", result="used") == 1
        assert (
            gauge(home_sc, "kvpick_sidecar_requests_total", api="chat", path="token", code="200")
            == 1
        )
        # a follow-up with the same prefix goes to the same pod, and hits its cache
        for _ in range(3):
            again = await client.chat.completions.create(
                model="sim-model", messages=messages, max_tokens=3
            )
            assert again.usage.prompt_tokens_details.cached_tokens > 0
        final = served()
        assert final[home] == after[home] + 3 and final[1 - home] == after[1 - home]
