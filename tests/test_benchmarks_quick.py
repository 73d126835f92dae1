"""The `--quick` modes of the memory-at-scale benchmarks run, write their JSON, and measure what they say."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _benchmark(name: str):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))  # the scripts import their sibling `common`
    return importlib.import_module(name)


def test_generation_benchmark_quick_generates_with_the_memory_read_through_the_index(tmp_path):
    pytest.importorskip("faiss")
    pytest.importorskip("psutil")
    output = tmp_path / "generation.json"
    _benchmark("bench_generation").main(["--quick", "--threads", "1", "--repeats", "1", "--output", str(output)])
    figures = json.loads(output.read_text())["figures"]
    assert figures["entries_per_row"] == 8191  # 8,192 tokens memorized; the last key waits for its value
    assert figures["reads_use_index"]
    assert figures["kv"]["new_tokens_per_s"] > 0 and figures["base"]["new_tokens_per_s"] > 0
    assert figures["fill_seconds"] > 0 and figures["rss_after_fill_bytes"] > 0


def test_generation_benchmark_rejects_a_non_positive_fill():
    with pytest.raises(ValueError, match="--fill must be a positive number of tokens"):
        _benchmark("bench_generation").main(["--quick", "--fill", "-5"])


def test_index_scale_benchmark_quick_measures_recall_of_the_index(tmp_path):
    pytest.importorskip("faiss")
    pytest.importorskip("psutil")
    output = tmp_path / "index_scale.json"
    _benchmark("bench_index_scale").main(["--quick", "--threads", "1", "--output", str(output)])
    figures = json.loads(output.read_text())["figures"]
    assert figures["entries_per_row"] == 16383 and figures["uses_index"]
    assert figures["recall_at_k"] >= 0.95
    assert figures["search_ms_per_query_single"] > 0 and figures["write_seconds_total"] > 0


def test_index_scale_benchmark_rejects_entries_that_are_not_whole_segments():
    with pytest.raises(ValueError, match="--entries must be a positive multiple of the segment length 64"):
        _benchmark("bench_index_scale").main(["--quick", "--entries", "1000"])


def test_streaming_benchmark_quick_times_both_streams_and_measures_the_index_recall(tmp_path):
    pytest.importorskip("faiss")
    pytest.importorskip("psutil")
    output = tmp_path / "streaming.json"
    # 160 segments of 32 tokens: past the default threshold (4,096 entries), so the long stream's reads use the index
    argv = ["--quick", "--threads", "1", "--long", "160", "--short", "4", "--output", str(output)]
    _benchmark("bench_streaming").main(argv)
    figures = json.loads(output.read_text())["figures"]
    assert figures["entries_per_row_after_long"] == 160 * 32 - 1
    assert figures["short_us_per_token"] > 0 and figures["long_us_per_token"] > 0
    assert figures["index_recall_at_k_after_long"] >= 0.95


def test_overhead_benchmark_quick_reports_every_ratio(tmp_path):
    pytest.importorskip("psutil")
    output = tmp_path / "overhead.json"
    _benchmark("bench_overhead").main(["--quick", "--threads", "1", "--repeats", "1", "--output", str(output)])
    figures = json.loads(output.read_text())["figures"]
    for mode in ("inference", "training"):
        for kind in ("kv", "slot"):
            assert figures[mode][kind]["ratio_vs_base"] > 0 and figures[mode][kind]["cpu_ratio_vs_base"] > 0


@pytest.mark.parametrize("script", ["bench_overhead", "bench_generation", "bench_streaming"])
def test_benchmarks_take_another_base_size_and_refuse_a_bad_one(tmp_path, script):
    pytest.importorskip("psutil")
    output = tmp_path / "figures.json"
    extra = ["--kinds", "kv", "--no-training"] if script == "bench_overhead" else []
    argv = ["--quick", "--threads", "1", "--repeats", "1", "--hidden", "32", "--layers", "3", *extra]
    _benchmark(script).main([*argv, "--output", str(output)])
    assert json.loads(output.read_text())["setting"]["base"] == "llama hidden 32, 3 layers"
    for bad in (["--hidden", "30"], ["--hidden", "0"], ["--layers", "0"]):
        with pytest.raises(ValueError, match="--hidden must be a positive multiple of 4"):
            _benchmark(script).main(["--quick", *bad, "--output", str(tmp_path / "refused.json")])
    assert not (tmp_path / "refused.json").exists()


def test_memory_bytes_benchmark_quick_halves_kv_bytes_in_16_bit_storage_and_quarters_them_in_8(tmp_path):
    pytest.importorskip("psutil")
    output = tmp_path / "memory_bytes.json"
    _benchmark("bench_memory_bytes").main(["--quick", "--output", str(output)])
    rows = {(row["memory"], row["memory_dtype"]): row for row in json.loads(output.read_text())["bytes"]}
    full = rows[("kv", "float32")]["bytes_per_token"]
    # a key and a value per head in 2 (1) bytes instead of 4, plus one byte of validity per entry
    for half in ("float16", "bfloat16"):
        assert rows[("kv", half)]["bytes_per_token"] == pytest.approx(full / 2 + 0.5)
    assert rows[("kv", "float8_e4m3fn")]["bytes_per_token"] == pytest.approx(full / 4 + 0.75)


def test_retrieval_benchmark_quick_reads_through_the_index_past_the_threshold(tmp_path):
    pytest.importorskip("faiss")
    pytest.importorskip("psutil")
    output = tmp_path / "retrieval.json"
    _benchmark("bench_retrieval").main(["--quick", "--output", str(output)])
    rows = json.loads(output.read_text())["rows"]
    assert any(row["uses_index"] for row in rows) and not all(row["uses_index"] for row in rows)
    assert all(row["recall_at_k"] >= 0.95 for row in rows)


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_read_block_benchmark_quick_times_every_segment(tmp_path, mode):
    pytest.importorskip("psutil")
    output = tmp_path / "read_block.json"
    _benchmark("bench_read_block").main(
        ["--quick", "--output", str(output)] + (["--training"] if mode == "training" else [])
    )
    payload = json.loads(output.read_text())
    assert payload["setting"]["mode"].startswith(mode)
    figures = payload["figures"]
    assert [row["segment"] for row in figures["segments"]] == [1, 2, 3, 4]
    assert (
        figures["segments"][0]["read_ms"] < figures["segments"][-1]["read_ms"]
    )  # the first read is of an empty memory
    assert figures["block_total_ms"] > 0 and figures["base_segment_ms"] > 0


def test_streaming_benchmark_streams_a_text_file_and_refuses_a_short_one(tmp_path):
    pytest.importorskip("psutil")
    text = tmp_path / "book.txt"
    text.write_text("It was the best of times, it was the worst of times. " * 40)  # 2,120 bytes
    output = tmp_path / "streaming.json"
    argv = ["--quick", "--threads", "1", "--long", "64", "--short", "4", "--text", str(text), "--output", str(output)]
    _benchmark("bench_streaming").main(argv)
    payload = json.loads(output.read_text())
    assert payload["setting"]["text"] == str(text)
    assert payload["figures"]["entries_per_row_after_long"] == 64 * 32 - 1
    with pytest.raises(ValueError, match="holds 2120 bytes; the long stream needs 4096"):
        _benchmark("bench_streaming").main(["--quick", "--long", "128", "--text", str(text)])


def test_index_settings_benchmark_quick_measures_every_setting(tmp_path):
    pytest.importorskip("faiss")
    output = tmp_path / "index_settings.json"
    _benchmark("bench_index_settings").main(["--quick", "--threads", "1", "--repeats", "1", "--output", str(output)])
    figures = json.loads(output.read_text())["figures"]
    assert len(figures["settings"]) == len(_benchmark("bench_index_settings").SETTINGS)
    assert all(0.0 <= row["recall_at_k"] <= 1.0 and row["search_ms"] > 0 for row in figures["settings"])
    # probing every list of a small index finds the exact top-k (up to ties between equal scores)
    assert all(row["recall_at_k"] >= 0.99 for row in figures["settings"] if row["probes"] >= row["lists"])
    assert figures["exact_ms_at_short_stream"] > 0


def test_index_settings_benchmark_takes_settings_and_refuses_malformed_ones(tmp_path):
    pytest.importorskip("faiss")
    output = tmp_path / "index_settings.json"
    argv = ["--quick", "--threads", "1", "--repeats", "1", "--output", str(output)]
    _benchmark("bench_index_settings").main([*argv, "--settings", "256/4/1.0/4/4", "256/256/0.5/8/6"])
    rows = json.loads(output.read_text())["figures"]["settings"]
    assert [(row["probes"], row["kmeans_points_per_list"], row["kmeans_iterations"]) for row in rows] == [
        (4, 4, 4),
        (256, 8, 6),
    ]
    for bad in ("1024/32/1.0/4", "1024/32/1.5/4/4", "1024/x/1.0/4/4", "0/32/1.0/4/4"):
        with pytest.raises(ValueError, match=r"LISTS/PROBES/SHARE/POINTS/ITERATIONS|counts must be positive"):
            _benchmark("bench_index_settings").main(
                ["--quick", "--settings", bad, "--output", str(tmp_path / "bad.json")]
            )
    assert not (tmp_path / "bad.json").exists()


def test_real_model_benchmark_quick_reads_a_book_in_chunks_and_times_every_figure(tmp_path):
    output = tmp_path / "real_model.json"
    argv = [
        "--quick",
        "--threads",
        "1",
        "--repeats",
        "1",
        "--tokens",
        "3000",
        "--chunk",
        "1024",
        "--prompt-tokens",
        "16",
        "40",
        "--output",
        str(output),
    ]
    _benchmark("bench_real_model").main(argv)
    payload = json.loads(output.read_text())
    figures = payload["figures"]
    assert len(figures["long_read"]["chunk_seconds"]) == 3  # 1,024 + 1,024 + 952 tokens, one memorize call each
    assert figures["long_read"]["tokens"] == 3000 and figures["long_read"]["peak_rss_bytes"] > 0
    assert figures["long_read"]["cost_ratio_last_vs_first_quarter"] > 0
    assert set(figures["memorize_tokens_per_s_by_dtype"]) == {"float32", "bfloat16"}
    by_prompt = figures["generation_by_prompt_tokens"]
    assert set(by_prompt) == {"16", "40"}  # 40 tokens: more than the quick model's 32-token segment
    assert figures["generation"] == by_prompt["16"]  # the first prompt is the headline figure
    for length, generation in by_prompt.items():
        assert generation["prompt_tokens"] == int(length)
        assert generation["new_token_ratio_vs_base"] > 0 and generation["ratio_vs_base"] > 0
        assert generation["prompt_time_ratio"] > 0 and generation["new_tokens_per_s"]["memory"] > 0
    assert figures["inference_ratio_vs_segmented_base"] > 0 and figures["training_step_ratio_vs_segmented_base"] > 0
    assert payload["setting"]["memory"]["memory_topk"] == 4  # the real-model pass-key config's read


def test_real_model_benchmark_times_generation_for_each_number_of_lists_searched(tmp_path):
    pytest.importorskip("faiss")
    output = tmp_path / "real_model.json"
    argv = ["--quick", "--threads", "1", "--repeats", "1", "--tokens", "6144", "--chunk", "2048"]
    _benchmark("bench_real_model").main([*argv, "--search", "auto", "--probes", "1", "8", "--output", str(output)])
    payload = json.loads(output.read_text())
    assert payload["setting"]["reads_use_index"]
    by_probes = payload["figures"]["generation_by_probes"]
    assert set(by_probes) == {"1", "8"} and all(g["ratio_vs_base"] > 0 for g in by_probes.values())
    assert payload["figures"]["generation"] == by_probes["1"]  # the first setting is the headline figure


def test_real_model_benchmark_refuses_a_new_token_figure_it_cannot_measure(tmp_path):
    output = tmp_path / "real_model.json"
    for bad in (["--new-tokens", "1"], ["--prompt-tokens", "0"]):
        with pytest.raises(ValueError, match="--new-tokens must be at least 2"):
            _benchmark("bench_real_model").main(["--quick", *bad, "--output", str(output)])
    assert not output.exists()


def test_the_flat_cost_compares_the_last_quarter_of_a_read_with_its_first_leaving_out_the_first_chunk():
    flat_cost = _benchmark("bench_real_model").flat_cost
    assert flat_cost([9.0, 1.0, 1.0, 1.0, 2.0]) == 2.0  # the first chunk's one-off cost does not count
    assert flat_cost([5.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]) == 1.0
    assert flat_cost([1.0, 1.0]) is None


def test_real_model_benchmark_rejects_a_non_positive_read():
    with pytest.raises(ValueError, match="--tokens and --chunk must be positive"):
        _benchmark("bench_real_model").main(["--quick", "--tokens", "0"])


def test_memory_layer_benchmark_quick_times_each_layer_on_the_same_tokens(tmp_path):
    output = tmp_path / "memory_layer.json"
    argv = ["--quick", "--threads", "1", "--repeats", "1", "--layers", "0", "3", "--head-dims", "8", "16"]
    _benchmark("bench_memory_layer").main([*argv, "--output", str(output)])
    payload = json.loads(output.read_text())
    speeds = payload["figures"]["memorize_tokens_per_s"]
    assert set(speeds) == {"0 x 8", "0 x 16", "3 x 8", "3 x 16"} and all(speed > 0 for speed in speeds.values())
    assert payload["setting"]["tokens"] == 1024 and "| 3 | 2 x 16 | 4 |" in payload["table"]


def test_memory_layer_benchmark_rejects_a_layer_the_base_does_not_have():
    with pytest.raises(ValueError, match=r"--layers within 0\.\.3"):
        _benchmark("bench_memory_layer").main(["--quick", "--layers", "4"])
