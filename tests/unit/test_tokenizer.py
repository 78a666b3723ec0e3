"""epp.tokenizer produces the token ids the engine computes.

The reference is transformers itself (``AutoTokenizer`` and ``apply_chat_template``), which is
what vLLM calls, loaded from the same tiny model folders. Where vLLM reshapes a request before
transformers sees it (content parts, tool-call arguments, tool dumps, Responses items), the
expected transformers input is written out by hand in the test, so those rules are checked
against an independent statement of them rather than against the module's own code.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers

from epp.tokenizer import (
    Tokenizer,
    TokenizerError,
    detect_content_format,
    resolve_model_dir,
    responses_input_to_messages,
    whole_decode_stream,
)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from tiny_tokenizer import (
    BOS,
    CHATML_TEMPLATE,
    EOT,
    IM_END,
    IM_START,
    LLAMA3_TEMPLATE,
    PARTS_TEMPLATE,
    START_HEADER,
    build_tiny_model,
    copy_model,
    install_in_hf_cache,
)

transformers.logging.set_verbosity_error()

Pair = tuple[Tokenizer, Any]  # (ours, the transformers tokenizer)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "llama3": build_tiny_model(root / "llama3", "llama3"),
        "chatml": build_tiny_model(root / "chatml", "chatml", add_bos=True),
        "parts": build_tiny_model(root / "parts", "parts"),
    }


@pytest.fixture(scope="module")
def pairs(models: dict[str, pathlib.Path]) -> dict[str, Pair]:
    return {kind: load_pair(path) for kind, path in models.items()}


def load_pair(path: pathlib.Path, **kwargs: Any) -> Pair:
    return Tokenizer.load(str(path), **kwargs), transformers.AutoTokenizer.from_pretrained(path)


def ids_of(out: Any) -> list[int]:
    """transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True)."""
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        out = out["input_ids"]
    return [int(i) for i in out]


def hf_chat(hf: Any, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
    kwargs.setdefault("add_generation_prompt", True)
    return ids_of(hf.apply_chat_template(messages, tokenize=True, **kwargs))


def hf_text(hf: Any, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    kwargs.setdefault("add_generation_prompt", True)
    return hf.apply_chat_template(messages, tokenize=False, **kwargs)


def outcome(fn: Callable[[], Any]) -> Any:
    """The result, or "error" when the call refuses (both sides raise ValueError-likes)."""
    try:
        return fn()
    except (ValueError, jinja2.TemplateError):
        return "error"


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict[str, Any]:
    return {"role": "system", "content": text}


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather (°C) for a city — any city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City <name> & country"}},
            "required": ["city"],
        },
    },
}

# --------------------------------------------------------------------------------------------
# Completions prompts

PROMPTS = [
    "",
    " ",
    "Hello world",
    "  leading and trailing  ",
    "line one\nline two\r\n\ttabbed\n\n\n",
    "Café naïve 日本語のテキスト 🚀👩‍💻🇫🇷",
    "def f(x):\n    return x ** 2  # square\n",
    f"{BOS}a prompt that already starts with BOS",
    f"special inside: a{EOT}b{IM_START}c{IM_END}",
    '<tool_call>{"name": "x"}</tool_call>',
    "never seen: ꙮ ᚠ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u0000 \ufeff \u200b",
    "word " * 2000,
]


@pytest.mark.parametrize("text", PROMPTS, ids=range(len(PROMPTS)))
def test_prompt_ids_match_transformers(pairs: dict[str, Pair], text: str) -> None:
    ours, hf = pairs["llama3"]
    ids = ours.encode_prompt(text)
    assert ids == hf(text)["input_ids"]
    assert ids[0] == ours.bos_token_id  # the post-processor's BOS


def test_prompt_without_special_tokens(pairs: dict[str, Pair]) -> None:
    ours, hf = pairs["llama3"]
    ids = ours.encode_prompt("Hello world", add_special_tokens=False)
    assert ids == hf("Hello world", add_special_tokens=False)["input_ids"]
    assert ours.bos_token_id not in ids


TEXT_PIECES = st.one_of(
    st.text(max_size=25),
    st.sampled_from([BOS, EOT, IM_START, IM_END, START_HEADER, "<tool_call>", " ", "\n", "\t"]),
)
TEXTS = st.lists(TEXT_PIECES, max_size=6).map("".join)


@settings(max_examples=150, deadline=None)
@given(text=TEXTS)
def test_random_prompt_ids_match_transformers(pairs: dict[str, Pair], text: str) -> None:
    ours, hf = pairs["llama3"]
    assert ours.encode_prompt(text) == hf(text)["input_ids"]


def test_long_prompt_is_fast(pairs: dict[str, Pair]) -> None:
    ours, _ = pairs["llama3"]
    text = "The cache-aware router sends each request to the warmest pod. " * 700
    start = time.perf_counter()
    ids = ours.encode_prompt(text)
    elapsed = time.perf_counter() - start
    assert len(ids) >= 8000
    assert elapsed < 0.5, f"{len(ids)} tokens took {elapsed:.3f}s"
    # One enormous "word" (no whitespace to split on) is the classic slow case for BPE.
    start = time.perf_counter()
    assert len(ours.encode_prompt("z" * 100_000)) > 1000
    assert time.perf_counter() - start < 2.0


def test_special_token_ids_and_vocab_size(pairs: dict[str, Pair]) -> None:
    ours, hf = pairs["llama3"]
    assert (ours.bos_token_id, ours.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)
    assert ours.eos_token_id is not None and ours.eos_token_id != ours.bos_token_id
    assert ours.vocab_size == len(hf)
    assert ours.special_tokens["eos_token"] == EOT


# --------------------------------------------------------------------------------------------
# Chat: plain conversations

CHATS: list[list[dict[str, Any]]] = [
    [user("hi")],
    [system("You are terse."), user("Summarise: the fox jumps over the dog.")],
    [system(""), user("an empty system message")],
    [system("   \n "), user("a whitespace-only system message")],
    [user("one"), assistant("two"), user("three"), assistant("four"), user("five")],
    [user("Привет 🚀 日本語"), assistant("Ответ: ✓"), user("ещё раз, s'il vous plaît")],
    [user(f"say {EOT} and {IM_END} literally")],
    [user("  padded  \n"), assistant("\n\n"), user("")],
]


@pytest.mark.parametrize("kind", ["llama3", "chatml"])
@pytest.mark.parametrize("chat", CHATS, ids=range(len(CHATS)))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_ids_match_transformers(
    pairs: dict[str, Pair], kind: str, chat: list[dict[str, Any]], generation_prompt: bool
) -> None:
    ours, hf = pairs[kind]
    ids = ours.encode_chat(chat, add_generation_prompt=generation_prompt)
    assert ids == hf_chat(hf, chat, add_generation_prompt=generation_prompt)
    text = ours.render_chat(chat, add_generation_prompt=generation_prompt)
    assert text == hf_text(hf, chat, add_generation_prompt=generation_prompt)


def conversations() -> st.SearchStrategy[list[dict[str, Any]]]:
    """An optional system message, then alternating turns ending with the user's."""

    def alternate(texts: list[str]) -> list[dict[str, Any]]:
        n = len(texts)
        return [(user if (n - 1 - i) % 2 == 0 else assistant)(t) for i, t in enumerate(texts)]

    turns = st.lists(TEXTS, min_size=1, max_size=5).map(alternate)
    return st.tuples(st.one_of(st.none(), TEXTS), turns).map(
        lambda pair: ([system(pair[0])] if pair[0] is not None else []) + pair[1]
    )


