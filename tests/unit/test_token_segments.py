"""Segment-wise chat encoding: identical ids to the whole-text encode, or not used at all."""

from __future__ import annotations

import json

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, models, pre_tokenizers

from bench.tiny_tokenizer import SPECIAL_TOKENS, trained_tokenizer_json
from epp.token_segments import SegmentEncoder, ids_encoder


@pytest.fixture(scope="module")
def backend() -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_str(trained_tokenizer_json())


pieces = st.one_of(
    st.text(max_size=40),
    st.sampled_from(SPECIAL_TOKENS),
    st.sampled_from([" ", "\n\n", "  ", "<tool_call>", "</tool_call>", "ünï 文字"]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(pieces, max_size=12))
def test_same_ids_as_encoding_the_whole_text(backend, parts):
    enc = SegmentEncoder.for_backend(backend, min_cached_chars=0)
    assert enc is not None
    text = "".join(parts)
    expected = backend.encode(text, add_special_tokens=False).ids
    assert enc.encode(text) == expected
    assert enc.encode(text) == expected  # again, now from the cache


@settings(max_examples=200, deadline=None)
@given(st.lists(pieces, max_size=12), st.booleans())
def test_ids_encoder_equals_encode(backend, parts, special):
    """The offset-free fast path gives exactly ``encode(...).ids``, special tokens or not."""
    text = "".join(parts)
    assert (
        ids_encoder(backend)(text, special) == backend.encode(text, add_special_tokens=special).ids
    )


def test_repeated_segments_come_from_the_cache(backend):
    enc = SegmentEncoder.for_backend(backend, min_cached_chars=10)
    assert enc is not None
    system = "a long system prompt that many requests share. " * 20
    for user in ("one", "two", "three"):
        enc.encode(f"<|begin_of_text|>{system}<|eot_id|>{user} question<|eot_id|>")
    assert enc.hits == 2  # the system prompt, after its first encode
    assert enc.misses == 4  # the system prompt once, each user turn once


def test_cache_stays_within_its_memory_budget(backend):
    from epp.token_segments import _cost

    enc = SegmentEncoder.for_backend(backend, max_bytes=5000, min_cached_chars=0)
    assert enc is not None
    for i in range(50):
        enc.encode(f"segment number {i} " * 5 + "<|eot_id|>")
    assert 0 < enc._bytes <= 5000
    assert sum(_cost(k, v) for k, v in enc._cache.items()) == enc._bytes
    assert len(enc._cache) < 50  # the oldest went


@settings(max_examples=200, deadline=None)
@given(st.lists(pieces, max_size=12))
def test_short_pieces_cached_by_count_give_the_same_ids(backend, parts):
    """Short pieces go to their own count-bounded cache; a tiny bound forces it to be
    cleared mid-run, and the ids must not change."""
    enc = SegmentEncoder.for_backend(backend, max_small=3)
    assert enc is not None
    text = "".join(parts)
    expected = backend.encode(text, add_special_tokens=False).ids
    assert enc.encode(text) == expected
    assert enc.encode(text) == expected
    assert len(enc._small) <= 3


def test_short_template_pieces_are_tokenized_once(backend):
    enc = SegmentEncoder.for_backend(backend)
    assert enc is not None
    calls: list[str] = []
    inner = enc._encode_ids

    def counting(text: str, special: bool) -> list[int]:
        calls.append(text)
        return inner(text, special)

    enc._encode_ids = counting
    for user in ("one", "two"):
        enc.encode(f"<|begin_of_text|>system\n<|eot_id|>{user}<|eot_id|>")
    assert calls == ["system\n", "one", "two"]


def test_not_used_when_a_special_token_strips_whitespace(backend):
    data = json.loads(trained_tokenizer_json())
    for tok in data["added_tokens"]:
        if tok["content"] == "<|eot_id|>":
            tok["lstrip"] = True
    stripping = tokenizers.Tokenizer.from_str(json.dumps(data))
    assert SegmentEncoder.for_backend(stripping) is None


def test_not_used_when_only_the_first_piece_gets_a_prefix():
    vocab = {"<unk>": 0, "hello": 1, "▁hello": 2, "world": 3, "▁world": 4}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.add_special_tokens([AddedToken("<s>", special=True, normalized=False)])
    assert SegmentEncoder.for_backend(tok) is None


def test_not_used_without_special_tokens():
    tok = tokenizers.Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    assert SegmentEncoder.for_backend(tok) is None


def test_cached_ids_are_out_of_the_garbage_collectors_reach(backend):
    """Cache entries are tuples of ints, which a collection untracks: a full collection
    then walks none of the cache's ids (as lists, it walked every one)."""
    import gc

    enc = SegmentEncoder.for_backend(backend, min_cached_chars=10)
    assert enc is not None
    for i in range(20):
        enc.encode("<|begin_of_text|>" + f"prompt {i} " * 30 + "<|eot_id|>user\n")
    gc.collect()
    entries = list(enc._cache.values()) + list(enc._small.values())
    assert len(enc._cache) >= 20 and enc._small
    assert not any(gc.is_tracked(ids) for ids in entries)
    text = "<|begin_of_text|>" + "prompt 3 " * 30 + "<|eot_id|>user\n"
    assert enc.encode(text) == backend.encode(text, add_special_tokens=False).ids
