"""EndpointPickerConfig parsing, validation, presets and flag overrides."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from epp.scheduling.config import (
    PLUGIN_TYPES,
    PRESETS,
    ConfigError,
    dump_config,
    load_config,
    load_config_file,
    load_scheduler,
    make_plugin,
    option_overrides,
    preset_config,
    preset_text,
    with_overrides,
)
from epp.scheduling.filters import BusyDetector, UtilizationDetector
from epp.scheduling.pickers import MaxScorePicker
from epp.scheduling.scheduler import Scheduler
from epp.scheduling.scorers import KvAwareScorer, PrefixCacheScorer

HEADER = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"

# Shaped like GAIE's documented examples (specs/epp-protocol.md §10): name-less plugins,
# explicit weights, the sections kvpick ignores.
REFERENCE = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
featureGates: []
saturationDetector:
  queueDepthThreshold: 5
plugins:
- type: single-profile-handler
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
  parameters:
    autoTune: false
    blockSizeTokens: 16
    maxPrefixBlocksToMatch: 256
    lruCapacityPerServer: 31250
- type: max-score-picker
  parameters:
    maxNumOfEndpoints: 1
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
"""


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_parse_build_and_round_trip(name: str) -> None:
    config = preset_config(name)
    Scheduler(config)
    assert load_config(dump_config(config)) == config
    assert preset_text(name).startswith("apiVersion:")


def test_kv_aware_preset_contents() -> None:
    config = preset_config()
    profile = config.profile("default")
    assert [(r.plugin_ref, r.weight) for r in profile.plugins] == [
        ("busy-detector", 1.0),
        ("kv-aware-scorer", 1.0),
        ("max-score-picker", 1.0),
    ]
    scheduler = Scheduler(config)
    assert isinstance(scheduler.plugin("busy-detector"), BusyDetector)
    assert isinstance(scheduler.plugin("kv-aware-scorer"), KvAwareScorer)


def test_gaie_default_keeps_the_detector_out_of_the_profile() -> None:
    config = preset_config("gaie-default")
    refs = {r.plugin_ref: r.weight for r in config.profile("default").plugins}
    assert refs == {
        "queue-scorer": 2.0,
        "kv-cache-utilization-scorer": 2.0,
        "prefix-cache-scorer": 3.0,
        "max-score-picker": 1.0,
    }
    assert config.plugin("utilization-detector").kind == "filter"


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match="kv-aware"):
        preset_config("fastest")


def test_reference_shaped_config(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        config = load_config(REFERENCE)
    assert "featureGates" in caplog.text and "saturationDetector" in caplog.text
    assert [spec.name for spec in config.plugins][:2] == ["single-profile-handler", "queue-scorer"]
    assert config.aggregated_profile == config.prefill_profile == config.decode_profile == "default"
    scheduler = Scheduler(config)
    prefix = scheduler.plugin("prefix-cache-scorer")
    assert isinstance(prefix, PrefixCacheScorer)
    assert prefix.index.block_chars == 64 and prefix.index.capacity == 31_250


def test_llm_d_api_version_accepted() -> None:
    text = REFERENCE.replace("inference.networking.x-k8s.io/v1alpha1", "llm-d.ai/v1alpha1")
    assert load_config(text).api_version == "llm-d.ai/v1alpha1"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "apiVersion: v1\nkind: EndpointPickerConfig\nplugins: [{type: queue-scorer}]\n",
            "apiVersion",
        ),
        (
            "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: Pod\n"
            "plugins: [{type: queue-scorer}]\n",
            "kind",
        ),
        (HEADER + "plugins: []\n", "at least one plugin"),
        (HEADER + "plugins: [{type: queue-scorer}]\nextra: 1\n", "unknown key 'extra'"),
        (
            HEADER + "plugins: [{type: queue-scorer, name: q}, {type: kv-aware-scorer, name: q}]\n",
            "duplicate plugin name",
        ),
        (HEADER + "plugins: [{name: q}]\n", "'type' is required"),
        (HEADER + "plugins: [{type: queue-scorer, weight: 2}]\n", "unknown key 'weight'"),
        ("[1, 2]", "expected a mapping"),
        ("plugins: [", "not valid YAML"),
    ],
)
def test_structural_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(text)


def test_unknown_type_lists_the_known_types() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(HEADER + "plugins:\n- type: session-affinity-scorer\n  name: sticky\n")
    message = str(err.value)
    assert "'sticky'" in message and "session-affinity-scorer" in message
    for known in ("kv-aware-scorer", "max-score-picker", "busy-detector", "prefix-cache-scorer"):
        assert known in message


