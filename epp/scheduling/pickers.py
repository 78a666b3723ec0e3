"""Picker plugins: turn a profile's total scores into targets, best first.

``pick(candidates, scores, count, rng)`` returns ``min(count, len(candidates))`` distinct
candidate indexes in preference order: the primary target, then the fallbacks the gateway
tries in order. All randomness comes from the ``rng`` passed in, so a seeded generator
reproduces a decision exactly.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence

from epp.scheduling.scorers import min_max
from epp.scheduling.types import Candidate


class Picker(ABC):
    """A picking plugin. ``max_endpoints`` is the least number of targets it returns
    (GAIE's ``maxNumOfEndpoints``); the scheduler asks for more when it wants fallbacks."""

    type_name: str = ""

    def __init__(self, *, max_endpoints: int = 1) -> None:
        if max_endpoints < 1:
            raise ValueError(f"maxNumOfEndpoints must be >= 1, got {max_endpoints}")
        self.max_endpoints = max_endpoints

    @abstractmethod
    def pick(
        self,
        candidates: Sequence[Candidate],
        scores: Sequence[float],
        count: int,
        rng: random.Random,
    ) -> list[int]:
        """``min(count, len(candidates))`` distinct indexes into ``candidates``, best first."""


def _by_score(indexes: Sequence[int], scores: Sequence[float], rng: random.Random) -> list[int]:
    """``indexes`` by descending score, equal scores in uniformly random order."""
    return sorted(indexes, key=lambda i: (-scores[i], rng.random()))


class MaxScorePicker(Picker):
    """``max-score-picker`` (GAIE): highest total score first, ties broken uniformly at
    random.

    kvpick extension ``temperature`` (default 0): when > 0 the primary is sampled with
    ``p_i ∝ exp(−(1 − s'_i) / T)``, where ``s'`` is the total score min-max normalised onto
    [0, 1] (uniform when all scores are equal). With ``kv-aware-scorer`` alone, ``1 − s'`` is
    the min-max normalised cost, so this is exactly Dynamo's softmax. The fallbacks after a
    sampled primary are the remaining candidates by descending score.
    """

    type_name = "max-score-picker"

    def __init__(self, *, max_endpoints: int = 1, temperature: float = 0.0) -> None:
        super().__init__(max_endpoints=max_endpoints)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.temperature = temperature

    def pick(
        self,
        candidates: Sequence[Candidate],
        scores: Sequence[float],
        count: int,
        rng: random.Random,
    ) -> list[int]:
        n = len(candidates)
        count = min(count, n)
        if count <= 0:
            return []
        if self.temperature > 0.0:
            primary = self._sample(scores, rng)
            if count == 1:
                return [primary]
            rest = [i for i in range(n) if i != primary]
            return [primary, *_by_score(rest, scores, rng)[: count - 1]]
        if count == 1:
            best = max(scores)
            ties = [i for i, s in enumerate(scores) if s == best]
            return [ties[0] if len(ties) == 1 else rng.choice(ties)]
        return _by_score(range(n), scores, rng)[:count]

    def _sample(self, scores: Sequence[float], rng: random.Random) -> int:
        normalised = min_max(scores, lower_is_better=False)
        inv_t = 1.0 / self.temperature
        weights = [math.exp((s - 1.0) * inv_t) for s in normalised]
        # The best candidate has weight exp(0) = 1, so the total is >= 1 and never
        # underflows, however small the temperature.
        u = rng.random() * sum(weights)
        acc = 0.0
        for i, w in enumerate(weights):
            acc += w
            if u < acc:
                return i
        return len(weights) - 1  # u landed on the rounding slack at the very top


class RandomPicker(Picker):
    """``random-picker`` (GAIE): uniformly random targets, ignoring scores."""

    type_name = "random-picker"

    def pick(
        self,
        candidates: Sequence[Candidate],
        scores: Sequence[float],
        count: int,
        rng: random.Random,
    ) -> list[int]:
        return rng.sample(range(len(candidates)), min(count, len(candidates)))


class RoundRobinPicker(Picker):
    """``round-robin-picker`` (kvpick): cycles over the candidates sorted by worker,
    ignoring scores.

    The n-th pick starts at position ``n mod len(candidates)`` of the sorted list and its
    fallbacks are the following positions, so over a fixed candidate set each worker is the
    primary once every ``len(candidates)`` picks, in worker order.
    """

    type_name = "round-robin-picker"

    def __init__(self, *, max_endpoints: int = 1) -> None:
        super().__init__(max_endpoints=max_endpoints)
        self._next = 0

    def pick(
        self,
        candidates: Sequence[Candidate],
        scores: Sequence[float],
        count: int,
        rng: random.Random,
    ) -> list[int]:
        n = len(candidates)
        count = min(count, n)
        if count <= 0:
            return []
        order = sorted(range(n), key=lambda i: candidates[i].worker)
        start = self._next % n
        self._next += 1
        return [order[(start + k) % n] for k in range(count)]


class WeightedRandomPicker(Picker):
    """``weighted-random-picker`` (GAIE): a weighted sample without replacement, weights =
    total scores (A-Res: each candidate draws ``u^(1/w)`` and the largest keys win).

    A candidate with weight <= 0 comes after every positively weighted one, in random order
    among its kind.
    """

    type_name = "weighted-random-picker"

    def pick(
        self,
        candidates: Sequence[Candidate],
        scores: Sequence[float],
        count: int,
        rng: random.Random,
    ) -> list[int]:
        n = len(candidates)
        count = min(count, n)
        if count <= 0:
            return []
        keys: list[tuple[float, float, int]] = []
        for i, w in enumerate(scores):
            # log(u^(1/w)) = log(u)/w orders like u^(1/w) without underflowing for small w;
            # 1 - random() is in (0, 1], so the log is defined.
            key = math.log(1.0 - rng.random()) / w if w > 0 else -math.inf
            keys.append((key, rng.random(), i))
        keys.sort(reverse=True)
        return [i for _, _, i in keys[:count]]
