"""Token usage read from the responses the EPP relays, for the reference EPP's token metrics.

OpenAI-style servers put ``usage`` at the end of what they send: the last field but a few of
a JSON response, and the last ``data:`` event before ``[DONE]`` of a stream (vLLM sends it
only with ``stream_options.include_usage``). So :class:`UsageTail` keeps, as the body
passes, only what follows the last ``"usage"`` key (at most :data:`TAIL_BYTES`), and at the
end parses the object there:

* Chat and completions: ``prompt_tokens``, ``completion_tokens`` and
  ``prompt_tokens_details.cached_tokens``.
* Responses API: ``input_tokens``, ``output_tokens`` and
  ``input_tokens_details.cached_tokens`` (the ``response.completed`` event carries them).

A response without usage, or whose last ``"usage"`` key is not followed by an object (a
``null`` in a stream's last event, say), yields None; nothing else is lost.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

TAIL_BYTES = 16 * 1024

_KEY = b'"usage"'
_USAGE_KEY = re.compile(rb'"usage"\s*:\s*\{')
_DECODER = json.JSONDecoder()


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None = None


class UsageTail:
    """What a response body says from its last ``"usage"`` key on (see the module
    docstring). Holds at most :data:`TAIL_BYTES` plus a few bytes however long the body,
    copies nothing of chunks without the key, and finds a key split across chunks."""

    __slots__ = ("_buf", "_edge")

    def __init__(self) -> None:
        self._buf = b""  # from the last "usage" key seen, at most TAIL_BYTES
        self._edge = b""  # the last bytes of the body, for a key cut in two

    def feed(self, chunk: bytes) -> None:
        edge = self._edge
        i = chunk.rfind(_KEY)
        if i >= 0:
            self._buf = chunk[i : i + TAIL_BYTES]
        else:
            j = (edge + chunk[: len(_KEY) - 1]).find(_KEY)
            if j >= 0:
                self._buf = edge[j:] + chunk[: TAIL_BYTES - (len(edge) - j)]
            elif self._buf and len(self._buf) < TAIL_BYTES:
                self._buf += chunk[: TAIL_BYTES - len(self._buf)]
        keep = len(_KEY) - 1
        self._edge = chunk[-keep:] if len(chunk) >= keep else (edge + chunk)[-keep:]

    def usage(self) -> Usage | None:
        """The usage object after the last key, or None."""
        m = _USAGE_KEY.match(self._buf)
        if m is None:
            return None
        try:
            obj, _end = _DECODER.raw_decode(self._buf[m.end() - 1 :].decode("utf-8", "replace"))
        except (ValueError, RecursionError):
            return None  # cut by the tail's end, not JSON after all, or nested absurdly
        return parse_usage(obj)


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
