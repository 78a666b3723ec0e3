"""Per-engine metric names and the mapping of one scrape to per-dp-rank EndpointMetrics."""

from __future__ import annotations

import math
import pathlib
import random
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from epp.datalayer.engine_metrics import extract, wanted_names
from epp.datalayer.prom_text import Sample, parse
from epp.scheduling.types import EndpointMetrics

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_prom_text import vllm_dump


def scrape(engine: str, text: str, dp_size: int = 1, **kw) -> dict[int, EndpointMetrics]:
    return extract(engine, parse(text, wanted_names(engine)).samples, dp_size, **kw)


def test_names_per_engine_follow_the_spec_table():
    vllm = {
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:lora_requests_info",
        "vllm:cache_config_info",
    }
    assert wanted_names("vllm") == vllm
    assert wanted_names("sim") == vllm
    assert wanted_names("VLLM") == vllm
    assert wanted_names("sglang") == {
        "sglang:num_queue_reqs",
        "sglang:num_running_reqs",
        "sglang:token_usage",
        "sglang:cache_config_info",
        "sglang:page_size",
        "sglang:num_pages",
    }
    assert wanted_names("trtllm") == {
        "trtllm_num_requests_waiting",
        "trtllm_num_requests_running",
        "trtllm_kv_cache_utilization",
        "trtllm_kv_cache_tokens_per_block",
        "trtllm_kv_cache_max_blocks",
    }
    with pytest.raises(ValueError, match="unknown engine"):
        wanted_names("tgi")


def test_vllm_dp_engines_get_their_own_series():
    text = vllm_dump(waiting=(3, 0), running=(12, 7), usage=(0.4375, 0.125))
    result = scrape("vllm", text, dp_size=2, scraped_at=42.5)
    assert set(result) == {0, 1}
    r0, r1 = result[0], result[1]
    assert (r0.waiting, r0.running, r0.kv_usage) == (3, 12, 0.4375)
    assert (r1.waiting, r1.running, r1.kv_usage) == (0, 7, 0.125)
    for m in (r0, r1):
        assert (m.block_size, m.num_blocks) == (16, 27368)
        # Two LoRA label sets per engine: the one with the newer timestamp value wins.
        assert m.running_lora == ("sql-lora", "chat")
        assert m.waiting_lora == ("tools",)
        assert m.max_lora == 4
        assert (m.scraped_at, m.stale) == (42.5, False)


def test_vllm_ranks_beyond_dp_size_are_ignored_and_missing_ranks_left_out():
    text = vllm_dump(waiting=(1, 2, 3), running=(4, 5, 6), usage=(0.1, 0.2, 0.3))
    assert [m.waiting for m in scrape("vllm", text, dp_size=2).values()] == [1, 2]
    two = vllm_dump(waiting=(1, 2), running=(4, 5), usage=(0.1, 0.2))
    # Rank 3 has no series of its own and there is no unlabelled one to fall back on.
    assert set(scrape("vllm", two, dp_size=4)) == {0, 1}


def test_lora_newest_wins_regardless_of_order():
    text = (
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="new",'
        'waiting_lora_adapters=""} 200.0\n'
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="old",'
        'waiting_lora_adapters="x, y ,,"} 100.0\n'
        "vllm:num_requests_waiting 1\n"
    )
    (m,) = scrape("vllm", text).values()
    assert (m.running_lora, m.waiting_lora, m.max_lora) == (("new",), (), 2)
    text = text.replace("200.0", "50.0")
    (m,) = scrape("vllm", text).values()
    assert (m.running_lora, m.waiting_lora) == (("old",), ("x", "y"))


def test_unlabelled_series_apply_to_every_rank():
    text = (
        "vllm:num_requests_waiting 5\n"
        "vllm:num_requests_running 2\n"
        'vllm:num_requests_running{engine="1"} 9\n'
        "vllm:kv_cache_usage_perc 0.5\n"
        'vllm:cache_config_info{block_size="32",num_gpu_blocks="1000"} 1\n'
    )
    result = scrape("vllm", text, dp_size=3)
    assert [(m.waiting, m.running, m.kv_usage) for m in result.values()] == [
        (5, 2, 0.5),
        (5, 9, 0.5),
        (5, 2, 0.5),
    ]
    assert all((m.block_size, m.num_blocks) == (32, 1000) for m in result.values())


def test_single_unlabelled_series_with_dp():
    text = "vllm:num_requests_waiting 4\nvllm:kv_cache_usage_perc 0.25\n"
    result = scrape("vllm", text, dp_size=4)
    assert sorted(result) == [0, 1, 2, 3]
    assert {(m.waiting, m.kv_usage) for m in result.values()} == {(4, 0.25)}


def test_newest_timestamp_wins_and_no_timestamp_counts_as_now():
    text = (
        'vllm:num_requests_waiting{model_name="a"} 1 2000\n'
        'vllm:num_requests_waiting{model_name="b"} 2 1000\n'
    )
    assert scrape("vllm", text)[0].waiting == 1
    assert scrape("vllm", text + 'vllm:num_requests_waiting{model_name="c"} 3\n')[0].waiting == 3
    # Equal (absent) timestamps: the last in the text wins.
    text = "vllm:num_requests_running 1\nvllm:num_requests_running 7\n"
    assert scrape("vllm", text)[0].running == 7


