"""The KV event msgpack codec (epp.kvevents.msgpack_codec) against specs/kv-events.md §2-§5, §8.

Byte compatibility is checked against msgspec structs declared here from the spec's tables
(vLLM 0.33 map shape, vLLM's older array shape, SGLang 0.5.23); decoding is checked against
payloads built with plain ``msgpack``, independently of the encoder under test.
"""

from __future__ import annotations

import random
import tracemalloc
from types import SimpleNamespace
from typing import Any

import msgpack
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epp.kvevents import types as kt
from epp.kvevents.msgpack_codec import decode_batch, encode_batch
from epp.tiers import Tier

U64 = 1 << 64
U64_MAX = U64 - 1
MAX_TOKEN = (1 << 32) - 1

BATCH_REASONS = {"bad_msgpack", "bad_batch"}
EVENT_REASONS = {"bad_msgpack", "bad_event", "unknown_event_type"}
TOKEN_REASONS = {"bad_token_ids", "missing_token_ids"}


def signed64(value: int) -> int:
    """The int64 two's-complement reading of an unsigned 64-bit value (SGLang's hashes)."""
    return value - U64 if value >= 1 << 63 else value


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# ============================================================================================
# Mirrors of the engines' classes, declared from the spec (§2, §3, §4, §5).


# Each family is declared inside a function so that several classes can share the engines'
# class names (tag=True tags an event with its class name).


