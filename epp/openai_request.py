"""What the EPP reads from an OpenAI-style request body, and the 400s it gives for bad ones.

:func:`parse_request` takes the request path and the whole body and returns a
:class:`ParsedRequest`, or raises :class:`RequestError` (HTTP status 400 and a short reason
that goes back to the client). The API is chosen by the path's suffix, as the Inference
Extension's reference parser does (specs/epp-protocol.md §6); a path with no known suffix is
read as a completions request, because the conformance suite posts ``{"model", "prompt"}``
to arbitrary paths.

What is checked is what routing needs, no more: a JSON object with a non-empty string
``model``; for chat a non-empty ``messages`` list of objects with a string ``role``; for
completions a non-empty ``prompt`` (text, texts, token ids, or lists of token ids); for
responses an ``input`` (text or items); ``stream`` a boolean; token limits non-negative
integers; ``nvext`` an object whose ``agent_hints.priority`` / ``agent_hints.osl`` are
integers. Everything else is left for the model server to judge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import msgspec

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


class RequestError(ValueError):
    """A request the EPP refuses; ``status`` is the HTTP status, ``reason`` says why."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


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


def _is_token_ids(value: Any) -> bool:
    return bool(value) and all(
        t.__class__ is int and 0 <= t < 1 << 32
        for t in value  # bool is not int here
    )


def _check_prompt(prompt: Any) -> None:
    if isinstance(prompt, str):
        if prompt:
            return
    elif isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return
        if _is_token_ids(prompt):
            return
        if all(isinstance(p, list) and _is_token_ids(p) for p in prompt):
            return
        raise RequestError(
            "'prompt' must be a string, a list of strings, a list of token ids, or a list "
            "of lists of token ids"
        )
    raise RequestError("'prompt' must be non-empty")


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"'messages[{i}]' must be an object")
        if not isinstance(message.get("role"), str):
            raise RequestError(f"'messages[{i}].role' must be a string")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise RequestError(f"'messages[{i}].content' must be a string or a list of parts")


def _int_field(obj: dict[str, Any], name: str, where: str, minimum: int | None) -> int | None:
    value = obj.get(name)
    if value is None:
        return None
    if value.__class__ is not int or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise RequestError(f"'{where}{name}' must be an integer{bound}")
    return value


def parse_request(path: str, body: bytes | bytearray | memoryview) -> ParsedRequest:
    """Parse and check one request body (see the module docstring for what is checked)."""
    try:
        doc = _decode_json(body)
    except msgspec.DecodeError as exc:
        raise RequestError(f"malformed JSON: {exc}") from None
    except UnicodeDecodeError:
        raise RequestError("malformed JSON: the body is not UTF-8") from None
    if not isinstance(doc, dict):
        raise RequestError(f"the body must be a JSON object, not {type(doc).__name__}")
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("missing 'model'")
    api = api_of_path(path)
    if api == "chat":
        _check_messages(doc.get("messages"))
    elif api == "completions":
        if "prompt" not in doc:
            raise RequestError("missing 'prompt'")
        _check_prompt(doc["prompt"])
    elif api == "responses":
        value = doc.get("input")
        if not isinstance(value, str | list) or not value:
            raise RequestError("'input' must be a non-empty string or list of items")
    elif api == "embeddings":
        if doc.get("input") in (None, "", []):
            raise RequestError("missing 'input'")
    elif not isinstance(doc.get("items"), list):
        raise RequestError("'items' must be a list")

    stream = doc.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be a boolean")
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
            raise RequestError("'nvext' must be an object")
        hints = nvext.get("agent_hints")
        if hints is not None:
            if not isinstance(hints, dict):
                raise RequestError("'nvext.agent_hints' must be an object")
            priority = _int_field(hints, "priority", "nvext.agent_hints.", None)
            osl = _int_field(hints, "osl", "nvext.agent_hints.", 0)
        if cache_salt is None:
            cache_salt = nvext.get("cache_salt")
    if cache_salt is not None and not isinstance(cache_salt, str):
        raise RequestError("'cache_salt' must be a string")
    return ParsedRequest(api, model, doc, stream, max_tokens, priority, osl, cache_salt or None)
