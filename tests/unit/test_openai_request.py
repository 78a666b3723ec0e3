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
        (
            "/v1/completions",
            body(model="", prompt="x"),
            "'model' must be a non-empty string, not an empty string",
        ),
        (
            "/v1/completions",
            body(model=3, prompt="x"),
            "'model' must be a non-empty string, not the number 3",
        ),
        ("/v1/completions", body(model="m"), "missing 'prompt'"),
        ("/v1/completions", body(model="m", prompt=""), "non-empty"),
        ("/v1/completions", body(model="m", prompt=[]), "non-empty"),
        ("/v1/completions", body(model="m", prompt=[1, "a"]), "'prompt[1]' must be a token id"),
        ("/v1/completions", body(model="m", prompt=[-1]), "'prompt[0]' must be a token id"),
        ("/v1/completions", body(model="m", prompt=[True]), "'prompt' must be a string"),
        (
            "/v1/completions",
            body(model="m", prompt=[[1], []]),
            "'prompt[1]' must be a non-empty list",
        ),
        ("/v1/completions", body(model="m", prompt={"a": 1}), "not an object"),
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


# ------------------------------------------------------------------ hostile input classes


def _reason(path: str, raw: bytes, **kwargs) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse_request(path, raw, **kwargs)
    assert info.value.status == 400
    assert "NoneType" not in info.value.reason and "truncated" not in info.value.reason
    return info.value


def test_deep_nesting_is_refused_before_decoding():
    raw = b'{"model":"m","messages":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    err = _reason("/v1/chat/completions", raw)
    assert err.limit == "json_depth" and "128 levels" in err.reason


def test_depth_limit_counts_nesting_not_brackets_in_strings():
    text = "[[[[ {{{{ " * 100
    raw = body(model="m", messages=[{"role": "user", "content": text}] * 200)
    assert parse_request("/v1/chat/completions", raw, max_json_depth=4).model == "m"
    nested = body(model="m", prompt="x", extra=[[[[1]]]])
    assert parse_request("/v1/completions", nested, max_json_depth=5).model == "m"
    assert _reason("/v1/completions", nested, max_json_depth=4).limit == "json_depth"


def test_without_a_depth_limit_the_decoders_own_limit_is_still_a_400():
    raw = b'{"model":"m","prompt":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    err = _reason("/v1/completions", raw, max_json_depth=0)
    assert err.limit == "json_depth"


def test_a_lone_surrogate_names_its_field():
    raw = (
        b'{"model":"m","messages":[{"role":"user","content":"ok"},'
        b'{"role":"user","content":[{"type":"text","text":"a\\ud800b"}]}]}'
    )
    err = _reason("/v1/chat/completions", raw)
    assert err.param == "messages[1].content[0].text"
    assert "lone UTF-16 surrogate" in err.reason and err.limit is None


def test_a_surrogate_pair_is_fine():
    raw = b'{"model":"m","messages":[{"role":"user","content":"\\ud83d\\ude00"}]}'
    assert parse_request("/v1/chat/completions", raw).messages[0]["content"] == "\U0001f600"


def test_invalid_utf8_and_broken_json_say_where():
    assert (
        "at byte 26"
        in _reason("/v1/completions", b'{"model":"m","prompt":"abc\xed\xa0\x80"}').reason
    )
    err = _reason("/v1/completions", b'{"model":"m",\n "prompt": [1, 2,, 3]}')
    assert "line 2" in err.reason and err.reason.startswith("malformed JSON")


@pytest.mark.parametrize(
    ("messages", "param", "says"),
    [
        ([None], "messages[0]", "must be an object, not null"),
        ([{"role": None, "content": "x"}], "messages[0].role", "must be a string, not null"),
        (
            [{"role": "wizard", "content": "x"}],
            "messages[0].role",
            "'wizard', which is not a known",
        ),
        ([{"role": "user", "content": {"text": "x"}}], "messages[0].content", "not an object"),
        ([{"role": "user", "content": [None]}], "messages[0].content[0]", "not null"),
        ([{"role": "user", "content": [{"type": 3}]}], "messages[0].content[0].type", "a string"),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "user", "content": [{"type": "text", "text": 5}]},
            ],
            "messages[1].content[0].text",
            "must be a string, not the number 5",
        ),
        (
            [{"role": "assistant", "content": None, "tool_calls": {}}],
            "messages[0].tool_calls",
            "list",
        ),
        ([{"role": "assistant", "tool_calls": [None]}], "messages[0].tool_calls[0]", "not null"),
        (
            [{"role": "assistant", "tool_calls": [{"function": None}]}],
            "messages[0].tool_calls[0].function",
            "an object, not null",
        ),
        (
            [{"role": "tool", "content": "r", "tool_call_id": 7}],
            "messages[0].tool_call_id",
            "string",
        ),
        ([{"role": "user", "content": "x", "name": []}], "messages[0].name", "not an array"),
    ],
)
def test_chat_field_errors_name_the_field(messages, param, says):
    err = _reason("/v1/chat/completions", body(model="m", messages=messages))
    assert err.param == param and f"'{param}'" in err.reason and says in err.reason


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": {"a": 1}}, "tools"),
        ({"tools": [None]}, "tools[0]"),
        ({"tools": [{"type": "function", "function": None}]}, "tools[0].function"),
        ({"chat_template_kwargs": "x"}, "chat_template_kwargs"),
        ({"add_generation_prompt": "yes"}, "add_generation_prompt"),
        ({"continue_final_message": 1}, "continue_final_message"),
        ({"stream": None, "echo": 0}, "echo"),
    ],
)
def test_chat_request_field_types(fields, param):
    err = _reason("/v1/chat/completions", body(**CHAT, **fields))
    assert err.param == param


def test_every_known_role_and_part_shape_is_accepted():
    messages = [
        {"role": "system", "content": "s"},
        {"role": "developer", "content": [{"type": "text", "text": "d"}]},
        {"role": "user", "content": ["plain", {"type": "image_url", "image_url": {"url": "u"}}]},
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]},
        {"role": "tool", "content": "r", "tool_call_id": "c"},
        {"role": "function", "content": "r", "name": "f"},
        {"role": "ipython", "content": "r"},
        {"role": "user", "content": [{"type": "text", "text": None}]},  # vLLM skips it
    ]
    req = parse_request("/v1/chat/completions", body(model="m", messages=messages))
    assert len(req.messages) == len(messages)


def test_responses_input_items_are_checked():
    assert _reason("/v1/responses", body(model="m", input=[None])).param == "input[0]"
    err = _reason("/v1/responses", body(model="m", input=[{"role": "user", "content": 1}]))
    assert err.param == "input[0].content"
    ok = [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}]
    assert parse_request("/v1/responses", body(model="m", input=ok)).api == "responses"
