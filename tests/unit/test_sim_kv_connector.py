"""The KV connector's pure parts: block content keys and parsing vLLM's kv_transfer_params."""

from __future__ import annotations

import pytest

from workers.sim.engine_hash import BlockHasher, event_value
from workers.sim.kv_connector import RemotePrefill, content_keys

BS = 4
PARAMS = {
    "do_remote_prefill": True,
    "remote_engine_id": "e1",
    "remote_host": "10.0.0.7",
    "remote_port": 5600,
    "remote_request_id": "cmpl-1",
    "remote_block_ids": [[3, 9, 4]],
    "remote_blocks_expiry_time": 123.5,
}


def test_content_keys_are_the_engine_hashes_plus_one_for_the_partial_block():
    hasher = BlockHasher(BS)
    prompt = list(range(1, 11))  # 2 full blocks and 2 tokens
    keys = content_keys(hasher, prompt)
    assert keys[:2] == [event_value(d) for d in hasher.digests(prompt)]
    assert len(keys) == 3 and keys[2] not in keys[:2]
    # The partial block's key depends on its tokens and on the chain before it.
    assert content_keys(hasher, [*prompt[:-1], 99])[2] != keys[2]
    assert content_keys(hasher, [0, *prompt[1:]])[2] != keys[2]
    assert content_keys(hasher, prompt[:8]) == keys[:2]


def test_known_digests_give_the_same_keys():
    hasher = BlockHasher(BS)
    prompt = list(range(50, 73))
    whole = content_keys(hasher, prompt)
    for n in (0, 2, 5, 9):  # fewer digests than blocks, all of them, more (a longer seq)
        known = hasher.digests(prompt + list(range(9)))[:n]
        assert content_keys(hasher, prompt, known) == whole


def test_params_parse_in_both_block_id_shapes():
    nested = RemotePrefill.from_params(PARAMS, prompt_len=10, block_size=BS)
    flat = RemotePrefill.from_params(
        dict(PARAMS, remote_block_ids=[3, 9, 4]), prompt_len=10, block_size=BS
    )
    assert nested == flat
    assert nested.block_ids == (3, 9, 4) and nested.expiry_time == 123.5
    assert str(nested) == "engine e1 at 10.0.0.7:5600"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"remote_port": True}, "remote_port is missing"),
        ({"remote_port": 0}, "not a port"),
        ({"remote_engine_id": None}, "remote_engine_id is missing"),
        ({"remote_host": ""}, "not a host name"),
        ({"remote_block_ids": [[1, -2, 3]]}, "must be block numbers"),
        ({"remote_block_ids": [[1, True, 3]]}, "must be block numbers"),
        ({"remote_block_ids": "1,2,3"}, "must be block numbers"),
        ({"remote_block_ids": [[1, 2]]}, "fills 3 blocks"),
        ({"remote_blocks_expiry_time": "soon"}, "must be a number"),
    ],
)
def test_bad_params_name_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        RemotePrefill.from_params(dict(PARAMS, **change), prompt_len=10, block_size=BS)
