"""The EPP behind a real Envoy configured as an Inference Gateway (ext_proc + ORIGINAL_DST).

Backends are small HTTP servers that publish real vLLM-format KV events over ZMQ for the
prompts they receive, so routing follows what the backends actually cache.
"""

from __future__ import annotations

import json
import pathlib
import sys

import aiohttp
import grpc
import pytest

from epp import headers as H
from epp.extproc import health
from epp.tokenizer import Tokenizer

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "unit"))

from epp_stack import epp_stack, until  # noqa: E402
from tiny_tokenizer import build_tiny_model  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> pathlib.Path:
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", "llama3")


def chat(system: str, user: str, **extra) -> dict:
    return {
        "model": "tiny",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        **extra,
    }


SYSTEMS = [
    f"You are assistant number {i}. " + " ".join(f"rule {i}-{j}: be precise." for j in range(40))
    for i in range(6)
]


async def post(session, url, doc=None, data=None, headers=None):
    async with session.post(url, json=doc, data=data, headers=headers) as resp:
        return resp.status, resp.headers.copy(), await resp.read()


async def test_requests_follow_the_kv_cache(tmp_path, tiny_model):
    tok = Tokenizer.load(str(tiny_model))
    async with epp_stack(tmp_path, tokenizer=tiny_model) as st, aiohttp.ClientSession() as s:
        url = st.url + "/v1/chat/completions"
        # Seed: prompt i is cached on backend i % 3 (sent to the backend directly, as if an
        # earlier request had gone there); the backend announces its blocks over ZMQ.
        homes = {}
        for i, system in enumerate(SYSTEMS):
            home = st.backends[i % 3]
            homes[i] = home
            ids = tok.encode_chat(chat(system, "first question")["messages"])
            doc = chat(system, "first question", nvext={"token_data": ids})
            worker = (home.address, 0)
            before = st.app.index.block_count(worker)
            status, _, _ = await post(s, f"http://{home.address}/v1/chat/completions", doc)
            assert status == 200
            await until(
                lambda w=worker, n=before: st.app.index.block_count(w) > n,
                what=f"the KV events of prompt {i} on {home.name} (had {before})",
            )
        # Through the gateway, follow-ups of prompt i land where its prefix is cached.
        for i, system in enumerate(SYSTEMS):
            for q in ("second question", "third question, longer than the others"):
                status, headers, _ = await post(s, url, chat(system, q))
                assert status == 200
                assert headers["x-backend"] == homes[i].name, f"prompt {i} left its cache"
                seen = homes[i].requests[-1]
                assert seen.headers[H.DESTINATION] == homes[i].address
                assert seen.headers[H.DP_RANK] == "0"
                assert seen.headers[H.WORKER_INSTANCE_ID] == str(
                    H.worker_instance_id(homes[i].address)
                )
                ids = tok.encode_chat(chat(system, q)["messages"])
                assert json.loads(seen.body)["nvext"]["token_data"] == ids
        # every booking was released
        for worker, _ep in st.app.pool.workers():
            view = st.app.load.view(worker)
            assert (view.requests, view.prefill_tokens, view.decode_blocks) == (0, 0, 0)
        # the decision log explains the last pick
        async with s.get(f"http://127.0.0.1:{st.app.metrics_port}/debug/decisions?n=1") as r:
            doc = await r.json()
        (last,) = doc["decisions"]
        chosen = next(c for c in last["candidates"] if c["worker"] == last["chosen"])
        assert chosen["cached_blocks"] > 0
        assert last["prompt_blocks"] >= chosen["cached_blocks"]
        async with s.get(f"http://127.0.0.1:{st.app.metrics_port}/metrics") as r:
            text = await r.text()
        assert "inference_objective_request_total" in text


async def test_streaming_response_passes_intact_and_load_is_released(tmp_path, tiny_model):
    kwargs = {"sse_events": 200, "sse_event_bytes": 300}
    async with epp_stack(tmp_path, tokenizer=tiny_model, backend_kwargs=kwargs) as st:
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                st.url + "/v1/chat/completions", json=chat(SYSTEMS[0], "hi", stream=True)
            ) as resp,
        ):
            assert resp.status == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            text = (await resp.read()).decode()
        events = [e for e in text.split("\n\n") if e]
        assert len(events) == 201
        assert events[-1] == "data: [DONE]"
        contents = [json.loads(e[6:])["choices"][0]["delta"]["content"] for e in events[:-1]]
        assert [c.split("x")[0] for c in contents] == [str(i) for i in range(200)]
        for worker, _ep in st.app.pool.workers():
            await until(lambda w=worker: st.app.load.view(w).requests == 0, what="release")


async def test_client_disconnect_mid_stream_releases_load(tmp_path, tiny_model):
    kwargs = {"sse_events": 100000, "sse_event_bytes": 200}
    async with (
        epp_stack(tmp_path, tokenizer=tiny_model, backend_kwargs=kwargs) as st,
        aiohttp.ClientSession() as s,
    ):
        resp = await s.post(
            st.url + "/v1/chat/completions", json=chat(SYSTEMS[1], "hi", stream=True)
        )
        await resp.content.readexactly(1000)
        busy = [w for w, _ in st.app.pool.workers() if st.app.load.view(w).requests]
        assert len(busy) == 1
        resp.close()
        await until(lambda: st.app.load.view(busy[0]).requests == 0, what="release on reset")


