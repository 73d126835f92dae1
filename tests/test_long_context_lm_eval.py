"""The long-context suite as local lm-eval tasks: `--model hf-memlm` gives the suite's own replies and scores
on the same examples (read into memory, asked in a fresh call)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

lm_eval = pytest.importorskip("lm_eval")

from test_long_context import CHAT_TEMPLATE, tiny_model  # noqa: E402

from hf_memlm.data.long_context import MAX_NEW_TOKENS, SUITES, make_long_context_dataset  # noqa: E402
from hf_memlm.evaluation.suite import MEMORY, MEMORY_DISABLED, SuiteSettings, evaluate_suite  # noqa: E402
from hf_memlm.integrations.lm_eval_tasks import DOCUMENT_END, load_examples, tasks_dir  # noqa: E402

TASKS = ["niah_multiquery", "qa2"]
METADATA = {"lengths": [600], "num_examples": 3, "seed": 5}


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from hf_memlm.data import build_tokenizer

    folder = tmp_path_factory.mktemp("memlm")
    tokenizer = build_tokenizer("byte")
    tokenizer.chat_template = CHAT_TEMPLATE
    tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _suite(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    settings = SuiteSettings(
        suites=TASKS, lengths=METADATA["lengths"], num_examples=METADATA["num_examples"], seed=METADATA["seed"]
    )
    return evaluate_suite(model, tokenizer, settings, progress=False)


def test_the_shipped_groups_load_every_task_with_the_suites_examples(model_folder):
    from lm_eval.tasks import TaskManager, get_task_dict
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    metadata = {"pretrained": str(model_folder), "lengths": ["700"], "num_examples": 2, "seed": 3}
    loaded = get_task_dict(
        ["memlm_ruler", "memlm_babilong"],
        TaskManager(include_path=str(tasks_dir()), include_defaults=False, metadata=metadata),
    )
    groups = {group.group: tasks for group, tasks in loaded.items()}
    assert set(groups) == {"memlm_ruler", "memlm_babilong"}
    for suite, tasks in SUITES.items():
        assert list(groups[f"memlm_{suite}"]) == [f"memlm_{suite}_{task}" for task in tasks]
        for task in tasks:
            loaded_task = groups[f"memlm_{suite}"][f"memlm_{suite}_{task}"]
            expected = make_long_context_dataset(task, tokenizer, [700], 2, seed=3).to_list()
            assert loaded_task.dataset["test"].to_list() == expected
            kwargs = loaded_task.config.generation_kwargs
            assert (kwargs["max_gen_toks"], kwargs["until"], kwargs["do_sample"]) == (MAX_NEW_TOKENS[task], [], False)


def test_lm_eval_scores_equal_the_suite_on_the_same_examples(model_folder):
    from lm_eval.tasks import TaskManager

    import hf_memlm.integrations.lm_eval  # noqa: F401  (registers hf-memlm)

    suite = _suite(model_folder)
    # memory changes the replies: lm-eval must read the documents into it to give the same ones
    assert any(a[MEMORY] != a[MEMORY_DISABLED] for a in suite["answers"])
    names = [f"memlm_{'ruler' if task.startswith('niah') else 'babilong'}_{task}" for task in TASKS]
    manager = TaskManager(
        include_path=str(tasks_dir()), include_defaults=False, metadata={"pretrained": str(model_folder), **METADATA}
    )
    results = lm_eval.simple_evaluate(
        model="hf-memlm",
        model_args={"pretrained": str(model_folder), "dtype": "float32"},
        tasks=names,
        task_manager=manager,
        batch_size=2,
        device="cpu",
        log_samples=True,
    )
    for task, name in zip(TASKS, names):
        ours = [a for a in suite["answers"] if a["task"] == task]
        samples = sorted(results["samples"][name], key=lambda s: s["doc_id"])
        assert len(samples) == len(ours) == 3
        for sample, record in zip(samples, ours):
            context = sample["arguments"][0][0]
            assert context == sample["doc"]["document"] + DOCUMENT_END + sample["doc"]["prompt"]
            assert sample["doc"]["answers"] == record["answers"]  # the same examples
            assert sample["filtered_resps"][0] == record[MEMORY]  # the same replies
            assert sample["score"] == pytest.approx(100 * record[f"{MEMORY}_score"])
        row = next(r for r in suite["rows"] if r["task"] == task)
        assert results["results"][name]["score,none"] == pytest.approx(row[MEMORY])


def test_tasks_need_a_tokenizer_and_a_readable_filler(tmp_path):
    with pytest.raises(ValueError, match=r"pass a folder or Hub id as --model_args pretrained="):
        load_examples("qa1")
    with pytest.raises(ValueError, match=r"filler_text='.*nothing.txt' is not a file"):
        load_examples("qa1", tokenizer="anything", filler_text=str(tmp_path / "nothing.txt"))


@pytest.mark.slow
def test_the_documented_command_line(model_folder, tmp_path):
    command = [
        sys.executable,
        "-m",
        "hf_memlm.integrations.lm_eval",
        "--model_args",
        f"pretrained={model_folder},dtype=float32",
        "--tasks",
        "memlm_babilong_qa2",
        "--metadata",
        json.dumps({**METADATA, "lengths": ["600"]}),
        "--device",
        "cpu",
        "--output_path",
        str(tmp_path / "out"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    written = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    suite = next(r for r in _suite(model_folder)["rows"] if r["task"] == "qa2")
    assert written["results"]["memlm_babilong_qa2"]["score,none"] == pytest.approx(suite[MEMORY])
