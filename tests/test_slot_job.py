"""The slot job: `hf-memlm train configs/passkey_slot_cpu.yaml` trains constant-size `slot` memory from scratch
to retrieve a passkey 8 and 16 segments back (>= 90% exact match), with the no-memory baselines at chance."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hf_memlm.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "passkey_slot_cpu.yaml")


def _by_distance(results: dict, condition: str) -> dict[int, float]:
    return {b["distance_segments"]: b["metrics"][condition]["exact_match"] for b in results["by_distance_segments"]}


@pytest.mark.slow
def test_slot_job_reaches_the_target(tmp_path):
    """About 5 minutes on 2 quiet cores; HF_MEMLM_SLOT_JOB=FOLDER checks a finished run instead."""
    finished = os.environ.get("HF_MEMLM_SLOT_JOB")
    run = Path(finished) if finished else tmp_path / "run"
    if not finished:
        assert main(["train", CONFIG, "--output_dir", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["memory_type"] == "slot"
    results = json.loads((run / "eval" / "passkey.json").read_text())
    with_memory = _by_distance(results, "memory")
    assert {8, 16} <= set(with_memory)
    assert with_memory[8] >= 0.9 and with_memory[16] >= 0.9, with_memory
    for baseline in ("memory_disabled", "base_model"):
        assert all(acc <= 0.01 for acc in _by_distance(results, baseline).values()), baseline
