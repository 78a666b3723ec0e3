"""The EndpointPickerConfig file, kvpick's plugin types, and the ``--policy`` presets.

File format (GAIE's, specs/epp-protocol.md §10)::

    apiVersion: inference.networking.x-k8s.io/v1alpha1    # or llm-d.ai/v1alpha1
    kind: EndpointPickerConfig
    plugins:                       # instances: {type, name (default: type), parameters}
    - type: kv-aware-scorer
      parameters: {overlapCredit: 1.0}
    schedulingProfiles:            # {name, plugins: [{pluginRef, weight (default 1)}]}
    - name: default
      plugins:
      - pluginRef: kv-aware-scorer
        weight: 1

Top-level ``featureGates``, ``dataLayer`` (and the misspelling ``data`` some GAIE docs use),
``saturationDetector``, ``flowControl`` and ``parser`` are accepted and ignored with a
warning; any other key is an error. Everything wrong with a file is a :class:`ConfigError`
at start-up, never a surprise at request time: an unknown plugin type (the message lists
the known ones), a ``pluginRef`` to an undeclared name, an unknown parameter of a known
plugin (naming both), a parameter of the wrong type or range, two pickers in a profile.

Meaning, where GAIE leaves room:

* A profile without a picker gets ``max-score-picker`` (GAIE's rule); the plugin is added
  to the config, so ``temperature`` overrides reach it.
* No ``schedulingProfiles`` at all: one profile ``default`` referencing every filter,
  scorer and picker, in file order, with weight 1.
* Every ``utilization-detector`` / ``busy-detector`` declared takes part in shedding, even
  one no profile references ("for shedding only", like GAIE's saturation detector); in a
  profile it is also a filter.
* Profiles: the *aggregated* profile is ``default`` if present, else ``decode``, else the
  first. For disaggregation the *prefill* profile is the one named ``prefill`` and the
  *decode* profile the one named ``decode`` (names a ``disagg-profile-handler`` may change
  with ``prefillProfile`` / ``decodeProfile``), each falling back to the aggregated
  profile when absent. ``single-profile-handler`` requires exactly one profile.
* ``openai-parser`` and ``approx-prefix-cache-producer`` (implicit in GAIE's defaults) are
  accepted and ignored with a warning: kvpick parses requests itself, and its
  ``prefix-cache-scorer`` keeps its own index.

Presets (``--policy NAME``) are written as config text (:data:`PRESETS`), so each can be
printed, edited and loaded back as a file. Flag overrides (:func:`with_overrides`) set a
camelCase parameter on every plugin whose type has it; an override no plugin takes is an
error rather than silently doing nothing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import yaml

from epp.scheduling.approx_prefix import (
    CHARS_PER_TOKEN,
    DEFAULT_BLOCK_SIZE_TOKENS,
    DEFAULT_LRU_CAPACITY_PER_SERVER,
    DEFAULT_MAX_PREFIX_BLOCKS,
    ApproxPrefixIndex,
)
from epp.scheduling.cost import CostParams
from epp.scheduling.filters import BusyDetector, Filter, UtilizationDetector
from epp.scheduling.pickers import (
    MaxScorePicker,
    Picker,
    RandomPicker,
    RoundRobinPicker,
    WeightedRandomPicker,
)
from epp.scheduling.scorers import (
    KvAwareScorer,
    KvCacheUtilizationScorer,
    LeastLoadedScorer,
    LoraAffinityScorer,
    PrefixCacheScorer,
    QueueScorer,
    RunningRequestsSizeScorer,
    Scorer,
)

if TYPE_CHECKING:
    from epp.scheduling.scheduler import Scheduler

log = logging.getLogger(__name__)

API_VERSIONS = ("inference.networking.x-k8s.io/v1alpha1", "llm-d.ai/v1alpha1")
KIND = "EndpointPickerConfig"
DEFAULT_PROFILE = "default"
DEFAULT_POLICY = "kv-aware"

_IGNORED_SECTIONS = (
    "featureGates",
    "dataLayer",
    "data",
    "saturationDetector",
    "flowControl",
    "parser",
)
_TOP_LEVEL = ("apiVersion", "kind", "plugins", "schedulingProfiles", *_IGNORED_SECTIONS)


class ConfigError(ValueError):
    """The EndpointPickerConfig (or a preset override) is invalid; the message says where."""


# --- profile handlers ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SingleProfileHandler:
    """``single-profile-handler``: the config has exactly one profile, used for every
    request (both sides of a disaggregated one too)."""

    type_name = "single-profile-handler"


@dataclass(frozen=True, slots=True)
class DisaggProfileHandler:
    """``disagg-profile-handler`` (kvpick): names the profiles used for the prefill and the
    decode side of a disaggregated request."""

    prefill_profile: str = "prefill"
    decode_profile: str = "decode"
    type_name = "disagg-profile-handler"


Plugin = Scorer | Filter | Picker | SingleProfileHandler | DisaggProfileHandler | None


# --- parameter converters --------------------------------------------------------------


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r}")
    return float(value)


def _non_negative(value: Any) -> float:
    number = _number(value)
    if number < 0:
        raise ValueError(f"must be >= 0, got {value!r}")
    return number


def _optional_non_negative(value: Any) -> float | None:
    return None if value is None else _non_negative(value)


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected an integer >= 1, got {value!r}")
    return value


def _optional_positive_int(value: Any) -> int | None:
    return None if value is None else _positive_int(value)


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value


def _anything(value: Any) -> Any:
    return value


Converter = Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class _PluginType:
    """How to build one plugin type: ``parameters`` maps each camelCase parameter to the
    keyword ``build`` receives and the converter that checks its value."""

    kind: str  # "scorer" | "filter" | "picker" | "handler" | "hook" | "ignored"
    build: Callable[..., Plugin]
    parameters: Mapping[str, tuple[str, Converter]] = field(default_factory=dict)


def _build_kv_aware(**kw: Any) -> KvAwareScorer:
    return KvAwareScorer(CostParams(**kw))


def _build_prefix_cache(
    *,
    block_size_tokens: int | None = None,
    block_size_chars: int | None = None,
    max_prefix_blocks: int | None = None,
    max_prefix_tokens: int | None = None,
    lru_capacity_per_server: int = DEFAULT_LRU_CAPACITY_PER_SERVER,
    auto_tune: bool = False,
) -> PrefixCacheScorer:
    if block_size_tokens is None:
        if block_size_chars is not None:
            # GAIE's deprecated blockSize counted characters; a token is about four.
            log.warning("prefix-cache-scorer: blockSize is deprecated; use blockSizeTokens")
            block_size_tokens = max(1, block_size_chars // CHARS_PER_TOKEN)
        else:
            block_size_tokens = DEFAULT_BLOCK_SIZE_TOKENS
    if max_prefix_blocks is None:
        max_prefix_blocks = (
            max(1, max_prefix_tokens // block_size_tokens)
            if max_prefix_tokens is not None
            else DEFAULT_MAX_PREFIX_BLOCKS
        )
    if auto_tune:
        # Tuning the block size from the first endpoint's metrics would change the hashes
        # of everything already recorded; kvpick keeps the configured size.
        log.warning("prefix-cache-scorer: autoTune is not supported; using blockSizeTokens")
    return PrefixCacheScorer(
        ApproxPrefixIndex(
            block_size_tokens=block_size_tokens,
            max_prefix_blocks=max_prefix_blocks,
            lru_capacity_per_server=lru_capacity_per_server,
        )
    )


def _build_utilization(*, _ignored: Any = None, **kw: Any) -> UtilizationDetector:
    return UtilizationDetector(**kw)


def _ignored_plugin(**_: Any) -> None:
    return None


_MAX_ENDPOINTS = {"maxNumOfEndpoints": ("max_endpoints", _positive_int)}

PLUGIN_TYPES: dict[str, _PluginType] = {
    "kv-aware-scorer": _PluginType(
        "scorer",
        _build_kv_aware,
        {
            "overlapCredit": ("overlap_credit", _non_negative),
            "creditDecay": ("credit_decay", _non_negative),
            "hostCredit": ("host_credit", _non_negative),
            "diskCredit": ("disk_credit", _non_negative),
            "externalCredit": ("external_credit", _non_negative),
            "prefillLoadScale": ("prefill_load_scale", _non_negative),
            "decodeActiveRequestWeight": ("decode_active_request_weight", _non_negative),
        },
    ),
    "queue-scorer": _PluginType("scorer", QueueScorer),
    "kv-cache-utilization-scorer": _PluginType("scorer", KvCacheUtilizationScorer),
    "running-requests-size-scorer": _PluginType("scorer", RunningRequestsSizeScorer),
    "least-loaded-scorer": _PluginType("scorer", LeastLoadedScorer),
    "lora-affinity-scorer": _PluginType("scorer", LoraAffinityScorer),
    "prefix-cache-scorer": _PluginType(
        "scorer",
        _build_prefix_cache,
        {
            "blockSizeTokens": ("block_size_tokens", _positive_int),
            "blockSize": ("block_size_chars", _positive_int),
            "maxPrefixBlocksToMatch": ("max_prefix_blocks", _positive_int),
            "maxPrefixTokensToMatch": ("max_prefix_tokens", _positive_int),
            "lruCapacityPerServer": ("lru_capacity_per_server", _positive_int),
            "autoTune": ("auto_tune", _boolean),
        },
    ),
    "utilization-detector": _PluginType(
        "filter",
        _build_utilization,
        {
            "queueDepthThreshold": ("queue_depth_threshold", _non_negative),
            "kvCacheUtilThreshold": ("kv_cache_util_threshold", _non_negative),
            "headroom": ("headroom", _non_negative),
            # kvpick uses the scraper's staleness flag instead (see UtilizationDetector).
            "metricsStalenessThreshold": ("_ignored", _anything),
        },
    ),
    "busy-detector": _PluginType(
        "filter",
        BusyDetector,
        {
            "activeDecodeBlocksThreshold": (
                "active_decode_blocks_threshold",
                _optional_non_negative,
            ),
            "activePrefillTokensThreshold": (
                "active_prefill_tokens_threshold",
                _optional_non_negative,
            ),
            "activePrefillTokensThresholdFrac": (
                "active_prefill_tokens_threshold_frac",
                _optional_non_negative,
            ),
            "maxNumBatchedTokens": ("max_num_batched_tokens", _optional_positive_int),
        },
    ),
    "max-score-picker": _PluginType(
        "picker",
        MaxScorePicker,
        {**_MAX_ENDPOINTS, "temperature": ("temperature", _non_negative)},
    ),
    "random-picker": _PluginType("picker", RandomPicker, _MAX_ENDPOINTS),
    "round-robin-picker": _PluginType("picker", RoundRobinPicker, _MAX_ENDPOINTS),
    "weighted-random-picker": _PluginType("picker", WeightedRandomPicker, _MAX_ENDPOINTS),
    "single-profile-handler": _PluginType("handler", SingleProfileHandler),
    "disagg-profile-handler": _PluginType(
        "handler",
        DisaggProfileHandler,
        {
            "prefillProfile": ("prefill_profile", _string),
            "decodeProfile": ("decode_profile", _string),
        },
    ),
    # The conformance suite's test plugins (specs/epp-protocol.md §7). Request handling
    # implements them: the first restricts candidates to the test header's endpoints, the
    # second copies the served endpoint into a response header.
    "header-based-testing-filter": _PluginType("hook", _ignored_plugin),
    "destination-endpoint-served-verifier": _PluginType("hook", _ignored_plugin),
    "openai-parser": _PluginType("ignored", _ignored_plugin),
    "approx-prefix-cache-producer": _PluginType(
        "ignored",
        _ignored_plugin,
        {
            name: ("_", _anything)
            for name in (
                "blockSizeTokens",
                "blockSize",
                "maxPrefixBlocksToMatch",
                "maxPrefixTokensToMatch",
                "lruCapacityPerServer",
                "autoTune",
            )
        },
    ),
}


# --- the parsed config -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PluginSpec:
    """One plugin instance: its unique ``name``, its ``type`` and its raw ``parameters``."""

    name: str
    type: str
    parameters: Mapping[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """``scorer``, ``filter``, ``picker``, ``handler`` or ``ignored``."""
        return PLUGIN_TYPES[self.type].kind


@dataclass(frozen=True, slots=True)
class ProfilePlugin:
    """A profile's reference to a plugin; ``weight`` only matters for scorers."""

    plugin_ref: str
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class ProfileSpec:
    """A scheduling profile. After parsing it has exactly one picker reference."""

    name: str
    plugins: tuple[ProfilePlugin, ...]


