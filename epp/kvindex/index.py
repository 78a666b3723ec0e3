"""The KV block index: which worker holds which prompt blocks, looked up by kvpick block key.

What it answers
    ``find_matches(hashes)`` takes a prompt's kvpick block hashes, in order
    (:func:`epp.hashing.block_hashes` with the request's LoRA/salt seed; not the chained
    sequence hashes), and returns, for every worker holding at least the first block, how
    many leading blocks of the prompt it holds (its *matched prefix depth*), and how that
    prefix splits over storage tiers.

Structure, and why
    * **One compressed radix tree for all workers.** A node (a *run*) is a chain of
      consecutive blocks that the same workers hold in the same tiers, with no branch inside
      it; its children are keyed by their first block's key. Workers serving one model share
      most prefixes (system prompts, documents), so a shared prefix is stored once, and a
      1,000-block conversation held by one worker is one node, not 1,000.
    * **Why runs.** What a Python index can afford per block is a small, fixed number of
      C-level operations and no Python object. With runs, a query walks a handful of nodes
      and compares key slices with ``memcmp`` (keys and engine hashes are ``array('Q')``);
      a worker storing blocks another worker already announced costs one slice comparison
      per run (no token decoding, no hashing: engine hashes are content hashes, so equal
      engine hashes mean equal blocks); and a new block costs one slot in the engine-hash
      map plus two array slots.
    * **Holder sets are bitmasks.** Each worker gets a bit; a run's ``held`` is an int.
      Walking a prompt's path, ``active &= run.held`` leaves exactly the workers that hold
      every block so far, so a block an engine evicted in the middle of a chain (a *hole*)
      ends that worker's match where it should, with no extra bookkeeping.
    * **Engine hashes are a second way in.** ``BlockRemoved`` names blocks by engine hash
      and ``BlockStored`` names its parent by engine hash, so a map
      (:class:`epp.native.U64Map`, 16 bytes a slot) takes every engine hash to its run (the
      offset is found in the run's array). kvpick's own keys are computed from token ids
      only for blocks new to the index, straight from the event's msgpack bytes.
    * **Runs split and merge.** When holders diverge inside a run (a worker stores or evicts
      part of it), the run splits; when neighbours end up with equal holders they merge.
      Both move the shorter side, so eviction in vLLM's order (tail first) costs O(1) per
      block.
    * **Workers leave in O(1).** Clearing or removing a worker retires its bit at once
      (queries mask it out immediately) and gives the worker a fresh bit;
      :meth:`KvIndex.sweep` later scrubs retired bits and frees what nobody holds, a bounded
      number of runs per call, so a worker with a million blocks never stalls the event
      loop.
    * **Tiers.** A run whose holders all hold it on the device (the common case) carries
      no tier data; otherwise it keeps one mask per tier.

Semantics (what the property tests check against a brute-force model)
    * A worker holds a block in a set of tiers; ``BlockStored`` adds the event's tier,
      ``BlockRemoved`` takes it away, and the block is gone for that worker when no tier is
      left. Stores are idempotent.
    * A stored block's parent must be known to the index (held by some worker, or an
      ancestor of a held block); otherwise kvpick cannot compute its key and the event is
      rejected as ``unknown_parent``.
    * A worker's matched depth is the number of leading prompt blocks it holds in any tier.
      :class:`Overlap` splits that prefix by the fastest tier level at which the worker
      holds each block's whole prefix.
    * A block's content announced under a second engine hash (a second hashing scheme in
      the pool, or a multimodal block whose image kvpick's keys cannot see) is the same
      block to the index; the holders of the two are merged.
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from epp import metrics
from epp.hashing import (
    CHAIN_SEED,
    DEFAULT_BLOCK_SIZE,
    block_hashes_packed,
    chain_seed,
    pack_tokens,
)
from epp.kvevents.types import AllBlocksCleared, BlockRemoved, BlockStored, EventError, KvEvent
from epp.native import U64Map, as_u64_array, tokens_u32
from epp.tiers import Tier

Worker = Hashable

_DEVICE = int(Tier.DEVICE)

# vLLM hybrid models announce one group per attention type; kvpick indexes the full
# attention group only (as Dynamo does, specs/kv-events.md §9.5).
_FULL_ATTENTION_KINDS = frozenset({"full_attention", "mla_attention", "sink_full_attention"})


class _Run:
    """A chain of blocks with the same holders and tiers, branching only after its end.

    Invariants: ``keys`` and ``engines`` are parallel and non-empty; ``held`` is the OR of
    ``tiers`` when ``tiers`` is not None (``None``: every holder holds it on the device
    only); ``children`` maps each child's first key to the child, and is None when empty.
    A run stays in the tree while any bit (live or retired) holds it or it has children.
    """

    __slots__ = ("children", "engines", "held", "keys", "parent", "tiers")

    def __init__(
        self,
        keys: array,
        engines: array,
        held: int,
        tiers: list[int] | None,
        parent: _Run | None,
    ) -> None:
        self.keys = keys
        self.engines = engines
        self.held = held
        self.tiers = tiers
        self.parent = parent
        self.children: dict[int, _Run] | None = None


class Overlap(NamedTuple):
    """A worker's matched prefix, in blocks, split by tier.

    Block ``i`` of the prefix counts for the fastest tier ``t`` such that the worker holds
    blocks ``0..i`` all in tiers at least as fast as ``t``. The four counts sum to the
    matched depth.
    """

    device: int
    host: int = 0
    disk: int = 0
    external: int = 0

    @property
    def depth(self) -> int:
        return self.device + self.host + self.disk + self.external


@dataclass(slots=True)
class Matches:
    """Result of :meth:`KvIndex.find_matches`.

    ``depths`` has every worker whose matched depth is at least one block; ``tiered`` has
    the workers among them whose matched prefix is not entirely on the device.
    """

    depths: dict[Worker, int] = field(default_factory=dict)
    tiered: dict[Worker, Overlap] = field(default_factory=dict)

    def depth(self, worker: Worker) -> int:
        return self.depths.get(worker, 0)

    def overlap(self, worker: Worker) -> Overlap:
        found = self.tiered.get(worker)
        if found is not None:
            return found
        return Overlap(self.depths.get(worker, 0))


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two sequences.

    Bisects with slice comparisons, which are one ``memcmp`` each for ``array('Q')``:
    O(log n) C calls instead of boxing every element.
    """
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class KvIndex:
    """Which worker holds which blocks; see the module docstring for structure and semantics.

    Not thread-safe: one event loop owns it. Every method is O(size of its input), plus the
    length of the shorter side of a run it splits or merges, except :meth:`sweep`, which
    does bounded work per call.
    """

    def __init__(self, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if block_size <= 0:
            raise ValueError(f"block size must be positive, got {block_size}")
        self.block_size = block_size
        self._roots: dict[int, _Run] = {}
        self._by_engine = U64Map()  # engine hash -> run
        self._runs: set[_Run] = set()
        # Second engine hashes of blocks already known under another one: alias → canonical,
        # and canonical → aliases (to forget them with the block).
        self._alias: dict[int, int] = {}
        self._aliases_of: dict[int, list[int]] = {}
        # Block-hash seeds of chains started with a cache salt, by the key of the chain's
        # root block: the salt is announced only with a chain's first block, and the blocks
        # below it hash with the same seed.
        self._salted: dict[int, int] = {}
        self._slot_of: dict[Worker, int] = {}
        self._worker_at: dict[int, Worker] = {}
        self._counts: dict[int, int] = {}
        self._live = 0
        self._retired = 0
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._offdevice = 0  # runs with tier data
        self._sweep_bits = 0
        self._sweep_todo: list[_Run] = []
        self.rejected: Counter[str] = Counter()
        """Blocks (or events) dropped, by reason; also exported to Prometheus."""

    # ---------------------------------------------------------------- workers

    def add_worker(self, worker: Worker) -> None:
        """Register a worker (idempotent). Events for unregistered workers are rejected."""
        if worker not in self._slot_of:
            self._assign_slot(worker)

    def remove_worker(self, worker: Worker) -> None:
        """Forget a worker and every block it holds; queries stop seeing it at once."""
        slot = self._slot_of.pop(worker, None)
        if slot is not None:
            self._retire(slot)

    def clear_worker(self, worker: Worker) -> None:
        """Drop every block a worker holds (its cache state is unknown or was reset)."""
        slot = self._slot_of.get(worker)
        if slot is not None:
            self._retire(slot)
            self._assign_slot(worker)

    def workers(self) -> list[Worker]:
        return list(self._slot_of)

    def has_worker(self, worker: Worker) -> bool:
        return worker in self._slot_of

    def block_count(self, worker: Worker) -> int:
        """Blocks the worker holds (in any tier)."""
        slot = self._slot_of.get(worker)
        return 0 if slot is None else self._counts[slot]

    @property
    def worker_block_count(self) -> int:
        """Sum over live workers of the blocks each holds."""
        return sum(self._counts[s] for s in self._worker_at)

    @property
    def node_count(self) -> int:
        """Distinct blocks in the tree (including ones kept only as ancestors)."""
        return len(self._by_engine)

    @property
    def run_count(self) -> int:
        return len(self._runs)

    def _assign_slot(self, worker: Worker) -> None:
        if self._free_slots:
            self._free_slots.sort(reverse=True)
            slot = self._free_slots.pop()
        else:
            slot = self._next_slot
            self._next_slot += 1
        self._slot_of[worker] = slot
        self._worker_at[slot] = worker
        self._counts[slot] = 0
        self._live |= 1 << slot

    def _retire(self, slot: int) -> None:
        bit = 1 << slot
        self._live &= ~bit
        self._retired |= bit
        del self._worker_at[slot]
        del self._counts[slot]

    # ---------------------------------------------------------------- events

    def apply(self, worker: Worker, event: KvEvent) -> None:
        """Apply one engine event from ``worker``. Never raises for bad event content."""
        cls = event.__class__
        if cls is BlockStored:
            self.store(worker, event)  # type: ignore[arg-type]
        elif cls is BlockRemoved:
            self.remove(worker, event)  # type: ignore[arg-type]
        elif cls is AllBlocksCleared:
            self.clear_worker(worker)

    def _reject(self, reason: str, count: int = 1) -> None:
        self.rejected[reason] += count
        metrics.KV_EVENTS_DROPPED.labels(reason).inc(count)

    def _locate(self, eh: int) -> tuple[_Run, int] | None:
        run = self._by_engine.get(eh)
        if run is None:
            if not self._alias:
                return None
            canon = self._alias.get(eh)
            if canon is None:
                return None
            run = self._by_engine.get(canon)
            if run is None:
                return None
            eh = canon
        engines = run.engines
        if engines[-1] == eh:
            return run, len(engines) - 1
        return run, engines.index(eh)

    def store(self, worker: Worker, ev: BlockStored) -> int:
        """Apply a ``BlockStored``; returns how many of its blocks were applied.

        Blocks are applied in order; at the first block that cannot be placed, the rest of
        the event is rejected (a child cannot be placed without its parent).
        """
        total = len(ev.block_hashes)
        if total == 0:
            return 0
        slot = self._slot_of.get(worker)
        if slot is None:
            self._reject("unknown_worker", total)
            return 0
        if (ev.group_idx is not None and ev.group_idx != 0) or (
            ev.kv_cache_spec_kind is not None and ev.kv_cache_spec_kind not in _FULL_ATTENTION_KINDS
        ):
            metrics.KV_EVENTS_IGNORED.labels("other_kv_group").inc(total)
            return 0
        if ev.block_size is not None and ev.block_size != self.block_size:
            self._reject("block_size_mismatch", total)
            return 0
        try:
            hashes = as_u64_array(ev.block_hashes)
        except (OverflowError, TypeError):
            self._reject("bad_block_hash", total)
            return 0
        tier = _DEVICE if ev.medium is None else int(ev.tier)
        prev_eh = ev.parent_hash
        prev: tuple[_Run, int] | None = None
        if prev_eh is not None:
            prev = self._locate(prev_eh)
            if prev is None:
                self._reject("unknown_parent", total)
                return 0

        bit = 1 << slot
        local: array | None = None  # kvpick block hashes from block ``local_from`` on
        local_from = 0
        added = 0
        i = 0
        aliased_at = -1
        while i < total:
            if i:
                prev = self._locate(prev_eh)  # type: ignore[arg-type]
            found = self._locate(hashes[i])
            if found is not None:
                run, off = found
                if not self._follows(run, off, prev):
                    # The engine gives this hash another parent than the index knows: two
                    # different blocks share an engine hash. Keep the first; drop the rest.
                    self._reject("inconsistent_parent", total - i)
                    break
                span = min(len(run.engines) - off, total - i)
                if run.engines[off] != hashes[i]:
                    span = 1  # found through an alias: go block by block
                elif span > 1 and run.engines[off : off + span] != hashes[i : i + span]:
                    span = _common_prefix(run.engines[off : off + span], hashes[i : i + span])
                added += self._hold(run, off, off + span, bit, tier)
                i += span
                prev_eh = hashes[i - 1]
                continue
            if local is None:
                try:
                    local = self._hashes_of(ev, i, total)
                except EventError as exc:
                    self._reject(exc.reason, total - i)
                    break
                local_from = i
            placed = self._insert(prev, local[i - local_from :], hashes, i, bit, tier)
            if placed < 0:
                # The blocks exist under other engine hashes, now registered as aliases.
                if aliased_at == i:
                    self._reject("inconsistent_parent", total - i)
                    break
                aliased_at = i
                if i == 0:
                    prev = self._locate(prev_eh) if prev_eh is not None else None
                continue
            if i == 0 and prev is None and ev.cache_salt:
                self._salted[local[0]] = self._seed_of(ev, None)
            added += placed
            i += placed
            if i < total:
                self._reject("duplicate_block_hash", total - i)
            break
        self._counts[slot] += added
        return i

    def _follows(self, run: _Run, off: int, prev: tuple[_Run, int] | None) -> bool:
        """Whether the block at (run, off) comes right after ``prev`` in the tree."""
        if off > 0:
            return prev is not None and prev[0] is run and prev[1] == off - 1
        parent = run.parent
        if parent is None:
            return prev is None
        return prev is not None and prev[0] is parent and prev[1] == len(parent.keys) - 1

    def _seed_of(self, ev: BlockStored, parent: _Run | None) -> int:
        """The block-hash seed of the event's chain.

        A cache salt is announced with a chain's first block only; blocks further down the
        chain hash with the seed recorded for the chain's root.
        """
        if parent is not None:
            if self._salted:
                while parent.parent is not None:
                    parent = parent.parent
                salted = self._salted.get(parent.keys[0])
                if salted is not None:
                    return salted
        elif ev.cache_salt:
            return chain_seed(ev.lora_name, ev.cache_salt)
        return chain_seed(ev.lora_name) if ev.lora_name else CHAIN_SEED

    def _hashes_of(self, ev: BlockStored, start: int, count: int) -> array:
        """kvpick block hashes of the event's blocks ``start..count-1``.

        Raises :class:`EventError` when the token ids are missing, malformed or of the
        wrong length.
        """
        size = self.block_size
        raw = ev.token_ids_msgpack
        # Straight from the wire into packed u32 when the decoder kept the msgpack array:
        # no Python int per token.
        ids = raw if ev.token_ids is None and raw is not None else ev.tokens()
        try:
            packed = tokens_u32(ids) if ids is raw else pack_tokens(ids)
        except ValueError as exc:
            raise EventError("bad_token_ids", str(exc)) from None
        if len(packed) != 4 * count * size:
            raise EventError(
                "token_count_mismatch",
                f"{len(packed) // 4} token ids for {count} blocks of {size}",
            )
        if start:
            packed = packed[4 * start * size :]
        parent = None
        if ev.parent_hash is not None:
            found = self._locate(ev.parent_hash)
            parent = None if found is None else found[0]
        return block_hashes_packed(packed, size, self._seed_of(ev, parent))

    def _insert(
        self,
        prev: tuple[_Run, int] | None,
        keys: array,
        hashes: array,
        start: int,
        bit: int,
        tier: int,
    ) -> int:
        """Add the event's blocks from ``start`` on (``keys`` are their kvpick block hashes)
        as new blocks held by ``bit``.

        Returns how many were added, or -1 when the first one turned out to exist under
        other engine hashes (the hashes are then registered as aliases, and the caller
        treats the blocks as known).
        """
        if prev is None:
            parent = None
            siblings = self._roots
        else:
            parent, off = prev
            if off != len(parent.keys) - 1:
                parent = self._split(parent, off + 1)[0]
            siblings = parent.children
        first = keys[0]
        existing = siblings.get(first) if siblings else None
        if existing is not None:
            span = _common_prefix(existing.keys, keys)
            for j in range(span):
                self._add_alias(hashes[start + j], existing.engines[j])
            return -1

        new_keys = keys
        new_engines = hashes[start:]
        tiers = None
        if tier != _DEVICE:
            tiers = [0, 0, 0, 0]
            tiers[tier] = bit
        if (
            parent is not None
            and parent.children is None
            and parent.held == bit
            and parent.tiers == tiers
        ):
            # The blocks continue a run with the same holders: extend it in place.
            target = parent
            old_len = len(target.keys)
            target.keys.extend(new_keys)
            target.engines.extend(new_engines)
        else:
            target = _Run(new_keys, new_engines, bit, tiers, parent)
            old_len = 0
            if tiers is not None:
                self._offdevice += 1
            if parent is None:
                self._roots[first] = target
            elif parent.children is None:
                parent.children = {first: target}
            else:
                parent.children[first] = target
            self._add_run(target)

        # insert_new stops at the first engine hash that is already known or repeated
        # within the event: the blocks before it are kept, the rest are dropped.
        good = self._by_engine.insert_new(new_engines, target)
        if good == len(new_engines):
            return good
        del target.keys[old_len + good :]
        del target.engines[old_len + good :]
        if not target.keys:
            self._forget(target)
        return good

    def _add_alias(self, eh: int, canon: int) -> None:
        if eh == canon or eh in self._alias:
            return
        self._alias[eh] = canon
        self._aliases_of.setdefault(canon, []).append(eh)

    def remove(self, worker: Worker, ev: BlockRemoved) -> int:
        """Apply a ``BlockRemoved``; returns how many blocks the worker stopped holding."""
        hashes = ev.block_hashes
        slot = self._slot_of.get(worker)
        if slot is None:
            if hashes:
                self._reject("unknown_worker", len(hashes))
            return 0
        if ev.group_idx is not None and ev.group_idx != 0:
            metrics.KV_EVENTS_IGNORED.labels("other_kv_group").inc(len(hashes))
            return 0
        bit = 1 << slot
        tier = _DEVICE if ev.medium is None else int(ev.tier)
        gone = 0
        unknown = 0
        for eh in hashes:
            found = self._locate(eh)
            if found is None:
                unknown += 1
                continue
            result = self._release(found[0], found[1], bit, tier)
            if result < 0:
                unknown += 1
            else:
                gone += result
        if unknown:
            self._reject("unknown_block", unknown)
        self._counts[slot] -= gone
        return gone

    # ---------------------------------------------------------------- run surgery

    def _state_has(self, run: _Run, bit: int, tier: int) -> bool:
        tiers = run.tiers
        if tiers is None:
            return tier == _DEVICE and bool(run.held & bit)
        return bool(tiers[tier] & bit)

    def _hold(self, run: _Run, start: int, end: int, bit: int, tier: int) -> int:
        """``bit`` holds blocks [start, end) of ``run`` in ``tier``; returns how many it did
        not hold in any tier before."""
        if start >= end or self._state_has(run, bit, tier):
            return 0
        if end < len(run.keys):
            run = self._split(run, end)[0]
        if start > 0:
            run = self._split(run, start)[1]
        newly = 0 if run.held & bit else len(run.keys)
        tiers = run.tiers
        if tiers is None:
            if tier == _DEVICE:
                run.held |= bit
            else:
                run.tiers = tiers = [run.held, 0, 0, 0]
                tiers[tier] = bit
                run.held |= bit
                self._offdevice += 1
        else:
            tiers[tier] |= bit
            run.held |= bit
        self._coalesce(run)
        return newly

    def _release(self, run: _Run, off: int, bit: int, tier: int) -> int:
        """``bit`` stops holding block ``off`` of ``run`` in ``tier``.

        Returns 1 if it no longer holds the block in any tier, 0 if it still does, -1 if it
        did not hold it in that tier.
        """
        if not self._state_has(run, bit, tier):
            return -1
        last = len(run.keys) - 1
        if (
            off == last
            and run.held == bit
            and run.tiers is None
            and run.children is None
            and last > 0
        ):
            # Eviction in vLLM's order: the tail block of a run only this worker holds.
            run.keys.pop()
            eh = run.engines.pop()
            del self._by_engine[eh]
            if self._aliases_of:
                self._forget_block_extras([eh])
            return 1
        if off < last:
            run = self._split(run, off + 1)[0]
        if off > 0:
            run = self._split(run, off)[1]
        tiers = run.tiers
        if tiers is None:
            run.held &= ~bit
        else:
            tiers[tier] &= ~bit
            still = (tiers[0] | tiers[1] | tiers[2] | tiers[3]) & bit
            if not still:
                run.held &= ~bit
            if not (tiers[1] | tiers[2] | tiers[3]):
                run.tiers = None  # every remaining holder is on the device
                self._offdevice -= 1
            if still:
                self._coalesce(run)
                return 0
        if run.held == 0 and run.children is None:
            self._free(run)
        else:
            self._coalesce(run)
        return 1

    def _split(self, run: _Run, off: int) -> tuple[_Run, _Run]:
        """Cut ``run`` before block ``off`` (0 < off < len); returns (head, tail).

        The shorter side moves to a new run, so the cost is O(min(off, len - off)).
        """
        if not 0 < off < len(run.keys):
            raise ValueError(f"cannot split a run of {len(run.keys)} blocks at {off}")
        tiers = run.tiers
        if 2 * off >= len(run.keys):
            tail = _Run(run.keys[off:], run.engines[off:], run.held, None, run)
            if tiers is not None:
                tail.tiers = list(tiers)
                self._offdevice += 1
            children = run.children
            if children is not None:
                tail.children = children
                for child in children.values():
                    child.parent = tail
            run.children = {tail.keys[0]: tail}
            del run.keys[off:]
            del run.engines[off:]
            self._point(tail.engines, tail)
            self._add_run(tail)
            return run, tail
        head = _Run(run.keys[:off], run.engines[:off], run.held, None, run.parent)
        if tiers is not None:
            head.tiers = list(tiers)
            self._offdevice += 1
        siblings = run.parent.children if run.parent is not None else self._roots
        siblings[head.keys[0]] = head  # type: ignore[index]
        del run.keys[:off]
        del run.engines[:off]
        head.children = {run.keys[0]: run}
        run.parent = head
        self._point(head.engines, head)
        self._add_run(head)
        return head, run

    def _add_run(self, run: _Run) -> None:
        self._runs.add(run)
        if self._sweep_bits and run.held & self._sweep_bits:
            # Split off a run the current sweep has not reached: it must be swept too.
            self._sweep_todo.append(run)

    def _point(self, engines: array, run: _Run) -> None:
        """Make each of ``engines`` map to ``run``."""
        self._by_engine.assign(engines, run)

    @staticmethod
    def _mergeable(run: _Run, child: _Run) -> bool:
        return run.held == child.held and run.tiers == child.tiers

    def _merge_down(self, run: _Run) -> _Run:
        """Fuse ``run`` with its only child when they have the same holders and tiers."""
        children = run.children
        if children is None or len(children) != 1:
            return run
        (child,) = children.values()
        if not self._mergeable(run, child):
            return run
        if len(run.keys) >= len(child.keys):
            survivor, gone = run, child
            run.keys.extend(child.keys)
            run.engines.extend(child.engines)
            run.children = child.children
            if run.children is not None:
                for grandchild in run.children.values():
                    grandchild.parent = run
            self._point(child.engines, run)
        else:
            survivor, gone = child, run
            child.keys[:0] = run.keys
            child.engines[:0] = run.engines
            child.parent = run.parent
            siblings = run.parent.children if run.parent is not None else self._roots
            siblings[child.keys[0]] = child  # type: ignore[index]
            self._point(run.engines, child)
        if gone.tiers is not None:
            self._offdevice -= 1
        self._runs.discard(gone)
        return survivor

    def _coalesce(self, run: _Run) -> None:
        run = self._merge_down(run)
        parent = run.parent
        if parent is not None and parent.children is not None and len(parent.children) == 1:
            self._merge_down(parent)

    def _free(self, run: _Run) -> None:
        """Remove a run nobody holds and that has no children, then its parents likewise."""
        while run.held == 0 and run.children is None:
            parent = run.parent
            siblings = parent.children if parent is not None else self._roots
            if siblings is not None and siblings.get(run.keys[0]) is run:
                del siblings[run.keys[0]]
                if parent is not None and not siblings:
                    parent.children = None
            self._forget(run)
            if parent is None:
                return
            run = parent
        self._coalesce(run)

    def _forget(self, run: _Run) -> None:
        """Drop a detached run's engine hashes and bookkeeping."""
        self._by_engine.discard_if(run.engines, run)
        self._forget_block_extras(run.engines)
        if run.parent is None and self._salted:
            self._salted.pop(run.keys[0], None)
        if run.tiers is not None:
            self._offdevice -= 1
            run.tiers = None
        self._runs.discard(run)
        run.parent = None
        run.children = None

    def _forget_block_extras(self, engines: Sequence[int]) -> None:
        if self._aliases_of:
            for eh in engines:
                for alias in self._aliases_of.pop(eh, ()):
                    self._alias.pop(alias, None)

    # ---------------------------------------------------------------- sweeping

    @property
    def needs_sweep(self) -> bool:
        """True while retired worker bits still sit in runs (see :meth:`sweep`)."""
        return bool(self._retired)

    def sweep(self, budget: int | None = None) -> bool:
        """Scrub retired worker bits from up to ``budget`` runs (all when None).

        Returns True when nothing is left to sweep. Retired bits never affect queries; this
        only reclaims memory and makes their slots reusable.
        """
        if not self._sweep_bits:
            if not self._retired:
                return True
            self._sweep_bits = self._retired
            self._sweep_todo = list(self._runs)
        keep = ~self._sweep_bits
        todo = self._sweep_todo
        runs = self._runs
        for _ in range(len(todo) if budget is None else min(budget, len(todo))):
            run = todo.pop()
            if run not in runs or (run.held & keep) == run.held:
                continue
            run.held &= keep
            if run.tiers is not None:
                tiers = [t & keep for t in run.tiers]
                run.tiers = tiers
                if not (tiers[1] | tiers[2] | tiers[3]):
                    run.tiers = None
                    self._offdevice -= 1
            if run.held == 0 and run.children is None:
                self._free(run)
        if todo:
            return False
        swept = self._sweep_bits
        self._retired &= ~swept
        self._sweep_bits = 0
        while swept:
            low = swept & -swept
            self._free_slots.append(low.bit_length() - 1)
            swept ^= low
        return not self._retired

    # ---------------------------------------------------------------- queries

    def find_matches(self, keys: Sequence[int]) -> Matches:
        """Per worker, how many leading blocks of the prompt it holds (see :class:`Matches`).

        ``keys`` are the prompt's block hashes (:func:`epp.hashing.block_hashes`): the tree
        encodes each block's prefix by its position, so the chained hashes are not needed.
        """
        result = Matches()
        n = len(keys)
        if n == 0:
            return result
        run = self._roots.get(keys[0])
        if run is None:
            return result
        keys = as_u64_array(keys)
        active = self._live
        tiered = self._offdevice > 0
        levels = [active, active, active]
        level_drops: list[tuple[int, int, int]] = []
        drops: list[tuple[int, int]] = []
        pos = 0
        while True:
            held = run.held & active
            if held != active:
                drops.append((active & ~held, pos))
                active = held
                if not active:
                    break
            run_keys = run.keys
            length = len(run_keys)
            end = pos + length
            if end > n:
                end = n
                length = n - pos
                run_keys = run_keys[:length]
            matched = length
            if length > 1 and run_keys != keys[pos:end]:
                matched = _common_prefix(run_keys, keys[pos:end])
            if tiered:
                self._level_step(run, active, levels, level_drops, pos)
            pos += matched
            if pos >= n or matched < len(run.keys):
                break
            children = run.children
            if children is None:
                break
            run = children.get(keys[pos])  # type: ignore[assignment]
            if run is None:
                break
        if active:
            drops.append((active, pos))

        depths = result.depths
        worker_at = self._worker_at
        for mask, depth in drops:
            if depth:
                while mask:
                    low = mask & -mask
                    depths[worker_at[low.bit_length() - 1]] = depth
                    mask ^= low
        if level_drops:
            self._tier_split(drops, level_drops, result)
        return result

    @staticmethod
    def _level_step(
        run: _Run, active: int, levels: list[int], drops: list[tuple[int, int, int]], pos: int
    ) -> None:
        tiers = run.tiers
        if tiers is None:
            for lvl in range(3):
                levels[lvl] &= active
            return
        through = tiers[0]
        for lvl in range(3):
            if lvl:
                through |= tiers[lvl]
            current = levels[lvl] & active
            kept = current & through
            if kept != current:
                drops.append((lvl, current & ~kept, pos))
            levels[lvl] = kept

    def _tier_split(
        self,
        drops: list[tuple[int, int]],
        level_drops: list[tuple[int, int, int]],
        out: Matches,
    ) -> None:
        depth_of: dict[int, int] = {}
        for mask, depth in drops:
            while mask:
                low = mask & -mask
                depth_of[low] = depth
                mask ^= low
        level_depth: dict[int, list[int]] = {}
        for lvl, mask, pos in level_drops:
            while mask:
                low = mask & -mask
                mask ^= low
                if low in depth_of:
                    d = depth_of[low]
                    level_depth.setdefault(low, [d, d, d])[lvl] = min(pos, d)
        worker_at = self._worker_at
        for low, (d0, d1, d2) in level_depth.items():
            depth = depth_of[low]
            d1 = max(d0, d1)
            d2 = max(d1, d2)
            out.tiered[worker_at[low.bit_length() - 1]] = Overlap(d0, d1 - d0, d2 - d1, depth - d2)

    # ---------------------------------------------------------------- checking

    def check_invariants(self) -> None:
        """Raise AssertionError if the tree's structure is inconsistent (tests use this)."""
        seen: set[int] = set()
        stack = [(None, run) for run in self._roots.values()]
        reached = 0
        for key, run in self._roots.items():
            assert run.keys[0] == key and run.parent is None
        while stack:
            parent, run = stack.pop()
            reached += 1
            assert run in self._runs, "run not registered"
            assert run.parent is parent, "wrong parent pointer"
            assert run.keys and len(run.keys) == len(run.engines)
            if run.tiers is not None:
                t = run.tiers
                assert run.held == t[0] | t[1] | t[2] | t[3]
                assert t[1] | t[2] | t[3], "tier data on a device-only run"
            assert run.held or run.children, "unheld leaf run left in the tree"
            for eh in run.engines:
                assert self._by_engine.get(eh) is run, "engine hash not mapped to its run"
                assert eh not in seen
                seen.add(eh)
            if run.children is not None:
                assert run.children
                for key, child in run.children.items():
                    assert child.keys[0] == key
                    stack.append((run, child))
        assert reached == len(self._runs), (reached, len(self._runs))
        assert len(seen) == len(self._by_engine)
        assert self._offdevice == sum(1 for r in self._runs if r.tiers is not None)
