"""What the EPP reads from an OpenAI-style request body, and the 400s it gives for bad ones.

:func:`parse_request` takes the request path and the whole body and returns a
:class:`ParsedRequest`, or raises :class:`RequestError` (HTTP status 400 and a reason that
goes back to the client and names the offending field, e.g. ``'messages[2].content[0].text'
must be a string, not null``). The API is chosen by the path's suffix, as the Inference
Extension's reference parser does (specs/epp-protocol.md §6); a path with no known suffix is
read as a completions request, because the conformance suite posts ``{"model", "prompt"}``
to arbitrary paths.

Before decoding, a body with more brackets than ``max_json_depth`` is scanned (compiled, GIL
released) for nesting deeper than that: such a body is refused without being decoded, as a
recursive decoder would otherwise exhaust the stack. A body the fast decoder refuses is
re-read by the standard one only to say precisely what is wrong (a lone UTF-16 surrogate,
invalid UTF-8, or where the JSON breaks).

What is checked is what routing and tokenization read, no more: a JSON object with a
non-empty string ``model``; for chat a non-empty ``messages`` list of objects, each with a
known ``role`` (system, developer, user, assistant, tool, function, ipython), a ``content``
that is null, a string or a list of parts (objects with a string ``type``, text parts holding
strings), ``tool_calls`` a list of objects with a ``function`` object, ``name`` /
``tool_call_id`` strings; ``tools`` a list of objects; ``chat_template_kwargs`` an object;
``add_generation_prompt`` / ``continue_final_message`` / ``add_special_tokens`` booleans; for
completions a non-empty ``prompt`` (text, texts, token ids, or lists of token ids); for
responses an ``input`` (text or a list of objects); ``stream`` a boolean; token limits
non-negative integers; ``nvext`` an object whose ``agent_hints.priority`` /
``agent_hints.osl`` are integers. Everything else is left for the model server to judge.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from epp.native import json_depth_exceeds

Api = Literal["chat", "completions", "responses", "embeddings", "conversations"]

# Path suffix → API, longest first (``/chat/completions`` also ends in ``/completions``).
_SUFFIXES: tuple[tuple[str, Api], ...] = (
    ("/chat/completions", "chat"),
    ("/completions", "completions"),
    ("/responses", "responses"),
    ("/embeddings", "embeddings"),
    ("/conversations", "conversations"),
)

# The body field that limits output tokens, per API (the first one present wins).
_LIMIT_FIELDS: dict[Api, tuple[str, ...]] = {
    "chat": ("max_completion_tokens", "max_tokens"),
    "completions": ("max_tokens",),
    "responses": ("max_output_tokens",),
    "embeddings": (),
    "conversations": (),
}

_decode_json = msgspec.json.Decoder().decode


def _brackets(body: bytes | bytearray | memoryview) -> int:
    """How many ``[`` and ``{`` the body holds: an upper bound on its nesting depth."""
    data = body if not isinstance(body, memoryview) else body.obj
    if not isinstance(data, bytes | bytearray) or len(data) != len(body):
        data = bytes(body)
    return data.count(b"[") + data.count(b"{")


class RequestError(ValueError):
    """A request the EPP refuses: ``status`` is the HTTP status, ``reason`` says why,
    ``param`` names the offending field when there is one, and ``limit`` names the EPP limit
    that refused it (``json_depth``), None for plain malformed input."""

    def __init__(
        self,
        reason: str,
        status: int = 400,
        *,
        param: str | None = None,
        limit: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.param = param
        self.limit = limit


@dataclass(slots=True)
class ParsedRequest:
    """An OpenAI request as the EPP sees it. ``body`` is the decoded JSON object."""

    api: Api
    model: str
    body: dict[str, Any]
    stream: bool = False
    max_tokens: int | None = None
    priority: int | None = None
    """``nvext.agent_hints.priority``: a scheduling hint; negative means sheddable."""
    osl: int | None = None
    """``nvext.agent_hints.osl``: the client's expected output length in tokens."""
    cache_salt: str | None = None

    @property
    def messages(self) -> list[dict[str, Any]] | None:
        return self.body.get("messages") if self.api == "chat" else None

    @property
    def prompt(self) -> Any:
        return self.body.get("prompt") if self.api == "completions" else None


def api_of_path(path: str) -> Api:
    """The API a request path addresses (query string ignored); unknown paths are completions."""
    path = path.split("?", 1)[0].rstrip("/")
    for suffix, api in _SUFFIXES:
        if path.endswith(suffix):
            return api
    return "completions"


def kind_of(value: Any) -> str:
    """The JSON name of a decoded value's type, for messages a client can act on."""
    if value is None:
        return "null"
    if value is True or value is False:
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value}" if abs(value) < 1e15 else "a number"
    if isinstance(value, str):
        return "a string" if value else "an empty string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__  # pragma: no cover - JSON decodes to the types above


def _wrong(field: str, expected: str, value: Any) -> RequestError:
    return RequestError(f"'{field}' must be {expected}, not {kind_of(value)}", param=field)


def _is_token_ids(value: Any) -> bool:
    return bool(value) and all(
        t.__class__ is int and 0 <= t < 1 << 32
        for t in value  # bool is not int here
    )


_PROMPT_FORMS = "a string, a list of strings, a list of token ids, or a list of lists of token ids"


def _check_prompt(prompt: Any) -> None:
    if isinstance(prompt, str):
        if prompt:
            return
    elif isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, str):
            for i, p in enumerate(prompt):
                if not isinstance(p, str):
                    raise _wrong(f"prompt[{i}]", "a string like the other prompts", p)
            return
        if first.__class__ is int:
            if not _is_token_ids(prompt):
                i, bad = next((i, t) for i, t in enumerate(prompt) if not _is_token_ids((t,)))
                raise _wrong(f"prompt[{i}]", "a token id (an integer in [0, 2**32))", bad)
            return
        if isinstance(first, list):
            for i, p in enumerate(prompt):
                if not isinstance(p, list) or not _is_token_ids(p):
                    raise RequestError(
                        f"'prompt[{i}]' must be a non-empty list of token ids (integers in "
                        "[0, 2**32))",
                        param=f"prompt[{i}]",
                    )
            return
        raise RequestError(f"'prompt' must be {_PROMPT_FORMS}", param="prompt")
    elif prompt is not None and not isinstance(prompt, list):
        raise _wrong("prompt", _PROMPT_FORMS, prompt)
    raise RequestError("'prompt' must be non-empty", param="prompt")


ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function", "ipython"})
"""The message roles the EPP accepts: OpenAI's, plus Llama 3's ``ipython`` tool role."""

