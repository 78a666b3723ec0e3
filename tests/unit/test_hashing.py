"""kvpick block keys (epp.hashing) against specs/kv-events.md §9.4.

Expected values are either the spec's published Dynamo vectors or recomputed here, from the
rules in the spec, with ``xxhash.xxh3_64_intdigest`` and ``struct.pack`` directly.
"""

from __future__ import annotations

import struct
from array import array

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from epp import hashing

U64 = 1 << 64
MAX_TOKEN = (1 << 32) - 1
SEED = 1337  # CHAIN_XXH3_SEED in the spec (§9.4)

# --- spec §9.4 published vectors ------------------------------------------------------------
BLOCK_1 = list(range(1, 17))
BLOCK_2 = list(range(17, 33))
SPEC_BLOCK_HASHES = [16863443419780771464, 2287610619914608821]
SPEC_SEQUENCE_HASHES = [16863443419780771464, 12466389667045779788]
SPEC_SALT = "tenant-a"
SPEC_SALT_SEED = 1948188790972764086
SPEC_SALT_FIRST_BLOCK = 8175209796170318505


# --- an independent reference implementation of the spec's rules ---------------------------
def ref_seed(lora_name: str | None, cache_salt: str | None) -> int:
    seed = SEED
    if lora_name is not None and lora_name != "":
        seed = (seed + xxhash.xxh3_64_intdigest(lora_name.encode("utf-8"), seed=0)) % U64
    if cache_salt is not None and cache_salt != "":
        seed = (seed + xxhash.xxh3_64_intdigest(cache_salt.encode("utf-8"), seed=1)) % U64
    return seed


def ref_block_hashes(tokens: list[int], block_size: int, seed: int = SEED) -> list[int]:
    out = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        block = tokens[start : start + block_size]
        data = b"".join(struct.pack("<I", t) for t in block)
        out.append(xxhash.xxh3_64_intdigest(data, seed=seed))
    return out


def ref_chain(parent: int | None, block_hashes: list[int]) -> list[int]:
    out = []
    prev = parent
    for bh in block_hashes:
        if prev is None:
            prev = bh
        else:
            prev = xxhash.xxh3_64_intdigest(struct.pack("<QQ", prev, bh), seed=SEED)
        out.append(prev)
    return out


tokens_st = st.lists(st.integers(0, MAX_TOKEN), max_size=300)
block_size_st = st.one_of(st.sampled_from([1, 2, 3, 4, 16, 32, 64]), st.integers(1, 100))
name_st = st.one_of(st.none(), st.just(""), st.text(max_size=20))


# --- published vectors ----------------------------------------------------------------------
def test_spec_block_hash_vectors():
    assert list(hashing.block_hashes(BLOCK_1 + BLOCK_2, 16)) == SPEC_BLOCK_HASHES
    assert list(hashing.block_hashes(BLOCK_1, 16)) == SPEC_BLOCK_HASHES[:1]
    assert list(hashing.block_hashes(BLOCK_2, 16)) == SPEC_BLOCK_HASHES[1:]


def test_spec_sequence_hash_vectors():
    assert hashing.sequence_hashes(BLOCK_1 + BLOCK_2, 16) == SPEC_SEQUENCE_HASHES
    assert hashing.chain(None, SPEC_BLOCK_HASHES) == SPEC_SEQUENCE_HASHES
    # Continuing from the first sequence hash gives the second one.
    assert hashing.chain(SPEC_SEQUENCE_HASHES[0], SPEC_BLOCK_HASHES[1:]) == [
        SPEC_SEQUENCE_HASHES[1]
    ]


def test_spec_default_block_size_is_16():
    assert hashing.sequence_hashes(BLOCK_1 + BLOCK_2) == SPEC_SEQUENCE_HASHES