@dataclass(frozen=True, slots=True)
class EndpointPickerConfig:
    """A validated config: every reference resolves, every plugin builds, every profile
    has one picker, and the three profile roles name existing profiles."""

    api_version: str
    plugins: tuple[PluginSpec, ...]
    profiles: tuple[ProfileSpec, ...]
    aggregated_profile: str
    prefill_profile: str
    decode_profile: str

    def plugin(self, name: str) -> PluginSpec:
        """The plugin named ``name`` (KeyError when there is none)."""
        for spec in self.plugins:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def profile(self, name: str) -> ProfileSpec:
        """The profile named ``name`` (KeyError when there is none)."""
        for spec in self.profiles:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """The config as a file would hold it (loads back to an equal config)."""
        plugins: list[dict[str, Any]] = []
        for spec in self.plugins:
            entry: dict[str, Any] = {"type": spec.type}
            if spec.name != spec.type:
                entry["name"] = spec.name
            if spec.parameters:
                entry["parameters"] = dict(spec.parameters)
            plugins.append(entry)
        profiles = []
        for profile in self.profiles:
            refs: list[dict[str, Any]] = []
            for ref in profile.plugins:
                entry = {"pluginRef": ref.plugin_ref}
                if self.plugin(ref.plugin_ref).kind == "scorer":
                    entry["weight"] = _plain_number(ref.weight)
                refs.append(entry)
            profiles.append({"name": profile.name, "plugins": refs})
        return {
            "apiVersion": self.api_version,
            "kind": KIND,
            "plugins": plugins,
            "schedulingProfiles": profiles,
        }


