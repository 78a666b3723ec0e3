"""The ``kvpick epp`` command line: the reference EPP's flags in all their spellings, plus kvpick's.

kvpick replaces the GAIE reference Endpoint Picker, so the upstream ``inferencepool`` Helm chart
(and other deployers: Dynamo's chart, hand-written manifests from the v0.x days) must be able to
start kvpick's image with the arguments they already pass. :func:`parse_epp_args` therefore
accepts three families of flags:

* the reference EPP's flags kvpick uses (ports, TLS, pool, config file, scrape intervals, ...),
  parsed into :class:`EppOptions` with the reference defaults;
* kvpick's own flags (block size, tokenizer, cost knobs, busy thresholds, ...), which also read
  ``KVPICK_<NAME>`` environment variables;
* the reference EPP's flags kvpick does not use (leader election, tracing, pprof, deprecated
  metric-name flags, ...): accepted, their values not checked, one WARNING each on the
  ``epp.options`` logger, and their names listed in :attr:`EppOptions.ignored`.

Spelling rules (guaranteed for every flag of the three families):

* one or two leading dashes: ``--pool-name``, ``-pool-name``;
* kebab-case, snake_case or lower camelCase: ``pool-name``, ``pool_name``, ``poolName``;
* the value after ``=`` or as the next argument: ``--grpc-port=9002``, ``--grpc-port 9002``. A
  separate value is taken even when it is empty (the chart passes ``--lora-info-metric ""``)
  but not when it is itself a known flag (``--pool-name --grpc-port`` is an error, not a pool
  called ``--grpc-port``); a value that begins with a dash must use ``=``;
* booleans as Go's ``flag`` package reads them: a bare ``--secure-serving`` is true, an explicit
  value must be joined with ``=`` and is one of 1 0 t f T F true false TRUE FALSE True False;
  kvpick also reads ``--no-<flag>`` as ``--<flag>=false``. Because Go never takes a separate
  value for a boolean, ``--secure-serving false`` would silently mean *true* in the reference
  EPP; kvpick rejects it with a message that shows the ``=`` form;
* durations in Go syntax (``50ms``, ``2s``, ``1m30s``, ``1h``, ``300us``, ``0``), stored as float
  seconds; kvpick's own duration flags also take a plain number of seconds;
* one pair of matching quotes around a value is removed (Helm renders
  ``--model-server-metrics-path="/prometheus/metrics"`` without a shell, so the quotes arrive
  literally);
* a flag given twice: the last value wins, except the list flags (``--served-model-name``,
  ``--endpoint-target-ports``), which accumulate and also take comma-separated lists;
* an empty value of a flag whose default is unset (``--cert-path=``) leaves it unset;
* anything that is not a flag (a positional argument) is an error; so is an unknown flag, with a
  "did you mean" suggestion; ``-h``/``--help`` raise :class:`HelpRequested`.

Precedence for kvpick's own flags: command line, then ``KVPICK_<NAME>`` (an empty variable counts
as unset), then the default. ``--pool-namespace`` falls back to ``$NAMESPACE``, then ``default``,
as in the reference. Every error is an :class:`OptionsError` whose message names the flag as typed
or the environment variable, fit to print on a terminal as is.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

log = logging.getLogger("epp.options")

Policy = Literal["kv-aware", "random", "round-robin", "least-loaded", "gaie-default"]
LogFormat = Literal["console", "json"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
Discovery = Literal["pool", "selector", "file"]

POLICIES: tuple[str, ...] = ("kv-aware", "random", "round-robin", "least-loaded", "gaie-default")
POOL_GROUPS: tuple[str, ...] = ("inference.networking.k8s.io", "inference.networking.x-k8s.io")
DEFAULT_GRPC_MAX_MSG_SIZE = 64 * 1024 * 1024
"""The gRPC message size limit the ext_proc server applies when the flag is unset (64 MiB)."""
MAX_GRPC_MSG_SIZE = 2**31 - 1
"""gRPC's message size limits are 32-bit signed integers."""
MAX_ENDPOINT_TARGET_PORTS = 8
ENV_PREFIX = "KVPICK_"


class OptionsError(ValueError):
    """The command line or the environment cannot be used; the message says which flag and why."""


class HelpRequested(Exception):
    """``-h``/``--help`` was given; ``str(exc)`` is the help text (see :func:`epp_help`)."""


Kind = Literal[
    "bool",  # Go boolean
    "int",  # decimal integer
    "float",  # finite decimal number
    "str",  # string
    "choice",  # one of FlagSpec.choices, case-insensitive, stored as spelled in choices
    "duration",  # Go duration → float seconds
    "seconds",  # Go duration or plain number of seconds → float seconds
    "ports",  # comma-separated integers, accumulating
    "names",  # comma-separated strings, accumulating
    "size",  # byte size: 4194304, 10MiB, 25MB, 1e6 → int
    "zap-level",  # debug | info | warn | error | dpanic | panic | fatal | integer > 0
    "value",  # an ignored flag that takes a value (the value is not checked)
]


@dataclass(frozen=True, slots=True)
class FlagSpec:
    """One flag: its canonical kebab-case name, how its value is read, and where it goes.

    ``field`` is the :class:`EppOptions` field it sets (None for ignored flags and for the few
    read only to derive another field); ``ignored`` is the reason logged when kvpick accepts
    the flag but does not act on it; ``env`` is the environment variable read when the flag
    is absent from the command line. ``lo``/``hi`` bound numeric values (``lo_open`` makes
    the lower bound exclusive); ``none_if_zero`` reads 0 as "unset", as the reference does
    for its optional numbers; ``shown`` is the default as help and docs state it, when the
    value alone would not say what happens.
    """

    name: str
    kind: Kind
    help: str
    group: str
    field: str | None = None
    default: Any = None
    env: str | None = None
    ignored: str | None = None
    choices: tuple[str, ...] = ()
    metavar: str = ""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    none_if_zero: bool = False
    own: bool = False
    shown: str | None = None

    @property
    def flag(self) -> str:
        """The canonical spelling: ``--kebab-name`` (``-v`` for the one-letter flag)."""
        return f"-{self.name}" if len(self.name) == 1 else f"--{self.name}"


# Help groups, in the order the help text and the docs show them.
G_SERVE = "Listeners and TLS"
G_DISCOVERY = "Endpoint discovery"
G_CONFIG = "Scheduling configuration file"
G_SCRAPE = "Model-server metrics"
G_LOG = "Logging"
G_TOKENS = "kvpick: tokenization and KV events"
G_COST = "kvpick: scheduling and cost"
G_LOAD = "kvpick: load bookkeeping and overload"
G_LIMITS = "kvpick: request limits"
G_LISTENER = "kvpick: the ext_proc listener"
G_DIAG = "kvpick: diagnostics"
G_COMPAT = "Accepted for compatibility with the reference EPP and ignored"
GROUPS: tuple[str, ...] = (
    G_SERVE,
    G_DISCOVERY,
    G_CONFIG,
    G_SCRAPE,
    G_LOG,
    G_TOKENS,
    G_COST,
    G_LOAD,
    G_LIMITS,
    G_LISTENER,
    G_DIAG,
    G_COMPAT,
)


