"""Answers in the shape the client asked for, made from the engine's completions output.

The token path runs every request as a completions request on the engine; this module turns
that output back into vLLM's chat completion, completion or Responses API answer, as one
JSON object (:meth:`Shaper.full`) or as server-sent events (:meth:`Shaper.stream_start`,
:meth:`Shaper.stream_piece`, :meth:`Shaper.stream_end`). Pure: no I/O; bytes out.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

_encode = msgspec.json.Encoder().encode

Api = Literal["chat", "completions", "responses"]


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None = None


@dataclass(slots=True)
class Piece:
    """One step of the engine's output (one completions choice, or one streamed chunk)."""

    text: str
    token_ids: list[int] | None = None
    logprobs: dict[str, Any] | None = None  # completions-format logprobs of this piece
    finish_reason: str | None = None
    stop_reason: str | int | None = None


def _sse(doc: dict[str, Any]) -> bytes:
    return b"data: " + _encode(doc) + b"\n\n"


def _event(kind: str, doc: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + _encode(doc) + b"\n\n"


def chat_logprobs(raw: dict[str, Any] | None, top: int) -> list[dict[str, Any]]:
    """Completions-format logprobs as chat's ``logprobs.content`` entries."""
    if not raw:
        return []
    out = []
    tokens = raw.get("tokens") or []
    lps = raw.get("token_logprobs") or []
    tops = raw.get("top_logprobs") or []
    for i, token in enumerate(tokens):
        alts = tops[i] if i < len(tops) and tops[i] else {}
        out.append(
            {
                "token": token,
                "logprob": lps[i] if i < len(lps) and lps[i] is not None else -9999.0,
                "bytes": list(token.encode("utf-8")),
                "top_logprobs": [
                    {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}
                    for t, lp in list(alts.items())[:top]
                ],
            }
        )
    return out


def _merge_logprobs(pieces: list[Piece]) -> dict[str, Any] | None:
    parts = [p.logprobs for p in pieces if p.logprobs]
    if not parts:
        return None
    merged: dict[str, list[Any]] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for part in parts:
        for key in merged:
            merged[key] += part.get(key) or []
    return merged


class Shaper:
    """Formats one request's answer; see the module docstring."""

    def __init__(
        self,
        api: Api,
        *,
        model: str,
        request_id: str | None = None,
        created: int | None = None,
        include_usage: bool = False,
        return_token_ids: bool = False,
        prompt_token_ids: list[int] | None = None,
        want_logprobs: bool = False,
        top_logprobs: int = 0,
        request: dict[str, Any] | None = None,
    ) -> None:
        self.api = api
        self.model = model
        prefix = {"chat": "chatcmpl-", "completions": "cmpl-", "responses": "resp_"}[api]
        self.id = request_id or prefix + uuid.uuid4().hex
        self.created = created if created is not None else int(time.time())
        self.include_usage = include_usage
        self.return_token_ids = return_token_ids
        self.prompt_token_ids = prompt_token_ids
        self.want_logprobs = want_logprobs
        self.top_logprobs = top_logprobs
        self.request = request or {}
        self._first = True
        self._text: list[str] = []
        self._finish: str | None = None
        self._seq = 0
        self._msg_id = "msg_" + uuid.uuid4().hex

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _usage(u: Usage) -> dict[str, Any]:
        details = {"cached_tokens": u.cached_tokens} if u.cached_tokens is not None else None
        return {
            "prompt_tokens": u.prompt_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "completion_tokens": u.completion_tokens,
            "prompt_tokens_details": details,
        }

    @staticmethod
    def _responses_usage(u: Usage) -> dict[str, Any]:
        return {
            "input_tokens": u.prompt_tokens,
            "input_tokens_details": {"cached_tokens": u.cached_tokens or 0},
            "output_tokens": u.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u.prompt_tokens + u.completion_tokens,
        }

    def _chat_lp(self, raw: dict[str, Any] | None) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        return {"content": chat_logprobs(raw, self.top_logprobs)}

    def _response(self, status: str, text: str, usage: Usage | None) -> dict[str, Any]:
        r = self.request
        done = status != "in_progress"
        content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        output = (
            [
                {
                    "type": "message",
                    "id": self._msg_id,
                    "status": "completed" if status == "completed" else "incomplete",
                    "role": "assistant",
                    "content": content,
                }
            ]
            if done
            else []
        )
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.model,
            "output": output,
            "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete"
            else None,
            "instructions": r.get("instructions"),
            "error": None,
            "metadata": r.get("metadata"),
            "parallel_tool_calls": bool(r.get("parallel_tool_calls", True)),
            "tool_choice": r.get("tool_choice", "auto"),
            "tools": r.get("tools") or [],
            "temperature": r.get("temperature"),
            "top_p": r.get("top_p"),
            "max_output_tokens": r.get("max_output_tokens"),
            "previous_response_id": r.get("previous_response_id"),
            "text": {"format": {"type": "text"}},
            "truncation": r.get("truncation", "disabled"),
            "user": r.get("user"),
            "usage": self._responses_usage(usage) if usage is not None else None,
        }

    def _status(self, finish: str | None) -> str:
        return "incomplete" if finish == "length" else "completed"

    # ------------------------------------------------------------------ whole answers

    def full(
        self, pieces: list[Piece], usage: Usage, *, kv_transfer_params: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        text = "".join(p.text for p in pieces)
        last = pieces[-1] if pieces else Piece("")
        if self.api == "responses":
            return self._response(self._status(last.finish_reason), text, usage)
        ids = [t for p in pieces for t in (p.token_ids or ())]
        lp = _merge_logprobs(pieces)
        if self.api == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "tool_calls": []},
                "logprobs": self._chat_lp(lp),
                "finish_reason": last.finish_reason,
                "stop_reason": last.stop_reason,
            }
            obj = "chat.completion"
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": lp,
                "finish_reason": last.finish_reason,
                "stop_reason": last.stop_reason,
                "prompt_logprobs": None,
            }
            obj = "text_completion"
        if self.return_token_ids:
            choice["token_ids"] = ids
            choice["prompt_token_ids"] = self.prompt_token_ids
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": self._usage(usage),
            "kv_transfer_params": kv_transfer_params,
        }

    # ------------------------------------------------------------------ streams

    def _chunk(self, choices: list[dict[str, Any]], usage: Usage | None = None) -> bytes:
        obj = "chat.completion.chunk" if self.api == "chat" else "text_completion"
        doc: dict[str, Any] = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            doc["usage"] = self._usage(usage)
        return _sse(doc)

    def _ev(self, kind: str, **fields: Any) -> bytes:
        doc = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return _event(kind, doc)

    def stream_start(self) -> bytes:
        if self.api == "chat":
            first: dict[str, Any] = {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            if self.return_token_ids:
                first["prompt_token_ids"] = self.prompt_token_ids
            return self._chunk([first])
        if self.api == "responses":
            shell = self._response("in_progress", "", None)
            item = {
                "type": "message",
                "id": self._msg_id,
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            return b"".join(
                (
                    self._ev("response.created", response=shell),
                    self._ev("response.in_progress", response=shell),
                    self._ev("response.output_item.added", output_index=0, item=item),
                    self._ev(
                        "response.content_part.added",
                        item_id=self._msg_id,
                        output_index=0,
                        content_index=0,
                        part=part,
                    ),
                )
            )
        return b""

    def stream_piece(self, piece: Piece) -> bytes:
        self._text.append(piece.text)
        if piece.finish_reason is not None:
            self._finish = piece.finish_reason
        if self.api == "responses":
            if not piece.text:
                return b""
            return self._ev(
                "response.output_text.delta",
                item_id=self._msg_id,
                output_index=0,
                content_index=0,
                delta=piece.text,
                logprobs=[],
            )
        choice: dict[str, Any] = {"index": 0}
        if self.api == "chat":
            choice["delta"] = {"content": piece.text}
            choice["logprobs"] = self._chat_lp(piece.logprobs)
        else:
            choice["text"] = piece.text
            choice["logprobs"] = piece.logprobs
        choice["finish_reason"] = piece.finish_reason
        choice["stop_reason"] = piece.stop_reason
        if self.return_token_ids:
            choice["token_ids"] = piece.token_ids or []
            if self.api == "completions" and self._first:
                choice["prompt_token_ids"] = self.prompt_token_ids
        self._first = False
        return self._chunk([choice])

    def stream_end(
        self, usage: Usage, *, kv_transfer_params: dict[str, Any] | None = None
    ) -> bytes:
        if self.api == "responses":
            text = "".join(self._text)
            status = self._status(self._finish)
            final = self._response(status, text, usage)
            item = final["output"][0]
            return b"".join(
                (
                    self._ev(
                        "response.output_text.done",
                        item_id=self._msg_id,
                        output_index=0,
                        content_index=0,
                        text=text,
                        logprobs=[],
                    ),
                    self._ev(
                        "response.content_part.done",
                        item_id=self._msg_id,
                        output_index=0,
                        content_index=0,
                        part=item["content"][0],
                    ),
                    self._ev("response.output_item.done", output_index=0, item=item),
                    self._ev(
                        "response.completed" if status == "completed" else "response.incomplete",
                        response=final,
                    ),
                )
            )
        out = b""
        if self.include_usage:
            out = self._chunk([], usage)
        return out + b"data: [DONE]\n\n"

    def stream_error(self, message: str, *, code: int = 500) -> bytes:
        if self.api == "responses":
            return self._ev("error", code=str(code), message=message, param=None)
        kind = "InternalServerError" if code >= 500 else "BadRequestError"
        return _sse({"error": {"message": message, "type": kind, "param": None, "code": code}})