def _plain_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def make_plugin(spec: PluginSpec) -> Plugin:
    """Build a fresh instance of ``spec`` (:class:`ConfigError` when a parameter is wrong).

    Returns None for the ignored types.
    """
    plugin_type = PLUGIN_TYPES.get(spec.type)
    if plugin_type is None:
        raise ConfigError(
            f"plugin {spec.name!r}: unknown type {spec.type!r}; kvpick knows: "
            + ", ".join(sorted(PLUGIN_TYPES))
        )
    kwargs: dict[str, Any] = {}
    for key, value in spec.parameters.items():
        entry = plugin_type.parameters.get(key)
        if entry is None:
            known = ", ".join(sorted(plugin_type.parameters)) or "none"
            raise ConfigError(
                f"plugin {spec.name!r} (type {spec.type}): unknown parameter {key!r}; "
                f"its parameters: {known}"
            )
        keyword, convert = entry
        try:
            kwargs[keyword] = convert(value)
        except ValueError as err:
            raise ConfigError(
                f"plugin {spec.name!r} (type {spec.type}): parameter {key!r}: {err}"
            ) from None
    try:
        return plugin_type.build(**kwargs)
    except ValueError as err:
        raise ConfigError(f"plugin {spec.name!r} (type {spec.type}): {err}") from None


