"""One simulated engine core (one data-parallel rank): a continuous-batching scheduler over
a :class:`~workers.sim.kv_cache.KvCache`, stepping on the timing model's clock.

Each step, in vLLM's order: running sequences that are decoding get one token each; running
sequences still prefilling get a chunk of what is left of the budget; then waiting requests
are admitted first come first served while there is room (``max_num_seqs``), budget
(``max_num_batched_tokens``) and cache blocks. A decoding sequence that finds no free block
preempts the most recently admitted other sequence, which goes back to the front of the
queue and is recomputed later (vLLM's recompute preemption).

A sequence's tokens are its prompt followed by what it generated. After a step, a sequence
whose every token has KV samples its next token: deterministic pseudo-random ids seeded by
the request. Full blocks are cached and announced as they fill; the step's events go out as
one batch through the publisher, as vLLM publishes once per scheduler step.

A sequence whose prompt KV lives on a prefill engine (``remote``, decode role) is admitted
with blocks for its whole prompt but computes nothing: it waits in :attr:`Engine.loading`
while the engine's :class:`KvLoader` moves the missing blocks, then :meth:`Engine.finish_load`
either marks every prompt token but the last computed (vLLM recomputes the last one to get
its logits) or, when the load failed, leaves the sequence to compute its prompt itself
(vLLM's ``recompute`` load-failure policy) or fails it (``fail``). A loading sequence holds
no place among the ``max_num_seqs`` running ones; once loaded it queues again at the head,
with its blocks, as vLLM reschedules a request whose remote KV has arrived.

Guarantees: a sequence's blocks are released exactly once (finish, abort or preemption), or
handed to the caller as a lease (``hold_blocks``), which releases them through
:meth:`Engine.release_lease`. Blocks of a sequence aborted while loading are released only
when its load ends, so a transfer never writes into blocks that were given to another.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import xxhash

from epp.kvevents.types import KvEvent
from workers.sim import timing
from workers.sim.engine_hash import BlockHasher, HashAlgo
from workers.sim.kv_cache import KvCache, SeqKv

log = logging.getLogger(__name__)


class RequestRejected(Exception):
    """A request the engine will not take; ``status`` is the HTTP status vLLM answers."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class KvLoader(Protocol):
    """Moves a decode sequence's prompt KV from the prefill engine (the decode side of the
    KV connector)."""

    def start_load(self, engine: Engine, seq: Sequence_, local_hits: int) -> None:
        """Begin loading the prompt blocks after the first ``local_hits`` (which this engine
        had cached) into ``seq.kv.blocks``; call :meth:`Engine.finish_load` when done,
        whatever the outcome."""

    def abandon(self, remote: Any) -> None:
        """A request whose KV is at ``remote`` ended before its load began (or was never
        taken): tell the prefill engine to free its lease now rather than at expiry."""


@dataclass(slots=True)
class EngineConfig:
    num_blocks: int = 2048
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None  # None: the whole cache
    max_waiting: int = 1024
    speedup: float = 1.0
    hash_algo: HashAlgo = "sha256_cbor"
    vocab_size: int = 32000
    token_id_floor: int = 0  # sampled ids are in [token_id_floor, vocab_size)
    load_failure_policy: Literal["recompute", "fail"] = "recompute"

    @property
    def context_limit(self) -> int:
        cache_tokens = self.num_blocks * self.block_size
        return min(self.max_model_len or cache_tokens, cache_tokens)


@dataclass(eq=False)
class Sequence_:
    """One request inside the engine."""

    request_id: str
    prompt_len: int
    tokens: list[int]
    max_tokens: int
    rng: random.Random
    arrival: float
    hold_blocks: bool = False
    remote: Any = None  # where the prompt's KV is (decode role) until it is loaded
    kv: SeqKv = field(default_factory=SeqKv)
    prompt_digests: list[bytes] = field(default_factory=list)
    num_computed: int = 0
    cached_tokens: int | None = None
    first_token_at: float | None = None
    finish_reason: str | None = None
    out: asyncio.Queue[int | None] = field(default_factory=asyncio.Queue)
    state: str = "waiting"  # waiting | loading | running | done
    error: str | None = None  # why the request failed (finish_reason "error")

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def request_rng(prompt: Sequence[int], seed: int | None) -> random.Random:
    """The generator of a request's output ids: from ``seed`` when given, else from the
    prompt, so that the same request always gets the same completion."""
    if seed is not None:
        return random.Random(seed)
    h = xxhash.xxh3_64()
    h.update(len(prompt).to_bytes(8, "little"))
    for t in prompt:
        h.update(t.to_bytes(8, "little", signed=True))
    return random.Random(h.intdigest())


