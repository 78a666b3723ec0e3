"""Token usage read from the responses the EPP relays, for the reference EPP's token metrics.

OpenAI-style servers put ``usage`` at the end of what they send: the last field but a few of
a JSON response, and the last ``data:`` event before ``[DONE]`` of a stream (vLLM sends it
only with ``stream_options.include_usage``). So :class:`UsageTail` keeps the last
:data:`TAIL_BYTES` of a response body as it passes, and at the end parses the last
``"usage": {...}`` object found there:

* Chat and completions: ``prompt_tokens``, ``completion_tokens`` and
  ``prompt_tokens_details.cached_tokens``.
* Responses API: ``input_tokens``, ``output_tokens`` and
  ``input_tokens_details.cached_tokens`` (the ``response.completed`` event carries them).

A response whose usage lies further from its end than the tail reaches (very large
``prompt_logprobs`` after it, say), or that has none, yields None; nothing else is lost.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

TAIL_BYTES = 16 * 1024

_USAGE_KEY = re.compile(rb'"usage"\s*:\s*\{')
_DECODER = json.JSONDecoder()


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None = None


class UsageTail:
    """The bounded tail of one response body (see the module docstring)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> None:
        buf = self._buf
        buf += chunk
        if len(buf) > 2 * TAIL_BYTES:  # trim now and then, not on every chunk
            del buf[:-TAIL_BYTES]

    def usage(self) -> Usage | None:
        """The last complete usage object in the tail, or None."""
        data = bytes(self._buf[-TAIL_BYTES:])
        for m in reversed(list(_USAGE_KEY.finditer(data))):
            start = m.end() - 1
            try:
                obj, _end = _DECODER.raw_decode(data[start:].decode("utf-8", "replace"))
            except ValueError:
                continue  # cut by the tail's start, or not JSON after all
            usage = parse_usage(obj)
            if usage is not None:
                return usage
        return None


def _count(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def parse_usage(obj: object) -> Usage | None:
    """A usage object of either API; None when it has no usable token counts."""
    if not isinstance(obj, dict):
        return None
    if "prompt_tokens" in obj:
        prompt, completion = _count(obj.get("prompt_tokens")), _count(obj.get("completion_tokens"))
        details = obj.get("prompt_tokens_details")
    else:
        prompt, completion = _count(obj.get("input_tokens")), _count(obj.get("output_tokens"))
        details = obj.get("input_tokens_details")
    if prompt is None or completion is None:
        return None
    cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else None
    return Usage(prompt, completion, cached)