# Content-part types whose text lives in a field named like this (the rest are media or
# tool references, passed on for the engine to judge).
_TEXT_FIELD = {
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "refusal": "refusal",
    "thinking": "thinking",
}
_CHAT_BOOLS = ("add_generation_prompt", "continue_final_message", "add_special_tokens", "echo")


def _check_parts(parts: list[Any], where: str) -> None:
    for j, part in enumerate(parts):
        if part.__class__ is str:
            continue
        at = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise _wrong(at, "an object (a content part) or a string", part)
        kind = part.get("type")
        if kind is None:
            continue  # typeless parts are recognised by their keys, or refused, later
        if not isinstance(kind, str):
            raise _wrong(f"{at}.type", "a string", kind)
        name = _TEXT_FIELD.get(kind)
        if name is not None:
            text = part.get(name)
            if text is not None and not isinstance(text, str):
                raise _wrong(f"{at}.{name}", "a string", text)


def _check_message(message: Any, i: int) -> None:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise _wrong(where, "an object", message)
    role = message.get("role")
    if role not in ROLES:
        if not isinstance(role, str):
            raise _wrong(f"{where}.role", "a string", role)
        raise RequestError(
            f"'{where}.role' is {role[:40]!r}, which is not a known role; use one of "
            + ", ".join(sorted(ROLES)),
            param=f"{where}.role",
        )
    content = message.get("content")
    if content is not None and content.__class__ is not str:
        if not isinstance(content, list):
            raise _wrong(f"{where}.content", "a string or a list of content parts", content)
        _check_parts(content, f"{where}.content")
    for name in ("name", "tool_call_id"):
        value = message.get(name)
        if value is not None and not isinstance(value, str):
            raise _wrong(f"{where}.{name}", "a string", value)
    calls = message.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise _wrong(f"{where}.tool_calls", "a list of tool calls", calls)
        for k, call in enumerate(calls):
            at = f"{where}.tool_calls[{k}]"
            if not isinstance(call, dict):
                raise _wrong(at, "an object", call)
            function = call.get("function")
            if not isinstance(function, dict):
                raise _wrong(f"{at}.function", "an object", function)
            fname = function.get("name")
            if fname is not None and not isinstance(fname, str):
                raise _wrong(f"{at}.function.name", "a string", fname)


def _check_chat(doc: dict[str, Any]) -> None:
    messages = doc.get("messages")
    if not isinstance(messages, list):
        raise _wrong("messages", "a non-empty list of messages", messages)
    if not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    for i, message in enumerate(messages):
        _check_message(message, i)
    tools = doc.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _wrong("tools", "a list of tools", tools)
        for k, tool in enumerate(tools):
            if not isinstance(tool, dict):
                raise _wrong(f"tools[{k}]", "an object", tool)
            if tool.get("type", "function") == "function" and not isinstance(
                tool.get("function"), dict
            ):
                raise _wrong(f"tools[{k}].function", "an object", tool.get("function"))
    kwargs = doc.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise _wrong("chat_template_kwargs", "an object", kwargs)
    for name in _CHAT_BOOLS:
        value = doc.get(name)
        if value is not None and value is not True and value is not False:
            raise _wrong(name, "a boolean", value)


