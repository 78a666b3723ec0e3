"""TensorRT-LLM JSON KV events -> kvpick events (epp.kvevents.trtllm)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epp.hashing import block_hashes
from epp.kvevents.trtllm import (
    SequenceGap,
    TrtllmConversion,
    TrtllmEventConverter,
    medium_of_level,
)
from epp.kvevents.types import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    EventError,
    engine_hash,
)
from epp.kvindex import KvIndex
from epp.tiers import Tier

BS = 4
WINDOW = 4096
U64 = (1 << 64) - 1

# --------------------------------------------------------------------------------------
# Payload builders: the shapes trtllm-serve's POST /kv_cache_events returns.


def tokens(ids: list[int]) -> list[dict[str, Any]]:
    return [{"type": "unique_token", "token_id": t, "token_extra_id": 0} for t in ids]


def block(block_hash: Any, ids: list[int], level: Any = 0) -> dict[str, Any]:
    return {
        "type": "stored_block",
        "block_hash": block_hash,
        "tokens": tokens(ids),
        "cache_level": level,
        "priority": 35,
        "mm_keys": [],
    }


def item(event_id: Any, data: Any, rank: Any = None, window: Any = WINDOW) -> dict[str, Any]:
    out: dict[str, Any] = {"event_id": event_id, "data": data, "window_size": window}
    if rank is not None:
        out["attention_dp_rank"] = rank
    return out


def stored(event_id: int, blocks: list[Any], parent: Any = None, rank: Any = None) -> dict:
    return item(event_id, {"type": "stored", "parent_hash": parent, "blocks": blocks}, rank)


def removed(event_id: int, hashes: list[Any], rank: Any = None) -> dict:
    return item(event_id, {"type": "removed", "block_hashes": hashes}, rank)


def created(event_id: int) -> dict:
    return item(event_id, {"type": "created", "num_blocks_per_cache_level": [1024, 0]})


def updated(event_id: int, block_hash: int) -> dict:
    data = {
        "type": "updated",
        "block_hash": block_hash,
        "cache_level": {"old_value": 0, "new_value": 1},
        "priority": None,
    }
    return item(event_id, data)


def only_batch(result: TrtllmConversion) -> EventBatch:
    assert len(result.batches) == 1
    return result.batches[0]


# --------------------------------------------------------------------------------------
# stored


def test_stored_full_blocks() -> None:
    conv = TrtllmEventConverter(BS)
    payload = [stored(0, [block(11, [1, 2, 3, 4]), block(12, [5, 6, 7, 8])])]
    result = conv.convert(payload, ts=12.5)
    batch = only_batch(result)
    assert batch.dp_rank == 0
    assert batch.ts == 12.5
    assert batch.rejected == []
    assert result.gaps == []
    assert batch.events == [
        BlockStored([11, 12], None, [1, 2, 3, 4, 5, 6, 7, 8], BS, "GPU"),
    ]
    ev = batch.events[0]
    assert isinstance(ev, BlockStored)
    assert ev.tier is Tier.DEVICE
    assert ev.tokens() == [1, 2, 3, 4, 5, 6, 7, 8]


def test_stored_parent_and_large_unsigned_hashes_kept() -> None:
    big = 9622824665191806685  # >= 2**63, as TensorRT-LLM's v1_block_key produces
    conv = TrtllmEventConverter(BS)
    batch = only_batch(conv.convert([stored(0, [block(big, [9, 9, 9, 9])], parent=U64)]))
    (ev,) = batch.events
    assert isinstance(ev, BlockStored)
    assert ev.block_hashes == [big]
    assert ev.parent_hash == U64


def test_partial_last_block_dropped_and_its_removal_ignored() -> None:
    conv = TrtllmEventConverter(BS)
    blocks = [block(1, [1, 2, 3, 4]), block(2, [5, 6]), block(3, [7, 8, 9, 10])]
    batch = only_batch(conv.convert([stored(0, blocks)]))
    # The walk stops at the partial block: block 3 after it is not announced either.
    assert batch.events == [BlockStored([1], None, [1, 2, 3, 4], BS, "GPU")]
    assert batch.rejected == []
    assert conv.tracked(0) == 1

    batch = only_batch(conv.convert([removed(1, [2, 1])]))
    assert batch.events == [BlockRemoved([1], None)]
    assert batch.rejected == []
    assert conv.tracked(0) == 0  # forgotten once removed

    # Removing only the partial block produces nothing at all.
    conv.convert([stored(2, [block(5, [1, 2, 3])])])
    batch = only_batch(conv.convert([removed(3, [5])]))
    assert batch.events == []
    assert batch.rejected == []


def test_partial_first_block_gives_no_event() -> None:
    conv = TrtllmEventConverter(BS)
    batch = only_batch(conv.convert([stored(0, [block(7, [1])])]))
    assert batch.events == []
    assert batch.rejected == []


def test_block_with_too_many_tokens_rejects_the_event_only() -> None:
    conv = TrtllmEventConverter(BS)
    payload = [
        stored(0, [block(1, [1, 2, 3, 4]), block(2, [1, 2, 3, 4, 5])]),
        stored(1, [block(3, [4, 3, 2, 1])]),
    ]
    batch = only_batch(conv.convert(payload))
    assert batch.events == [BlockStored([3], None, [4, 3, 2, 1], BS, "GPU")]
    assert len(batch.rejected) == 1
    reason, detail = batch.rejected[0]
    assert reason == "block_size_mismatch"
    assert "event 0" in detail and "5 tokens" in detail
    assert conv.last_event_id(0) == 1  # the rejected event still advanced the sequence


def test_rejected_stored_event_leaves_no_partial_state() -> None:
    conv = TrtllmEventConverter(BS)
    # Partial block 9 comes after a bad block, so it must not be remembered.
    bad = stored(0, [block("x", [1, 2, 3, 4]), block(9, [1])])
    conv.convert([bad])
    assert conv.tracked(0) == 0


def test_cache_levels_map_to_media_and_split_events() -> None:
    conv = TrtllmEventConverter(BS)
    blocks = [
        block(1, [1, 1, 1, 1], level=0),
        block(2, [2, 2, 2, 2], level=0),
        block(3, [3, 3, 3, 3], level=1),
        block(4, [4, 4, 4, 4], level=2),
    ]
    batch = only_batch(conv.convert([stored(0, blocks, parent=100)]))
    assert batch.events == [
        BlockStored([1, 2], 100, [1, 1, 1, 1, 2, 2, 2, 2], BS, "GPU"),
        BlockStored([3], 2, [3, 3, 3, 3], BS, "CPU"),
        BlockStored([4], 3, [4, 4, 4, 4], BS, "2"),
    ]
    tiers = [ev.tier for ev in batch.events if isinstance(ev, BlockStored)]
    assert tiers == [Tier.DEVICE, Tier.HOST, Tier.EXTERNAL]

    # TensorRT-LLM's removal names no level: the converter names the one it was stored on.
    batch = only_batch(conv.convert([removed(1, [1, 3, 4])]))
    assert batch.events == [
        BlockRemoved([1], None),
        BlockRemoved([3], "CPU"),
        BlockRemoved([4], "2"),
    ]
    assert conv.tracked(0) == 0


def test_missing_cache_level_is_the_device() -> None:
    conv = TrtllmEventConverter(BS)
    raw = block(1, [1, 2, 3, 4])
    del raw["cache_level"]
    (ev,) = only_batch(conv.convert([stored(0, [raw])])).events
    assert isinstance(ev, BlockStored)
    assert ev.medium is None
    assert ev.tier is Tier.DEVICE


def test_medium_of_level() -> None:
    assert medium_of_level(0) == "GPU"
    assert medium_of_level(1) == "CPU"
    assert medium_of_level(7) == "7"
    assert medium_of_level(None) is None


def test_optional_lora_id_and_cache_salt_passed_through() -> None:
    conv = TrtllmEventConverter(BS)
    raw = block(1, [1, 2, 3, 4])
    raw["lora_id"] = 3
    raw["cache_salt"] = "tenant-a"
    odd = block(2, [5, 6, 7, 8])
    odd["lora_id"] = "three"  # malformed optional fields are ignored, not fatal
    odd["cache_salt"] = 5
    batch = only_batch(conv.convert([stored(0, [raw]), stored(1, [odd])]))
    first, second = batch.events
    assert isinstance(first, BlockStored) and isinstance(second, BlockStored)
    assert (first.lora_id, first.cache_salt) == (3, "tenant-a")
    assert (second.lora_id, second.cache_salt) == (None, None)
    assert batch.rejected == []


# --------------------------------------------------------------------------------------
# removed, created, updated


def test_removed() -> None:
    conv = TrtllmEventConverter(BS)
    batch = only_batch(conv.convert([removed(0, [5, 6, 7])]))
    assert batch.events == [BlockRemoved([5, 6, 7], None)]
    assert batch.events[0].tier is Tier.DEVICE  # type: ignore[union-attr]


def test_removed_empty_list_gives_nothing() -> None:
    conv = TrtllmEventConverter(BS)
    batch = only_batch(conv.convert([removed(0, [])]))
    assert batch.events == []
    assert batch.rejected == []


def test_created_and_updated_ignored() -> None:
    conv = TrtllmEventConverter(BS)
    result = conv.convert([created(0), updated(1, 42)])
    batch = only_batch(result)
    assert batch.events == []
    assert batch.rejected == []
    assert result.ignored == 2
    assert conv.last_event_id(0) == 1


def test_window_size_filter() -> None:
    conv = TrtllmEventConverter(BS, window_size=WINDOW)
    other = stored(0, [block(1, [1, 2, 3, 4])])
    other["window_size"] = 512
    same = stored(1, [block(2, [1, 2, 3, 4])])
    result = conv.convert([other, same])
    assert result.ignored == 1
    assert result.gaps == []  # the filtered item still counted in the sequence
    assert [ev.block_hashes for ev in only_batch(result).events] == [[2]]  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------
# DP ranks, hashes, sequence


def test_attention_dp_rank_routing() -> None:
    conv = TrtllmEventConverter(BS)
    payload = [
        stored(5, [block(1, [1, 2, 3, 4])], rank=1),
        stored(0, [block(2, [1, 2, 3, 4])]),  # no attention_dp_rank: rank 0
        removed(6, [1], rank=1),
        removed(1, [2], rank=0),
    ]
    result = conv.convert(payload)
    assert result.gaps == []  # each rank has its own sequence
    assert [b.dp_rank for b in result.batches] == [1, 0]
    rank1, rank0 = result.batches
    assert rank1.events == [
        BlockStored([1], None, [1, 2, 3, 4], BS, "GPU"),
        BlockRemoved([1], None),
    ]
    assert rank0.events == [
        BlockStored([2], None, [1, 2, 3, 4], BS, "GPU"),
        BlockRemoved([2], None),
    ]
    assert conv.last_event_id(1) == 6
    assert conv.last_event_id(0) == 1
    assert conv.last_event_id(2) is None


def test_partial_hashes_are_per_rank() -> None:
    conv = TrtllmEventConverter(BS)
    conv.convert([stored(0, [block(9, [1, 2])], rank=0)])
    result = conv.convert([removed(0, [9], rank=1), removed(1, [9], rank=0)])
    rank1, rank0 = result.batches
    assert rank1.events == [BlockRemoved([9], None)]  # rank 1 never saw 9 as partial
    assert rank0.events == []


def test_signed_hashes_normalised() -> None:
    conv = TrtllmEventConverter(BS)
    payload = [
        stored(0, [block(-1, [1, 2, 3, 4]), block(-(1 << 63), [5, 6, 7, 8])], parent=-2),
        removed(1, [-1, 3]),
    ]
    batch = only_batch(conv.convert(payload))
    ev, rm = batch.events
    assert isinstance(ev, BlockStored) and isinstance(rm, BlockRemoved)
    assert ev.block_hashes == [U64, 1 << 63]
    assert ev.parent_hash == U64 - 1
    assert rm.block_hashes == [U64, 3]
    assert ev.block_hashes == [engine_hash(-1), engine_hash(-(1 << 63))]


def test_signed_partial_hash_matches_unsigned_removal() -> None:
    conv = TrtllmEventConverter(BS)
    conv.convert([stored(0, [block(-5, [1])])])
    batch = only_batch(conv.convert([removed(1, [(1 << 64) - 5])]))
    assert batch.events == []


def test_forward_gap_clears_at_the_gap_and_keeps_partials() -> None:
    conv = TrtllmEventConverter(BS)
    first = conv.convert([stored(0, [block(1, [1, 2, 3, 4]), block(9, [5])]), created(1)])
    assert first.gaps == []
    result = conv.convert([removed(2, [1]), removed(4, [7]), removed(5, [9])])
    assert result.gaps == [SequenceGap(0, 3, 4)]
    assert not result.gaps[0].restart
    # Order matters: events before the gap, then the clear, then events after it.
    assert only_batch(result).events == [
        BlockRemoved([1], None),
        AllBlocksCleared(),
        BlockRemoved([7], None),
    ]
    assert conv.last_event_id(0) == 5


def test_regression_is_a_restart_and_forgets_partials() -> None:
    conv = TrtllmEventConverter(BS)
    conv.convert([stored(7, [block(9, [1, 2])]), created(8)])
    assert conv.tracked(0) == 1
    result = conv.convert([created(0), removed(1, [9])])
    assert result.gaps == [SequenceGap(0, 9, 0)]
    assert result.gaps[0].restart
    assert conv.tracked(0) == 0
    # After the restart 9 is no longer known as partial: its removal passes through.
    assert only_batch(result).events == [AllBlocksCleared(), BlockRemoved([9], None)]


def test_repeated_event_id_is_a_restart() -> None:
    conv = TrtllmEventConverter(BS)
    result = conv.convert([created(3), created(3)])
    assert result.gaps == [SequenceGap(0, 4, 3)]


def test_first_event_id_of_a_rank_is_accepted() -> None:
    conv = TrtllmEventConverter(BS)
    result = conv.convert([created(1000), created(1001)])
    assert result.gaps == []
    assert only_batch(result).events == []


def test_gap_only_on_the_rank_concerned() -> None:
    conv = TrtllmEventConverter(BS)
    conv.convert([created(0), item(0, {"type": "created"}, rank=1)])
    result = conv.convert([created(1), item(3, {"type": "created"}, rank=1)])
    assert result.gaps == [SequenceGap(1, 1, 3)]
    rank0, rank1 = result.batches
    assert rank0.events == []
    assert rank1.events == [AllBlocksCleared()]


def test_reset_forgets_sequences() -> None:
    conv = TrtllmEventConverter(BS)
    conv.convert([created(0), stored(1, [block(9, [1])])])
    conv.reset()
    assert conv.last_event_id(0) is None
    assert conv.tracked(0) == 0
    assert conv.convert([created(50)]).gaps == []


def test_tracked_hashes_are_capped_oldest_first() -> None:
    conv = TrtllmEventConverter(BS, max_tracked=2)
    conv.convert([stored(i, [block(100 + i, [1])]) for i in range(3)])
    assert conv.tracked(0) == 2
    batch = only_batch(conv.convert([removed(3, [100, 101, 102])]))
    # 100 was evicted from the partial memory, so its removal goes through to the index.
    assert batch.events == [BlockRemoved([100], None)]
    assert conv.tracked(0) == 0


def test_full_store_of_a_hash_forgets_it_as_partial() -> None:
    conv = TrtllmEventConverter(BS)
    conv.convert([stored(0, [block(9, [1, 2])]), stored(1, [block(9, [1, 2, 3, 4])])])
    batch = only_batch(conv.convert([removed(2, [9])]))
    assert batch.events == [BlockRemoved([9], None)]


# --------------------------------------------------------------------------------------
# Payload forms and malformed input


def test_bytes_str_and_list_payloads_agree() -> None:
    payload = [
        stored(0, [block(-3, [1, 2, 3, 4]), block(4, [1])], parent=2),
        removed(1, [4, -3]),
    ]
    text = json.dumps(payload)
    results = [
        TrtllmEventConverter(BS).convert(form, ts=1.0)
        for form in (payload, text, text.encode(), bytearray(text.encode()))
    ]
    assert all(r == results[0] for r in results)
    assert only_batch(results[0]).events[1] == BlockRemoved([U64 - 2], None)


def test_default_timestamp_is_now() -> None:
    import time

    before = time.time()
    batch = only_batch(TrtllmEventConverter(BS).convert([created(0)]))
    assert before <= batch.ts <= time.time()


@pytest.mark.parametrize(
    "payload",
    [b'{"event_id": 1}', "3", b"null", '"events"', {"event_id": 0}, 17, None],
)
def test_non_list_payload_raises_bad_batch(payload: Any) -> None:
    with pytest.raises(EventError) as info:
        TrtllmEventConverter(BS).convert(payload)
    assert info.value.reason == "bad_batch"


@pytest.mark.parametrize(
    "payload",
    [b"", b"[{", b"\xff\xfe[]", "[1,]", b"[" * 100_000, "not json"],
)
def test_invalid_json_raises_bad_json(payload: bytes | str) -> None:
    with pytest.raises(EventError) as info:
        TrtllmEventConverter(BS).convert(payload)
    assert info.value.reason == "bad_json"


GOOD = stored(8, [block(1, [1, 2, 3, 4])])  # follows the bad items' event_id 7

MALFORMED: list[tuple[str, Any, str]] = [
    ("item not an object", [1, 2], "bad_event"),
    ("item is null", None, "bad_event"),
    ("missing event_id", {"data": {"type": "created"}}, "bad_event"),
    ("bool event_id", item(True, {"type": "created"}), "bad_event"),
    ("string event_id", item("7", {"type": "created"}), "bad_event"),
    ("negative event_id", item(-1, {"type": "created"}), "bad_event"),
    ("float event_id", item(7.0, {"type": "created"}), "bad_event"),
    ("string rank", item(7, {"type": "created"}, rank="0"), "bad_event"),
    ("negative rank", item(7, {"type": "created"}, rank=-1), "bad_event"),
    ("missing data", {"event_id": 7}, "bad_event"),
    ("data not an object", item(7, ["stored"]), "bad_event"),
    ("missing type", item(7, {"blocks": []}), "bad_event"),
    ("type not a string", item(7, {"type": ["stored"]}), "bad_event"),
    ("unknown type", item(7, {"type": "evicted"}), "unknown_event_type"),
    ("blocks missing", item(7, {"type": "stored", "parent_hash": None}), "bad_event"),
    ("blocks not a list", item(7, {"type": "stored", "blocks": {}}), "bad_event"),
    ("block not an object", stored(7, [[1, [1, 2, 3, 4]]]), "bad_event"),
    ("string block hash", stored(7, [block("11", [1, 2, 3, 4])]), "bad_event"),
    ("float block hash", stored(7, [block(11.0, [1, 2, 3, 4])]), "bad_event"),
    ("bool block hash", stored(7, [block(True, [1, 2, 3, 4])]), "bad_event"),
    ("missing block hash", stored(7, [block(None, [1, 2, 3, 4])]), "bad_event"),
    ("hash above u64", stored(7, [block(1 << 64, [1, 2, 3, 4])]), "bad_event"),
    ("hash below i64", stored(7, [block(-(1 << 63) - 1, [1, 2, 3, 4])]), "bad_event"),
    ("string parent", stored(7, [block(1, [1, 2, 3, 4])], parent="0"), "bad_event"),
    ("float token id", stored(7, [block(1, [1, 2.0, 3, 4])]), "bad_event"),
    ("bool token id", stored(7, [block(1, [1, False, 3, 4])]), "bad_event"),
    ("string token id", stored(7, [block(1, [1, "2", 3, 4])]), "bad_event"),
    (
        "tokens not a list",
        stored(7, [{"type": "stored_block", "block_hash": 1, "tokens": "abcd"}]),
        "bad_event",
    ),
    (
        "token entry without token_id",
        stored(7, [{"type": "stored_block", "block_hash": 1, "tokens": [{"id": 1}] * 4}]),
        "bad_event",
    ),
    (
        "token entry not an object",
        stored(7, [{"type": "stored_block", "block_hash": 1, "tokens": [1, 2, 3, 4]}]),
        "bad_event",
    ),
    ("bool cache level", stored(7, [block(1, [1, 2, 3, 4], level=True)]), "bad_event"),
    ("negative cache level", stored(7, [block(1, [1, 2, 3, 4], level=-1)]), "bad_event"),
    ("string cache level", stored(7, [block(1, [1, 2, 3, 4], level="GPU")]), "bad_event"),
    ("removed hashes missing", item(7, {"type": "removed"}), "bad_event"),
    ("removed hashes not a list", item(7, {"type": "removed", "block_hashes": 5}), "bad_event"),
    ("removed string hash", removed(7, [1, "2"]), "bad_event"),
    ("removed float hash", removed(7, [1.5]), "bad_event"),
]


@pytest.mark.parametrize(
    ("bad", "reason"),
    [(bad, reason) for _, bad, reason in MALFORMED],
    ids=[name for name, _, _ in MALFORMED],
)
def test_malformed_item_rejected_others_kept(bad: Any, reason: str) -> None:
    conv = TrtllmEventConverter(BS)
    result = conv.convert([bad, GOOD])
    events = [ev for batch in result.batches for ev in batch.events]
    rejected = [r for batch in result.batches for r in batch.rejected]
    assert events == [BlockStored([1], None, [1, 2, 3, 4], BS, "GPU")]
    assert len(rejected) == 1
    assert rejected[0][0] == reason
    assert rejected[0][1]  # a detail says what was wrong


def test_unreadable_rank_reported_in_a_rankless_batch() -> None:
    result = TrtllmEventConverter(BS).convert(["junk", GOOD])
    assert [b.dp_rank for b in result.batches] == [None, 0]
    assert result.batches[0].events == []
    assert result.batches[0].rejected[0][0] == "bad_event"


def test_bad_event_id_does_not_move_the_sequence() -> None:
    conv = TrtllmEventConverter(BS)
    result = conv.convert([created(0), item("x", {"type": "created"}), created(1)])
    assert result.gaps == []
    assert conv.last_event_id(0) == 1


def test_constructor_validates() -> None:
    with pytest.raises(ValueError):
        TrtllmEventConverter(0)
    with pytest.raises(ValueError):
        TrtllmEventConverter(BS, max_tracked=0)


_json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.floats(allow_nan=True)
    | st.text(max_size=6)
)
_json = st.recursive(
    _json_leaf,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=30,
)
_field = st.sampled_from(
    ["event_id", "data", "type", "blocks", "block_hash", "tokens", "token_id", "parent_hash",
     "block_hashes", "cache_level", "attention_dp_rank", "window_size"]
)  # fmt: skip


_SAMPLES = [
    stored(0, [block(1, [1, 2, 3, 4]), block(2, [5])], parent=3, rank=1),
    removed(1, [1, 2]),
    updated(2, 1),
    created(3),
]


def _mutations(draw: st.DrawFn) -> Any:
    """A realistic item with one field somewhere replaced by arbitrary JSON."""
    base = json.loads(json.dumps(draw(st.sampled_from(_SAMPLES))))
    key, value = draw(_field), draw(_json)
    nodes = [base]
    while nodes:
        node = nodes.pop()
        if isinstance(node, dict):
            if key in node:
                node[key] = value
                return base
            nodes.extend(node.values())
        elif isinstance(node, list):
            nodes.extend(node)
    return base


@settings(max_examples=300, deadline=None)
@given(st.lists(st.composite(_mutations)() | _json, max_size=8))
def test_nothing_raises_on_any_list(items: list[Any]) -> None:
    conv = TrtllmEventConverter(BS)
    for _ in range(2):  # twice: the second pass runs against state left by the first
        result = conv.convert(items)
        for batch in result.batches:
            for ev in batch.events:
                if isinstance(ev, BlockStored):
                    assert len(ev.tokens()) == BS * len(ev.block_hashes)
                    assert all(0 <= h <= U64 for h in ev.block_hashes)
                elif isinstance(ev, BlockRemoved):
                    assert all(0 <= h <= U64 for h in ev.block_hashes)


# --------------------------------------------------------------------------------------
# Into the index


def test_converted_events_feed_the_index() -> None:
    bs = 16
    prompt = list(range(1000, 1000 + 3 * bs + 5))  # three full blocks and a partial one
    chunks = [prompt[i : i + bs] for i in range(0, len(prompt), bs)]
    conv = TrtllmEventConverter(bs)
    index = KvIndex(bs)
    index.add_worker("w")

    # The engine stores the prompt in two steps, the second continuing from the first.
    first = conv.convert([stored(0, [block(-11, chunks[0])])])
    second = conv.convert(
        [stored(1, [block(22, chunks[1]), block(33, chunks[2]), block(44, chunks[3])], parent=-11)]
    )
    for result in (first, second):
        for ev in only_batch(result).events:
            index.apply("w", ev)

    keys = block_hashes(prompt, bs)
    assert len(keys) == 3
    assert index.find_matches(keys).depth("w") == 3
    assert index.find_matches(keys[:2]).depth("w") == 2
    assert index.find_matches(block_hashes(list(range(bs)), bs)).depth("w") == 0

    # Evicting the middle block cuts the match there; the partial block's removal is dropped.
    rm = only_batch(conv.convert([removed(2, [22, 44])]))
    assert rm.events == [BlockRemoved([22], None)]
    for ev in rm.events:
        index.apply("w", ev)
    assert index.find_matches(keys).depth("w") == 1
    assert not index.rejected


def test_gap_clear_reaches_the_index() -> None:
    bs = 16
    prompt = list(range(2 * bs))
    conv = TrtllmEventConverter(bs)
    index = KvIndex(bs)
    index.add_worker("w")
    payload = [stored(0, [block(1, prompt[:bs]), block(2, prompt[bs:])]), created(5)]
    for ev in only_batch(conv.convert(payload)).events:
        index.apply("w", ev)
    assert index.find_matches(block_hashes(prompt, bs)).depth("w") == 0
