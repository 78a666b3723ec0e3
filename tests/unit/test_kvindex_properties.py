"""KvIndex against a brute-force reference model, over random interleavings of events.

The reference knows nothing of runs, bitmasks or kvpick's hashes: a block is identified by
its whole token prefix (a tuple of token blocks from the start of the sequence), each worker
holds a dict {prefix: set of tiers}, and a worker's matched depth on a prompt is found by
checking the prompt's prefixes one by one. Engine hashes are content hashes of the prefix
under a per-worker "scheme" (two schemes, so the same content is sometimes announced under
two different engine hashes).

The documents are built from a tiny alphabet with block size 2, so equal blocks under
different prefixes, shared prefixes, stores under unknown parents, duplicate stores and
removals of blocks that have children all happen constantly.
"""

from __future__ import annotations

import xxhash
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from epp.hashing import block_hashes
from epp.kvevents.types import AllBlocksCleared, BlockRemoved, BlockStored
from epp.kvindex import KvIndex, Overlap

BS = 2
WORKERS = ("w0", "w1", "w2", "w3")
MEDIUMS = (None, "GPU", "CPU", "DISK", "SHARED")
TIER_OF = {None: 0, "GPU": 0, "CPU": 1, "DISK": 2, "SHARED": 3}

Prefix = tuple[tuple[int, ...], ...]


def engine_hash(scheme: int, prefix: Prefix) -> int:
    return xxhash.xxh3_64_intdigest(repr((scheme, prefix)).encode())


class Reference:
    def __init__(self) -> None:
        self.holds: dict[str, dict[Prefix, set[int]]] = {w: {} for w in WORKERS}
        self.retired: list[dict[Prefix, set[int]]] = []
        self.known: dict[int, Prefix] = {}  # engine hash → block

    def exists(self) -> set[Prefix]:
        present: set[Prefix] = set()
        for held in [*self.holds.values(), *self.retired]:
            for prefix in held:
                for k in range(1, len(prefix) + 1):
                    present.add(prefix[:k])
        return present

    def collect(self) -> None:
        present = self.exists()
        self.known = {eh: p for eh, p in self.known.items() if p in present}

    def store(self, worker: str, parent: int | None, hashes: list[int], blocks: Prefix, tier: int):
        if parent is None:
            prefix: Prefix = ()
        elif parent in self.known:
            prefix = self.known[parent]
        else:
            return
        for eh, block in zip(hashes, blocks, strict=True):
            if eh in self.known:
                ident = self.known[eh]
                if ident[:-1] != prefix:
                    break
            else:
                ident = (*prefix, block)
                self.known[eh] = ident  # a new block, or the same content under a second hash
            self.holds[worker].setdefault(ident, set()).add(tier)
            prefix = ident

    def remove(self, worker: str, eh: int, tier: int) -> None:
        ident = self.known.get(eh)
        held = self.holds[worker]
        if ident is None or tier not in held.get(ident, ()):
            return
        held[ident].discard(tier)
        if not held[ident]:
            del held[ident]
        self.collect()

    def retire(self, worker: str) -> None:
        self.retired.append(self.holds[worker])
        self.holds[worker] = {}

    def sweep(self) -> None:
        self.retired.clear()
        self.collect()

    def overlap(self, worker: str, prompt: Prefix) -> Overlap:
        held = self.holds[worker]
        depths = []
        for level in (0, 1, 2, 3):
            d = 0
            while d < len(prompt):
                tiers = held.get(prompt[: d + 1])
                if not tiers or min(tiers) > level:
                    break
                d += 1
            depths.append(d)
        d0, d1, d2, d3 = depths
        return Overlap(d0, d1 - d0, d2 - d1, d3 - d2)


blocks_strategy = st.tuples(st.integers(1, 3), st.integers(1, 3))
docs_strategy = st.lists(
    st.lists(blocks_strategy, min_size=1, max_size=7).map(tuple), min_size=3, max_size=6
)


