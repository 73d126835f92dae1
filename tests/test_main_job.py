"""The README's main job: `hf-memlm train configs/passkey_cpu.yaml` trains a memory model from scratch
that retrieves a passkey across >= 8 segments, where the no-memory baselines are at chance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hf_memlm.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "passkey_cpu.yaml")


def _by_distance(results: dict, condition: str) -> dict[int, float]:
    return {b["distance_segments"]: b["metrics"][condition]["exact_match"] for b in results["by_distance_segments"]}


def test_main_job_pipeline_runs_end_to_end(tmp_path):
    """Default suite: the same pipeline in miniature (a few steps, a few examples): trains, saves,
    reloads, evaluates with the baselines, writes the report."""
    out = tmp_path / "run"
    code = main(
        [
            "train",
            CONFIG,
            "--output_dir",
            str(out),
            "--training.max_steps",
            "3",
            "--data.num_examples",
            "96",
            "--evaluation.num_examples",
            "4",
            "--evaluation.num_segments",
            "[2, 9]",
            "--evaluation.check_generate",
            "1",
        ]
    )
    assert code == 0
    results = json.loads((out / "eval" / "passkey.json").read_text())
    assert set(_by_distance(results, "memory")) == {1, 8}
    assert {"memory", "memory_disabled", "base_model"} <= set(results["conditions"])
    assert (out / "eval" / "passkey.png").stat().st_size > 0 and (out / "model.safetensors").exists()


@pytest.mark.slow
def test_main_job_reaches_the_target(tmp_path):
    """The full main job (about 2 minutes on 2 cores): >= 90% exact match at >= 8 segments with memory,
    baselines at chance."""
    out = tmp_path / "run"
    assert main(["train", CONFIG, "--output_dir", str(out)]) == 0
    results = json.loads((out / "eval" / "passkey.json").read_text())
    with_memory = _by_distance(results, "memory")
    assert max(with_memory) >= 8
    for distance, accuracy in with_memory.items():
        if distance >= 8:
            assert accuracy >= 0.9, (distance, accuracy)
    for baseline in ("memory_disabled", "base_model"):
        assert all(acc <= 0.01 for acc in _by_distance(results, baseline).values()), baseline
