"""Storage tiers of a KV block, and the engines' medium names that map onto them.

Engines say where a block lives with a free-form ``medium`` string (vLLM ``GPU``/``CPU``/
``STORAGE``; SGLang ``GPU``/``CPU_PINNED``/``DISK``/``EXTERNAL``; others per
specs/kv-events.md §9.5). kvpick keeps the engine's string and also maps it onto four tiers,
ordered from fastest to slowest; the scheduler gives each tier its own overlap credit.
"""

from __future__ import annotations

import logging
from enum import IntEnum

log = logging.getLogger(__name__)


class Tier(IntEnum):
    """Where a cached block lives, fastest first. The value is also the tier's bit index."""

    DEVICE = 0
    HOST = 1
    DISK = 2
    EXTERNAL = 3


ALL_TIERS = tuple(Tier)

_MEDIUM_TIERS: dict[str, Tier] = {
    "GPU": Tier.DEVICE,
    "DEVICE": Tier.DEVICE,
    "CPU": Tier.HOST,
    "CPU_PINNED": Tier.HOST,
    "CPU_TIER1": Tier.HOST,
    "HOST": Tier.HOST,
    "CPU_TIER2": Tier.DISK,
    "DISK": Tier.DISK,
    "NVME": Tier.DISK,
    "STORAGE": Tier.DISK,
    "EXTERNAL": Tier.EXTERNAL,
    "NETWORK": Tier.EXTERNAL,
    "REMOTE": Tier.EXTERNAL,
    "SHARED": Tier.EXTERNAL,
}
_warned: set[str] = set()


def tier_of_medium(medium: str | None) -> Tier:
    """Map an engine's medium name to a tier.

    ``None`` (the engine did not say) is the engine's own cache: :attr:`Tier.DEVICE`, for
    stores and removals alike. An unknown name maps to the slowest tier,
    :attr:`Tier.EXTERNAL`, so that a block is never credited more than it may be worth;
    the first occurrence of each unknown name is logged.
    """
    if medium is None:
        return Tier.DEVICE
    tier = _MEDIUM_TIERS.get(medium) or _MEDIUM_TIERS.get(medium.upper())
    if tier is not None:
        return tier
    if medium not in _warned and len(_warned) < 64:
        _warned.add(medium)
        log.warning("unknown KV block medium %r: treating it as the external tier", medium)
    return Tier.EXTERNAL
