"""Prefill → decode through two sidecars over real NIXL: the decode pod's sidecar runs the
prefill leg on the prefill pod named by x-prefiller-host-port, then decodes locally with the
returned kv_transfer_params; targets off the allow-list are refused, and a prefill that
cannot be reached falls back to local prefill."""

from __future__ import annotations

import pathlib
import sys

import aiohttp
import pytest

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from sidecar_helpers import gauge, in_flight, running_sidecar  # noqa: E402
from sim_helpers import running_sim  # noqa: E402

from bench.epp import free_port  # noqa: E402

pytestmark = pytest.mark.timeout(120)

SIM = ("--block-size", "16", "--num-blocks", "256", "--speedup", "100")
PROMPT = [(11 * i) % 700 + 30 for i in range(50)]


async def test_prefill_on_the_named_pod_then_decode_here_over_nixl():
    async with (
        running_sim(*SIM, "--role", "prefill", "--engine-id", "pre") as pre,
        running_sim(*SIM, "--role", "decode") as dec,
        running_sim(*SIM) as agg,
        running_sidecar("--worker", f"127.0.0.1:{pre.port},kind=sim") as pre_sc,
        running_sidecar(
            "--worker", f"127.0.0.1:{dec.port},kind=sim", "--prefill-allow", "127.0.0.0/8"
        ) as dec_sc,
        aiohttp.ClientSession() as http,
    ):
        body = {"prompt": PROMPT, "max_tokens": 8, "seed": 5}
        async with http.post(f"http://127.0.0.1:{agg.port}/v1/completions", json=body) as r:
            want = await r.json()
        hdrs = {"x-prefiller-host-port": f"127.0.0.1:{pre_sc.port}", "x-prefill-dp-rank": "0"}
        url = f"http://127.0.0.1:{dec_sc.port}/v1/completions"
        async with http.post(url, json=body, headers=hdrs) as r:
            got = await r.json()
        assert r.status == 200, got
        assert got["choices"][0]["text"] == want["choices"][0]["text"]
        # the usage reports the prefill leg's cache hit (a cold prefill: none)
        assert got["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert gauge(dec_sc, "kvpick_sidecar_prefill_total", outcome="ok") == 1
        async with http.get(f"http://127.0.0.1:{dec.port}/metrics") as r:
            metrics = await r.text()
        # the prompt's blocks came over NIXL: one read, checked byte for byte by the engine
        (line,) = [
            x for x in metrics.splitlines() if x.startswith("vllm:nixl_xfer_time_seconds_count")
        ]
        assert float(line.split()[-1]) == 1
        stats = dec.engines[0].stats
        assert sum(n for reason, n in stats.finished.items() if reason != "abort") == 1
        assert sum(n for reason, n in pre.engines[0].stats.finished.items()) == 1

        # a forged prefill header naming a host off the allow-list: 403, nothing sent
        async with http.post(
            url, json=body, headers={"x-prefiller-host-port": "10.9.8.7:8000"}
        ) as r:
            doc = await r.json()
        assert r.status == 403 and "--prefill-allow" in doc["error"]["message"]
        assert gauge(dec_sc, "kvpick_sidecar_prefill_total", outcome="refused") == 1

        # an allowed target nobody listens on: decode runs the whole request locally
        dead = free_port()
        async with http.post(
            url, json=body, headers={"x-prefiller-host-port": f"127.0.0.1:{dead}"}
        ) as r:
            doc = await r.json()
        assert r.status == 200 and doc["choices"][0]["text"] == want["choices"][0]["text"]
        assert gauge(dec_sc, "kvpick_sidecar_prefill_total", outcome="fallback_unreachable") == 1

        # a 4xx from the prefill leg goes to the client as it is
        async with http.post(
            url, json={**body, "prompt": "text without a tokenizer"}, headers=hdrs
        ) as r:
            doc = await r.json()
        assert r.status == 400, doc
        assert in_flight(dec_sc) == 0 and in_flight(pre_sc) == 0


async def test_without_an_allow_list_every_remote_prefill_is_refused():
    async with (
        running_sim(*SIM) as sim,
        running_sidecar("--worker", f"127.0.0.1:{sim.port},kind=sim") as sc,
        aiohttp.ClientSession() as http,
        http.post(
            f"http://127.0.0.1:{sc.port}/v1/completions",
            json={"prompt": PROMPT, "max_tokens": 2},
            headers={"x-prefiller-host-port": f"127.0.0.1:{sim.port}"},
        ) as r,
    ):
        assert r.status == 403
