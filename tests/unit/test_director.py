"""The Director with real parts: Pool, KvIndex fed with BlockStored events, ActiveLoad, the
Scheduler from a preset and a tiny tokenizer, driven through ``route`` and the response hooks
(specs/epp-protocol.md §2-§7, specs/routing-and-disagg.md §2 and §5)."""

from __future__ import annotations

import itertools
import json
import logging
import pathlib
import random
import re
import sys
from collections.abc import Sequence
from typing import Any

import pytest
from prometheus_client import REGISTRY

from epp import headers as H
from epp.director import Director, DirectorConfig
from epp.discovery.static import Endpoint, EndpointsChange
from epp.extproc.stream import RequestInfo, Routed, RoutingError
from epp.hashing import sequence_hashes
from epp.kvevents.types import BlockStored
from epp.kvindex.index import KvIndex
from epp.pool import Pool
from epp.scheduling.load import ActiveLoad
from epp.scheduling.scheduler import Scheduler
from epp.scheduling.types import Worker
from epp.tokenizer import Tokenizer

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from tiny_tokenizer import build_tiny_model

BS = 16
A = "10.0.0.1:8000"
B = "10.0.0.2:8000"
C = "10.0.0.3:8000"
D = "10.0.0.4:8000"

_ids = itertools.count()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.load(str(build_tiny_model(tmp_path_factory.mktemp("tok") / "tiny")))