async def test_a_prompt_beyond_the_context_length_is_refused_before_routing(tmp_path, tiny_model):
    async with epp_stack(tmp_path, tokenizer=tiny_model) as st, aiohttp.ClientSession() as s:
        big = chat("x " * (512 * 1024), "summarize")  # the tiny model's context: 8192
        status, _, body = await post(s, st.url + "/v1/chat/completions", big)
        assert status == 400
        message = json.loads(body)["error"]["message"]
        assert "the model's context length is only 8192 tokens" in message
        data = json.dumps({"model": "tiny", "prompt": ["short", "y " * 20000]}).encode()
        status, _, body = await post(s, st.url + "/v1/completions", data=data)
        assert status == 400 and "8192" in json.loads(body)["error"]["message"]
        assert all(not b.requests for b in st.backends)
        assert all(st.app.load.view(w).requests == 0 for w, _ in st.app.pool.workers())


async def test_large_bodies(tmp_path, tiny_model):
    args = ["--max-model-len", "0"]  # no context check: the bodies go through whole
    async with (
        epp_stack(tmp_path, tokenizer=tiny_model, epp_args=args) as st,
        aiohttp.ClientSession() as s,
    ):
        # 1 MiB chat: tokenized, token ids added, the rest unchanged
        big = chat("x " * (512 * 1024), "summarize")
        status, headers, _ = await post(s, st.url + "/v1/chat/completions", big)
        assert status == 200
        seen = json.loads(st.backend(headers["x-backend"]).requests[-1].body)
        assert seen["messages"] == big["messages"]
        assert len(seen["nvext"]["token_data"]) > 1000
        # 8 MiB completions batch: not tokenized, passed on byte for byte
        data = json.dumps({"model": "tiny", "prompt": ["y" * (1 << 20)] * 8}).encode()
        assert len(data) > 8 << 20
        status, headers, _ = await post(s, st.url + "/v1/completions", data=data)
        assert status == 200
        assert st.backend(headers["x-backend"]).requests[-1].body == data


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"{not json", "JSON"),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "model"),
        (b'{"model": "tiny", "messages": []}', "messages"),
        (b"[1, 2]", "object"),
    ],
)
async def test_malformed_bodies_get_400(tmp_path, tiny_model, data, reason):
    async with epp_stack(tmp_path, tokenizer=tiny_model) as st, aiohttp.ClientSession() as s:
        status, headers, body = await post(s, st.url + "/v1/chat/completions", data=data)
        assert status == 400
        assert headers["content-type"] == "application/json"
        err = json.loads(body)["error"]
        assert err["code"] == 400
        assert reason.lower() in err["message"].lower()
        assert all(not b.requests for b in st.backends)


async def test_unserved_model_gets_400(tmp_path, tiny_model):
    args = ["--served-model-name", "tiny"]
    async with (
        epp_stack(tmp_path, tokenizer=tiny_model, epp_args=args) as st,
        aiohttp.ClientSession() as s,
    ):
        doc = chat("s", "u")
        assert (await post(s, st.url + "/v1/chat/completions", doc))[0] == 200
        doc["model"] = "other"
        status, _, body = await post(s, st.url + "/v1/chat/completions", doc)
        assert status == 400
        assert "other" in json.loads(body)["error"]["message"]


async def test_client_sent_steering_headers_are_ignored(tmp_path, tiny_model):
    spoof = {
        H.DESTINATION: "127.0.0.1:1",
        H.PREFILLER_HOST_PORT: "127.0.0.1:2",
        H.DESTINATION_SUBSET: "127.0.0.1:1",
        H.DP_RANK: "7",
        "x-dynamo-foo": "forged",
        "x-dynamo-worker-instance-id": "99",
        "x-prefiller-url": "http://127.0.0.1:3",
        "x-worker-instance-id": "99",
        "x-data-parallel-rank": "5",
    }
    async with epp_stack(tmp_path, tokenizer=tiny_model) as st, aiohttp.ClientSession() as s:
        for _ in range(5):
            status, headers, _ = await post(
                s, st.url + "/v1/chat/completions", chat("s", "u"), headers=spoof
            )
            assert status == 200
            seen = st.backend(headers["x-backend"]).requests[-1]
            assert seen.headers[H.DESTINATION] == st.backend(headers["x-backend"]).address
            assert H.PREFILLER_HOST_PORT not in seen.headers
            assert H.DESTINATION_SUBSET not in seen.headers
            assert seen.headers[H.DP_RANK] == "0"
            for name in ("x-dynamo-foo", "x-dynamo-worker-instance-id", "x-prefiller-url"):
                assert name not in seen.headers, name
            assert seen.headers.get("x-worker-instance-id") != "99"
            assert "x-data-parallel-rank" not in seen.headers


