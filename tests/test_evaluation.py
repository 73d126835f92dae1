"""Evaluation: teacher-forced retrieval accuracy by distance, the baselines, perplexity by segment, reports, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import kind_settings_only
from datasets import Dataset

import hf_memlm
from hf_memlm.evaluation import (
    bucket_by_segments,
    bucket_by_tokens,
    evaluate_perplexity,
    evaluate_retrieval,
    greedy_answer,
    write_report,
)
from hf_memlm.recipes.defaults import tiny_llama_config

SEGMENT = 8
SEGMENTS = 4
VOCAB = 64


def tiny_model(kind: str = "kv", seed: int = 0, randomized: bool = True, vocab_size: int = VOCAB):
    torch.manual_seed(seed)
    settings = dict(memory_type=kind, memory_layers=[0], segment_length=SEGMENT, memory_heads=2)
    settings.update(memory_size=64, memory_topk=4, num_slots=6)
    config = hf_memlm.MemLMConfig(
        text_config=tiny_llama_config(vocab_size=vocab_size, hidden_size=32, num_layers=2),
        **kind_settings_only(settings),
    )
    model = hf_memlm.MemLMForCausalLM(config).eval()
    if randomized:  # non-zero memory weights (o_proj starts at zero), so memory changes the outputs
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.memory_blocks.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model


def random_ids(length: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def forward_argmax(model, ids: list[int], position: int) -> int:
    """The token one plain forward of the prefix predicts at `position` (independent of the evaluator)."""
    return int(model(torch.tensor([ids[:position]])).logits[0, -1].argmax())


def known_answer_dataset(model, starts, length=3, corrupt=lambda i: i % 2 == 1, fill=None):
    """Answers written as the model's own greedy continuation; `corrupt(i)` examples get a wrong last token.

    `fill(ids, start, length)` makes the answer tokens (default: greedy by plain forwards)."""
    rows = {"input_ids": [], "labels": [], "distance_tokens": [], "distance_segments": []}
    for index, start in enumerate(starts):
        ids = random_ids(SEGMENT * SEGMENTS, seed=100 + index)
        if fill is None:
            for position in range(start, start + length):
                ids[position] = forward_argmax(model, ids, position)
        else:
            ids[start : start + length] = fill(ids, start, length)
        if corrupt(index):
            last = start + length - 1
            ids[last] = 3 + (ids[last] - 3 + 1) % (VOCAB - 3)  # anything but the predicted token
        labels = [-100] * len(ids)
        labels[start : start + length] = ids[start : start + length]
        rows["input_ids"].append(ids)
        rows["labels"].append(labels)
        rows["distance_tokens"].append(start)  # as if the needle sat at position 0
        rows["distance_segments"].append(start // SEGMENT)
    return Dataset.from_dict(rows)


def test_accuracy_on_answers_with_known_outcome():
    """Memory condition: right exactly where the answer is the model's own greedy continuation. Baselines:
    compared with predictions computed here by hand (one plain forward; the base model on its window)."""
    model = tiny_model("kv")
    starts = [25, 17, 29, 9, 20, 13]
    dataset = known_answer_dataset(model, starts)
    results = evaluate_retrieval(model, dataset, batch_size=4, progress=False)

    answers = results["answers"]
    assert [a["exact"]["memory"] for a in answers] == [i % 2 == 0 for i in range(len(starts))]
    assert [a["correct_tokens"]["memory"] for a in answers] == [3 if i % 2 == 0 else 2 for i in range(len(starts))]
    assert results["overall"]["metrics"]["memory"]["exact_match"] == pytest.approx(0.5)
    assert results["overall"]["metrics"]["memory"]["token_accuracy"] == pytest.approx(15 / 18)

    for answer, row in zip(answers, dataset):
        ids, start = row["input_ids"], answer["start"]
        target = torch.tensor(answer["target"])
        with torch.no_grad(), model.memory_disabled():
            disabled = model(torch.tensor([ids])).logits[0, start - 1 : start + 2]
        assert answer["predicted"]["memory_disabled"] == disabled.argmax(-1).tolist()
        assert answer["nll"]["memory_disabled"] == pytest.approx(_nll_sum(disabled, target), rel=1e-5)
        last = start + 2  # one piece (3 <= L/2 answer tokens): the window is the L tokens before the last one
        window_start = last - SEGMENT
        with torch.no_grad():
            base = model.language_model(torch.tensor([ids[window_start:last]])).logits[0, start - 1 - window_start :]
        assert answer["predicted"]["base_model"] == base.argmax(-1).tolist()
        assert answer["nll"]["base_model"] == pytest.approx(_nll_sum(base, target), rel=1e-5)
        expected = sum(p == t for p, t in zip(base.argmax(-1).tolist(), answer["target"]))
        assert answer["correct_tokens"]["base_model"] == expected


def test_base_model_reads_long_answers_in_pieces_of_half_a_window():
    """An answer of 6 tokens with L = 8: pieces of 4 and 2 tokens, each from the 8 tokens before its last."""
    model = tiny_model("kv")
    ids = random_ids(SEGMENT * SEGMENTS, seed=5)
    start, length = 20, 6
    labels = [-100] * len(ids)
    labels[start : start + length] = ids[start : start + length]
    row = {"input_ids": ids, "labels": labels, "distance_tokens": 20, "distance_segments": 2}
    answer = evaluate_retrieval(model, [row], progress=False)["answers"][0]
    expected_nll = 0.0
    for first, last in ((20, 23), (24, 25)):
        with torch.no_grad():
            logits = model.language_model(torch.tensor([ids[last - SEGMENT : last]])).logits[0]
        local = torch.arange(first - 1, last) - (last - SEGMENT)
        expected_nll += _nll_sum(logits[local], torch.tensor(ids[first : last + 1]))
    assert answer["nll"]["base_model"] == pytest.approx(expected_nll, rel=1e-5)
    assert len(answer["predicted"]["base_model"]) == length


def _nll_sum(logits, target) -> float:
    return torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()


@pytest.mark.parametrize("kind", ["kv", "slot"])
def test_teacher_forced_exact_match_equals_greedy_generation(kind):
    """Answers generated by model.generate (prompt read into memory over several segments, answers crossing
    segment boundaries) are exact matches teacher-forced; corrupted ones are not; generate agrees on each."""
    model = tiny_model(kind, seed=1)
    starts = [15, 23, 26, 7]  # 15 and 23 cross a segment boundary (16, 24)

    def generated(ids, start, length):
        return greedy_answer(model, ids, start, length)

    dataset = known_answer_dataset(model, starts, fill=generated, corrupt=lambda i: i in (1, 3))
    results = evaluate_retrieval(model, dataset, batch_size=2, baselines=False, check_generate=4, progress=False)
    assert [a["exact"]["memory"] for a in results["answers"]] == [True, False, True, False]
    check = results["generate_check"]
    assert check["checked"] == 4 and check["agree"] == 4
    assert [r["generated_exact"] for r in check["rows"]] == [True, False, True, False]


def test_memory_disabled_baseline_differs_only_with_nonzero_memory_weights():
    starts = [25, 17, 29, 20]
    for kind in ("kv", "slot"):
        zero = tiny_model(kind, randomized=False)
        dataset = known_answer_dataset(zero, starts)
        metrics = evaluate_retrieval(zero, dataset, progress=False)["overall"]["metrics"]
        # o_proj == 0: the memory read adds nothing, so the two conditions are the same computation
        assert metrics["memory"]["answer_nll"] == pytest.approx(metrics["memory_disabled"]["answer_nll"], abs=1e-6)

        trained_like = tiny_model(kind)
        metrics = evaluate_retrieval(trained_like, dataset, progress=False)["overall"]["metrics"]
        assert abs(metrics["memory"]["answer_nll"] - metrics["memory_disabled"]["answer_nll"]) > 1e-3, kind


def test_batches_of_mixed_lengths_give_the_same_scores():
    """Right-padding shorter examples in a batch (a grid over lengths) changes nothing for the real tokens."""
    model = tiny_model("kv")
    rows = []
    for index, segments in enumerate([2, 4, 3, 4]):
        ids = random_ids(segments * SEGMENT, seed=index)
        labels = [-100] * len(ids)
        labels[-3:] = ids[-3:]
        rows.append({"input_ids": ids, "labels": labels, "distance_tokens": 9, "distance_segments": 1})
    together = evaluate_retrieval(model, rows, batch_size=4, progress=False)["answers"]
    alone = evaluate_retrieval(model, rows, batch_size=1, progress=False)["answers"]
    for a, b in zip(together, alone):
        assert a["predicted"] == b["predicted"]
        for condition in a["nll"]:
            assert a["nll"][condition] == pytest.approx(b["nll"][condition], rel=1e-5, abs=1e-5)


def _answer(distance_tokens, distance_segments, exact, correct=None, length=2):
    correct = length if exact else (correct or 0)
    return {
        "distance_tokens": distance_tokens,
        "distance_segments": distance_segments,
        "length": length,
        "exact": {"memory": exact},
        "correct_tokens": {"memory": correct},
        "nll": {"memory": 1.0 * length},
    }


def test_bucketing_by_distance():
    answers = [
        _answer(5, 0, True),
        _answer(12, 1, True),
        _answer(9, 1, False, correct=1),
        _answer(20, 2, False),
        _answer(31, 3, True),
        _answer(17, 2, True),
    ]
    by_segments = bucket_by_segments(answers, ["memory"])
    assert [b["distance_segments"] for b in by_segments] == [0, 1, 2, 3]
    assert [(b["tokens_min"], b["tokens_max"]) for b in by_segments] == [(5, 5), (9, 12), (17, 20), (31, 31)]
    assert [b["answers"] for b in by_segments] == [1, 2, 2, 1]
    assert [b["metrics"]["memory"]["exact_match"] for b in by_segments] == [1.0, 0.5, 0.5, 1.0]
    assert by_segments[1]["metrics"]["memory"]["token_accuracy"] == pytest.approx(3 / 4)

    by_tokens = bucket_by_tokens(answers, ["memory"], bin_tokens=10)
    assert [(b["tokens_from"], b["tokens_to"], b["answers"]) for b in by_tokens] == [
        (0, 9, 2),
        (10, 19, 2),
        (20, 29, 1),
        (30, 39, 1),
    ]
    assert by_tokens[0]["segments"] == [0, 1]
    with pytest.raises(ValueError, match="must be positive"):
        bucket_by_tokens(answers, ["memory"], bin_tokens=0)


def test_several_answers_per_example_take_their_own_distance():
    """Recall-style: two queried values per example, distances listed per answer."""
    ids = random_ids(SEGMENT * SEGMENTS, seed=7)
    labels = [-100] * len(ids)
    labels[20:22] = ids[20:22]
    labels[28:30] = ids[28:30]
    row = {"input_ids": ids, "labels": labels, "distance_tokens": [14, 25], "distance_segments": [2, 3]}
    results = evaluate_retrieval(tiny_model(), Dataset.from_list([row]), baselines=False, progress=False)
    assert [(a["start"], a["length"], a["distance_tokens"], a["distance_segments"]) for a in results["answers"]] == [
        (20, 2, 14, 2),
        (28, 2, 25, 3),
    ]
    assert [b["distance_segments"] for b in results["by_distance_segments"]] == [2, 3]
    row["distance_tokens"] = [14, 25, 30]
    with pytest.raises(ValueError, match="lists 3 distances but the labels hold 2 answers"):
        evaluate_retrieval(tiny_model(), Dataset.from_list([row]), progress=False)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['distance_segments'\]"):
        evaluate_retrieval(tiny_model(), [{"input_ids": ids, "labels": labels, "distance_tokens": 3}], progress=False)


def test_passkey_chance_level():
    row = {
        "input_ids": random_ids(32, 1),
        "labels": [-100] * 32,
        "distance_tokens": 20,
        "distance_segments": 2,
        "answer": "4821",
    }
    row["labels"][28:32] = row["input_ids"][28:32]
    results = evaluate_retrieval(tiny_model(), [row], baselines=False, task="passkey", progress=False)
    assert results["chance"]["exact_match"] == pytest.approx(1 / 9000)  # 4-digit keys without a leading zero
    assert results["chance"]["token_accuracy"] == pytest.approx(1 / VOCAB)


def test_update_chance_level_is_one_of_the_places():
    """Memory disabled can at best guess one of the places: exact-match chance is 1/8, not V^-tokens."""
    from hf_memlm.evaluation import answer_alphabet

    row = {"input_ids": random_ids(32, 2), "labels": [-100] * 32, "distance_tokens": 20, "distance_segments": 2}
    row["labels"][26:32] = row["input_ids"][26:32]
    row["answer"] = "garden"
    model = tiny_model()
    results = evaluate_retrieval(
        model, [row], baselines=False, task="update", answer_alphabet=answer_alphabet("update", {}), progress=False
    )
    assert results["chance"]["exact_match"] == pytest.approx(1 / 8)
    assert "one of the 8 possible answers" in results["chance"]["note"]
    three = answer_alphabet("update", {"places": ["kitchen", "garden", "cellar"]})
    assert three == ("kitchen", "garden", "cellar")
    results = evaluate_retrieval(model, [row], baselines=False, task="update", answer_alphabet=three, progress=False)
    assert results["chance"]["exact_match"] == pytest.approx(1 / 3)
    assert answer_alphabet("recall", {}) == "0123456789"  # characters, one per answer token: 10^-length


def test_perplexity_by_segment_matches_a_plain_forward():
    model = tiny_model("kv")
    rows = [{"input_ids": random_ids(SEGMENT * SEGMENTS, seed=s)} for s in range(3)]
    results = evaluate_perplexity(model, Dataset.from_list(rows), batch_size=2, progress=False)
    ids = torch.tensor([r["input_ids"] for r in rows])
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(
            model(ids).logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none"
        )  # (3, T-1): position q predicts token q + 1
    segments = results["by_segment"]
    assert [s["tokens"] for s in segments] == [3 * SEGMENT] * (SEGMENTS - 1) + [3 * (SEGMENT - 1)]
    for entry in segments:
        expected = nll[:, entry["segment"] * SEGMENT : (entry["segment"] + 1) * SEGMENT].mean().item()
        assert entry["nll"]["memory"] == pytest.approx(expected, rel=1e-5)
        assert entry["perplexity"]["memory"] == pytest.approx(math.exp(expected), rel=1e-5)
    # kv memory is empty in segment 0, so memory cannot change it; later segments read memory
    assert segments[0]["gap"] == pytest.approx(0.0, abs=1e-6)
    assert all(abs(s["nll"]["memory"] - s["nll"]["memory_disabled"]) > 1e-4 for s in segments[1:])


def test_reports_are_written_and_parse(tmp_path):
    import matplotlib.image

    model = tiny_model("kv")
    dataset = known_answer_dataset(model, [25, 17, 29, 9])
    retrieval = evaluate_retrieval(model, dataset, task="passkey", progress=False)
    perplexity = evaluate_perplexity(model, Dataset.from_list([{"input_ids": random_ids(32, 3)}]), progress=False)
    for results in (retrieval, perplexity):
        paths = write_report(results, tmp_path)
        assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(results))
        image = matplotlib.image.imread(paths["plot"])
        assert image.shape[0] > 200 and image.shape[1] > 400
    table = (tmp_path / "passkey.md").read_text()
    assert (
        "| distance (segments) | distance (tokens) | answers | tokens | with memory | memory disabled "
        "| base model (window) |" in table
    )
    for bucket in retrieval["by_distance_segments"]:
        assert f"| {bucket['distance_segments']} | " in table
    assert "| chance |" in table
    assert (
        "| segment | positions predicted | tokens scored | with memory | memory disabled | gap |"
        in (tmp_path / "perplexity.md").read_text()
    )


def test_reports_record_the_environment_they_were_measured_in(tmp_path):
    """A figure depends on more than its config (torch's CPU kernels changed what the 1M passkey recipe learned):
    the JSON and the Markdown say which torch, transformers, threads, CPU kernels and platform measured it."""
    import platform

    import transformers

    model = tiny_model("kv")
    retrieval = evaluate_retrieval(model, known_answer_dataset(model, [25, 17]), task="passkey", progress=False)
    perplexity = evaluate_perplexity(model, Dataset.from_list([{"input_ids": random_ids(32, 3)}]), progress=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for results in (retrieval, perplexity):
            paths = write_report(results, tmp_path)
            env = json.loads(paths["json"].read_text())["environment"]
            assert env["torch"] == torch.__version__ and env["transformers"] == transformers.__version__
            assert env["torch_threads"] == 2
            assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
            assert env["platform"] == platform.platform() and env["python"] == platform.python_version()
            table = paths["markdown"].read_text()
            assert (
                f"Environment: torch {torch.__version__} ({env['cpu_capability']} kernels, 2 threads), "
                f"transformers {transformers.__version__}, Python {platform.python_version()}, {platform.platform()}"
            ) in table
    finally:
        torch.set_num_threads(threads)
    # results measured elsewhere keep the environment they carry
    carried = dict(retrieval, environment=dict(retrieval["environment"], torch_threads=16, transformers="5.24.0"))
    paths = write_report(carried, tmp_path / "elsewhere")
    assert json.loads(paths["json"].read_text())["environment"]["torch_threads"] == 16
    assert "16 threads), transformers 5.24.0," in paths["markdown"].read_text()


# -- command line ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny kv model with non-zero memory weights, saved with the byte tokenizer (260 ids)."""
    from hf_memlm.data import build_tokenizer

    folder = tmp_path_factory.mktemp("memlm")
    torch.manual_seed(0)
    config = hf_memlm.MemLMConfig(
        text_config=tiny_llama_config(vocab_size=260, hidden_size=32, num_layers=2),
        memory_type="kv",
        memory_layers=[0],
        segment_length=48,
        memory_heads=2,
        memory_size=256,
        memory_topk=8,
    )
    model = hf_memlm.MemLMForCausalLM(config)
    with torch.no_grad():
        for block in model.memory_blocks.values():
            block.mem_out.weight.normal_(std=0.3)
    model.save_pretrained(folder)
    build_tokenizer("byte").save_pretrained(folder)
    return folder


def run_cli(*argv) -> int:
    from hf_memlm.cli import main

    return main(["eval", *map(str, argv)])


def test_cli_eval_passkey_end_to_end(saved_model, tmp_path, capsys):
    out = tmp_path / "report"
    code = run_cli(
        saved_model,
        "--task",
        "passkey",
        "--num-examples",
        3,
        "--num-segments",
        2,
        3,
        "--batch-size",
        4,
        "--check-generate",
        1,
        "--output-dir",
        out,
        "--no-progress",
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| distance (segments) | distance (tokens) | answers | tokens | with memory | memory disabled |" in printed
    results = json.loads((out / "passkey.json").read_text())
    assert results["num_examples"] == 6 and results["data"]["num_segments"] == [2, 3]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(saved_model)
    for answer in results["answers"]:  # the scored tokens are the key
        assert tokenizer.decode(answer["target"]).strip() == answer["answer_text"]
    assert results["chance"]["exact_match"] == pytest.approx(1 / 90000)
    assert results["generate_check"]["agree"] == results["generate_check"]["checked"] == 1
    assert (out / "passkey.md").read_text().startswith("# passkey: kv memory")
    assert (out / "passkey.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_eval_perplexity_end_to_end(saved_model, tmp_path, capsys):
    text = tmp_path / "book.txt"
    text.write_text("It is a truth universally acknowledged. " * 30)  # 1200 bytes: 4 examples of 3 x 48 tokens
    code = run_cli(
        saved_model,
        "--task",
        "perplexity",
        "--data",
        text,
        "--num-segments",
        3,
        "--max-examples",
        2,
        "--output-dir",
        tmp_path / "ppl",
        "--no-progress",
    )
    assert code == 0
    results = json.loads((tmp_path / "ppl" / "perplexity.json").read_text())
    assert results["num_examples"] == 2 and [s["segment"] for s in results["by_segment"]] == [0, 1, 2]
    assert "| segment | positions predicted |" in capsys.readouterr().out


def test_cli_eval_reports_bad_input(saved_model, tmp_path, capsys):
    assert run_cli(tmp_path / "missing", "--task", "passkey", "--output-dir", tmp_path) == 2
    assert "does not exist; pass a folder written by model.save_pretrained()" in capsys.readouterr().err

    plain = tmp_path / "plain"
    tiny_llama_config(hidden_size=32).save_pretrained(plain)
    assert run_cli(plain, "--task", "passkey", "--output-dir", tmp_path) == 2
    assert "holds a 'llama' model, not a memlm model" in capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(empty, "--task", "passkey", "--output-dir", tmp_path) == 2
    assert "has no config.json" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_info:
        run_cli(saved_model, "--task", "summarize", "--output-dir", tmp_path)
    assert exit_info.value.code == 2
    assert "invalid choice: 'summarize'" in capsys.readouterr().err

    assert (
        run_cli(saved_model, "--task", "passkey", "--task-option", "bogus=1", "--output-dir", tmp_path, "--no-progress")
        == 2
    )
    assert "unexpected keyword argument 'bogus'" in capsys.readouterr().err

    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((saved_model / name).read_bytes())
    assert run_cli(no_tokenizer, "--task", "passkey", "--output-dir", tmp_path, "--no-progress") == 2
    assert "no tokenizer could be loaded" in capsys.readouterr().err


def test_cli_eval_memory_settings_are_changed_at_load_time(saved_model, tmp_path):
    out = tmp_path / "report"
    common = ["--task", "passkey", "--num-examples", 2, "--num-segments", 2, "--no-baselines", "--no-progress"]
    assert run_cli(saved_model, *common, "--check-generate", 0, "--output-dir", out, "--memory-size", 1024) == 0
    model = json.loads((out / "passkey.json").read_text())["model"]
    assert (model["memory_size"], model["memory_topk"]) == (1024, 8)  # saved: 256 and 8
    assert run_cli(saved_model, *common, "--check-generate", 0, "--output-dir", out, "--memory-topk", "none") == 0
    model = json.loads((out / "passkey.json").read_text())["model"]
    assert (model["memory_size"], model["memory_topk"]) == (256, None)


def test_cli_eval_checks_paths_and_settings_before_the_work(saved_model, tmp_path, capsys):
    report_file = tmp_path / "report.txt"
    report_file.write_text("keep me")
    assert run_cli(saved_model, "--task", "passkey", "--output-dir", report_file, "--no-progress") == 2
    assert f"--output-dir '{report_file}' is an existing file, not a folder" in capsys.readouterr().err
    assert report_file.read_text() == "keep me"

    assert run_cli(saved_model, "--task", "passkey", "--output-dir", tmp_path / "r", "--memory-size", 4) == 2
    assert "memory_topk=8 is larger than memory_size=4" in capsys.readouterr().err
    assert run_cli(saved_model, "--task", "passkey", "--output-dir", tmp_path / "r", "--memory-size", 0) == 2
    assert "--memory-size=0 must be at least 1" in capsys.readouterr().err

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (no_weights / name).write_bytes((saved_model / name).read_bytes())
    assert run_cli(no_weights, "--task", "passkey", "--output-dir", tmp_path / "r") == 2
    assert "has a config.json but no weights" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
