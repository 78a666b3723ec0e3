"""Prefill/decode disaggregation between simulated engines: vLLM's NixlConnector request
protocol through the real ``openai`` client, with the KV blocks moving over real NIXL (UCX,
host memory) and checked byte for byte on the decode side.

Most tests run both engines in this process (two NIXL agents, two side channels, real TCP);
one runs them as two ``kvpick worker sim`` processes. No NIXL, no pass: these tests fail
rather than skip when NIXL is missing (the Makefile installs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import random
import subprocess
import sys
import time

import aiohttp
import openai
import pytest

from bench.procstat import free_port, stop_process, wait_healthy
from epp.datalayer import prom_text

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from sim_helpers import running_sim, sim_options, wait_for

from workers.sim.app import SimApp
from workers.sim.engine_hash import BlockHasher, event_value

ROOT = pathlib.Path(__file__).resolve().parents[2]
BS = 4
FAST = ("--block-size", str(BS), "--num-blocks", "96", "--speedup", "1000")
MODEL = "sim-model"


def client(app, **kw) -> openai.AsyncOpenAI:
    # No retries: a retried 500 would be a second request the assertions do not expect.
    return openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{app.port}/v1", api_key="x", max_retries=0, **kw
    )


async def prefill_leg(prefill, prompt: list[int], *, headers: dict | None = None) -> dict:
    """Step 1 of the protocol (as the llm-d sidecar sends it); returns the step-2 params."""
    reply = await client(prefill).completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=1,
        extra_body={"kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False}},
        extra_headers=headers,
    )
    assert reply.usage.completion_tokens == 1
    params = reply.model_extra["kv_transfer_params"]
    assert params is not None
    return params


async def decode_leg(
    decode, prompt: list[int], params: dict, max_tokens: int = 6, timeout: float | None = None, **kw
):
    c = client(decode) if timeout is None else client(decode, timeout=timeout)
    return await c.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=max_tokens,
        extra_body={"kv_transfer_params": params, "return_token_ids": True},
        **kw,
    )


async def metrics_text(port: int) -> str:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/metrics") as resp,
    ):
        return await resp.text()


def used_blocks(app) -> int:
    return sum(e.cache.used_blocks for e in app.engines)


def region_slot_is(app, slot: int, key: int) -> bool:
    connector = (app.prefill or app.decode)[0]
    return connector.region.verify(slot, key)


async def test_disaggregated_requests_decode_what_an_aggregated_engine_decodes():
    rng = random.Random(7)
    shared = [rng.randrange(1, 30000) for _ in range(23)]
    prompts = [shared + [rng.randrange(1, 30000) for _ in range(rng.randrange(1, 40))]]
    prompts += [shared + [rng.randrange(1, 30000) for _ in range(rng.randrange(1, 40))]
                for _ in range(11)]  # fmt: skip
    async with (
        running_sim(*FAST, "--role", "prefill") as prefill,
        # Room for every block of the workload, so the cached-blocks check sees no eviction.
        running_sim(*FAST, "--role", "decode", "--num-blocks", "512") as decode,
        running_sim(*FAST) as both,
    ):
        expected = []
        for prompt in prompts:
            r = await client(both).completions.create(
                model=MODEL, prompt=prompt, max_tokens=6, extra_body={"return_token_ids": True}
            )
            expected.append(r.choices[0].model_extra["token_ids"])

        async def one(prompt: list[int]):
            params = await prefill_leg(prefill, prompt)
            assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
            assert params["remote_port"] == prefill.prefill[0].producer.port
            assert params["remote_host"] == "127.0.0.1"
            assert params["remote_num_tokens"] == len(prompt)
            assert params["transfer_mode"] == "pull" and params["tp_size"] == 1
            (blocks,) = params["remote_block_ids"]
            assert len(blocks) == -(-len(prompt) // BS)
            # The leased slots hold the content of the prompt's blocks, partial one included.
            hasher = BlockHasher(BS)
            full = [event_value(d) for d in hasher.digests(prompt)]
            assert all(region_slot_is(prefill, b, k) for b, k in zip(blocks, full, strict=False))
            return await decode_leg(decode, prompt, params)

        # One request first, so that the decode engine's NIXL handshake with the prefill
        # engine is done before twelve legs run at once: on a loaded 2-core machine the
        # handshake has been seen to take longer than its 5 s timeout when it competes with
        # them (the request then recomputes its prompt). Its prompt shares no block with the
        # others, so nothing below is changed by it but the transfer counts.
        warm = await one([rng.randrange(30000, 31000) for _ in range(20)])
        assert warm.usage.prompt_tokens_details.cached_tokens == 19
        replies = await asyncio.gather(*(one(p) for p in prompts))
        got = [r.choices[0].model_extra["token_ids"] for r in replies]
        assert got == expected
        # vLLM reports the loaded prompt (all but the recomputed last token) as cached.
        assert [r.usage.prompt_tokens_details.cached_tokens for r in replies] == [
            len(p) - 1 for p in prompts
        ]
        stats = decode.decode[0].stats
        assert stats.failed_transfers == 0 and stats.bytes_transferred.counts
        assert sum(stats.bytes_transferred.counts) == len(prompts) + 1  # with the first
        # Every lease ended by the decode side's notification, so the prefill engine holds
        # nothing; nothing expired.
        await wait_for(lambda: used_blocks(prefill) == 0, what="prefill leases to end")
        assert prefill.prefill[0].producer.leases == {}
        assert prefill.prefill[0].stats.expired_leases == 0
        assert used_blocks(decode) == 0
        # The loaded blocks are cached on the decode engine (and announced as BlockStored).
        cached = decode.engines[0].cache.cached_hashes()
        for prompt in prompts:
            assert {event_value(d) for d in BlockHasher(BS).digests(prompt[:-1])} <= cached

        text = await metrics_text(decode.port)
        samples = {
            (s.name, s.labels.get("source")): s.value
            for s in prom_text.parse(text).samples
            if s.name.startswith(("vllm:nixl", "vllm:prompt_tokens_by_source"))
        }
        assert samples[("vllm:nixl_bytes_transferred_count", None)] == len(prompts) + 1
        assert samples[("vllm:nixl_num_failed_transfers_total", None)] == 0
        loaded = samples[("vllm:prompt_tokens_by_source_total", "external_kv_transfer")]
        assert loaded == stats.loaded_tokens > 0


async def test_streaming_decode_leg_and_a_local_prefix_read_only_for_missing_blocks():
    prompt = list(range(1000, 1030))  # 7 full blocks and a partial one
    async with (
        running_sim(*FAST, "--role", "prefill") as prefill,
        running_sim(*FAST, "--role", "decode") as decode,
    ):
        # The decode engine caches the first 16 tokens itself (4 blocks) ...
        await client(decode).completions.create(model=MODEL, prompt=prompt[:17], max_tokens=1)
        params = await prefill_leg(prefill, prompt)
        stream = await decode_leg(
            decode, prompt, params, stream=True, stream_options={"include_usage": True}
        )
        chunks = [c async for c in stream]
        tokens = [c for c in chunks if c.choices]
        assert len(tokens) == 6 and tokens[-1].choices[0].finish_reason == "length"
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens == len(prompt) - 1
        # ... so only the other 4 blocks cross NIXL.
        stats = decode.decode[0].stats
        assert stats.bytes_transferred.total == 4 * 4096
        assert stats.loaded_tokens == len(prompt) - 16
        await wait_for(lambda: used_blocks(prefill) == 0, what="prefill lease to end")


@pytest.mark.parametrize("policy", ["recompute", "fail"])
async def test_a_block_with_wrong_content_is_caught(policy):
    prompt = list(range(2000, 2021))
    async with (
        running_sim(*FAST, "--role", "prefill") as prefill,
        running_sim(*FAST, "--role", "decode", "--kv-load-failure-policy", policy) as decode,
    ):
        params = await prefill_leg(prefill, prompt)
        victim = params["remote_block_ids"][0][2]
        prefill.prefill[0].region.view(victim)[100] ^= 0x01  # one flipped bit
        if policy == "fail":
            with pytest.raises(openai.InternalServerError, match="does not match the prompt"):
                await decode_leg(decode, prompt, params)
            # Streamed, the failure still comes as a status, before any event.
            other = list(range(2100, 2121))
            params2 = await prefill_leg(prefill, other)
            prefill.prefill[0].region.view(params2["remote_block_ids"][0][0])[0] ^= 0x80
            with pytest.raises(openai.InternalServerError, match="does not match"):
                await decode_leg(decode, other, params2, stream=True)
        else:
            reply = await decode_leg(decode, prompt, params)
            assert reply.choices[0].finish_reason == "length"
            assert reply.usage.prompt_tokens_details.cached_tokens == 0  # recomputed here
        assert decode.decode[0].stats.failed_transfers == (2 if policy == "fail" else 1)
        assert decode.decode[0].stats.loaded_tokens == 0
        # The read itself happened, so the prefill engine was notified and freed its blocks;
        # the decode engine holds nothing either.
        await wait_for(lambda: used_blocks(prefill) == 0, what="prefill lease to end")
        assert used_blocks(decode) == 0


async def test_block_ids_that_point_at_other_blocks_are_caught():
    async with (
        running_sim(*FAST, "--role", "prefill") as prefill,
        running_sim(*FAST, "--role", "decode", "--kv-load-failure-policy", "fail") as decode,
    ):
        a, b = list(range(1, 13)), list(range(500, 512))
        pa = await prefill_leg(prefill, a)
        pb = await prefill_leg(prefill, b)
        forged = dict(pa, remote_block_ids=pb["remote_block_ids"])  # b's blocks, a's lease
        with pytest.raises(openai.InternalServerError, match="not match"):
            await decode_leg(decode, a, forged)
        reply = await decode_leg(decode, b, pb)
        assert reply.usage.prompt_tokens_details.cached_tokens == 11


async def test_unreachable_prefill_engine_means_recompute():
    prompt = list(range(3000, 3010))
    async with running_sim(*FAST, "--role", "decode") as decode:
        async with running_sim(*FAST, "--role", "prefill") as prefill:
            params = await prefill_leg(prefill, prompt)
        # The prefill engine is gone: the handshake times out and the prompt is recomputed.
        t0 = time.monotonic()
        leg = asyncio.create_task(decode_leg(decode, prompt, params))
        await wait_for(lambda: bool(decode.engines[0].loading), what="the load to start")
        # While it loads, the request counts as waiting (vLLM's WAITING_FOR_REMOTE_KVS).
        text = await metrics_text(decode.port)
        waiting = [
            s for s in prom_text.parse(text).samples if s.name == "vllm:num_requests_waiting"
        ]
        assert [s.value for s in waiting] == [1.0]
        reply = await leg
        assert time.monotonic() - t0 < 20
        assert reply.usage.prompt_tokens_details.cached_tokens == 0
        assert reply.usage.completion_tokens == 6
        assert decode.decode[0].stats.failed_transfers == 1
        assert used_blocks(decode) == 0


async def test_an_unread_lease_expires_and_a_late_decode_recomputes():
    prompt = list(range(4000, 4013))
    env = {
        "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
        "VLLM_NIXL_SIDE_CHANNEL_PORT": "0",
        "VLLM_NIXL_ABORT_REQUEST_TIMEOUT": "0.3",
    }
    async with (
        running_sim(*FAST, "--role", "prefill", env=env) as prefill,
        running_sim(*FAST, "--role", "decode") as decode,
    ):
        params = await prefill_leg(prefill, prompt)
        assert used_blocks(prefill) == 4
        await wait_for(lambda: used_blocks(prefill) == 0, timeout=5, what="lease expiry")
        assert prefill.prefill[0].stats.expired_leases == 1
        reply = await decode_leg(decode, prompt, params)
        assert reply.usage.prompt_tokens_details.cached_tokens == 0
        assert decode.decode[0].stats.failed_transfers == 1


async def test_a_decode_request_abandoned_in_the_queue_frees_the_prefill_lease():
    async with (
        running_sim("--role", "prefill", "--block-size", "16", "--speedup", "1000") as prefill,
        # 8 blocks of 16 tokens, slow: one long request fills the cache for a while.
        running_sim(
            "--role", "decode", "--block-size", "16", "--num-blocks", "8", "--speedup", "0.2"
        ) as decode,
    ):
        hog = asyncio.create_task(
            client(decode).completions.create(
                model=MODEL, prompt=list(range(1, 101)), max_tokens=28
            )
        )
        await wait_for(lambda: decode.engines[0].num_running == 1, what="the hog to run")
        prompt = list(range(7000, 7040))
        params = await prefill_leg(prefill, prompt)
        assert used_blocks(prefill) == 3
        with pytest.raises(openai.APITimeoutError):
            await decode_leg(decode, prompt, params, timeout=0.3)
        assert decode.engines[0].num_running == 1, "the hog should still hold the cache"
        # The client gave up while the request waited for blocks: the engine tells the
        # prefill engine at once (no 480 s lease expiry), which frees its blocks.
        await wait_for(lambda: used_blocks(prefill) == 0, timeout=5, what="lease release")
        assert prefill.prefill[0].stats.expired_leases == 0
        assert decode.decode[0].stats.failed_notifications == 0
        await hog
        await wait_for(lambda: used_blocks(decode) == 0, what="decode idle")


async def test_loads_take_no_running_place():
    # vLLM starts a load only when a running place is free, but the load does not keep it:
    # with one place, two loads from an unreachable prefill engine run side by side.
    async with running_sim(*FAST, "--role", "decode", "--max-num-seqs", "1") as decode:
        async with running_sim(*FAST, "--role", "prefill") as prefill:
            a, b = list(range(1, 14)), list(range(100, 114))
            pa, pb = await prefill_leg(prefill, a), await prefill_leg(prefill, b)
        legs = [asyncio.create_task(decode_leg(decode, a, pa)),
                asyncio.create_task(decode_leg(decode, b, pb))]  # fmt: skip
        await wait_for(lambda: len(decode.engines[0].loading) == 2, what="both loads")
        assert decode.engines[0].num_running == 0 and decode.engines[0].num_waiting == 2
        replies = await asyncio.gather(*legs)
        assert [r.usage.prompt_tokens_details.cached_tokens for r in replies] == [0, 0]
        assert decode.decode[0].stats.failed_transfers == 2


async def test_a_decode_request_refused_at_submit_frees_the_prefill_lease():
    prompt = list(range(8000, 8011))
    async with (
        running_sim(*FAST, "--role", "prefill") as prefill,
        running_sim(*FAST, "--role", "decode", "--max-waiting", "0") as decode,
    ):
        params = await prefill_leg(prefill, prompt)
        assert used_blocks(prefill) == 3
        with pytest.raises(openai.APIStatusError) as err:
            await decode_leg(decode, prompt, params)
        assert err.value.status_code == 503
        await wait_for(lambda: used_blocks(prefill) == 0, timeout=5, what="lease release")


async def test_engines_hashing_blocks_differently_refuse_each_other(caplog):
    prompt = list(range(9000, 9013))
    async with (
        running_sim(*FAST, "--role", "prefill") as prefill,
        running_sim(*FAST, "--role", "decode", "--prefix-caching-hash-algo", "sha256") as decode,
    ):
        params = await prefill_leg(prefill, prompt)
        reply = await decode_leg(decode, prompt, params)
        assert reply.usage.prompt_tokens_details.cached_tokens == 0  # recomputed
        assert decode.decode[0].stats.failed_transfers == 1
        assert "incompatible engines" in caplog.text
        assert "block hash algorithm" in caplog.text


async def test_stopping_with_requests_in_flight_is_prompt():
    async with running_sim(*FAST, "--role", "prefill") as prefill:
        params = await prefill_leg(prefill, list(range(1, 30)))
        decode = SimApp(sim_options("--role", "decode", "--block-size", "4", "--speedup", "0.05"))
        await decode.start()
        try:
            legs = [
                asyncio.create_task(decode_leg(decode, list(range(1, 30)), params, max_tokens=200)),
                asyncio.create_task(
                    client(decode).completions.create(
                        model=MODEL, prompt=list(range(40, 60)), max_tokens=200, stream=True
                    )
                ),
            ]
            await wait_for(lambda: decode.engines[0].num_running == 2, what="both to run")
        finally:
            t0 = time.monotonic()
            await decode.stop()
            assert time.monotonic() - t0 < 3
        results = await asyncio.gather(*legs, return_exceptions=True)
        assert isinstance(results[0], openai.APIError)  # 500: aborted
        assert decode.engines[0].load == 0 and used_blocks(decode) == 0
        await wait_for(lambda: used_blocks(prefill) == 0, what="prefill lease to end")


async def test_bad_kv_transfer_params_get_400():
    prompt = list(range(1, 10))
    async with (
        running_sim(*FAST, "--role", "prefill") as prefill,
        running_sim(*FAST, "--role", "decode") as decode,
        running_sim(*FAST) as both,
    ):
        params = await prefill_leg(prefill, prompt)
        cases = [
            (decode, {k: v for k, v in params.items() if k != "remote_engine_id"},
             "remote_engine_id"),
            (decode, dict(params, remote_block_ids=[[1, 2]]), "fills 3 blocks"),
            (decode, dict(params, remote_block_ids=[[1], [2], [3]]), "KV-cache groups"),
            (decode, dict(params, remote_port=70000), "not a port"),
            (decode, dict(params, remote_host="bad host"), "not a host name"),
            (decode, dict(params, do_remote_decode=True), "both"),
            (decode, {"do_remote_decode": True}, "needs --role prefill"),
            (prefill, params, "needs --role decode"),
            (both, params, "needs --role decode"),
        ]  # fmt: skip
        for app, body, message in cases:
            with pytest.raises(openai.BadRequestError, match=message):
                await client(app).completions.create(
                    model=MODEL,
                    prompt=prompt,
                    max_tokens=2,
                    extra_body={"kv_transfer_params": body},
                )
        # A lone surrogate is valid JSON but no host name (the openai client cannot send it).
        lone = dict(params, remote_host="\ud800")
        raw = json.dumps({"prompt": prompt, "kv_transfer_params": lone})
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"http://127.0.0.1:{decode.port}/v1/completions", data=raw) as resp,
        ):
            assert resp.status == 400
            assert "not a host name" in (await resp.json())["error"]["message"]
        # The original params still work, and nothing was left held.
        reply = await decode_leg(decode, prompt, params)
        assert reply.usage.prompt_tokens_details.cached_tokens == 8
        await wait_for(lambda: used_blocks(prefill) == 0, what="prefill lease to end")


async def test_data_parallel_prefill_ranks_each_have_a_side_channel():
    env = {"VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1", "VLLM_NIXL_SIDE_CHANNEL_PORT": "0"}
    async with (
        running_sim(*FAST, "--role", "prefill", "--dp-size", "2", "--engine-id", "pf", env=env)
        as prefill,
        running_sim(*FAST, "--role", "decode") as decode,
    ):  # fmt: skip
        prompt = list(range(50, 61))
        p0 = await prefill_leg(prefill, prompt, headers={"X-data-parallel-rank": "0"})
        p1 = await prefill_leg(prefill, prompt, headers={"X-data-parallel-rank": "1"})
        assert (p0["remote_engine_id"], p1["remote_engine_id"]) == ("pf_dp0", "pf_dp1")
        assert p0["remote_port"] != p1["remote_port"]
        for params in (p1, p0):
            reply = await decode_leg(decode, prompt, params)
            assert reply.usage.completion_tokens == 6
        assert decode.decode[0].stats.failed_transfers == 0
        await wait_for(lambda: used_blocks(prefill) == 0, what="both leases to end")


# --------------------------------------------------------------------- real processes


@contextlib.contextmanager
def sim_process(*argv: str, env: dict[str, str]):
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers", "sim", "--host", "127.0.0.1", *argv],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        stop_process(proc)


async def metric(port: int, name: str) -> float:
    text = await metrics_text(port)
    return sum(s.value for s in prom_text.parse(text).samples if s.name == name)


async def test_two_sim_worker_processes_complete_disaggregated_chat_requests():
    p_port, d_port, side = free_port(), free_port(), free_port()
    common = ["--block-size", "16", "--num-blocks", "256", "--speedup", "50"]
    common += ["--kv-block-bytes", str(64 * 1024)]
    env = {"VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1", "VLLM_NIXL_SIDE_CHANNEL_PORT": str(side)}
    with (
        sim_process("--port", str(p_port), "--role", "prefill", *common, env=env) as p,
        sim_process("--port", str(d_port), "--role", "decode", *common, env=env) as d,
    ):
        await wait_healthy(p_port, p, timeout=30)
        await wait_healthy(d_port, d, timeout=30)
        pc = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{p_port}/v1", api_key="x", max_retries=0
        )
        dc = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{d_port}/v1", api_key="x", max_retries=0
        )
        rng = random.Random(3)

        async def one(i: int) -> None:
            ids = [rng.randrange(1, 30000) for _ in range(40 + 17 * i)]
            body = {"nvext": {"token_data": ids}}
            first = await pc.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "x"}],
                max_tokens=1,
                extra_body={**body, "kv_transfer_params": {"do_remote_decode": True}},
            )
            params = first.model_extra["kv_transfer_params"]
            assert params["remote_port"] == side
            reply = await dc.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "x"}],
                max_tokens=8,
                extra_body={**body, "kv_transfer_params": params},
            )
            assert reply.usage.completion_tokens == 8
            assert reply.usage.prompt_tokens_details.cached_tokens == len(ids) - 1

        await asyncio.gather(*(one(i) for i in range(8)))
        assert await metric(d_port, "vllm:nixl_bytes_transferred_count") == 8
        assert await metric(d_port, "vllm:nixl_num_failed_transfers_total") == 0
        deadline = time.monotonic() + 10
        while await metric(p_port, "vllm:kv_cache_usage_perc") != 0:
            assert time.monotonic() < deadline, "the prefill engine kept leased blocks"
            await asyncio.sleep(0.05)


def test_roles_are_refused_at_start_without_nixl(tmp_path):
    # A package named nixl that fails to import, ahead of the real one on the path: the
    # same failure a machine without NIXL gives.
    fake = tmp_path / "nixl"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('No module named nixl._api')\n")
    for role in ("prefill", "decode"):
        proc = subprocess.run(
            [sys.executable, "-m", "workers", "sim", "--port", "0", "--role", role],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 1, proc.stderr
        assert f"--role {role} moves KV blocks with NIXL" in proc.stderr
        assert "pip install --no-deps nixl" in proc.stderr
    # The aggregated role needs no NIXL (it starts; --help is enough to show it parses).
    ok = subprocess.run(
        [sys.executable, "-m", "workers", "sim", "--role", "both", "--help"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0