def test_spec_salt_vectors():
    assert hashing.chain_seed(cache_salt=SPEC_SALT) == SPEC_SALT_SEED
    assert hashing.chain_seed(None, SPEC_SALT) == SPEC_SALT_SEED
    seed = hashing.chain_seed(cache_salt=SPEC_SALT)
    assert hashing.block_hashes(BLOCK_1, 16, seed)[0] == SPEC_SALT_FIRST_BLOCK
    keys = hashing.sequence_hashes(BLOCK_1 + BLOCK_2, 16, cache_salt=SPEC_SALT)
    assert keys[0] == SPEC_SALT_FIRST_BLOCK
    assert keys != SPEC_SEQUENCE_HASHES


def test_reference_implementation_reproduces_spec_vectors():
    # Guards the reference used by the property tests below.
    assert ref_block_hashes(BLOCK_1 + BLOCK_2, 16) == SPEC_BLOCK_HASHES
    assert ref_chain(None, SPEC_BLOCK_HASHES) == SPEC_SEQUENCE_HASHES
    assert ref_seed(None, SPEC_SALT) == SPEC_SALT_SEED
    assert ref_block_hashes(BLOCK_1, 16, SPEC_SALT_SEED) == [SPEC_SALT_FIRST_BLOCK]


# --- chain_seed -----------------------------------------------------------------------------
def test_chain_seed_without_names_is_chain_seed_constant():
    assert hashing.CHAIN_SEED == SEED
    assert hashing.chain_seed() == SEED
    assert hashing.chain_seed(None, None) == SEED


def test_chain_seed_empty_strings_count_as_absent():
    assert hashing.chain_seed("", "") == SEED
    assert hashing.chain_seed("", None) == SEED
    assert hashing.chain_seed(None, "") == SEED
    assert hashing.chain_seed("", SPEC_SALT) == SPEC_SALT_SEED
    assert hashing.chain_seed("lora-x", "") == hashing.chain_seed("lora-x", None)
    assert hashing.sequence_hashes(BLOCK_1 + BLOCK_2, 16, lora_name="", cache_salt="") == (
        SPEC_SEQUENCE_HASHES
    )


@given(lora=name_st, salt=name_st)
def test_chain_seed_matches_reference(lora, salt):
    seed = hashing.chain_seed(lora, salt)
    assert seed == ref_seed(lora, salt)
    assert 0 <= seed < U64


def test_chain_seed_wraps_modulo_2_64():
    # Find a LoRA name and a salt whose two additions overflow 64 bits (about half of all
    # pairs do), and one pair that does not, so both sides of the wrap are exercised.
    wrapping = None
    not_wrapping = None
    for i in range(200):
        name, salt = f"adapter-{i}", f"tenant-{i}"
        total = (
            SEED
            + xxhash.xxh3_64_intdigest(name.encode(), seed=0)
            + xxhash.xxh3_64_intdigest(salt.encode(), seed=1)
        )
        if total >= U64 and wrapping is None:
            wrapping = (name, salt, total)
        if total < U64 and not_wrapping is None:
            not_wrapping = (name, salt, total)
    assert wrapping is not None and not_wrapping is not None

    name, salt, total = wrapping
    assert hashing.chain_seed(name, salt) == total - U64
    name, salt, total = not_wrapping
    assert hashing.chain_seed(name, salt) == total


def test_lora_and_salt_use_different_xxh3_seeds():
    # The LoRA name is hashed with seed 0 and the salt with seed 1, so they do not alias.
    assert hashing.chain_seed("x", None) != hashing.chain_seed(None, "x")
    assert hashing.chain_seed("x", None) == ref_seed("x", None)
    assert hashing.chain_seed(None, "x") == ref_seed(None, "x")


def test_chain_seed_handles_non_ascii_names_as_utf8():
    assert hashing.chain_seed("lörä-ñ", "租户") == ref_seed("lörä-ñ", "租户")


# --- block hashes and keys against the reference --------------------------------------------
@settings(max_examples=200)
@given(tokens=tokens_st, block_size=block_size_st, lora=name_st, salt=name_st)
def test_block_hashes_match_reference(tokens, block_size, lora, salt):
    seed = ref_seed(lora, salt)
    expected = ref_block_hashes(tokens, block_size, seed)
    assert list(hashing.block_hashes(tokens, block_size, seed)) == expected
    assert len(expected) == len(tokens) // block_size


