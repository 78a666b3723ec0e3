"""The exposition parser against prometheus_client's reference parser: hypothesis-generated
expositions and a hand-written vLLM 0.33-style dump (model_name and engine labels, DP=2)."""

from __future__ import annotations

import math
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from epp.datalayer.prom_text import Sample, parse

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
LATENCY_BUCKETS = [
    *("0.001", "0.005", "0.01", "0.02", "0.04", "0.06", "0.08", "0.1", "0.25", "0.5"),
    *("0.75", "1.0", "2.5", "5.0", "7.5", "10.0", "20.0", "40.0", "80.0", "160.0"),
    *("640.0", "2560.0", "+Inf"),
]
TOKEN_BUCKETS = [
    *("1.0", "2.0", "5.0", "10.0", "20.0", "50.0", "100.0", "200.0", "500.0", "1000.0"),
    *("2000.0", "5000.0", "+Inf"),
]


def vllm_dump(
    waiting: tuple[int, ...] = (3, 0),
    running: tuple[int, ...] = (12, 7),
    usage: tuple[float, ...] = (0.4375, 0.125),
) -> str:
    """What vLLM 0.33 serves for one model with one engine per dp rank: process and GC
    metrics, per-engine gauges, counters with their ``_created`` samples, the info gauges
    and a dozen latency/token histograms (about 600 lines for two engines)."""
    out = [
        "# HELP python_gc_objects_collected_total Objects collected during gc",
        "# TYPE python_gc_objects_collected_total counter",
        'python_gc_objects_collected_total{generation="0"} 14301.0',
        'python_gc_objects_collected_total{generation="1"} 2250.0',
        'python_gc_objects_collected_total{generation="2"} 581.0',
        "# HELP python_info Python platform information",
        "# TYPE python_info gauge",
        'python_info{implementation="CPython",major="3",minor="12",patchlevel="11",'
        'version="3.12.11"} 1.0',
        "# HELP process_resident_memory_bytes Resident memory size in bytes.",
        "# TYPE process_resident_memory_bytes gauge",
        "process_resident_memory_bytes 4.186898432e+09",
        "# HELP process_open_fds Number of open file descriptors.",
        "# TYPE process_open_fds gauge",
        "process_open_fds 93.0",
    ]
    engines = range(len(waiting))

    def labels(engine: int, extra: str = "") -> str:
        return f'{{{extra}engine="{engine}",model_name="{MODEL}"}}'

    def gauge(name: str, help_text: str, values) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} gauge")
        out.extend(f"{name}{labels(e)} {values[e]!r}" for e in engines)

    def counter(name: str, help_text: str, value: float) -> None:
        out.append(f"# HELP {name}_total {help_text}")
        out.append(f"# TYPE {name}_total counter")
        out.extend(f"{name}_total{labels(e)} {value * (e + 1)!r}" for e in engines)
        out.extend(f"{name}_created{labels(e)} 1.7565012345e+09" for e in engines)

    def histogram(name: str, help_text: str, buckets: list[str]) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} histogram")
        for e in engines:
            for i, le in enumerate(buckets):
                bucket = labels(e, 'le="' + le + '",')
                out.append(f"{name}_bucket{bucket} {float(i * 3 + e)!r}")
            out.append(f"{name}_count{labels(e)} {float(len(buckets) * 3)!r}")
            out.append(f"{name}_sum{labels(e)} 1234.5678")
            out.append(f"{name}_created{labels(e)} 1.7565012345e+09")

    gauge("vllm:num_requests_running", "Number of requests in model execution batches.", running)
    gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", waiting)
    gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", usage)
    out.append("# HELP vllm:lora_requests_info Running stats on lora requests.")
    out.append("# TYPE vllm:lora_requests_info gauge")
    for e in engines:
        out.append(
            'vllm:lora_requests_info{max_lora="4",running_lora_adapters="",'
            f'waiting_lora_adapters="",engine="{e}"}} 1.7565012e+09'
        )
        out.append(
            'vllm:lora_requests_info{max_lora="4",running_lora_adapters="sql-lora,chat",'
            f'waiting_lora_adapters="tools",engine="{e}"}} 1.7565013e+09'
        )
    counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.", 2.0)
    counter("vllm:prompt_tokens", "Number of prefill tokens processed.", 182734.0)
    counter("vllm:generation_tokens", "Number of generation tokens processed.", 99812.0)
    counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of tokens.", 5.0e5)
    counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of tokens.", 3.25e5)
    out.append("# HELP vllm:request_success_total Count of successfully processed requests.")
    out.append("# TYPE vllm:request_success_total counter")
    for e in engines:
        for reason in ("stop", "length", "abort"):
            extra = f'finished_reason="{reason}",'
            out.append(f"vllm:request_success_total{labels(e, extra)} 41.0")
    histogram("vllm:iteration_tokens_total", "Histogram of tokens per engine_step.", TOKEN_BUCKETS)
    for name in ("request_prompt_tokens", "request_generation_tokens", "request_params_n"):
        histogram(f"vllm:{name}", f"Number of {name}.", TOKEN_BUCKETS)
    for name in (
        "time_to_first_token_seconds",
        "inter_token_latency_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
        "request_inference_time_seconds",
        "request_prefill_time_seconds",
        "request_decode_time_seconds",
    ):
        histogram(f"vllm:{name}", f"Histogram of {name}.", LATENCY_BUCKETS)
    out.append("# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig")
    out.append("# TYPE vllm:cache_config_info gauge")
    for e in engines:
        out.append(
            'vllm:cache_config_info{block_size="16",cache_dtype="auto",'
            'calculate_kv_scales="False",cpu_offload_gb="0",enable_prefix_caching="True",'
            f'engine="{e}",gpu_memory_utilization="0.9",is_attention_free="False",'
            'num_cpu_blocks="None",num_gpu_blocks="27368",num_gpu_blocks_override="None",'
            'prefix_caching_hash_algo="sha256_cbor",sliding_window="None",'
            'swap_space="4",swap_space_bytes="4294967296"} 1.0'
        )
    return "\n".join(out) + "\n"


