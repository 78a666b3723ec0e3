"""Static discovery (epp.discovery.static): the endpoints file, its validation, and reloads."""

from __future__ import annotations

import asyncio
import logging

import pytest
from prometheus_client import REGISTRY

from epp.discovery.static import (
    Endpoint,
    EndpointsChange,
    EndpointsFileError,
    EndpointsFileWatcher,
    diff_endpoints,
    parse_endpoints,
)

FULL = """
endpoints:
  - address: 127.0.0.1:8001
    kv_events: tcp://127.0.0.1:5557
    replay: tcp://127.0.0.1:5558
    role: prefill
    dp_size: 2
    engine: sglang
    metrics: http://127.0.0.1:8001/metrics
  - address: "[::1]:8002"
"""


def errors() -> float:
    return (
        REGISTRY.get_sample_value("kvpick_discovery_errors_total", {"source": "endpoints_file"})
        or 0.0
    )


def test_full_file_parses_with_defaults():
    eps = parse_endpoints(FULL)
    assert list(eps) == ["127.0.0.1:8001", "[::1]:8002"]
    a = eps["127.0.0.1:8001"]
    assert a == Endpoint(
        "127.0.0.1:8001",
        "tcp://127.0.0.1:5557",
        "tcp://127.0.0.1:5558",
        "prefill",
        2,
        "sglang",
        "http://127.0.0.1:8001/metrics",
    )
    assert a.workers == [("127.0.0.1:8001", 0), ("127.0.0.1:8001", 1)]
    assert a.event_endpoints(1) == ("tcp://127.0.0.1:5558", "tcp://127.0.0.1:5559")
    b = eps["[::1]:8002"]
    assert (b.role, b.dp_size, b.engine, b.kv_events, b.metrics) == ("both", 1, "vllm", None, None)
    with pytest.raises(ValueError):
        b.event_endpoints(0)


@pytest.mark.parametrize("text", ["endpoints: []", "endpoints:", "endpoints: []\n"])
def test_empty_pool_is_allowed(text):
    assert parse_endpoints(text) == {}


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("endpoints: [", "not valid YAML"),
        ("- address: a:1", "'endpoints' list"),
        ("endpoint: []", "'endpoints' list"),
        ("endpoints: []\nextra: 1", "unknown top-level key(s) extra"),
        ("endpoints: {a: 1}", "must be a list"),
        ("endpoints: [5]", "endpoints[0]: expected a mapping"),
        ("endpoints: [{role: both}]", "'address' (host:port) is required"),
        ("endpoints: [{address: localhost}]", "expected host:port"),
        ("endpoints: [{address: 'h:0'}]", "port out of range"),
        ("endpoints: [{address: 'h:70000'}]", "port out of range"),
        ("endpoints: [{address: '::1:80'}]", "brackets"),
        ("endpoints: [{address: '[zz]:80'}]", "bad IPv6"),
        ("endpoints: [{address: 'h:1', rolee: prefill}]", "unknown field(s) rolee"),
        ("endpoints: [{address: 'h:1', role: leader}]", "role must be one of"),
        ("endpoints: [{address: 'h:1', engine: tgi}]", "engine must be one of"),
        ("endpoints: [{address: 'h:1', dp_size: 0}]", "dp_size must be an integer"),
        ("endpoints: [{address: 'h:1', dp_size: true}]", "dp_size must be an integer"),
        ("endpoints: [{address: 'h:1', dp_size: '2'}]", "dp_size must be an integer"),
        ("endpoints: [{address: 'h:1', kv_events: 'h:5557'}]", "expected tcp://host:port"),
        ("endpoints: [{address: 'h:1', kv_events: 'tcp://h'}]", "expected host:port"),
        (
            "endpoints: [{address: 'h:1', kv_events: 'tcp://h:65535', dp_size: 2}]",
            "do not fit",
        ),
        ("endpoints: [{address: 'h:1', replay: 'tcp://h:5558'}]", "'replay' needs 'kv_events'"),
        ("endpoints: [{address: 'h:1', metrics: 'h:1/metrics'}]", "http(s) URL"),
        ("endpoints: [{address: 'h:1'}, {address: 'h:1'}]", "listed twice"),
    ],
)
def test_bad_files_say_where_and_why(text, says):
    with pytest.raises(EndpointsFileError) as info:
        parse_endpoints(text, "eps.yaml")
    assert says in str(info.value)
    assert str(info.value).startswith("eps.yaml")


def test_diff_by_address():
    a = Endpoint("h:1")
    b = Endpoint("h:2", role="decode")
    b2 = Endpoint("h:2", role="prefill")
    c = Endpoint("h:3")
    change = diff_endpoints({"h:1": a, "h:2": b}, {"h:2": b2, "h:3": c})
    assert change == EndpointsChange(added=(c,), removed=(a,), changed=((b, b2),))
    assert not diff_endpoints({"h:1": a}, {"h:1": Endpoint("h:1")})


async def test_watcher_applies_changes_and_keeps_the_last_good_set(tmp_path, caplog):
    path = tmp_path / "eps.yaml"
    path.write_text("endpoints:\n  - address: h:1\n")
    seen: list[EndpointsChange] = []

    async def on_change(change: EndpointsChange) -> None:
        seen.append(change)

    watcher = EndpointsFileWatcher(str(path), on_change, interval=0.02)
    await watcher.start()
    try:
        assert watcher.synced.is_set()
        assert [c.added for c in seen] == [(Endpoint("h:1"),)]

        path.write_text("endpoints:\n  - address: h:1\n  - address: h:2\n")
        await _until(lambda: len(seen) == 2)
        assert seen[1].added == (Endpoint("h:2"),) and not seen[1].removed

        # A broken edit is reported once and changes nothing.
        before = errors()
        with caplog.at_level(logging.ERROR):
            path.write_text("endpoints:\n  - address: h:1\n  - adress: h:2\n")
            await asyncio.sleep(0.2)
        assert errors() == before + 1
        assert sum("keeping the 2 endpoint(s)" in r.message for r in caplog.records) == 1
        assert set(watcher.endpoints) == {"h:1", "h:2"} and len(seen) == 2

        # A vanished file likewise; then the fixed file applies.
        path.unlink()
        await asyncio.sleep(0.1)
        assert errors() == before + 2 and set(watcher.endpoints) == {"h:1", "h:2"}
        path.write_text("endpoints:\n  - address: h:2\n    role: decode\n")
        await _until(lambda: len(seen) == 3)
        assert seen[2].removed == (Endpoint("h:1"),)
        assert seen[2].changed == ((Endpoint("h:2"), Endpoint("h:2", role="decode")),)
    finally:
        await watcher.close()


async def test_watcher_refuses_to_start_on_a_bad_file(tmp_path):
    watcher = EndpointsFileWatcher(str(tmp_path / "missing.yaml"), lambda change: None)
    with pytest.raises(EndpointsFileError, match="cannot read"):
        await watcher.start()
    bad = tmp_path / "bad.yaml"
    bad.write_text("endpoints: [{address: nope}]")
    watcher = EndpointsFileWatcher(str(bad), lambda change: None)
    with pytest.raises(EndpointsFileError, match="host:port"):
        await watcher.start()
    assert not watcher.synced.is_set()


async def _until(cond, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)
