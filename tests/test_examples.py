"""Each example script runs end to end in its `--tiny` mode (tiny model, a few steps, local data)."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))  # examples import their siblings, as when run as scripts
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_is_covered():
    assert {p.stem for p in EXAMPLES.glob("*.py")} == {
        "finetune_pretrained",
        "lora_memory",
        "multi_process",
        "train_from_scratch",
    }


def test_finetune_pretrained(tmp_path, monkeypatch):
    result = load_example("finetune_pretrained", monkeypatch).main(["--tiny", "--output-dir", str(tmp_path / "out")])
    assert math.isfinite(result["eval_loss"]) and math.isfinite(result["loss_without_memory"])
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "tokenizer.json").is_file()


def test_lora_memory(tmp_path, monkeypatch):
    result = load_example("lora_memory", monkeypatch).main(["--tiny", "--output-dir", str(tmp_path / "out")])
    assert result["memory_reloaded"] is True
    assert (Path(result["adapter_dir"]) / "adapter_model.safetensors").is_file()
    assert (Path(result["merged_dir"]) / "model.safetensors").is_file()


def test_multi_process_as_one_process(tmp_path, monkeypatch):
    result = load_example("multi_process", monkeypatch).main(["--tiny", "--output-dir", str(tmp_path / "out")])
    assert result["processes"] == 1 and math.isfinite(result["loss"])
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_train_from_scratch(tmp_path, monkeypatch):
    result = load_example("train_from_scratch", monkeypatch).main(["--tiny", "--output-dir", str(tmp_path / "out")])
    assert math.isfinite(result["loss"])
    assert (tmp_path / "out" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_multi_process_under_accelerate_launch(tmp_path):
    root = EXAMPLES.parent
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(root / "configs" / "accelerate" / "ddp_cpu.yaml"),
        str(EXAMPLES / "multi_process.py"),
        "--tiny",
        "--output-dir",
        str(tmp_path / "out"),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) on cpu, global batch 4" in result.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file()