@settings(max_examples=200)
@given(tokens=tokens_st, block_size=block_size_st, lora=name_st, salt=name_st)
def test_block_keys_match_reference(tokens, block_size, lora, salt):
    expected = ref_chain(None, ref_block_hashes(tokens, block_size, ref_seed(lora, salt)))
    got = hashing.sequence_hashes(tokens, block_size, lora_name=lora, cache_salt=salt)
    assert got == expected
    assert all(0 <= k < U64 for k in got)


@given(
    parent=st.one_of(st.none(), st.integers(0, U64 - 1)),
    hashes=st.lists(st.integers(0, U64 - 1), max_size=20),
)
def test_chain_matches_reference(parent, hashes):
    assert hashing.chain(parent, hashes) == ref_chain(parent, hashes)


def test_chain_of_nothing_is_empty():
    assert hashing.chain(None, []) == []
    assert hashing.chain(123, []) == []


@given(tokens=tokens_st, block_size=block_size_st)
def test_block_hashes_packed_equals_block_hashes(tokens, block_size):
    packed = hashing.pack_tokens(tokens)
    expected = ref_block_hashes(tokens, block_size)
    assert list(hashing.block_hashes_packed(packed, block_size)) == expected
    # Trailing bytes shorter than a block (even a partial token) are ignored.
    assert list(hashing.block_hashes_packed(packed + b"\x01\x02", block_size)) == ref_block_hashes(
        tokens, block_size
    )


def test_many_blocks_and_changing_block_counts():
    # More blocks than any small cache of per-block slices, then fewer, then more again.
    tokens = [(i * 2654435761) % (MAX_TOKEN + 1) for i in range(5000)]
    for block_size, count in [(1, 5000), (1, 10), (1, 3000), (2, 2500), (3, 1666)]:
        toks = tokens[: block_size * count]
        assert list(hashing.block_hashes(toks, block_size)) == ref_block_hashes(toks, block_size)


# --- structure: partial tails, prefixes -----------------------------------------------------
@given(
    tokens=tokens_st,
    block_size=block_size_st,
    data=st.data(),
)
def test_partial_tail_block_is_not_hashed(tokens, block_size, data):
    full = tokens[: len(tokens) - len(tokens) % block_size]
    tail = data.draw(
        st.lists(st.integers(0, MAX_TOKEN), min_size=1, max_size=block_size - 1)
        if block_size > 1
        else st.just([])
    )
    assert hashing.block_hashes(full + tail, block_size) == hashing.block_hashes(full, block_size)
    seq = hashing.sequence_hashes
    assert seq(full + tail, block_size) == seq(full, block_size)
    assert len(hashing.sequence_hashes(full + tail, block_size)) == len(full) // block_size


def test_fewer_tokens_than_a_block_give_no_keys():
    assert list(hashing.block_hashes(list(range(15)), 16)) == []
    assert hashing.sequence_hashes(list(range(15)), 16) == []
    assert hashing.sequence_hashes([], 16) == []


def test_equal_blocks_under_different_prefixes_get_different_keys():
    shared = list(range(100, 116))
    a = list(range(16)) + shared
    b = list(range(500, 516)) + shared
    bh_a = hashing.block_hashes(a, 16)
    bh_b = hashing.block_hashes(b, 16)
    assert bh_a[1] == bh_b[1]  # the shared block has the same block hash
    keys_a = hashing.sequence_hashes(a, 16)
    keys_b = hashing.sequence_hashes(b, 16)
    assert keys_a[1] != keys_b[1]  # but a different sequence hash
    assert keys_a == ref_chain(None, bh_a)
    assert keys_b == ref_chain(None, bh_b)


def test_same_block_at_different_positions_gets_different_keys():
    block = list(range(7, 23))
    keys = hashing.sequence_hashes(block * 3, 16)
    assert len(set(keys)) == 3


