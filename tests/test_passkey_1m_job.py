"""`configs/passkey_1m_cpu.yaml`: a model trained on 256-token examples recalls a passkey 16k, 64k, 256k and
1M tokens back, in a book it never saw. The default suite runs the job in miniature; the slow test checks
the target on full runs from scratch, seeds 0, 1 and 2 under both AVX-512 and AVX2 kernels: >= 99% at every
distance up to 1M tokens, >= 100 examples per distance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import exact_match_by_distance, train_job

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "passkey_1m_cpu.yaml")
MILLION = 16384  # segments of 64 tokens between the key's segment and the question's


@pytest.fixture(scope="module")
def miniature_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("passkey_1m") / "run"
    overrides = {
        "training.max_steps": "2",
        "data.num_examples": "64",
        "evaluation.num_examples": "3",
        "evaluation.num_segments": "[2, 6]",
        "evaluation.check_generate": "1",
        "training.disable_tqdm": "true",
    }
    train_job(CONFIG, out, overrides)
    return out


def test_the_1m_job_runs_in_miniature(miniature_run):
    out = miniature_run
    results = json.loads((out / "eval" / "passkey.json").read_text())
    assert set(exact_match_by_distance(results, "memory")) == {1, 5}
    assert results["data"]["filler_source"] == "data/books/test"  # the test book: not trained on, nor chosen on
    saved = json.loads((out / "config.json").read_text())
    assert (saved["memory_topk"], saved["memory_dtype"], saved["memory_size"]) == (4, "float16", 1100000)


SEEDS = (0, 1, 2)  # every seed must reach the target, not the best of them
# torch's CPU kernels: "native" (what this machine picks, AVX-512 here) and "avx2" (ATEN_CPU_CAPABILITY=avx2, as on a
# machine without AVX-512). They round differently, and the recipe of 41eba22 learned other weights from the same
# seed under each: 1.000 at 256k with AVX-512, 0.000 with AVX2 (issue 24). A recipe must hold under both.
KERNELS = ("native", "avx2")


def train_from_scratch(out: Path, seed: int, kernels: str) -> None:
    if kernels == "native":
        train_job(CONFIG, out, {"seed": str(seed)})
        return
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16", "AVX512_VNNI"):
        pytest.skip(f"this machine's torch kernels are {torch.backends.cpu.get_cpu_capability()}: 'native' runs them")
    # the kernels are chosen when torch loads: another process
    env = dict(os.environ, ATEN_CPU_CAPABILITY=kernels, PYTHONPATH=os.pathsep.join([str(ROOT), *sys.path]))
    command = [sys.executable, "-m", "hf_memlm", "train", CONFIG, "--output_dir", str(out), "--seed", str(seed)]
    subprocess.run(command, cwd=ROOT, env=env, check=True)


@pytest.mark.slow
@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("seed", SEEDS)
def test_the_1m_job_recalls_a_key_a_million_tokens_back(seed, kernels, tmp_path_factory):
    """Trains the job from scratch with each seed and CPU kernels (about 18 minutes and 13 GB of RAM each on 2
    quiet cores; 6 runs) and checks >= 99% exact match at 16k, 64k, 256k and 1M tokens, 100 examples each,
    baselines at chance. HF_MEMLM_1M_JOB=FOLDER checks that finished run (e.g. outputs/passkey_1m_cpu) instead."""
    finished = os.environ.get("HF_MEMLM_1M_JOB")
    if finished:
        if (seed, kernels) != (SEEDS[0], KERNELS[0]):
            pytest.skip("HF_MEMLM_1M_JOB names one finished run; it is checked once")
        out = Path(finished)
    else:
        out = tmp_path_factory.mktemp(f"passkey_1m_seed{seed}_{kernels}") / "run"
        train_from_scratch(out, seed, kernels)
    results = json.loads((out / "eval" / "passkey.json").read_text())
    with_memory = exact_match_by_distance(results, "memory")
    assert set(with_memory) >= {256, 1024, 4096, MILLION}
    assert all(b["answers"] >= 100 for b in results["by_distance_segments"])
    # the environment says where a miss came from (versions, threads, CPU kernels)
    assert all(acc >= 0.99 for acc in with_memory.values()), (seed, kernels, with_memory, results.get("environment"))
    for baseline in ("memory_disabled", "base_model"):
        assert all(acc <= 0.01 for acc in exact_match_by_distance(results, baseline).values()), baseline


def test_the_far_passkey_script_scores_a_saved_model(miniature_run, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import passkey_far
    finally:
        sys.path.pop(0)
    passkey_far.main([str(miniature_run), "--segments", "3", "--examples", "2", "--topk", "4", "--seed", "7"])
    printed = capsys.readouterr().out
    assert "key 128 tokens back: exact match" in printed and "(2 examples, seed 7" in printed
