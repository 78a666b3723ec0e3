"""``kvpick bench epp --abuse NAME``: normal requests through Envoy while a hostile client
works on the EPP's ext_proc port.

One run starts a whole stack of processes (bench/stack.py: two simulated engines, ``kvpick
epp`` with TLS, a real Envoy in front), then for each abuse of :mod:`bench.abuse`:

1. a baseline: normal chat requests (about 1K tokens, one in flight) through Envoy;
2. the same requests while the abuse runs from a process of its own, straight at the
   EPP's ext_proc port over TLS (a quick abuse is repeated until it has lasted
   ``--abuse-seconds``, so that enough requests are measured against it);
3. the same requests after it, once the EPP's RSS is back within 10 % of its value before
   (or 5 s have passed).

Figures per abuse: p50/p99 of each phase, the requests that failed, the EPP's RSS before,
at peak (sampled every 20 ms) and after, whether the EPP survived (it is restarted for the
next abuse if not), the server's answer in a few words, and the abuser's own report. One
abuse prints one JSON object; ``--abuse all`` runs each in turn and prints one JSON object
with all of them on stdout, and a Markdown table of them on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench import abuse

CHAT = "/v1/chat/completions"
MB = 1_000_000


def _progress(msg: str) -> None:
    print(f"[bench epp --abuse] {msg}", file=sys.stderr, flush=True)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))] * 1000, 2)


async def _post(session: aiohttp.ClientSession, url: str, body: bytes) -> float | str:
    """Seconds one normal request took, or why it failed."""
    t = time.perf_counter()
    try:
        async with session.post(
            url + CHAT,
            data=body,
            headers={"content-type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=30),
        ) as resp:
            await resp.read()
            if resp.status != 200:
                return f"HTTP {resp.status}"
    except (aiohttp.ClientError, TimeoutError) as exc:
        return type(exc).__name__
    return time.perf_counter() - t


async def _requests(
    session: aiohttp.ClientSession, url: str, bodies: list[bytes], n: int, start: int
) -> tuple[list[float], list[str]]:
    out: list[float] = []
    errors: list[str] = []
    for i in range(n):
        r = await _post(session, url, bodies[(start + i) % len(bodies)])
        (out if isinstance(r, float) else errors).append(r)  # type: ignore[arg-type]
    return out, errors


async def _requests_while(
    session: aiohttp.ClientSession,
    url: str,
    bodies: list[bytes],
    proc: abuse.AbuseProcess,
    start: int,
) -> tuple[list[float], list[str]]:
    out: list[float] = []
    errors: list[str] = []
    i = start
    while not proc.done:
        r = await _post(session, url, bodies[i % len(bodies)])
        (out if isinstance(r, float) else errors).append(r)  # type: ignore[arg-type]
        i += 1
    return out, errors


async def _peak_rss(pid: int, stop: asyncio.Event) -> int:
    from bench.stack import rss_bytes

    peak = 0
    while not stop.is_set():
        try:
            peak = max(peak, rss_bytes(pid))
        except (OSError, RuntimeError):  # the process is gone
            break
        await asyncio.sleep(0.02)
    return peak


async def measure(
    st: Any,
    session: aiohttp.ClientSession,
    name: str,
    bodies: list[bytes],
    *,
    baseline: int,
    after: int,
    abuse_seconds: float,
) -> dict[str, Any]:
    """One abuse against the stack ``st``: the figures described in the module docstring."""
    _progress(f"{name}: baseline, {baseline} requests")
    await _requests(session, st.url, bodies, 10, 0)  # warm
    base, base_errors = await _requests(session, st.url, bodies, baseline, 10)
    rss_before = st.epp.rss()
    stop = asyncio.Event()
    peak_task = asyncio.ensure_future(_peak_rss(st.epp.pid, stop))
    proc = abuse.AbuseProcess(name, st.epp.grpc_port, repeat_for=abuse_seconds)
    await proc.start()
    await proc.started.wait()
    _progress(f"{name}: running, normal requests meanwhile")
    during, during_errors = await _requests_while(session, st.url, bodies, proc, 1000)
    try:
        result = await proc.result()
    except RuntimeError as exc:
        result = {"abuse": name, "error": str(exc)[-500:]}
    stop.set()
    rss_peak = max(rss_before, await peak_task)
    alive = st.epp.proc.poll() is None
    row: dict[str, Any] = {
        "abuse": name,
        "baseline_requests": len(base),
        "baseline_p50_ms": _pct(base, 0.5),
        "baseline_p99_ms": _pct(base, 0.99),
        "during_requests": len(during),
        "during_p50_ms": _pct(during, 0.5),
        "during_p99_ms": _pct(during, 0.99),
        "during_max_ms": _pct(during, 1.0),
        "during_errors": len(during_errors),
        "epp_alive": alive,
        "epp_rss_mb_before": round(rss_before / MB, 1),
        "epp_rss_mb_peak": round(rss_peak / MB, 1),
    }
    if base_errors:
        row["baseline_errors"] = len(base_errors)
    if during_errors:
        row["error_samples"] = during_errors[:5]
    if not alive:
        row["epp_exit"] = st.epp.proc.returncode
        _progress(f"{name}: the EPP died ({st.epp.proc.returncode}); restarting it")
        await st.epp.start()
    else:
        deadline = time.monotonic() + 5
        while st.epp.rss() > rss_before * 1.10 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        row["epp_rss_mb_after"] = round(st.epp.rss() / MB, 1)
    _progress(f"{name}: after, {after} requests")
    later, later_errors = await _requests(session, st.url, bodies, after, 2000)
    row["after_p50_ms"] = _pct(later, 0.5)
    row["after_p99_ms"] = _pct(later, 0.99)
    row["after_errors"] = len(later_errors)
    if "connections" in result and name in ("idle-tls", "no-hello"):
        per = (rss_peak - rss_before) / max(1, result["connections"])
        row["epp_rss_kb_per_connection"] = round(per / 1024, 1)
    row["server_answer"] = "the abuser failed" if "error" in result else abuse.answer(result)
    row["abuse_result"] = result
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (for docs/benchmarks.md)."""
    head = (
        "| Abuse | Baseline p50 / p99 ms | During p50 / p99 / max ms (requests) | Errors "
        "| After p50 ms | EPP RSS MB before / peak / after | Server's answer |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        after_rss = r.get("epp_rss_mb_after", "died")
        lines.append(
            f"| `{r['abuse']}` | {r['baseline_p50_ms']} / {r['baseline_p99_ms']} "
            f"| {r['during_p50_ms']} / {r['during_p99_ms']} / {r['during_max_ms']} "
            f"({r['during_requests']}) | {r['during_errors'] + r['after_errors']} "
            f"| {r['after_p50_ms']} | {r['epp_rss_mb_before']} / {r['epp_rss_mb_peak']} / "
            f"{after_rss} | {r['server_answer']} |"
        )
    return head + "\n".join(lines) + "\n"


async def run_async(args: argparse.Namespace) -> dict[str, Any]:
    from bench.epp import _chat_prompts
    from bench.stack import stack
    from bench.tiny_tokenizer import build_tiny_model
    from epp.tokenizer import Tokenizer

    names = list(abuse.ABUSES) if args.abuse == "all" else [args.abuse]
    quick = args.quick
    baseline = 30 if quick else 100
    after = 20 if quick else 50
    seconds = 1.0 if quick else args.abuse_seconds
    work = Path(tempfile.mkdtemp(prefix="kvpick-bench-abuse-"))
    _progress(f"workdir {work}")
    model = build_tiny_model(work / "model", "llama3")
    tok = Tokenizer.load(str(model))
    # Four generated tokens (the simulated engine's time is not what is measured here).
    prompts = [p | {"max_tokens": 4} for p in _chat_prompts(tok, 1024, 200, seed=19)]
    bodies = [json.dumps(p).encode() for p in prompts]
    rows = []
    async with (
        stack(work, model, epp_args=args.epp_arg) as st,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4)) as session,
    ):
        _progress(f"stack up: EPP pid {st.epp.pid}, ext_proc port {st.epp.grpc_port}")
        for name in names:
            rows.append(
                await measure(
                    st,
                    session,
                    name,
                    bodies,
                    baseline=baseline,
                    after=after,
                    abuse_seconds=seconds,
                )
            )
    workload = {
        "prompt_tokens": 1024,
        "baseline_requests": baseline,
        "after_requests": after,
        "abuse_seconds": seconds,
        "epp_args": list(args.epp_arg),
    }
    if len(rows) == 1:
        return rows[0] | {"workload": workload}
    return {"abuses": rows, "workload": workload, "table": table(rows)}


def run(args: argparse.Namespace) -> int:
    result = asyncio.run(run_async(args))
    if "table" in result:
        print("\n" + result["table"], file=sys.stderr)
    print(json.dumps(result, indent=2))
    return 0
