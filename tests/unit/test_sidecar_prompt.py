"""The sidecar's prompt ids: the EPP's token_data checked and used, or the same tokenization
the EPP does; bad ids refused with the field named; and which requests go passthrough."""

from __future__ import annotations

import pytest
from tiny_tokenizer import build_tiny_model

from epp.tokenizer import Tokenizer
from sidecar.prompt import PromptBuilder, PromptError, passthrough_reason

MESSAGES = [{"role": "user", "content": "the quick brown fox jumps over the lazy dog " * 20}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return Tokenizer.load(str(build_tiny_model(tmp_path_factory.mktemp("t") / "m")))


def test_without_token_data_the_ids_are_the_epps(tok):
    b = PromptBuilder(tok, max_model_len=8192)
    p = b.build("chat", {"messages": MESSAGES})
    assert p.token_ids == tok.encode_chat(MESSAGES) and p.source == "tokenized"
    p = b.build("completions", {"prompt": "hello there"})
    assert p.token_ids == tok.encode_prompt("hello there")
    p = b.build("completions", {"prompt": [[5, 6, 7]]})
    assert p.token_ids == [5, 6, 7]
    p = b.build("responses", {"input": "hello"})
    assert p.token_ids == tok.encode_responses_input("hello")


def test_matching_token_data_is_used_and_a_mismatch_falls_back(tok):
    b = PromptBuilder(tok, max_model_len=8192)
    ids = tok.encode_chat(MESSAGES)
    p = b.build("chat", {"messages": MESSAGES, "nvext": {"token_data": ids}})
    assert p.source == "token_data" and p.checked == "fingerprint" and p.token_ids == ids
    other = tok.encode_chat([{"role": "user", "content": "something else entirely " * 20}])
    p = b.build("chat", {"messages": MESSAGES, "nvext": {"token_data": other}})
    assert p.mismatch and p.source == "tokenized" and p.token_ids == ids
    cut = ids[:-3]
    p = b.build("chat", {"messages": MESSAGES, "nvext": {"token_data": cut}})
    assert p.mismatch and p.token_ids == ids
    assert b.mismatches == 2


@pytest.mark.parametrize(
    ("token_data", "why"),
    [
        ([], "non-empty"),
        ([1, -3], r"token_data\[1\]"),
        ([1, True], r"token_data\[1\]"),
        ([1, 10**9], r"token_data\[1\]"),
        ("1 2 3", "list"),
    ],
)
def test_bad_token_data_is_refused_with_the_field_named(tok, token_data, why):
    b = PromptBuilder(tok, max_model_len=8192)
    with pytest.raises(PromptError, match=why) as err:
        b.build("chat", {"messages": MESSAGES, "nvext": {"token_data": token_data}})
    assert err.value.status == 400


def test_a_prompt_over_the_context_is_a_400(tok):
    b = PromptBuilder(tok, max_model_len=64)
    with pytest.raises(PromptError) as err:
        b.build("completions", {"prompt": list(range(100)), "max_tokens": 1})
    assert err.value.status == 400


def test_without_a_tokenizer_only_ranges_are_checked():
    b = PromptBuilder(None, max_model_len=1000, vocab_size=500)
    p = b.build("chat", {"messages": MESSAGES, "nvext": {"token_data": [1, 2, 3]}})
    assert p.token_ids == [1, 2, 3] and p.checked == "range"
    with pytest.raises(PromptError, match=r"0\.\.499"):
        b.build("chat", {"messages": MESSAGES, "nvext": {"token_data": [1, 600]}})
    with pytest.raises(PromptError, match="--tokenizer"):
        b.build("chat", {"messages": MESSAGES})


@pytest.mark.parametrize(
    ("api", "body", "reason"),
    [
        ("chat", {"messages": MESSAGES}, None),
        ("chat", {"messages": MESSAGES, "tools": [{"type": "function"}]}, "tools"),
        (
            "chat",
            {"messages": MESSAGES, "response_format": {"type": "json_object"}},
            "response_format",
        ),
        ("chat", {"messages": MESSAGES, "n": 2}, "n > 1"),
        (
            "chat",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "multimodal content",
        ),
        ("completions", {"prompt": "x", "echo": True}, "echo"),
        ("completions", {"prompt": ["a", "b"]}, "a batch of 2 prompts"),
        ("completions", {"prompt": "x"}, None),
    ],
)
def test_what_takes_the_passthrough_path(api, body, reason):
    assert passthrough_reason(api, body) == reason
