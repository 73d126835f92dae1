"""Pass keys asked in chat: the training examples, the collator, and the far evaluation's bookkeeping."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import tiny_chat_kv_model

from hf_memlm.data import build_tokenizer, default_text, make_chat_passkey_dataset
from hf_memlm.data.chat_passkey import reply_text
from hf_memlm.evaluation.chat_passkey import (
    ChatPasskeySettings,
    evaluate_chat_passkey,
    first_number,
)
from hf_memlm.evaluation.report import write_report
from hf_memlm.training.collate import LabelledTailCollator

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
SEGMENT = 256  # byte tokens: a named needle takes 56


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = build_tokenizer("byte")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def test_examples_hold_the_document_then_the_chat_question_from_a_segment_start(tokenizer):
    examples = make_chat_passkey_dataset(tokenizer, 40, SEGMENT, 3, seed=0, named_share=0.5, max_needles=3)
    named = 0
    for example in examples:
        start = example["question_start"]
        assert start == 2 * SEGMENT
        ids, labels = example["input_ids"], example["labels"]
        question = tokenizer.decode(ids[start:])
        asked = f" of the {example['key_name']}" if example["key_name"] else ""
        assert question.startswith(f"<user>What is the pass key{asked}?</user>")
        reply = tokenizer.decode([t for t, label in zip(ids, labels) if label != -100])
        # the reply and the end of its turn, as the template writes it, up to the end-of-text token
        assert reply == reply_text(example["answer"], example["key_name"]) + "</assistant>" + tokenizer.eos_token
        document = tokenizer.decode(ids[:start])
        # the key is written once, in its needle, inside the needle's segment
        assert document.count(f"pass key{asked} is {example['answer']}.") == 1
        needle_segment = ids[example["needle_segment"] * SEGMENT : (example["needle_segment"] + 1) * SEGMENT]
        assert example["answer"] in tokenizer.decode(needle_segment)
        assert all(label == -100 for label in labels[: start + example["prompt_length"]])
        named += bool(example["key_name"])
        if example["key_name"]:
            assert document.count("The pass key of the") == example["num_needles"]
    assert 5 < named < 35
    again = make_chat_passkey_dataset(tokenizer, 40, SEGMENT, 3, seed=0, named_share=0.5, max_needles=3)
    assert again["input_ids"] == examples["input_ids"]


def test_min_needles_sets_the_fewest_named_needles_per_document(tokenizer):
    examples = make_chat_passkey_dataset(
        tokenizer, 24, SEGMENT, 3, seed=0, named_share=1.0, min_needles=2, max_needles=3
    )
    assert set(examples["num_needles"]) == {2, 3}
    for example in examples:
        document = tokenizer.decode(example["input_ids"][: example["question_start"]])
        assert document.count("The pass key of the") == example["num_needles"]
    with pytest.raises(ValueError, match=r"min_needles \(4\) must not exceed max_needles \(3\)"):
        make_chat_passkey_dataset(tokenizer, 2, SEGMENT, 3, min_needles=4, max_needles=3)


def test_book_numbers_are_written_over_the_document_and_leave_the_key_once(tokenizer):
    # `numbers`: numbers of 1-5 digits after book phrases (" CHAPTER 83."), over every document, half starting
    # with a digit of the key; a list draws the count per example. The key stays written once, and 0 changes nothing.
    plain = make_chat_passkey_dataset(tokenizer, 40, SEGMENT, 3, seed=0)
    assert make_chat_passkey_dataset(tokenizer, 40, SEGMENT, 3, seed=0, numbers=0)["input_ids"] == plain["input_ids"]
    examples = make_chat_passkey_dataset(tokenizer, 40, SEGMENT, 3, seed=0, numbers=[0, 6])
    counts, key_digit_first = set(), 0
    for example in examples:
        document = tokenizer.decode(example["input_ids"][: example["question_start"]])
        asked = f" of the {example['key_name']}" if example["key_name"] else ""
        assert document.count(f"pass key{asked} is {example['answer']}.") == 1
        written = re.findall(r"(?<! is) (\d{1,5})\.", document)  # every number but the needles' keys
        counts.add(len(written) > 0)
        key_digit_first += sum(number[0] in example["answer"] for number in written)
    assert counts == {True, False}  # some documents got none (count 0 drawn), others some
    assert key_digit_first > 0
    with pytest.raises(ValueError, match="numbers must be a non-negative integer"):
        make_chat_passkey_dataset(tokenizer, 2, SEGMENT, 3, numbers=[-1])


def test_examples_refuse_what_cannot_be_built(tokenizer):
    with pytest.raises(ValueError, match="chat template"):
        make_chat_passkey_dataset(build_tokenizer("byte"), 2, SEGMENT, 3)
    with pytest.raises(ValueError, match="must fit in the last segment"):
        make_chat_passkey_dataset(tokenizer, 2, 64, 3)
    with pytest.raises(ValueError, match="at least 2"):
        make_chat_passkey_dataset(tokenizer, 2, SEGMENT, 1)
    with pytest.raises(ValueError, match="named_share"):
        make_chat_passkey_dataset(tokenizer, 2, SEGMENT, 3, named_share=2.0)


def test_the_collator_pads_right_and_keeps_logits_from_the_first_label(tokenizer):
    examples = make_chat_passkey_dataset(tokenizer, 4, SEGMENT, 3, seed=1, named_share=1.0, max_needles=2)
    batch = LabelledTailCollator(pad_token_id=0)([examples[i] for i in range(4)])
    lengths = [len(example["input_ids"]) for example in examples]
    assert batch["input_ids"].shape == (4, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    first_label = min(example["question_start"] + example["prompt_length"] for example in examples)
    assert batch["logits_to_keep"] == max(lengths) - (first_label - 1)
    assert (batch["labels"][:, :first_label] == -100).all()


def _tiny_model(tokenizer):
    torch.manual_seed(0)
    return tiny_chat_kv_model(tokenizer, SEGMENT, memory_size=8192)


def test_far_evaluation_scores_every_condition_and_writes_its_report(tokenizer, tmp_path):
    model = _tiny_model(tokenizer)
    settings = ChatPasskeySettings(
        distances=[SEGMENT, 4 * SEGMENT],
        num_examples=[3, 2],
        multi_needle_distances=[2 * SEGMENT],
        multi_needle_examples=2,
        base_window=2 * SEGMENT,
        base_beyond_examples=1,
        base_inside_tokens=SEGMENT,
        base_inside_examples=2,
        max_new_tokens=4,
    )
    results = evaluate_chat_passkey(model, tokenizer, default_text(), settings, progress=False)
    rows = {(row["distance"], row["needles"]): row for row in results["rows"]}
    assert set(rows) == {(SEGMENT, 1), (4 * SEGMENT, 1), (2 * SEGMENT, 4)}
    assert rows[(SEGMENT, 1)]["examples"] == 3 and rows[(SEGMENT, 1)]["base_model_examples"] == 1
    assert rows[(2 * SEGMENT, 4)]["base_model"] is None  # the base runs on single needles only
    for row in results["rows"]:
        low, high = row["distance_tokens"]
        assert row["distance"] < low <= high <= row["distance"] + 4 * SEGMENT + 64
        assert 0.0 <= row["memory"] <= 1.0
    assert results["base_inside_window"]["examples"] == 2
    for answer in results["answers"]:
        assert answer["memory_correct"] == (first_number(answer["memory"]) == answer["key"])
        assert len(answer["key"]) == 5
        assert len(answer["other_keys"]) == answer["needles"] - 1 and answer["key"] not in answer["other_keys"]
    paths = write_report(results, tmp_path)
    assert sorted(p.name for p in paths.values()) == ["chat_passkey.json", "chat_passkey.md", "chat_passkey.png"]
    assert json.loads(paths["json"].read_text())["kind"] == "chat_passkey"
    markdown = paths["markdown"].read_text()
    assert "| 4 |" in markdown and "Environment: torch" in markdown and paths["plot"].stat().st_size > 1000


def test_rows_count_the_answers_that_gave_another_needles_key_or_one_digit_wrong():
    from hf_memlm.evaluation.chat_passkey import _rows

    answers = [
        {"distance": 512, "needles": 4, "distance_tokens": 600, "key": "11111", "other_keys": ["22222", "33333"]}
        | {"memory": f"The pass key of the red box is {given}.", "memory_correct": given == "11111"}
        for given in ("11111", "22222", "33333", "11211", "112111", "44444")
    ]
    (row,) = _rows(answers)
    assert row["memory"] == 1 / 6 and row["memory_other_needle"] == 2 / 6
    assert row["memory_one_digit_off"] == 1 / 6  # '11211'; '112111' has another length


def test_first_number_scoring():
    assert first_number("The pass key is 48213.") == "48213"
    assert first_number("It is 4 8 2") == "4"
    assert first_number("no digits") is None


def _saved_model_and_script(tokenizer, tmp_path, script: str, **config):
    """The tiny chat model (with `config` set) and its tokenizer saved to tmp_path/model, a book at
    tmp_path/book.txt, and the module of scripts/`script`.py."""
    import importlib
    import sys
    from pathlib import Path

    model = _tiny_model(tokenizer)
    for name, value in config.items():
        setattr(model.config, name, value)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "book.txt").write_text(default_text()[:20000], encoding="utf-8")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        return model, importlib.import_module(script)
    finally:
        sys.path.pop(0)


def test_the_distances_script_scores_a_saved_chat_model(tokenizer, tmp_path, capsys):
    # scripts/chat_passkey_distances.py: a saved folder, the curve at chosen distances, every miss printed
    model, chat_passkey_distances = _saved_model_and_script(tokenizer, tmp_path, "chat_passkey_distances")
    argv = [str(tmp_path / "model"), "--distances", str(SEGMENT), str(2 * SEGMENT), "--examples", "2"]
    chat_passkey_distances.main([*argv, "--text", str(tmp_path / "book.txt")])
    printed = capsys.readouterr().out
    assert f"key {SEGMENT:,} tokens back: exact match" in printed and f"key {2 * SEGMENT:,} tokens" in printed
    rates = [float(line.split("exact match ")[1].split()[0]) for line in printed.splitlines() if "exact match" in line]
    assert printed.count("missed at") == round(sum(2 * (1 - rate) for rate in rates))  # 2 examples per distance

    # one count per distance, bfloat16: the config's single-needle examples, asked the same way
    output = tmp_path / "curve.json"
    extra = ["--examples", "2", "1", "--dtype", "bfloat16", "--output", str(output)]
    chat_passkey_distances.main([*argv[:-2], *extra, "--text", str(tmp_path / "book.txt")])
    scripted = json.loads(output.read_text())
    assert scripted["dtype"] == "bfloat16" and "torch" in scripted["environment"]
    full = ChatPasskeySettings(
        distances=[SEGMENT, 2 * SEGMENT],
        num_examples=[2, 1],
        multi_needle_distances=[SEGMENT],
        multi_needle_examples=1,
        base_beyond_examples=1,
        base_inside_examples=1,
        max_new_tokens=4,
        seed=1000,
    )
    configured = evaluate_chat_passkey(model, tokenizer, default_text()[:20000], full, progress=False)
    singles = [(a["distance"], a["key"]) for a in configured["answers"] if a["needles"] == 1]
    assert [(a["distance"], a["key"]) for a in scripted["answers"]] == singles

    # through the approximate index, as a user's read of a long document: the setting is recorded with the curve
    book = ["--text", str(tmp_path / "book.txt")]
    chat_passkey_distances.main([*argv, *book, "--search", "auto", "--probes", "7", "--output", str(output)])
    searched = json.loads(output.read_text())
    assert (searched["search"], searched["probes"]) == ("auto", 7)


def test_the_index_recall_script_compares_the_index_with_exact_reads_on_the_reply(tokenizer, tmp_path):
    # scripts/index_recall_on_reads.py: the evaluation's examples, each read searched exactly and through the index
    pytest.importorskip("faiss")
    # the head and 4 segments of haystack: read through the index
    _, index_recall_on_reads = _saved_model_and_script(
        tokenizer, tmp_path, "index_recall_on_reads", memory_search_threshold=SEGMENT
    )
    argv = [str(tmp_path / "model"), "--distance", str(4 * SEGMENT), "--examples", "2", "--probes", "1", "4096"]
    results = index_recall_on_reads.main([*argv, "--text", str(tmp_path / "book.txt"), "--dtype", "float32"])
    one, every = results["figures"][1], results["figures"][4096]
    assert 0 < one["recall_at_k"] <= every["recall_at_k"] <= 1  # every list probed: the exact top-k, ties aside
    assert every["own_best_reads"] == one["own_best_reads"] > 0 and one["own_best_found"] <= every["own_best_found"]


def test_named_needles_in_the_distances_script_and_their_replay_from_a_report(tokenizer, tmp_path, capsys):
    # --needle-distances: the config's multi-needle row; chat_passkey_replay.py finds again, from the report's seed
    # alone, which needle each answer came from (for reports written before answers kept the other keys)
    _, chat_passkey_distances = _saved_model_and_script(tokenizer, tmp_path, "chat_passkey_distances")
    output, book = tmp_path / "curve.json", str(tmp_path / "book.txt")
    argv = [str(tmp_path / "model"), "--distances", str(SEGMENT), "--examples", "2", "--text", book]
    chat_passkey_distances.main(
        [*argv, "--needle-distances", str(SEGMENT), "--needle-examples", "3", "--output", str(output)]
    )
    assert "among 4 named needles (another needle's key: " in capsys.readouterr().out
    report = json.loads(output.read_text())
    named = [a for a in report["answers"] if a["needles"] == 4]
    assert len(named) == 3 and all(len(a["other_keys"]) == 3 for a in named)
    for answer in report["answers"]:
        answer.pop("other_keys")
    output.write_text(json.dumps(report))
    _, replay = _saved_model_and_script(tokenizer, tmp_path / "replay", "chat_passkey_replay")
    replay.main([str(output), "--text", book, "--tokenizer", str(tmp_path / "model")])
    lines = capsys.readouterr().out.splitlines()
    (row,) = [r for r in report["rows"] if r["needles"] == 4]
    right, other = round(3 * row["memory"]), round(3 * row["memory_other_needle"])
    assert (
        lines[-1]
        == f"4 needle(s), {SEGMENT:,} back: 3 examples, {right} right, {other} another needle's key, {3 - right - other} other misses"
    )


def test_the_reading_dtype_auto_is_bfloat16_only_where_it_is_native(monkeypatch):
    from hf_memlm.evaluation.report import reading_dtype
    from hf_memlm.recipes.final_eval import chat_passkey_settings

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for capability, expected in (("AVX512", torch.bfloat16), ("AVX2", torch.float32), ("DEFAULT", torch.float32)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda capability=capability: capability)
        assert reading_dtype("auto") == expected
        section = {"seed": 1, "options": {"dtype": "auto", "distances": [512], "num_examples": [2]}}
        assert chat_passkey_settings(section)[1]["dtype"] == expected  # the config's evaluation.options.dtype
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert reading_dtype("auto") == torch.bfloat16
    assert reading_dtype("float16") == torch.float16
    with pytest.raises(ValueError, match="'int8' is not one of auto, float32"):
        chat_passkey_settings({"seed": 1, "options": {"dtype": "int8"}})


def test_the_distances_script_runs_the_base_model_inside_its_window_alone(tokenizer, tmp_path, capsys):
    # --base-inside-examples without --distances: the base model's own figure (it does not depend on the memory),
    # with no haystack read; neither given is refused
    _, chat_passkey_distances = _saved_model_and_script(tokenizer, tmp_path, "chat_passkey_distances")
    output, book = tmp_path / "inside.json", str(tmp_path / "book.txt")
    argv = [str(tmp_path / "model"), "--text", book, "--output", str(output)]
    chat_passkey_distances.main([*argv, "--base-inside-examples", "2"])
    report = json.loads(output.read_text())
    assert report["answers"] == [] and report["rows"] == []
    inside = report["base_inside_answers"]
    assert len(inside) == 2 and report["base_inside_window"]["examples"] == 2
    assert report["base_inside_window"]["base_model"] == sum(a["base_model_correct"] for a in inside) / 2
    assert "inside its window: exact match" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        chat_passkey_distances.main(argv)
    assert "give --distances, --base-inside-examples or both" in capsys.readouterr().err
