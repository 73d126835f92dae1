"""Language modelling with the real pretrained base: `hf-memlm train configs/smollm2_lm_books_cpu.yaml` trains
SmolLM2-135M-Instruct's memory and its no-memory baseline (3 seeds), scores them with the base as shipped and the
base with full attention on a held-out book. Slow (about an hour and a half on 2 quiet cores, see
docs/results/smollm2_lm_books.md); with HF_MEMLM_SMOLLM2_LM_JOB=FOLDER the finished run in FOLDER is checked
instead. The miniature of the config runs in the default suite (tests/test_lm_pretrained_comparison.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import real_model_job

ROOT = Path(__file__).resolve().parents[1]
TARGET_GAIN_PERCENT = 5.0  # beyond the 4th segment, against the better of no_memory and base, with every seed


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    return real_model_job(tmp_path_factory, "HF_MEMLM_SMOLLM2_LM_JOB", "smollm2_lm_books_cpu.yaml")


def _beyond_by_seed(results: dict, name: str) -> list[float]:
    """Perplexity beyond the 4th segment of `name`, one value per seed (pooled over the segments from the 5th)."""
    model = results["models"][name]
    first = results["beyond"]["from_segment"]
    counts = [entry["tokens"] for entry in results["by_segment"]]
    pooled = []
    for seed_scores in model["perplexity_by_seed"]:
        nll = sum(math.log(p) * c for p, c in zip(seed_scores[first:], counts[first:]))
        pooled.append(math.exp(nll / sum(counts[first:])))
    return pooled


@pytest.mark.slow
def test_memory_beats_the_better_of_no_memory_and_the_base_with_every_seed(job):
    results = json.loads((job / "eval" / "perplexity.json").read_text())
    assert {"memory", "no_memory", "base", "full_attention", "memory_disabled"} <= set(results["models"])
    memory = _beyond_by_seed(results, "memory")
    assert len(memory) >= 3
    base = _beyond_by_seed(results, "base")[0]
    for seed, (mine, theirs) in enumerate(zip(memory, _beyond_by_seed(results, "no_memory"))):
        better = min(theirs, base)
        gain = 100.0 * (1.0 - mine / better)
        assert gain >= TARGET_GAIN_PERCENT, f"seed {seed}: memory {mine:.3f}, better baseline {better:.3f}: {gain:.2f}%"