@pytest.mark.parametrize(
    ("waiting", "usage", "expected_waiting", "expected_usage"),
    [
        ("4", "0.3", 4, 0.3),
        ("2.6", "1.7", 3, 1.0),
        ("-1", "-0.2", 0, 0.0),
        ("NaN", "NaN", None, None),
        ("+Inf", "+Inf", None, None),
    ],
)
def test_values_are_validated(waiting, usage, expected_waiting, expected_usage):
    text = f"vllm:num_requests_waiting {waiting}\nvllm:kv_cache_usage_perc {usage}\n"
    result = scrape("vllm", text)
    if expected_waiting is None and expected_usage is None:
        # Nothing usable for the rank at all: left out, so the scraper keeps the last values.
        assert result == {}
        return
    m = result[0]
    # A negative count is unusable too (-1 → default 0 here), a usage is clamped.
    assert m.waiting == expected_waiting
    assert m.kv_usage == expected_usage


def test_unusable_fields_fall_back_to_previous_values():
    previous = {
        0: EndpointMetrics(
            waiting=8,
            running=3,
            kv_usage=0.6,
            block_size=16,
            num_blocks=500,
            running_lora=("a",),
            max_lora=2,
            scraped_at=1.0,
            stale=True,
        )
    }
    text = (
        "vllm:num_requests_waiting -3\nvllm:num_requests_running 5\nvllm:kv_cache_usage_perc NaN\n"
    )
    (m,) = scrape("vllm", text, previous=previous, scraped_at=2.0).values()
    assert (m.waiting, m.running, m.kv_usage) == (8, 5, 0.6)
    assert (m.block_size, m.num_blocks, m.running_lora, m.max_lora) == (16, 500, ("a",), 2)
    assert (m.scraped_at, m.stale) == (2.0, False)


def test_bad_cache_config_labels_are_ignored():
    text = (
        "vllm:num_requests_waiting 0\n"
        'vllm:cache_config_info{block_size="None",num_gpu_blocks="0"} 1\n'
    )
    (m,) = scrape("vllm", text).values()
    assert (m.block_size, m.num_blocks) == (None, None)
    text = text.replace('"None"', '"sixteen"').replace('"0"', '"-5"')
    (m,) = scrape("vllm", text).values()
    assert (m.block_size, m.num_blocks) == (None, None)


def sglang_gauges() -> str:
    """SGLang 0.5.x with --dp 2: every scheduler labels its series with its ranks."""
    values = {
        "sglang:num_running_reqs": (6.0, 2.0),
        "sglang:num_queue_reqs": (1.0, 11.0),
        "sglang:token_usage": (0.21, 0.83),
        "sglang:num_used_tokens": (100.0, 700.0),
    }
    out = []
    for name, per_rank in values.items():
        out.append(f"# HELP {name} {name[7:]}.")
        out.append(f"# TYPE {name} gauge")
        for rank, value in enumerate(per_rank):
            labels = (
                f'dp_rank="{rank}",engine_type="unified",model_name="qwen",'
                'moe_ep_rank="0",pp_rank="0",tp_rank="0"'
            )
            out.append(f"{name}{{{labels}}} {value}")
    return "\n".join(out) + "\n"


SGLANG_HEAD = sglang_gauges()


def test_sglang_separate_page_gauges():
    text = (
        SGLANG_HEAD
        + 'sglang:page_size{model_name="qwen"} 64.0\n'
        + 'sglang:num_pages{model_name="qwen"} 2048.0\n'
    )
    result = scrape("sglang", text, dp_size=2)
    assert [(m.waiting, m.running, m.kv_usage) for m in result.values()] == [
        (1, 6, 0.21),
        (11, 2, 0.83),
    ]
    assert all((m.block_size, m.num_blocks) == (64, 2048) for m in result.values())
    assert all(m.max_lora is None and m.running_lora == () for m in result.values())


def test_sglang_cache_config_info_labels():
    text = SGLANG_HEAD + 'sglang:cache_config_info{num_pages="4096",page_size="1"} 1\n'
    (m,) = scrape("sglang", text, dp_size=1).values()
    assert (m.waiting, m.block_size, m.num_blocks) == (1, 1, 4096)


def test_trtllm_names():
    text = (
        "# TYPE trtllm_num_requests_waiting gauge\n"
        'trtllm_num_requests_waiting{model_name="m"} 7\n'
        'trtllm_num_requests_running{model_name="m"} 3\n'
        'trtllm_kv_cache_utilization{model_name="m"} 0.75\n'
        'trtllm_kv_cache_tokens_per_block{model_name="m"} 32\n'
        'trtllm_kv_cache_max_blocks{model_name="m"} 9000\n'
        "vllm:num_requests_waiting 99\n"
    )
    (m,) = scrape("trtllm", text).values()
    assert (m.waiting, m.running, m.kv_usage, m.block_size, m.num_blocks) == (7, 3, 0.75, 32, 9000)
    # The wrong engine finds none of its names: no ranks at all.
    assert scrape("sglang", text) == {}


def test_sim_reads_vllm_names():
    (m,) = scrape("sim", "vllm:num_requests_running 4\n").values()
    assert m.running == 4


@given(
    st.lists(
        st.tuples(st.integers(0, 500), st.integers(0, 500), st.floats(0, 1)),
        min_size=1,
        max_size=6,
    ),
    st.randoms(use_true_random=False),
)
def test_each_rank_gets_its_own_labelled_values(ranks, rnd: random.Random):
    samples = []
    for rank, (waiting, running, usage) in enumerate(ranks):
        labels = {"engine": str(rank), "model_name": "m"}
        samples += [
            Sample("vllm:num_requests_waiting", labels, float(waiting)),
            Sample("vllm:num_requests_running", labels, float(running)),
            Sample("vllm:kv_cache_usage_perc", labels, usage),
            Sample("vllm:prompt_tokens_total", labels, math.nan),
        ]
    rnd.shuffle(samples)
    result = extract("vllm", samples, len(ranks))
    assert [(m.waiting, m.running, m.kv_usage) for m in result.values()] == ranks
    assert list(result) == list(range(len(ranks)))