def _own(
    name: str, kind: Kind, field_: str, default: Any, group: str, help_: str, **kw: Any
) -> FlagSpec:
    """A kvpick flag: reads ``KVPICK_<NAME>`` when absent from the command line."""
    env = ENV_PREFIX + name.upper().replace("-", "_")
    return FlagSpec(name, kind, help_, group, field_, default, env=env, own=True, **kw)


def _ref(
    name: str, kind: Kind, field_: str | None, default: Any, group: str, help_: str, **kw: Any
) -> FlagSpec:
    """A reference-EPP flag kvpick uses."""
    return FlagSpec(name, kind, help_, group, field_, default, **kw)


def _compat(name: str, takes_value: bool, reason: str, help_: str) -> FlagSpec:
    """A reference-EPP flag kvpick accepts and ignores, with the reason it is ignored."""
    kind: Kind = "value" if takes_value else "bool"
    return FlagSpec(name, kind, help_, G_COMPAT, ignored=reason)


_PORT = {"lo": 1, "hi": 65535, "metavar": "PORT"}
_METRIC_NAMES = "use engine mapping; kvpick chooses metric names per endpoint engine"
_HA = "kvpick runs one active replica; HA arrives later"

# The table is laid out one flag per block by hand; the formatter would spread every argument
# over its own line.
# fmt: off
FLAGS: tuple[FlagSpec, ...] = (
    # --- Listeners and TLS -------------------------------------------------------------------
    _ref("grpc-port", "int", "grpc_port", 9002, G_SERVE, "ext_proc gRPC listener", **_PORT),
    _ref("grpc-health-port", "int", "grpc_health_port", 9003, G_SERVE,
         "gRPC health listener (plaintext; kubelet probes)", **_PORT),
    _ref("metrics-port", "int", "metrics_port", 9090, G_SERVE,
         "Prometheus /metrics listener (plain HTTP)", **_PORT),
    _ref("secure-serving", "bool", "secure_serving", True, G_SERVE,
         "serve ext_proc over TLS; false for plaintext"),
    _ref("cert-path", "str", "cert_path", None, G_SERVE,
         "directory holding tls.crt and tls.key", metavar="DIR",
         shown="a self-signed certificate made at start"),
    _ref("enable-cert-reload", "bool", "enable_cert_reload", False, G_SERVE,
         "serve new certificates written to --cert-path without a restart (checked every "
         "--cert-reload-interval seconds; open connections keep theirs)"),
    _ref("health-checking", "bool", "health_checking", False, G_SERVE,
         "also serve gRPC health on the ext_proc port"),
    _ref("grpc-max-recv-msg-size", "size", "grpc_max_recv_msg_size", None, G_SERVE,
         "largest gRPC message received, in bytes or with a unit (10MiB, 25MB); 0: default",
         metavar="SIZE", lo=0, hi=MAX_GRPC_MSG_SIZE, none_if_zero=True, shown="64Mi"),
    _ref("grpc-max-send-msg-size", "size", "grpc_max_send_msg_size", None, G_SERVE,
         "largest gRPC message sent; 0: default",
         metavar="SIZE", lo=0, hi=MAX_GRPC_MSG_SIZE, none_if_zero=True, shown="64Mi"),
    _own("ext-proc-server", "choice", "ext_proc_server", "h2", G_SERVE,
         "ext_proc server implementation: h2 (kvpick's HTTP/2 server in the event loop; "
         "fastest) or grpcio (grpc.aio)", choices=("h2", "grpcio"), metavar="IMPL"),
    _ref("drain-timeout", "duration", "drain_timeout", 30.0, G_SERVE,
         "after SIGTERM: report NOT_SERVING, keep serving ext_proc this long, then stop",
         metavar="DURATION", lo=0),
    # --- Discovery ---------------------------------------------------------------------------
    _ref("pool-name", "str", "pool_name", None, G_DISCOVERY,
         "InferencePool whose pods are the endpoints (Kubernetes discovery)", metavar="NAME"),
    _ref("pool-namespace", "str", "pool_namespace", "default", G_DISCOVERY,
         "namespace of the InferencePool", metavar="NAMESPACE", env="NAMESPACE",
         shown="$NAMESPACE, else default"),
    _ref("pool-group", "choice", "pool_group", POOL_GROUPS[0], G_DISCOVERY,
         "API group of the InferencePool (inference.networking.x-k8s.io for v1alpha2 pools)",
         choices=POOL_GROUPS, metavar="GROUP"),
    _ref("endpoint-selector", "str", "endpoint_selector", None, G_DISCOVERY,
         "pool-less mode: label selector of the model-server pods (k=v,k2=v2)",
         metavar="SELECTOR"),
    _ref("endpoint-target-ports", "ports", "endpoint_target_ports", (), G_DISCOVERY,
         "pool-less mode: the pods' serving ports, 1 to 8, comma-separated", metavar="PORTS"),
    _ref("disable-endpoint-subset-filter", "bool", "disable_endpoint_subset_filter", False,
         G_DISCOVERY, "ignore the gateway's endpoint subset hint"),
    _ref("kubeconfig", "str", "kubeconfig", None, G_DISCOVERY,
         "kubeconfig file for Kubernetes discovery", metavar="FILE",
         shown="the Kubernetes client's usual lookup (in-cluster, $KUBECONFIG)"),
    _own("endpoints-file", "str", "endpoints_file", None, G_DISCOVERY,
         "static discovery: YAML list of endpoints, reloaded on change (local runs)",
         metavar="FILE"),
    # --- EndpointPickerConfig ----------------------------------------------------------------
    _ref("config-file", "str", "config_file", None, G_CONFIG,
         "EndpointPickerConfig YAML file", metavar="FILE"),
    _ref("config-text", "str", "config_text", None, G_CONFIG,
         "EndpointPickerConfig YAML given inline (not with --config-file)", metavar="YAML"),
    # --- Model-server metrics ----------------------------------------------------------------
    _ref("refresh-metrics-interval", "duration", "refresh_metrics_interval", 0.05, G_SCRAPE,
         "how often each model server's /metrics is scraped", metavar="DURATION", lo=0,
         lo_open=True),
    _ref("metrics-staleness-threshold", "duration", "metrics_staleness_threshold", 2.0,
         G_SCRAPE, "scraped metrics older than this are stale", metavar="DURATION", lo=0,
         lo_open=True),
    _ref("model-server-metrics-path", "str", "model_server_metrics_path", "/metrics", G_SCRAPE,
         "URL path of the model servers' metrics (trtllm-serve: /prometheus/metrics)",
         metavar="PATH"),
    _ref("model-server-metrics-port", "int", "model_server_metrics_port", None, G_SCRAPE,
         "port of the model servers' metrics; 0: the serving port", metavar="PORT",
         lo=1, hi=65535, none_if_zero=True, shown="the serving port"),
    _ref("model-server-metrics-scheme", "choice", "model_server_metrics_scheme", "http",
         G_SCRAPE, "scheme of the model servers' metrics", choices=("http", "https"),
         metavar="SCHEME"),
    # --- Logging -----------------------------------------------------------------------------
    _ref("v", "int", "verbosity", 0, G_LOG, "log verbosity; 1 or more logs at DEBUG",
         metavar="N", lo=0),
    _ref("zap-encoder", "choice", "log_format", "console", G_LOG, "log line format",
         choices=("console", "json"), metavar="FORMAT"),
    _ref("zap-log-level", "zap-level", None, None, G_LOG,
         "debug, info, warn, error, panic, or an integer verbosity > 0 (like -v)",
         metavar="LEVEL", shown="info"),
    _own("log-level", "choice", "log_level", "INFO", G_LOG,
         "kvpick's log level; on the command line it overrides -v and --zap-log-level",
         choices=("DEBUG", "INFO", "WARNING", "ERROR"), metavar="LEVEL"),
    _own("cert-reload-interval", "duration", "cert_reload_interval", 2.0, G_SERVE,
         "how often --enable-cert-reload looks at the certificate files", metavar="SECONDS",
         lo=0, lo_open=True),
    # --- kvpick: tokens and KV events ---------------------------------------------------------
    _own("block-size", "int", "block_size", 16, G_TOKENS,
         "tokens per KV block; must equal the engines' block size", metavar="N", lo=1),
    _own("tokenizer", "str", "tokenizer", None, G_TOKENS,
         "tokenizer: a local model folder or a Hugging Face model id in the local cache",
         metavar="PATH_OR_ID"),
    _own("served-model-name", "names", "served_model_names", (), G_TOKENS,
         "model name(s) this pool serves; repeatable and comma-separated", metavar="NAME"),
    _own("lora-adapter", "names", "lora_adapters", (), G_TOKENS,
         "model name(s) that are LoRA adapters, so that their requests match the KV blocks "
         "engines announce for that adapter (adapters the engines report in "
         "vllm:lora_requests_info are recognized without it); repeatable and comma-separated",
         metavar="NAME"),
    _own("token-data", "bool", "token_data", True, G_TOKENS,
         "put the prompt's token ids in the forwarded body (nvext.token_data)"),
    _own("kv-events-port", "int", "kv_events_port", 5557, G_TOKENS,
         "engine workers' KV event publisher port (data-parallel rank r: port + r)", **_PORT),
    _own("kv-replay-port", "int", "kv_replay_port", None, G_TOKENS,
         "engine workers' KV event replay port, asked for missed events after a gap",
         shown="no replay", **_PORT),
    # --- kvpick: scheduling -------------------------------------------------------------------
    _own("policy", "choice", "policy", "kv-aware", G_COST, "how an endpoint is picked",
         choices=POLICIES, metavar="NAME"),
    _own("fallbacks", "int", "fallbacks", 0, G_COST,
         "extra endpoints listed after the pick for the gateway to retry", metavar="N", lo=0),
    _own("overlap-credit", "float", "overlap_credit", 1.0, G_COST,
         "prefill blocks credited per prompt block cached on the device", metavar="X", lo=0),
    _own("credit-decay", "float", "credit_decay", 0.0, G_COST,
         "shrink the overlap credit of workers with more prefill load than the least loaded",
         metavar="X", lo=0),
    _own("host-credit", "float", "host_credit", 0.75, G_COST,
         "credit per prompt block cached in host memory", metavar="X", lo=0),
    _own("disk-credit", "float", "disk_credit", 0.25, G_COST,
         "credit per prompt block cached on disk", metavar="X", lo=0),
    _own("external-credit", "float", "external_credit", 0.25, G_COST,
         "credit per prompt block in an external (shared) cache beyond the device",
         metavar="X", lo=0),
    _own("prefill-load-scale", "float", "prefill_load_scale", 1.0, G_COST,
         "weight of prefill blocks against decode blocks in the cost", metavar="X", lo=0),
    _own("decode-active-request-weight", "float", "decode_active_request_weight", 0.0, G_COST,
         "cost added per active request on a worker", metavar="X", lo=0),
    _own("temperature", "float", "temperature", 0.0, G_COST,
         "0: lowest cost wins; > 0: sample with softmax over normalized costs", metavar="T",
         lo=0),
    # --- kvpick: load ------------------------------------------------------------------------
    _own("active-request-expiry", "seconds", "active_request_expiry", 300.0, G_LOAD,
         "forget a booked request whose end was never seen after this long (Go duration or "
         "seconds)", metavar="DURATION", lo=0, lo_open=True),
    _own("busy-decode-blocks-frac", "float", "busy_decode_blocks_frac", None, G_LOAD,
         "a worker is busy when its booked decode blocks exceed this fraction of its KV blocks",
         metavar="X", lo=0, lo_open=True, shown="off"),
    _own("busy-prefill-tokens", "int", "busy_prefill_tokens", None, G_LOAD,
         "a worker is busy when its booked prefill tokens exceed this", metavar="N", lo=1,
         shown="off"),
    _own("busy-prefill-tokens-frac", "float", "busy_prefill_tokens_frac", None, G_LOAD,
         "a worker is busy when booked prefill tokens exceed this × --max-num-batched-tokens",
         metavar="X", lo=0, lo_open=True, shown="off"),
    _own("max-num-batched-tokens", "int", "max_num_batched_tokens", 8192, G_LOAD,
         "the engines' per-step token budget (for --busy-prefill-tokens-frac)", metavar="N",
         lo=1),
    # --- kvpick: request limits ----------------------------------------------------------------
    _own("max-body-bytes", "size", "max_body_bytes", 10_000_000, G_LIMITS,
         "largest request body accepted; a larger one gets 413 as soon as it passes this, "
         "without being buffered; 0: no limit", metavar="SIZE", lo=0, none_if_zero=True,
         shown="10MB"),
    _own("request-body-timeout", "seconds", "request_body_timeout", 60.0, G_LIMITS,
         "a request body not complete this long after its headers gets 408; 0: no limit",
         metavar="DURATION", lo=0, none_if_zero=True),
    _own("max-json-depth", "int", "max_json_depth", 128, G_LIMITS,
         "deepest nesting of objects and arrays in a request body; deeper gets 400",
         metavar="N", lo=1),
    _own("max-model-len", "int", "max_model_len", None, G_LIMITS,
         "the model's context length: a prompt that cannot fit (with the request's max "
         "tokens) gets vLLM's 400 before routing; 0: no check", metavar="N", lo=0,
         shown="from the model's config.json, else tokenizer_config.json"),
    _own("offload-body-bytes", "size", "offload_body_bytes", 65_536, G_LIMITS,
         "requests with a larger body are parsed and tokenized in the preprocessing threads, "
         "off the event loop; 0: all of them", metavar="SIZE", lo=0, shown="64KiB"),
    _own("preprocess-threads", "int", "preprocess_threads", 2, G_LIMITS,
         "threads that parse and tokenize large requests", metavar="N", lo=1, hi=64),
    _own("preprocess-queue", "int", "preprocess_queue", 32, G_LIMITS,
         "large requests that may wait for a preprocessing thread; more get 429",
         metavar="N", lo=0),
    _own("preprocess-timeout", "seconds", "preprocess_timeout", 10.0, G_LIMITS,
         "time budget of a large request in the preprocessing pool, waiting included; "
         "beyond it the request gets 504", metavar="DURATION", lo=0, lo_open=True),
    # --- kvpick: the ext_proc listener --------------------------------------------------------
    _own("client-ca", "str", "client_ca", None, G_LISTENER,
         "CA bundle (PEM) the ext_proc port verifies client certificates against: only a "
         "client holding a certificate it signed may connect (mutual TLS; needs TLS, so not "
         "with --secure-serving=false; the health port stays open)", metavar="FILE",
         shown="no client certificate asked for"),
    _own("max-connections", "int", "max_connections", 1024, G_LISTENER,
         "open connections the ext_proc port accepts; a connection beyond it is closed at "
         "once", metavar="N", lo=1),
    _own("tls-handshake-timeout", "seconds", "tls_handshake_timeout", 10.0, G_LISTENER,
         "a connection that has not finished its TLS handshake (or, in plaintext, sent the "
         "HTTP/2 preface) this long after it opened is closed", metavar="DURATION", lo=0,
         lo_open=True),
    _own("idle-connection-timeout", "seconds", "idle_connection_timeout", 300.0, G_LISTENER,
         "a connection with no open stream for this long gets GOAWAY and is closed; 0: never",
         metavar="DURATION", lo=0, none_if_zero=True),
    _own("max-stream-resets", "int", "max_stream_resets", 1000, G_LISTENER,
         "streams a client may reset per connection per second; beyond it the connection "
         "gets GOAWAY ENHANCE_YOUR_CALM (the rapid-reset defence)", metavar="N", lo=1),
    _own("max-control-frames", "int", "max_control_frames", 200, G_LISTENER,
         "SETTINGS, PING, PRIORITY and empty DATA or CONTINUATION frames a client may send "
         "per connection per second; beyond it the connection gets GOAWAY ENHANCE_YOUR_CALM",
         metavar="N", lo=1),
    # --- kvpick: diagnostics -----------------------------------------------------------------
    _own("decision-log-size", "int", "decision_log_size", 256, G_DIAG,
         "recent routing decisions kept for the debug endpoint (0: none)", metavar="N", lo=0),
    # --- Accepted and ignored ----------------------------------------------------------------
    _compat("ha-enable-leader-election", False, _HA, "leader election between replicas"),
    _compat("tracing", False, "kvpick does not emit OpenTelemetry traces yet",
            "OpenTelemetry tracing"),
    _compat("enable-pprof", False,
            "Go profiling endpoint; kvpick is a Python process (profile it with py-spy)",
            "/debug/pprof on the metrics port"),
    _compat("metrics-endpoint-auth", False,
            "kvpick's /metrics does no TokenReview check; restrict it with a NetworkPolicy",
            "authenticate /metrics scrapers"),
    _compat("metrics-cert-dir", True, "kvpick serves /metrics over plain HTTP",
            "TLS certificates of /metrics"),
    _compat("metrics-client-ca-file", True, "kvpick serves /metrics over plain HTTP",
            "client CA for /metrics mTLS"),
    _compat("refresh-prometheus-metrics-interval", True,
            "kvpick has no flush interval for its own pool gauges", "pool gauges flush interval"),
    _compat("tls-min-version", True, "kvpick uses the gRPC library's TLS defaults",
            "minimum TLS version"),
    _compat("tls-cipher-suites", True, "kvpick uses the gRPC library's TLS defaults",
            "TLS 1.2 cipher suites"),
    _compat("emit-endpoint-scores", False,
            "kvpick explains decisions in its decision log and debug endpoint instead",
            "per-endpoint scores in dynamic metadata"),
    _compat("enable-grpc-stream-metrics", False, "kvpick has no ext_proc stream metrics",
            "ext_proc stream metrics"),
    _compat("allow-experimental-plugins", False, "kvpick has no experimental plugins",
            "allow Alpha plugins"),
    _compat("plugin-state-staleness-threshold", True,
            "kvpick expires booked requests after --active-request-expiry",
            "reap per-request plugin state"),
    _compat("fairness-id-metric-label-limit", True, "kvpick has no flow-control fairness metrics",
            "cap on fairness_id label values"),
    _compat("feature-gates", True, "kvpick has no feature gates", "feature gates"),
    _compat("total-queued-requests-metric", True, _METRIC_NAMES, "deprecated metric name"),
    _compat("total-running-requests-metric", True, _METRIC_NAMES, "deprecated metric name"),
    _compat("kv-cache-usage-percentage-metric", True, _METRIC_NAMES, "deprecated metric name"),
    _compat("lora-info-metric", True, _METRIC_NAMES, "deprecated metric name"),
    _compat("cache-info-metric", True, _METRIC_NAMES, "deprecated metric name"),
    _compat("model-server-metrics-https-insecure-skip-verify", False,
            "kvpick's metrics scraper has no certificate verification setting",
            "skip TLS verification of model-server metrics"),
    _compat("zap-devel", False, "development logging preset; use --log-level and --zap-encoder",
            "zap development mode"),
    _compat("zap-stacktrace-level", True, "kvpick logs Python tracebacks with errors",
            "level from which zap adds stack traces"),
    _compat("zap-time-encoding", True, "kvpick's log timestamps have one fixed format",
            "zap timestamp encoding"),
    _compat("target-endpoint-key", True,
            "legacy v0.x flag; the destination header is fixed by the protocol",
            "legacy destination header name"),
    _compat("target-pod-header", True,
            "legacy v0.x flag; the destination header is fixed by the protocol",
            "legacy destination header name"),
    _compat("refresh-pods-interval", True,
            "legacy v0.x flag; kvpick's discovery has no pod polling interval",
            "legacy pod refresh interval"),
    _compat("service-name", True,
            "legacy v0.x flag; kvpick finds pods through the InferencePool or selector",
            "legacy EndpointSlice service"),
    _compat("zone", True,
            "legacy v0.x flag; kvpick finds pods through the InferencePool or selector",
            "legacy EndpointSlice zone"),
)
# fmt: on

