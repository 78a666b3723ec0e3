"""The context length check: where the length comes from, the bounds that spare tokenizing,
and vLLM's words for a prompt that cannot fit."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from tiny_tokenizer import build_tiny_model

from epp import context_length
from epp.context_length import PromptTooLong
from epp.token_budget import DeadlineReached, TokenBudget
from epp.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return Tokenizer.load(str(build_tiny_model(tmp_path_factory.mktemp("m") / "tiny", "llama3")))


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"max_position_embeddings": 8192}, 8192),
        ({"n_positions": 1024, "max_position_embeddings": 2048}, 1024),  # the smallest key
        ({"seq_length": 32768}, 32768),
        ({"text_config": {"max_position_embeddings": 4096}, "max_position_embeddings": 9}, 4096),
        (
            {
                "max_position_embeddings": 32768,
                "rope_scaling": {"type": "yarn", "factor": 4.0,
                                 "original_max_position_embeddings": 32768},
            },
            131072,
        ),
        ({"max_position_embeddings": 4096, "rope_scaling": {"type": "linear", "factor": 2}}, 8192),
        # Llama 3.1's scaling already states the stretched length.
        (
            {"max_position_embeddings": 131072,
             "rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
            131072,
        ),
        ({"hidden_size": 4096}, None),
        ({"max_position_embeddings": 10**30}, None),
    ],
)  # fmt: skip
def test_the_length_is_derived_from_the_model_config_as_vllm_does(config, expected):
    assert context_length.from_model_config(config) == expected


def test_a_folder_prefers_config_json_then_the_tokenizer_config(tmp_path: Path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 2048}))
    assert context_length.from_model_folder(tmp_path) == (
        2048,
        "tokenizer_config.json model_max_length",
    )
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    assert context_length.from_model_folder(tmp_path) == (4096, "config.json")
    (tmp_path / "config.json").write_text("{not json")
    assert context_length.from_model_folder(tmp_path)[0] == 2048
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1e30}))
    assert context_length.from_model_folder(tmp_path) == (None, "none")


def test_the_tokenizer_reports_its_folder_s_length(tok: Tokenizer):
    assert tok.max_model_len == 8192  # the tiny model's tokenizer_config.json
    assert tok.max_chars_per_token >= len("<|start_header_id|>")


def test_vllm_wording():
    assert context_length.refusal(8192, 64, PromptTooLong(tokens=8129)) == (
        "You passed 8129 input tokens and requested 64 output tokens. However, the model's "
        "context length is only 8192 tokens, resulting in a maximum input length of 8128 "
        "tokens. Please reduce the length of the input prompt."
    )
    text = context_length.refusal(100, None, PromptTooLong(chars=5000, max_chars=1900))
    assert text.startswith("You passed 5000 input characters and requested 0 output tokens.")
    assert "(at most 1900 characters)" in text
    assert "max_tokens=9000 cannot be greater than max_model_len=8192" in (
        context_length.output_refusal(8192, 9000, "max_tokens")
    )


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_a_prompt_that_fits_gives_the_same_ids_with_or_without_a_budget(tok: Tokenizer):
    for words in (10, 30_000):  # the second is past the whole-text shortcut
        text = " ".join(f"word{i % 97}" for i in range(words))
        whole = tok.encode_chat(_user(text))
        assert tok.encode_chat(_user(text), budget=TokenBudget(len(whole))) == whole
        assert tok.encode_chat(_user(text), budget=TokenBudget(None, time.monotonic() + 60)) == (
            whole
        )
        prompt = tok.encode_prompt(text)
        assert tok.encode_prompt(text, budget=TokenBudget(len(prompt))) == prompt


def test_one_token_over_the_limit_is_refused_with_the_exact_count(tok: Tokenizer):
    ids = tok.encode_chat(_user("a short question about caches"))
    with pytest.raises(PromptTooLong) as info:
        tok.encode_chat(_user("a short question about caches"), budget=TokenBudget(len(ids) - 1))
    assert info.value.tokens == len(ids)


def test_a_text_longer_than_the_character_bound_is_refused_without_tokenizing(
    tok: Tokenizer, monkeypatch
):
    monkeypatch.setattr(tok, "_encode_whole", lambda *a: pytest.fail("tokenized"))
    monkeypatch.setattr(tok, "_encode_within", lambda *a: pytest.fail("tokenized"))
    limit = 100
    text = "x" * (limit * tok.max_chars_per_token + 1)
    with pytest.raises(PromptTooLong) as info:
        tok.encode_prompt(text, budget=TokenBudget(limit))
    assert info.value.chars == len(text)
    assert info.value.max_chars == limit * tok.max_chars_per_token


def test_a_long_prompt_stops_just_past_the_limit(tok: Tokenizer):
    text = " ".join(f"word{i}" for i in range(200_000))
    limit = 150_000
    assert len(text) < limit * tok.max_chars_per_token  # so the character bound lets it in
    started = time.perf_counter()
    with pytest.raises(PromptTooLong) as info:
        tok.encode_chat(_user(text), budget=TokenBudget(limit))
    bounded = time.perf_counter() - started
    assert limit < info.value.tokens < limit + 8 * 256  # stopped within a few checks
    started = time.perf_counter()
    total = len(tok.encode_chat(_user(text + " again")))  # a fresh text: not cached
    whole = time.perf_counter() - started
    assert total > 3 * limit
    assert bounded < whole  # stopping early is the point


def test_the_bytes_bound_spares_the_count_for_short_byte_level_texts(tok: Tokenizer):
    text = "hello world " * 10
    assert tok._fits_by_bytes(text, len(text), False)
    assert not tok._fits_by_bytes(text, len(text) - 1, False)
    # non-ASCII: counted in UTF-8 bytes
    assert not tok._fits_by_bytes("é" * 10, 15, False)
    assert tok._fits_by_bytes("é" * 10, 20, False)


def test_a_deadline_stops_a_long_encoding(tok: Tokenizer):
    text = " ".join(f"unseen{i}" for i in range(300_000))
    with pytest.raises(DeadlineReached):
        tok.encode_chat(_user(text), budget=TokenBudget(None, time.monotonic() - 1))
