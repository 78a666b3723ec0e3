"""Scheduling: which worker (and, disaggregated, which prefill worker) gets a request.

GAIE-style plugins assembled by an EndpointPickerConfig: filters, weighted scorers and a
picker per profile (:mod:`~epp.scheduling.config`, :mod:`~epp.scheduling.scheduler`).
kvpick's default policy scores every candidate with Dynamo's KV-aware cost
(:mod:`~epp.scheduling.cost`) over the overlap the KV index reports and the load kvpick
booked itself (:mod:`~epp.scheduling.load`).

The director fills in :class:`Candidate` objects (overlap, booked load, new blocks,
metrics), calls :meth:`Scheduler.schedule`, books the pick in :class:`ActiveLoad`, and calls
:meth:`Scheduler.after_pick`.
"""

from epp.scheduling.approx_prefix import ApproxPrefixIndex
from epp.scheduling.config import (
    PRESETS,
    ConfigError,
    EndpointPickerConfig,
    dump_config,
    load_config,
    load_config_file,
    load_scheduler,
    parse_config,
    preset_config,
    preset_text,
    with_overrides,
)
from epp.scheduling.cost import CostBreakdown, CostParams, kv_cost, kv_costs
from epp.scheduling.load import ActiveLoad, Booking
from epp.scheduling.scheduler import Decision, Scheduler
from epp.scheduling.types import (
    Candidate,
    EndpointMetrics,
    LoadView,
    ProfileResult,
    SchedulingError,
    SchedulingRequest,
    Score,
    Worker,
)

__all__ = [
    "PRESETS",
    "ActiveLoad",
    "ApproxPrefixIndex",
    "Booking",
    "Candidate",
    "ConfigError",
    "CostBreakdown",
    "CostParams",
    "Decision",
    "EndpointMetrics",
    "EndpointPickerConfig",
    "LoadView",
    "ProfileResult",
    "Scheduler",
    "SchedulingError",
    "SchedulingRequest",
    "Score",
    "Worker",
    "dump_config",
    "kv_cost",
    "kv_costs",
    "load_config",
    "load_config_file",
    "load_scheduler",
    "parse_config",
    "preset_config",
    "preset_text",
    "with_overrides",
]