BY_NAME: Mapping[str, FlagSpec] = MappingProxyType({s.name: s for s in FLAGS})
BY_FIELD: Mapping[str, FlagSpec] = MappingProxyType({s.field: s for s in FLAGS if s.field})


def spellings(name: str) -> tuple[str, str, str]:
    """The three spellings of a kebab-case flag name: kebab, snake_case and lower camelCase."""
    parts = name.split("-")
    camel = parts[0] + "".join(p[:1].upper() + p[1:] for p in parts[1:])
    return name, "_".join(parts), camel


def _spelling_index() -> Mapping[str, FlagSpec]:
    index: dict[str, FlagSpec] = {}
    for spec in FLAGS:
        for spelling in spellings(spec.name):
            other = index.setdefault(spelling, spec)
            if other is not spec:  # pragma: no cover - a table error, caught by the tests
                raise RuntimeError(f"flag spelling {spelling!r} names {other.name} and {spec.name}")
    return MappingProxyType(index)


_BY_SPELLING = _spelling_index()
_GO_BOOLS = {
    "1": True, "t": True, "T": True, "true": True, "TRUE": True, "True": True,
    "0": False, "f": False, "F": False, "false": False, "FALSE": False, "False": False,
}  # fmt: skip
_HELP = ("-h", "--help", "-help", "--h")