def _vllm033_classes() -> SimpleNamespace:
    """vLLM 0.33 (map-shaped events, spec §3; batch per §2)."""

    class KVCacheEvent(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
        pass

    class BlockStored(KVCacheEvent):
        block_hashes: list[int | bytes]
        parent_block_hash: int | bytes | None
        token_ids: list[int]
        block_size: int
        lora_id: int | None
        medium: str | None
        lora_name: str | None
        extra_keys: list[Any] | None = None
        group_idx: int | None = None
        kv_cache_spec_kind: str | None = None
        kv_cache_spec_sliding_window: int | None = None
        locality: str | None = None
        ownership: str | None = None
        session_id: str | None = None
        lookahead_token_ids: list[list[int]] | None = None

    class BlockRemoved(KVCacheEvent):
        block_hashes: list[int | bytes]
        medium: str | None
        group_idx: int | None = None
        locality: str | None = None
        ownership: str | None = None

    class AllBlocksCleared(KVCacheEvent):
        pass

    class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
        ts: float
        events: list[Any]
        data_parallel_rank: int | None = None

    return SimpleNamespace(
        BlockStored=BlockStored,
        BlockRemoved=BlockRemoved,
        AllBlocksCleared=AllBlocksCleared,
        Batch=KVEventBatch,
    )


def _vllm_old_classes() -> SimpleNamespace:
    """vLLM before PR #42892 (tagged positional arrays, spec §4)."""

    class KVCacheEvent(msgspec.Struct, array_like=True, tag=True, omit_defaults=True, gc=False):
        pass

    class BlockStored(KVCacheEvent):
        block_hashes: list[int | bytes]
        parent_block_hash: int | bytes | None
        token_ids: list[int]
        block_size: int
        lora_id: int | None
        medium: str | None
        lora_name: str | None
        extra_keys: list[Any] | None = None
        group_idx: int | None = None
        kv_cache_spec_kind: str | None = None
        kv_cache_spec_sliding_window: int | None = None

    class BlockRemoved(KVCacheEvent):
        block_hashes: list[int | bytes]
        medium: str | None
        group_idx: int | None = None

    class AllBlocksCleared(KVCacheEvent):
        pass

    class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
        ts: float
        events: list[Any]
        data_parallel_rank: int | None = None

    return SimpleNamespace(
        BlockStored=BlockStored,
        BlockRemoved=BlockRemoved,
        AllBlocksCleared=AllBlocksCleared,
        Batch=EventBatch,
    )


def _sglang0523_classes() -> SimpleNamespace:
    """SGLang 0.5.23 (map-shaped events, spec §5; batch ``[ts, events, attn_dp_rank]``)."""

    class KVCacheEvent(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
        pass

    class BlockStored(KVCacheEvent):
        block_hashes: list[int]
        parent_block_hash: int | None
        token_ids: list[int]
        block_size: int
        lora_id: int | None
        medium: str | None = None
        cache_salt: str | None = None
        session_id: str | None = None
        lora_name: str | None = None

    class BlockRemoved(KVCacheEvent):
        block_hashes: list[int]
        medium: str | None = None

    class AllBlocksCleared(KVCacheEvent):
        pass

    class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
        ts: float
        events: list[Any]
        attn_dp_rank: int | None = None

    return SimpleNamespace(
        BlockStored=BlockStored,
        BlockRemoved=BlockRemoved,
        AllBlocksCleared=AllBlocksCleared,
        Batch=EventBatch,
    )


Vllm033 = _vllm033_classes()
VllmOld = _vllm_old_classes()
Sglang0523 = _sglang0523_classes()


def test_mirror_tags_are_the_bare_class_names():
    for ns in (Vllm033, VllmOld, Sglang0523):
        for name in ("BlockStored", "BlockRemoved", "AllBlocksCleared"):
            cls = getattr(ns, name)
            assert msgspec.inspect.type_info(cls).tag == name


_mirror_encoder = msgspec.msgpack.Encoder()


def mirror_vllm(events: list[kt.KvEvent], ts: float, dp_rank: int | None, ns: Any) -> bytes:
    out: list[Any] = []
    for ev in events:
        if isinstance(ev, kt.BlockStored):
            out.append(
                ns.BlockStored(
                    block_hashes=list(ev.block_hashes),
                    parent_block_hash=ev.parent_hash,
                    token_ids=list(ev.token_ids),
                    block_size=ev.block_size,
                    lora_id=ev.lora_id,
                    medium=ev.medium,
                    lora_name=ev.lora_name,
                    extra_keys=ev.extra_keys,
                    group_idx=ev.group_idx,
                    kv_cache_spec_kind=ev.kv_cache_spec_kind,
                )
            )
        elif isinstance(ev, kt.BlockRemoved):
            out.append(
                ns.BlockRemoved(
                    block_hashes=list(ev.block_hashes), medium=ev.medium, group_idx=ev.group_idx
                )
            )
        else:
            out.append(ns.AllBlocksCleared())
    return _mirror_encoder.encode(ns.Batch(ts, out, dp_rank))


def mirror_sglang(events: list[kt.KvEvent], ts: float, dp_rank: int | None) -> bytes:
    ns = Sglang0523
    out: list[Any] = []
    for ev in events:
        if isinstance(ev, kt.BlockStored):
            out.append(
                ns.BlockStored(
                    block_hashes=[signed64(h) for h in ev.block_hashes],
                    parent_block_hash=None if ev.parent_hash is None else signed64(ev.parent_hash),
                    token_ids=list(ev.token_ids),
                    block_size=ev.block_size,
                    lora_id=ev.lora_id,
                    medium=ev.medium,
                    cache_salt=ev.cache_salt,
                    lora_name=ev.lora_name,
                )
            )
        elif isinstance(ev, kt.BlockRemoved):
            out.append(
                ns.BlockRemoved(
                    block_hashes=[signed64(h) for h in ev.block_hashes], medium=ev.medium
                )
            )
        else:
            out.append(ns.AllBlocksCleared())
    return _mirror_encoder.encode(ns.Batch(ts, out, dp_rank))


# ============================================================================================
# Strategies for engine-neutral events.

hash_st = st.one_of(
    st.integers(0, U64_MAX), st.sampled_from([0, 1, (1 << 63) - 1, 1 << 63, U64_MAX])
)
medium_st = st.sampled_from([None, "GPU", "CPU", "STORAGE", "CPU_PINNED", "DISK", "EXTERNAL"])
opt_text = st.one_of(st.none(), st.text(max_size=10))
opt_small = st.one_of(st.none(), st.integers(0, 1000))
kind_st = st.sampled_from([None, "full_attention", "mla_attention", "sliding_window"])
ts_st = st.floats(allow_nan=False, allow_infinity=False)
dp_st = st.one_of(st.none(), st.integers(0, 63))
extra_key_st = st.one_of(
    st.tuples(st.just("lora"), st.text(max_size=8), st.text(max_size=8)).map(list),
    st.tuples(st.just("mm"), st.text(max_size=8), st.integers(0, 64)).map(list),
    st.tuples(st.just("prompt_embeds"), st.binary(min_size=32, max_size=32)).map(list),
)


@st.composite
def stored_st(draw, dialect: str = "vllm") -> kt.BlockStored:
    block_size = draw(st.integers(1, 8))
    n = draw(st.integers(1, 4))
    hashes = draw(st.lists(hash_st, min_size=n, max_size=n))
    tokens = draw(
        st.lists(st.integers(0, MAX_TOKEN), min_size=n * block_size, max_size=n * block_size)
    )
    ev = kt.BlockStored(
        hashes,
        parent_hash=draw(st.one_of(st.none(), hash_st)),
        token_ids=tokens,
        block_size=block_size,
        medium=draw(medium_st),
        lora_name=draw(opt_text),
        lora_id=draw(opt_small),
    )
    if dialect == "sglang":
        ev.cache_salt = draw(opt_text)
        return ev
    ev.group_idx = draw(opt_small)
    ev.kv_cache_spec_kind = draw(kind_st)
    if draw(st.booleans()):
        extra: list[Any] = [
            draw(st.one_of(st.none(), st.lists(extra_key_st, max_size=3))) for _ in range(n)
        ]
        salt = draw(opt_text)
        if salt is not None:
            first = extra[0] or []
            extra[0] = [*first, ["cache_salt", salt]]
        ev.extra_keys = extra
        ev.cache_salt = salt
    return ev


@st.composite
def removed_st(draw, dialect: str = "vllm") -> kt.BlockRemoved:
    return kt.BlockRemoved(
        draw(st.lists(hash_st, min_size=1, max_size=4)),
        medium=draw(medium_st),
        group_idx=None if dialect == "sglang" else draw(opt_small),
    )


def events_st(dialect: str = "vllm"):
    one = st.one_of(stored_st(dialect), removed_st(dialect), st.builds(kt.AllBlocksCleared))
    return st.lists(one, max_size=6)


def as_tuple(ev: kt.KvEvent) -> tuple:
    """An event's observable content, tokens decoded."""
    if isinstance(ev, kt.BlockStored):
        return (
            "stored",
            list(ev.block_hashes),
            ev.parent_hash,
            ev.tokens(),
            ev.block_size,
            ev.medium,
            ev.lora_name,
            ev.lora_id,
            ev.cache_salt,
            ev.extra_keys,
            ev.group_idx,
            ev.kv_cache_spec_kind,
        )
    if isinstance(ev, kt.BlockRemoved):
        return ("removed", list(ev.block_hashes), ev.medium, ev.group_idx)
    assert isinstance(ev, kt.AllBlocksCleared)
    return ("cleared",)


# ============================================================================================
# (1) Byte compatibility with the engines' publishers.

SPEC_EXAMPLE = [
    1.5,
    [
        {
            "type": "BlockStored",
            "block_hashes": [18446744073709551611, 123],
            "parent_block_hash": None,
            "token_ids": list(range(1, 33)),
            "block_size": 16,
            "lora_id": None,
            "medium": "GPU",
            "lora_name": None,
            "extra_keys": [None, None],
            "group_idx": 0,
        },
        {"type": "BlockRemoved", "block_hashes": [123], "medium": "GPU", "group_idx": 0},
        {"type": "AllBlocksCleared"},
    ],
    0,
]


def spec_example_events() -> list[kt.KvEvent]:
    return [
        kt.BlockStored(
            [18446744073709551611, 123],
            None,
            list(range(1, 33)),
            16,
            medium="GPU",
            extra_keys=[None, None],
            group_idx=0,
        ),
        kt.BlockRemoved([123], "GPU", 0),
        kt.AllBlocksCleared(),
    ]


def test_spec_example_bytes_match_mirror_and_spec_content():
    events = spec_example_events()
    got = encode_batch(events, 1.5, 0, shape="map")
    assert got == mirror_vllm(spec_example_events(), 1.5, 0, Vllm033)
    # Same content and key order as the spec's example (msgspec's map headers may be wider
    # than plain msgpack's, so compare decoded, order included).
    decoded = msgpack.unpackb(got)
    assert decoded == SPEC_EXAMPLE
    assert [list(ev) for ev in decoded[1]] == [list(ev) for ev in SPEC_EXAMPLE[1]]


def test_map_shape_always_present_fields_are_written_even_when_none():
    ev = kt.BlockStored([5], None, [1, 2], 2)
    decoded = msgpack.unpackb(encode_batch([ev, kt.BlockRemoved([5])], 0.0, 1, shape="map"))
    assert decoded[2] == 1
    stored, removed = decoded[1]
    assert list(stored) == [
        "type",
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
    ]
    assert list(removed) == ["type", "block_hashes", "medium"]


def test_batch_always_has_three_elements():
    for shape in ("map", "array"):
        decoded = msgpack.unpackb(encode_batch([], 2.0, None, shape=shape))
        assert decoded == [2.0, [], None]
    decoded = msgpack.unpackb(encode_batch([], 2.0, None, dialect="sglang"))
    assert decoded == [2.0, [], None]


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(events=events_st("vllm"), ts=ts_st, dp=dp_st)
def test_map_shape_bytes_identical_to_vllm_033(events, ts, dp):
    assert encode_batch(events, ts, dp, shape="map") == mirror_vllm(events, ts, dp, Vllm033)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(events=events_st("vllm"), ts=ts_st, dp=dp_st)
def test_array_shape_bytes_identical_to_old_vllm(events, ts, dp):
    assert encode_batch(events, ts, dp, shape="array") == mirror_vllm(events, ts, dp, VllmOld)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(events=events_st("sglang"), ts=ts_st, dp=dp_st)
def test_sglang_bytes_identical_to_sglang_0523(events, ts, dp):
    assert encode_batch(events, ts, dp, dialect="sglang") == mirror_sglang(events, ts, dp)


def test_array_shape_positions():
    ev = kt.BlockStored(
        [7, 8],
        6,
        [1, 2, 3, 4],
        2,
        medium="CPU",
        lora_name="ad",
        lora_id=3,
        extra_keys=[None, None],
        group_idx=1,
        kv_cache_spec_kind="full_attention",
    )
    decoded = msgpack.unpackb(
        encode_batch(
            [ev, kt.BlockRemoved([9], "GPU", 2), kt.AllBlocksCleared()], 3.0, 4, shape="array"
        )
    )
    assert decoded == [
        3.0,
        [
            [
                "BlockStored",
                [7, 8],
                6,
                [1, 2, 3, 4],
                2,
                3,
                "CPU",
                "ad",
                [None, None],
                1,
                "full_attention",
                None,
            ],
            ["BlockRemoved", [9], "GPU", 2],
            ["AllBlocksCleared"],
        ],
        4,
    ]


def test_sglang_hashes_are_signed_and_none_fields_omitted():
    big = U64_MAX - 4
    ev = kt.BlockStored([big, 5], 1 << 63, [1, 2, 3, 4], 2, lora_id=0, cache_salt="t")
    decoded = msgpack.unpackb(
        encode_batch([ev, kt.BlockRemoved([big])], 1.0, None, dialect="sglang")
    )
    stored, removed = decoded[1]
    assert stored == {
        "type": "BlockStored",
        "block_hashes": [signed64(big), 5],
        "parent_block_hash": signed64(1 << 63),
        "token_ids": [1, 2, 3, 4],
        "block_size": 2,
        "lora_id": 0,
        "cache_salt": "t",
    }
    assert stored["block_hashes"][0] < 0
    assert removed == {"type": "BlockRemoved", "block_hashes": [signed64(big)]}


@pytest.mark.parametrize("kwargs", [{"shape": "tuple"}, {"dialect": "trtllm"}])
def test_encode_rejects_unknown_shape_or_dialect(kwargs):
    with pytest.raises(ValueError):
        encode_batch([], 0.0, 0, **kwargs)


# ============================================================================================
# (2) Decoding payloads built with plain msgpack.


def stored_map(**fields: Any) -> dict:
    ev = {
        "type": "BlockStored",
        "block_hashes": [11, 12],
        "parent_block_hash": 10,
        "token_ids": [1, 2, 3, 4],
        "block_size": 2,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
    }
    ev.update(fields)
    return ev


def stored_array(hashes=(11, 12), parent=10, tokens=(1, 2, 3, 4), block_size=2, medium="GPU"):
    return ["BlockStored", list(hashes), parent, list(tokens), block_size, None, medium, None]


def test_decode_full_vllm_033_map_event():
    ev = stored_map(
        lora_id=2,
        lora_name="ad",
        extra_keys=[[["lora", "ad", "/p"]], None],
        group_idx=1,
        kv_cache_spec_kind="mla_attention",
        kv_cache_spec_sliding_window=None,
        locality="LOCAL",
        ownership="owner",
        session_id="s-1",
        lookahead_token_ids=[[1, 2]],
    )
    batch = decode_batch(pack([4.25, [ev], 3]))
    assert batch.ts == 4.25
    assert batch.dp_rank == 3
    assert batch.rejected == []
    (got,) = batch.events
    assert isinstance(got, kt.BlockStored)
    assert list(got.block_hashes) == [11, 12]
    assert got.parent_hash == 10
    assert got.tokens() == [1, 2, 3, 4]
    assert got.block_size == 2
    assert got.lora_id == 2
    assert got.lora_name == "ad"
    assert got.medium == "GPU"
    assert got.extra_keys == [[["lora", "ad", "/p"]], None]
    assert got.group_idx == 1
    assert got.kv_cache_spec_kind == "mla_attention"
    assert got.cache_salt is None


def test_decode_spec_example():
    batch = decode_batch(pack(SPEC_EXAMPLE))
    assert batch.rejected == []
    assert [as_tuple(e) for e in batch.events] == [as_tuple(e) for e in spec_example_events()]
    assert batch.dp_rank == 0


def test_decode_array_shape_events():
    payload = pack(
        [
            2.0,
            [
                [*stored_array(), [None, None], 0, "full_attention", None],
                ["BlockRemoved", [11], "CPU", 0],
                ["AllBlocksCleared"],
            ],
            1,
        ]
    )
    batch = decode_batch(payload)
    assert batch.rejected == []
    stored, removed, cleared = batch.events
    assert isinstance(stored, kt.BlockStored)
    assert (list(stored.block_hashes), stored.parent_hash, stored.tokens()) == (
        [11, 12],
        10,
        [1, 2, 3, 4],
    )
    assert (stored.block_size, stored.medium, stored.group_idx) == (2, "GPU", 0)
    assert stored.kv_cache_spec_kind == "full_attention"
    assert isinstance(removed, kt.BlockRemoved)
    assert (list(removed.block_hashes), removed.medium, removed.group_idx) == ([11], "CPU", 0)
    assert isinstance(cleared, kt.AllBlocksCleared)
    assert batch.dp_rank == 1


def test_decode_mixed_shapes_in_one_batch():
    payload = pack(
        [
            1.0,
            [
                stored_map(block_hashes=[1]),
                ["BlockRemoved", [2], "GPU"],
                {"type": "AllBlocksCleared"},
                stored_array(hashes=[3, 4]),
                {"type": "BlockRemoved", "block_hashes": [5], "medium": None},
            ],
            0,
        ]
    )
    batch = decode_batch(payload)
    assert batch.rejected == []
    kinds = [type(e) for e in batch.events]
    assert kinds == [
        kt.BlockStored,
        kt.BlockRemoved,
        kt.AllBlocksCleared,
        kt.BlockStored,
        kt.BlockRemoved,
    ]
    assert list(batch.events[0].block_hashes) == [1]
    assert list(batch.events[1].block_hashes) == [2]
    assert list(batch.events[3].block_hashes) == [3, 4]
    assert list(batch.events[4].block_hashes) == [5]


@pytest.mark.parametrize("event", [stored_map(), stored_array()], ids=["map", "array"])
def test_two_element_batch_has_no_dp_rank(event):
    batch = decode_batch(pack([1.0, [event]]))
    assert batch.dp_rank is None
    assert len(batch.events) == 1
    assert list(batch.events[0].block_hashes) == [11, 12]


@pytest.mark.parametrize(
    ("batch_map", "dp"),
    [
        ({"ts": 1.0, "events": [stored_map()], "data_parallel_rank": 2}, 2),
        ({"ts": 1.0, "events": [stored_map()], "attn_dp_rank": 5}, 5),
        ({"events": [stored_map()], "ts": 1.0, "other": [1, 2]}, None),
    ],
)
def test_map_shaped_batch(batch_map, dp):
    batch = decode_batch(pack(batch_map))
    assert batch.ts == 1.0
    assert batch.dp_rank == dp
    assert len(batch.events) == 1
    assert list(batch.events[0].block_hashes) == [11, 12]
    assert batch.rejected == []


def test_unknown_keys_and_trailing_elements_are_ignored():
    payload = pack(
        [
            1.0,
            [
                stored_map(future_field={"x": [1, 2]}, another=None),
                {"type": "BlockRemoved", "block_hashes": [3], "medium": "CPU", "zzz": 1},
                {"type": "AllBlocksCleared", "reason": "reset"},
                [*stored_array(), None, 0, "full_attention", 128, "LOCAL", "x", "y", 1, 2],
                ["BlockRemoved", [4], "GPU", 0, "LOCAL", "own", 99],
                ["AllBlocksCleared", 1, 2, 3],
            ],
            7,
            "trailing batch element",
        ]
    )
    batch = decode_batch(payload)
    assert batch.rejected == []
    assert batch.dp_rank == 7
    assert [type(e).__name__ for e in batch.events] == [
        "BlockStored",
        "BlockRemoved",
        "AllBlocksCleared",
        "BlockStored",
        "BlockRemoved",
        "AllBlocksCleared",
    ]
    assert batch.events[0].tokens() == [1, 2, 3, 4]
    assert batch.events[3].tokens() == [1, 2, 3, 4]
    assert batch.events[3].group_idx == 0
    assert list(batch.events[4].block_hashes) == [4]
    assert batch.events[4].group_idx == 0


def test_missing_optional_fields_become_none():
    payload = pack(
        [
            1.0,
            [
                {"type": "BlockStored", "block_hashes": [1]},
                {"type": "BlockRemoved", "block_hashes": [2]},
                ["BlockStored", [3]],
                ["BlockStored", [4], 3, [1, 2], 2, None, "CPU"],  # older: no lora_name etc.
                ["BlockRemoved", [5]],
            ],
        ]
    )
    batch = decode_batch(payload)
    assert batch.rejected == []
    s1, r1, s2, s3, r2 = batch.events
    for ev in (s1, s2):
        assert ev.parent_hash is None
        assert ev.token_ids is None and ev.token_ids_msgpack is None
        assert ev.block_size is None
        assert ev.medium is None
        assert ev.lora_name is None
        assert ev.lora_id is None
        assert ev.cache_salt is None
        assert ev.extra_keys is None
        assert ev.group_idx is None
        assert ev.kv_cache_spec_kind is None
        with pytest.raises(kt.EventError) as info:
            ev.tokens()
        assert info.value.reason == "missing_token_ids"
    assert (s3.parent_hash, s3.tokens(), s3.block_size, s3.medium) == (3, [1, 2], 2, "CPU")
    assert (s3.lora_name, s3.extra_keys, s3.group_idx) == (None, None, None)
    for ev in (r1, r2):
        assert ev.medium is None and ev.group_idx is None


def test_nil_token_ids_are_missing():
    batch = decode_batch(pack([1.0, [stored_map(token_ids=None)]]))
    with pytest.raises(kt.EventError) as info:
        batch.events[0].tokens()
    assert info.value.reason == "missing_token_ids"


def hash_forms(value: int, rng: random.Random) -> list[Any]:
    """The same engine hash as an unsigned int, a signed int64 and a 32-byte digest."""
    digest = bytes(rng.randrange(256) for _ in range(24)) + value.to_bytes(8, "big")
    return [value, signed64(value), digest]


@settings(max_examples=150)
@given(values=st.lists(hash_st, min_size=1, max_size=5), seed=st.integers(0, 1000))
def test_hash_forms_decode_to_the_same_u64(values, seed):
    rng = random.Random(seed)
    forms = [hash_forms(v, rng) for v in values]
    mixed = [rng.choice(f) for f in forms]
    parent_forms = forms[0]
    for i in range(3):
        hashes = [f[i] for f in forms]
        payload = pack(
            [
                1.0,
                [
                    stored_map(block_hashes=hashes, parent_block_hash=parent_forms[i]),
                    {"type": "BlockRemoved", "block_hashes": hashes},
                    ["BlockRemoved", mixed],
                    ["BlockStored", hashes, parent_forms[i]],
                ],
            ]
        )
        batch = decode_batch(payload)
        assert batch.rejected == []
        assert list(batch.events[0].block_hashes) == values
        assert batch.events[0].parent_hash == values[0]
        assert list(batch.events[1].block_hashes) == values
        assert list(batch.events[2].block_hashes) == values
        assert list(batch.events[3].block_hashes) == values
        assert batch.events[3].parent_hash == values[0]


def test_hash_forms_known_edges():
    rng = random.Random(1)
    for value in (0, 1, (1 << 63) - 1, 1 << 63, U64_MAX - 4, U64_MAX):
        for form in hash_forms(value, rng):
            batch = decode_batch(pack([0.0, [{"type": "BlockRemoved", "block_hashes": [form]}]]))
            assert list(batch.events[0].block_hashes) == [value], form
    # Signed -1 is the all-ones value; digests shorter than 8 bytes are read whole.
    batch = decode_batch(pack([0.0, [["BlockRemoved", [-1, b"\x01\x00"]]]]))
    assert list(batch.events[0].block_hashes) == [U64_MAX, 256]


def test_token_ids_are_decoded_lazily():
    batch = decode_batch(pack([1.0, [stored_map(token_ids=[5, 6, MAX_TOKEN, 0])]]))
    ev = batch.events[0]
    assert ev.token_ids is None
    assert ev.token_ids_msgpack is not None
    assert ev.tokens() == [5, 6, MAX_TOKEN, 0]
    assert ev.token_ids == [5, 6, MAX_TOKEN, 0]
    assert ev.token_ids_msgpack is None
    assert ev.tokens() is ev.tokens()


@pytest.mark.parametrize(
    "token_ids",
    [[1, "x"], [1.5, 2.0], [[1, 2], [3, 4]], {"a": 1}, {1: 2}, "abc", [None], 7, b"\x01\x02"],
    ids=repr,
)
@pytest.mark.parametrize("shape", ["map", "array"])
def test_bad_token_ids_surface_when_tokens_are_asked_for(token_ids, shape):
    if shape == "map":
        ev: Any = stored_map(token_ids=token_ids)
    else:
        ev = stored_array()
        ev[3] = token_ids
    batch = decode_batch(pack([1.0, [ev, {"type": "BlockRemoved", "block_hashes": [1]}], 0]))
    assert batch.rejected == []
    assert len(batch.events) == 2
    stored = batch.events[0]
    assert list(stored.block_hashes) == [11, 12]
    with pytest.raises(kt.EventError) as info:
        stored.tokens()
    assert info.value.reason == "bad_token_ids"
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("extra_keys", "salt"),
    [
        ([[["cache_salt", "tenant-a"]], None], "tenant-a"),
        ([[["lora", "ad", "/p"], ["mm", "abc", 3], ["cache_salt", "s-2"]], None], "s-2"),
        ([None, None], None),
        ([[["lora", "ad", "/p"]], [["cache_salt", "late"]]], None),  # salt only on block 0
        ([[["cache_salt", 5]]], None),
        (None, None),
        ([], None),
    ],
)
def test_cache_salt_from_vllm_extra_keys(extra_keys, salt):
    for ev in (stored_map(extra_keys=extra_keys), [*stored_array(), extra_keys]):
        batch = decode_batch(pack([1.0, [ev]]))
        assert batch.rejected == []
        assert batch.events[0].cache_salt == salt
        assert batch.events[0].extra_keys == extra_keys


def test_cache_salt_from_sglang_field():
    ev = {
        "type": "BlockStored",
        "block_hashes": [signed64(U64_MAX - 1)],
        "parent_block_hash": None,
        "token_ids": [1, 2],
        "block_size": 2,
        "lora_id": None,
        "medium": "CPU_PINNED",
        "cache_salt": "tenant-b",
        "session_id": "sess",
        "lora_name": "ad",
    }
    batch = decode_batch(pack([1.0, [ev], 2]))
    got = batch.events[0]
    assert got.cache_salt == "tenant-b"
    assert list(got.block_hashes) == [U64_MAX - 1]
    assert got.lora_name == "ad"
    assert got.medium == "CPU_PINNED"
    assert batch.dp_rank == 2


@pytest.mark.parametrize(
    ("medium", "tier"),
    [
        ("GPU", Tier.DEVICE),
        ("CPU", Tier.HOST),
        ("STORAGE", Tier.DISK),
        ("CPU_PINNED", Tier.HOST),
        ("DISK", Tier.DISK),
        ("EXTERNAL", Tier.EXTERNAL),
        ("SOME_FUTURE_MEDIUM", Tier.EXTERNAL),
        (None, Tier.DEVICE),
    ],
)
def test_medium_and_tier(medium, tier):
    payload = pack(
        [
            1.0,
            [
                stored_map(medium=medium),
                {"type": "BlockRemoved", "block_hashes": [1], "medium": medium},
                stored_array(medium=medium),
                ["BlockRemoved", [1], medium],
            ],
        ]
    )
    batch = decode_batch(payload)
    assert batch.rejected == []
    for ev in batch.events:
        assert ev.medium == medium
        assert ev.tier is tier


def test_unusual_lora_id_and_kind_values_do_not_reject_the_event():
    batch = decode_batch(
        pack([1.0, [stored_map(lora_id="adapter", kv_cache_spec_kind=["x"]), stored_map()]])
    )
    assert batch.rejected == []
    assert len(batch.events) == 2
    assert batch.events[0].lora_id is None
    assert batch.events[0].kv_cache_spec_kind is None
    assert batch.events[0].tokens() == [1, 2, 3, 4]


# ============================================================================================
# (3) Round trips.


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(events=events_st("vllm"), ts=ts_st, dp=dp_st, shape=st.sampled_from(["map", "array"]))
def test_round_trip_vllm(events, ts, dp, shape):
    batch = decode_batch(encode_batch(events, ts, dp, shape=shape))
    assert batch.rejected == []
    assert batch.ts == ts
    assert batch.dp_rank == dp
    assert [as_tuple(e) for e in batch.events] == [as_tuple(e) for e in events]


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(events=events_st("sglang"), ts=ts_st, dp=dp_st)
def test_round_trip_sglang(events, ts, dp):
    batch = decode_batch(encode_batch(events, ts, dp, dialect="sglang"))
    assert batch.rejected == []
    assert (batch.ts, batch.dp_rank) == (ts, dp)
    assert [as_tuple(e) for e in batch.events] == [as_tuple(e) for e in events]


def test_round_trip_of_decoded_events_with_lazy_tokens():
    events = spec_example_events()
    once = decode_batch(encode_batch(events, 1.5, 0))
    twice = encode_batch(once.events, once.ts, once.dp_rank)
    assert twice == encode_batch(spec_example_events(), 1.5, 0)


# ============================================================================================
# (4) Corrupt input.


def check_decode(payload: bytes) -> kt.EventBatch | None:
    """Decode; only an EventBatch or an EventError is acceptable. Checks the result's shape."""
    try:
        batch = decode_batch(payload)
    except kt.EventError as exc:
        assert exc.reason in BATCH_REASONS, exc
        return None
    assert isinstance(batch, kt.EventBatch)
    assert isinstance(batch.ts, float)
    assert batch.dp_rank is None or type(batch.dp_rank) is int
    for ev in batch.events:
        assert isinstance(ev, kt.BlockStored | kt.BlockRemoved | kt.AllBlocksCleared)
        if isinstance(ev, kt.AllBlocksCleared):
            continue
        assert all(type(h) is int and 0 <= h <= U64_MAX for h in ev.block_hashes)
        assert isinstance(ev.tier, Tier)
        if isinstance(ev, kt.BlockStored):
            assert ev.parent_hash is None or 0 <= ev.parent_hash <= U64_MAX
            try:
                tokens = ev.tokens()
            except kt.EventError as exc:
                assert exc.reason in TOKEN_REASONS
            else:
                assert all(type(t) is int for t in tokens)
    for reason, detail in batch.rejected:
        assert reason in EVENT_REASONS
        assert isinstance(detail, str)
    return batch


def valid_payloads() -> list[bytes]:
    return [
        encode_batch(spec_example_events(), 1.5, 0, shape="map"),
        encode_batch(spec_example_events(), 1.5, 0, shape="array"),
        encode_batch(spec_example_events(), 1.5, 0, dialect="sglang"),
        pack({"ts": 1.0, "events": [stored_map()], "attn_dp_rank": 1}),
    ]


def test_empty_payload_is_bad_batch():
    with pytest.raises(kt.EventError) as info:
        decode_batch(b"")
    assert info.value.reason == "bad_batch"


@pytest.mark.parametrize("seed", range(20))
def test_random_bytes_raise_event_error(seed):
    rng = random.Random(seed)
    payload = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    with pytest.raises(kt.EventError) as info:
        decode_batch(payload)
    assert info.value.reason in BATCH_REASONS


@pytest.mark.parametrize("index", range(4))
def test_every_truncation_raises_event_error(index):
    payload = valid_payloads()[index]
    assert check_decode(payload) is not None
    for cut in range(len(payload)):
        with pytest.raises(kt.EventError) as info:
            decode_batch(payload[:cut])
        assert info.value.reason == ("bad_batch" if cut == 0 else "bad_msgpack"), cut


ARRAY32_2_31 = b"\xdd\x80\x00\x00\x00"
MAP32_2_31 = b"\xdf\x80\x00\x00\x00"


@pytest.mark.parametrize(
    "payload",
    [
        ARRAY32_2_31 + b"\x01\x02\x03",
        ARRAY32_2_31 + pack(1.0) + b"\x90\xc0\x01\x02",
        MAP32_2_31 + pack("ts") + pack(1.0),
        b"\x93" + pack(1.0) + ARRAY32_2_31 + b"\x90\x90",
        b"\x93"
        + pack(1.0)
        + b"\x91\x82"
        + pack("type")
        + pack("BlockStored")
        + pack("block_hashes")
        + ARRAY32_2_31
        + b"\x01",
        b"\x93"
        + pack(1.0)
        + b"\x91\x83"
        + pack("type")
        + pack("BlockStored")
        + pack("block_hashes")
        + b"\x91\x01"
        + pack("token_ids")
        + ARRAY32_2_31
        + b"\x01",
        b"\x93" + pack(1.0) + b"\x91\x92" + pack("BlockRemoved") + ARRAY32_2_31 + b"\x01",
    ],
    ids=["top", "top-valid-prefix", "map-top", "events", "hashes", "token-ids", "array-hashes"],
)
def test_huge_length_headers_fail_fast(payload):
    # A decoder that trusted the header would try to allocate gigabytes.
    tracemalloc.start()
    try:
        with pytest.raises(kt.EventError) as info:
            decode_batch(payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.reason in BATCH_REASONS
    assert peak < 16 * 1024 * 1024


def assert_rejected(event: Any, reason: str) -> None:
    good = {"type": "BlockRemoved", "block_hashes": [42]}
    batch = decode_batch(pack([1.0, [good, event, ["AllBlocksCleared"]], 0]))
    assert [type(e) for e in batch.events] == [kt.BlockRemoved, kt.AllBlocksCleared]
    assert list(batch.events[0].block_hashes) == [42]
    assert len(batch.rejected) == 1
    assert batch.rejected[0][0] == reason
    assert isinstance(batch.rejected[0][1], str)


@pytest.mark.parametrize(
    "event",
    [
        stored_map(block_hashes=["abc", "def"]),
        stored_map(block_hashes="abc"),
        stored_map(block_hashes=[1.5]),
        stored_map(block_hashes=[b""]),
        stored_map(parent_block_hash="x"),
        stored_map(block_size="16"),
        stored_map(medium=3),
        stored_map(group_idx="0"),
        stored_map(lora_name=[1]),
        {"type": "BlockRemoved", "block_hashes": ["1"]},
        {"type": "BlockRemoved", "block_hashes": [1], "medium": {"a": 1}},
        {"type": "BlockRemoved"},
        ["BlockStored", ["abc"]],
        ["BlockStored", [1], None, [1], "16"],
        ["BlockRemoved", [1], 5],
        ["BlockRemoved"],
        [],
    ],
    ids=repr,
)
def test_wrong_field_types_reject_the_event(event):
    assert_rejected(event, "bad_event")


@pytest.mark.parametrize("event", [3, "BlockStored", None, 1.5, True, b"\x01"], ids=repr)
def test_event_that_is_not_a_map_or_array_is_rejected(event):
    assert_rejected(event, "bad_event")


@pytest.mark.parametrize(
    "event",
    [
        {"type": "BlockUpdated", "block_hashes": [1]},
        {"type": 7, "block_hashes": [1]},
        {"block_hashes": [1]},
        {},
        ["BlockUpdated", [1]],
        [7, [1]],
    ],
    ids=repr,
)
def test_unknown_event_type_is_rejected(event):
    assert_rejected(event, "unknown_event_type")


@pytest.mark.parametrize("obj", [5, -1, "batch", None, True, 1.5, b"\x00\x01"], ids=repr)
def test_batch_that_is_a_scalar_is_bad_batch(obj):
    with pytest.raises(kt.EventError) as info:
        decode_batch(pack(obj))
    assert info.value.reason == "bad_batch"


@pytest.mark.parametrize(
    "obj",
    [
        ["ts", [], 0],
        [1.0, 5, 0],
        [1.0, {"a": 1}],
        [1.0, [], "rank"],
        [1.0],
        [],
        {"ts": "x", "events": []},
        {"ts": 1.0, "events": 3},
        {"ts": 1.0, "events": [], "data_parallel_rank": "r"},
    ],
    ids=repr,
)
def test_well_formed_msgpack_that_is_not_a_batch_is_bad_batch(obj):
    # Valid msgpack, wrong structure: the documented reason is bad_batch (bad_msgpack is for
    # bytes that are not msgpack at all).
    with pytest.raises(kt.EventError) as info:
        decode_batch(pack(obj))
    assert info.value.reason == "bad_batch"


# Invalid UTF-8 in a msgpack str: bytes that are msgpack-framed correctly but not text.
BAD_STR = b"\xa2\xc3\x28"


def raw_map(*pairs: tuple[str, bytes]) -> bytes:
    """A msgpack map from keys and already-encoded values (to splice in invalid bytes)."""
    assert len(pairs) < 16
    return bytes([0x80 | len(pairs)]) + b"".join(pack(k) + v for k, v in pairs)


def raw_array(*items: bytes) -> bytes:
    assert len(items) < 16
    return bytes([0x90 | len(items)]) + b"".join(items)


@pytest.mark.parametrize(
    "payload",
    [BAD_STR, b"\xd9\x01\x80", b"\xda\x00\x02\xff\xfe"],
    ids=["fixstr", "str8", "str16"],
)
def test_invalid_utf8_string_payload_is_event_error(payload):
    with pytest.raises(kt.EventError) as info:
        decode_batch(payload)
    assert info.value.reason in BATCH_REASONS


HASHES = pack([7])
INVALID_UTF8_EVENTS = {
    "map-removed-medium": raw_map(
        ("type", pack("BlockRemoved")), ("block_hashes", HASHES), ("medium", BAD_STR)
    ),
    "map-stored-medium": raw_map(
        ("type", pack("BlockStored")), ("block_hashes", HASHES), ("medium", BAD_STR)
    ),
    "map-stored-lora-name": raw_map(
        ("type", pack("BlockStored")), ("block_hashes", HASHES), ("lora_name", BAD_STR)
    ),
    "map-stored-extra-keys": raw_map(
        ("type", pack("BlockStored")),
        ("block_hashes", HASHES),
        ("extra_keys", raw_array(raw_array(raw_array(pack("cache_salt"), BAD_STR)))),
    ),
    "map-stored-kind": raw_map(
        ("type", pack("BlockStored")), ("block_hashes", HASHES), ("kv_cache_spec_kind", BAD_STR)
    ),
    "map-stored-sglang-salt": raw_map(
        ("type", pack("BlockStored")), ("block_hashes", HASHES), ("cache_salt", BAD_STR)
    ),
    "map-type": raw_map(("type", BAD_STR), ("block_hashes", HASHES)),
    "array-removed-medium": raw_array(pack("BlockRemoved"), HASHES, BAD_STR),
    "array-stored-lora-name": raw_array(
        pack("BlockStored"),
        HASHES,
        pack(None),
        pack([1]),
        pack(1),
        pack(None),
        pack("GPU"),
        BAD_STR,
    ),
    "array-type": raw_array(BAD_STR, HASHES),
}


@pytest.mark.parametrize("event", INVALID_UTF8_EVENTS.values(), ids=INVALID_UTF8_EVENTS.keys())
def test_invalid_utf8_inside_an_event_rejects_only_that_event(event):
    good = pack({"type": "BlockRemoved", "block_hashes": [42]})
    payload = raw_array(pack(1.0), raw_array(good, event, pack(["AllBlocksCleared"])), pack(0))
    batch = check_decode(payload)
    assert batch is not None
    assert [type(e) for e in batch.events] == [kt.BlockRemoved, kt.AllBlocksCleared]
    assert list(batch.events[0].block_hashes) == [42]
    assert len(batch.rejected) == 1
    assert batch.rejected[0][0] in EVENT_REASONS


def test_invalid_utf8_inside_token_ids_surfaces_as_bad_token_ids():
    event = raw_map(
        ("type", pack("BlockStored")),
        ("block_hashes", HASHES),
        ("token_ids", raw_array(pack(1), BAD_STR)),
    )
    batch = decode_batch(raw_array(pack(1.0), raw_array(event)))
    assert batch.rejected == []
    with pytest.raises(kt.EventError) as info:
        batch.events[0].tokens()
    assert info.value.reason == "bad_token_ids"


# --- fuzzing -------------------------------------------------------------------------------

leaf_st = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 63), U64_MAX),
    st.floats(),
    st.text(max_size=8),
    st.binary(max_size=40),
)
obj_st = st.recursive(
    leaf_st,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(
            st.one_of(st.text(max_size=6), st.integers(-5, 5), st.none()), inner, max_size=5
        ),
    ),
    max_leaves=25,
)
FIELD_NAMES = [
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
    "cache_salt",
]
type_st = st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared", "Other"])
field_value_st = st.one_of(
    obj_st,
    st.lists(st.one_of(st.integers(-(1 << 63), U64_MAX), st.binary(max_size=33)), max_size=4),
    st.lists(st.integers(-5, MAX_TOKEN + 5), max_size=8),
)
map_event_st = st.builds(
    lambda t, fields: {"type": t, **fields},
    type_st,
    st.dictionaries(st.sampled_from(FIELD_NAMES), field_value_st, max_size=6),
)
array_event_st = st.builds(
    lambda t, values: [t, *values], type_st, st.lists(field_value_st, max_size=12)
)
event_like_st = st.one_of(map_event_st, array_event_st, obj_st)
batch_like_st = st.one_of(
    st.tuples(
        st.one_of(st.floats(), st.integers(-10, 10), obj_st),
        st.one_of(st.lists(event_like_st, max_size=5), obj_st),
    ).map(list),
    st.tuples(
        st.floats(), st.lists(event_like_st, max_size=5), st.one_of(st.integers(-5, 5), obj_st)
    ).map(list),
    st.builds(
        lambda ts, evs, extra: {"ts": ts, "events": evs, **extra},
        st.floats(),
        st.lists(event_like_st, max_size=5),
        st.dictionaries(st.text(max_size=20), obj_st, max_size=3),
    ),
    obj_st,
)


