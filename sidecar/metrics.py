"""The sidecar's Prometheus metrics: every series named here, one registry per sidecar (so
that several sidecars in one process, as in tests and benchmarks, count apart)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class SidecarMetrics:
    def __init__(self) -> None:
        reg = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "kvpick_sidecar_requests",
            "Requests answered, by API, path taken (token: token ids to the engine's token-in "
            "API; passthrough: the engine's own OpenAI endpoint; proxy: any other route) and "
            "status code.",
            ["api", "path", "code"],
            registry=reg,
        )
        self.in_flight = Gauge(
            "kvpick_sidecar_in_flight_requests",
            "Requests in flight per worker rank (instance/dp_rank).",
            ["rank"],
            registry=reg,
        )
        self.prefill = Counter(
            "kvpick_sidecar_prefill",
            "Disaggregated requests by prefill outcome: ok, fallback_<reason> (decode ran the "
            "whole request locally), client_error (the prefill's 4xx went to the client), "
            "refused (403).",
            ["outcome"],
            registry=reg,
        )
        self.token_data = Counter(
            "kvpick_sidecar_token_data",
            "Token-path requests by where their ids came from: used (nvext.token_data, "
            "checked), mismatch (token_data did not match the prompt; tokenized here), "
            "tokenized (no token_data).",
            ["result"],
            registry=reg,
        )
        self.engine_errors = Counter(
            "kvpick_sidecar_engine_errors",
            "Engine calls that failed: unreachable, timeout, broken (cut mid-stream), status_5xx.",
            ["reason"],
            registry=reg,
        )
        self.duration = Histogram(
            "kvpick_sidecar_request_duration_seconds",
            "Time from the request's arrival to its last byte, by API and path.",
            ["api", "path"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=reg,
        )