# --------------------------------------------------------------------------------------------
# Values


class _BadValue(ValueError):
    """A value that does not parse; the caller adds where it came from."""


_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_UNITS = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
}  # fmt: skip
_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)(?:[eE](\d+))?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?")
_SIZE_UNITS = {
    None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip
_ZAP_LEVELS = {
    "debug": "DEBUG", "info": "INFO", "warn": "WARNING", "error": "ERROR", "dpanic": "ERROR",
    "panic": "ERROR", "fatal": "ERROR",
}  # fmt: skip


def parse_go_duration(text: str) -> float:
    """Seconds in a Go ``time.ParseDuration`` string: ``50ms``, ``1m30s``, ``-2h``, ``0``.

    Units ns, us (µs, μs), ms, s, m, h; several parts add up; a bare number other than 0 is
    an error, as in Go. Raises ValueError with a short reason.
    """
    body = text
    sign = 1.0
    if body[:1] in ("+", "-"):
        sign = -1.0 if body[0] == "-" else 1.0
        body = body[1:]
    if body == "0":
        return 0.0
    if not body:
        raise _BadValue("expects a duration such as 50ms, 2s or 1m30s")
    total = 0.0
    pos = 0
    while pos < len(body):
        part = _DURATION_PART.match(body, pos)
        if part is None:
            if _FLOAT.fullmatch(body[pos:]):
                raise _BadValue("a duration needs a unit (ns, us, ms, s, m, h), e.g. 50ms or 2s")
            raise _BadValue("expects a duration such as 50ms, 2s or 1m30s")
        total += float(part[1]) * _DURATION_UNITS[part[2]]
        pos = part.end()
    return sign * total


def parse_go_bool(text: str) -> bool:
    """A boolean as Go's ``strconv.ParseBool`` reads it (1 0 t f T F true false TRUE ...)."""
    try:
        return _GO_BOOLS[text]
    except KeyError:
        raise _BadValue("expects true or false (also 1/0, t/f, TRUE/FALSE, True/False)") from None


def parse_size(text: str) -> int:
    """Bytes in a Kubernetes-quantity-like size: ``4194304``, ``10MiB``, ``25MB``, ``1e6``.

    A trailing ``B``/``b`` is dropped, as the reference does; k M G T P E are powers of 1000,
    Ki Mi Gi Ti Pi Ei powers of 1024. The result must be a whole number of bytes.
    """
    body = text.strip()
    if len(body) > 1 and body[-1] in "Bb":
        body = body[:-1]
    match = _SIZE.fullmatch(body)
    if match is None:
        raise _BadValue("expects a size in bytes such as 4194304, 10MiB or 25MB")
    try:
        number = Decimal(match[1]) * (10 ** int(match[2] or 0)) * _SIZE_UNITS[match[3]]
    except InvalidOperation:  # pragma: no cover - the regex admits only valid decimals
        raise _BadValue("expects a size in bytes such as 4194304, 10MiB or 25MB") from None
    if number != number.to_integral_value():
        raise _BadValue("is not a whole number of bytes")
    return int(number)


def _unquote(raw: str) -> str:
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
        return raw[1:-1]
    return raw


def _split_list(raw: str) -> list[str]:
    return [item.strip() for item in raw.split(",") if item.strip()]


def convert(spec: FlagSpec, raw: str) -> Any:
    """The value of ``spec`` written as ``raw`` (quotes removed), or _BadValue saying why.

    List kinds return a list (the caller accumulates); an empty value of a flag whose default
    is unset returns None.
    """
    raw = _unquote(raw)
    kind = spec.kind
    if raw == "" and spec.default is None and kind not in ("bool", "value"):
        return None
    if kind == "value":
        return raw
    if kind == "bool":
        return parse_go_bool(raw)
    if kind == "str":
        return raw
    if kind == "int":
        if not _INT.fullmatch(raw):
            raise _BadValue("expects a whole number")
        value: Any = int(raw)
    elif kind == "float":
        if not _FLOAT.fullmatch(raw):
            raise _BadValue("expects a number")
        value = float(raw)
    elif kind == "duration":
        value = parse_go_duration(raw)
    elif kind == "seconds":
        value = float(raw) if _FLOAT.fullmatch(raw) else parse_go_duration(raw)
    elif kind == "size":
        value = parse_size(raw)
    elif kind == "choice":
        for choice in spec.choices:
            if raw.lower() == choice.lower():
                return choice
        if spec.name == "log-level" and raw.upper() == "WARN":
            return "WARNING"
        raise _BadValue(f"expects one of {', '.join(spec.choices)}")
    elif kind == "ports":
        items = _split_list(raw)
        if not all(_INT.fullmatch(item) for item in items):
            raise _BadValue("expects comma-separated port numbers, e.g. 8000,8001")
        return [int(item) for item in items]
    elif kind == "names":
        return _split_list(raw)
    elif kind == "zap-level":
        if raw.lower() in _ZAP_LEVELS:
            return raw.lower()
        if _INT.fullmatch(raw) and int(raw) > 0:
            return int(raw)
        raise _BadValue("expects debug, info, warn, error, panic or an integer > 0")
    else:  # pragma: no cover - every kind is handled above
        raise AssertionError(kind)
    if spec.none_if_zero and value == 0:
        return None
    return value


# --------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True, slots=True)
class EppOptions:
    """Everything ``kvpick epp`` was told, validated; defaults are the reference EPP's and kvpick's.

    Guarantees of an instance returned by :func:`parse_epp_args`: ports are in 1..65535 and
    the three listener ports differ; at most one of ``pool_name``, ``endpoint_selector`` and
    ``endpoints_file`` is set, and ``endpoint_selector`` comes with 1 to 8 target ports;
    ``config_file`` and ``config_text`` are not both set and ``config_file`` names a file;
    with ``secure_serving`` and ``cert_path``, the directory holds ``tls.crt`` and ``tls.key``;
    durations are float seconds; numeric knobs are within the bounds the help states;
    ``log_level`` is DEBUG when ``-v``/``--zap-log-level`` asked for debug logs and
    ``--log-level`` was not given on the command line. ``ignored`` lists, in the order first
    seen, the canonical names of the accepted-but-ignored flags that were given (for the
    startup log); ``sources`` maps each field set from outside to where its value came from
    (the flag as typed, or ``env NAME``; see :meth:`source`). The gRPC size limits are None
    when unset; the server then applies 64 MiB (:attr:`grpc_max_recv_bytes`,
    :attr:`grpc_max_send_bytes`).
    """

    # Listeners and TLS.
    grpc_port: int = 9002
    grpc_health_port: int = 9003
    metrics_port: int = 9090
    secure_serving: bool = True
    cert_path: str | None = None
    enable_cert_reload: bool = False
    cert_reload_interval: float = 2.0
    health_checking: bool = False
    grpc_max_recv_msg_size: int | None = None
    grpc_max_send_msg_size: int | None = None
    drain_timeout: float = 30.0
    # Discovery.
    pool_name: str | None = None
    pool_namespace: str = "default"
    pool_group: str = "inference.networking.k8s.io"
    endpoint_selector: str | None = None
    endpoint_target_ports: tuple[int, ...] = ()
    disable_endpoint_subset_filter: bool = False
    kubeconfig: str | None = None
    endpoints_file: str | None = None
    # EndpointPickerConfig.
    config_file: str | None = None
    config_text: str | None = None
    # Model-server metrics.
    refresh_metrics_interval: float = 0.05
    metrics_staleness_threshold: float = 2.0
    model_server_metrics_path: str = "/metrics"
    model_server_metrics_port: int | None = None
    model_server_metrics_scheme: str = "http"
    ext_proc_server: str = "h2"
    # Logging.
    verbosity: int = 0
    log_format: LogFormat = "console"
    log_level: LogLevel = "INFO"
    # Tokenization and KV events.
    block_size: int = 16
    tokenizer: str | None = None
    served_model_names: tuple[str, ...] = ()
    lora_adapters: tuple[str, ...] = ()
    token_data: bool = True
    kv_events_port: int = 5557
    kv_replay_port: int | None = None
    # Scheduling and cost.
    policy: Policy = "kv-aware"
    fallbacks: int = 0
    overlap_credit: float = 1.0
    credit_decay: float = 0.0
    host_credit: float = 0.75
    disk_credit: float = 0.25
    external_credit: float = 0.25
    prefill_load_scale: float = 1.0
    decode_active_request_weight: float = 0.0
    temperature: float = 0.0
    # Load bookkeeping and overload.
    active_request_expiry: float = 300.0
    busy_decode_blocks_frac: float | None = None
    busy_prefill_tokens: int | None = None
    busy_prefill_tokens_frac: float | None = None
    max_num_batched_tokens: int = 8192
    # Request limits.
    max_body_bytes: int | None = 10_000_000
    request_body_timeout: float | None = 60.0
    max_json_depth: int = 128
    max_model_len: int | None = None
    offload_body_bytes: int = 65_536
    preprocess_threads: int = 2
    preprocess_queue: int = 32
    preprocess_timeout: float = 10.0
    # The ext_proc listener.
    client_ca: str | None = None
    max_connections: int = 1024
    tls_handshake_timeout: float = 10.0
    idle_connection_timeout: float | None = 300.0
    max_stream_resets: int = 1000
    max_control_frames: int = 200
    # Diagnostics.
    decision_log_size: int = 256
    # What the parser saw.
    ignored: tuple[str, ...] = ()
    sources: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({}), compare=False, repr=False
    )

    @property
    def discovery(self) -> Discovery | None:
        """Which endpoint source was configured: InferencePool, label selector, file, or none."""
        # The endpoints file wins: with it, --pool-name (which the upstream Helm chart always
        # passes) only names the pool in metrics.
        if self.endpoints_file:
            return "file"
        if self.pool_name:
            return "pool"
        if self.endpoint_selector:
            return "selector"
        return None

    @property
    def grpc_max_recv_bytes(self) -> int:
        """The receive limit the ext_proc server applies (64 MiB unless set)."""
        return self.grpc_max_recv_msg_size or DEFAULT_GRPC_MAX_MSG_SIZE

    @property
    def grpc_max_send_bytes(self) -> int:
        """The send limit the ext_proc server applies (64 MiB unless set)."""
        return self.grpc_max_send_msg_size or DEFAULT_GRPC_MAX_MSG_SIZE

    def source(self, field_name: str) -> str:
        """Where ``field_name``'s value came from (``default`` when not recorded)."""
        return self.sources.get(field_name, "default")


