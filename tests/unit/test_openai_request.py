"""OpenAI request parsing for routing (epp.openai_request)."""

from __future__ import annotations

import json

import pytest

from epp.openai_request import RequestError, api_of_path, parse_request


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("path", "api"),
    [
        ("/v1/chat/completions", "chat"),
        ("/v1/chat/completions?x=1", "chat"),
        ("/v1/completions/", "completions"),
        ("/v1/responses", "responses"),
        ("/v1/embeddings", "embeddings"),
        ("/v1/conversations", "conversations"),
        ("/anything/else", "completions"),
        ("/", "completions"),
    ],
)
def test_api_from_path_suffix(path, api):
    assert api_of_path(path) == api


def test_chat_request_fields():
    req = parse_request(
        "/v1/chat/completions",
        body(
            **CHAT,
            stream=True,
            max_completion_tokens=64,
            max_tokens=5,
            nvext={"agent_hints": {"priority": -2, "osl": 300}, "cache_salt": "tenant"},
        ),
    )
    assert (req.api, req.model, req.stream, req.max_tokens) == ("chat", "m", True, 64)
    assert (req.priority, req.osl, req.cache_salt) == (-2, 300, "tenant")
    assert req.messages == CHAT["messages"] and req.prompt is None


@pytest.mark.parametrize(
    "prompt", ["text", ["a", "b"], [1, 2, 3], [[1, 2], [3]], [0, (1 << 32) - 1]]
)
def test_completion_prompt_forms(prompt):
    req = parse_request("/v1/completions", body(model="m", prompt=prompt, max_tokens=0))
    assert req.prompt == prompt and req.max_tokens == 0 and req.stream is False


def test_body_cache_salt_wins_and_defaults():
    req = parse_request(
        "/v1/completions", body(model="m", prompt="x", cache_salt="a", nvext={"cache_salt": "b"})
    )
    assert req.cache_salt == "a"
    req = parse_request("/v1/completions", body(model="m", prompt="x", stream=None))
    assert (req.cache_salt, req.priority, req.osl, req.max_tokens, req.stream) == (None,) * 4 + (
        False,
    )


def test_responses_and_others():
    req = parse_request("/v1/responses", body(model="m", input="hello", max_output_tokens=9))
    assert (req.api, req.max_tokens) == ("responses", 9)
    assert parse_request("/v1/embeddings", body(model="m", input=["a"])).api == "embeddings"
    assert parse_request("/v1/conversations", body(model="m", items=[])).api == "conversations"
    # The conformance suite's shape on an arbitrary path.
    assert parse_request("/test", body(model="conformance-fake-model", prompt="p")).model == (
        "conformance-fake-model"
    )


@pytest.mark.parametrize(
    ("path", "raw", "says"),
    [
        ("/v1/completions", b"{", "malformed JSON"),
        ("/v1/completions", b"\xff\xfe", "malformed JSON"),
        ("/v1/completions", b"", "malformed JSON"),
        ("/v1/completions", b"[1]", "must be a JSON object"),
        ("/v1/completions", body(prompt="x"), "missing 'model'"),
        ("/v1/completions", body(model="", prompt="x"), "missing 'model'"),
        ("/v1/completions", body(model=3, prompt="x"), "missing 'model'"),
        ("/v1/completions", body(model="m"), "missing 'prompt'"),
        ("/v1/completions", body(model="m", prompt=""), "non-empty"),
        ("/v1/completions", body(model="m", prompt=[]), "non-empty"),
        ("/v1/completions", body(model="m", prompt=[1, "a"]), "'prompt' must be"),
        ("/v1/completions", body(model="m", prompt=[-1]), "'prompt' must be"),
        ("/v1/completions", body(model="m", prompt=[True]), "'prompt' must be"),
        ("/v1/completions", body(model="m", prompt=[[1], []]), "'prompt' must be"),
        ("/v1/completions", body(model="m", prompt={"a": 1}), "non-empty"),
        ("/v1/chat/completions", body(model="m"), "'messages' must be a non-empty list"),
        ("/v1/chat/completions", body(model="m", messages=[]), "non-empty list"),
        (
            "/v1/chat/completions",
            body(model="m", messages=["hi"]),
            "'messages[0]' must be an object",
        ),
        ("/v1/chat/completions", body(model="m", messages=[{"content": "x"}]), "role"),
        (
            "/v1/chat/completions",
            body(model="m", messages=[{"role": "user", "content": 5}]),
            "content",
        ),
        ("/v1/chat/completions", body(**CHAT, stream="yes"), "'stream' must be a boolean"),
        (
            "/v1/chat/completions",
            body(**CHAT, max_tokens=-1),
            "'max_tokens' must be an integer >= 0",
        ),
        ("/v1/chat/completions", body(**CHAT, max_tokens=1.5), "'max_tokens' must be an integer"),
        ("/v1/chat/completions", body(**CHAT, nvext=[1]), "'nvext' must be an object"),
        ("/v1/chat/completions", body(**CHAT, nvext={"agent_hints": 1}), "agent_hints' must be"),
        (
            "/v1/chat/completions",
            body(**CHAT, nvext={"agent_hints": {"priority": "high"}}),
            "priority' must be an integer",
        ),
        (
            "/v1/chat/completions",
            body(**CHAT, nvext={"agent_hints": {"osl": -5}}),
            "osl' must be an integer >= 0",
        ),
        ("/v1/chat/completions", body(**CHAT, cache_salt=7), "'cache_salt' must be a string"),
        ("/v1/responses", body(model="m", input=""), "'input'"),
        ("/v1/responses", body(model="m", input=3), "'input'"),
        ("/v1/embeddings", body(model="m"), "missing 'input'"),
        ("/v1/conversations", body(model="m"), "'items' must be a list"),
    ],
)
def test_bad_requests_are_400_with_a_reason(path, raw, says):
    with pytest.raises(RequestError) as info:
        parse_request(path, raw)
    assert info.value.status == 400
    assert says in info.value.reason