@dataclass(slots=True)
class StepStats:
    steps: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    ttft: list[float] = field(default_factory=list)  # drained by the metrics collector


class Engine:
    """One data-parallel rank (see the module docstring)."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        rank: int = 0,
        publish: Callable[[list[KvEvent]], Any] | None = None,
        loader: KvLoader | None = None,
    ) -> None:
        self.config = config
        self.rank = rank
        self.hasher = BlockHasher(config.block_size, config.hash_algo)
        self.cache = KvCache(config.num_blocks, config.block_size, self.hasher)
        self._publish = publish
        self.loader = loader
        self.loading: dict[str, Sequence_] = {}
        self.waiting: deque[Sequence_] = deque()
        self.running: list[Sequence_] = []
        self._by_id: dict[str, Sequence_] = {}
        self._leases: dict[str, Sequence_] = {}
        self._wake = asyncio.Event()
        self.stats = StepStats()

    # ------------------------------------------------------------ requests

    def submit(
        self,
        request_id: str,
        prompt: Sequence[int],
        max_tokens: int,
        *,
        seed: int | None = None,
        hold_blocks: bool = False,
        remote: Any = None,
    ) -> Sequence_:
        """Queue a request; raises :class:`RequestRejected` (400 too long, 503 queue full).
        ``remote`` (decode role) says where the prompt's KV is; the engine's loader
        fetches it."""
        cfg = self.config
        if remote is not None and self.loader is None:
            raise RequestRejected(400, "this engine cannot load remote KV (not --role decode)")
        if not prompt:
            raise RequestRejected(400, "the prompt is empty")
        if max_tokens < 1:
            raise RequestRejected(400, f"max_tokens must be at least 1, got {max_tokens}")
        limit = cfg.context_limit
        if len(prompt) + max_tokens > limit:
            raise RequestRejected(
                400,
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {len(prompt) + max_tokens} tokens ({len(prompt)} in the "
                f"messages, {max_tokens} in the completion). Please reduce the length of "
                "the messages or completion.",
            )
        if len(self.waiting) >= cfg.max_waiting:
            raise RequestRejected(
                503, f"the engine's queue is full ({cfg.max_waiting} requests waiting)"
            )
        if request_id in self._by_id:
            raise RequestRejected(400, f"request id {request_id!r} is already in use")
        seq = Sequence_(
            request_id=request_id,
            prompt_len=len(prompt),
            tokens=list(prompt),
            max_tokens=max_tokens,
            rng=request_rng(prompt, seed),
            arrival=time.monotonic(),
            hold_blocks=hold_blocks,
            remote=remote,
        )
        seq.prompt_digests = self.hasher.digests(seq.tokens)
        self.waiting.append(seq)
        self._by_id[request_id] = seq
        self._wake.set()
        return seq

    def abort(self, request_id: str) -> bool:
        """Stop a request (client gone); its blocks are freed. False if it had finished."""
        seq = self._by_id.pop(request_id, None)
        if seq is None:
            return False
        if seq.state == "running":
            self.running.remove(seq)
        elif seq.state == "waiting":
            self.waiting.remove(seq)
            if seq.remote is not None and self.loader is not None:
                self.loader.abandon(seq.remote)
        loading = seq.state == "loading"
        seq.state = "done"
        if not loading:  # a load in flight still writes into the blocks; finish_load frees
            self.cache.release(seq.kv)
        seq.finish_reason = "abort"
        self.stats.finished["abort"] = self.stats.finished.get("abort", 0) + 1
        seq.out.put_nowait(None)
        self._wake.set()  # freed blocks or a shorter queue may let a waiting request in
        return True

    def abort_all(self) -> int:
        """Abort every request the engine holds (at shutdown); returns how many."""
        ids = list(self._by_id)
        for request_id in ids:
            self.abort(request_id)
        return len(ids)

    def finish_load(self, seq: Sequence_, error: str | None) -> None:
        """End ``seq``'s remote load: ``error`` None means every block arrived and was
        verified. Safe to call for a sequence aborted meanwhile (its blocks are freed now)."""
        self.loading.pop(seq.request_id, None)
        remote, seq.remote = seq.remote, None
        if seq.state == "done":
            self.cache.release(seq.kv)
            self._wake.set()
            return
        if error is None:
            seq.num_computed = seq.prompt_len - 1
            self.cache.commit(seq.kv, seq.tokens, seq.num_computed, seq.prompt_digests)
        elif self.config.load_failure_policy == "fail":
            log.warning("rank %d: request %s failed: KV load from %s: %s",
                        self.rank, seq.request_id, remote, error)  # fmt: skip
            self._by_id.pop(seq.request_id, None)
            seq.state = "done"
            self.cache.release(seq.kv)
            seq.finish_reason = "error"
            seq.error = f"loading the prompt's KV from the prefill engine failed: {error}"
            self.stats.finished["error"] = self.stats.finished.get("error", 0) + 1
            seq.out.put_nowait(None)
            self._wake.set()
            return
        else:
            log.warning("rank %d: request %s recomputes its prompt: KV load from %s: %s",
                        self.rank, seq.request_id, remote, error)  # fmt: skip
        seq.cached_tokens = seq.num_computed
        # Back to the head of the queue, holding its blocks: it runs when there is room,
        # as vLLM reschedules a request whose remote KV has arrived.
        seq.state = "waiting"
        self.waiting.appendleft(seq)
        self._wake.set()

    def release_lease(self, request_id: str) -> bool:
        """Free the blocks a finished ``hold_blocks`` request kept; False if none held."""
        seq = self._leases.pop(request_id, None)
        if seq is None:
            return False
        self.cache.release(seq.kv)
        self._wake.set()
        return True

    def lease_blocks(self, request_id: str) -> list[int]:
        seq = self._leases.get(request_id)
        return list(seq.kv.blocks) if seq is not None else []

    def reset_prefix_cache(self) -> bool:
        ok = self.cache.reset()
        if ok:
            self._flush_events()
        return ok

    @property
    def num_waiting(self) -> int:
        # Loading requests count as waiting, as vLLM's WAITING_FOR_REMOTE_KVS do.
        return len(self.waiting) + len(self.loading)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def load(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.loading)

    # ---------------------------------------------------------------- loop

    async def run(self) -> None:
        """Step until cancelled."""
        while True:
            if not self.running and not self.waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            plan, prefill_tokens, decode_seqs = self._schedule()
            if not plan:
                # Nothing fits (every block held by leases or preempted work): wait for a
                # change instead of spinning.
                self._wake.clear()
                await self._wake.wait()
                continue
            await asyncio.sleep(
                timing.step_seconds(
                    prefill_tokens, decode_seqs, self.cache.usage, self.config.speedup
                )
            )
            self._apply(plan)
            self.stats.steps += 1
            self._flush_events()

    def _flush_events(self) -> None:
        events = self.cache.drain_events()
        if events and self._publish is not None:
            try:
                self._publish(events)
            except Exception:  # the engine keeps serving; subscribers recover by replay
                log.exception("rank %d: publishing %d KV events failed", self.rank, len(events))

    def _schedule(self) -> tuple[list[tuple[Sequence_, int]], int, int]:
        cfg = self.config
        cache = self.cache
        budget = cfg.max_num_batched_tokens
        plan: list[tuple[Sequence_, int]] = []
        prefill_tokens = 0
        decode_seqs = 0
        preempted: set[int] = set()
        decoding = [
            s
            for s in self.running
            if s.first_token_at is not None and s.num_computed == len(s.tokens) - 1
        ]
        for seq in decoding:
            if budget <= 0:
                break
            if seq.state != "running":
                continue  # preempted by an earlier sequence of this step
            while not cache.grow(seq.kv, seq.num_computed + 1):
                victim = self._preempt_one(exclude=seq)
                if victim is None:
                    break
                preempted.add(id(victim))
            else:
                plan.append((seq, 1))
                budget -= 1
                decode_seqs += 1
        scheduled = {id(s) for s, _ in plan}
        for seq in self.running:
            if id(seq) in scheduled or budget <= 0:
                continue
            n = min(len(seq.tokens) - seq.num_computed, budget)
            if n > 0 and cache.grow(seq.kv, seq.num_computed + n):
                plan.append((seq, n))
                budget -= n
                prefill_tokens += n
        bs = cfg.block_size
        # Requests loading remote KV hold no place among the running ones (vLLM's
        # WAITING_FOR_REMOTE_KVS); they queue again when their blocks are in.
        while self.waiting and len(self.running) < cfg.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            if id(seq) in preempted:
                break  # its blocks were just taken back; not in the same step
            total = len(seq.tokens)
            if seq.kv.blocks:
                # Its KV was loaded (or is to be recomputed) into blocks it already holds.
                self.waiting.popleft()
                n = min(total - seq.num_computed, budget)
                seq.state = "running"
                self.running.append(seq)
                plan.append((seq, n))
                budget -= n
                prefill_tokens += n
                continue
            max_hit = (total - 1) // bs  # at least one token is always computed
            hits = cache.match(seq.prompt_digests, max_hit)
            if seq.remote is not None:
                # Blocks for the whole prompt, no compute: the loader fills them.
                if not cache.can_admit(seq.prompt_digests, hits, total):
                    break
                self.waiting.popleft()
                cache.admit(seq.kv, seq.prompt_digests, hits)
                seq.num_computed = hits * bs
                grown = cache.grow(seq.kv, total)
                assert grown, "can_admit promised the blocks"
                seq.state = "loading"
                self.loading[seq.request_id] = seq
                assert self.loader is not None, "submit refuses remote KV without a loader"
                self.loader.start_load(self, seq, hits)
                continue
            n = min(total - hits * bs, budget)
            if not cache.can_admit(seq.prompt_digests, hits, hits * bs + n):
                break
            self.waiting.popleft()
            cache.admit(seq.kv, seq.prompt_digests, hits)
            seq.num_computed = hits * bs
            if seq.cached_tokens is None:
                seq.cached_tokens = hits * bs
            grown = cache.grow(seq.kv, seq.num_computed + n)
            assert grown, "can_admit promised the blocks"
            seq.state = "running"
            self.running.append(seq)
            plan.append((seq, n))
            budget -= n
            prefill_tokens += n
        return plan, prefill_tokens, decode_seqs

    def _preempt_one(self, exclude: Sequence_) -> Sequence_ | None:
        """Send the most recently admitted running sequence other than ``exclude`` back to
        the queue's front, its blocks freed; None when there is no other."""
        for victim in reversed(self.running):
            if victim is exclude:
                continue
            self.running.remove(victim)
            self.cache.release(victim.kv)
            victim.num_computed = 0
            victim.prompt_digests = self.hasher.digests(victim.tokens)
            victim.state = "waiting"
            self.waiting.appendleft(victim)
            self.stats.preemptions += 1
            return victim
        return None

    def _apply(self, plan: list[tuple[Sequence_, int]]) -> None:
        now = time.monotonic()
        for seq, n in plan:
            if seq.state != "running":
                continue  # aborted or preempted while the step ran
            seq.num_computed += n
            if seq.first_token_at is None:
                self.stats.prompt_tokens += n
            self.cache.commit(seq.kv, seq.tokens, seq.num_computed, seq.prompt_digests)
            if seq.num_computed < len(seq.tokens):
                continue
            token = seq.rng.randrange(self.config.token_id_floor, self.config.vocab_size)
            seq.tokens.append(token)
            self.stats.generation_tokens += 1
            if seq.first_token_at is None:
                seq.first_token_at = now
                self.stats.ttft.append(now - seq.arrival)
            seq.out.put_nowait(token)
            if len(seq.tokens) - seq.prompt_len >= seq.max_tokens:
                self._finish(seq, "length")

    def _finish(self, seq: Sequence_, reason: str) -> None:
        self.running.remove(seq)
        seq.state = "done"
        self._by_id.pop(seq.request_id, None)
        seq.finish_reason = reason
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        if seq.hold_blocks:
            self._leases[seq.request_id] = seq
        else:
            self.cache.release(seq.kv)
        self._wake.set()
        seq.out.put_nowait(None)
