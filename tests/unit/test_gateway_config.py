"""The Envoy bootstrap kvpick's gateway configs produce (gateway/envoy_config.py)."""

from __future__ import annotations

import pytest
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    SubjectAltNameMatcherSanType,
    UpstreamTlsContext,
)

from epp.extproc.stream import DEFAULT_MAX_BODY_BYTES
from gateway.envoy_config import EXT_PROC_CLUSTER, GatewayConfig, bootstrap


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


def _epp_tls(cfg: GatewayConfig) -> dict:
    (cluster,) = [
        c for c in bootstrap(cfg)["static_resources"]["clusters"] if c["name"] == EXT_PROC_CLUSTER
    ]
    socket = cluster["transport_socket"]
    assert socket["name"] == "envoy.transport_sockets.tls"
    return socket["typed_config"]


def _as_envoy_message(typed_config: dict) -> UpstreamTlsContext:
    """The config read by Envoy's own schema (generated from its protos), which refuses a
    field it does not know, at any depth."""
    fields = dict(typed_config)
    assert fields.pop("@type").endswith(".tls.v3.UpstreamTlsContext")
    return UpstreamTlsContext.from_dict(fields)


def test_by_default_envoy_neither_verifies_the_epp_nor_presents_a_certificate():
    tls = _as_envoy_message(_epp_tls(GatewayConfig(1, 2, 3)))
    common = tls.common_tls_context
    assert common.alpn_protocols == ["h2"]
    assert common.tls_certificates == []
    assert common.validation_context.trusted_ca is None
    assert tls.sni == ""


def test_mutual_tls_to_the_epp_presents_the_client_pair_and_verifies_the_epp():
    cfg = GatewayConfig(
        1,
        2,
        3,
        epp_client_cert="/certs/gateway/tls.crt",
        epp_client_key="/certs/gateway/tls.key",
        epp_ca="/certs/ca.crt",
        epp_server_name="epp.kvpick.svc",
    )
    tls = _as_envoy_message(_epp_tls(cfg))
    (pair,) = tls.common_tls_context.tls_certificates
    assert pair.certificate_chain.filename == "/certs/gateway/tls.crt"
    assert pair.private_key.filename == "/certs/gateway/tls.key"
    validation = tls.common_tls_context.validation_context
    assert validation.trusted_ca.filename == "/certs/ca.crt"
    (san,) = validation.match_typed_subject_alt_names
    assert san.san_type == SubjectAltNameMatcherSanType.DNS
    assert san.matcher.exact == "epp.kvpick.svc"
    assert tls.sni == "epp.kvpick.svc"
    assert tls.common_tls_context.alpn_protocols == ["h2"]


def test_a_client_certificate_without_verifying_the_epp():
    cfg = GatewayConfig(1, 2, 3, epp_client_cert="/c.crt", epp_client_key="/c.key")
    tls = _as_envoy_message(_epp_tls(cfg))
    assert len(tls.common_tls_context.tls_certificates) == 1
    assert tls.common_tls_context.validation_context.trusted_ca is None


@pytest.mark.parametrize(
    "fields",
    [
        {"epp_client_cert": "/c.crt"},  # a certificate without its key
        {"epp_client_key": "/c.key"},
        {"epp_tls": False, "epp_ca": "/ca.crt"},  # TLS settings with TLS off
        {"epp_tls": False, "epp_client_cert": "/c.crt", "epp_client_key": "/c.key"},
    ],
)
def test_inconsistent_tls_settings_are_refused(fields):
    with pytest.raises(ValueError):
        GatewayConfig(1, 2, 3, **fields)
