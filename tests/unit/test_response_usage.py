"""Token usage from the tail of a relayed response: JSON bodies, SSE streams, the Responses
API, and what is not usage."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from epp.response_usage import TAIL_BYTES, Usage, UsageTail, parse_usage


def tail_of(*chunks: bytes) -> Usage | None:
    t = UsageTail()
    for c in chunks:
        t.feed(c)
    return t.usage()


CHAT = {
    "id": "chatcmpl-1",
    "choices": [{"message": {"content": "hi", "usage": "not this one"}}],
    "usage": {
        "prompt_tokens": 100,
        "completion_tokens": 7,
        "total_tokens": 107,
        "prompt_tokens_details": {"cached_tokens": 64},
    },
    "kv_transfer_params": None,
}


def test_json_response():
    assert tail_of(json.dumps(CHAT).encode()) == Usage(100, 7, 64)


def test_sse_stream_takes_the_usage_event_not_the_nulls():
    events = [{"choices": [{"delta": {"content": str(i)}}], "usage": None} for i in range(50)]
    events.append({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 50}})
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    assert tail_of(body, b"data: [DONE]\n\n") == Usage(9, 50, None)


def test_responses_api_completed_event():
    event = {
        "type": "response.completed",
        "response": {
            "id": "resp_1",
            "usage": {
                "input_tokens": 30,
                "output_tokens": 4,
                "input_tokens_details": {"cached_tokens": 16},
            },
        },
    }
    assert tail_of(b"event: response.completed\ndata: " + json.dumps(event).encode()) == Usage(
        30, 4, 16
    )


def test_a_long_response_holds_little_and_still_finds_usage():
    t = UsageTail()
    filler = b"data: " + b"x" * 1000 + b"\n\n"
    for _ in range(200):
        t.feed(filler)
        assert len(t._buf) == 0  # nothing kept while no usage key has passed
    t.feed(json.dumps({"usage": {"prompt_tokens": 1, "completion_tokens": 2}}).encode())
    for _ in range(50):
        t.feed(filler)  # whatever follows the key is kept only up to the bound
    assert len(t._buf) <= TAIL_BYTES
    assert t.usage() == Usage(1, 2)


def test_usage_followed_by_a_large_field_is_found():
    doc = {"usage": {"prompt_tokens": 1, "completion_tokens": 2}, "prompt_logprobs": "y" * 40000}
    assert tail_of(json.dumps(doc).encode()) == Usage(1, 2)


def test_a_key_cut_at_every_point_is_found():
    data = b'{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}'
    for cut in range(len(data) + 1):
        assert tail_of(data[:cut], data[cut:]) == Usage(3, 4), cut
    one_byte_chunks = [data[i : i + 1] for i in range(len(data))]
    assert tail_of(*one_byte_chunks) == Usage(3, 4)


def test_no_or_bad_usage_is_none():
    assert tail_of(b"") is None
    assert tail_of(b'{"usage": null}') is None
    assert tail_of(b'{"usage": {"prompt_tokens": "12", "completion_tokens": 3}}') is None
    assert tail_of(b'{"usage": {"prompt_tokens": -1, "completion_tokens": 3}}') is None
    assert tail_of(b'{"usage": {"prompt_tokens": 1, "completion_tokens": tr') is None
    assert parse_usage([1, 2]) is None
    assert parse_usage({"prompt_tokens": True, "completion_tokens": 1}) is None


@given(
    prompt=st.integers(0, 10**7),
    completion=st.integers(0, 10**6),
    cached=st.none() | st.integers(0, 10**7),
    cuts=st.lists(st.integers(0, 400), max_size=6),
)
def test_any_chunking_gives_the_same_usage(prompt, completion, cached, cuts):
    usage: dict = {"prompt_tokens": prompt, "completion_tokens": completion}
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    data = json.dumps({"choices": [{"text": "ü" * 50}], "usage": usage}).encode()
    points = sorted({min(c, len(data)) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert tail_of(*chunks) == Usage(prompt, completion, cached)


def test_absurd_nesting_is_none_not_an_exception():
    # Deeper than Python's recursion limit, and still inside the tail.
    deep = b'{"usage": {"a": ' + b"[" * 7000 + b"]" * 7000 + b"}}"
    assert len(deep) < TAIL_BYTES
    assert tail_of(deep) is None
