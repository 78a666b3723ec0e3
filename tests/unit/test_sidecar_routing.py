"""Direct-mode routing: worker specs, the rank table, header reading, the prefill allow-list."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from sidecar.allow import AllowList, AllowListError, split_host_port
from sidecar.options import OptionsError, parse_args
from sidecar.routing import Route, RoutingError, engine_headers, read_route
from sidecar.workers import RankTable, WorkerSpecError, parse_worker


def test_worker_specs_are_read_and_bad_ones_refused_with_the_reason():
    spec = parse_worker("10.0.0.5:8001,kind=sglang,dp=4,id=7")
    assert (spec.url, spec.kind, spec.dp_size, spec.instance_id) == (
        "http://10.0.0.5:8001",
        "sglang",
        4,
        7,
    )
    for bad, why in (
        ("10.0.0.5", "http://host:port"),
        ("http://h:1/v1", "without a path"),
        ("h:1,kind=tgi", "kind must be"),
        ("h:1,dp=0", "dp must be"),
        ("h:1,colour=red", "unknown key"),
    ):
        with pytest.raises(WorkerSpecError, match=why):
            parse_worker(bad)


def test_ranks_are_numbered_across_the_pods_workers():
    table = RankTable.build([parse_worker("a:1,dp=2"), parse_worker("b:2")], pod_id=9)
    assert [(r.worker.url, r.local_rank) for r in table.ranks] == [
        ("http://a:1", 0),
        ("http://a:1", 1),
        ("http://b:2", 0),
    ]
    assert table.lookup(9, 2).worker.url == "http://b:2"
    assert table.lookup(None, 1).engine_dp_header == "1"
    assert table.lookup(9, 2).engine_dp_header is None
    table.ranks[0].in_flight = 3
    table.ranks[2].in_flight = 1
    assert table.lookup(None, None) is table.ranks[1]
    for ident, rank, why in ((5, 0, "not served here"), (9, None, "x-dp-rank"), (9, 3, "rank 3")):
        with pytest.raises(LookupError, match=why):
            table.lookup(ident, rank)


def test_headers_win_over_nvext_and_every_spelling_is_read():
    body = {"nvext": {"backend_instance_id": 1, "dp_rank": 1, "prefill_dp_rank": 2}}
    h = CIMultiDict({"X-Dynamo-Worker-Instance-Id": "5", "x-data-parallel-rank": "3"})
    assert read_route(h, body) == Route(5, 3, None, None, 2)
    assert read_route(CIMultiDict(), body) == Route(1, 1, None, None, 2)
    h = CIMultiDict(
        {"x-prefiller-host-port": "10.0.0.2:8000,10.0.0.3:8000", "x-dp-rank": "4294967295"}
    )
    assert read_route(h, {}) == Route(None, None, "10.0.0.2:8000", None, None)
    assert read_route(h, {}).disaggregated
    agg = CIMultiDict({"x-dynamo-routing-mode": "aggregated", "x-prefiller-host-port": "h:1"})
    assert not read_route(agg, None).disaggregated
    for hdrs, body, why in (
        ({"x-dp-rank": "-1"}, {}, "non-negative"),
        ({"x-dynamo-routing-mode": "both"}, {}, "aggregated or disaggregated"),
        ({"x-dynamo-routing-mode": "disaggregated"}, {}, "needs x-prefiller-host-port"),
        ({}, {"nvext": []}, "'nvext' must be an object"),
        ({}, {"nvext": {"dp_rank": True}}, "nvext.dp_rank"),
    ):
        with pytest.raises(RoutingError, match=why):
            read_route(CIMultiDict(hdrs), body)


def test_no_routing_header_reaches_an_engine():
    h = CIMultiDict(
        {
            "X-Worker-Instance-Id": "1",
            "x-dp-rank": "0",
            "x-prefiller-host-port": "h:1",
            "x-dynamo-anything": "1",
            "x-gateway-destination-endpoint": "h:1",
            "Host": "pod",
            "Content-Length": "3",
            "Authorization": "Bearer t",
            "x-request-id": "r1",
        }
    )
    assert engine_headers(h) == {"Authorization": "Bearer t", "x-request-id": "r1"}


def test_the_allow_list_matches_ip_literals_by_cidr_and_names_exactly():
    allow = AllowList.parse(["10.0.0.0/24, prefill-0.pool", "fd00::/8", "named:8000"])
    assert allow.allows("10.0.0.9", 8000) and not allow.allows("10.0.1.9", 8000)
    assert allow.allows("fd00::1", 80) and allow.allows("PREFILL-0.pool", 1)
    assert allow.allows("named", 8000) and not allow.allows("named", 8001)
    assert not allow.allows("evil.example", 80)
    assert not AllowList.parse([]).allows("127.0.0.1", 80)
    with pytest.raises(AllowListError):
        AllowList.parse(["bad host!"])
    assert split_host_port("[fd00::1]:80") == ("fd00::1", 80)
    for bad in ("h", "h:0", "h:x", "a:b:c"):
        with pytest.raises(ValueError):
            split_host_port(bad)


def test_options_need_a_worker_and_take_the_pod_address_from_pod_ip():
    with pytest.raises(OptionsError, match="at least one --worker"):
        parse_args([], env={})
    opts = parse_args(
        ["--port", "8000"], env={"KVPICK_SIDECAR_WORKERS": "a:1 b:2", "POD_IP": "10.1.1.1"}
    )
    assert opts.pod_address == "10.1.1.1:8000" and len(opts.workers) == 2
    assert opts.token_data_check == "range"  # no tokenizer: nothing to fingerprint against
    with pytest.raises(OptionsError, match="--request-timeout"):
        parse_args(["--worker", "a:1", "--request-timeout", "0"], env={})
