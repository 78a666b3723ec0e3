"""The Envoy bootstrap kvpick's gateway configs produce (gateway/envoy_config.py)."""

from __future__ import annotations

from epp.extproc.stream import DEFAULT_MAX_BODY_BYTES
from gateway.envoy_config import GatewayConfig, bootstrap


def _route(cfg: GatewayConfig) -> dict:
    listener = bootstrap(cfg)["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm["route_config"]["virtual_hosts"][0]["routes"][0]


def test_envoy_holds_a_little_more_than_the_epps_body_limit():
    # Just above: a longer body gets the EPP's 413 and its reason, and Envoy holds no more.
    limit = _route(GatewayConfig(1, 2, 3))["per_request_buffer_limit_bytes"]
    assert DEFAULT_MAX_BODY_BYTES < limit <= DEFAULT_MAX_BODY_BYTES + (2 << 20)


def test_the_buffer_limit_follows_the_config():
    cfg = GatewayConfig(1, 2, 3, buffer_limit_bytes=64 << 20)
    assert _route(cfg)["per_request_buffer_limit_bytes"] == 64 << 20
