"""benchmarks/bench_peers.py: its scoring agrees with hf_memlm.evaluation, and --quick runs without the peers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import base_config, memory_settings, randomize_memory

import hf_memlm
from hf_memlm.data import build_tokenizer, make_passkey_dataset
from hf_memlm.evaluation import evaluate_retrieval

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_peers

        yield bench_peers
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def passkey_examples():
    """Examples of 2 and 3 segments of 64 byte tokens, the key in the first segment."""
    from datasets import concatenate_datasets

    tokenizer = build_tokenizer("byte")
    parts = [make_passkey_dataset(tokenizer, 3, 64, segments, needle_segment=0, seed=segments) for segments in (2, 3)]
    return concatenate_datasets(parts)


def oracle(dataset, wrong_example: int | None = None):
    """A logits function that predicts every next token right, except one key digit of `wrong_example`."""
    rows = {tuple(ids): index for index, ids in enumerate(dataset["input_ids"])}

    def logits_fn(input_ids):
        logits = torch.zeros(*input_ids.shape, 300)
        logits[:, :-1].scatter_(-1, input_ids[:, 1:, None], 1.0)
        for row, ids in enumerate(input_ids.tolist()):
            if rows[tuple(ids)] == wrong_example:
                last_digit = dataset[wrong_example]["answer_start"] + dataset[wrong_example]["answer_length"] - 1
                logits[row, last_digit - 1] = 0.0
                logits[row, last_digit - 1, (ids[last_digit] + 1) % 300] = 1.0
        return logits

    return logits_fn


def test_scoring_reads_the_key_from_the_positions_before_it(bench, passkey_examples):
    rows = bench.passkey_predictions(oracle(passkey_examples), passkey_examples, batch_size=4)
    assert [row["exact"] for row in rows] == [True] * 6
    assert bench.exact_match_by_distance(rows) == {1: 1.0, 2: 1.0}

    rows = bench.passkey_predictions(oracle(passkey_examples, wrong_example=4), passkey_examples, batch_size=4)
    assert [row["exact"] for row in rows] == [True, True, True, True, False, True]
    assert bench.exact_match_by_distance(rows) == {1: 1.0, 2: pytest.approx(2 / 3)}
    assert rows[4]["predicted"][:-1] == rows[4]["target"][:-1] and rows[4]["predicted"][-1] != rows[4]["target"][-1]
    key_digits = sum(len(row["target"]) for row in rows[3:])
    assert bench.key_token_accuracy_by_distance(rows) == {1: 1.0, 2: pytest.approx((key_digits - 1) / key_digits)}


def test_batches_never_mix_lengths(bench, passkey_examples):
    assert bench.same_length_batches(passkey_examples, 4) == [[0, 1, 2], [3, 4, 5]]
    assert bench.same_length_batches(passkey_examples, 2) == [[0, 1], [2], [3, 4], [5]]


def test_scoring_agrees_with_hf_memlm_evaluation(bench, passkey_examples, arch_kind):
    model_type, kind = arch_kind
    torch.manual_seed(0)
    config = hf_memlm.MemLMConfig(
        text_config=base_config(model_type, vocab_size=260), **memory_settings(kind, segment_length=64)
    )
    model = hf_memlm.MemLMForCausalLM(config).eval()
    randomize_memory(model)

    rows = bench.passkey_predictions(lambda ids: model(input_ids=ids).logits, passkey_examples, batch_size=4)
    results = evaluate_retrieval(model, passkey_examples, batch_size=4, baselines=False, progress=False)
    assert [row["predicted"] for row in rows] == [a["predicted"]["memory"] for a in results["answers"]]
    assert [row["exact"] for row in rows] == [a["exact"]["memory"] for a in results["answers"]]
    assert bench.agreement_with_evaluation(model, passkey_examples, rows, batch_size=4)["agrees"]


def test_quick_mode_runs_our_model_alone_when_the_peers_are_missing(tmp_path):
    # packages that fail to import stand for the peers, whichever environment runs the test
    for module in ("memorizing_transformers_pytorch", "recurrent_memory_transformer_pytorch"):
        (tmp_path / "stubs" / module).mkdir(parents=True)
        (tmp_path / "stubs" / module / "__init__.py").write_text("raise ImportError('not installed here')\n")
    output = tmp_path / "peers_quick.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "stubs"), str(ROOT)])}
    command = [sys.executable, str(BENCHMARKS / "bench_peers.py"), "--quick", "--output", str(output)]
    command += ["--peers-env", str(tmp_path / "no-peers-here")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for name, package in (("memorizing", "memorizing-transformers-pytorch"), ("rmt", "recurrent-memory-transformer")):
        assert f"skipping {name}: {package}" in done.stdout
    assert "pip install --no-deps --target benchmarks/.peers-env -r benchmarks/peers_requirements.txt" in done.stdout

    results = json.loads(output.read_text())
    assert list(results["models"]) == ["ours"]
    assert sorted(results["skipped"]) == ["memorizing", "rmt"]
    ours = results["models"]["ours"]
    assert sorted(ours["exact_match"]) == ["1", "4"]  # the main job's first two distances
    assert ours["agreement_with_hf_memlm_evaluation"]["agrees"]
    assert sorted(ours["key_token_accuracy"]) == ["1", "4"]
    assert ours["training"]["steps"] >= 1 and ours["parameters"] > 100_000
    assert ours["speed"]["inference"]["tokens_per_s_cpu"] > 0
    assert "| ours |" in results["table"] and "skipped rmt" in results["table"]


def test_models_must_include_ours(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--models", "rmt,nonsense"])
    assert "--models 'rmt,nonsense'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["memorizing", "rmt"])
def test_peer_reads_what_an_earlier_segment_wrote(bench, name):
    """The loop hands each peer's memory from segment to segment: changing the first segment changes the
    third's logits (beyond the one segment of XL cache). Runs where the peers are installed."""
    modules, skipped = bench.load_peers(bench.DEFAULT_PEERS_ENV, [name])
    if name in skipped:
        pytest.skip(skipped[name])
    builder = {"memorizing": bench.MemorizingPeer, "rmt": bench.RecurrentMemoryPeer}[name]
    torch.manual_seed(0)
    peer = builder(modules[name], 260)
    peer.model.eval()
    tokens = torch.randint(0, 256, (2, 3 * 64))
    changed = tokens.clone()
    changed[:, :64] = torch.randint(0, 256, (2, 64))
    with torch.no_grad():
        first, second = peer.logits(tokens), peer.logits(changed)
        again = peer.logits(tokens)  # memory starts empty for every call
    assert first.shape == (2, 3 * 64, 260)
    assert not torch.allclose(first[:, 128:], second[:, 128:])
    torch.testing.assert_close(first[:, :128], again[:, :128])
    # faiss HNSW draws each rebuilt graph's levels afresh, so the approximate neighbours found in the third
    # segment may differ a little from one call to the next (RMT's read is exact)
    tolerance = 0.1 if name == "memorizing" else 1e-5
    torch.testing.assert_close(first, again, atol=tolerance, rtol=0)
