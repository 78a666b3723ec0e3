"""The scheduler: from a request and its candidates to a :class:`Decision`.

Built once from an :class:`~epp.scheduling.config.EndpointPickerConfig`, then
:meth:`Scheduler.schedule` runs per request:

1. **No candidates** → :class:`SchedulingError` 503 ``no ready endpoint``.
2. **Mode.** Candidates with role ``prefill`` are prefill-only workers; ``decode``, ``both``
   (and llm-d's ``prefill-decode``) can decode. When both kinds are present the request is
   *disaggregated*: the prefill profile runs over the prefill workers (KV-aware, with full
   overlap credit), and the decode profile over the decode-capable ones with every
   kv-aware overlap credit forced to 0 (Dynamo's gateway mode: the decode worker receives
   the KV cache from the prefill worker, so its own cached prefix saves nothing). With no
   prefill workers the request is *aggregated* over the decode-capable ones. Prefill
   workers without any decode-capable worker → 503 with that reason; candidates of other
   roles only (e.g. ``encode``) → 503 too.
3. **Shedding.** A sheddable request (priority < 0) is refused with 429 when every
   candidate of a stage it needs (the decode side, and in disaggregated mode also the
   prefill side) is saturated according to some ``utilization-detector`` or
   ``busy-detector`` declared in the config. Requests with priority >= 0 are never shed.
4. **Each profile:** its filters in order (each drops saturated candidates but never all),
   then the weighted sum of its scorers (each rating clamped to [0, 1], weight default 1),
   then its picker, which returns ``max(1 + fallbacks, maxNumOfEndpoints)`` targets (fewer
   when there are fewer candidates), primary first.

Every candidate a profile considered gets a :class:`~epp.scheduling.types.Score`: its total,
its kv-aware cost when a ``kv-aware-scorer`` ran (the first one, if several), and each
scorer's rating in ``parts`` under the plugin's name. A candidate a filter removed keeps a
score of 0.0 with ``parts == {"filtered:<filter name>": 1.0}``, so the decision log shows
why it lost.

Cost per request: O(candidates) per filter and scorer plus the picker's sort; no state
changes except the round-robin counter. :meth:`Scheduler.after_pick` runs the post-schedule
hooks (the approximate prefix index records the pick).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from epp.scheduling.config import (
    DEFAULT_POLICY,
    EndpointPickerConfig,
    PluginSpec,
    make_plugin,
    preset_config,
)
from epp.scheduling.filters import Filter
from epp.scheduling.pickers import Picker
from epp.scheduling.scorers import Scorer
from epp.scheduling.types import (
    Candidate,
    ProfileResult,
    SchedulingError,
    SchedulingRequest,
    Score,
    Worker,
)

Mode = Literal["aggregated", "disaggregated"]

PREFILL_ROLES = frozenset({"prefill"})
DECODE_ROLES = frozenset({"decode", "both", "prefill-decode"})


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a request goes. ``decode`` is the aggregated pick in aggregated mode, the
    decode side in disaggregated mode; ``prefill`` is set exactly in disaggregated mode."""

    mode: Mode
    decode: ProfileResult
    prefill: ProfileResult | None = None

    @property
    def primary(self) -> Candidate:
        """The worker the gateway sends the request to (the decode side's first target)."""
        return self.decode.targets[0]


class _Profile:
    """A built scheduling profile: filters, weighted scorers, one picker."""

    __slots__ = ("filters", "name", "picker", "scorers")

    def __init__(
        self,
        name: str,
        filters: list[tuple[str, Filter]],
        scorers: list[tuple[str, Scorer, float]],
        picker: Picker,
    ) -> None:
        self.name = name
        self.filters = filters
        self.scorers = scorers
        self.picker = picker

    def for_decode(self) -> _Profile:
        """The profile for the decode side of a disaggregated request (kv-aware scorers
        without overlap credit; every other plugin shared)."""
        return _Profile(
            self.name,
            self.filters,
            [(name, scorer.for_decode(), weight) for name, scorer, weight in self.scorers],
            self.picker,
        )

    def run(
        self,
        req: SchedulingRequest,
        candidates: list[Candidate],
        fallbacks: int,
        rng: random.Random,
    ) -> ProfileResult:
        dropped: list[Score] = []
        for name, filt in self.filters:
            kept = filt.filter(req, candidates)
            if len(kept) != len(candidates):
                kept_ids = {id(c) for c in kept}
                marker = "filtered:" + name
                dropped.extend(
                    Score(c.worker, 0.0, None, {marker: 1.0})
                    for c in candidates
                    if id(c) not in kept_ids
                )
            candidates = kept

        n = len(candidates)
        totals = [0.0] * n
        parts: list[dict[str, float]] = [{} for _ in range(n)]
        costs: list[float] | None = None
        for name, scorer, weight in self.scorers:
            ratings, scorer_costs = scorer.score_with_costs(req, candidates)
            if scorer_costs is not None and costs is None:
                costs = scorer_costs
            ratings = [0.0 if r < 0.0 else 1.0 if r > 1.0 else r for r in ratings]
            for row, rating in zip(parts, ratings, strict=True):
                row[name] = rating
            totals = [t + weight * r for t, r in zip(totals, ratings, strict=True)]

        count = max(1 + fallbacks, self.picker.max_endpoints)
        picked = self.picker.pick(candidates, totals, count, rng)
        cost_column: Sequence[float | None] = costs if costs is not None else [None] * n
        scores = [
            Score(c.worker, total, cost, row)
            for c, total, cost, row in zip(candidates, totals, cost_column, parts, strict=True)
        ]
        scores.extend(dropped)
        return ProfileResult(self.name, [candidates[i] for i in picked], scores)

    def after_pick(self, req: SchedulingRequest, worker: Worker) -> None:
        for _, scorer, _ in self.scorers:
            scorer.after_pick(req, worker)


