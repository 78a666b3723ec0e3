"""The model's context length, and the 400 a prompt that cannot fit gets.

The EPP refuses a prompt that cannot fit the model's context before routing it, so that it
is neither tokenized in full nor booked as prefill load on a worker that would refuse it
anyway. The rule and the words are vLLM's (its ``TokenizeParams`` checks in
``vllm/renderers/params.py``): the input may use ``max_model_len - max_output_tokens``
tokens, where ``max_output_tokens`` is the request's own limit (0 when it sets none); a
text longer than that many tokens times the longest token of the vocabulary, in
characters, cannot fit and is refused without tokenizing; otherwise encoding stops one
token past the limit, and the count reported is where it stopped.

Where the context length comes from, first found wins: ``--max-model-len``; the model
folder's ``config.json``, read as vLLM derives ``max_model_len`` (the smallest of the
position-limit keys it knows, scaled by a RoPE scaling factor where that stretches the
context, a ``text_config`` consulted for multimodal models); ``tokenizer_config.json``'s
``model_max_length`` when it is a real number (transformers writes 1e30 for "none"). With
none of them there is no check.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# The config keys vLLM reads a model's position limit from, in its order.
_POSITION_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "model_max_length",
    "max_target_positions",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)
# RoPE scalings that already state the stretched length in max_position_embeddings.
_UNSCALED_ROPE = ("su", "longrope", "llama3", "mrope", "default")
_NO_LIMIT = 10**12  # transformers' VERY_LARGE_INTEGER is 1e30; anything this big means none


def from_model_config(config: Mapping[str, Any]) -> int | None:
    """``max_model_len`` as vLLM derives it from a model's ``config.json``; None if unknown."""
    sub = config.get("text_config")
    if isinstance(sub, Mapping):
        inner = from_model_config(sub)
        if inner is not None:
            return inner
    found = [v for k in _POSITION_KEYS if isinstance(v := config.get(k), int) and 0 < v < _NO_LIMIT]
    if not found:
        return None
    length = min(found)
    rope = config.get("rope_scaling")
    if isinstance(rope, Mapping):
        kind = rope.get("rope_type", rope.get("type"))
        factor = rope.get("factor")
        if kind not in _UNSCALED_ROPE and isinstance(factor, int | float) and factor > 1:
            if kind == "yarn" and isinstance(rope.get("original_max_position_embeddings"), int):
                length = rope["original_max_position_embeddings"]
            length = int(length * factor)
    return length


def from_model_folder(folder: Path) -> tuple[int | None, str]:
    """The context length a model folder states, and which file said so."""
    config = _read(folder / "config.json")
    if config is not None:
        length = from_model_config(config)
        if length is not None:
            return length, "config.json"
    tok_config = _read(folder / "tokenizer_config.json")
    if tok_config is not None:
        value = tok_config.get("model_max_length")
        if isinstance(value, int | float) and 0 < value < _NO_LIMIT:
            return int(value), "tokenizer_config.json model_max_length"
    return None, "none"


def _read(path: Path) -> Mapping[str, Any] | None:
    try:
        doc = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, Mapping) else None


class PromptTooLong(ValueError):
    """A prompt that cannot fit: ``tokens`` input tokens (a lower bound when encoding
    stopped at the limit), or ``chars`` characters over the character bound ``max_chars``
    (then it was not tokenized at all)."""

    def __init__(
        self, *, tokens: int | None = None, chars: int | None = None, max_chars: int | None = None
    ) -> None:
        super().__init__(f"prompt too long: tokens={tokens} chars={chars}")
        self.tokens = tokens
        self.chars = chars
        self.max_chars = max_chars


def input_limit(max_model_len: int, max_output_tokens: int | None) -> int:
    """The most input tokens a request may have (vLLM's ``max_input_tokens``)."""
    return max_model_len - (max_output_tokens or 0)


def refusal(max_model_len: int, max_output_tokens: int | None, exc: PromptTooLong) -> str:
    """The 400 message for a prompt that cannot fit, in vLLM's words."""
    output = max_output_tokens or 0
    limit = input_limit(max_model_len, max_output_tokens)
    if exc.chars is not None:
        return (
            f"You passed {exc.chars} input characters and requested {output} output tokens. "
            f"However, the model's context length is only {max_model_len} tokens, resulting "
            f"in a maximum input length of {limit} tokens (at most {exc.max_chars} "
            "characters). Please reduce the length of the input prompt."
        )
    return (
        f"You passed {exc.tokens} input tokens and requested {output} output tokens. "
        f"However, the model's context length is only {max_model_len} tokens, resulting in "
        f"a maximum input length of {limit} tokens. Please reduce the length of the input "
        "prompt."
    )


def output_refusal(max_model_len: int, max_output_tokens: int, field: str) -> str:
    """The 400 message for an output limit larger than the whole context."""
    return (
        f"{field}={max_output_tokens} cannot be greater than max_model_len={max_model_len}. "
        "Please request fewer output tokens."
    )