def test_unknown_plugin_ref() -> None:
    text = HEADER + (
        "plugins: [{type: queue-scorer}]\n"
        "schedulingProfiles:\n- name: default\n  plugins: [{pluginRef: queue}]\n"
    )
    with pytest.raises(ConfigError, match=r"pluginRef 'queue' names no plugin.*queue-scorer"):
        load_config(text)


def test_unknown_parameter_names_plugin_and_parameter() -> None:
    text = HEADER + (
        "plugins:\n- type: kv-aware-scorer\n  name: kv\n  parameters: {overlapWeight: 2}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(text)
    assert "'kv'" in str(err.value) and "'overlapWeight'" in str(err.value)
    assert "overlapCredit" in str(err.value)


@pytest.mark.parametrize(
    ("plugin", "parameters", "message"),
    [
        ("kv-aware-scorer", "{overlapCredit: high}", "overlapCredit"),
        ("kv-aware-scorer", "{hostCredit: -1}", "hostCredit"),
        ("max-score-picker", "{maxNumOfEndpoints: 0}", "maxNumOfEndpoints"),
        ("max-score-picker", "{temperature: true}", "temperature"),
        ("utilization-detector", "{queueDepthThreshold: 0}", "queueDepthThreshold"),
        ("busy-detector", "{activePrefillTokensThresholdFrac: 1.5}", "maxNumBatchedTokens"),
        ("prefix-cache-scorer", "{lruCapacityPerServer: 1.5}", "lruCapacityPerServer"),
    ],
)
def test_bad_parameter_values(plugin: str, parameters: str, message: str) -> None:
    text = HEADER + f"plugins:\n- type: {plugin}\n  parameters: {parameters}\n"
    with pytest.raises(ConfigError, match=message):
        load_config(text)


def test_profile_without_picker_gets_max_score_picker() -> None:
    text = HEADER + (
        "plugins: [{type: queue-scorer}]\n"
        "schedulingProfiles:\n- name: default\n  plugins: [{pluginRef: queue-scorer, weight: 2}]\n"
    )
    config = load_config(text)
    assert [r.plugin_ref for r in config.profile("default").plugins] == [
        "queue-scorer",
        "max-score-picker",
    ]
    assert isinstance(make_plugin(config.plugin("max-score-picker")), MaxScorePicker)


def test_two_pickers_in_a_profile_rejected() -> None:
    text = HEADER + (
        "plugins: [{type: random-picker}, {type: max-score-picker}]\n"
        "schedulingProfiles:\n- name: default\n"
        "  plugins: [{pluginRef: random-picker}, {pluginRef: max-score-picker}]\n"
    )
    with pytest.raises(ConfigError, match="more than one picker"):
        load_config(text)


def test_handler_cannot_be_in_a_profile() -> None:
    text = HEADER + (
        "plugins: [{type: single-profile-handler}]\n"
        "schedulingProfiles:\n- name: default\n  plugins: [{pluginRef: single-profile-handler}]\n"
    )
    with pytest.raises(ConfigError, match="handler plugin"):
        load_config(text)


def test_no_profiles_means_one_default_profile_of_everything() -> None:
    config = load_config(HEADER + "plugins: [{type: busy-detector}, {type: kv-aware-scorer}]\n")
    assert [r.plugin_ref for r in config.profile("default").plugins] == [
        "busy-detector",
        "kv-aware-scorer",
        "max-score-picker",
    ]


def test_disaggregation_profiles() -> None:
    text = HEADER + (
        "plugins: [{type: kv-aware-scorer}, {type: least-loaded-scorer}]\n"
        "schedulingProfiles:\n"
        "- name: prefill\n  plugins: [{pluginRef: kv-aware-scorer}]\n"
        "- name: decode\n  plugins: [{pluginRef: least-loaded-scorer}]\n"
    )
    config = load_config(text)
    assert (config.aggregated_profile, config.prefill_profile, config.decode_profile) == (
        "decode",
        "prefill",
        "decode",
    )
    custom = HEADER + (
        "plugins:\n- type: disagg-profile-handler\n"
        "  parameters: {prefillProfile: p, decodeProfile: d}\n"
        "- type: kv-aware-scorer\n"
        "schedulingProfiles:\n"
        "- name: default\n  plugins: [{pluginRef: kv-aware-scorer}]\n"
        "- name: p\n  plugins: [{pluginRef: kv-aware-scorer}]\n"
        "- name: d\n  plugins: [{pluginRef: kv-aware-scorer}]\n"
    )
    config = load_config(custom)
    assert (config.aggregated_profile, config.prefill_profile, config.decode_profile) == (
        "default",
        "p",
        "d",
    )
    with pytest.raises(ConfigError, match="decodeProfile 'd'"):
        load_config(custom.replace("- name: d\n", "- name: e\n"))


def test_single_profile_handler_needs_one_profile() -> None:
    text = HEADER + (
        "plugins: [{type: single-profile-handler}, {type: queue-scorer}]\n"
        "schedulingProfiles:\n"
        "- name: a\n  plugins: [{pluginRef: queue-scorer}]\n"
        "- name: b\n  plugins: [{pluginRef: queue-scorer}]\n"
    )
    with pytest.raises(ConfigError, match="exactly one"):
        load_config(text)


def test_ignored_plugin_types_accepted(caplog: pytest.LogCaptureFixture) -> None:
    text = HEADER + (
        "plugins:\n- type: openai-parser\n- type: approx-prefix-cache-producer\n"
        "  parameters: {blockSizeTokens: 16}\n- type: prefix-cache-scorer\n"
    )
    with caplog.at_level(logging.WARNING):
        config = load_config(text)
    assert "openai-parser" in caplog.text
    assert [r.plugin_ref for r in config.profile("default").plugins] == [
        "prefix-cache-scorer",
        "max-score-picker",
    ]


def test_overrides_apply_as_parameters() -> None:
    config = preset_config(
        "kv-aware",
        {"temperature": 0.5, "overlapCredit": 0.8, "activePrefillTokensThreshold": 4096},
    )
    assert config.plugin("max-score-picker").parameters["temperature"] == 0.5
    scheduler = Scheduler(config)
    assert scheduler.plugin("max-score-picker").temperature == 0.5
    assert scheduler.plugin("kv-aware-scorer").params.overlap_credit == 0.8
    assert scheduler.plugin("busy-detector").active_prefill_tokens_threshold == 4096
    gaie = Scheduler(preset_config("gaie-default", {"queueDepthThreshold": 10}))
    detector = gaie.plugin("utilization-detector")
    assert isinstance(detector, UtilizationDetector) and detector.queue_depth_threshold == 10


def test_override_no_plugin_takes_is_an_error() -> None:
    with pytest.raises(ConfigError, match="temperature"):
        preset_config("random", {"temperature": 1.0})
    with pytest.raises(ConfigError, match="overlapCredit"):
        preset_config("kv-aware", {"overlapCredit": -1})
    assert with_overrides(preset_config(), {}) == preset_config()


def test_load_config_file(tmp_path: Path) -> None:
    path = tmp_path / "epp.yaml"
    path.write_text(REFERENCE)
    assert load_config_file(path) == load_config(REFERENCE)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config_file(tmp_path / "missing.yaml")


def test_every_type_builds_with_defaults() -> None:
    from epp.scheduling.config import PluginSpec

    for type_name in PLUGIN_TYPES:
        make_plugin(PluginSpec(type_name, type_name))


@dataclass
class Opts:
    """The option fields load_scheduler reads (a stand-in for epp.options.EppOptions)."""

    config_file: str | None = None
    config_text: str | None = None
    policy: str = "kv-aware"
    overlap_credit: float = 1.0
    credit_decay: float = 0.0
    host_credit: float = 0.75
    disk_credit: float = 0.25
    external_credit: float = 0.25
    prefill_load_scale: float = 1.0
    decode_active_request_weight: float = 0.0
    temperature: float = 0.0
    busy_decode_blocks_frac: float | None = None
    busy_prefill_tokens: int | None = None
    busy_prefill_tokens_frac: float | None = None
    max_num_batched_tokens: int = 8192
    sources: Mapping[str, str] = field(default_factory=dict)


def test_only_explicit_flags_override() -> None:
    assert option_overrides(Opts(temperature=0.0)) == {}
    opts = Opts(
        temperature=0.3,
        busy_prefill_tokens_frac=1.5,
        max_num_batched_tokens=2048,
        sources={"temperature": "--temperature", "busy_prefill_tokens_frac": "env X"},
    )
    assert option_overrides(opts) == {
        "temperature": 0.3,
        "activePrefillTokensThresholdFrac": 1.5,
        "maxNumBatchedTokens": 2048,
    }
    busy = load_scheduler(opts).plugin("busy-detector")
    assert isinstance(busy, BusyDetector) and busy.max_num_batched_tokens == 2048


def test_load_scheduler_prefers_a_config_over_the_policy(tmp_path: Path) -> None:
    path = tmp_path / "epp.yaml"
    path.write_text(REFERENCE)
    sched = load_scheduler(Opts(config_file=str(path), policy="random", sources={"policy": "x"}))
    assert sched.config == load_config(REFERENCE)
    text_sched = load_scheduler(Opts(config_text=REFERENCE))
    assert text_sched.config == load_config(REFERENCE)
    assert load_scheduler(Opts(policy="round-robin")).config == preset_config("round-robin")
    with pytest.raises(ConfigError, match="overlapCredit"):
        load_scheduler(
            Opts(config_text=REFERENCE, overlap_credit=0.5, sources={"overlap_credit": "x"})
        )
