"""The real-model pass key: `hf-memlm train configs/smollm2_passkey_cpu.yaml` trains SmolLM2-135M-Instruct's memory
and asks, in chat, for a key 16k to 1M tokens back in the test book, beside memory disabled and the base model alone.
Slow (about an hour on 2 cores, see docs/results/smollm2_passkey.md); with HF_MEMLM_SMOLLM2_PASSKEY_JOB=FOLDER the
finished run in FOLDER is checked instead. The pieces run in the default suite (tests/test_chat_passkey.py,
tests/test_read_supervision.py, tests/test_gguf_base.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import real_model_job

ROOT = Path(__file__).resolve().parents[1]
# exact match of the key by distance (single needle), and among 4 named needles at 64k: the targets
TARGETS = {16384: 0.99, 65536: 0.99, 262144: 0.97, 1048576: 0.95}
NAMED_TARGET = 0.95
MINIMUM_EXAMPLES = {16384: 100, 65536: 100, 262144: 50, 1048576: 20}


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    return real_model_job(tmp_path_factory, "HF_MEMLM_SMOLLM2_PASSKEY_JOB", "smollm2_passkey_cpu.yaml")


def _rows(job: Path) -> dict[tuple[int, int], dict]:
    results = json.loads((job / "eval" / "chat_passkey.json").read_text())
    return {(row["distance"], row["needles"]): row for row in results["rows"]}


@pytest.mark.slow
@pytest.mark.parametrize("distance", sorted(TARGETS))
def test_the_key_is_recalled_in_chat_this_far_back_where_the_baselines_cannot(job, distance):
    row = _rows(job)[(distance, 1)]
    assert row["examples"] >= MINIMUM_EXAMPLES[distance]
    assert row["memory"] >= TARGETS[distance], row
    assert row["memory_disabled"] <= 0.05, row
    assert row["base_model_examples"] >= 1 and row["base_model"] <= 0.05, row


@pytest.mark.slow
def test_the_asked_key_is_told_apart_from_three_other_named_needles(job):
    row = _rows(job)[(65536, 4)]
    assert row["examples"] >= 100
    assert row["memory"] >= NAMED_TARGET, row