class IndexMachine(RuleBasedStateMachine):
    @initialize(docs=docs_strategy, schemes=st.lists(st.integers(0, 1), min_size=4, max_size=4))
    def setup(self, docs, schemes) -> None:
        # Make documents share prefixes: each later document extends a prefix of an earlier.
        built: list[Prefix] = [docs[0]]
        for i, doc in enumerate(docs[1:], start=1):
            base = built[i % len(built)]
            built.append(base[: len(doc) % (len(base) + 1)] + doc)
        self.docs = built
        self.scheme = dict(zip(WORKERS, schemes, strict=True))
        self.index = KvIndex(BS)
        for w in WORKERS:
            self.index.add_worker(w)
        self.ref = Reference()

    @rule(
        w=st.sampled_from(WORKERS),
        d=st.integers(0, 100),
        start=st.integers(0, 8),
        length=st.integers(1, 8),
        medium=st.sampled_from(MEDIUMS),
    )
    def store(self, w, d, start, length, medium) -> None:
        doc = self.docs[d % len(self.docs)]
        start = start % len(doc)
        blocks = doc[start : start + length]
        scheme = self.scheme[w]
        parent = None if start == 0 else engine_hash(scheme, doc[:start])
        hashes = [engine_hash(scheme, doc[: start + i + 1]) for i in range(len(blocks))]
        tokens = [t for block in blocks for t in block]
        self.index.apply(w, BlockStored(hashes, parent, tokens, BS, medium=medium))
        self.ref.store(w, parent, hashes, blocks, TIER_OF[medium])

    @rule(
        w=st.sampled_from(WORKERS),
        d=st.integers(0, 100),
        at=st.integers(0, 8),
        scheme=st.integers(0, 1),
        medium=st.sampled_from(MEDIUMS),
    )
    def remove(self, w, d, at, scheme, medium) -> None:
        doc = self.docs[d % len(self.docs)]
        eh = engine_hash(scheme, doc[: at % len(doc) + 1])
        self.index.apply(w, BlockRemoved([eh], medium))
        self.ref.remove(w, eh, TIER_OF[medium])

    @rule(w=st.sampled_from(WORKERS))
    def clear(self, w) -> None:
        self.index.apply(w, AllBlocksCleared())
        self.ref.retire(w)

    @rule(w=st.sampled_from(WORKERS))
    def remove_and_re_add_worker(self, w) -> None:
        self.index.remove_worker(w)
        assert not self.index.has_worker(w)
        assert all(w not in self.index.find_matches(self._hashes(doc)).depths for doc in self.docs)
        self.index.add_worker(w)
        self.ref.retire(w)

    @rule()
    def sweep(self) -> None:
        assert self.index.sweep()
        assert not self.index.needs_sweep
        self.ref.sweep()

    def _hashes(self, prompt: Prefix) -> list[int]:
        return block_hashes([t for block in prompt for t in block], BS)

    @invariant()
    def structure_is_consistent(self) -> None:
        self.index.check_invariants()

    @invariant()
    def matches_agree(self) -> None:
        prompts = set(self.docs)
        for doc in self.docs:
            prompts.add(doc[: max(1, len(doc) // 2)])
            prompts.add((*doc, (3, 3)))
        for prompt in prompts:
            got = self.index.find_matches(self._hashes(prompt))
            for w in WORKERS:
                want = self.ref.overlap(w, prompt)
                assert got.depth(w) == want.depth, (w, prompt, got, want)
                assert got.overlap(w) == want, (w, prompt, got, want)
                assert (w in got.tiered) == (want.device < want.depth)
            assert all(depth > 0 for depth in got.depths.values())

    @invariant()
    def counts_agree(self) -> None:
        for w in WORKERS:
            assert self.index.block_count(w) == len(self.ref.holds[w])

    @invariant()
    def known_hashes_agree(self) -> None:
        # A store naming a parent succeeds exactly when the reference knows the parent.
        for eh, prefix in self.ref.known.items():
            found = self.index._locate(eh)
            assert found is not None, prefix


IndexMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestIndexAgainstReference = IndexMachine.TestCase
