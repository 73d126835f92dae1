"""The slot job: `hf-memlm train configs/passkey_slot_cpu.yaml` trains constant-size `slot` memory from scratch
to retrieve a passkey 8 and 16 segments back (>= 90% exact match), with the no-memory baselines at chance."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import exact_match_by_distance, train_job

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "passkey_slot_cpu.yaml")


@pytest.mark.slow
def test_slot_job_reaches_the_target(tmp_path):
    """About 5 minutes on 2 quiet cores; HF_MEMLM_SLOT_JOB=FOLDER checks a finished run instead."""
    finished = os.environ.get("HF_MEMLM_SLOT_JOB")
    run = Path(finished) if finished else tmp_path / "run"
    if not finished:
        train_job(CONFIG, run)
    assert json.loads((run / "config.json").read_text())["memory_type"] == "slot"
    results = json.loads((run / "eval" / "passkey.json").read_text())
    with_memory = exact_match_by_distance(results, "memory")
    assert {8, 16} <= set(with_memory)
    assert with_memory[8] >= 0.9 and with_memory[16] >= 0.9, with_memory
    for baseline in ("memory_disabled", "base_model"):
        assert all(acc <= 0.01 for acc in exact_match_by_distance(results, baseline).values()), baseline