@settings(max_examples=60, deadline=None)
@given(chat=conversations(), kind=st.sampled_from(["llama3", "chatml"]))
def test_random_chat_ids_match_transformers(
    pairs: dict[str, Pair], chat: list[dict[str, Any]], kind: str
) -> None:
    ours, hf = pairs[kind]
    assert ours.encode_chat(chat) == hf_chat(hf, chat)


def test_template_bos_is_not_doubled(pairs: dict[str, Pair]) -> None:
    ours, _ = pairs["llama3"]
    ids = ours.encode_chat([user("hi")])
    assert ids[0] == ours.bos_token_id
    assert ids.count(ours.bos_token_id) == 1
    # add_special_tokens=true on a chat request puts the post-processor's BOS in front as well.
    assert ours.encode_chat([user("hi")], add_special_tokens=True) == [ours.bos_token_id, *ids]


def test_chatml_chat_has_no_bos_while_its_prompt_does(pairs: dict[str, Pair]) -> None:
    ours, hf = pairs["chatml"]
    chat_ids = ours.encode_chat([user("hi")])
    assert ours.bos_token_id not in chat_ids
    assert chat_ids[0] == hf.convert_tokens_to_ids(IM_START)
    assert ours.encode_prompt("hi")[0] == ours.bos_token_id


def test_empty_conversation_is_refused(pairs: dict[str, Pair]) -> None:
    with pytest.raises(TokenizerError, match="empty"):
        pairs["llama3"][0].encode_chat([])


def test_message_without_role_is_refused(pairs: dict[str, Pair]) -> None:
    with pytest.raises(TokenizerError, match="role"):
        pairs["llama3"][0].encode_chat([{"content": "hi"}])


# --------------------------------------------------------------------------------------------
# Chat: tools, tool calls, reasoning


