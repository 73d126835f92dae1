"""lm-evaluation-harness: the `hf-memlm` model type scores what our own evaluation scores, whole contexts
included, whatever the batch size."""

from __future__ import annotations

import json
import random

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

import hf_memlm  # noqa: E402
from hf_memlm.data import build_tokenizer  # noqa: E402
from hf_memlm.recipes.defaults import tiny_llama_config  # noqa: E402

SEGMENT = 16
WINDOW = 32  # the base model's max_position_embeddings: what lm-eval's `hf` model truncates contexts to


@pytest.fixture(scope="module")
def memory_model_folder(tmp_path_factory):
    """A tiny kv memory LM whose memory changes its outputs (random memory weights), with a byte tokenizer."""
    folder = tmp_path_factory.mktemp("memlm")
    torch.manual_seed(0)
    config = hf_memlm.MemLMConfig(
        text_config=tiny_llama_config(hidden_size=32, max_positions=WINDOW),
        memory_type="kv",
        memory_layers=[0],
        segment_length=SEGMENT,
        memory_heads=2,
        memory_size=512,
        memory_topk=8,
    )
    model = hf_memlm.MemLMForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.memory_blocks.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model.save_pretrained(folder)
    build_tokenizer("byte").save_pretrained(folder)
    return folder


def _examples(count=6, seed=0):
    rng = random.Random(seed)
    words = "the key is kept in a small box under the old stairs near the garden door".split()
    examples = []
    for _ in range(count):
        key = "".join(rng.choice("0123456789") for _ in range(5))
        filler = " ".join(rng.choice(words) for _ in range(rng.randint(20, 40)))
        examples.append({"context": f"The pass key is {key}. {filler}. The pass key is", "answer": key})
    return examples