# --------------------------------------------------------------------------------------------
# Parsing


def _camel_to_kebab(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"-\1", name).lower().replace("_", "-")


def _lookup(name: str) -> tuple[FlagSpec | None, bool]:
    """The flag a name (without dashes or value) spells, and whether it was a ``no-`` form."""
    spec = _BY_SPELLING.get(name)
    if spec is not None:
        return spec, False
    rest = None
    if name.startswith(("no-", "no_")):
        rest = name[3:]
    elif len(name) > 2 and name.startswith("no") and name[2].isupper():
        rest = name[2].lower() + name[3:]
    if rest is not None:
        spec = _BY_SPELLING.get(rest)
        if spec is not None and spec.kind == "bool":
            return spec, True
    return None, False


def _is_flag(token: str) -> bool:
    if not token.startswith("-") or token in ("-", "--"):
        return False
    name = token.lstrip("-").partition("=")[0]
    return token in _HELP or _lookup(name)[0] is not None


def _unknown(spelling: str, name: str) -> OptionsError:
    wanted = _camel_to_kebab(name)
    match: list[str] = []
    if wanted.startswith("no-"):  # a misspelt --no-<bool>
        bools = [n for n, spec in BY_NAME.items() if spec.kind == "bool"]
        match = [f"no-{m}" for m in difflib.get_close_matches(wanted[3:], bools, n=1, cutoff=0.6)]
    if not match:
        match = difflib.get_close_matches(wanted, list(BY_NAME), n=1, cutoff=0.6)
    hint = f"; did you mean --{match[0]}?" if match else ""
    return OptionsError(f"unknown flag {spelling}{hint} (kvpick epp --help lists every flag)")