@given(
    tokens=st.lists(st.integers(0, MAX_TOKEN), min_size=64, max_size=128),
    position=st.integers(0, 63),
)
def test_changing_one_token_changes_that_key_and_every_later_key(tokens, position):
    changed = list(tokens)
    changed[position] = (changed[position] + 1) % (MAX_TOKEN + 1)
    before = hashing.sequence_hashes(tokens, 16)
    after = hashing.sequence_hashes(changed, 16)
    block = position // 16
    assert before[:block] == after[:block]
    assert all(x != y for x, y in zip(before[block:], after[block:], strict=True))


def test_lora_and_salt_namespace_the_keys():
    tokens = BLOCK_1 + BLOCK_2
    plain = hashing.sequence_hashes(tokens, 16)
    lora = hashing.sequence_hashes(tokens, 16, lora_name="a")
    salt = hashing.sequence_hashes(tokens, 16, cache_salt="a")
    both = hashing.sequence_hashes(tokens, 16, lora_name="a", cache_salt="a")
    assert len({tuple(plain), tuple(lora), tuple(salt), tuple(both)}) == 4
    assert lora == ref_chain(None, ref_block_hashes(tokens, 16, ref_seed("a", None)))
    assert both == ref_chain(None, ref_block_hashes(tokens, 16, ref_seed("a", "a")))


# --- pack_tokens ----------------------------------------------------------------------------
@given(tokens=tokens_st)
def test_pack_tokens_is_u32_little_endian(tokens):
    assert hashing.pack_tokens(tokens) == struct.pack(f"<{len(tokens)}I", *tokens)


@pytest.mark.parametrize(
    "make",
    [list, tuple, lambda t: array("I", t), lambda t: array("q", t), lambda t: range(1, 17)],
    ids=["list", "tuple", "array-I", "array-q", "range"],
)
def test_pack_tokens_accepts_int_sequences(make):
    tokens = list(range(1, 17))
    assert hashing.pack_tokens(make(tokens)) == struct.pack("<16I", *tokens)
    assert list(hashing.block_hashes(make(tokens), 16)) == [SPEC_BLOCK_HASHES[0]]


@pytest.mark.parametrize("make", [bytes, bytearray], ids=["bytes", "bytearray"])
def test_pack_tokens_reads_bytes_as_a_sequence_of_small_token_ids(make):
    # bytes is a Sequence[int] (each item 0..255); its items are the token ids.
    tokens = [1, 2, 3, 4, 5, 6, 7, 8]
    assert hashing.pack_tokens(make(tokens)) == struct.pack("<8I", *tokens)


def test_pack_tokens_accepts_the_largest_u32():
    packed = hashing.pack_tokens([0, MAX_TOKEN])
    assert packed == struct.pack("<II", 0, MAX_TOKEN)
    tokens = [MAX_TOKEN] * 16 + [0] * 16
    assert hashing.sequence_hashes(tokens, 16) == ref_chain(None, ref_block_hashes(tokens, 16))


@pytest.mark.parametrize(
    "bad",
    [-1, -(1 << 40), 1 << 32, (1 << 32) + 5, 1 << 64, 1.5, 1.0, "1", None, b"x", [1], object()],
    ids=repr,
)
def test_pack_tokens_rejects_bad_ids_with_value_error(bad):
    with pytest.raises(ValueError):
        hashing.pack_tokens([1, 2, bad, 4])


@pytest.mark.parametrize("bad", [-1, 1 << 32, 2.0, "7"], ids=repr)
def test_block_functions_reject_bad_ids_in_full_blocks(bad):
    tokens = list(range(16))
    tokens[5] = bad
    with pytest.raises(ValueError):
        hashing.block_hashes(tokens, 16)
    with pytest.raises(ValueError):
        hashing.sequence_hashes(tokens, 16)


@pytest.mark.parametrize("block_size", [0, -1, -16])
def test_non_positive_block_size_raises_value_error(block_size):
    tokens = list(range(32))
    with pytest.raises(ValueError):
        hashing.block_hashes(tokens, block_size)
    with pytest.raises(ValueError):
        hashing.sequence_hashes(tokens, block_size)
    with pytest.raises(ValueError):
        hashing.block_hashes_packed(hashing.pack_tokens(tokens), block_size)
    with pytest.raises(ValueError):
        hashing.block_hashes([], block_size)
