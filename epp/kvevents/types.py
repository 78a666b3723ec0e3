"""Engine-neutral KV cache events, as every codec produces them and the index consumes them.

Whatever the engine (vLLM's two msgpack shapes, SGLang's variant, TensorRT-LLM's JSON), a
decoded batch is an :class:`EventBatch` of :class:`BlockStored`, :class:`BlockRemoved` and
:class:`AllBlocksCleared`. Engine block hashes are normalised to unsigned 64-bit integers
(:func:`engine_hash`), so that the same block announced as a signed int, an unsigned int or a
32-byte digest compares equal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from epp.tiers import Tier, tier_of_medium

U64_MASK = (1 << 64) - 1

_decode_token_list = msgspec.msgpack.Decoder(list[int]).decode


class EventError(ValueError):
    """An event (or a whole batch) that cannot be used.

    ``reason`` is a short fixed label (it becomes a Prometheus label value); the message
    says what exactly was wrong.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def engine_hash(value: int | bytes) -> int:
    """Normalise an engine block hash to an unsigned 64-bit integer.

    Ints are taken modulo 2**64 (SGLang's signed int64 hashes become their two's complement,
    as Dynamo does). Bytes are read as vLLM derives its integer form from a digest: the last
    eight bytes, big-endian.
    """
    if value.__class__ is int:
        return value & U64_MASK
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        if not raw:
            raise EventError("bad_event", "empty block hash")
        return int.from_bytes(raw[-8:], "big")
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value) & U64_MASK
    raise EventError("bad_event", f"block hash must be an int or bytes, got {type(value).__name__}")


def engine_hashes(values: list[int | bytes]) -> list[int]:
    """Normalise a list of engine block hashes, each an int or bytes (see :func:`engine_hash`).

    This is the pure-Python path; the msgpack decoder normally does this in C
    (:func:`epp.native.u64s`).
    """
    return [engine_hash(v) for v in values]


@dataclass(slots=True)
class BlockStored:
    """Blocks that became full and cached, in order: each block's parent is the one before it.

    ``block_hashes`` are normalised engine hashes: a list, or an ``array('Q')`` as the
    msgpack decoder gives them. ``token_ids`` holds ``block_size`` ids per block. Decoders
    may leave them undecoded in ``token_ids_msgpack`` (the original msgpack array);
    :meth:`tokens` decodes on first use, so blocks the index already knows never pay for
    token decoding.
    """

    block_hashes: Sequence[int]
    parent_hash: int | None = None
    token_ids: list[int] | None = None
    block_size: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    lora_id: int | None = None
    cache_salt: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    token_ids_msgpack: bytes | msgspec.Raw | None = None

    @property
    def tier(self) -> Tier:
        return tier_of_medium(self.medium)

    def tokens(self) -> list[int]:
        """The token ids of all blocks, decoded on first call.

        Raises :class:`EventError` when they are missing or not a list of integers.
        """
        if self.token_ids is None:
            raw = self.token_ids_msgpack
            if raw is None:
                raise EventError("missing_token_ids", "BlockStored carries no token ids")
            try:
                self.token_ids = _decode_token_list(raw)
            except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                raise EventError("bad_token_ids", str(exc)) from None
            self.token_ids_msgpack = None
        return self.token_ids


@dataclass(slots=True)
class BlockRemoved:
    """Blocks evicted from ``medium`` (``None``: the engine's own device cache)."""

    block_hashes: Sequence[int]
    medium: str | None = None
    group_idx: int | None = None

    @property
    def tier(self) -> Tier:
        return tier_of_medium(self.medium)


@dataclass(slots=True)
class AllBlocksCleared:
    """The engine dropped its whole prefix cache (e.g. ``POST /reset_prefix_cache``)."""


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(slots=True)
class EventBatch:
    """One engine scheduler step's events, with the problems met while decoding it.

    ``rejected`` lists ``(reason, detail)`` for each event that could not be decoded and was
    left out; the other events are still usable.
    """

    ts: float
    events: list[KvEvent]
    dp_rank: int | None = None
    rejected: list[tuple[str, str]] = field(default_factory=list)
