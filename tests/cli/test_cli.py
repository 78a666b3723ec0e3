"""The ``kvpick`` command line, run as users run it."""

from __future__ import annotations

import json
import subprocess
import sys

KVPICK = [sys.executable, "-m", "epp.cli"]


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*KVPICK, *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_the_commands_that_exist():
    out = run("--help")
    assert out.returncode == 0
    assert "bench" in out.stdout
    assert "kvpick" in out.stdout


def test_no_command_prints_help_and_fails():
    out = run()
    assert out.returncode == 2
    assert "usage" in out.stdout


def test_an_unknown_flag_is_reported_by_the_command_that_got_it():
    for argv, prog in (
        (["worker", "sim", "--nonsense"], "kvpick worker sim"),
        (["bench", "sim", "--nonsense"], "kvpick bench sim"),
        (["--nonsense"], "kvpick"),
    ):
        out = run(*argv, timeout=60)
        assert out.returncode == 2
        assert f"usage: {prog} " in out.stderr
        assert f"{prog}: error: unrecognized arguments: --nonsense" in out.stderr


def test_bench_index_prints_one_json_object_with_its_figures():
    out = run(
        "bench",
        "index",
        "--workers",
        "4",
        "--blocks-per-worker",
        "512",
        "--queries",
        "50",
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    for key in (
        "ingest_blocks_per_s",
        "ingest_unique_blocks_per_s",
        "query_p50_us",
        "query_p99_us",
        "naive_query_p50_us",
        "speedup_vs_naive",
        "hash_8k_tokens_us",
        "bytes_per_block_traced",
    ):
        assert result[key] > 0, key
    # RSS grows by whole pages, and 2,048 blocks may fit in memory the process already has.
    assert result["bytes_per_block"] >= 0
    assert result["agree_with_naive"] is True
    assert result["workload"]["worker_blocks"] == 4 * 512
    assert set(result["targets"]) == {
        "ingest_blocks_per_s",
        "query_p99_us",
        "speedup_vs_naive",
        "bytes_per_block",
    }
    assert "[bench index]" in out.stderr  # progress goes to stderr


def test_bench_rejects_bad_arguments():
    out = run("bench", "index", "--prompt-tokens", "100")
    assert out.returncode != 0
    assert "multiple of --block-size" in out.stderr


def test_bench_epp_quick_run_reports_every_figure():
    out = run("bench", "epp", "--quick", "--workers", "4", "--streams", "8")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    for key in (
        "added_p50_ms_1k",
        "added_p99_ms_1k",
        "added_p50_ms_8k",
        "added_p99_ms_8k",
        "decisions_per_s",
        "stream_chunks_per_s",
        "bare_grpc_echo_per_s",
        "wire_us_per_chunk",
        "reference_wire_us_per_chunk",
    ):
        assert key in result, key
    # Every figure comes from traffic that really flowed
    assert result["decisions_per_s"] > 0
    assert result["stream_chunks_per_s"] > 0
    assert result["epp_p50_ms_1k"] > 0 and result["direct_p50_ms_1k"] > 0
    assert 0 < result["wire_us_per_chunk"] < result["reference_wire_us_per_chunk"]
    assert 900 <= result["prompt_tokens_1k"] <= 1150
    assert 7500 <= result["prompt_tokens_8k"] <= 9000
    assert set(result["targets"]) == {
        "added_p50_ms_1k",
        "added_p99_ms_1k",
        "decisions_per_s",
        "stream_chunks_per_s",
    }
