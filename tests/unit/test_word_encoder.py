"""Word-by-word encoding with a cache gives exactly the library's ids, for the tokenizer
shapes where it is used, and is declined for the others."""

from __future__ import annotations

import functools
import json

import pytest
import regex
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

from bench.tiny_tokenizer import _CORPUS, trained_tokenizer_json
from epp.token_segments import ids_encoder
from epp.word_encoder import MAX_CACHED_WORD, WordEncoder, newer_unicode

# Llama 3's word expression (tokenizer.json of Meta-Llama-3).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = ["<|begin_of_text|>", "<|eot_id|>"]


@functools.cache
def gpt2_style() -> tokenizers.Tokenizer:
    """The tests' tiny tokenizer: ByteLevel(use_regex=True), added and special tokens."""
    return tokenizers.Tokenizer.from_str(trained_tokenizer_json())


def train(pre: pre_tokenizers.PreTokenizer, normalizer=None, **bpe) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE(**bpe))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 2, trainer)
    return tok


@functools.cache
def llama3_style() -> tokenizers.Tokenizer:
    return train(
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        ),
        normalizer=normalizers.NFC(),
    )


WORDS = ["the", "The", " cache", "KV", "it's", "we'll", "42", "1234567", "ünï", "文字", "🙂"]
texts = st.lists(
    st.one_of(
        st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
        st.sampled_from(WORDS + SPECIALS + [" ", "  ", "\n", "\r\n", "\t", "'S", "’"]),
    ),
    max_size=30,
).map("".join)


@pytest.mark.parametrize("make", [gpt2_style, llama3_style], ids=["bytelevel", "split+bytelevel"])
@settings(max_examples=300, deadline=None)
@given(text=texts)
def test_encoding_equals_the_library(make, text):
    backend = make()
    enc = WordEncoder.for_backend(backend)
    assert enc is not None
    want = backend.encode(text, add_special_tokens=False).ids
    assert enc.encode(text) == want
    assert enc.encode(text) == want  # again, from the cache


def test_ids_encoder_uses_words_without_specials_and_the_library_with_them():
    backend = gpt2_style()
    encode = ids_encoder(backend)
    text = "<|begin_of_text|>hello there, it's the KV cache"
    assert encode(text, False) == backend.encode(text, add_special_tokens=False).ids
    assert encode(text, True) == backend.encode(text, add_special_tokens=True).ids


def test_a_full_cache_is_emptied_and_results_stay_exact():
    backend = gpt2_style()
    enc = WordEncoder.for_backend(backend, max_words=4)
    assert enc is not None
    text = "one two three four five six seven eight nine ten " * 3
    assert enc.encode(text) == backend.encode(text, add_special_tokens=False).ids
    assert len(enc._cache) <= 4


def test_known_words_are_not_encoded_again():
    backend = gpt2_style()
    enc = WordEncoder.for_backend(backend)
    assert enc is not None
    enc.encode("the cache the cache")
    assert set(enc._cache) == {"the", " cache", " the"}
    size = len(enc._cache)
    enc.encode("the cache the cache the")
    assert len(enc._cache) == size


def edited(backend: tokenizers.Tokenizer, **changes) -> tokenizers.Tokenizer:
    spec = json.loads(backend.to_str())
    for path, value in changes.items():
        node = spec
        *parents, leaf = path.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return tokenizers.Tokenizer.from_str(json.dumps(spec))


@pytest.mark.parametrize(
    "change",
    [
        {"pre_tokenizer__add_prefix_space": True},
        {"pre_tokenizer__use_regex": False},
        {"pre_tokenizer": {"type": "Whitespace"}},
        {"normalizer": {"type": "Lowercase"}},
        {"model__dropout": 0.5},
    ],
    ids=["prefix-space", "no-regex", "whitespace", "lowercase", "dropout"],
)
def test_other_shapes_are_declined(change):
    assert WordEncoder.for_backend(edited(gpt2_style(), **change)) is None


