"""How long a simulated engine step takes: the polynomial model of Dynamo's mocker
(specs/routing-and-disagg.md §9), in one place.

* prefill: ``4.209989e-07·t² + 1.518344e-02·t + 16.50142`` ms for ``t`` new prompt tokens
  in the step;
* decode step: ``max(1, −25.74·p² + 54.01·p + 5.74)`` ms at KV occupancy ``p`` in [0, 1].

A step that computes prompt tokens costs the prefill time (the decode tokens riding along
in the same batch are not charged again); a decode-only step costs the decode time. Both
are divided by ``speedup``.
"""

from __future__ import annotations


def prefill_ms(new_tokens: int) -> float:
    t = float(new_tokens)
    return 4.209989e-07 * t * t + 1.518344e-02 * t + 16.50142


def decode_ms(occupancy: float) -> float:
    p = min(1.0, max(0.0, occupancy))
    return max(1.0, -25.74 * p * p + 54.01 * p + 5.74)


def step_seconds(prefill_tokens: int, decode_seqs: int, occupancy: float, speedup: float) -> float:
    """Wall time of one step with ``prefill_tokens`` prompt tokens and ``decode_seqs``
    sequences decoding one token each; 0 for an empty step."""
    if prefill_tokens > 0:
        ms = prefill_ms(prefill_tokens)
    elif decode_seqs > 0:
        ms = decode_ms(occupancy)
    else:
        return 0.0
    return ms / 1000.0 / speedup
