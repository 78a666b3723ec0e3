"""The Envoy bootstrap of an Inference Gateway: ext_proc to the EPP, routing on its pick.

One function, :func:`bootstrap`, writes the whole configuration as a dict (Envoy reads it
as YAML or JSON). The shape is the Inference Extension's reference gateway setup
(specs/testing-environment.md §2.1): the ext_proc filter in FULL_DUPLEX_STREAMED mode with
trailers SEND, then the router, and an ``ORIGINAL_DST`` cluster that sends each request to
the address in ``x-gateway-destination-endpoint`` (or, with ``metadata_routing``, in the
``envoy.lb`` dynamic metadata the EPP returns). The upstream address is sent back to the
EPP as the ``upstream.address`` response attribute, which tells it which endpoint really
served the request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

EXT_PROC_CLUSTER = "ext_proc"
ROUTE_CLUSTER = "original_destination_cluster"
HEALTH_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
_T = "type.googleapis.com/envoy."


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """What varies between gateways: ports, the EPP's address and TLS, body modes, the
    failure mode (``failure_mode_allow`` is the gateway's FailOpen)."""

    listen_port: int
    admin_port: int
    epp_port: int
    epp_host: str = "127.0.0.1"
    epp_tls: bool = True
    listen_host: str = "127.0.0.1"
    request_body_mode: str = "FULL_DUPLEX_STREAMED"
    response_body_mode: str = "FULL_DUPLEX_STREAMED"
    metadata_routing: bool = False
    failure_mode_allow: bool = False
    route_timeout: str = "86400s"
    ext_proc_health_check: bool = False
    ext_proc: bool = True
    """False routes on the client's own destination header, with no EPP: the baseline the
    EPP's added latency is measured against (and a demonstration of why the EPP must
    always overwrite that header)."""
    buffer_limit_bytes: int = 11 << 20
    """Largest request body Envoy holds for the request (its default, 1 MiB, answers 413 to
    longer prompts). Set just above the EPP's default ``--max-body-bytes`` (10 MB), so that
    a longer body gets the EPP's 413 and its reason, and Envoy never holds more than that;
    raise the two together."""
    subset_hint: tuple[str, ...] | None = None
    """Endpoints to offer the EPP as the ``envoy.lb.subset_hint`` metadata on every request
    (what a gateway with endpoint subsetting sends); None sends no hint."""
    epp_client_cert: str | None = None
    """PEM certificate (chain) file Envoy presents to the EPP: what an EPP run with
    ``--client-ca`` asks for (mutual TLS). Given together with ``epp_client_key``."""
    epp_client_key: str | None = None
    """The PEM private key file of ``epp_client_cert``."""
    epp_ca: str | None = None
    """PEM CA bundle file Envoy verifies the EPP's serving certificate against; None
    accepts any certificate, as the reference gateways do."""
    epp_server_name: str | None = None
    """SNI Envoy sends to the EPP and, with ``epp_ca``, a DNS name the EPP's certificate
    must hold (say ``epp.kvpick.svc``); None: no SNI, and any name under ``epp_ca`` will
    do."""

    def __post_init__(self) -> None:
        if (self.epp_client_cert is None) != (self.epp_client_key is None):
            raise ValueError("epp_client_cert and epp_client_key go together: give both or neither")
        uses_tls = (self.epp_client_cert, self.epp_ca, self.epp_server_name)
        if not self.epp_tls and any(v is not None for v in uses_tls):
            raise ValueError(
                "epp_client_cert, epp_ca and epp_server_name configure TLS to the EPP, "
                "which epp_tls=False turns off"
            )


def _processing_mode(cfg: GatewayConfig) -> dict[str, str]:
    mode = {
        "request_header_mode": "SEND",
        "response_header_mode": "SEND",
        "request_body_mode": cfg.request_body_mode,
        "response_body_mode": cfg.response_body_mode,
        "request_trailer_mode": "SKIP",
        "response_trailer_mode": "SKIP",
    }
    # Envoy refuses FULL_DUPLEX_STREAMED unless the trailers of that direction are sent too.
    if cfg.request_body_mode == "FULL_DUPLEX_STREAMED":
        mode["request_trailer_mode"] = "SEND"
    if cfg.response_body_mode == "FULL_DUPLEX_STREAMED":
        mode["response_trailer_mode"] = "SEND"
    return mode


def _ext_proc_cluster(cfg: GatewayConfig) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": EXT_PROC_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "5s",
        "lb_policy": "ROUND_ROBIN",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _T + "extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": EXT_PROC_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {
                                        "address": cfg.epp_host,
                                        "port_value": cfg.epp_port,
                                    }
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }
    if cfg.epp_tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": _upstream_tls(cfg),
        }
    if cfg.ext_proc_health_check:
        cluster["health_checks"] = [
            {
                "timeout": "2s",
                "interval": "1s",
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                "grpc_health_check": {"service_name": HEALTH_SERVICE},
            }
        ]
    return cluster