def _check_input(value: Any) -> None:
    if isinstance(value, str):
        if value:
            return
    elif isinstance(value, list):
        if value:
            for i, item in enumerate(value):
                if not isinstance(item, dict):
                    raise _wrong(f"input[{i}]", "an object (an input item)", item)
                content = item.get("content")
                if content is None or content.__class__ is str:
                    continue
                if not isinstance(content, list):
                    raise _wrong(f"input[{i}].content", "a string or a list of parts", content)
                _check_parts(content, f"input[{i}].content")
            return
    else:
        raise _wrong("input", "a string or a list of input items", value)
    raise RequestError("'input' must be non-empty", param="input")


def _int_field(obj: dict[str, Any], name: str, where: str, minimum: int | None) -> int | None:
    value = obj.get(name)
    if value is None:
        return None
    if value.__class__ is not int or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise RequestError(
            f"'{where}{name}' must be an integer{bound}, not {kind_of(value)}"
            if value.__class__ is not int
            else f"'{where}{name}' must be an integer{bound}, not {value}",
            param=f"{where}{name}",
        )
    return value


def _path_to_surrogate(doc: Any) -> str | None:
    """Where (``messages[0].content``) the first string holding a lone surrogate is."""
    stack: list[tuple[str, Any]] = [("", doc)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return where or "the body"
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                if _SURROGATE.search(key):
                    return f"{where}.{key!r}" if where else repr(key)
                stack.append((f"{where}.{key}" if where else key, item))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in reversed(list(enumerate(value))))
    return None


_SURROGATE = re.compile("[\ud800-\udfff]")


def _malformed(body: bytes | bytearray | memoryview, exc: Exception) -> RequestError:
    """The 400 for a body the fast decoder refused, saying what is wrong where."""
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as bad:
        return RequestError(f"malformed JSON: the body is not valid UTF-8 (at byte {bad.start})")
    try:
        # Only reached on error; the standard decoder accepts what msgspec refuses as
        # "truncated" (lone surrogate escapes), so that the reason can name the field.
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        return RequestError(f"malformed JSON: {err.msg} (line {err.lineno}, column {err.colno})")
    except RecursionError:  # pragma: no cover - the depth scan runs first
        return RequestError("malformed JSON: nested too deeply", limit="json_depth")
    where = _path_to_surrogate(doc)
    if where is not None:
        return RequestError(
            f"'{where}' holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its "
            "pair), which is not valid Unicode",
            param=where,
        )
    return RequestError(f"malformed JSON: {exc}")


def parse_request(
    path: str, body: bytes | bytearray | memoryview, *, max_json_depth: int = 128
) -> ParsedRequest:
    """Parse and check one request body (see the module docstring for what is checked).

    ``max_json_depth`` bounds how deep arrays and objects may nest (0: no bound beyond the
    decoder's own recursion limit, which is also answered with a 400)."""
    deep = (
        max_json_depth
        and _brackets(body) > max_json_depth
        and json_depth_exceeds(body, max_json_depth)
    )
    if deep:
        raise RequestError(
            f"the JSON body nests arrays and objects more than {max_json_depth} levels deep",
            limit="json_depth",
        )
    try:
        doc = _decode_json(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise _malformed(body, exc) from None
    except RecursionError:
        raise RequestError(
            "the JSON body nests arrays and objects too deeply", limit="json_depth"
        ) from None
    if not isinstance(doc, dict):
        raise RequestError(f"the body must be a JSON object, not {kind_of(doc)}")
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        if model is None:
            raise RequestError("missing 'model'", param="model")
        raise _wrong("model", "a non-empty string", model)
    api = api_of_path(path)
    if api == "chat":
        _check_chat(doc)
    elif api == "completions":
        if "prompt" not in doc:
            raise RequestError("missing 'prompt'", param="prompt")
        _check_prompt(doc["prompt"])
    elif api == "responses":
        _check_input(doc.get("input"))
    elif api == "embeddings":
        if doc.get("input") in (None, "", []):
            raise RequestError("missing 'input'", param="input")
    elif not isinstance(doc.get("items"), list):
        raise _wrong("items", "a list", doc.get("items"))

    stream = doc.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _wrong("stream", "a boolean", stream)
    max_tokens = None
    for name in _LIMIT_FIELDS[api]:
        max_tokens = _int_field(doc, name, "", 0)
        if max_tokens is not None:
            break

    priority = osl = None
    cache_salt = doc.get("cache_salt")
    nvext = doc.get("nvext")
    if nvext is not None:
        if not isinstance(nvext, dict):
            raise _wrong("nvext", "an object", nvext)
        hints = nvext.get("agent_hints")
        if hints is not None:
            if not isinstance(hints, dict):
                raise _wrong("nvext.agent_hints", "an object", hints)
            priority = _int_field(hints, "priority", "nvext.agent_hints.", None)
            osl = _int_field(hints, "osl", "nvext.agent_hints.", 0)
        if cache_salt is None:
            cache_salt = nvext.get("cache_salt")
    if cache_salt is not None and not isinstance(cache_salt, str):
        raise _wrong("cache_salt", "a string", cache_salt)
    return ParsedRequest(api, model, doc, stream, max_tokens, priority, osl, cache_salt or None)