def tool_conversation(arguments: Any) -> list[dict[str, Any]]:
    return [
        system("Use tools when they help."),
        user("Weather in Paris?"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21°C"},
        assistant("It is sunny and 21°C in Paris."),
        user("Thanks! And <tomorrow> & after?"),
    ]


@pytest.mark.parametrize("kind", ["llama3", "chatml"])
def test_tool_conversation_matches_transformers(pairs: dict[str, Pair], kind: str) -> None:
    ours, hf = pairs[kind]
    chat = tool_conversation({"city": "Paris"})
    # vLLM passes the assistant's missing content on as an empty string.
    expected = json.loads(json.dumps(chat))
    expected[2]["content"] = ""
    ids = ours.encode_chat(chat, tools=[WEATHER_TOOL])
    assert ids == hf_chat(hf, expected, tools=[WEATHER_TOOL])
    text = ours.render_chat(chat, tools=[WEATHER_TOOL])
    # tojson must neither HTML-escape nor ASCII-escape: the schema arrives verbatim.
    assert "City <name> & country" in text and "(°C) for a city — any city" in text


@pytest.mark.parametrize(
    ("sent", "decoded"),
    [
        ('{"city": "Paris", "days": [1, 2]}', {"city": "Paris", "days": [1, 2]}),
        ("", {}),
        ("not json at all", {}),
        (None, {}),
        ([1, 2], [1, 2]),
    ],
)
def test_tool_call_arguments_are_decoded_like_vllm(
    pairs: dict[str, Pair], sent: Any, decoded: Any
) -> None:
    ours, hf = pairs["chatml"]
    chat = tool_conversation(sent)
    expected = tool_conversation(decoded)
    expected[2]["content"] = ""
    assert ours.encode_chat(chat) == hf_chat(hf, expected)
    assert chat[2]["tool_calls"][0]["function"]["arguments"] == sent  # request left as sent


def test_empty_tool_calls_are_dropped(pairs: dict[str, Pair]) -> None:
    ours, hf = pairs["llama3"]
    chat = [user("hi"), {"role": "assistant", "content": "hello", "tool_calls": []}, user("x")]
    expected = [user("hi"), assistant("hello"), user("x")]
    assert ours.encode_chat(chat) == hf_chat(hf, expected)


def test_tools_are_dumped_as_vllm_dumps_them(pairs: dict[str, Pair]) -> None:
    ours, hf = pairs["chatml"]
    sent = [{"type": "function", "function": {"name": "ping", "strict": True}}]
    dumped = [
        {
            "type": "function",
            "function": {"name": "ping", "description": None, "parameters": None, "strict": True},
        }
    ]
    chat = [user("ping?")]
    assert ours.encode_chat(chat, tools=sent) == hf_chat(hf, chat, tools=dumped)
    assert '"description": null' in ours.render_chat(chat, tools=sent)


def test_reasoning_reaches_the_template_as_reasoning_content(pairs: dict[str, Pair]) -> None:
    ours, hf = pairs["chatml"]
    chat = [user("2+2?"), {"role": "assistant", "content": "4", "reasoning": "\nadd them\n"}]
    chat.append(user("and 3+3?"))
    expected = [
        user("2+2?"),
        {"role": "assistant", "content": "4", "reasoning_content": "\nadd them\n"},
        user("and 3+3?"),
    ]
    assert ours.encode_chat(chat) == hf_chat(hf, expected)
    assert "<think>\nadd them\n</think>" in ours.render_chat(chat)
    # Templates that read `thinking` (gpt-oss style) see the same text.
    template = "{% for m in messages %}{{ m.thinking | default('-') }}|{% endfor %}"
    text = ours.render_chat(chat, chat_template=template)
    assert text == "-|\nadd them\n|-|" == hf_text(hf, expected, chat_template=template)


def test_fields_vllm_does_not_forward_are_dropped(pairs: dict[str, Pair]) -> None:
    ours, hf = pairs["chatml"]
    template = "{% for m in messages %}{{ m | tojson }}\n{% endfor %}"
    chat = [
        {"role": "user", "content": "hi", "name": "ann", "extra": 1, "tool_call_id": "x"},
        {"role": "tool", "content": "r", "tool_call_id": "c9", "name": 5},
    ]
    expected = [
        {"role": "user", "content": "hi", "name": "ann"},
        {"role": "tool", "content": "r", "tool_call_id": "c9"},
    ]
    got = ours.render_chat(chat, chat_template=template, add_generation_prompt=False)
    assert got == hf_text(hf, expected, chat_template=template, add_generation_prompt=False)


# --------------------------------------------------------------------------------------------
# Chat: content parts and the content format


def test_text_parts_are_joined_with_newlines(pairs: dict[str, Pair]) -> None:
    ours, hf = pairs["llama3"]
    chat = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "first"},
                {"type": "image_url", "image_url": {"url": "http://x/cat.png"}},
                "second",
                {"type": "input_text", "text": "third"},
                {"type": "text", "text": None},
            ],
        },
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
        {"role": "user", "content": []},
    ]
    expected = [user("first\nsecond\nthird"), assistant("no"), user("")]
    assert ours.encode_chat(chat) == hf_chat(hf, expected)