@settings(max_examples=400)
@given(payload=st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(payload):
    check_decode(payload)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(obj=batch_like_st)
def test_fuzz_arbitrary_msgpack_objects(obj):
    check_decode(pack(obj))


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(index=st.integers(0, 3), data=st.data())
def test_fuzz_mutated_valid_payloads(index, data):
    payload = bytearray(valid_payloads()[index])
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        pos = data.draw(st.integers(0, len(payload) - 1)) if payload else 0
        if op == "flip" and payload:
            payload[pos] = data.draw(st.integers(0, 255))
        elif op == "insert":
            payload[pos:pos] = data.draw(st.binary(min_size=1, max_size=9))
        elif payload:
            del payload[pos : pos + data.draw(st.integers(1, 8))]
    check_decode(bytes(payload))


@pytest.mark.parametrize(
    "ext",
    [
        b"\xd4\xff\x00",  # timestamp ext with an invalid length
        b"\xd7\xff" + b"\xff" * 8,  # timestamp with nanoseconds out of range
        b"\xd4\x05\x00",  # application ext type
    ],
    ids=["ts-len", "ts-nanos", "app-ext"],
)
def test_ext_values_anywhere_never_escape(ext):
    good = pack({"type": "BlockRemoved", "block_hashes": [42]})

    def batch_of(*events: bytes) -> bytes:
        return raw_array(pack(1.0), raw_array(*events), pack(0))

    # As the batch, as its timestamp, as its dp rank: a batch-level error.
    for payload in (
        ext,
        raw_array(ext, raw_array(), pack(0)),
        raw_array(pack(1.0), raw_array(), ext),
    ):
        assert check_decode(payload) is None
    # As an event, or as a field of one: only that event is rejected.
    for event in (
        ext,
        raw_map(("type", pack("BlockStored")), ("block_hashes", HASHES), ("lora_name", ext)),
        raw_map(("type", pack("BlockStored")), ("block_hashes", HASHES), ("extra_keys", ext)),
        raw_map(("type", pack("BlockRemoved")), ("block_hashes", raw_array(ext))),
        raw_array(pack("BlockRemoved"), HASHES, ext),
    ):
        batch = check_decode(batch_of(good, event))
        assert batch is not None
        assert list(batch.events[0].block_hashes) == [42]
        assert len(batch.events) + len(batch.rejected) == 2