class Scheduler:
    """Scheduling policy built from an EndpointPickerConfig; see the module docstring.

    Plugins are instantiated once here and keep their state (the approximate prefix
    index, the round-robin position) for the scheduler's life.
    """

    def __init__(
        self,
        config: EndpointPickerConfig | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config if config is not None else preset_config(DEFAULT_POLICY)
        self._rng = rng if rng is not None else random.Random()
        plugins: dict[str, Any] = {spec.name: make_plugin(spec) for spec in self.config.plugins}
        self._plugins = plugins
        self._detectors: list[Filter] = [p for p in plugins.values() if isinstance(p, Filter)]
        profiles = {
            spec.name: self._build_profile(spec.name, spec.plugins, plugins)
            for spec in self.config.profiles
        }
        self._aggregated = profiles[self.config.aggregated_profile]
        self._prefill = profiles[self.config.prefill_profile]
        self._decode = profiles[self.config.decode_profile].for_decode()

    @classmethod
    def from_preset(
        cls,
        name: str = DEFAULT_POLICY,
        overrides: dict[str, Any] | None = None,
        *,
        rng: random.Random | None = None,
    ) -> Scheduler:
        """A scheduler for the ``--policy`` preset ``name`` with flag ``overrides``."""
        return cls(preset_config(name, overrides), rng=rng)

    @staticmethod
    def _build_profile(name: str, refs: Sequence[Any], plugins: dict[str, Any]) -> _Profile:
        filters: list[tuple[str, Filter]] = []
        scorers: list[tuple[str, Scorer, float]] = []
        picker: Picker | None = None
        for ref in refs:
            plugin = plugins[ref.plugin_ref]
            if isinstance(plugin, Filter):
                filters.append((ref.plugin_ref, plugin))
            elif isinstance(plugin, Scorer):
                scorers.append((ref.plugin_ref, plugin, ref.weight))
            elif isinstance(plugin, Picker):
                picker = plugin
        # The config guarantees one picker per profile.
        assert picker is not None, f"profile {name!r} has no picker"
        return _Profile(name, filters, scorers, picker)

    def plugin(self, name: str) -> Any:
        """The plugin instance named ``name`` in the config (KeyError when none)."""
        return self._plugins[name]

    def plugin_spec(self, name: str) -> PluginSpec:
        """The config entry of the plugin named ``name``."""
        return self.config.plugin(name)

    def schedule(
        self,
        req: SchedulingRequest,
        candidates: Sequence[Candidate],
        *,
        fallbacks: int = 0,
        rng: random.Random | None = None,
    ) -> Decision:
        """Decide where ``req`` goes (see the module docstring for the steps).

        Raises :class:`SchedulingError` with status 503 (no usable endpoint) or 429 (a
        sheddable request while its stage is saturated). Every target returned is one of
        ``candidates``.
        """
        if not candidates:
            raise SchedulingError("no ready endpoint", 503)
        if rng is None:
            rng = self._rng
        prefill: list[Candidate] = []
        decode: list[Candidate] = []
        for c in candidates:
            if c.role in DECODE_ROLES:
                decode.append(c)
            elif c.role in PREFILL_ROLES:
                prefill.append(c)
        if not decode:
            if prefill:
                raise SchedulingError(
                    f"no decode-capable endpoint: all {len(prefill)} ready endpoints "
                    "are prefill-only",
                    503,
                )
            roles = ", ".join(sorted({c.role for c in candidates}))
            raise SchedulingError(f"no ready endpoint can serve requests (roles: {roles})", 503)

        if req.priority < 0 and self._detectors:
            self._shed_if_saturated(decode, "decode-capable" if prefill else "")
            if prefill:
                self._shed_if_saturated(prefill, "prefill")

        if not prefill:
            return Decision("aggregated", self._aggregated.run(req, decode, fallbacks, rng))
        prefill_result = self._prefill.run(req, prefill, fallbacks, rng)
        decode_result = self._decode.run(req, decode, fallbacks, rng)
        return Decision("disaggregated", decode_result, prefill_result)

    def _shed_if_saturated(self, candidates: list[Candidate], stage: str) -> None:
        detectors = self._detectors
        for c in candidates:
            if not any(d.saturated(c) for d in detectors):
                return
        what = f"{stage} endpoints" if stage else "endpoints"
        raise SchedulingError(
            f"sheddable request dropped: all {len(candidates)} {what} are saturated", 429
        )

    def after_pick(
        self,
        req: SchedulingRequest,
        decision: Decision,
        *,
        served: Worker | None = None,
    ) -> None:
        """Post-schedule hooks: tell each profile's scorers where ``req`` went.

        ``served`` replaces the decode side's primary when the gateway reported serving
        the request from another endpoint (its retries moved it).
        """
        worker = served if served is not None else decision.primary.worker
        if decision.prefill is None:
            self._aggregated.after_pick(req, worker)
            return
        self._decode.after_pick(req, worker)
        self._prefill.after_pick(req, decision.prefill.targets[0].worker)

    def remove_worker(self, worker: Worker) -> None:
        """Forget a worker in every plugin that keeps per-worker state."""
        for plugin in self._plugins.values():
            if isinstance(plugin, Scorer):
                plugin.remove_worker(worker)