def test_unknown_part_type_is_refused(pairs: dict[str, Pair]) -> None:
    with pytest.raises(TokenizerError, match="hologram"):
        pairs["llama3"][0].encode_chat([{"role": "user", "content": [{"type": "hologram"}]}])


def test_content_format_detection() -> None:
    assert detect_content_format(PARTS_TEMPLATE) == "openai"
    assert detect_content_format(LLAMA3_TEMPLATE) == "string"
    assert detect_content_format(CHATML_TEMPLATE) == "string"
    aliased = "{% set ms = messages[1:] %}{% for m in ms %}{% for c in m.content %}{% endfor %}"
    assert detect_content_format(aliased + "{% endfor %}") == "openai"
    unrelated = "{% for m in messages %}{% for c in other.content %}{% endfor %}{% endfor %}"
    assert detect_content_format(unrelated) == "string"
    assert detect_content_format("{% for broken") == "string"


def test_parts_template_gets_text_parts(pairs: dict[str, Pair]) -> None:
    ours, hf = pairs["parts"]
    chat = [
        system("sys"),
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "look:"},
                {"type": "image_url", "image_url": {"url": "http://x/cat.png"}},
                {"type": "text", "text": " what is it?"},
            ],
        },
    ]
    # The openai format wraps string content into a text part too.
    expected = [
        {"role": "system", "content": [{"type": "text", "text": "sys"}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "look:"},
                {"type": "text", "text": " what is it?"},
            ],
        },
    ]
    ids = ours.encode_chat(chat)
    assert ids == hf_chat(hf, expected)
    assert "look: what is it?" in ours.render_chat(chat)  # parts concatenated by the template


def test_string_content_format_can_be_forced(models: dict[str, pathlib.Path]) -> None:
    ours, hf = load_pair(models["parts"], content_format="string")
    chat = [{"role": "user", "content": [{"type": "text", "text": "a"}, "b"]}]
    assert ours.encode_chat(chat) == hf_chat(hf, [user("a\nb")])


def test_tool_results_in_parts_are_flattened_to_a_string(pairs: dict[str, Pair]) -> None:
    ours, hf = pairs["parts"]
    chat = [
        user("q"),
        {"role": "tool", "tool_call_id": "c", "content": [{"type": "text", "text": "r1"}, "r2"]},
    ]
    expected = [
        {"role": "user", "content": [{"type": "text", "text": "q"}]},
        {"role": "tool", "tool_call_id": "c", "content": "r1\nr2"},
    ]
    assert ours.encode_chat(chat) == hf_chat(hf, expected)


# --------------------------------------------------------------------------------------------
# Chat: continue_final_message

CONTINUED = [
    [user("Write a haiku."), assistant("Autumn moonlight—")],
    [user("Count:"), assistant("one two three   ")],  # trailing spaces the llama3 template trims
    [user("Say something"), assistant("")],
    [system("s"), user("x"), assistant("Ответ 🚀 ")],
]


@pytest.mark.parametrize("kind", ["llama3", "chatml"])
@pytest.mark.parametrize("chat", CONTINUED, ids=range(len(CONTINUED)))
def test_continue_final_message_matches_transformers(
    pairs: dict[str, Pair], kind: str, chat: list[dict[str, Any]]
) -> None:
    ours, hf = pairs[kind]
    options = {"add_generation_prompt": False, "continue_final_message": True}
    text = ours.render_chat(chat, **options)
    assert text == hf_text(hf, chat, **options)
    assert ours.encode_chat(chat, **options) == hf_chat(hf, chat, **options)
    # The text stops at the message's end; its trailing whitespace survives unless the
    # template trims it, as llama3's does.
    final = chat[-1]["content"]
    assert text.endswith(final if kind == "chatml" else final.rstrip())
    assert not text.endswith(EOT) and not text.endswith(IM_END + "\n")