def _scan(argv: Sequence[str]) -> list[tuple[FlagSpec, str, str]]:
    """The flags on a command line, in order: (spec, raw value, the flag as typed)."""
    found: list[tuple[FlagSpec, str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in _HELP:
            raise HelpRequested(epp_help())
        if arg == "--":
            if i < len(argv):
                raise OptionsError(f"unexpected argument {argv[i]!r}: kvpick epp takes flags only")
            break
        if not arg.startswith("-") or arg == "-":
            raise OptionsError(
                f"unexpected argument {arg!r}: kvpick epp takes flags only "
                "(--name=value or --name value)"
            )
        body = arg[2:] if arg.startswith("--") else arg[1:]
        name, eq, inline = body.partition("=")
        spelling = arg.partition("=")[0]
        if body.startswith("-") or not name:
            raise OptionsError(f"bad flag {arg!r}: a flag is -name or --name")
        spec, negated = _lookup(name)
        if spec is None:
            raise _unknown(spelling, name)
        if spec.kind == "bool":
            if negated:
                if eq:
                    raise OptionsError(f"{spelling} takes no value (it means --{spec.name}=false)")
                raw = "false"
            elif eq:
                raw = inline
            else:
                raw = "true"
                if i < len(argv) and argv[i] in _GO_BOOLS:
                    word = argv[i]
                    raise OptionsError(
                        f"{spelling} is a boolean flag: write {spelling}={word} "
                        f"(as with Go flags, a separate {word!r} would not be its value)"
                    )
        elif eq:
            raw = inline
        else:
            if i >= len(argv):
                raise OptionsError(f"{spelling} needs a value ({spelling}=VALUE)")
            if _is_flag(argv[i]):
                raise OptionsError(
                    f"{spelling} needs a value but is followed by the flag {argv[i]}; "
                    f"a value that begins with a dash must be written {spelling}=VALUE"
                )
            raw = argv[i]
            i += 1
        found.append((spec, raw, spelling))
    return found


def parse_epp_args(argv: Sequence[str], env: Mapping[str, str] | None = None) -> EppOptions:
    """Parse ``kvpick epp``'s arguments (without the program and subcommand names).

    ``env`` defaults to ``os.environ``. Returns validated :class:`EppOptions`; logs one
    WARNING on ``epp.options`` per accepted-but-ignored flag given; raises
    :class:`OptionsError` for anything unusable and :class:`HelpRequested` for ``--help``.
    See the module docstring for the spelling rules and precedence.
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    values: dict[str, Any] = {s.field: s.default for s in FLAGS if s.field}
    sources: dict[str, str] = {}
    origin: dict[str, str] = {}  # field -> how to name it in an error
    ignored: list[str] = []
    zap_level: Any = None

    for spec, raw, spelling in _scan(argv):
        if spec.ignored is not None and spec.flag not in ignored:
            ignored.append(spec.flag)
            log.warning(
                "flag %s is accepted for compatibility with the reference EPP and ignored: %s",
                spec.flag,
                spec.ignored,
            )
        if spec.kind == "value" or (spec.ignored is not None and spec.field is None):
            continue  # an ignored flag's value is not checked
        try:
            value = convert(spec, raw)
        except _BadValue as exc:
            raise OptionsError(f"{spelling}={raw!r}: {exc}") from None
        if spec.name == "zap-log-level":
            zap_level = value
            sources["_zap_log_level"] = spelling
            continue
        assert spec.field is not None
        if spec.kind in ("ports", "names"):
            previous = values[spec.field] if spec.field in sources else ()
            value = (*previous, *(value or ()))
        values[spec.field] = value
        sources[spec.field] = spelling
        origin[spec.field] = spelling
    if values["pool_namespace"] == "":  # as in the reference: empty means $NAMESPACE / default
        values["pool_namespace"] = "default"
        sources.pop("pool_namespace", None)
        origin.pop("pool_namespace", None)

    for spec in FLAGS:
        if spec.field is None or spec.env is None or spec.field in sources:
            continue
        raw = environ.get(spec.env, "")
        if raw == "":
            continue
        if spec.own:
            try:
                value = convert(spec, raw)
            except _BadValue as exc:
                raise OptionsError(f"{spec.env}={raw!r}: {spec.flag} {exc}") from None
            if spec.kind in ("ports", "names"):
                value = tuple(value or ())
        else:  # --pool-namespace from $NAMESPACE: taken as is
            value = raw
        values[spec.field] = value
        sources[spec.field] = f"env {spec.env}"
        origin[spec.field] = spec.env

    _resolve_log_level(values, sources, zap_level)
    _validate(values, origin)
    values["endpoint_target_ports"] = tuple(dict.fromkeys(values["endpoint_target_ports"]))
    return EppOptions(
        **values,
        ignored=tuple(ignored),
        sources=MappingProxyType({k: v for k, v in sources.items() if not k.startswith("_")}),
    )


def _resolve_log_level(values: dict[str, Any], sources: dict[str, str], zap_level: Any) -> None:
    """``--log-level`` on the command line wins; then ``-v``/``--zap-log-level`` on the command
    line (the most verbose of them); then ``KVPICK_LOG_LEVEL``; then INFO."""
    if isinstance(zap_level, int):
        values["verbosity"] = max(values["verbosity"], zap_level)
    log_source = sources.get("log_level", "default")
    if log_source != "default" and not log_source.startswith("env "):
        return
    asked: list[tuple[str, str]] = []  # (level, flag)
    if "verbosity" in sources:
        asked.append(("DEBUG" if values["verbosity"] >= 1 else "INFO", sources["verbosity"]))
    if "_zap_log_level" in sources:
        level = "DEBUG" if isinstance(zap_level, int) else _ZAP_LEVELS[zap_level]
        asked.append((level, sources["_zap_log_level"]))
    if asked:
        order = ("DEBUG", "INFO", "WARNING", "ERROR")
        level, flag = min(asked, key=lambda item: order.index(item[0]))
        values["log_level"] = level
        sources["log_level"] = flag


def _fail(field_name: str, origin: Mapping[str, str], message: str) -> OptionsError:
    spec = BY_FIELD[field_name]
    where = origin.get(field_name)
    if where is None or where == spec.flag:
        return OptionsError(f"{spec.flag} {message}")
    return OptionsError(f"{spec.flag} {message} (from {where})")


def _fmt_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _validate(values: dict[str, Any], origin: Mapping[str, str]) -> None:
    """Bounds and cross-flag rules; raises the first problem as an OptionsError."""
    for spec in FLAGS:
        if spec.field is None or spec.kind not in ("int", "float", "duration", "seconds", "size"):
            continue
        value = values[spec.field]
        if value is None:
            continue
        if spec.lo is not None and (value <= spec.lo if spec.lo_open else value < spec.lo):
            op = ">" if spec.lo_open else "≥"
            shown = format_duration(value) if spec.kind in ("duration", "seconds") else value
            raise _fail(spec.field, origin, f"must be {op} {_fmt_number(spec.lo)}, got {shown}")
        if spec.hi is not None and value > spec.hi:
            raise _fail(spec.field, origin, f"must be ≤ {spec.hi}, got {value}")

    for port in values["endpoint_target_ports"]:
        if not 1 <= port <= 65535:
            raise _fail("endpoint_target_ports", origin, f"has {port}, not a port in 1..65535")

    listeners = ("grpc_port", "grpc_health_port", "metrics_port")
    seen: dict[int, str] = {}
    for name in listeners:
        port = values[name]
        if port in seen:
            first, second = BY_FIELD[seen[port]].flag, BY_FIELD[name].flag
            raise OptionsError(
                f"{first} and {second} are both {port}; each listener needs its own port"
            )
        seen[port] = name

    sources_given = [n for n in ("pool_name", "endpoint_selector") if values[n]]
    if values["endpoint_selector"] and values["endpoints_file"]:
        sources_given.append("endpoints_file")
    if len(sources_given) > 1:
        flags = " and ".join(BY_FIELD[n].flag for n in sources_given)
        raise OptionsError(f"{flags} are both set; choose one way to find the endpoints")
    ports = tuple(dict.fromkeys(values["endpoint_target_ports"]))
    if values["endpoint_selector"] and not 1 <= len(ports) <= MAX_ENDPOINT_TARGET_PORTS:
        raise _fail(
            "endpoint_target_ports",
            origin,
            f"needs 1 to {MAX_ENDPOINT_TARGET_PORTS} ports with --endpoint-selector, "
            f"got {len(ports)}",
        )

    if values["config_file"] and values["config_text"]:
        raise OptionsError("--config-file and --config-text cannot both be set; choose one")
    for name in ("config_file", "endpoints_file"):
        path = values[name]
        if path and not Path(path).is_file():
            raise _fail(name, origin, f"{path!r} is not a file")
    if values["secure_serving"] and values["cert_path"]:
        cert_dir = Path(values["cert_path"])
        if not cert_dir.is_dir():
            raise _fail("cert_path", origin, f"{str(cert_dir)!r} is not a directory")
        missing = [n for n in ("tls.crt", "tls.key") if not (cert_dir / n).is_file()]
        if missing:
            raise _fail("cert_path", origin, f"{str(cert_dir)!r} has no {' or '.join(missing)}")
    if values["client_ca"] and not values["secure_serving"]:
        # Client certificates are a TLS feature: without TLS the port would admit anyone.
        raise _fail(
            "client_ca",
            origin,
            "asks for client certificates, which need TLS on the ext_proc port; "
            "it cannot be used with --secure-serving=false",
        )

    path = values["model_server_metrics_path"]
    if not path or not path.startswith("/"):
        raise _fail("model_server_metrics_path", origin, f"must begin with '/', got {path!r}")


# --------------------------------------------------------------------------------------------
# Help


def format_duration(seconds: float) -> str:
    """A duration in seconds written the Go way for help text: 0, 50ms, 2s, 5m, 1h30m."""
    if seconds == 0:
        return "0"
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    whole = int(seconds)
    if whole == seconds and whole % 60 == 0:
        hours, minutes = divmod(whole // 60, 60)
        return (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "")
    return f"{seconds:g}s"


def format_default(spec: FlagSpec) -> str:
    """The default of ``spec`` as the help text and the docs show it."""
    default = spec.default
    if spec.shown is not None:
        return spec.shown
    if default is None or default == ():
        return "unset"
    if isinstance(default, bool):
        return "true" if default else "false"
    if spec.kind in ("duration", "seconds"):
        return format_duration(default)
    return str(default)


def _flag_column(spec: FlagSpec) -> str:
    if spec.kind == "bool":
        return spec.flag
    if spec.kind == "value":
        return f"{spec.flag} VALUE"
    return f"{spec.flag} {spec.metavar or 'VALUE'}"


def epp_help() -> str:
    """The ``kvpick epp --help`` text: kvpick's flags by group with defaults and environment
    variables, then the accepted-for-compatibility flags with the reason each is ignored."""
    width, column = 100, 36
    lines = [
        "usage: kvpick epp [flags]",
        "",
        "kvpick's Endpoint Picker, a drop-in for the Gateway API Inference Extension's reference",
        "EPP. Flags take one or two dashes and any of kebab-case, snake_case or camelCase",
        "(--pool-name, -pool_name, -poolName); the value follows '=' or comes as the next",
        "argument. Booleans: --flag, --flag=false, --no-flag (never '--flag false').",
        "Durations: Go syntax (50ms, 2s, 1m30s). kvpick's own flags also read KVPICK_<NAME>;",
        "the command line wins over the environment.",
    ]
    for group in GROUPS:
        lines += ["", f"{group}:"]
        for spec in FLAGS:
            if spec.group != group:
                continue
            if spec.ignored is not None:
                text = f"{spec.help}; ignored: {spec.ignored}"
            else:
                extra = [f"default {format_default(spec)}"]
                if spec.own and spec.env:
                    extra.append(f"env {spec.env}")
                if spec.kind == "choice" and len(spec.choices) > 2:
                    extra.insert(0, "one of " + ", ".join(spec.choices))
                text = f"{spec.help} ({'; '.join(extra)})"
            head = f"  {_flag_column(spec)}"
            body = textwrap.wrap(text, width - column, break_on_hyphens=False)
            if len(head) + 2 <= column:
                lines.append(head.ljust(column) + body[0])
                body = body[1:]
            else:
                lines.append(head)
            lines += [" " * column + chunk for chunk in body]
    return "\n".join(lines) + "\n"
