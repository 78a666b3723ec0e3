"""The prompt's token ids for one request, and which requests cannot take the token path.

"Tokenize once": the EPP tokenizes each request to route it and forwards the ids in the body
as ``nvext.token_data`` (chat: the rendered chat template; completions: the prompt; responses:
the rendered input). The sidecar sends ids to the engine's token-in API, so it needs the ids
and must be able to trust them. :class:`PromptBuilder` turns one parsed body into a
:class:`Prompt`:

1. ``nvext.token_data`` present: it must be a non-empty list of integers (never booleans) in
   ``0..vocab-1`` (vocab: the tokenizer's, including added tokens; else ``vocab_size``; else
   ``2**32``), and short enough for the context (below). A violation is a
   :class:`PromptError` 400 naming the field and index. These checks are the "range" level.
2. With a tokenizer and ``verify="fingerprint"``, the ids are then checked against the prompt
   (the "fingerprint" level, below). A mismatch does **not** fail the request: the builder
   tokenizes the prompt itself (``source="tokenized"``), sets ``Prompt.mismatch`` and
   counts it in :attr:`PromptBuilder.mismatches`, which the caller turns into a metric.
3. No ``token_data``: the builder tokenizes exactly as the EPP does (the same
   :class:`~epp.tokenizer.Tokenizer` calls, with the same arguments, as
   ``epp.director.Director._tokens``), so its ids are the ones the EPP would have forwarded.
   A completions prompt that is already token ids (or a batch of one) is used as is.
   Without a tokenizer and without usable ids: 400 saying ``--tokenizer`` or
   ``nvext.token_data`` is needed.

Length: with ``max_model_len`` known, a prompt may have at most
``max_model_len - max_tokens`` ids (the request's own output limit, vLLM's rule, see
:mod:`epp.context_length`) and fewer than ``max_model_len`` (at least one output token
must fit). A prompt over that is a **400**, not a 413, with vLLM's words: vLLM answers 400
for a prompt over the context length, and clients handle that answer already (413 would
say the *body* is too large, which is not the problem).

Choosing the fingerprint
------------------------
A check must be cheap next to what it saves (tokenizing), must never accept ids of another
prompt's start or end (that would put the wrong KV cache and text before the model), and may
now and then reject good ids, which only costs the fallback tokenization. Measured on the
tiny test tokenizer (``tests/unit/tiny_tokenizer.py``, byte-level BPE, ~2.1 characters per
token), a llama3-template chat of one long user message, best of 30 runs, one core:

=====================================================  ============  ============
check                                                   1,071 ids     8,096 ids
=====================================================  ============  ============
render the chat template (needed by every check)        15 µs         18 µs
full re-tokenize, cold (what the sidecar would pay)     338 µs        2,326 µs
full re-tokenize, warm segment cache                    8 µs          38 µs
decode all ids and compare with the rendered text       89 µs         665 µs
tokenize first and last 1 KiB of the text, compare      592 µs        588 µs
decode first and last 64 ids, startswith/endswith       14 µs         14 µs
count bounds only (chars/longest token <= n <= bytes)   1 µs          8 µs
=====================================================  ============  ============

(The warm cache figure is the sidecar's own cache having seen the *same* text before; a
fresh prompt pays the cold figure, and the EPP's cache is in another process.)

Decision: ``fingerprint`` = the count bounds, then decoding the first and last 64 ids and
requiring the rendered text (with the tokenizer's special-token frame, when the request adds
special tokens) to start and end with them; prompts of at most 128 ids are decoded whole and
compared for equality. It costs a constant ~15 µs, 25–170 times less than re-tokenizing, and
catches ids of another prompt, of another template or model, and truncated or extended ids
(the count bounds and the tail). It does not see an edit in the middle of a long prompt that
keeps its length within the bounds; the EPP is the only writer of ``token_data`` and the
gateway strips a client's own ``nvext`` from the route, so the check guards against skew
(another template, another tokenizer version, a stale body), not against an adversary. A
window that ends inside a multi-byte character decodes to U+FFFD there, which is stripped
before comparing. Tokenizers whose decoding does not give the text back (a normalizer, a
decoder that drops spaces) would fail every check; the builder probes this once at
construction and uses a full re-tokenize instead for them (:attr:`PromptBuilder.method`).

Passthrough
-----------
:func:`passthrough_reason` names what the token path cannot carry exactly (the engine's
token-in API takes ids and sampling parameters; everything that needs the engine's own
OpenAI frontend, its parsers or its server state must go through that frontend):

=============================================  ===========  =================================
field                                          APIs         passes through when
=============================================  ===========  =================================
``tools``                                      chat, resp.  non-empty, unless tool_choice
                                                            is ``"none"`` (chat; no parsing)
``tool_choice``                                chat, resp.  present and not ``"none"``
``response_format`` / ``text.format``          chat / resp. type other than ``"text"``
``guided_json`` ``guided_regex``               all          present (not null)
``guided_choice`` ``guided_grammar``
``structured_outputs``
``reasoning_effort`` ``reasoning``             all          present (not null): the reasoning
``include_reasoning``                                       parser splits the output
non-text content parts                         chat, resp.  any part whose type is not text
``chat_template`` ``documents``                chat         present: the EPP does not render
                                                            with them
``n``                                          chat, comp.  > 1
``best_of``                                    comp.        > 1
``echo``                                       comp.        true
``prompt_logprobs``                            chat, comp.  present (not null)
``suffix``                                     comp.        non-empty
``prompt``                                     comp.        a batch of several prompts
``previous_response_id`` ``conversation``      resp.        present: server-side state
``background``                                 resp.        true
``store``                                      resp.        explicitly true (absent: the
                                                            token path does not store, which
                                                            is vLLM's behaviour by default)
``prompt`` (a stored prompt template)          resp.        present
=============================================  ===========  =================================
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Literal

from epp import context_length
from epp.context_length import PromptTooLong
from epp.token_budget import TokenBudget
from epp.tokenizer import Tokenizer, TokenizerError

Api = Literal["chat", "completions", "responses"]
Verify = Literal["off", "range", "fingerprint"]

# Without a vocabulary the ids must at least fit the engines' 32-bit token type.
_NO_VOCAB = 2**32
# Ids decoded at each end of token_data; prompts up to twice this are compared whole.
_WINDOW = 64
_REPLACEMENT = "\ufffd"
# vLLM's spellings of a boolean request field.
_TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSE = frozenset({"0", "false", "f", "no", "n", "off"})
# The output limit field per API, first present wins (as epp.openai_request reads them).
_LIMIT_FIELDS: dict[str, tuple[str, ...]] = {
    "chat": ("max_completion_tokens", "max_tokens"),
    "completions": ("max_tokens",),
    "responses": ("max_output_tokens",),
}
# Content part types that are text (chat, and responses input/output).
_TEXT_PARTS = frozenset({"text", "input_text", "output_text", "refusal"})
_NEEDS_TOKENIZER = (
    "the sidecar needs --tokenizer to tokenize this request, or the prompt's ids in "
    "nvext.token_data"
)


class PromptError(ValueError):
    """A request whose prompt cannot be built: ``status`` (400, or 413), ``message`` for the
    client, ``param`` the body field at fault (OpenAI's error ``param``), None when none."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


@dataclass(slots=True, frozen=True)
class Prompt:
    """The prompt's token ids and where they came from.

    ``source``: ``"token_data"`` when the EPP's ids were used, ``"tokenized"`` when the
    builder computed them (no token_data, or token_data that failed the fingerprint).
    ``checked``: what the token_data passed: ``"none"`` (verify off, or no token_data),
    ``"range"`` (types, vocabulary and length only) or ``"fingerprint"`` (also matched the
    prompt). ``mismatch``: token_data was present, valid, and did not match the prompt, so
    the builder's own ids are used; ``mismatch_reason`` says what differed (for a log line).
    """

    token_ids: list[int]
    source: Literal["token_data", "tokenized"]
    checked: Literal["none", "range", "fingerprint"]
    mismatch: bool = False
    mismatch_reason: str = ""


class PromptBuilder:
    """Builds a :class:`Prompt` per request; see the module docstring for the rules.

    Safe to share between threads (the tokenizer is, and the counter has a lock).
    """

    def __init__(
        self,
        tokenizer: Tokenizer | None,
        *,
        max_model_len: int | None,
        vocab_size: int | None = None,
        verify: Verify = "fingerprint",
    ) -> None:
        """``tokenizer``: the EPP's tokenizer for the served model (None: only token_data
        and token-id prompts can be served); ``max_model_len``: the context length (None:
        no length check); ``vocab_size``: the id bound when there is no tokenizer;
        ``verify``: how far token_data is checked (``"off"``: only that it is a list of
        integers)."""
        if verify not in ("off", "range", "fingerprint"):
            raise ValueError(f"unknown verify level {verify!r}")
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab = tokenizer.vocab_size if tokenizer is not None else vocab_size or _NO_VOCAB
        self.verify = verify
        self.mismatches = 0
        """token_data that failed the fingerprint and was replaced (for a metric)."""
        self._lock = threading.Lock()
        self._frame: tuple[str, str] | None = None
        self.method: Literal["windows", "full", "none"] = "none"
        """How the fingerprint is taken: decoded end ``windows``, a ``full`` re-tokenize
        (a tokenizer whose decoding does not round-trip), ``none`` without a tokenizer."""
        if tokenizer is not None:
            self._frame = _special_frame(tokenizer)
            self.method = "windows" if _round_trips(tokenizer) else "full"

    # ---- the prompt ----------------------------------------------------------------------

    def build(self, api: Api, body: dict[str, Any]) -> Prompt:
        """The prompt of ``body`` (a parsed request of ``api`` that
        :func:`passthrough_reason` let through). Raises :class:`PromptError` for bad
        token_data, a prompt too long for the context, a template that fails, or a text
        prompt without a tokenizer."""
        if api not in _LIMIT_FIELDS:
            raise ValueError(f"unknown API {api!r}")
        limit = self._limit(api, body)
        token_data = _token_data(body)
        if api == "completions":
            ids = _prompt_ids(body.get("prompt"), self.vocab)
            if ids is not None:
                self._check_length(ids, "prompt", limit, body, api)
                if token_data is None:
                    return Prompt(ids, "tokenized", "none")
                if self.verify != "off":
                    self._check_ids(token_data, limit, body, api)
                if token_data == ids:
                    return Prompt(token_data, "token_data", "fingerprint")
                return self._replaced(ids, "token_data differs from the prompt's token ids")
        if token_data is None:
            return Prompt(self._tokenize(api, body, limit), "tokenized", "none")
        if self.verify == "off":
            _check_ints(token_data)
            return Prompt(token_data, "token_data", "none")
        self._check_ids(token_data, limit, body, api)
        if self.verify == "range" or self.tokenizer is None:
            return Prompt(token_data, "token_data", "range")
        if self.method == "full":
            ids = self._tokenize(api, body, limit)
            if ids == token_data:
                return Prompt(token_data, "token_data", "fingerprint")
            return self._replaced(ids, "token_data differs from the prompt's tokenization")
        text, special = self._text(api, body)
        reason = self._fingerprint(token_data, text, special)
        if reason is None:
            return Prompt(token_data, "token_data", "fingerprint")
        return self._replaced(self._tokenize(api, body, limit), reason)

    def _replaced(self, ids: list[int], reason: str) -> Prompt:
        with self._lock:
            self.mismatches += 1
        return Prompt(ids, "tokenized", "range", mismatch=True, mismatch_reason=reason)

    # ---- checks --------------------------------------------------------------------------

    def _limit(self, api: str, body: dict[str, Any]) -> int | None:
        """The most prompt ids the request may have (None: unknown context length)."""
        if self.max_model_len is None:
            return None
        out = _max_tokens(api, body)
        if out is not None and out > self.max_model_len:
            name = next(n for n in _LIMIT_FIELDS[api] if body.get(n) is not None)
            raise PromptError(
                400, context_length.output_refusal(self.max_model_len, out, name), name
            )
        # At least one output token must fit, whatever max_tokens says.
        return min(context_length.input_limit(self.max_model_len, out), self.max_model_len - 1)

    def _check_length(
        self, ids: list[int], param: str, limit: int | None, body: dict[str, Any], api: str
    ) -> None:
        if limit is not None and len(ids) > limit:
            assert self.max_model_len is not None
            raise PromptError(
                400,
                context_length.refusal(
                    self.max_model_len, _max_tokens(api, body), PromptTooLong(tokens=len(ids))
                ),
                param,
            )

    def _check_ids(self, ids: list[Any], limit: int | None, body: dict[str, Any], api: str) -> None:
        _check_ints(ids, self.vocab)
        self._check_length(ids, "nvext.token_data", limit, body, api)

    def _fingerprint(self, ids: list[int], text: str, special: bool) -> str | None:
        """None when ``ids`` pass the fingerprint of ``text``, else what failed."""
        tok = self.tokenizer
        assert tok is not None
        if special:
            if self._frame is None:  # a post-processor we cannot split: compare in full
                got = tok.encode_prompt(text, add_special_tokens=True)
                return None if got == ids else "token_data differs from the prompt's ids"
            text = self._frame[0] + text + self._frame[1]
        n = len(ids)
        # No token covers more than the longest vocabulary entry, none less than a byte.
        low = math.ceil(len(text) / tok.max_chars_per_token)
        high = len(text.encode("utf-8", "surrogatepass"))
        if not low <= n <= high:
            return f"{n} ids cannot encode a prompt of {len(text)} characters"
        if n <= 2 * _WINDOW:
            if tok.decode(ids, skip_special_tokens=False) != text:
                return "token_data decodes to another prompt"
            return None
        head = tok.decode(ids[:_WINDOW], skip_special_tokens=False).rstrip(_REPLACEMENT)
        if not text.startswith(head):
            return f"the first {_WINDOW} ids of token_data decode to another prompt start"
        tail = tok.decode(ids[-_WINDOW:], skip_special_tokens=False).lstrip(_REPLACEMENT)
        if not text.endswith(tail):
            return f"the last {_WINDOW} ids of token_data decode to another prompt end"
        return None

    # ---- tokenizing as the EPP does ------------------------------------------------------

    def _text(self, api: str, body: dict[str, Any]) -> tuple[str, bool]:
        """The text the EPP encodes for ``body`` and whether it adds special tokens."""
        tok = self.tokenizer
        assert tok is not None
        special = _lax_bool(body.get("add_special_tokens"), "add_special_tokens")
        try:
            if api == "chat":
                text = tok.render_chat(
                    _messages(body),
                    tools=body.get("tools"),
                    add_generation_prompt=bool(body.get("add_generation_prompt", True)),
                    continue_final_message=bool(body.get("continue_final_message", False)),
                    chat_template_kwargs=body.get("chat_template_kwargs"),
                )
                return text, bool(special)
            if api == "responses":
                return tok.render_responses_input(
                    body.get("input"), body.get("instructions")
                ), False
        except (TokenizerError, TypeError, ValueError) as exc:
            raise PromptError(400, f"cannot apply the chat template: {exc}") from None
        return _single_text(body.get("prompt")), True if special is None else special

    def _tokenize(self, api: str, body: dict[str, Any], limit: int | None) -> list[int]:
        """The ids the EPP computes for ``body`` (the same calls as the director's)."""
        tok = self.tokenizer
        special = _lax_bool(body.get("add_special_tokens"), "add_special_tokens")
        budget = None if limit is None else TokenBudget(limit)
        if tok is None:
            raise PromptError(400, _NEEDS_TOKENIZER, "nvext.token_data")
        try:
            if api == "chat":
                return tok.encode_chat(
                    _messages(body),
                    tools=body.get("tools"),
                    add_generation_prompt=bool(body.get("add_generation_prompt", True)),
                    continue_final_message=bool(body.get("continue_final_message", False)),
                    chat_template_kwargs=body.get("chat_template_kwargs"),
                    add_special_tokens=bool(special),
                    budget=budget,
                )
            if api == "responses":
                return tok.encode_responses_input(
                    body.get("input"), body.get("instructions"), budget=budget
                )
            text = _single_text(body.get("prompt"))
            add = True if special is None else special
            return tok.encode_prompt(text, add_special_tokens=add, budget=budget)
        except PromptTooLong as exc:
            assert self.max_model_len is not None
            raise PromptError(
                400, context_length.refusal(self.max_model_len, _max_tokens(api, body), exc)
            ) from None
        except (TokenizerError, TypeError, ValueError) as exc:
            # Fields of the wrong shape reaching the template are the client's fault.
            raise PromptError(400, f"cannot apply the chat template: {exc}") from None


# ---- body fields ---------------------------------------------------------------------------


def _token_data(body: dict[str, Any]) -> list[Any] | None:
    nvext = body.get("nvext")
    if nvext is None:
        return None
    if not isinstance(nvext, dict):
        raise PromptError(400, "nvext must be an object", "nvext")
    ids = nvext.get("token_data")
    if ids is None:
        return None
    if not isinstance(ids, list) or not ids:
        raise PromptError(
            400, "nvext.token_data must be a non-empty list of token ids", "nvext.token_data"
        )
    return ids


def _check_ints(ids: list[Any], vocab: int | None = None, field: str = "nvext.token_data") -> None:
    """400 naming the first element that is not an integer (in ``0..vocab-1``)."""
    for i, v in enumerate(ids):
        # bool is an int subclass; JSON true is not a token id.
        if v.__class__ is not int:
            raise PromptError(400, f"{field}[{i}] is {v!r}; token ids must be integers", field)
        if vocab is not None and not 0 <= v < vocab:
            raise PromptError(
                400, f"{field}[{i}] is {v}; token ids must be in 0..{vocab - 1}", field
            )


def _prompt_ids(prompt: Any, vocab: int) -> list[int] | None:
    """A completions prompt's ids when it is ids (or a batch of one list of ids)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], list):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], str | list):
        _check_ints(prompt, vocab, "prompt")
        return prompt
    return None


def _single_text(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise PromptError(
            400, "prompt must be a string, a list of token ids, or one of them", "prompt"
        )
    return prompt


def _messages(body: dict[str, Any]) -> Any:
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise PromptError(400, "messages must be a list", "messages")
    return messages


def _max_tokens(api: str, body: dict[str, Any]) -> int | None:
    for name in _LIMIT_FIELDS.get(api, ()):
        value = body.get(name)
        if value.__class__ is int:
            return value
    return None


def _lax_bool(value: Any, name: str) -> bool | None:
    """``value`` as vLLM reads a boolean request field (None when absent), as the EPP does."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise PromptError(400, f"'{name}' must be a boolean", name)


# ---- tokenizer probes ----------------------------------------------------------------------


def _special_frame(tok: Tokenizer) -> tuple[str, str] | None:
    """The text of the ids ``add_special_tokens`` puts before and after a prompt (e.g. BOS),
    None when the post-processor does not simply wrap the prompt's own ids."""
    probe = "frame probe"
    inner = tok.encode_prompt(probe, add_special_tokens=False)
    framed = tok.encode_prompt(probe, add_special_tokens=True)
    for i in range(len(framed) - len(inner) + 1):
        if framed[i : i + len(inner)] == inner:
            before, after = framed[:i], framed[i + len(inner) :]
            return (
                tok.decode(before, skip_special_tokens=False),
                tok.decode(after, skip_special_tokens=False),
            )
    return None


_PROBES = (
    "The quick brown fox, naïve café: 3.14 → ∑ 日本語 🚀\n\tindented  two spaces",
    "  leading spaces and trailing ones  ",
)


def _round_trips(tok: Tokenizer) -> bool:
    """Whether decoding gives the encoded text back (no normalizer or lossy decoder), which
    the window fingerprint relies on."""
    return all(
        tok.decode(tok.encode_prompt(p, add_special_tokens=False), skip_special_tokens=False) == p
        for p in _PROBES
    )


# ---- passthrough -------------------------------------------------------------------------


_ALWAYS = (
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structured_outputs",
    "reasoning_effort",
    "reasoning",
    "include_reasoning",
)


def passthrough_reason(api: str, body: dict[str, Any]) -> str | None:
    """A short reason why ``body`` must go to the engine's own OpenAI frontend rather than
    the token path, or None when the token path carries it exactly (the table in the module
    docstring)."""
    for name in _ALWAYS:
        if body.get(name) is not None:
            return name
    if api in ("chat", "responses"):
        choice = body.get("tool_choice")
        if choice is not None and choice != "none":
            return "tool_choice"
        if body.get("tools") and choice != "none":
            return "tools"
    if api == "chat":
        fmt = body.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type", "text") != "text":
            return "response_format"
        for name in ("chat_template", "documents"):
            if body.get(name) is not None:
                return name
        messages = body.get("messages")
        if isinstance(messages, list) and any(
            isinstance(m, dict) and _non_text(m.get("content")) for m in messages
        ):
            return "multimodal content"
    if api in ("chat", "completions"):
        if _number(body.get("n")) > 1:
            return "n > 1"
        if body.get("prompt_logprobs") is not None:
            return "prompt_logprobs"
    if api == "completions":
        if _number(body.get("best_of")) > 1:
            return "best_of > 1"
        if body.get("echo"):
            return "echo"
        if body.get("suffix"):
            return "suffix"
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) > 1 and isinstance(prompt[0], str | list):
            return f"a batch of {len(prompt)} prompts"
    if api == "responses":
        for name in ("previous_response_id", "conversation", "prompt"):
            if body.get(name) is not None:
                return name
        if body.get("background"):
            return "background"
        if body.get("store") is True:
            return "store"
        text = body.get("text")
        fmt = text.get("format") if isinstance(text, dict) else None
        if isinstance(fmt, dict) and fmt.get("type", "text") != "text":
            return "text.format"
        items = body.get("input")
        if isinstance(items, list) and any(_non_text_item(i) for i in items):
            return "multimodal content"
    return None


def _number(value: Any) -> float:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _non_text(content: Any) -> bool:
    """Whether chat/responses message content has a part that is not text."""
    if not isinstance(content, list):
        return False
    return any(not isinstance(p, dict) or p.get("type", "text") not in _TEXT_PARTS for p in content)


def _non_text_item(item: Any) -> bool:
    if not isinstance(item, dict):
        return False
    kind = item.get("type")
    if kind in ("input_image", "input_file", "input_audio"):
        return True
    return _non_text(item.get("content"))