class Setup:
    """A director over real parts, with helpers to feed the index and send requests."""

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        *,
        preset: str = "kv-aware",
        overrides: dict[str, Any] | None = None,
        tokenizer: Tokenizer | None = None,
        **config: Any,
    ) -> None:
        self.pool = Pool()
        self.pool.apply(EndpointsChange(added=tuple(endpoints)))
        self.index = KvIndex(BS)
        for worker, _ep in self.pool.workers():
            self.index.add_worker(worker)
        self.load = ActiveLoad()
        self.pinned: list[Routed] = []
        self.scheduler = Scheduler.from_preset(preset, overrides, rng=random.Random(1))
        self.director = Director(
            pool=self.pool,
            index=self.index,
            load=self.load,
            scheduler=self.scheduler,
            config=DirectorConfig(block_size=BS, **config),
            tokenizer=tokenizer,
            rng=random.Random(2),
        )

    def cache(self, worker: Worker, tokens: Sequence[int]) -> None:
        """The worker announces the full blocks of ``tokens`` as cached."""
        full = len(tokens) - len(tokens) % BS
        tokens = list(tokens[:full])
        # Engine hashes are content hashes: equal prefixes get equal hashes on every worker.
        hashes = sequence_hashes(tokens, BS)
        self.index.apply(worker, BlockStored(hashes, None, tokens, BS))

    def route(
        self,
        body: dict[str, Any] | bytes | None,
        *,
        path: str = "/v1/completions",
        headers: dict[str, str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Routed:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        return self.director.route(
            RequestInfo(
                request_id=f"req-{next(_ids)}",
                path=path,
                method="POST",
                headers=dict(headers or {}),
                body=data,
                metadata=metadata or {},
            )
        )

    def complete(self, routed: Routed) -> None:
        self.director.first_byte(routed)
        self.director.finished(routed, "complete")

    def view(self, address: str, rank: int = 0) -> tuple[int, int, int]:
        v = self.load.view((address, rank))
        return v.requests, v.prefill_tokens, v.decode_blocks

    def idle(self) -> bool:
        return len(self.load) == 0 and all(
            self.view(w[0], w[1]) == (0, 0, 0) for w, _ in self.pool.workers()
        )


def eps(*addresses: str, **kw: Any) -> list[Endpoint]:
    return [Endpoint(address=a, **kw) for a in addresses]


def prompt(n_tokens: int, start: int = 1000) -> list[int]:
    return list(range(start, start + n_tokens))


def comp(tokens: list[int], **extra: Any) -> dict[str, Any]:
    return {"model": "m", "prompt": tokens, **extra}


def headers_of(routed: Routed) -> dict[str, str]:
    return dict(routed.set_headers)


def hint(value: Any) -> dict[str, Any]:
    return {H.SUBSET_NAMESPACE: {H.DESTINATION_SUBSET: value}}


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def refused(setup: Setup, body: Any, **kw: Any) -> RoutingError:
    with pytest.raises(RoutingError) as err:
        setup.route(body, **kw)
    return err.value


# ------------------------------------------------------------------------ KV-aware picks


def test_the_worker_holding_the_prefix_gets_the_request() -> None:
    s = Setup(eps(A, B, C))
    p = prompt(8 * BS + 5)
    s.cache((B, 0), p)
    s.cache((C, 0), p[: 2 * BS])
    for _ in range(3):
        routed = s.route(comp(p))
        assert routed.destination == B
        h = headers_of(routed)
        assert h[H.WORKER_INSTANCE_ID] == str(H.worker_instance_id(B))
        assert h[H.DP_RANK] == "0"
        assert h[H.ROUTING_MODE] == "aggregated"
        # cached prefix: only the uncached tail is booked as prefill work
        assert s.view(B) == (1, len(p) - 8 * BS, 8)
        s.complete(routed)
        assert s.idle()
    record = s.director.decisions.recent(1)[0]
    cached = {c.worker: c.cached_blocks for c in record.candidates}
    assert cached == {A: 0, B: 8, C: 2}
    assert record.prompt_blocks == 8


def test_booked_load_shifts_later_picks() -> None:
    s = Setup(eps(A, B))
    p = prompt(40 * BS)
    s.cache((A, 0), p[: 2 * BS])  # a small overlap on A
    first = s.route(comp(p))
    assert first.destination == A
    s.complete(first)
    # A big request pinned to A (through the subset hint) books a long prefill there.
    big = s.route(comp(prompt(2000, start=50_000)), metadata=hint([A]))
    assert big.destination == A
    assert s.view(A) == (1, 2000, 2000 // BS)
    shifted = s.route(comp(p))
    assert shifted.destination == B  # two cached blocks do not outweigh 2000 queued tokens
    s.complete(shifted)
    # Prefill done: A's decode blocks still count, and still outweigh the overlap.
    s.director.first_byte(big)
    assert s.view(A) == (1, 0, 2000 // BS)
    again = s.route(comp(p))
    assert again.destination == B
    s.complete(again)
    s.director.finished(big, "complete")
    assert s.idle()
    back = s.route(comp(p))
    assert back.destination == A
    s.complete(back)


def test_concurrent_requests_for_one_prefix_share_booked_blocks() -> None:
    s = Setup(eps(A, B))
    p = prompt(10 * BS)
    s.cache((A, 0), p)
    one = s.route(comp(p))
    two = s.route(comp(p))
    assert one.destination == two.destination == A
    assert s.view(A) == (2, 0, 10)  # the ten blocks are counted once
    s.complete(one)
    assert s.view(A) == (1, 0, 10)
    s.complete(two)
    assert s.idle()


# ------------------------------------------------------------------------- destination


def test_fallbacks_are_distinct_addresses_primary_first() -> None:
    s = Setup(eps(A, B, C, D), fallbacks=2)
    p = prompt(6 * BS)
    s.cache((C, 0), p)
    routed = s.route(comp(p))
    addresses = routed.destination.split(",")
    assert len(addresses) == 3
    assert addresses[0] == C
    assert len(set(addresses)) == 3
    assert set(addresses) <= {A, B, C, D}
    assert " " not in routed.destination
    # only the primary is booked; the headers name the primary
    assert s.view(C)[0] == 1
    assert all(s.view(x)[0] == 0 for x in (A, B, D))
    assert headers_of(routed)[H.WORKER_INSTANCE_ID] == str(H.worker_instance_id(C))
    s.complete(routed)

    many = Setup(eps(A, B), fallbacks=5)
    assert sorted(many.route(comp(p)).destination.split(",")) == [A, B]


def test_fallbacks_never_repeat_the_address_of_data_parallel_ranks() -> None:
    s = Setup([Endpoint(A, dp_size=4), Endpoint(B)], fallbacks=3)
    for _ in range(5):
        routed = s.route(comp(prompt(3 * BS)))
        addresses = routed.destination.split(",")
        assert len(addresses) == len(set(addresses))
        assert set(addresses) <= {A, B}
        s.complete(routed)


def test_without_fallbacks_the_destination_is_one_address() -> None:
    s = Setup(eps(A, B, C))
    assert s.route(comp(prompt(BS))).destination in (A, B, C)


# ---------------------------------------------------------------------------- subset


def test_subset_hint_as_a_list_overrides_the_kv_preference() -> None:
    s = Setup(eps(A, B, C))
    p = prompt(8 * BS)
    s.cache((A, 0), p)
    for _ in range(5):
        routed = s.route(comp(p), metadata=hint([B, C]))
        assert routed.destination in (B, C)
        s.complete(routed)
    assert s.route(comp(p), metadata=hint([C])).destination == C


def test_subset_hint_as_a_comma_string() -> None:
    s = Setup(eps(A, B, C))
    p = prompt(8 * BS)
    s.cache((A, 0), p)
    seen = set()
    for _ in range(8):
        routed = s.route(comp(p), metadata=hint(f"{B}, {C}"))
        seen.add(routed.destination)
        s.complete(routed)
    assert seen <= {B, C}
    assert s.route(comp(p), metadata=hint(f"{C},")).destination == C


def test_subset_entries_without_a_port_allow_every_port_of_the_ip() -> None:
    s = Setup(eps("10.0.0.1:8001", "10.0.0.1:8002", "10.0.0.9:8001"))
    p = prompt(4 * BS)
    s.cache(("10.0.0.9:8001", 0), p)
    seen = set()
    for _ in range(10):
        routed = s.route(comp(p), metadata=hint(["10.0.0.1"]))
        seen.add(routed.destination)
        s.complete(routed)
    assert seen == {"10.0.0.1:8001", "10.0.0.1:8002"}  # load alternates between the ports
    # an entry with a port is exact
    assert s.route(comp(p), metadata=hint(["10.0.0.1:8002"])).destination == "10.0.0.1:8002"


@pytest.mark.parametrize("value", [[], "", ["10.9.9.9:1"], "10.0.0.2:9999", None])
def test_an_empty_or_foreign_subset_is_503(value: Any) -> None:
    s = Setup(eps(A, B))
    err = refused(s, comp(prompt(BS)), metadata=hint(value))
    assert err.status == 503
    assert s.idle()


def test_no_subset_hint_means_the_whole_pool_and_the_filter_can_be_disabled() -> None:
    s = Setup(eps(A, B))
    assert s.route(comp(prompt(BS)), metadata={H.SUBSET_NAMESPACE: {}}).destination in (A, B)
    off = Setup(eps(A, B), subset_filter=False)
    p = prompt(4 * BS)
    off.cache((A, 0), p)
    assert off.route(comp(p), metadata=hint([B])).destination == A


def test_empty_pool_is_503() -> None:
    s = Setup([])
    assert refused(s, comp(prompt(BS))).status == 503


# ------------------------------------------------------------------- conformance hooks


def test_conformance_testing_filter() -> None:
    s = Setup(eps(A, B, "10.0.0.2:8002"), testing_filter=True, served_verifier=True)
    body = {"model": "conformance-fake-model", "prompt": "hello"}
    err = refused(s, body, path="/some/path")
    assert err.status == 503
    for target in (A, B, "10.0.0.2:8002"):
        routed = s.route(body, path="/x", headers={H.TEST_ENDPOINT_SELECTION: target})
        assert routed.destination == target
        extra = s.director.response_headers(routed, 200, target, False)
        assert extra == [(H.CONFORMANCE_SERVED, target)]
        s.complete(routed)
    seen = set()
    for _ in range(12):
        routed = s.route(body, headers={H.TEST_ENDPOINT_SELECTION: "10.0.0.2"})
        seen.add(routed.destination)
        s.complete(routed)
    assert seen == {B, "10.0.0.2:8002"}
    # the test header wins over the gateway's subset hint
    routed = s.route(body, headers={H.TEST_ENDPOINT_SELECTION: A}, metadata=hint([B]))
    assert routed.destination == A
    assert s.director.response_headers(routed, 200, None, False) == [
        (H.CONFORMANCE_SERVED, f"fail: missing {H.DESTINATION_SERVED}")
    ]
    s.director.finished(routed, "complete")
    assert s.idle()


# ------------------------------------------------------------------------- the body


def test_unserved_model_is_400() -> None:
    s = Setup(eps(A), served_model_names=("m", "m2"))
    assert s.route(comp(prompt(BS))).destination == A
    err = refused(s, {"model": "other", "prompt": "x"})
    assert err.status == 400
    assert "'other'" in err.reason and "m, m2" in err.reason


def cache_for_adapter(s: Setup, worker: Worker, tokens: Sequence[int], adapter: str) -> None:
    """The worker announces blocks it computed for a LoRA adapter (``lora_name`` set)."""
    full = len(tokens) - len(tokens) % BS
    tokens = list(tokens[:full])
    # Engines fold the adapter into their block hashes (vLLM: extra_keys).
    salt = int.from_bytes(adapter.encode()[:8].ljust(8, b"\0"), "little")
    hashes = [h ^ salt for h in sequence_hashes(tokens, BS)]
    s.index.apply(worker, BlockStored(hashes, None, tokens, BS, lora_name=adapter))


def test_a_lora_request_matches_its_adapter_blocks_not_the_base_models() -> None:
    s = Setup(eps(A, B, C), served_model_names=("m",), lora_adapters=("sql-lora",))
    p = prompt(6 * BS)
    s.cache((A, 0), p)  # the base model's KV for this prompt
    cache_for_adapter(s, (B, 0), p, "sql-lora")
    cache_for_adapter(s, (C, 0), p, "other-lora")
    lora = s.route({"model": "sql-lora", "prompt": p})  # an adapter is a served name too
    assert lora.destination == B
    cached = {c.worker: c.cached_blocks for c in s.director.decisions.recent(1)[0].candidates}
    assert cached == {A: 0, B: 6, C: 0}
    s.complete(lora)
    base = s.route(comp(p))
    assert base.destination == A
    cached = {c.worker: c.cached_blocks for c in s.director.decisions.recent(1)[0].candidates}
    assert cached == {A: 6, B: 0, C: 0}


def test_bad_bodies_are_400_and_book_nothing() -> None:
    s = Setup(eps(A))
    for data in (b"{nope", b"[1]", b'{"prompt": "x"}', b'{"model": "m"}'):
        assert refused(s, data).status == 400
    assert s.idle()


def test_token_id_prompt_is_used_without_a_tokenizer_and_sent_as_token_data() -> None:
    s = Setup(eps(A, B))
    p = prompt(5 * BS + 3)
    s.cache((B, 0), p)
    body = comp(p, max_tokens=7, nvext={"agent_hints": {"osl": 9}})
    routed = s.route(body)
    assert routed.destination == B
    assert routed.body is not None
    sent = json.loads(routed.body)
    assert sent["nvext"]["token_data"] == p
    assert sent["nvext"]["agent_hints"] == {"osl": 9}
    assert {k: v for k, v in sent.items() if k != "nvext"} == {
        "model": "m",
        "prompt": p,
        "max_tokens": 7,
    }
    assert s.director.decisions.recent(1)[0].prompt_tokens == len(p)


def test_token_data_off_leaves_the_body_alone() -> None:
    s = Setup(eps(A, B), token_data=False)
    p = prompt(5 * BS)
    s.cache((B, 0), p)
    routed = s.route(comp(p))
    assert routed.destination == B  # still matched against the cache
    assert routed.body is None


def test_text_prompt_without_a_tokenizer_routes_on_load_only() -> None:
    s = Setup(eps(A, B))
    text = "tell me a story " * 40
    first = s.route({"model": "m", "prompt": text})
    second = s.route({"model": "m", "prompt": text})
    assert first.body is None and second.body is None
    assert {first.destination, second.destination} == {A, B}  # the booked load spreads them
    record = s.director.decisions.recent(1)[0]
    assert record.prompt_blocks == 0
    assert record.prompt_tokens > 0
    chat = s.route(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        path="/v1/chat/completions",
    )
    assert chat.body is None
    for routed in (first, second, chat):
        s.complete(routed)
    assert s.idle()


def test_add_special_tokens_is_honoured_per_api(tokenizer: Tokenizer) -> None:
    s = Setup(eps(A), tokenizer=tokenizer)
    messages = [{"role": "user", "content": "hello there"}]

    def sent(routed: Routed) -> list[int]:
        assert routed.body is not None
        return json.loads(routed.body)["nvext"]["token_data"]

    chat = "/v1/chat/completions"
    plain = s.route({"model": "m", "messages": messages}, path=chat)
    extra = s.route({"model": "m", "messages": messages, "add_special_tokens": True}, path=chat)
    assert sent(plain) == tokenizer.encode_chat(messages)
    assert sent(extra) == tokenizer.encode_chat(messages, add_special_tokens=True)
    assert sent(extra) != sent(plain)  # the tiny tokenizer adds a BOS
    text = {"model": "m", "prompt": "once upon a time"}
    assert sent(s.route(text)) == tokenizer.encode_prompt("once upon a time")
    bare = s.route({**text, "add_special_tokens": False})
    assert sent(bare) == tokenizer.encode_prompt("once upon a time", add_special_tokens=False)
    # vLLM's request models read booleans leniently (pydantic's lax mode).
    for lax in (0, "false", "no", "off"):
        assert sent(s.route({**text, "add_special_tokens": lax})) == sent(bare)
    err = refused(s, {**text, "add_special_tokens": "maybe"})
    assert err.status == 400 and "add_special_tokens" in err.reason
    assert refused(s, {**text, "add_special_tokens": 2}).status == 400


def test_chat_is_tokenized_matched_and_sent_as_token_data(tokenizer: Tokenizer) -> None:
    s = Setup(eps(A, B, C), tokenizer=tokenizer)
    messages = [
        {"role": "system", "content": "You are a helpful assistant. " * 30},
        {"role": "user", "content": "What is the weather in Paris today?"},
    ]
    ids = tokenizer.encode_chat(messages)
    assert len(ids) > 4 * BS
    s.cache((C, 0), ids)
    routed = s.route({"model": "m", "messages": messages}, path="/v1/chat/completions")
    assert routed.destination == C
    assert routed.body is not None
    sent = json.loads(routed.body)
    assert sent["nvext"]["token_data"] == ids
    assert sent["messages"] == messages
    record = s.director.decisions.recent(1)[0]
    assert record.prompt_tokens == len(ids)
    assert record.prompt_blocks == len(ids) // BS
    # a completions text prompt is tokenized as the engine does (BOS included)
    text = s.route({"model": "m", "prompt": "The quick brown fox"})
    assert text.body is not None
    assert json.loads(text.body)["nvext"]["token_data"] == tokenizer.encode_prompt(
        "The quick brown fox"
    )


def test_chat_template_error_is_400(tokenizer: Tokenizer) -> None:
    s = Setup(eps(A), tokenizer=tokenizer)
    err = refused(
        s,
        {"model": "m", "messages": [{"role": "function", "content": "once upon a time"}]},
        path="/v1/chat/completions",
    )
    assert err.status == 400
    assert "Conversation roles must be user, assistant or tool; got function" in err.reason
    assert s.idle()


# -------------------------------------------------------------- priority and shedding


def saturated_setup() -> Setup:
    """Two workers, each with 200 prefill tokens booked over a 100-token busy threshold."""
    s = Setup(eps(A, B), overrides={"activePrefillTokensThreshold": 100})
    s.pinned = [
        s.route(comp(prompt(200, start=9000 + i)), metadata=hint([x])) for i, x in enumerate((A, B))
    ]
    assert s.view(A)[1] == s.view(B)[1] == 200
    return s


@pytest.mark.parametrize(
    ("extra", "headers"),
    [
        ({"nvext": {"agent_hints": {"priority": -1}}}, {}),
        ({}, {"x-gateway-inference-objective": "-1"}),
        ({}, {"x-llm-d-inference-objective": "-5"}),
    ],
)
def test_sheddable_requests_get_429_when_every_worker_is_busy(
    extra: dict[str, Any], headers: dict[str, str]
) -> None:
    s = saturated_setup()
    before = sample(
        "inference_objective_request_error_total",
        {"model_name": "m", "target_model_name": "m", "error_code": "ResourceExhausted"},
    )
    err = refused(s, comp(prompt(BS), **extra), headers=headers)
    assert err.status == 429
    assert err.kind == "ResourceExhausted"
    assert "saturated" in err.reason
    after = sample(
        "inference_objective_request_error_total",
        {"model_name": "m", "target_model_name": "m", "error_code": "ResourceExhausted"},
    )
    assert after == before + 1
    # One worker stops being busy (its prefill is done): the request routes there.
    s.director.first_byte(s.pinned[1])
    routed = s.route(comp(prompt(BS), **extra), headers=headers)
    assert routed.destination == B


@pytest.mark.parametrize(
    ("extra", "headers"),
    [
        ({}, {}),
        ({"nvext": {"agent_hints": {"priority": 0}}}, {}),
        ({"nvext": {"agent_hints": {"priority": 3}}}, {"x-gateway-inference-objective": "-1"}),
        ({}, {"x-gateway-inference-objective": "premium"}),  # a name: priority 0
        ({}, {"x-gateway-inference-objective": "2"}),
    ],
)
def test_non_sheddable_requests_route_even_when_every_worker_is_busy(
    extra: dict[str, Any], headers: dict[str, str]
) -> None:
    s = saturated_setup()
    routed = s.route(comp(prompt(BS), **extra), headers=headers)
    assert routed.destination in (A, B)


def test_priority_is_counted_in_the_request_metric() -> None:
    s = Setup(eps(A))
    labels = {"model_name": "prio", "target_model_name": "prio", "priority": "-3"}
    before = sample("inference_objective_request_total", labels)
    s.route({"model": "prio", "prompt": "x"}, headers={"x-gateway-inference-objective": "-3"})
    s.route({"model": "prio", "prompt": "x", "nvext": {"agent_hints": {"priority": -3}}})
    assert sample("inference_objective_request_total", labels) == before + 2


# ---------------------------------------------------------------------- disaggregation


def test_disaggregated_bookings_are_released_at_first_byte_and_at_the_end() -> None:
    s = Setup([Endpoint(A, role="prefill"), Endpoint(B, role="decode"), Endpoint(C, role="decode")])
    p = prompt(10 * BS + 4)
    s.cache((A, 0), p[: 4 * BS])
    running = {"model_name": "m"}
    before = sample("inference_objective_running_requests", running)
    routed = s.route(comp(p))
    h = headers_of(routed)
    assert h[H.ROUTING_MODE] == "disaggregated"
    assert h[H.PREFILLER_HOST_PORT] == A
    assert h[H.PREFILL_DP_RANK] == "0"
    decode = routed.destination
    assert decode in (B, C)
    assert h[H.WORKER_INSTANCE_ID] == str(H.worker_instance_id(decode))
    # prefill side: the uncached prompt tokens, no decode blocks; decode side: blocks only
    assert s.view(A) == (1, len(p) - 4 * BS, 0)
    assert s.view(decode) == (1, 0, 10)
    assert len(s.load) == 2
    assert sample("inference_objective_running_requests", running) == before + 1
    record = s.director.decisions.recent(1)[0]
    assert record.mode == "disaggregated"
    assert record.prefill == A
    for _ in range(2):  # a repeated hook changes nothing
        s.director.first_byte(routed)
        assert s.view(A) == (0, 0, 0)
        assert s.view(decode) == (1, 0, 10)
        assert len(s.load) == 1
    for _ in range(2):
        s.director.finished(routed, "complete")
        assert s.idle()
        assert sample("inference_objective_running_requests", running) == before


def test_disaggregated_request_aborted_before_the_first_byte_releases_both() -> None:
    s = Setup([Endpoint(A, role="prefill"), Endpoint(B, role="decode")])
    routed = s.route(comp(prompt(3 * BS)))
    assert len(s.load) == 2
    s.director.finished(routed, "aborted")
    assert s.idle()
    s.director.first_byte(routed)  # late hooks do nothing
    s.director.finished(routed, "aborted")
    assert s.idle()


def test_prefill_only_pool_is_503() -> None:
    s = Setup([Endpoint(A, role="prefill")])
    err = refused(s, comp(prompt(BS)))
    assert err.status == 503
    assert "prefill-only" in err.reason


# --------------------------------------------------------------------- served endpoint


def test_served_endpoint_moves_the_booking_and_counts_the_mismatch() -> None:
    s = Setup(eps(A, B, C))
    p = prompt(6 * BS + 8)
    s.cache((A, 0), p)
    mismatches = sample("kvpick_served_endpoint_mismatch_total")
    routed = s.route(comp(p))
    assert routed.destination == A
    assert s.view(A) == (1, 8, 6)
    assert s.director.response_headers(routed, 200, B, False) == []
    assert s.view(A) == (0, 0, 0)
    assert s.view(B) == (1, 8, 6)
    assert sample("kvpick_served_endpoint_mismatch_total") == mismatches + 1
    s.director.first_byte(routed)
    assert s.view(B) == (1, 0, 6)
    s.director.finished(routed, "complete")
    assert s.idle()
    # served where picked: nothing moves, nothing counted
    same = s.route(comp(p))
    s.director.response_headers(same, 200, A, False)
    assert s.view(A)[0] == 1
    assert sample("kvpick_served_endpoint_mismatch_total") == mismatches + 1
    s.complete(same)
    # a list takes its first entry
    listed = s.route(comp(p))
    s.director.response_headers(listed, 200, f"{C}, {A}", False)
    assert s.view(C)[0] == 1 and s.view(A)[0] == 0
    s.complete(listed)
    assert s.idle()


def test_served_single_rank_endpoint_after_a_picked_dp_rank() -> None:
    s = Setup([Endpoint(A, dp_size=2), Endpoint(B)])
    p = prompt(6 * BS)
    s.cache((A, 1), p)
    routed = s.route(comp(p))
    assert headers_of(routed)[H.DP_RANK] == "1"
    s.director.response_headers(routed, 200, B, False)
    assert s.view(B, 0)[0] == 1  # booked on the rank that exists
    assert s.view(A, 1)[0] == 0
    s.complete(routed)
    assert s.idle()


def test_served_endpoint_feeds_the_approximate_prefix_index() -> None:
    s = Setup(eps(A, B, C), preset="gaie-default")
    text = "a long shared system prompt, " * 40
    first = s.route({"model": "m", "prompt": text})
    picked = first.destination
    served = next(x for x in (A, B, C) if x != picked)
    s.director.response_headers(first, 200, served, False)
    s.complete(first)
    record = s.director.decisions.recent(1)[0]
    assert all(c.parts["prefix-cache-scorer"] == 0.0 for c in record.candidates)
    s.route({"model": "m", "prompt": text})
    parts = {
        c.worker: c.parts["prefix-cache-scorer"]
        for c in s.director.decisions.recent(1)[0].candidates
    }
    assert parts[served] == 1.0


def test_aborted_exchange_releases_and_counts_the_outcome() -> None:
    s = Setup(eps(A))
    labels = {"model_name": "m", "target_model_name": "m", "error_code": "aborted"}
    before = sample("inference_objective_request_error_total", labels)
    routed = s.route(comp(prompt(4 * BS)))
    assert s.view(A) == (1, 4 * BS, 4)
    s.director.finished(routed, "aborted")
    assert s.idle()
    assert sample("inference_objective_request_error_total", labels) == before + 1


def test_bodyless_request_goes_to_a_ready_endpoint_and_books_nothing() -> None:
    s = Setup(eps(A, B))
    seen = set()
    for _ in range(12):
        routed = s.route(None, path="/v1/models")
        seen.add(routed.destination)
        assert s.idle()
        s.director.response_headers(routed, 200, routed.destination, False)
        s.complete(routed)
    assert seen == {A, B}
    assert refused(s, None, metadata=hint([])).status == 503


# ------------------------------------------------------------------------ decision log


def test_decision_log_and_its_log_line(caplog: pytest.LogCaptureFixture) -> None:
    s = Setup(eps(A, B, C))
    p = prompt(8 * BS)
    s.cache((B, 0), p)
    s.cache((C, 0), p[: 3 * BS])
    with caplog.at_level(logging.INFO, logger="epp.decisions"):
        routed = s.route(comp(p))
    record = s.director.decisions.recent(1)[0]
    assert record.request_id == routed.state.request_id
    assert (record.chosen, record.destination, record.mode) == (B, B, "aggregated")
    assert record.prompt_blocks == 8 and record.prompt_tokens == 8 * BS
    by = {c.worker: c for c in record.candidates}
    assert {w: c.cached_blocks for w, c in by.items()} == {A: 0, B: 8, C: 3}
    assert by[B].cached_by_tier == {"device": 8}
    assert by[A].cached_by_tier == {}
    assert by[B].cost is not None and by[A].cost is not None
    assert by[B].cost < by[C].cost < by[A].cost
    assert by[B].score == max(c.score for c in record.candidates)
    assert set(by[B].parts) == {"kv-aware-scorer"}
    (line,) = [r.getMessage() for r in caplog.records if r.name == "epp.decisions"]
    m = re.search(
        r"selected worker (\S+): cost ([\d.]+), score [\d.]+, cached (\d+) of (\d+) blocks; "
        r"others: (.*)$",
        line,
    )
    assert m is not None, line
    assert m.group(1) == B
    assert float(m.group(2)) == pytest.approx(by[B].cost, abs=0.05)
    assert (m.group(3), m.group(4)) == ("8", "8")
    others = m.group(5)
    assert others.index(C) < others.index(A)  # best first
    assert f"{C} cost {by[C].cost:.1f}" in others and "cached 3 of 8 blocks" in others
    assert routed.state.request_id in line


def test_decision_log_is_bounded_and_disaggregated_lines_name_the_prefill() -> None:
    s = Setup([Endpoint(A, role="prefill"), Endpoint(B, role="decode")], decision_log_size=3)
    for _ in range(5):
        s.complete(s.route(comp(prompt(2 * BS))))
    assert len(s.director.decisions) == 3
    record = s.director.decisions.recent(1)[0]
    assert [c.worker for c in record.prefill_candidates] == [A]
    assert [c.worker for c in record.candidates] == [B]
    assert record.log_line().endswith(f"; prefill on {A}")


# ----------------------------------------------------------------------- data parallel


def test_data_parallel_ranks_are_separate_candidates() -> None:
    s = Setup([Endpoint(A, dp_size=2), Endpoint(B)])
    p = prompt(6 * BS)
    s.cache((A, 1), p)
    routed = s.route(comp(p))
    assert routed.destination == A  # the address, no rank
    assert headers_of(routed)[H.DP_RANK] == "1"
    assert s.view(A, 1)[0] == 1 and s.view(A, 0)[0] == 0
    record = s.director.decisions.recent(1)[0]
    assert record.chosen == f"{A}#1"
    assert {c.worker: c.cached_blocks for c in record.candidates} == {
        f"{A}#0": 0,
        f"{A}#1": 6,
        B: 0,
    }
    s.complete(routed)
    s.cache((A, 0), prompt(6 * BS, start=7000))
    routed = s.route(comp(prompt(6 * BS, start=7000)))
    assert (routed.destination, headers_of(routed)[H.DP_RANK]) == (A, "0")
    assert s.director.decisions.recent(1)[0].chosen == f"{A}#0"
