"""vLLM's block hashing as the simulator computes it: vLLM 0.33's known-answer vectors
(specs/kv-events.md §9.1) and the chain property."""

from __future__ import annotations

import pytest

from workers.sim.engine_hash import BlockHasher, event_value, none_hash

VECTORS = {
    "sha256_cbor": ("9bd96a485ad84efd", 8866452693264111234, 807986237951177663),
    "sha256": ("066b1e8987e02713", 1403909460543360175, 1643945449041937783),
}


@pytest.mark.parametrize("algo", sorted(VECTORS))
def test_known_answer_vectors(algo, monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    root, first, second = VECTORS[algo]
    assert none_hash(algo).hex().startswith(root)
    digests = BlockHasher(16, algo).digests(list(range(1, 33)))
    assert [event_value(d) for d in digests] == [first, second]


def test_chain_continues_from_a_parent_and_ignores_the_partial_tail(monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    h = BlockHasher(4)
    tokens = list(range(100, 114))  # three full blocks and two tokens
    whole = h.digests(tokens)
    assert len(whole) == 3
    assert h.digests(tokens, 2, whole[1]) == whole[2:]
    # A different first block changes every later digest (the chain).
    other = h.digests([7, *tokens[1:]])
    assert all(a != b for a, b in zip(whole, other, strict=True))


def test_pythonhashseed_changes_the_root(monkeypatch):
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    seeded = none_hash("sha256_cbor")
    monkeypatch.delenv("PYTHONHASHSEED")
    assert seeded != none_hash("sha256_cbor")


def test_large_token_ids_use_longer_cbor_heads(monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    h = BlockHasher(4)
    a = h.digests([23, 24, 255, 256])
    b = h.digests([65535, 65536, 2**32 - 1, 2**32])
    assert a != b and len(a) == len(b) == 1
    with pytest.raises(ValueError):
        h.digests([1, 2, 3, -1])