# --- parsing -----------------------------------------------------------------------------


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def _check_keys(entry: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = [key for key in entry if key not in allowed]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; expected: {', '.join(allowed)}")


def _parse_plugins(raw: Any) -> list[PluginSpec]:
    specs: list[PluginSpec] = []
    seen: set[str] = set()
    for i, item in enumerate(_list(raw, "plugins")):
        where = f"plugins[{i}]"
        entry = _mapping(item, where)
        _check_keys(entry, ("name", "type", "parameters"), where)
        plugin_type = entry.get("type")
        if not isinstance(plugin_type, str) or not plugin_type:
            raise ConfigError(f"{where}: 'type' is required")
        name = entry.get("name") or plugin_type
        if not isinstance(name, str):
            raise ConfigError(f"{where}: 'name' must be a string")
        if name in seen:
            raise ConfigError(f"{where}: duplicate plugin name {name!r}")
        seen.add(name)
        parameters = entry.get("parameters") or {}
        spec = PluginSpec(name, plugin_type, dict(_mapping(parameters, f"{where}.parameters")))
        make_plugin(spec)  # validates the type, every parameter name and value
        if spec.kind == "ignored":
            log.warning("plugin %r (type %s) is accepted and ignored by kvpick", name, plugin_type)
        specs.append(spec)
    if not specs:
        raise ConfigError("plugins: at least one plugin is required")
    return specs


def _parse_profiles(raw: Any, by_name: dict[str, PluginSpec]) -> list[ProfileSpec]:
    profiles: list[ProfileSpec] = []
    seen: set[str] = set()
    for i, item in enumerate(_list(raw, "schedulingProfiles")):
        where = f"schedulingProfiles[{i}]"
        entry = _mapping(item, where)
        _check_keys(entry, ("name", "plugins"), where)
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: 'name' is required")
        if name in seen:
            raise ConfigError(f"{where}: duplicate profile name {name!r}")
        seen.add(name)
        refs: list[ProfilePlugin] = []
        for j, ref_item in enumerate(_list(entry.get("plugins"), f"{where}.plugins")):
            ref_where = f"profile {name!r} plugins[{j}]"
            ref_entry = _mapping(ref_item, ref_where)
            _check_keys(ref_entry, ("pluginRef", "weight"), ref_where)
            ref = ref_entry.get("pluginRef")
            if ref not in by_name:
                raise ConfigError(
                    f"{ref_where}: pluginRef {ref!r} names no plugin; declared: "
                    + ", ".join(by_name)
                )
            kind = by_name[ref].kind
            if kind not in ("scorer", "filter", "picker", "hook"):
                raise ConfigError(
                    f"{ref_where}: {ref!r} is a {kind} plugin, not a filter, scorer or picker"
                )
            weight = ref_entry.get("weight", 1)
            try:
                weight = _non_negative(weight)
            except ValueError as err:
                raise ConfigError(f"{ref_where}: weight {err}") from None
            refs.append(ProfilePlugin(ref, weight))
        profiles.append(ProfileSpec(name, tuple(refs)))
    return profiles


def _ensure_pickers(profiles: list[ProfileSpec], plugins: list[PluginSpec]) -> list[ProfileSpec]:
    """Give every profile without a picker ``max-score-picker`` (and reject two pickers)."""
    by_name = {spec.name: spec for spec in plugins}
    out: list[ProfileSpec] = []
    for profile in profiles:
        pickers = [r.plugin_ref for r in profile.plugins if by_name[r.plugin_ref].kind == "picker"]
        if len(pickers) > 1:
            raise ConfigError(
                f"profile {profile.name!r}: more than one picker ({', '.join(pickers)})"
            )
        if not pickers:
            default = by_name.get(MaxScorePicker.type_name)
            if default is None:
                default = PluginSpec(MaxScorePicker.type_name, MaxScorePicker.type_name, {})
                plugins.append(default)
                by_name[default.name] = default
            elif default.type != MaxScorePicker.type_name:
                raise ConfigError(
                    f"profile {profile.name!r} has no picker, and the name "
                    f"{MaxScorePicker.type_name!r} is taken by a {default.type} plugin"
                )
            profile = ProfileSpec(profile.name, (*profile.plugins, ProfilePlugin(default.name)))
        out.append(profile)
    return out


def _profile_roles(profiles: list[ProfileSpec], plugins: list[PluginSpec]) -> tuple[str, str, str]:
    names = [p.name for p in profiles]
    handlers = [spec for spec in plugins if spec.kind == "handler"]
    if len(handlers) > 1:
        raise ConfigError(
            "more than one profile handler: " + ", ".join(spec.name for spec in handlers)
        )
    if DEFAULT_PROFILE in names:
        aggregated = DEFAULT_PROFILE
    elif "decode" in names:
        aggregated = "decode"
    else:
        aggregated = names[0]
    prefill_name, decode_name = "prefill", "decode"
    if handlers:
        handler = make_plugin(handlers[0])
        if isinstance(handler, SingleProfileHandler) and len(names) != 1:
            raise ConfigError(
                f"single-profile-handler needs exactly one scheduling profile, got {len(names)}"
            )
        if isinstance(handler, DisaggProfileHandler):
            for key, wanted in (
                ("prefillProfile", handler.prefill_profile),
                ("decodeProfile", handler.decode_profile),
            ):
                if key in handlers[0].parameters and wanted not in names:
                    raise ConfigError(
                        f"disagg-profile-handler: {key} {wanted!r} names no profile; "
                        f"profiles: {', '.join(names)}"
                    )
            prefill_name, decode_name = handler.prefill_profile, handler.decode_profile
    prefill = prefill_name if prefill_name in names else aggregated
    decode = decode_name if decode_name in names else aggregated
    return aggregated, prefill, decode


def parse_config(data: Any) -> EndpointPickerConfig:
    """Validate a config already loaded from YAML/JSON (see the module docstring)."""
    top = _mapping(data, "config")
    _check_keys(top, _TOP_LEVEL, "config")
    api_version = top.get("apiVersion")
    if api_version not in API_VERSIONS:
        raise ConfigError(
            f"apiVersion {api_version!r} is not supported; use one of: {', '.join(API_VERSIONS)}"
        )
    if top.get("kind") != KIND:
        raise ConfigError(f"kind must be {KIND!r}, got {top.get('kind')!r}")
    for section in _IGNORED_SECTIONS:
        if section in top:
            log.warning("EndpointPickerConfig: %r is accepted and ignored by kvpick", section)
    plugins = _parse_plugins(top.get("plugins"))
    by_name = {spec.name: spec for spec in plugins}
    profiles = _parse_profiles(top.get("schedulingProfiles"), by_name)
    if not profiles:
        refs = tuple(
            ProfilePlugin(spec.name)
            for spec in plugins
            if spec.kind in ("scorer", "filter", "picker")
        )
        profiles = [ProfileSpec(DEFAULT_PROFILE, refs)]
    profiles = _ensure_pickers(profiles, plugins)
    aggregated, prefill, decode = _profile_roles(profiles, plugins)
    used = {ref.plugin_ref for profile in profiles for ref in profile.plugins}
    for spec in plugins:
        if spec.kind in ("scorer", "picker") and spec.name not in used:
            log.warning("plugin %r is declared but no profile uses it", spec.name)
    return EndpointPickerConfig(
        api_version=api_version,
        plugins=tuple(plugins),
        profiles=tuple(profiles),
        aggregated_profile=aggregated,
        prefill_profile=prefill,
        decode_profile=decode,
    )


def load_config(text: str) -> EndpointPickerConfig:
    """Parse and validate config text (YAML, or JSON, which is YAML)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config is not valid YAML: {err}") from None
    return parse_config(data)


def load_config_file(path: str | Path) -> EndpointPickerConfig:
    """Read, parse and validate a config file (``--config-file``)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from None
    return load_config(text)


def dump_config(config: EndpointPickerConfig) -> str:
    """The config as YAML text that :func:`load_config` reads back to an equal config."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def with_overrides(
    config: EndpointPickerConfig, overrides: Mapping[str, Any]
) -> EndpointPickerConfig:
    """``config`` with each camelCase parameter in ``overrides`` set on every plugin whose
    type has that parameter. A parameter no plugin of the config takes is a
    :class:`ConfigError` (the flag would otherwise silently do nothing)."""
    if not overrides:
        return config
    data = config.to_dict()
    for key, value in overrides.items():
        hit = False
        for entry in data["plugins"]:
            if key in PLUGIN_TYPES[entry["type"]].parameters:
                entry.setdefault("parameters", {})[key] = value
                hit = True
        if not hit:
            types = ", ".join(sorted({spec.type for spec in config.plugins}))
            raise ConfigError(f"no plugin of this policy takes {key!r} (plugins: {types})")
    return parse_config(data)


# --- presets -----------------------------------------------------------------------------

_HEADER = f"apiVersion: {API_VERSIONS[0]}\nkind: {KIND}\n"

PRESETS: dict[str, str] = {
    "kv-aware": _HEADER
    + """\
# kvpick's default: Dynamo's KV-aware cost over precise (KV-event) overlap and booked load.
plugins:
- type: single-profile-handler
- type: busy-detector          # thresholds unset: never busy until you set one
- type: kv-aware-scorer
  parameters:
    overlapCredit: 1.0
    creditDecay: 0.0
    hostCredit: 0.75
    diskCredit: 0.25
    externalCredit: 0.25
    prefillLoadScale: 1.0
    decodeActiveRequestWeight: 0.0
- type: max-score-picker
  parameters:
    maxNumOfEndpoints: 1
    temperature: 0.0
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: busy-detector
  - pluginRef: kv-aware-scorer
    weight: 1
  - pluginRef: max-score-picker
""",
    "random": _HEADER
    + """\
plugins:
- type: single-profile-handler
- type: random-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: random-picker
""",
    "round-robin": _HEADER
    + """\
plugins:
- type: single-profile-handler
- type: round-robin-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: round-robin-picker
""",
    "least-loaded": _HEADER
    + """\
# Fewest requests booked by kvpick, then fewest booked prefill tokens.
plugins:
- type: single-profile-handler
- type: least-loaded-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: least-loaded-scorer
    weight: 1
  - pluginRef: max-score-picker
""",
    "gaie-default": _HEADER
    + """\
# GAIE's reference EPP defaults. The utilization-detector is in no profile: it only decides
# when sheddable requests are refused.
plugins:
- type: single-profile-handler
- type: utilization-detector
  parameters:
    queueDepthThreshold: 5
    kvCacheUtilThreshold: 0.8
    headroom: 0
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
  parameters:
    blockSizeTokens: 16
    maxPrefixBlocksToMatch: 256
    lruCapacityPerServer: 31250
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: max-score-picker
""",
}


def preset_text(name: str) -> str:
    """The preset's config text, as ``kvpick`` prints it."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown policy {name!r}; presets: {', '.join(PRESETS)}") from None


def preset_config(
    name: str = DEFAULT_POLICY, overrides: Mapping[str, Any] | None = None
) -> EndpointPickerConfig:
    """The preset ``name`` (``--policy``), with flag ``overrides`` applied."""
    return with_overrides(load_config(preset_text(name)), overrides or {})


# --- from command-line options -------------------------------------------------------------


class SchedulerOptions(Protocol):
    """What :func:`scheduler_config` reads from ``kvpick epp``'s options
    (:class:`epp.options.EppOptions`)."""

    config_file: str | None
    config_text: str | None
    policy: str
    max_num_batched_tokens: int
    sources: Mapping[str, str]


_FLAG_PARAMETERS: dict[str, str] = {
    "overlap_credit": "overlapCredit",
    "credit_decay": "creditDecay",
    "host_credit": "hostCredit",
    "disk_credit": "diskCredit",
    "external_credit": "externalCredit",
    "prefill_load_scale": "prefillLoadScale",
    "decode_active_request_weight": "decodeActiveRequestWeight",
    "temperature": "temperature",
    "busy_decode_blocks_frac": "activeDecodeBlocksThreshold",
    "busy_prefill_tokens": "activePrefillTokensThreshold",
    "busy_prefill_tokens_frac": "activePrefillTokensThresholdFrac",
}
"""Option field → the plugin parameter the flag overrides."""


def option_overrides(opts: SchedulerOptions) -> dict[str, Any]:
    """The parameter overrides of the scheduling flags given explicitly (flag or env).

    Flags left at their defaults override nothing, so a config file's own values stand.
    ``--max-num-batched-tokens`` travels with ``--busy-prefill-tokens-frac``, the only
    threshold that needs it.
    """
    overrides = {
        parameter: getattr(opts, name)
        for name, parameter in _FLAG_PARAMETERS.items()
        if name in opts.sources
    }
    if "activePrefillTokensThresholdFrac" in overrides:
        overrides["maxNumBatchedTokens"] = opts.max_num_batched_tokens
    return overrides


def scheduler_config(opts: SchedulerOptions) -> EndpointPickerConfig:
    """The config ``kvpick epp`` runs with: ``--config-text`` or ``--config-file`` when
    given (``--policy`` is then ignored), else the ``--policy`` preset; explicitly given
    scheduling flags are applied as overrides either way (:func:`with_overrides`)."""
    if opts.config_text or opts.config_file:
        if "policy" in opts.sources:
            log.warning("--policy %s is ignored: an EndpointPickerConfig was given", opts.policy)
        base = (
            load_config(opts.config_text)
            if opts.config_text
            else load_config_file(opts.config_file or "")
        )
    else:
        base = load_config(preset_text(opts.policy))
    return with_overrides(base, option_overrides(opts))


def load_scheduler(opts: SchedulerOptions) -> Scheduler:
    """A :class:`~epp.scheduling.scheduler.Scheduler` for ``kvpick epp``'s options
    (:class:`ConfigError` when the config or an override is invalid)."""
    # Imported here: scheduler.py builds on this module.
    from epp.scheduling.scheduler import Scheduler

    return Scheduler(scheduler_config(opts))