def reference(text: str) -> list[Sample]:
    """prometheus_client's reading of ``text``, flattened to samples in text order."""
    return [
        Sample(s.name, dict(s.labels), float(s.value), s.timestamp)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def same(a: list[Sample], b: list[Sample]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if (x.name, x.labels, x.timestamp) != (y.name, y.labels, y.timestamp):
            return False
        if not (x.value == y.value or (math.isnan(x.value) and math.isnan(y.value))):
            return False
    return True


VLLM_WANTED = frozenset(
    {
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:lora_requests_info",
        "vllm:cache_config_info",
    }
)


def test_vllm_dump_matches_reference_parser():
    text = vllm_dump()
    assert text.count("\n") > 500
    ours = parse(text)
    assert ours.bad_lines == 0
    assert same(ours.samples, reference(text))


def test_vllm_dump_wanted_names_only():
    text = vllm_dump(waiting=(3, 0), running=(12, 7), usage=(0.4375, 0.125))
    result = parse(text, VLLM_WANTED)
    assert result.bad_lines == 0
    assert same(result.samples, [s for s in reference(text) if s.name in VLLM_WANTED])
    by_name: dict[str, list[Sample]] = {}
    for sample in result.samples:
        by_name.setdefault(sample.name, []).append(sample)
    waiting = by_name["vllm:num_requests_waiting"]
    assert [(s.labels["engine"], s.value) for s in waiting] == [("0", 3.0), ("1", 0.0)]
    assert waiting[0].labels["model_name"] == MODEL
    assert [s.value for s in by_name["vllm:kv_cache_usage_perc"]] == [0.4375, 0.125]
    info = by_name["vllm:cache_config_info"][0].labels
    assert (info["block_size"], info["num_gpu_blocks"]) == ("16", "27368")
    assert info["prefix_caching_hash_algo"] == "sha256_cbor"
    lora = by_name["vllm:lora_requests_info"]
    assert len(lora) == 4 and lora[1].labels["running_lora_adapters"] == "sql-lora,chat"


def test_name_prefixes_do_not_match_longer_names():
    text = 'foo_bucket 1\nfoo 2\nfoo:bar 3\nfoo{a="1"} 4\nfoo\t5\nfoo_sum 6\n'
    result = parse(text, frozenset({"foo"}))
    assert [s.value for s in result.samples] == [2.0, 4.0, 5.0]
    assert [s.value for s in parse(text, frozenset({"foo_bucket", "foo_sum"})).samples] == [
        1.0,
        6.0,
    ]


def test_first_and_last_line_without_newline():
    text = "a 1\nb 2"
    assert [s.value for s in parse(text, frozenset({"a", "b"})).samples] == [1.0, 2.0]
    assert [s.name for s in parse("b 2", frozenset({"b"})).samples] == ["b"]


def test_special_values_and_timestamps():
    text = 'a NaN\nb +Inf\nc -Inf 1700000000123\nd{x="1"} 1.5e-3 -5\ne 7\r\n'
    for wanted in (None, frozenset("abcde")):
        samples = parse(text, wanted).samples
        assert math.isnan(samples[0].value)
        assert samples[1].value == math.inf
        assert (samples[2].value, samples[2].timestamp) == (-math.inf, 1700000000.123)
        assert (samples[3].value, samples[3].timestamp) == (0.0015, -0.005)
        assert (samples[4].name, samples[4].value) == ("e", 7.0)


def test_escaped_label_values():
    text = 'm{a="x\\\\y",b="say \\"hi\\"",c="two\\nlines",d="keep\\t",e="}{,=",f=""} 1\n'
    (sample,) = parse(text, frozenset({"m"})).samples
    assert sample.labels == {
        "a": "x\\y",
        "b": 'say "hi"',
        "c": "two\nlines",
        "d": "keep\\t",
        "e": "}{,=",
        "f": "",
    }
    assert same([sample], reference(text))


def test_blank_tolerance():
    text = 'm { a = "1" , b="2", } 3  \n  m{} 4\n\n# just a comment\nm 5\t1000\n'
    for wanted in (None, frozenset({"m"})):
        result = parse(text, wanted)
        assert result.bad_lines == 0
        assert [(s.labels, s.value) for s in result.samples] == [
            ({"a": "1", "b": "2"}, 3.0),
            ({}, 4.0),
            ({}, 5.0),
        ]
        assert result.samples[2].timestamp == 1.0


BAD_LINES = [
    "m",
    "m ",
    "m{} ",
    'm{a="1"}',
    "m{a=1} 2",
    'm{a="1" 2',
    'm{a="1",a="2"} 3',
    'm{a="1"b="2"} 3',
    'm{,a="1"} 3',
    "m 1_000",
    "m one",
    "m 1 2 3",
    "m 1 1.5",
    "m 1 ts",
    'm{1a="x"} 1',
    "m=1",
    "m{",
    'm{a="\\"} 1',
    "# TYPE m",
    "# HELP",
    "# HELP 9bad text",
    "{} 1",
    "9m 1",
    '{__name__="m"} 1',
    "m 1 " + "9" * 5000,
]


@pytest.mark.parametrize("line", BAD_LINES)
def test_bad_lines_are_skipped_and_counted(line):
    text = f"m 1\n{line}\nm 2\n"
    full = parse(text)
    assert [s.value for s in full.samples] == [1.0, 2.0]
    assert full.bad_lines == 1
    wanted = parse(text, frozenset({"m"}))
    assert [s.value for s in wanted.samples] == [1.0, 2.0]
    # The filtered path only looks at lines that start with a wanted name.
    assert wanted.bad_lines == (1 if line.startswith("m") else 0)


def test_indented_text_gives_the_same_samples_filtered():
    text = '  m 1\n\tn 2\nm{a="b"} 3\n \r\nm 4\n'
    full = parse(text)
    assert [s.value for s in full.samples] == [1.0, 2.0, 3.0, 4.0]
    assert [s.value for s in parse(text, frozenset({"m"})).samples] == [1.0, 3.0, 4.0]


@given(st.text())
def test_never_raises(text):
    result = parse(text)
    assert result.bad_lines >= 0
    parse(text, frozenset({"m", "a", "vllm:num_requests_waiting"}))


# -- hypothesis expositions ---------------------------------------------------------------

NAMES = ["m", "m_total", "vllm:num_requests_waiting", "lat_seconds", "lat_seconds_bucket", "_x"]
names = st.sampled_from(NAMES)
label_names = st.sampled_from(["a", "le", "engine", "model_name", "_b", "q9"])
# Pieces of logical label values: every character that needs escaping, characters that
# are special elsewhere in a line, backslash pairs that must survive as text, and metric
# names, which the fast path must not mistake for the start of a sample line.
PIECES = [*'ab0 ,={}"\\\n\té#', "\\n", '\\"', " m ", "m_total 1"]
label_values = st.lists(st.sampled_from(PIECES), max_size=8).map("".join)


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_value(value: float, style: int) -> str:
    if math.isnan(value):
        return ["NaN", "nan"][style % 2]
    if math.isinf(value):
        return ("+Inf" if style % 2 else "Inf") if value > 0 else "-Inf"
    if style == 2 and value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


@st.composite
def sample_lines(draw) -> str:
    name = draw(names)
    labels = draw(st.dictionaries(label_names, label_values, max_size=3))
    blank = draw(st.sampled_from([" ", "\t", "  "]))
    value = draw(st.floats(allow_nan=True, allow_infinity=True))
    text = name
    if labels or draw(st.booleans()):
        escaped = [f'{k}="{escape(v)}"' for k, v in labels.items()]
        trailing = "," if labels and draw(st.booleans()) else ""
        text += "{" + ",".join(escaped) + trailing + "}"
    text += blank + render_value(value, draw(st.integers(0, 2)))
    if draw(st.booleans()):
        text += blank + str(draw(st.integers(-(2**53), 2**53)))
    return text


@st.composite
def expositions(draw) -> str:
    lines: list[str] = []
    for _ in range(draw(st.integers(0, 25))):
        kind = draw(st.integers(0, 9))
        name = draw(names)
        if kind == 0:
            help_text = draw(st.sampled_from(["help", "a b \\\\ c", ""]))
            lines.append(f"# HELP {name} {help_text}")
        elif kind == 1:
            # The reference renames samples of counters whose name lacks _total; real
            # servers declare counters under the _total name or the bare family name.
            typ = draw(st.sampled_from(["gauge", "histogram", "summary", "untyped"]))
            lines.append(f"# TYPE {name} {typ}")
        elif kind == 2:
            lines.append(draw(st.sampled_from(["", "# a comment", "#"])))
        else:
            lines.append(draw(sample_lines()))
    indent = draw(st.sampled_from(["", "", "", " ", "\t"]))
    ending = draw(st.sampled_from(["\n", "\n", "\r\n"]))
    text = ending.join(indent + line if draw(st.booleans()) else line for line in lines)
    if lines and draw(st.booleans()):
        text += ending
    return text


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(expositions())
def test_matches_reference_parser(text):
    result = parse(text)
    assert result.bad_lines == 0, text
    assert same(result.samples, reference(text)), text


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(expositions(), st.sets(names, max_size=3))
def test_wanted_is_a_filter(text, wanted_set):
    wanted = frozenset(wanted_set)
    full = parse(text).samples
    result = parse(text, wanted)
    assert same(result.samples, [s for s in full if s.name in wanted]), text
    # HELP/TYPE lines and label values mention the names too; none of that is a sample line.
    assert result.bad_lines == 0, text


@settings(max_examples=100)
@given(st.lists(st.one_of(sample_lines(), st.sampled_from(BAD_LINES).map(lambda b: "!" + b))))
def test_bad_lines_counted_among_good_ones(lines):
    # "!"-prefixed lines cannot be read; every other line can.
    text = "\n".join(lines)
    result = parse(text)
    assert result.bad_lines == sum(line.startswith("!") for line in lines)
    good = "\n".join(line for line in lines if not line.startswith("!"))
    assert same(result.samples, reference(good))


def test_wanted_parse_is_much_faster_than_full_parse():
    text = vllm_dump()
    rounds = 30

    def best(fn) -> float:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(rounds):
                fn()
            times.append((time.perf_counter() - start) / rounds)
        return min(times)

    wanted = best(lambda: parse(text, VLLM_WANTED))
    full = best(lambda: parse(text))
    # The filtered path does not touch the ~550 histogram and counter lines at all; on a
    # shared CI core it is still comfortably under a millisecond for this dump.
    assert wanted * 5 < full
    assert wanted < 1e-3
