"""``kvpick bench sim``: how much one simulated engine process can carry, per CPU core.

Benchmark harnesses run many ``kvpick worker sim`` processes on one machine and need to know
how many fit. This starts one sim process (the real command) at each ``--speedups`` value,
drives it from this process with a closed loop of ``--concurrency`` clients for
``--duration`` seconds, and reports, per speedup ``S`` (keys end in ``_xS``):

* ``requests_per_s``, ``sim_tokens_per_s`` (prompt tokens computed plus tokens generated,
  read from the sim's own ``/metrics``), ``generated_tokens_per_s``: wall-clock rates;
* ``sim_cpu_share``: the fraction of one core the sim process used meanwhile;
* ``requests_per_core_s``, ``sim_tokens_per_core_s``: the same counts per CPU-second of the
  sim process, i.e. what one fully used core could carry;
* ``sims_per_core``: how many sims under this load one core hosts (``1 / sim_cpu_share``).

Baseline, same run: a bare aiohttp server in its own process that answers the same requests
with responses of the same shape and size (the HTTP and JSON floor, no simulation), driven
the same way at speedup 10's concurrency: ``floor_requests_per_core_s``, and
``sim_cost_vs_floor``, the sim's CPU per request over the floor's.

Workload (deterministic for ``--seed``): prompts of token ids, 32 shared prefixes of 64-512
tokens under random suffixes (256-1,024 tokens in all), 16-128 output tokens, half of the
requests streamed. Any failed request fails the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.procstat import cpu_seconds, free_port, stop_process, wait_healthy
from epp.datalayer import prom_text

ROOT = Path(__file__).resolve().parents[1]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sim",
        help="the simulated engine's capacity: requests/s and tokens/s per core",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--speedups",
        default="1,10",
        help="comma-separated --speedup values to measure (default: %(default)s)",
    )
    p.add_argument(
        "--duration", type=float, default=15.0, help="seconds per phase (default: %(default)s)"
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=64,
        help="requests in flight, closed loop (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=11, help="workload seed (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="3-second phases, for a smoke test")
    p.set_defaults(func=run)


def _progress(msg: str) -> None:
    print(f"[bench sim] {msg}", file=sys.stderr, flush=True)


class Workload:
    """Deterministic request bodies (see the module docstring)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.prefixes = [
            [self.rng.randrange(1, 32000) for _ in range(self.rng.randrange(64, 513))]
            for _ in range(32)
        ]

    def next(self) -> dict[str, Any]:
        rng = self.rng
        prefix = rng.choice(self.prefixes)
        total = rng.randrange(max(256, len(prefix) + 1), 1025)
        prompt = prefix + [rng.randrange(1, 32000) for _ in range(total - len(prefix))]
        body: dict[str, Any] = {
            "model": "sim-model",
            "prompt": prompt,
            "max_tokens": rng.randrange(16, 129),
        }
        if rng.random() < 0.5:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body


async def _drive(port: int, workload: Workload, concurrency: int, seconds: float) -> dict:
    """Closed loop for ``seconds``; returns counts. Raises on any failed request."""
    url = f"http://127.0.0.1:{port}/v1/completions"
    done = 0
    chunks = 0
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def client() -> None:
            nonlocal done, chunks
            while time.monotonic() < deadline:
                body = workload.next()
                async with http.post(url, json=body) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
                    if body.get("stream"):
                        async for line in resp.content:
                            if line.startswith(b"data: "):
                                chunks += 1
                        if chunks == 0:
                            raise RuntimeError("a stream carried no data")
                    else:
                        await resp.read()
                done += 1

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return {"requests": done, "chunks": chunks}


async def _metrics(port: int) -> dict[str, float]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/metrics") as resp,
    ):
        text = await resp.text()
    out: dict[str, float] = {}
    for s in prom_text.parse(text).samples:
        out[s.name] = out.get(s.name, 0.0) + s.value
    return out


