"""Tokenize a request exactly as the model server (vLLM) will, so KV block hashes match.

The EPP hashes the prompt's token ids into KV-cache blocks and looks them up in the index of
what each engine holds. A single differing token id shifts every later block, so the ids here
must be the ones vLLM computes for the same request. vLLM tokenizes with the Hugging Face
tokenizer (``AutoTokenizer``) and renders chats with ``apply_chat_template``; this module
reproduces that pipeline with only the Rust ``tokenizers`` library and ``jinja2``, because
``transformers`` is far too heavy for the EPP.

What is reproduced:

* **Loading**, offline only: a model folder, or a model id found in the local Hugging Face cache
  (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``). The
  ``tokenizer.json`` pipeline is used as saved (normalizer, pre-tokenizer, model, post-processor);
  truncation and padding saved in it are switched off, as ``transformers`` does for a plain call.
  Named special tokens missing from the tokenizer's added tokens are added as special tokens,
  and ``split_special_tokens`` is honoured, as ``transformers`` 5 does.
* **Completions** (:meth:`Tokenizer.encode_prompt`): ``add_special_tokens=True``, so BOS (or
  whatever the post-processor adds) is included.
* **Chat** (:meth:`Tokenizer.render_chat`, :meth:`Tokenizer.encode_chat`): first vLLM's message
  parsing (content parts, ``tool_calls`` argument decoding, the fields vLLM keeps), then
  ``transformers``' template rendering (sandboxed jinja2 with the same filters and globals,
  special tokens as variables, reasoning-field aliases, ``continue_final_message`` trimming),
  then encoding with ``add_special_tokens=False`` (the template supplies BOS).
* **Responses** (:meth:`Tokenizer.encode_responses_input`): vLLM's conversion of ``input`` and
  ``instructions`` into chat messages, then the chat path.

What is not: multimodal inputs (image/audio/video parts are dropped; the engine expands them to
placeholder tokens the EPP cannot know), Mistral's ``tokenizer_mode=mistral``, models whose
``transformers`` tokenizer class rebuilds the pipeline instead of reading ``tokenizer.json``,
and processor-level chat templates of multimodal models (``chat_template.json`` is only used
when the tokenizer has no template of its own).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, NoReturn

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.sandbox
import tokenizers

from epp import context_length
from epp.context_length import PromptTooLong
from epp.token_budget import TokenBudget, TokenLimitReached
from epp.token_segments import SegmentEncoder, ids_encoders

__all__ = [
    "ContentFormat",
    "Tokenizer",
    "TokenizerError",
    "detect_content_format",
    "hf_hub_cache_dir",
    "resolve_model_dir",
    "responses_input_to_messages",
    "responses_tools_to_chat",
]

ContentFormat = Literal["auto", "string", "openai"]
"""How message content reaches the template (vLLM's ``--chat-template-content-format``):
``string`` joins the text parts into one string, ``openai`` keeps a list of
``{"type": "text", "text": ...}`` parts, ``auto`` picks ``openai`` when the template loops over
a message's content and ``string`` otherwise."""


class TokenizerError(ValueError):
    """The tokenizer cannot be loaded, or a request cannot be tokenized as the engine would.

    For a template's own ``raise_exception(message)``, ``str(error)`` is exactly ``message``.
    """


# --------------------------------------------------------------------------------------------
# Finding the files, offline.


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder, resolved from the environment as ``huggingface_hub``
    does: ``$HF_HUB_CACHE`` (or the older ``$HUGGINGFACE_HUB_CACHE``), else ``$HF_HOME/hub``,
    else ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if value := os.environ.get(var):
            return Path(value).expanduser()
    if value := os.environ.get("HF_HOME"):
        return Path(value).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def _looks_like_repo_id(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else (absolute, relative, deeper) is a path.
    if not name or name.startswith(("/", ".", "~")) or "\\" in name:
        return False
    parts = name.split("/")
    return len(parts) <= 2 and all(parts)


def resolve_model_dir(
    name_or_path: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """The local folder holding the tokenizer files for ``name_or_path``; never downloads.

    An existing folder is returned as is. Otherwise ``name_or_path`` must be a hub model id
    (``org/name``) present in the hub cache (``cache_dir``, default :func:`hf_hub_cache_dir`),
    laid out as ``models--{org}--{name}/snapshots/<commit>/`` with ``refs/<revision>`` (default
    ``main``) naming the commit; ``revision`` may also be a commit hash with a snapshot folder.

    Raises :class:`TokenizerError` naming the folder or cache entry that is missing.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if not _looks_like_repo_id(name_or_path):
        raise TokenizerError(f"tokenizer folder {str(path)!r} does not exist")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else hf_hub_cache_dir()
    repo_dir = cache / ("models--" + name_or_path.replace("/", "--"))
    if not repo_dir.is_dir():
        raise TokenizerError(
            f"{name_or_path!r} is not a local folder and is not in the Hugging Face cache "
            f"(no {repo_dir}); the EPP never downloads, so put the model there first"
        )
    rev = revision or "main"
    ref = repo_dir / "refs" / rev
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
    elif (repo_dir / "snapshots" / rev).is_dir():
        commit = rev
    else:
        raise TokenizerError(
            f"{name_or_path!r} is in the Hugging Face cache but revision {rev!r} is not "
            f"(no {ref} and no snapshot folder of that name)"
        )
    snapshot = repo_dir / "snapshots" / commit
    if not snapshot.is_dir():
        raise TokenizerError(f"{ref} names commit {commit!r} but {snapshot} does not exist")
    return snapshot


# --------------------------------------------------------------------------------------------
# The template environment: the same one transformers builds for apply_chat_template.


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers marks assistant text with it for
    training masks); rendering only needs the body, in its own scope."""

    tags = {"generation"}  # noqa: RUF012 - jinja reads this class attribute as is

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson escapes <, >, & and ' for HTML, which would change the prompt text.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> NoReturn:
    raise TokenizerError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _make_env() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _make_env()


@functools.lru_cache(maxsize=64)
def _compile(source: str) -> jinja2.Template:
    # Compiling a template costs milliseconds; requests reuse a handful of templates.
    try:
        return _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(
            f"chat template does not compile: {e.message} (template line {e.lineno})"
        ) from e


@functools.lru_cache(maxsize=64)
def detect_content_format(source: str) -> Literal["string", "openai"]:
    """``"openai"`` when the template loops over a message's content (``{% for part in
    message['content'] %}``, through filters, tests or slices, with ``messages`` reached through
    ``{% set %}`` aliases), else ``"string"``; the rule vLLM's ``auto`` content format uses.
    A template that does not parse counts as ``"string"``."""
    try:
        tree = _ENV.parse(source)
    except jinja2.TemplateSyntaxError:
        return "string"
    loops = list(tree.find_all(jinja2.nodes.For))
    message_lists = _aliases_of(tree, "messages")
    message_vars = {
        loop.target.name
        for loop in loops
        if isinstance(loop.target, jinja2.nodes.Name) and _reads(loop.iter, message_lists)
    }
    if any(_reads(loop.iter, message_vars, key="content") for loop in loops):
        return "openai"
    return "string"


def _reads(node: jinja2.nodes.Node, names: set[str], key: str | None = None) -> bool:
    """Whether ``node`` is one of ``names`` (or its ``key`` item/attribute), possibly filtered,
    tested or sliced."""
    while (isinstance(node, jinja2.nodes.Filter | jinja2.nodes.Test) and node.node is not None) or (
        isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Slice)
    ):
        node = node.node
    if key is not None:
        if isinstance(node, jinja2.nodes.Getitem):
            if not (isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == key):
                return False
        elif not (isinstance(node, jinja2.nodes.Getattr) and node.attr == key):
            return False
        node = node.node
    return isinstance(node, jinja2.nodes.Name) and node.ctx == "load" and node.name in names


def _aliases_of(tree: jinja2.nodes.Template, name: str) -> set[str]:
    """``name`` plus every variable ``{% set %}`` to it (or to a filtered or sliced form of it),
    transitively."""
    names = {name}
    assigns = list(tree.find_all(jinja2.nodes.Assign))
    grew = True
    while grew:
        grew = False
        for assign in assigns:
            target = assign.target
            if (
                isinstance(target, jinja2.nodes.Name)
                and target.name not in names
                and _reads(assign.node, names)
            ):
                names.add(target.name)
                grew = True
    return names


# --------------------------------------------------------------------------------------------
# vLLM's side: request messages and tools -> the conversation handed to apply_chat_template.

_TEXT_PART_FIELDS = {
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "refusal": "refusal",
    "thinking": "thinking",
}
# Media parts: the engine turns them into placeholder tokens the EPP cannot predict.
_MEDIA_PART_TYPES = frozenset(
    {
        "image_url",
        "input_image",
        "image_pil",
        "image_embeds",
        "audio_url",
        "input_audio",
        "audio_embeds",
        "video_url",
        "prompt_embeds",
    }
)
_MEDIA_PART_KEYS = ("image_url", "image_pil", "image_embeds", "audio_url", "input_audio")


def _content_parts(role: str, content: Any, fmt: Literal["string", "openai"]) -> Any:
    """A message's content as vLLM hands it to the template: one string (``string``) or a list of
    text parts (``openai``). Media parts are dropped."""
    if content is None:
        parts: Sequence[Any] = []
    elif isinstance(content, str):
        parts = [content]
    elif isinstance(content, list):
        parts = content
    else:
        raise TokenizerError(f"{role} message content must be a string or a list of parts")
    out: list[Any] = []
    for part in parts:
        if isinstance(part, str):
            out.append({"type": "text", "text": part} if fmt == "openai" else part)
            continue
        if not isinstance(part, Mapping):
            raise TokenizerError(f"{role} message content parts must be objects or strings")
        kind = part.get("type")
        if kind in _TEXT_PART_FIELDS:
            text = part.get(_TEXT_PART_FIELDS[kind])
            if text is None:
                continue  # vLLM skips a text part without text
            if not isinstance(text, str):
                raise TokenizerError(f"{role} message {kind} part must hold a string")
            out.append({"type": "text", "text": text} if fmt == "openai" else text)
        elif kind == "tool_reference" or (kind is None and "tool_reference" in part):
            # Deferred-tool references stay structured for the template (vLLM does the same).
            tool = part.get("name")
            out.append({"type": "tool_reference", "name": tool} if fmt == "openai" else tool)
        elif kind in _MEDIA_PART_TYPES or (
            kind is None and any(k in part for k in (*_MEDIA_PART_KEYS, "video_url"))
        ):
            continue
        else:
            raise TokenizerError(f"unsupported content part type {kind!r} in a {role} message")
    if fmt == "openai":
        return out
    return "\n".join(str(text) for text in out)


def _conversation(
    messages: Sequence[Mapping[str, Any]], fmt: Literal["string", "openai"]
) -> list[dict[str, Any]]:
    """vLLM's parse of request messages: only the fields vLLM passes on, content in ``fmt``,
    ``tool_calls`` arguments decoded from JSON (``{}`` when they are not valid JSON)."""
    conversation: list[dict[str, Any]] = []
    for message in messages:
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise TokenizerError("each message must be an object with a string 'role'")
        role: str = message["role"]
        out: dict[str, Any] = {
            "role": role,
            "content": _content_parts(role, message.get("content"), fmt),
        }
        if role == "assistant":
            tool_calls = message.get("tool_calls")
            if tool_calls is not None:
                out["tool_calls"] = _decoded_tool_calls(tool_calls)
            reasoning = message.get("reasoning")
            if reasoning is not None:
                out["reasoning"] = reasoning
                out["reasoning_content"] = reasoning
        elif role == "tool":
            if "tool_call_id" in message:
                out["tool_call_id"] = message["tool_call_id"]
            content = out["content"]
            # vLLM flattens all-text tool results to a string: most templates expect one.
            if isinstance(content, list) and all(p.get("type") == "text" for p in content):
                out["content"] = "\n".join(p["text"] for p in content)
        if isinstance(message.get("name"), str):
            out["name"] = message["name"]
        if isinstance(message.get("task"), str):
            out["task"] = message["task"]
        if role == "developer":
            out["tools"] = message.get("tools")
        conversation.append(out)
    return conversation


def _decoded_tool_calls(tool_calls: Any) -> Any:
    """Tool calls with each ``function.arguments`` decoded as vLLM does: JSON text becomes data
    (``{}`` if it is not valid JSON), anything but a dict or list becomes ``{}``. New dicts are
    built; the request is not modified. An empty list becomes ``None`` (the key is dropped, which
    keeps templates on their plain-assistant path)."""
    if not isinstance(tool_calls, list):
        return tool_calls
    calls = []
    for call in tool_calls:
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping):
            raise TokenizerError("each assistant tool call must have a 'function' object")
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            # Templates expect arguments as data, not the JSON text OpenAI clients send.
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = {}
        elif not isinstance(arguments, dict | list):
            arguments = {}
        calls.append({**call, "function": {**function, "arguments": arguments}})
    return calls or None


_FUNCTION_FIELDS = ("name", "description", "parameters")


def _vllm_tool(tool: Any) -> Any:
    """A chat ``tools`` entry as vLLM's request model dumps it: ``type`` and ``function`` first,
    the function's ``name``, ``description`` and ``parameters`` always present (``None`` when
    absent), unknown keys kept after them."""
    if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
        return tool
    function = tool.get("function")
    if not isinstance(function, Mapping):
        raise TokenizerError("each function tool must have a 'function' object")
    fn = {field: function.get(field) for field in _FUNCTION_FIELDS}
    fn.update({k: v for k, v in function.items() if k not in fn})
    out: dict[str, Any] = {"type": "function", "function": fn}
    out.update({k: v for k, v in tool.items() if k not in out})
    return out


# --------------------------------------------------------------------------------------------
# /v1/responses: input items -> chat messages, the way vLLM converts them.


def responses_input_to_messages(
    input: str | Sequence[Mapping[str, Any]], instructions: str | None = None
) -> tuple[list[dict[str, Any]], bool]:
    """The chat messages vLLM builds from a Responses request, and whether the final message is
    to be continued (the last item is a message or reasoning item with status ``in_progress``
    or ``incomplete``).

    ``instructions`` (if non-empty) becomes a leading system message; a string ``input`` one
    user message. Items: ``function_call`` / ``custom_tool_call`` become assistant tool calls,
    ``reasoning`` assistant reasoning, ``function_call_output`` / ``custom_tool_call_output``
    tool messages, assistant ``message`` items assistant text; consecutive assistant pieces
    merge into one assistant message as vLLM merges them. Other items (user, system and
    developer messages) pass through.
    """
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    if isinstance(input, str):
        messages.append({"role": "user", "content": input})
        return messages, False
    if not isinstance(input, Sequence):
        raise TokenizerError("responses input must be a string or a list of items")
    for item in input:
        if not isinstance(item, Mapping):
            raise TokenizerError("each responses input item must be an object")
        message = _message_from_item(item, messages[-1] if messages else None)
        if message is not None:
            messages.append(message)
    last = input[-1] if input else None
    continue_final = (
        isinstance(last, Mapping)
        and last.get("type", "message") in ("message", "reasoning")
        and last.get("status") in ("in_progress", "incomplete")
    )
    return messages, continue_final


def _message_from_item(
    item: Mapping[str, Any], previous: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The message for one Responses item, or ``None`` when it was merged into ``previous``."""
    assistant = previous if previous is not None and previous.get("role") == "assistant" else None
    kind = item.get("type")
    if kind in ("function_call", "custom_tool_call"):
        arguments = (
            item.get("arguments")
            if kind == "function_call"
            else json.dumps({"input": item.get("input")})
        )
        call = {
            "id": item.get("call_id"),
            "function": {"name": item.get("name"), "arguments": arguments},
            "type": "function",
        }
        if assistant is not None and isinstance(assistant.get("tool_calls", []), list):
            assistant.setdefault("tool_calls", []).append(call)
            return None
        return {"role": "assistant", "tool_calls": [call]}
    if kind == "reasoning":
        if item.get("encrypted_content"):
            raise TokenizerError("encrypted reasoning content cannot be tokenized")
        reasoning = _first_text(item.get("content")) or _first_text(item.get("summary")) or ""
        if assistant is not None and assistant.get("reasoning") is None:
            assistant["reasoning"] = reasoning
            return None
        return {"role": "assistant", "reasoning": reasoning}
    if kind in ("function_call_output", "custom_tool_call_output"):
        return {"role": "tool", "content": item.get("output"), "tool_call_id": item.get("call_id")}
    if item.get("role") == "assistant":
        content = item.get("content")
        text = content if isinstance(content, str) else _first_text(content)
        if text is not None:
            if assistant is not None and assistant.get("content") is None:
                assistant["content"] = text
                return None
            return {"role": "assistant", "content": text}
    return dict(item)


def _first_text(parts: Any) -> str | None:
    if isinstance(parts, list) and parts and isinstance(parts[0], Mapping):
        text = parts[0].get("text")
        return text if isinstance(text, str) else None
    return None


def responses_tools_to_chat(tools: Sequence[Mapping[str, Any]] | None) -> list[Any] | None:
    """Responses ``tools`` in chat form: each flat function tool (``{"type": "function",
    "name", ...}``) becomes ``{"type": "function", "function": {...}}``; other tool kinds
    (built-in, MCP) are not rendered by the chat template and are left out. ``None`` when
    no function tools remain."""
    if not tools:
        return None
    out = [
        _vllm_tool({"type": "function", "function": {k: v for k, v in t.items() if k != "type"}})
        for t in tools
        if isinstance(t, Mapping) and t.get("type") == "function"
    ]
    return out or None


# --------------------------------------------------------------------------------------------
# transformers' side: apply_chat_template's handling around the template itself.

_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# apply_chat_template parameters: if present in chat_template_kwargs they never reach the
# template as variables.
_NOT_TEMPLATE_VARS = frozenset(
    {
        "conversation",
        "tools",
        "documents",
        "add_generation_prompt",
        "continue_final_message",
        "sanitize_control_tokens",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)
_NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


def _template_messages(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keys whose value is ``None`` dropped; reasoning copied under ``thinking`` (unless set)
    and ``reasoning_content``, the names templates read."""
    out = []
    for message in conversation:
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next(
            (message[f] for f in _REASONING_FIELDS if message.get(f) is not None), None
        )
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _tag_final_message(messages: list[dict[str, Any]], source: str) -> str:
    """Mark the end of the final message's content so the render can be cut there; returns the
    text being continued."""
    if "content" not in source:
        raise TokenizerError(
            "continue_final_message is set but the chat template never reads 'content'"
        )
    final = messages[-1].get("content")
    if final is None:
        raise TokenizerError("continue_final_message is set but the final message has no content")
    if isinstance(final, list):
        for part in reversed(final):
            if isinstance(part, dict) and "text" in part:
                text = part["text"]
                part["text"] = text + _CONTINUE_TAG
                return text
        raise TokenizerError("continue_final_message is set but the final message has no text")
    if not isinstance(final, str):
        raise TokenizerError("continue_final_message needs string or text-part content")
    messages[-1]["content"] = final + _CONTINUE_TAG
    return final


def _cut_at_tag(rendered: str, final: str) -> str:
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in rendered or tag not in rendered:
        raise TokenizerError(
            "continue_final_message is set but the chat template drops part of the final "
            "message, so it cannot be continued"
        )
    at = rendered.rindex(tag)
    if rendered[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:at]
    # The template trimmed the message's trailing whitespace (and the tag's space with it).
    return rendered[:at].rstrip()


# --------------------------------------------------------------------------------------------


def _token_text(value: Any) -> str | None:
    """A special token's text from its saved forms: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from e


def _read_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from e


class Tokenizer:
    """One model's tokenizer and chat templates, producing the token ids vLLM computes.

    Instances are immutable after construction (apart from the segment cache, which has its
    own lock) and safe to share between threads. Build one with :meth:`load`; the constructor
    is for callers that already hold the parts. Chat text is encoded through a
    :class:`~epp.token_segments.SegmentEncoder` when that is exact for this tokenizer, so a
    system prompt or an earlier turn seen before is not tokenized again.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: Mapping[str, str] | None = None,
        chat_templates: str | Mapping[str, str] | None = None,
        chat_template: str | None = None,
        content_format: ContentFormat = "auto",
        name: str = "",
    ) -> None:
        """``backend`` is used as is (the caller disables truncation and padding);
        ``special_tokens`` are the template variables such as ``bos_token``;
        ``chat_templates`` is the model's template, or its named templates; ``chat_template``
        overrides the choice for every request (a template name, or template text, like vLLM's
        ``--chat-template``). Every template is compiled here, so a broken one raises
        :class:`TokenizerError` now rather than on a request."""
        if content_format not in ("auto", "string", "openai"):
            raise TokenizerError(f"unknown content format {content_format!r}")
        self._backend = backend
        self._encode_ids, self._encode_bounded = ids_encoders(backend)
        self._segments = SegmentEncoder.for_backend(
            backend, encode_ids=self._encode_ids, encode_bounded=self._encode_bounded
        )
        self._special_frame = _special_frame(backend)
        self._byte_factor = _byte_bound_factor(backend)
        self._max_chars_per_token: int | None = None
        self.max_model_len: int | None = None
        """The model's context length as its folder states it (set by :meth:`load`; see
        :mod:`epp.context_length`), None when unknown."""
        self.max_model_len_source = "none"
        self._special_tokens = dict(special_tokens or {})
        self._named: dict[str, str] = {}
        self._default: str | None = None
        if isinstance(chat_templates, str):
            self._default = chat_templates
        elif chat_templates is not None:
            self._named = dict(chat_templates)
            self._default = self._named.get("default")
        self._override = chat_template
        self._content_format: ContentFormat = content_format
        self.name = name
        sources = [("default", self._default), *self._named.items()]
        if chat_template is not None:
            sources.append(("override", self._select_template(chat_template, None)))
        for label, source in sources:
            if source is not None:
                try:
                    _compile(source)
                except TokenizerError as e:
                    raise TokenizerError(f"{name or 'model'} chat template {label!r}: {e}") from e

    # ---- loading -------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        name_or_path: str,
        *,
        revision: str | None = None,
        chat_template: str | None = None,
        content_format: ContentFormat = "auto",
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> Tokenizer:
        """Load from a model folder or a model id in the local Hugging Face cache (see
        :func:`resolve_model_dir`); never touches the network.

        Reads ``tokenizer.json`` (required), ``tokenizer_config.json``,
        ``special_tokens_map.json``, and the chat templates with transformers' precedence:
        ``chat_template.jinja`` plus ``additional_chat_templates/*.jinja`` if present, else the
        config's ``chat_template`` (one template, or a list of ``{"name", "template"}``), else
        ``chat_template.json``. ``chat_template``, if given, is a template name, template text,
        or a path to a template file, used for every request.

        Raises :class:`TokenizerError` naming what is missing or broken.
        """
        folder = resolve_model_dir(name_or_path, revision=revision, cache_dir=cache_dir)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerError(
                f"{folder} has no tokenizer.json; the EPP needs the fast (Rust) tokenizer file"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the Rust side raises plain Exception subclasses
            raise TokenizerError(f"cannot load {tokenizer_file}: {e}") from e
        config_file = folder / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}
        if not isinstance(config, dict):
            raise TokenizerError(f"{config_file} is not a JSON object")
        map_file = folder / "special_tokens_map.json"
        tokens_map = _read_json(map_file) if map_file.is_file() else {}

        special = _special_token_values(config, tokens_map, backend)
        _prepare_backend(backend, config, special)
        if (
            chat_template is not None
            and not _looks_like_template(chat_template)
            and Path(chat_template).expanduser().is_file()
        ):
            chat_template = _read_text(Path(chat_template).expanduser())
        tokenizer = cls(
            backend,
            special_tokens={k: t for k, v in special.items() if (t := _token_text(v)) is not None},
            chat_templates=_chat_templates(folder, config),
            chat_template=chat_template,
            content_format=content_format,
            name=name_or_path,
        )
        tokenizer.max_model_len, tokenizer.max_model_len_source = context_length.from_model_folder(
            folder
        )
        return tokenizer

    # ---- facts ---------------------------------------------------------------------------

    @property
    def special_tokens(self) -> dict[str, str]:
        """The special tokens the templates see (``bos_token``, ``eos_token``, ...); a copy."""
        return dict(self._special_tokens)

    @property
    def bos_token_id(self) -> int | None:
        """The id of ``bos_token``, or ``None`` when the model declares none."""
        return self._token_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        """The id of ``eos_token``, or ``None`` when the model declares none."""
        return self._token_id("eos_token")

    @property
    def vocab_size(self) -> int:
        """The number of tokens, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template_names(self) -> list[str]:
        """The names of the model's named chat templates (empty for a single template)."""
        return sorted(self._named)

    @property
    def max_chars_per_token(self) -> int:
        """The longest token of the vocabulary, in characters (added tokens included): no
        token covers more of a text, so a text of ``n`` characters has at least
        ``n / max_chars_per_token`` tokens."""
        if self._max_chars_per_token is None:
            vocab = self._backend.get_vocab(with_added_tokens=True)
            self._max_chars_per_token = max(map(len, vocab), default=1) or 1
        return self._max_chars_per_token

    def _token_id(self, key: str) -> int | None:
        token = self._special_tokens.get(key)
        return None if token is None else self._backend.token_to_id(token)

    # ---- completions ---------------------------------------------------------------------

    def encode_prompt(
        self, text: str, *, add_special_tokens: bool = True, budget: TokenBudget | None = None
    ) -> list[int]:
        """The token ids vLLM computes for a completions ``prompt`` string (``add_special_tokens``
        is the request field of that name, default true: BOS etc. per the post-processor).
        ``budget``: see :meth:`encode_chat`."""
        if not isinstance(text, str):
            raise TokenizerError("prompt must be a string")
        return self._encode(text, add_special_tokens, budget)

    # ---- chat ----------------------------------------------------------------------------

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of ``token_ids``, as the engine detokenizes its output."""
        return self._backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def decode_stream(self, *, skip_special_tokens: bool = True) -> Callable[[int], str]:
        """A detokenizer for output arriving token by token: ``step(id)`` returns the text
        that token completes ("" while a character is still partial), in constant time per
        token. This is the library's ``DecodeStream``, which vLLM uses for fast tokenizers;
        with an older library, :func:`whole_decode_stream` instead."""
        backend = self._backend
        try:
            from tokenizers.decoders import DecodeStream
        except ImportError:  # tokenizers < 0.21
            return whole_decode_stream(backend, skip_special_tokens)
        stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        return lambda token_id: stream.step(backend, token_id) or ""

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template: str | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """The prompt text vLLM renders for a chat request with these fields.

        Messages go through vLLM's parse first: content parts become one ``"\\n"``-joined string
        (or stay text parts when the content format is ``openai``; media parts are dropped),
        assistant ``tool_calls`` arguments are decoded from JSON, and only the fields vLLM keeps
        reach the template. Tools are dumped as vLLM's request model dumps them. The template is
        ``chat_template`` (a name or template text), else the override given at construction,
        else the model's (its ``tool_use`` template when ``tools`` are given and it has one,
        else ``default``). Template variables are the special tokens, then
        ``chat_template_kwargs`` (which may override them), then ``messages``, ``tools``,
        ``documents`` and ``add_generation_prompt``. With ``continue_final_message`` the text
        stops right after the final message's content.

        Raises :class:`TokenizerError` for requests vLLM rejects, template errors, and the
        template's own ``raise_exception``.
        """
        if not messages:
            raise TokenizerError("cannot apply a chat template to an empty conversation")
        if continue_final_message and add_generation_prompt:
            raise TokenizerError(
                "continue_final_message and add_generation_prompt cannot both be set"
            )
        kwargs = dict(chat_template_kwargs or {})
        if bad := sorted({"chat_template", "tokenize"} & kwargs.keys()):
            raise TokenizerError(f"chat_template_kwargs may not set {', '.join(bad)}")
        if documents is None:
            documents = kwargs.get("documents")
        variables = {k: v for k, v in kwargs.items() if k not in _NOT_TEMPLATE_VARS}

        source = self._select_template(chat_template, tools)
        fmt = self._content_format
        if fmt == "auto":
            fmt = detect_content_format(source)
        conversation = _template_messages(_conversation(messages, fmt))
        final = _tag_final_message(conversation, source) if continue_final_message else None
        tool_dicts = None if tools is None else [_vllm_tool(t) for t in tools]

        # The sandbox is immutable (no list.append, no item assignment), so the caller's data
        # can be handed to the template without copying it.
        try:
            rendered = _compile(source).render(
                {
                    **self._special_tokens,
                    **variables,
                    "messages": conversation,
                    "tools": tool_dicts,
                    "documents": documents,
                    "add_generation_prompt": add_generation_prompt,
                }
            )
        except TokenizerError:
            raise
        except Exception as e:  # jinja errors, and Python errors from template expressions
            raise TokenizerError(f"chat template failed: {type(e).__name__}: {e}") from e
        if final is not None:
            rendered = _cut_at_tag(rendered, final)
        return rendered

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template: str | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        add_special_tokens: bool = False,
        budget: TokenBudget | None = None,
    ) -> list[int]:
        """The token ids vLLM computes for a chat request: :meth:`render_chat`, then encoding
        with ``add_special_tokens`` (the request field, default false: the template already
        has BOS).

        With a ``budget``, a prompt of more than ``budget.limit`` tokens raises
        :class:`~epp.context_length.PromptTooLong` (without tokenizing when the text is
        longer than the limit allows in characters, and stopping just past the limit
        otherwise), and :class:`~epp.token_budget.DeadlineReached` is raised once the
        deadline passes while a long text is encoded."""
        text = self.render_chat(
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            chat_template=chat_template,
            chat_template_kwargs=chat_template_kwargs,
            documents=documents,
        )
        return self._encode(text, add_special_tokens, budget)

    # ---- responses -----------------------------------------------------------------------

    def render_responses_input(
        self,
        input: str | Sequence[Mapping[str, Any]],
        instructions: str | None = None,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """The prompt text vLLM renders for a ``/v1/responses`` request: the messages of
        :func:`responses_input_to_messages`, Responses ``tools`` converted by
        :func:`responses_tools_to_chat`, and a generation prompt unless the final message is
        being continued."""
        messages, continue_final = responses_input_to_messages(input, instructions)
        return self.render_chat(
            messages,
            tools=responses_tools_to_chat(tools),
            add_generation_prompt=not continue_final,
            continue_final_message=continue_final,
            chat_template_kwargs=chat_template_kwargs,
        )

    def encode_responses_input(
        self,
        input: str | Sequence[Mapping[str, Any]],
        instructions: str | None = None,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        budget: TokenBudget | None = None,
    ) -> list[int]:
        """The token ids vLLM computes for a ``/v1/responses`` request (see
        :meth:`render_responses_input`), encoded without added special tokens; ``budget``
        as in :meth:`encode_chat`."""
        text = self.render_responses_input(
            input, instructions, tools=tools, chat_template_kwargs=chat_template_kwargs
        )
        return self._encode(text, False, budget)

    def check_length(self, text: str, *, add_special_tokens: bool, budget: TokenBudget) -> None:
        """Raise :class:`~epp.context_length.PromptTooLong` when ``text`` has more than
        ``budget.limit`` tokens, doing no more work than that needs (for prompts the EPP
        does not route on, such as a batch of completions prompts)."""
        self._encode(text, add_special_tokens, budget)

    def _encode(
        self, text: str, add_special_tokens: bool, budget: TokenBudget | None = None
    ) -> list[int]:
        if budget is None or not budget.bounded:
            return self._encode_whole(text, add_special_tokens)
        limit = budget.limit
        if limit is not None:
            max_chars = max(limit, 0) * self.max_chars_per_token
            if len(text) > max_chars:
                raise PromptTooLong(chars=len(text), max_chars=max_chars)
            if self._fits_by_bytes(text, limit, add_special_tokens):
                budget = budget.unlimited()
        if len(text) <= _SMALL_TEXT or not budget.bounded:
            ids = self._encode_whole(text, add_special_tokens)
        else:
            try:
                ids = self._encode_within(text, add_special_tokens, budget)
            except TokenLimitReached as exc:
                raise PromptTooLong(tokens=exc.count) from None
        if limit is not None and len(ids) > limit:
            raise PromptTooLong(tokens=len(ids))
        return ids

    def _encode_whole(self, text: str, add_special_tokens: bool) -> list[int]:
        if self._segments is not None and not add_special_tokens:
            return self._segments.encode(text)
        return self._encode_ids(text, add_special_tokens)

    def _encode_within(self, text: str, add_special_tokens: bool, budget: TokenBudget) -> list[int]:
        if not add_special_tokens:
            if self._segments is not None:
                return self._segments.encode_bounded(text, budget)
            return self._encode_bounded(text, budget)
        if self._special_frame is None:  # post-processing we cannot split: whole, checked after
            ids = self._encode_ids(text, True)
            budget.check(len(ids))
            return ids
        before, after = self._special_frame
        extra = len(before) + len(after)
        try:
            ids = self._encode_bounded(text, budget.remaining(extra))
        except TokenLimitReached as exc:
            raise TokenLimitReached(exc.count + extra) from None
        return [*before, *ids, *after]

    def _fits_by_bytes(self, text: str, limit: int, add_special_tokens: bool) -> bool:
        """Whether ``text`` surely has at most ``limit`` tokens without counting them: in a
        byte-level tokenizer no token is shorter than one byte (of the normalized text)."""
        factor = self._byte_factor
        if factor is None:
            return False
        extra = 0
        if add_special_tokens:
            if self._special_frame is None:
                return False
            extra = len(self._special_frame[0]) + len(self._special_frame[1])
        # NFC leaves ASCII alone, and an ASCII text's length is its size in bytes.
        ascii_ = text.isascii()
        size = len(text) if ascii_ else len(text.encode("utf-8", "surrogatepass")) * factor
        return size + extra <= limit

    @property
    def segment_cache(self) -> SegmentEncoder | None:
        """The segment cache chat text is encoded through (None where it is not exact)."""
        return self._segments

    # ---- template choice -----------------------------------------------------------------

    def _select_template(self, chosen: str | None, tools: Any) -> str:
        chosen = chosen if chosen is not None else self._override
        if chosen is not None:
            if chosen in self._named:
                return self._named[chosen]
            if _looks_like_template(chosen):
                return chosen
            known = ", ".join(sorted(self._named)) or "none"
            raise TokenizerError(
                f"{chosen!r} is neither a chat template of {self.name or 'this model'} "
                f"(named templates: {known}) nor template text"
            )
        if self._named:
            if tools is not None and "tool_use" in self._named:
                return self._named["tool_use"]
            if self._default is None:
                raise TokenizerError(
                    f"{self.name or 'this model'} has several chat templates and none is named "
                    f"'default'; pick one of: {', '.join(sorted(self._named))}"
                )
        if self._default is None:
            raise TokenizerError(f"{self.name or 'this model'} has no chat template")
        return self._default


_SMALL_TEXT = 65_536
"""Texts up to this many characters are encoded whole even under a budget: the budget's
checks would save little, and the whole-text path is the fastest."""


def _special_frame(backend: tokenizers.Tokenizer) -> tuple[list[int], list[int]] | None:
    """The ids the post-processor puts before and after a text's own (BOS, EOS, ...), when
    it only frames the text that way (checked on probe texts); None otherwise."""
    probes = ("a", "hello world", " two  words\n", "ünï 文字")
    frame: tuple[list[int], list[int]] | None = None
    for probe in probes:
        whole = backend.encode(probe, add_special_tokens=True).ids
        plain = backend.encode(probe, add_special_tokens=False).ids
        n = len(plain)
        found = None
        for i in range(len(whole) - n + 1):
            if whole[i : i + n] == plain:
                found = (whole[:i], whole[i + n :])
                break
        if found is None or (frame is not None and found != frame):
            return None
        frame = found
    return frame


def _byte_bound_factor(backend: tokenizers.Tokenizer) -> int | None:
    """How many tokens a byte of text can become at most, for tokenizers where that is
    bounded: 1 for byte-level BPE (every token covers at least one byte), 3 when an NFC
    normalizer runs first (NFC makes a character at most three); None for the others."""
    try:
        spec = json.loads(backend.to_str())
    except ValueError:
        return None
    if "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        return None
    normalizer = spec.get("normalizer")
    if normalizer is None:
        return 1
    if normalizer.get("type") == "NFC":
        return 3
    return None


def _looks_like_template(text: str) -> bool:
    # vLLM's own test for "this is template text, not a name or path".
    return any(c in text for c in "{}\n")


def _special_token_values(
    config: Mapping[str, Any], tokens_map: Any, backend: tokenizers.Tokenizer
) -> dict[str, Any]:
    """The special tokens as transformers 5 resolves them, by template variable name, in their
    saved form (a string or an AddedToken dict)."""
    values: dict[str, Any] = {}
    for key, value in config.items():
        if key in _NAMED_SPECIAL_TOKENS:
            if _token_text(value) is not None:
                values[key] = value
        elif key.endswith("_token") and isinstance(value, str):
            # Model-specific tokens (image_token, ...) are template variables too.
            values[key] = value
    extra = config.get("extra_special_tokens")
    if isinstance(extra, Mapping):
        values.update({k: v for k, v in extra.items() if _token_text(v) is not None})
    # transformers reads the legacy special_tokens_map.json only when the config carries no
    # added_tokens_decoder, and then its values win.
    if "added_tokens_decoder" not in config and isinstance(tokens_map, Mapping):
        for key in _NAMED_SPECIAL_TOKENS:
            if _token_text(tokens_map.get(key)) is not None:
                values[key] = tokens_map[key]
    if "pad_token" not in config and "pad_token" not in values:
        padding = backend.padding
        if padding and isinstance(padding.get("pad_token"), str):
            values["pad_token"] = padding["pad_token"]
    return values


def _prepare_backend(
    backend: tokenizers.Tokenizer, config: Mapping[str, Any], special: Mapping[str, Any]
) -> None:
    """Bring the Rust tokenizer to the state transformers leaves it in after loading."""
    # A plain tokenizer(text) call in transformers disables saved truncation and padding.
    backend.no_truncation()
    backend.no_padding()
    present = {t.content for t in backend.get_added_tokens_decoder().values()}

    def missing(tokens: list[tokenizers.AddedToken | None]) -> list[tokenizers.AddedToken]:
        fresh = []
        for token in tokens:
            if token is not None and token.content not in present:
                present.add(token.content)
                fresh.append(token)
        return fresh

    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, Mapping):
        try:
            saved = [decoder[k] for k in sorted(decoder, key=int)]
        except (TypeError, ValueError) as e:
            raise TokenizerError(
                "tokenizer_config.json added_tokens_decoder keys must be ids"
            ) from e
        if fresh := missing([_added_token(v, special=None) for v in saved]):
            backend.add_tokens(fresh)
    # Special tokens that are not added tokens yet become special added tokens, so text
    # containing them splits on them exactly as in transformers.
    extra = config.get("extra_special_tokens")
    if not isinstance(extra, list):
        extra = config.get("additional_special_tokens")
    extra_tokens = [_added_token(v, special=True) for v in extra] if isinstance(extra, list) else []
    named_tokens = [_added_token(v, special=True) for v in special.values()]
    if fresh := missing(named_tokens + extra_tokens):
        backend.add_special_tokens(fresh)
    if config.get("split_special_tokens"):
        backend.encode_special_tokens = True


def _added_token(value: Any, *, special: bool | None) -> tokenizers.AddedToken | None:
    """An AddedToken from its saved form; ``special=None`` keeps the saved flag."""
    if isinstance(value, str):
        return tokenizers.AddedToken(value, special=True, normalized=False)
    if not isinstance(value, Mapping) or not isinstance(value.get("content"), str):
        return None
    is_special = bool(value.get("special", False)) if special is None else special
    return tokenizers.AddedToken(
        value["content"],
        single_word=bool(value.get("single_word", False)),
        lstrip=bool(value.get("lstrip", False)),
        rstrip=bool(value.get("rstrip", False)),
        normalized=bool(value.get("normalized", not is_special)),
        special=is_special,
    )


def _chat_templates(folder: Path, config: Mapping[str, Any]) -> str | dict[str, str] | None:
    """The model's chat template(s), with transformers' precedence (see :meth:`Tokenizer.load`)."""
    templates: dict[str, str] = {}
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        templates["default"] = _read_text(jinja_file)
    extra_dir = folder / "additional_chat_templates"
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            templates[path.name.removesuffix(".jinja")] = _read_text(path)
    if templates:
        if list(templates) == ["default"]:
            return templates["default"]
        return templates
    saved = config.get("chat_template")
    if isinstance(saved, str):
        return saved
    if isinstance(saved, list):
        named = {}
        for entry in saved:
            if not (
                isinstance(entry, Mapping)
                and isinstance(entry.get("name"), str)
                and isinstance(entry.get("template"), str)
            ):
                raise TokenizerError(
                    "tokenizer_config.json chat_template list entries need 'name' and 'template'"
                )
            named[entry["name"]] = entry["template"]
        return named
    if isinstance(saved, Mapping):
        return {str(k): str(v) for k, v in saved.items()}
    json_file = folder / "chat_template.json"
    if json_file.is_file():
        data = _read_json(json_file)
        if isinstance(data, Mapping) and isinstance(data.get("chat_template"), str):
            return data["chat_template"]
    return None


def whole_decode_stream(backend: Any, skip_special_tokens: bool = True) -> Callable[[int], str]:
    """``step(id)`` like :meth:`Tokenizer.decode_stream`, by decoding the whole output so
    far at each step (linear per token: for libraries without ``DecodeStream``)."""
    ids: list[int] = []
    sent = 0

    def step(token_id: int) -> str:
        nonlocal sent
        ids.append(token_id)
        text = backend.decode(ids, skip_special_tokens=skip_special_tokens)
        if text.endswith("\ufffd"):
            return ""  # a character still partial
        delta, sent = text[sent:], len(text)
        return delta

    return step