def _our_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log-probabilities of `continuation` after `context`, the whole text through the model."""
    context_ids = tokenizer(context)["input_ids"]
    ids = torch.tensor([context_ids + tokenizer(continuation)["input_ids"]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    scored = logprobs.gather(-1, targets[:, None])[:, 0]
    return scored[len(context_ids) - 1 :].sum().item()


def _task_folder(tmp_path, examples):
    data = tmp_path / "passkey.jsonl"
    data.write_text("".join(json.dumps(example) + "\n" for example in examples))
    (tmp_path / "memlm_passkey.yaml").write_text(
        "\n".join(
            [
                "task: memlm_passkey_local",
                "dataset_path: json",
                "dataset_kwargs:",
                f"  data_files: {{test: {json.dumps(str(data))}}}",
                "test_split: test",
                "output_type: loglikelihood",
                'doc_to_text: "{{context}}"',
                'doc_to_target: "{{answer}}"',
                "metric_list:",
                "  - metric: acc",
                "  - metric: perplexity",
            ]
        )
        + "\n"
    )
    return tmp_path


@pytest.mark.slow
def test_lm_eval_loglikelihood_equals_our_evaluation_on_a_local_task(memory_model_folder, tmp_path):
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_memlm.integrations.lm_eval  # noqa: F401  (registers hf-memlm)

    examples = _examples()
    model = AutoModelForCausalLM.from_pretrained(memory_model_folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(memory_model_folder)
    assert all(len(tokenizer(e["context"])["input_ids"]) > 3 * WINDOW for e in examples)  # memory is needed

    task_manager = TaskManager(include_path=str(_task_folder(tmp_path, examples)))
    scores = {}
    for model_type, batch_size in (("hf-memlm", 1), ("hf-memlm", 4), ("hf", 4)):
        results = lm_eval.simple_evaluate(
            model=model_type,
            model_args={"pretrained": str(memory_model_folder), "dtype": "float32"},
            tasks=["memlm_passkey_local"],
            task_manager=task_manager,
            batch_size=batch_size,
            device="cpu",
            log_samples=True,
        )
        samples = sorted(results["samples"]["memlm_passkey_local"], key=lambda s: s["doc_id"])
        scores[model_type, batch_size] = [sample["filtered_resps"][0][0] for sample in samples]
        requests = [
            tuple(sample["arguments"][0]) for sample in samples
        ]  # (context, continuation) as lm-eval built them

    assert [context for context, _ in requests] == [e["context"] for e in examples]
    expected = [_our_loglikelihood(model, tokenizer, context, continuation) for context, continuation in requests]

    for batch_size in (1, 4):
        got = scores["hf-memlm", batch_size]
        assert got == pytest.approx(expected, abs=1e-3), (batch_size, got, expected)
    # lm-eval's plain `hf` model keeps only the last WINDOW tokens: not what the memory model computes
    assert scores["hf", 4] != pytest.approx(expected, abs=1e-3)


def _instances(request_type, arguments):
    from lm_eval.api.instance import Instance

    return [
        Instance(request_type=request_type, doc={}, arguments=args, idx=0, metadata=("t", i, 1))
        for i, args in enumerate(arguments)
    ]


def test_hf_memlm_keeps_whole_contexts_and_does_not_depend_on_batch_size(memory_model_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_memlm.integrations.lm_eval import MemLMEvalModel

    examples = _examples(5, seed=1)
    model = AutoModelForCausalLM.from_pretrained(memory_model_folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(memory_model_folder)
    expected = [_our_loglikelihood(model, tokenizer, e["context"], " " + e["answer"]) for e in examples]
    pairs = [(e["context"], " " + e["answer"]) for e in examples]
    generations = {}
    for batch_size in (1, 3):
        lm = MemLMEvalModel(pretrained=str(memory_model_folder), batch_size=batch_size, device="cpu", dtype="float32")
        scores = [score for score, _ in lm.loglikelihood(_instances("loglikelihood", pairs), disable_tqdm=True)]
        assert scores == pytest.approx(expected, abs=1e-3), batch_size
        requests = _instances(
            "generate_until", [(e["context"], {"until": ["\n"], "max_gen_toks": 6}) for e in examples]
        )
        generations[batch_size] = lm.generate_until(requests, disable_tqdm=True)
    assert generations[1] == generations[3]
    # each continuation is what the model generates for that context alone
    ids = torch.tensor([tokenizer(examples[0]["context"])["input_ids"]])
    with torch.no_grad():
        alone = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert generations[3][0] == tokenizer.decode(alone[0, ids.shape[1] :]).split("\n")[0]


def test_hf_memlm_checks_its_arguments(memory_model_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_memlm.integrations.lm_eval import MemLMEvalModel

    with pytest.raises(ValueError, match=r"batch_size='auto' is not supported"):
        MemLMEvalModel(pretrained=str(memory_model_folder), batch_size="auto")
    with pytest.raises(ValueError, match=r"max_length=0 must be a positive number"):
        MemLMEvalModel(pretrained=str(memory_model_folder), max_length=0)
    plain = tmp_path / "plain"
    AutoModelForCausalLM.from_config(tiny_llama_config(hidden_size=32)).save_pretrained(plain)
    build_tokenizer("byte").save_pretrained(plain)
    with pytest.raises(ValueError, match=r"not an hf_memlm model; use lm-eval's `hf` model type"):
        MemLMEvalModel(pretrained=str(plain), device="cpu")
    lm = MemLMEvalModel(pretrained=str(memory_model_folder), max_length=100, device="cpu")
    assert lm.max_length == 100


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--tasks", "x"], ["--model", "hf-memlm", "--tasks", "x", "--include_path", "TASKS"]),
        (["run", "--tasks", "x"], ["run", "--model", "hf-memlm", "--tasks", "x", "--include_path", "TASKS"]),
        (["--model", "hf", "--tasks", "x"], ["--model", "hf", "--tasks", "x", "--include_path", "TASKS"]),
        (["--tasks", "x", "--include_path", "mine"], ["--model", "hf-memlm", "--tasks", "x", "--include_path", "mine"]),
        (["ls", "tasks"], ["ls", "tasks"]),
        (["--help"], ["--help"]),
    ],
)
def test_command_line_defaults_to_the_memory_model_type(monkeypatch, argv, expected):
    import lm_eval.__main__

    from hf_memlm.integrations import lm_eval as integration

    seen = []
    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: seen.append(list(integration.sys.argv[1:])))
    monkeypatch.setattr(integration.sys, "argv", ["prog"])
    integration.main(argv)
    # runs find the memlm long-context tasks (hf_memlm/resources/lm_eval_tasks) unless given a folder
    assert seen == [[str(integration.tasks_dir()) if arg == "TASKS" else arg for arg in expected]]


@pytest.mark.slow
def test_the_documented_command_line(memory_model_folder, tmp_path):
    import subprocess
    import sys

    examples = _examples(3)
    (tmp_path / "tasks").mkdir()
    tasks = _task_folder(tmp_path / "tasks", examples)
    command = [
        sys.executable,
        "-m",
        "hf_memlm.integrations.lm_eval",
        "--model_args",
        f"pretrained={memory_model_folder},dtype=float32",
        "--tasks",
        "memlm_passkey_local",
        "--include_path",
        str(tasks),
        "--batch_size",
        "2",
        "--device",
        "cpu",
        "--output_path",
        str(tmp_path / "out"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "hf-memlm" in done.stdout and "memlm_passkey_local" in done.stdout
    assert list((tmp_path / "out").rglob("results_*.json"))


@pytest.mark.slow
def test_the_passkey_script_runs(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    folder = tmp_path / "model"
    config = hf_memlm.MemLMConfig(
        text_config=tiny_llama_config(hidden_size=32, max_positions=128), memory_layers=[0], segment_length=64
    )
    hf_memlm.MemLMForCausalLM(config).save_pretrained(folder)
    build_tokenizer("byte").save_pretrained(folder)

    path = Path(__file__).resolve().parents[1] / "scripts" / "lm_eval_passkey.py"
    spec = importlib.util.spec_from_file_location("lm_eval_passkey", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = [str(folder), "--num-segments", "9", "--num-examples", "4", "--output-dir", str(tmp_path / "out")]
    scores = script.main([*argv, "--batch-size", "2"])
    assert set(scores) == {"hf", "hf-memlm", "hf_memlm.evaluation"}
    assert all(0.0 <= value <= 1.0 for value in scores.values())
    assert "| lm-eval `--model hf-memlm`, true key among 10 |" in capsys.readouterr().out
    assert len((tmp_path / "out" / "passkey.jsonl").read_text().splitlines()) == 4