def test_continue_final_message_with_parts(pairs: dict[str, Pair]) -> None:
    ours, hf = pairs["parts"]
    chat = [user("q"), {"role": "assistant", "content": [{"type": "text", "text": "The answer"}]}]
    expected = [
        {"role": "user", "content": [{"type": "text", "text": "q"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The answer"}]},
    ]
    options = {"add_generation_prompt": False, "continue_final_message": True}
    assert ours.encode_chat(chat, **options) == hf_chat(hf, expected, **options)
    assert ours.render_chat(chat, **options).endswith("The answer")


@settings(max_examples=50, deadline=None)
@given(chat=conversations(), final=TEXTS, kind=st.sampled_from(["llama3", "chatml"]))
def test_random_continue_final_message_matches_transformers(
    pairs: dict[str, Pair], chat: list[dict[str, Any]], final: str, kind: str
) -> None:
    ours, hf = pairs[kind]
    chat = [*chat, assistant(final)]
    options = {"add_generation_prompt": False, "continue_final_message": True}
    assert outcome(lambda: ours.encode_chat(chat, **options)) == outcome(
        lambda: hf_chat(hf, chat, **options)
    )


def test_continue_with_generation_prompt_is_refused(pairs: dict[str, Pair]) -> None:
    with pytest.raises(TokenizerError, match="continue_final_message"):
        pairs["llama3"][0].encode_chat(
            [user("a"), assistant("b")], add_generation_prompt=True, continue_final_message=True
        )


# --------------------------------------------------------------------------------------------
# Chat: template variables


def test_chat_template_kwargs_reach_the_template(pairs: dict[str, Pair]) -> None:
    ours, hf = pairs["chatml"]
    chat = [user("quick question")]
    thinking_off = ours.encode_chat(chat, chat_template_kwargs={"enable_thinking": False})
    assert thinking_off == hf_chat(hf, chat, enable_thinking=False)
    assert thinking_off != ours.encode_chat(chat)
    assert "<think>\n\n</think>" in ours.render_chat(
        chat, chat_template_kwargs={"enable_thinking": False}
    )


def test_kwargs_override_special_tokens_and_date(pairs: dict[str, Pair]) -> None:
    ours, hf = pairs["llama3"]
    chat = [system("s"), user("u")]
    kwargs = {"date_string": "01 Jan 2030", "bos_token": ""}
    text = ours.render_chat(chat, chat_template_kwargs=kwargs)
    assert text == hf_text(hf, chat, **kwargs)
    assert "Today Date: 01 Jan 2030" in text and not text.startswith(BOS)
    assert ours.encode_chat(chat, chat_template_kwargs=kwargs) == hf_chat(hf, chat, **kwargs)


def test_strftime_now_renders_today(pairs: dict[str, Pair]) -> None:
    ours, _ = pairs["llama3"]
    before = time.strftime("%d %b %Y")
    text = ours.render_chat([system("s"), user("u")])
    assert f"Today Date: {before}" in text or f"Today Date: {time.strftime('%d %b %Y')}" in text


@pytest.mark.parametrize("key", ["tokenize", "chat_template"])
def test_reserved_chat_template_kwargs_are_refused(pairs: dict[str, Pair], key: str) -> None:
    with pytest.raises(TokenizerError, match=key):
        pairs["llama3"][0].encode_chat([user("hi")], chat_template_kwargs={key: True})


def test_generation_prompt_in_kwargs_does_not_override_the_field(pairs: dict[str, Pair]) -> None:
    ours, _ = pairs["llama3"]
    chat = [user("hi")]
    assert ours.render_chat(chat, chat_template_kwargs={"add_generation_prompt": False}).endswith(
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_documents_reach_the_template(pairs: dict[str, Pair]) -> None:
    ours, hf = pairs["llama3"]
    template = "{% for d in documents %}[{{ d.title }}]{% endfor %}{{ messages[0].content }}"
    docs = [{"title": "A", "text": "x"}, {"title": "B", "text": "y"}]
    chat = [user("q")]
    text = ours.render_chat(chat, chat_template=template, documents=docs)
    assert text == "[A][B]q" == hf_text(hf, chat, chat_template=template, documents=docs)
    via_kwargs = ours.render_chat(
        chat, chat_template=template, chat_template_kwargs={"documents": docs}
    )
    assert via_kwargs == text


# --------------------------------------------------------------------------------------------
# Template selection and failures

PLAIN_TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"


@pytest.fixture(scope="module")
def named_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return build_tiny_model(
        tmp_path_factory.mktemp("named") / "m",
        named_templates={
            "default": LLAMA3_TEMPLATE,
            "tool_use": CHATML_TEMPLATE,
            "plain": PLAIN_TEMPLATE,
        },
    )


def test_named_templates_are_chosen_like_transformers(named_dir: pathlib.Path) -> None:
    ours, hf = load_pair(named_dir)
    chat = [user("hi")]
    assert ours.chat_template_names == ["default", "plain", "tool_use"]
    assert ours.render_chat(chat).startswith(BOS)  # default: llama3
    assert ours.encode_chat(chat) == hf_chat(hf, chat)
    with_tools = ours.render_chat(chat, tools=[WEATHER_TOOL])
    assert with_tools.startswith(IM_START)  # tool_use: chatml
    assert ours.encode_chat(chat, tools=[WEATHER_TOOL]) == hf_chat(hf, chat, tools=[WEATHER_TOOL])
    by_name = ours.render_chat(chat, chat_template="plain", add_generation_prompt=False)
    assert by_name == "user: hi\n"
    assert ours.encode_chat(chat, chat_template="plain") == hf_chat(hf, chat, chat_template="plain")
    literal = "{{ messages[0].content | upper }}"
    assert ours.render_chat(chat, chat_template=literal) == "HI"


def test_constructor_template_choice_applies_to_every_request(named_dir: pathlib.Path) -> None:
    ours = Tokenizer.load(str(named_dir), chat_template="plain")
    chat = [user("hi")]
    assert ours.render_chat(chat) == "user: hi\n"
    assert ours.render_chat(chat, tools=[WEATHER_TOOL]) == "user: hi\n"
    with pytest.raises(TokenizerError, match="no_such_template"):
        Tokenizer.load(str(named_dir), chat_template="no_such_template")


def test_template_file_override(tmp_path: pathlib.Path, models: dict[str, pathlib.Path]) -> None:
    path = tmp_path / "override.jinja"
    path.write_text("{{ messages | length }} messages", "utf-8")
    ours = Tokenizer.load(str(models["llama3"]), chat_template=str(path))
    assert ours.render_chat([user("a"), assistant("b"), user("c")]) == "3 messages"


def test_unknown_template_name_per_request(named_dir: pathlib.Path) -> None:
    ours = Tokenizer.load(str(named_dir))
    with pytest.raises(TokenizerError, match="plain"):  # the message lists the known names
        ours.render_chat([user("hi")], chat_template="nonexistent")


def test_named_templates_without_default_need_a_name(tmp_path: pathlib.Path) -> None:
    folder = build_tiny_model(tmp_path / "m", named_templates={"a": PLAIN_TEMPLATE, "b": "B"})
    ours = Tokenizer.load(str(folder))
    with pytest.raises(TokenizerError, match="a, b"):
        ours.render_chat([user("hi")])
    assert ours.render_chat([user("hi")], chat_template="b") == "B"


def test_chat_template_jinja_file_wins_over_config(tmp_path: pathlib.Path) -> None:
    folder = build_tiny_model(
        tmp_path / "m", "chatml", template_file=True, config={"chat_template": PLAIN_TEMPLATE}
    )
    ours, hf = load_pair(folder)
    chat = [user("hi")]
    assert ours.render_chat(chat).startswith(IM_START)
    assert ours.encode_chat(chat) == hf_chat(hf, chat)


def test_additional_template_files_are_named_templates(tmp_path: pathlib.Path) -> None:
    folder = build_tiny_model(tmp_path / "m", "llama3", template_file=True)
    (folder / "additional_chat_templates").mkdir()
    (folder / "additional_chat_templates" / "plain.jinja").write_text(PLAIN_TEMPLATE, "utf-8")
    ours, hf = load_pair(folder)
    chat = [user("hi")]
    assert ours.chat_template_names == ["default", "plain"]
    assert ours.encode_chat(chat) == hf_chat(hf, chat)
    assert ours.encode_chat(chat, chat_template="plain") == hf_chat(hf, chat, chat_template="plain")


def test_epp_module_does_not_import_transformers() -> None:
    code = "import sys, epp.tokenizer; print('transformers' in sys.modules)"
    repo = pathlib.Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo
    )
    assert out.stdout.strip() == "False"


def test_chat_template_json_is_a_fallback(tmp_path: pathlib.Path) -> None:
    folder = build_tiny_model(tmp_path / "m", None)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": PLAIN_TEMPLATE}))
    ours = Tokenizer.load(str(folder))
    assert ours.render_chat([user("hi")]) == "user: hi\n"


def test_model_without_template(tmp_path: pathlib.Path) -> None:
    ours = Tokenizer.load(str(build_tiny_model(tmp_path / "m", None)))
    with pytest.raises(TokenizerError, match="no chat template"):
        ours.render_chat([user("hi")])
    assert ours.encode_prompt("hi")[0] == ours.bos_token_id  # completions still work


def test_raise_exception_carries_the_templates_message(pairs: dict[str, Pair]) -> None:
    ours, hf = pairs["llama3"]
    chat = [user("hi"), {"role": "narrator", "content": "meanwhile"}]
    message = "Conversation roles must be user, assistant or tool; got narrator"
    with pytest.raises(TokenizerError) as caught:
        ours.encode_chat(chat)
    assert str(caught.value) == message
    with pytest.raises(jinja2.TemplateError, match=message):
        hf_chat(hf, chat)


def test_render_failure_is_a_tokenizer_error(pairs: dict[str, Pair]) -> None:
    with pytest.raises(TokenizerError, match="chat template failed"):
        pairs["llama3"][0].render_chat([user("hi")], chat_template="{{ messages.nope.deeper }}")
    with pytest.raises(TokenizerError, match="chat template failed"):
        # The sandbox refuses mutation, as transformers' does.
        pairs["llama3"][0].render_chat([user("hi")], chat_template="{{ messages.append(1) }}")


def test_bad_template_syntax_fails_at_load(tmp_path: pathlib.Path) -> None:
    folder = build_tiny_model(tmp_path / "m", config={"chat_template": "{% for m in messages %}"})
    with pytest.raises(TokenizerError, match="does not compile"):
        Tokenizer.load(str(folder))
    named = build_tiny_model(tmp_path / "n", named_templates={"default": "ok", "broken": "{{ x"})
    with pytest.raises(TokenizerError, match="'broken'"):
        Tokenizer.load(str(named))


def test_render_many_requests_quickly(pairs: dict[str, Pair]) -> None:
    # Compiling the llama3 template takes ~10 ms; 300 requests would take seconds if any of
    # them recompiled it.
    ours, _ = pairs["llama3"]
    chat = [system("s"), user("question"), assistant("answer"), user("follow-up")]
    start = time.perf_counter()
    for _ in range(300):
        ours.encode_chat(chat)
    assert time.perf_counter() - start < 1.5


# --------------------------------------------------------------------------------------------
# Loading: folders, the HF cache, special tokens


def test_missing_folder(tmp_path: pathlib.Path) -> None:
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.load(str(tmp_path / "nowhere" / "deeper" / "still"))


def test_missing_tokenizer_json(tmp_path: pathlib.Path, models: dict[str, pathlib.Path]) -> None:
    folder = copy_model(models["llama3"], tmp_path / "m")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match=r"no tokenizer\.json"):
        Tokenizer.load(str(folder))


def test_model_id_from_hf_cache(
    tmp_path: pathlib.Path, models: dict[str, pathlib.Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hub"
    snapshot = install_in_hf_cache(models["chatml"], cache, "tiny-org/tiny-chat")
    assert (snapshot / "tokenizer.json").is_symlink()
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    ours = Tokenizer.load("tiny-org/tiny-chat")
    reference = Tokenizer.load(str(models["chatml"]))
    chat = [system("s"), user("héllo")]
    assert ours.encode_chat(chat) == reference.encode_chat(chat)
    assert ours.encode_prompt("héllo") == reference.encode_prompt("héllo")
    assert resolve_model_dir("tiny-org/tiny-chat", revision=snapshot.name) == snapshot

    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # cache at $HF_HOME/hub
    assert resolve_model_dir("tiny-org/tiny-chat") == snapshot
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))
    assert resolve_model_dir("tiny-org/tiny-chat", cache_dir=cache) == snapshot


def test_hf_cache_misses_say_where_they_looked(
    tmp_path: pathlib.Path, models: dict[str, pathlib.Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hub"
    install_in_hf_cache(models["chatml"], cache, "tiny-org/tiny-chat")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(TokenizerError, match="models--tiny-org--absent"):
        Tokenizer.load("tiny-org/absent")
    with pytest.raises(TokenizerError, match="revision 'v2'"):
        Tokenizer.load("tiny-org/tiny-chat", revision="v2")


def test_special_token_missing_from_tokenizer_json_is_added(tmp_path: pathlib.Path) -> None:
    folder = build_tiny_model(tmp_path / "m", config={"sep_token": "<|sep|>"})
    ours, hf = load_pair(folder)
    text = "left<|sep|>right <|sep|>"
    assert ours.encode_prompt(text) == hf(text)["input_ids"]
    assert ours.vocab_size == len(hf)
    assert ours.special_tokens["sep_token"] == "<|sep|>"


def test_model_specific_tokens_are_template_variables(tmp_path: pathlib.Path) -> None:
    folder = build_tiny_model(tmp_path / "m", config={"image_token": "<|image|>"})
    ours, hf = load_pair(folder)
    template = "{{ image_token }}{{ messages[0].content }}"
    chat = [user("describe")]
    assert ours.render_chat(chat, chat_template=template) == "<|image|>describe"
    assert ours.encode_chat(chat, chat_template=template) == hf_chat(
        hf, chat, chat_template=template
    )


def test_special_tokens_map_added_token_form(tmp_path: pathlib.Path) -> None:
    # Without added_tokens_decoder in the config, transformers lets special_tokens_map.json win.
    folder = build_tiny_model(
        tmp_path / "m",
        special_tokens_map={
            "eos_token": {"content": IM_END, "lstrip": False, "rstrip": False, "normalized": False},
            "bos_token": BOS,
        },
    )
    ours, hf = load_pair(folder)
    template = "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}"
    chat = [user("x")]
    text = ours.render_chat(chat, chat_template=template)
    assert text == f"{BOS}|{IM_END}|<|pad|>"
    assert text == hf_text(hf, chat, chat_template=template)
    assert ours.eos_token_id == hf.eos_token_id


def test_added_token_dict_form_in_config(tmp_path: pathlib.Path) -> None:
    folder = build_tiny_model(
        tmp_path / "m",
        config={"eos_token": {"__type": "AddedToken", "content": EOT, "special": True}},
    )
    ours, hf = load_pair(folder)
    assert ours.special_tokens["eos_token"] == EOT
    assert ours.eos_token_id == hf.eos_token_id


def test_split_special_tokens(tmp_path: pathlib.Path) -> None:
    folder = build_tiny_model(tmp_path / "m", config={"split_special_tokens": True})
    ours, hf = load_pair(folder)
    text = f"a{EOT}b"
    assert ours.encode_prompt(text) == hf(text)["input_ids"]
    assert ours.eos_token_id not in ours.encode_prompt(text)


def test_saved_truncation_and_padding_are_ignored(tmp_path: pathlib.Path) -> None:
    folder = build_tiny_model(
        tmp_path / "m",
        config={"pad_token": None},
        tokenizer_json_edit={
            "truncation": {
                "direction": "Right",
                "max_length": 4,
                "strategy": "LongestFirst",
                "stride": 0,
            },
            "padding": {
                "strategy": {"Fixed": 64},
                "direction": "Right",
                "pad_to_multiple_of": None,
                "pad_id": 7,
                "pad_type_id": 0,
                "pad_token": "<|pad|>",
            },
        },
    )
    ours, hf = load_pair(folder)
    text = "a prompt much longer than four tokens"
    ids = ours.encode_prompt(text)
    assert ids == hf(text)["input_ids"]
    assert 4 < len(ids) < 64
    assert ours.special_tokens["pad_token"] == hf.pad_token == "<|pad|>"


# --------------------------------------------------------------------------------------------
# /v1/responses


def test_responses_string_input(pairs: dict[str, Pair]) -> None:
    ours, hf = pairs["llama3"]
    ids = ours.encode_responses_input("What is KV caching?", instructions="Be brief.")
    expected = [system("Be brief."), user("What is KV caching?")]
    assert ids == ours.encode_chat(expected) == hf_chat(hf, expected)
    assert ours.encode_responses_input("hi") == hf_chat(hf, [user("hi")])
    assert ours.encode_responses_input("hi", instructions="") == hf_chat(hf, [user("hi")])


def test_responses_items_with_a_tool_round_trip(pairs: dict[str, Pair]) -> None:
    ours, hf = pairs["chatml"]
    items = [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Paris?"}]},
        {"type": "reasoning", "id": "r1", "summary": [], "content": [{"text": "need weather"}]},
        {
            "type": "function_call",
            "call_id": "c1",
            "name": "get_weather",
            "arguments": '{"city": "Paris"}',
        },
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"role": "user", "content": "thanks"},
    ]
    tools = [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]
    expected = [
        user("Paris?"),
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "c1",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                    "type": "function",
                }
            ],
            "reasoning_content": "need weather",
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
        user("thanks"),
    ]
    expected_tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": None,
                "parameters": {"type": "object"},
            },
        }
    ]
    ids = ours.encode_responses_input(items, instructions=None, tools=tools)
    assert ids == hf_chat(hf, expected, tools=expected_tools)