def _upstream_tls(cfg: GatewayConfig) -> dict[str, Any]:
    """The ``UpstreamTlsContext`` of the connection to the EPP. By default as the reference
    gateways do: TLS without verifying the EPP's certificate, and no client certificate."""
    validation: dict[str, Any] = {}
    if cfg.epp_ca is not None:
        validation["trusted_ca"] = {"filename": cfg.epp_ca}
        if cfg.epp_server_name is not None:
            validation["match_typed_subject_alt_names"] = [
                {"san_type": "DNS", "matcher": {"exact": cfg.epp_server_name}}
            ]
    common: dict[str, Any] = {"alpn_protocols": ["h2"], "validation_context": validation}
    if cfg.epp_client_cert is not None:
        # What the EPP's --client-ca verifies: Envoy presents it at every handshake.
        common["tls_certificates"] = [
            {
                "certificate_chain": {"filename": cfg.epp_client_cert},
                "private_key": {"filename": cfg.epp_client_key},
            }
        ]
    tls: dict[str, Any] = {
        "@type": _T + "extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": common,
    }
    if cfg.epp_server_name is not None:
        tls["sni"] = cfg.epp_server_name
    return tls


def _route_cluster(cfg: GatewayConfig) -> dict[str, Any]:
    lb: dict[str, Any]
    if cfg.metadata_routing:
        lb = {
            "metadata_key": {
                "key": "envoy.lb",
                "path": [{"key": "x-gateway-destination-endpoint"}],
            }
        }
    else:
        lb = {"use_http_header": True, "http_header_name": "x-gateway-destination-endpoint"}
    return {
        "name": ROUTE_CLUSTER,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "5s",
        "original_dst_lb_config": lb,
        "circuit_breakers": {
            "thresholds": [
                {
                    "max_connections": 40000,
                    "max_pending_requests": 40000,
                    "max_requests": 40000,
                }
            ]
        },
    }


def bootstrap(cfg: GatewayConfig) -> dict[str, Any]:
    """The full Envoy bootstrap for ``cfg``."""
    ext_proc: dict[str, Any] = {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": _T + "extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {
                "envoy_grpc": {"cluster_name": EXT_PROC_CLUSTER},
                "timeout": "10s",
            },
            "failure_mode_allow": cfg.failure_mode_allow,
            "message_timeout": "1000s",
            "processing_mode": _processing_mode(cfg),
            "metadata_options": {"receiving_namespaces": {"untyped": ["envoy.lb"]}},
            "response_attributes": ["upstream.address"],
        },
    }
    filters: list[dict[str, Any]] = []
    if cfg.subset_hint is not None:
        filters.append(
            {
                "name": "envoy.filters.http.set_metadata",
                "typed_config": {
                    "@type": _T + "extensions.filters.http.set_metadata.v3.Config",
                    "metadata": [
                        {
                            "metadata_namespace": "envoy.lb.subset_hint",
                            "value": {
                                "x-gateway-destination-endpoint-subset": list(cfg.subset_hint)
                            },
                        }
                    ],
                },
            }
        )
        ext_proc["typed_config"]["metadata_options"]["forwarding_namespaces"] = {
            "untyped": ["envoy.lb.subset_hint"]
        }
    if cfg.ext_proc:
        filters.append(ext_proc)
    router = {
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": _T + "extensions.filters.http.router.v3.Router"},
    }
    hcm = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": _T
            + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "inference_gateway",
            "codec_type": "AUTO",
            "stream_idle_timeout": "0s",
            "route_config": {
                "name": "inference",
                "virtual_hosts": [
                    {
                        "name": "inference",
                        "domains": ["*"],
                        "routes": [
                            {
                                "match": {"prefix": "/"},
                                "per_request_buffer_limit_bytes": cfg.buffer_limit_bytes,
                                "route": {
                                    "cluster": ROUTE_CLUSTER,
                                    "timeout": cfg.route_timeout,
                                    "idle_timeout": cfg.route_timeout,
                                },
                            }
                        ],
                    }
                ],
            },
            "http_filters": [*filters, router],
        },
    }
    return {
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": cfg.admin_port}}
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "inference_gateway",
                    "address": {
                        "socket_address": {
                            "address": cfg.listen_host,
                            "port_value": cfg.listen_port,
                        }
                    },
                    "filter_chains": [{"filters": [hcm]}],
                }
            ],
            "clusters": [_route_cluster(cfg), _ext_proc_cluster(cfg)]
            if cfg.ext_proc
            else [_route_cluster(cfg)],
        },
    }


def render(cfg: GatewayConfig) -> str:
    """:func:`bootstrap` as YAML text."""
    return yaml.safe_dump(bootstrap(cfg), sort_keys=False)
