"""The README's main job: `hf-memlm train configs/passkey_cpu.yaml` trains a memory model from scratch
that retrieves a passkey across >= 8 segments, where the no-memory baselines are at chance; then the
README's read-then-ask example (`hf-memlm generate ... --read doc.txt --prompt ...`) prints the key."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest
from conftest import exact_match_by_distance, train_job

from hf_memlm.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "passkey_cpu.yaml")
MAIN_JOB_OUTPUT = "outputs/passkey_cpu"  # the output_dir of the config, as the README's commands name it


def readme_example() -> tuple[list[list[str]], str]:
    """The README's read-then-ask example: its commands (split as a shell would) and the output it shows."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(
        r"```bash\n((?:(?!```).)*?hf-memlm generate (?:(?!```).)*?)```\s*\n(?:(?!```).)*?```\n(.*?)```", readme, re.S
    )
    assert found, "the README's main-job section ends with a read-then-ask example and its output"
    commands = [shlex.split(line) for line in found.group(1).splitlines() if line.strip()]
    return commands, found.group(2)


def run_readme_example(model_dir: Path, workdir: Path, monkeypatch, capsys) -> str:
    """Run the README's commands in `workdir` (the python one-liner in this process, `hf-memlm` through the
    CLI's `main`, the saved model at `model_dir`); returns what the generate command printed."""
    commands, _ = readme_example()
    monkeypatch.chdir(workdir)
    printed = None
    for argv in commands:
        program = Path(argv[0]).name
        if program.startswith("python"):
            assert argv[1] == "-c", argv
            exec(argv[2], {})
        else:
            assert program == "hf-memlm" and argv[1] == "generate", argv
            args = [str(model_dir) if arg == MAIN_JOB_OUTPUT else arg for arg in argv[1:]]
            capsys.readouterr()
            assert main(args) == 0
            printed = capsys.readouterr().out
    assert printed is not None
    return printed


@pytest.fixture(scope="module")
def miniature_job(tmp_path_factory) -> Path:
    """The main job in miniature (a few steps, a few examples): trains, saves, reloads, evaluates."""
    out = tmp_path_factory.mktemp("miniature_job") / "run"
    overrides = {
        "training.max_steps": "3",
        "data.num_examples": "96",
        "evaluation.num_examples": "4",
        "evaluation.num_segments": "[2, 9]",
        "evaluation.check_generate": "1",
    }
    train_job(CONFIG, out, overrides)
    return out


def test_main_job_pipeline_runs_end_to_end(miniature_job):
    """Default suite: the pipeline writes the report with the baselines and a model that stops at its marker."""
    results = json.loads((miniature_job / "eval" / "passkey.json").read_text())
    assert set(exact_match_by_distance(results, "memory")) == {1, 8}
    assert {"memory", "memory_disabled", "base_model"} <= set(results["conditions"])
    assert (miniature_job / "eval" / "passkey.png").stat().st_size > 0
    assert (miniature_job / "model.safetensors").exists()
    saved = json.loads((miniature_job / "generation_config.json").read_text())
    assert saved["eos_token_id"] == 258  # the byte tokenizer's <eos>: the reply's end marker stops generate


def test_readme_read_then_ask_example_runs_through_the_cli(miniature_job, tmp_path, monkeypatch, capsys):
    """Default suite: the README's example, exactly, on the miniature main job (too short a training to know the
    key: the slow test below checks the answer). It reads the document and prints one answer."""
    printed = run_readme_example(miniature_job, tmp_path, monkeypatch, capsys)
    assert printed.endswith("\n") and (tmp_path / "doc.txt").stat().st_size > 1000


@pytest.fixture(scope="module")
def main_job(tmp_path_factory) -> Path:
    """The full main job (about 2 minutes on 2 quiet cores), run once for the slow tests; with
    HF_MEMLM_MAIN_JOB=FOLDER, the finished run in FOLDER (e.g. outputs/passkey_cpu) is checked instead."""
    finished = os.environ.get("HF_MEMLM_MAIN_JOB")
    if finished:
        return Path(finished).resolve()
    out = tmp_path_factory.mktemp("main_job") / "run"
    train_job(CONFIG, out)
    return out


@pytest.mark.slow
def test_main_job_reaches_the_target(main_job):
    """>= 90% exact match at >= 8 segments with memory, baselines at chance."""
    results = json.loads((main_job / "eval" / "passkey.json").read_text())
    with_memory = exact_match_by_distance(results, "memory")
    assert max(with_memory) >= 8
    for distance, accuracy in with_memory.items():
        if distance >= 8:
            assert accuracy >= 0.9, (distance, accuracy)
    for baseline in ("memory_disabled", "base_model"):
        assert all(acc <= 0.01 for acc in exact_match_by_distance(results, baseline).values()), baseline


@pytest.mark.slow
def test_readme_read_then_ask_example_prints_the_key(main_job, tmp_path, monkeypatch, capsys):
    """The README's example on the trained model: read a 1.5 kB document, ask in a fresh call, get the key
    (with the space before it) and nothing after it: generation stopped at the end marker."""
    printed = run_readme_example(main_job, tmp_path, monkeypatch, capsys)
    _, shown = readme_example()
    assert printed == shown
    assert printed == " 48213\n"
