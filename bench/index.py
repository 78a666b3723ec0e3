"""``kvpick bench index``: KV event ingest, ``find_matches`` latency, hashing and memory.

Everything is measured in one run on one workload (see :mod:`bench.workload`), and the
query latency is compared with the naive per-worker-dict index (:mod:`bench.naive_index`)
answering the same queries, interleaved with kvpick's so that both see the same machine
noise. The two indexes must agree on every query, or the benchmark fails.

Figures (one JSON object on stdout; progress on stderr):

* ``ingest_blocks_per_s``: BlockStored blocks per second, decoding pre-encoded vLLM frames
  (map-shaped, as vLLM 0.33 publishes them) and applying them to a fresh index, over the
  workload's whole event stream (evictions included in the time, not in the count).
* ``ingest_unique_blocks_per_s``: the same, on a stream in which every block is new to the
  index (nothing shared between workers): the worst case.
* ``query_p50_us`` / ``query_p99_us``: ``find_matches`` on 8,192-token prompts.
* ``naive_query_p50_us`` / ``naive_query_p99_us`` and ``speedup_vs_naive`` (ratio of p50s).
* ``hash_8k_tokens_us``: median time of :func:`epp.hashing.sequence_hashes` (block hashes
  and the chained sequence hashes) for 8,192 tokens; ``block_hashes_8k_tokens_us``: block
  hashes only, which is what a query needs.
* ``bytes_per_block``: resident memory (RSS) the index adds per stored worker-block, and
  ``bytes_per_block_traced``, the same counted by tracemalloc (Python allocations only).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
import tracemalloc
from array import array
from typing import Any

from bench.naive_index import NaiveIndex
from bench.workload import Workload, generate
from epp import native
from epp.hashing import block_hashes, sequence_hashes
from epp.kvevents.msgpack_codec import decode_batch, encode_batch
from epp.kvevents.types import BlockStored
from epp.kvindex import KvIndex

TARGETS = {
    "ingest_blocks_per_s": (">=", 1_000_000),
    "query_p99_us": ("<=", 1000),
    "speedup_vs_naive": (">=", 10),
    "bytes_per_block": ("<=", 300),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "index",
        help="KV index: event ingest, find_matches latency vs a naive index, memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workers", type=int, default=64, help="workers (default: %(default)s)")
    p.add_argument(
        "--blocks-per-worker",
        type=int,
        default=16384,
        help="blocks each worker's cache holds (default: %(default)s)",
    )
    p.add_argument("--block-size", type=int, default=16, help="tokens per block (default: 16)")
    p.add_argument(
        "--prompt-tokens",
        type=int,
        default=8192,
        help="tokens per query prompt (default: %(default)s)",
    )
    p.add_argument("--queries", type=int, default=2000, help="queries (default: %(default)s)")
    p.add_argument("--seed", type=int, default=7, help="workload seed (default: %(default)s)")
    p.add_argument(
        "--no-traced-memory",
        action="store_true",
        help="skip the tracemalloc pass (it re-ingests the stream, slowly)",
    )
    p.set_defaults(func=run)


def _progress(msg: str) -> None:
    print(f"[bench index] {msg}", file=sys.stderr, flush=True)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _pct(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _ingest(frames: list[tuple[int, bytes]], workers: int, block_size: int) -> KvIndex:
    index = KvIndex(block_size)
    for w in range(workers):
        index.add_worker(w)
    apply = index.apply
    for worker, frame in frames:
        for event in decode_batch(frame).events:
            apply(worker, event)
    return index


def _unique_frames(
    workers: int, block_size: int, blocks: int, rng: random.Random
) -> list[tuple[int, bytes]]:
    """Frames of 32-block BlockStored events whose blocks are all distinct."""
    frames = []
    per_event = 32
    parents: list[int | None] = [None] * workers
    for n in range(blocks // per_event):
        worker = n % workers
        raw = array("I", rng.randbytes(4 * per_event * block_size))
        tokens = [t % 128_000 for t in raw]
        hashes = [rng.getrandbits(64) for _ in range(per_event)]
        ev = BlockStored(hashes, parents[worker], tokens, block_size, medium="GPU")
        parents[worker] = hashes[-1] if n % 8 else None
        frames.append((worker, encode_batch([ev], time.time(), 0)))
    return frames


def _time_ingest(frames: list[tuple[int, bytes]], workers: int, block_size: int) -> tuple:
    gc.collect()
    start = time.perf_counter()
    index = _ingest(frames, workers, block_size)
    return index, time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    result = measure(
        workers=args.workers,
        blocks_per_worker=args.blocks_per_worker,
        block_size=args.block_size,
        prompt_tokens=args.prompt_tokens,
        queries=args.queries,
        seed=args.seed,
        traced_memory=not args.no_traced_memory,
    )
    print(json.dumps(result, indent=2))
    return 0 if result["agree_with_naive"] else 1


def measure(
    *,
    workers: int = 64,
    blocks_per_worker: int = 16384,
    block_size: int = 16,
    prompt_tokens: int = 8192,
    queries: int = 2000,
    seed: int = 7,
    traced_memory: bool = True,
) -> dict[str, Any]:
    if prompt_tokens % block_size:
        raise SystemExit("--prompt-tokens must be a multiple of --block-size")
    t0 = time.perf_counter()
    _progress(f"generating the workload: {workers} workers x {blocks_per_worker} blocks")
    wl: Workload = generate(
        workers=workers,
        capacity=blocks_per_worker,
        block_size=block_size,
        prompt_blocks=prompt_tokens // block_size,
        seed=seed,
    )
    frames = [(w, encode_batch(events, float(i), 0)) for i, (w, events) in enumerate(wl.batches)]
    stored = wl.stored_blocks()
    removed = sum(len(ev.block_hashes) for _, evs in wl.batches for ev in evs) - stored
    _progress(
        f"{len(frames)} frames, {stored} stored and {removed} removed blocks, "
        f"{sum(len(f) for _, f in frames) / 1e6:.1f} MB ({time.perf_counter() - t0:.1f} s)"
    )
    naive = NaiveIndex()
    for w, cache in enumerate(wl.caches):
        naive.add(w, (b.key for b in cache.lru.values()))
    # find_matches gets a prompt's block hashes as epp.hashing.block_hashes returns them.
    prompts = [(array("Q", hashes), keys) for hashes, keys in (wl.query() for _ in range(queries))]
    unique = _unique_frames(workers, block_size, min(stored, 262_144), random.Random(seed))
    unique_blocks = sum(32 for _ in unique)
    del wl.batches
    gc.collect()
    gc.freeze()  # the workload's own objects are not the index's business

    _progress("ingest: all-new blocks")
    _, unique_s = _time_ingest(unique, workers, block_size)
    gc.collect()
    _progress("ingest: the workload's event stream")
    rss_before = _rss_bytes()
    index, ingest_s = _time_ingest(frames, workers, block_size)
    gc.collect()
    rss_after = _rss_bytes()
    worker_blocks = index.worker_block_count
    if index.rejected:
        raise SystemExit(f"the index rejected workload events: {dict(index.rejected)}")

    _progress(f"queries: {queries} prompts of {prompt_tokens} tokens, kvpick vs naive")
    ours: list[float] = []
    theirs: list[float] = []
    agree = True
    clock = time.perf_counter_ns
    for hashes, keys in prompts:
        a = clock()
        got = index.find_matches(hashes)
        b = clock()
        expected = naive.find_matches(keys)
        c = clock()
        ours.append((b - a) / 1000)
        theirs.append((c - b) / 1000)
        agree = agree and got.depths == expected
    ours.sort()
    theirs.sort()
    matched = statistics.mean(len(index.find_matches(h).depths) for h, _ in prompts[:200])

    _progress("hashing 8,192 tokens")
    rng = random.Random(seed)
    tokens = [rng.randrange(128_000) for _ in range(8192)]
    keys_us = _median_us(lambda: sequence_hashes(tokens, block_size), 300)
    hashes_us = _median_us(lambda: block_hashes(tokens, block_size), 300)

    traced = None
    if traced_memory:
        _progress("memory: re-ingesting under tracemalloc")
        del index
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        traced_index = _ingest(frames, workers, block_size)
        gc.collect()
        traced = (tracemalloc.get_traced_memory()[0] - base) / traced_index.worker_block_count
        tracemalloc.stop()
        nodes = traced_index.node_count
        runs = traced_index.run_count
    else:
        nodes = index.node_count
        runs = index.run_count

    result: dict[str, Any] = {
        "ingest_blocks_per_s": round(stored / ingest_s),
        "ingest_unique_blocks_per_s": round(unique_blocks / unique_s),
        "query_p50_us": round(_pct(ours, 0.5), 1),
        "query_p99_us": round(_pct(ours, 0.99), 1),
        "naive_query_p50_us": round(_pct(theirs, 0.5), 1),
        "naive_query_p99_us": round(_pct(theirs, 0.99), 1),
        "speedup_vs_naive": round(_pct(theirs, 0.5) / _pct(ours, 0.5), 1),
        "hash_8k_tokens_us": round(keys_us, 1),
        "block_hashes_8k_tokens_us": round(hashes_us, 1),
        "bytes_per_block": round((rss_after - rss_before) / worker_blocks, 1),
        "bytes_per_block_traced": None if traced is None else round(traced, 1),
        "agree_with_naive": agree,
        "workload": {
            "workers": workers,
            "blocks_per_worker": blocks_per_worker,
            "block_size": block_size,
            "prompt_tokens": prompt_tokens,
            "queries": queries,
            "frames": len(frames),
            "stored_blocks": stored,
            "removed_blocks": removed,
            "worker_blocks": worker_blocks,
            "distinct_blocks": nodes,
            "runs": runs,
            "sharing": round(worker_blocks / nodes, 2),
            "mean_workers_matched_per_query": round(matched, 1),
            "ingest_seconds": round(ingest_s, 2),
        },
        "machine": {
            "python": platform.python_version(),
            "compiled_helpers": native.NATIVE,
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
    }
    result["targets"] = {
        name: {"target": f"{op} {bound}", "met": _meets(result[name], op, bound)}
        for name, (op, bound) in TARGETS.items()
    }
    _progress(f"done in {time.perf_counter() - t0:.1f} s")
    return result


def _meets(value: float, op: str, bound: float) -> bool:
    return value >= bound if op == ">=" else value <= bound


def _median_us(fn, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        a = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - a) / 1000)
    return statistics.median(samples)