def test_responses_partial_assistant_message_is_continued(pairs: dict[str, Pair]) -> None:
    ours, hf = pairs["chatml"]
    items = [
        {"role": "user", "content": "Finish the sentence."},
        {
            "type": "message",
            "role": "assistant",
            "status": "in_progress",
            "content": [{"type": "output_text", "text": "Once upon a"}],
        },
    ]
    expected = [user("Finish the sentence."), assistant("Once upon a")]
    options = {"add_generation_prompt": False, "continue_final_message": True}
    assert ours.encode_responses_input(items) == hf_chat(hf, expected, **options)
    assert ours.render_responses_input(items).endswith("Once upon a")


def test_responses_items_merge_into_one_assistant_message() -> None:
    messages, continued = responses_input_to_messages(
        [
            {"role": "user", "content": "q"},
            {"type": "reasoning", "summary": [{"text": "hmm"}]},
            {"type": "message", "role": "assistant", "content": [{"text": "a1"}]},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "custom_tool_call", "call_id": "c2", "name": "g", "input": "raw"},
            {"type": "function_call_output", "call_id": "c1", "output": "r1"},
        ],
        instructions="sys",
    )
    assert not continued
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool"]
    merged = messages[2]
    assert (merged["reasoning"], merged["content"]) == ("hmm", "a1")
    calls = [(c["id"], c["function"]["arguments"]) for c in merged["tool_calls"]]
    assert calls == [("c1", "{}"), ("c2", json.dumps({"input": "raw"}))]


def test_responses_encrypted_reasoning_is_refused(pairs: dict[str, Pair]) -> None:
    with pytest.raises(TokenizerError, match="encrypted"):
        pairs["chatml"][0].encode_responses_input(
            [{"role": "user", "content": "q"}, {"type": "reasoning", "encrypted_content": "zz"}]
        )


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(0, 699), max_size=60), skip=st.booleans())
def test_streamed_detokenizing_adds_up_to_decoding_the_whole(models, ids, skip):
    tok = Tokenizer.load(models["llama3"])
    whole = tok.decode(ids, skip_special_tokens=skip)
    for step in (
        tok.decode_stream(skip_special_tokens=skip),
        whole_decode_stream(tok._backend, skip),
    ):
        text = "".join(step(t) for t in ids)
        # Text whose last character is still incomplete when the output ends is never
        # sent (as in vLLM): the stream is the whole text, or a prefix of it when the
        # whole ends in a replacement character.
        assert whole.startswith(text)
        assert text == whole or whole.endswith("\ufffd")
