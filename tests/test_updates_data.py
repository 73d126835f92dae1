"""The fact-update task: entities move over the stream, the question asks for the latest place."""

from __future__ import annotations

import re

import pytest

from hf_memlm.data import TASK_BUILDERS, build_tokenizer, make_update_dataset
from hf_memlm.data.updates import UPDATE_PLACES

STATEMENT = re.compile(r" (\w+) is in the (\w+)\.")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("byte")


def test_the_answer_is_the_latest_move_of_the_person_asked_about(tokenizer):
    dataset = make_update_dataset(tokenizer, 20, segment_length=64, num_segments=9, seed=3)
    for row in dataset:
        text = tokenizer.decode(row["input_ids"])
        moves = [(who, where) for who, where in STATEMENT.findall(text) if who == row["entity"]]
        assert [where for _, where in moves] == row["stale_answers"] + [row["answer"]]
        assert len(moves) == row["num_updates"] and 2 <= row["num_updates"] <= 5
        assert all(a != b for a, b in zip(row["stale_answers"], row["stale_answers"][1:] + [row["answer"]]))
        assert text.endswith(f" Where is {row['entity']}? {row['entity']} is in the {row['answer']}")
        # the loss is on the answer only, and the latest move's place name holds the same tokens
        labelled = [i for i, label in enumerate(row["labels"]) if label != -100]
        start, length = row["answer_start"], row["answer_length"]
        assert labelled == list(range(start, start + length))
        written = row["written_start"]
        assert row["input_ids"][written : written + length] == row["input_ids"][start : start + length]
        assert row["distance_segments"] == start // 64 - written // 64 >= 1
        assert row["update_segments"] == sorted(row["update_segments"])
        assert max(row["update_segments"]) < 8 and len(row["input_ids"]) == 9 * 64


def test_statements_are_never_split_by_a_segment_boundary(tokenizer):
    dataset = make_update_dataset(tokenizer, 10, segment_length=64, num_segments=12, num_entities=4, seed=0)
    for row in dataset:
        text = tokenizer.decode(row["input_ids"])
        for match in STATEMENT.finditer(text):  # bytes = characters for this ASCII text
            assert match.start() // 64 == (match.end() - 1) // 64, match.group()


def test_same_seed_same_data_and_the_task_is_registered(tokenizer):
    first = make_update_dataset(tokenizer, 4, 64, 9, seed=5)
    assert first["input_ids"] == make_update_dataset(tokenizer, 4, 64, 9, seed=5)["input_ids"]
    assert first["input_ids"] != make_update_dataset(tokenizer, 4, 64, 9, seed=6)["input_ids"]
    assert TASK_BUILDERS["update"] is make_update_dataset
    assert set(first["answer"]) <= set(UPDATE_PLACES)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_segments=1), "num_segments=1; the moves need at least one segment before the last"),
        (dict(num_segments=3, num_entities=3, min_updates=5), "15 moves do not fit"),
        (dict(min_updates=4, max_updates=2), "min_updates=4 is more than max_updates=2"),
        (dict(num_entities=9), "num_entities=9 but only 8 entities are given"),
        (dict(places=["kitchen"]), "at least 2 places"),
        (dict(segment_length=16), "a statement takes up to"),
    ],
)
def test_bad_settings_are_named(tokenizer, kwargs, message):
    settings = dict(num_examples=2, segment_length=64, num_segments=9)
    settings.update(kwargs)
    with pytest.raises(ValueError, match=re.escape(message)):
        make_update_dataset(tokenizer, **settings)


def test_cli_eval_update_end_to_end(tokenizer, tmp_path, capsys):
    """`hf-memlm eval --task update` scores the latest place, by distance, with the baselines."""
    import json

    import torch

    import hf_memlm
    from hf_memlm.cli import main
    from hf_memlm.recipes.defaults import tiny_llama_config

    torch.manual_seed(0)
    config = hf_memlm.MemLMConfig(
        text_config=tiny_llama_config(vocab_size=260, hidden_size=32, num_layers=2),
        memory_type="slot",
        memory_layers=[0],
        segment_length=64,
        memory_heads=2,
        num_slots=16,
    )
    hf_memlm.MemLMForCausalLM(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    argv = ["eval", tmp_path / "model", "--task", "update", "--num-examples", 2, "--num-segments", 4, 5]
    argv += ["--task-option", "num_entities=2", "--task-option", "max_updates=3", "--output-dir", tmp_path / "out"]
    assert main([str(a) for a in [*argv, "--no-progress"]]) == 0
    results = json.loads((tmp_path / "out" / "update.json").read_text())
    assert results["task"] == "update" and results["num_examples"] == 4
    for answer in results["answers"]:  # the scored tokens are the latest place
        assert tokenizer.decode(answer["target"]) == answer["answer_text"]
    assert "| distance (segments) |" in capsys.readouterr().out