async def test_bodyless_request_is_routed(tmp_path):
    async with epp_stack(tmp_path) as st, aiohttp.ClientSession() as s:
        names = set()
        for _ in range(12):
            async with s.get(st.url + "/v1/models") as r:
                assert r.status == 200
                names.add(r.headers["x-backend"])
        assert names <= {b.name for b in st.backends}


async def test_subset_hint_is_honoured(tmp_path, tiny_model):
    def hint(backends):
        return {"subset_hint": (backends[2].address,)}

    async with (
        epp_stack(tmp_path, tokenizer=tiny_model, gateway=hint) as st,
        aiohttp.ClientSession() as s,
    ):
        for i in range(8):
            status, headers, _ = await post(
                s, st.url + "/v1/chat/completions", chat(SYSTEMS[i % 6], "q")
            )
            assert status == 200
            assert headers["x-backend"] == "b2"


async def test_conformance_hooks(tmp_path):
    config = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: header-based-testing-filter
- type: destination-endpoint-served-verifier
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: header-based-testing-filter
"""
    async with (
        epp_stack(tmp_path, epp_args=["--config-text", config]) as st,
        aiohttp.ClientSession() as s,
    ):
        doc = {"model": "conformance-fake-model", "prompt": "hello"}
        for target in st.backends:
            for _ in range(3):
                status, headers, _ = await post(
                    s,
                    st.url + "/some/arbitrary/path",
                    doc,
                    headers={H.TEST_ENDPOINT_SELECTION: target.address},
                )
                assert status == 200
                assert headers["x-backend"] == target.name
                assert headers[H.CONFORMANCE_SERVED] == target.address
        # an IP without a port allows every port of it: all three backends
        seen = set()
        for _ in range(20):
            status, headers, _ = await post(
                s,
                st.url + "/v1/completions",
                doc,
                headers={H.TEST_ENDPOINT_SELECTION: "127.0.0.1"},
            )
            seen.add(headers["x-backend"])
        assert len(seen) > 1
        # no header: no endpoints
        status, _, body = await post(s, st.url + "/v1/completions", doc)
        assert status == 503
        assert json.loads(body)["error"]["code"] == 503


async def test_disaggregated_pick_names_the_prefill_endpoint(tmp_path, tiny_model):
    roles = ["prefill", "decode", "decode"]
    async with (
        epp_stack(tmp_path, tokenizer=tiny_model, roles=roles) as st,
        aiohttp.ClientSession() as s,
    ):
        for _ in range(4):
            status, headers, _ = await post(s, st.url + "/v1/chat/completions", chat("s", "u"))
            assert status == 200
            assert headers["x-backend"] in ("b1", "b2")
            seen = st.backend(headers["x-backend"]).requests[-1]
            assert seen.headers[H.PREFILLER_HOST_PORT] == st.backends[0].address
            assert seen.headers[H.ROUTING_MODE] == "disaggregated"
        for worker, _ep in st.app.pool.workers():
            await until(lambda w=worker: st.app.load.view(w).requests == 0, what="release")


async def test_buffered_gateway_with_8mib_body(tmp_path, tiny_model):
    gw = {"request_body_mode": "BUFFERED", "response_body_mode": "BUFFERED"}
    args = ["--max-model-len", "0"]  # the 8 MiB batch is far beyond the tiny model's context
    async with (
        epp_stack(tmp_path, tokenizer=tiny_model, gateway=gw, epp_args=args) as st,
        aiohttp.ClientSession() as s,
    ):
        status, headers, body = await post(s, st.url + "/v1/chat/completions", chat("s", "u"))
        assert status == 200, body
        seen = json.loads(st.backend(headers["x-backend"]).requests[-1].body)
        assert "token_data" in seen["nvext"]
        data = json.dumps({"model": "tiny", "prompt": ["y" * (1 << 20)] * 8}).encode()
        status, headers, _ = await post(s, st.url + "/v1/completions", data=data)
        assert status == 200
        assert st.backend(headers["x-backend"]).requests[-1].body == data


async def test_plaintext_epp_and_health(tmp_path):
    async with epp_stack(tmp_path, secure=False) as st, aiohttp.ClientSession() as s:
        status, _, _ = await post(s, st.url + "/v1/completions", {"model": "m", "prompt": "p"})
        assert status == 200
        assert st.app.server is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{st.app.server.health_port}") as ch:
            check = ch.unary_unary("/grpc.health.v1.Health/Check")
            for name in (*health.KNOWN_SERVICES, "anything"):
                req = b"" if not name else b"\x0a" + bytes([len(name)]) + name.encode()
                assert await check(req) == health.encode_status(health.SERVING)
            st.app.draining = True
            assert await check(b"") == health.encode_status(health.NOT_SERVING)


async def test_epp_down_gives_the_gateway_failure_mode(tmp_path):
    async with epp_stack(tmp_path) as st, aiohttp.ClientSession() as s:
        assert st.app.server is not None
        await st.app.server.stop(0)
        status, _, _ = await post(s, st.url + "/v1/completions", {"model": "m", "prompt": "p"})
        assert status == 500  # FailClose, the InferencePool default
        assert all(not b.requests for b in st.backends)