async def _measure_sim(speedup: float, args: argparse.Namespace, seconds: float) -> dict:
    port = free_port()
    argv = [sys.executable, "-m", "workers", "sim", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--speedup", str(speedup), "--num-blocks", "8192", "--block-size", "16"]
    # The sim's log goes to a file: an unread pipe would fill up and stall it.
    with tempfile.NamedTemporaryFile(
        prefix="kvpick-bench-sim-", suffix=".log", delete=False
    ) as log:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
    try:
        try:
            await wait_healthy(port, proc)
        except RuntimeError as exc:
            tail = Path(log.name).read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{exc}; its log ({log.name}) ends:\n{tail}") from None
        workload = Workload(args.seed)
        await _drive(port, workload, args.concurrency, min(2.0, seconds))  # warm-up
        before = await _metrics(port)
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        counts = await _drive(port, workload, args.concurrency, seconds)
        wall, cpu = time.monotonic() - t0, cpu_seconds(proc.pid) - cpu0
        after = await _metrics(port)
    finally:
        stop_process(proc)
    Path(log.name).unlink(missing_ok=True)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    prompt = delta("vllm:prompt_tokens_total")
    generated = delta("vllm:generation_tokens_total")
    cpu = max(cpu, 1e-9)
    share = cpu / wall
    return {
        "requests_per_s": round(counts["requests"] / wall, 1),
        "sim_tokens_per_s": round((prompt + generated) / wall),
        "generated_tokens_per_s": round(generated / wall),
        "sim_cpu_share": round(share, 3),
        "requests_per_core_s": round(counts["requests"] / cpu, 1),
        "sim_tokens_per_core_s": round((prompt + generated) / cpu),
        "sims_per_core": round(1 / max(share, 1e-9), 1),
    }


# --------------------------------------------------------------------- the floor


def _floor_server(port: int) -> None:
    """An aiohttp server that answers completions with the sim's response shapes and sizes,
    computing nothing (run in its own process)."""
    from aiohttp import web

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        n = body["max_tokens"]
        usage = {
            "prompt_tokens": len(body["prompt"]),
            "completion_tokens": n,
            "total_tokens": len(body["prompt"]) + n,
            "prompt_tokens_details": {"cached_tokens": 0},
        }
        head = {"id": "cmpl-0", "object": "text_completion", "created": 0, "model": "m"}
        if not body.get("stream"):
            choice = {"index": 0, "text": "", "finish_reason": "length", "logprobs": None}
            return web.json_response({**head, "choices": [choice], "usage": usage})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(n):
            choice = {"index": 0, "text": "", "logprobs": None, "stop_reason": None}
            choice["finish_reason"] = "length" if i == n - 1 else None
            data = json.dumps({**head, "choices": [choice]}, separators=(",", ":"))
            await resp.write(b"data: " + data.encode() + b"\n\n")
        data = json.dumps({**head, "choices": [], "usage": usage}, separators=(",", ":"))
        await resp.write(b"data: " + data.encode() + b"\n\ndata: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def health(_request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


async def _measure_floor(args: argparse.Namespace, seconds: float) -> dict:
    port = free_port()
    proc = mp.get_context("spawn").Process(target=_floor_server, args=(port,), daemon=True)
    proc.start()
    try:
        await wait_healthy(port, proc)
        workload = Workload(args.seed)
        await _drive(port, workload, args.concurrency, min(2.0, seconds))
        assert proc.pid is not None
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        counts = await _drive(port, workload, args.concurrency, seconds)
        wall, cpu = time.monotonic() - t0, cpu_seconds(proc.pid) - cpu0
    finally:
        proc.terminate()
        proc.join(10)
    return {
        "floor_requests_per_s": round(counts["requests"] / wall, 1),
        "floor_requests_per_core_s": round(counts["requests"] / max(cpu, 1e-9), 1),
    }


async def run_async(args: argparse.Namespace) -> dict[str, Any]:
    seconds = 3.0 if args.quick else args.duration
    try:
        speedups = [float(s) for s in args.speedups.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(
            f"kvpick bench sim: --speedups must be numbers, got {args.speedups!r}"
        ) from None
    if not speedups or min(speedups) <= 0:
        raise SystemExit("kvpick bench sim: --speedups needs at least one value > 0")
    if args.concurrency < 1 or seconds <= 0:
        raise SystemExit("kvpick bench sim: --concurrency and --duration must be > 0")
    result: dict[str, Any] = {
        "cores": os.cpu_count(),
        "duration_s": seconds,
        "concurrency": args.concurrency,
    }
    for speedup in speedups:
        tag = f"x{speedup:g}"
        _progress(f"sim at --speedup {speedup:g}: {args.concurrency} clients, {seconds:g} s")
        for key, value in (await _measure_sim(speedup, args, seconds)).items():
            result[f"{key}_{tag}"] = value
    _progress(f"floor: bare aiohttp server, {args.concurrency} clients, {seconds:g} s")
    result.update(await _measure_floor(args, seconds))
    fastest = f"x{max(speedups):g}"
    result["sim_cost_vs_floor"] = round(
        result["floor_requests_per_core_s"] / max(result[f"requests_per_core_s_{fastest}"], 1e-9),
        2,
    )
    return result


def run(args: argparse.Namespace) -> int:
    result = asyncio.run(run_async(args))
    print(json.dumps(result, indent=2))
    return 0
