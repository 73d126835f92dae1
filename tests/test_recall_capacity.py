"""Associative recall: the single-token key format the capacity curve relies on, and scripts/recall_capacity.py."""

from __future__ import annotations

import importlib.util
import json
import string
from pathlib import Path

import pytest

from hf_memlm.data import build_tokenizer, make_recall_dataset
from hf_memlm.data.tasks import RECALL_SINGLE_TOKEN_KEYS

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "recall_capacity.py"
L = 64


@pytest.fixture(scope="module")
def byte_tokenizer():
    return build_tokenizer("byte")


@pytest.fixture(scope="module")
def recall_capacity():
    spec = importlib.util.spec_from_file_location("recall_capacity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def single_token_recall(tokenizer, num_pairs, num_segments, write_segments, seed=0, num_examples=4):
    return make_recall_dataset(
        tokenizer,
        num_examples,
        L,
        num_segments,
        num_pairs=num_pairs,
        num_queries=min(num_pairs, 21),
        write_segments=write_segments,
        key_length=1,
        key_alphabet=RECALL_SINGLE_TOKEN_KEYS,
        value_length=1,
        separator="",
        seed=seed,
    )


def test_single_token_keys_sit_right_before_their_values(byte_tokenizer):
    """With separator='' each byte key is the one token before its value, where it is written and where it is
    asked: a memory storing "token j -> token j + 1" can address the pair without a key's context."""
    assert len(RECALL_SINGLE_TOKEN_KEYS) == len(set(RECALL_SINGLE_TOKEN_KEYS)) == 84
    assert not set(RECALL_SINGLE_TOKEN_KEYS) & set(string.digits + " ")
    dataset = single_token_recall(byte_tokenizer, num_pairs=84, num_segments=6, write_segments=4)
    for example in dataset:
        ids = example["input_ids"]
        assert len(ids) == 6 * L
        assert len(set(example["query_keys"])) == len(example["query_keys"]) == 21
        for key, value, start, written in zip(
            example["query_keys"], example["answer"], example["answer_start"], example["written_start"]
        ):
            assert len(key) == len(value) == 1 and value in string.digits
            assert ids[start - 2 : start + 1] == list(f" {key}{value}".encode())  # the query " K" -> "7"
            assert ids[written - 2 : written + 1] == list(f" {key}{value}".encode())  # the pair " K7"
            assert written < 4 * L <= 5 * L <= start  # pairs in the write segments, queries in the last
        assert example["labels"].count(-100) == len(ids) - 21  # the loss is on the values only


def test_single_token_pairs_fill_a_segment_and_change_every_example(byte_tokenizer):
    dataset = single_token_recall(byte_tokenizer, num_pairs=21, num_segments=2, write_segments=1, num_examples=6)
    bindings = [dict(zip(row["query_keys"], row["answer"])) for row in dataset]
    assert all(len(binding) == 21 for binding in bindings)
    assert len({tuple(sorted(binding.items())) for binding in bindings}) == 6  # fresh pairs per example
    with pytest.raises(ValueError, match=r"too many recall pairs for the space: num_pairs=22 .* at most 21 pairs fit"):
        single_token_recall(byte_tokenizer, num_pairs=22, num_segments=2, write_segments=1)


def test_recall_separator_errors(byte_tokenizer):
    with pytest.raises(ValueError, match=r"separator='' needs key_alphabet and value_alphabet without a common .*'1'"):
        make_recall_dataset(byte_tokenizer, 2, L, 3, key_alphabet="ab1", separator="", key_length=3)
    with pytest.raises(ValueError, match="separator must be a string, got None"):
        make_recall_dataset(byte_tokenizer, 2, L, 3, separator=None)
    default = make_recall_dataset(byte_tokenizer, 2, L, 3, num_pairs=4)  # the default format is unchanged
    text = bytes(default[0]["input_ids"]).decode()
    assert all(f" {key}:{value}" in text for key, value in zip(default[0]["query_keys"], default[0]["answer"]))


def test_quick_mode_writes_the_curve(recall_capacity, tmp_path):
    results = recall_capacity.main(["--quick", "--output-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "recall_capacity.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert [run["label"] for run in saved["runs"]] == ["slot, 16 slots", "kv"]
    assert saved["chance"] == pytest.approx(0.1)
    for run in saved["runs"]:
        grid = {(point["pairs"], point["distance"]) for point in run["points"]}
        assert grid == {(1, 1), (4, 1), (1, 2), (4, 2)}
        for point in run["points"]:
            assert 0.0 <= point["memory"] <= 1.0 and 0.0 <= point["memory_disabled"] <= 1.0
            assert point["answers"] == 3 * point["pairs"]  # 3 examples, every pair asked
            assert point["segments_back_min"] == point["segments_back_max"] == point["distance"]
    table = (tmp_path / "recall_capacity.md").read_text()
    assert "| pairs written | slot, 16 slots, 1 later | kv, 1 later | slot, 16 slots, 2 later | kv, 2 later |" in table
    assert (tmp_path / "recall_capacity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_memory_spec_is_refused(recall_capacity, tmp_path):
    with pytest.raises(SystemExit, match=r"--memories: 'slot' is not understood; write slot:<number of slots>"):
        recall_capacity.main(["--quick", "--memories", "slot", "--output-dir", str(tmp_path)])


@pytest.mark.slow
def test_slot_memory_learns_single_token_recall_across_segments(recall_capacity, tmp_path):
    """The curriculum's first phase alone (150 steps, about a minute): 8 pairs read back 4 segments later."""
    argv = ["--memories", "slot:64", "--pairs", "8", "--distances", "4", "--steps", "150", "--easy-steps", "150"]
    results = recall_capacity.main([*argv, "--eval-examples", "20", "--output-dir", str(tmp_path)])
    (point,) = results["runs"][0]["points"]
    assert point["memory"] >= 0.8 and point["memory_disabled"] <= 0.25


def test_two_letter_key_format_of_the_script(recall_capacity, byte_tokenizer):
    """--key-length 2 writes " ab:7": 12 pairs to a segment, the ":" (not a key letter) right before the value."""
    assert recall_capacity.pairs_per_segment(1) == 21 and recall_capacity.pairs_per_segment(2) == 12
    dataset = recall_capacity.recall_data(byte_tokenizer, 3, num_pairs=13, distance=2, seed=0, key_length=2)
    for example in dataset:
        assert len(example["input_ids"]) == (2 + 2) * L  # 13 pairs take 2 write segments, asked 2 segments later
        assert len(example["query_keys"]) == 12
        for key, value, start in zip(example["query_keys"], example["answer"], example["answer_start"]):
            assert len(key) == 2 and key.isalpha() and key.islower()
            assert example["input_ids"][start - 4 : start + 1] == list(f" {key}:{value}".encode())