def test_a_split_that_removes_or_inverts_is_declined():
    for behavior in ("removed", "merged_with_previous"):
        tok = train(
            pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(r"\s+"), behavior=behavior),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        )
        assert WordEncoder.for_backend(tok) is None


def test_an_added_token_with_strip_flags_is_declined():
    backend = tokenizers.Tokenizer.from_str(gpt2_style().to_str())
    backend.add_special_tokens([tokenizers.AddedToken("<x>", lstrip=True)])
    assert WordEncoder.for_backend(backend) is None


def test_characters_newer_than_pythons_unicode_go_to_the_library():
    # U+10940 is a letter to the regex module's tables and unassigned to the library's; a
    # merge learned across it makes the two encodings differ unless the guard sends such
    # text to the library.
    c = "\U00010940"
    corpus = [f"hello.{c}world {c}{c} x!{c}y"] * 50 + list(_CORPUS)
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    enc = WordEncoder.for_backend(tok)
    assert enc is not None
    assert newer_unicode(f"hello.{c}world") and not newer_unicode("plain ü text")
    for text in (f"hello.{c}world", f"a{c}\u0558b", "plain text", "plain ü text"):
        assert enc.encode(text) == tok.encode(text, add_special_tokens=False).ids


def test_the_guard_covers_every_character_the_two_classify_differently():
    # The word expressions differ between the two engines only through their character
    # classes. Compare those for every code point the guard lets through.
    chars = "".join(
        chr(cp)
        for cp in range(0x110000)
        if not 0xD800 <= cp < 0xE000 and not newer_unicode(chr(cp))
    )
    for cls in (r"\p{L}", r"\p{N}", r"\s"):
        split = pre_tokenizers.Split(Regex(cls), behavior="removed")
        kept = set()
        for _piece, (start, end) in split.pre_tokenize_str(chars):
            kept.update(range(start, end))
        library = {i for i in range(len(chars)) if i not in kept}
        ours = {m.start() for m in regex.finditer(cls, chars)}
        differ = sorted(library ^ ours)
        assert not differ, f"{cls}: {[hex(ord(chars[i])) for i in differ[:10]]}"


def test_non_normalized_added_tokens_are_matched_before_normalized_ones():
    backend = tokenizers.Tokenizer.from_str(gpt2_style().to_str())
    backend.add_tokens(
        [
            tokenizers.AddedToken("cache", normalized=True),
            tokenizers.AddedToken(" wor", normalized=False),
            tokenizers.AddedToken("ca", normalized=False),
        ]
    )
    enc = WordEncoder.for_backend(backend)
    assert enc is not None
    for text in ("the cache world", "cacache", " world", "cache"):
        assert enc.encode(text) == backend.encode(text, add_special_tokens=False).ids


def test_an_expression_that_can_match_nothing_gives_no_empty_words():
    tok = train(
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(r"\p{L}*"), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    )
    encode = ids_encoder(tok)
    for text in ("abc", "abc def", "ab, cd", ""):
        assert encode(text, False) == tok.encode(text, add_special_tokens=False).ids


def test_long_words_are_not_cached():
    enc = WordEncoder.for_backend(gpt2_style())
    assert enc is not None
    long_word = "x" * (MAX_CACHED_WORD + 1)
    assert enc.encode(long_word) == gpt2_style().encode(long_word, add_special_tokens=False).ids
    assert long_word not in enc._cache


def test_numbers_past_three_characters_are_not_cached():
    enc = WordEncoder.for_backend(gpt2_style())
    assert enc is not None
    text = "order 12 of 123456 and 7"
    assert enc.encode(text) == gpt2_style().encode(text, add_special_tokens=False).ids
    assert " 12" in enc._cache and " 7" in enc._cache
    assert " 123456" not in enc._cache


def test_cached_word_ids_are_out_of_the_garbage_collectors_reach():
    import gc

    backend = gpt2_style()
    enc = WordEncoder.for_backend(backend)
    assert enc is not None
    enc.encode("the cache holds every word it has seen")
    gc.collect()
    assert enc._cache and not any(gc.is_tracked(ids) for ids in enc._cache.values())
