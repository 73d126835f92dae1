"""Language modelling on a pretrained base: the comparison section with `model.base` (a tiny Llama saved as a
folder stands in for SmolLM2), its untrained baselines (`base`, `full_attention`) and the no-memory baseline of
a memory-only model (a LoRA of the memory's parameter count)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_memlm.cli import main
from hf_memlm.recipes.comparison import compared_runs, held_out_rows, matched_lora_rank, prepare_baseline
from hf_memlm.recipes.config import load_train_config
from hf_memlm.recipes.defaults import tiny_llama_config
from hf_memlm.recipes.train import prepare_run

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smollm2_lm_books_cpu.yaml"
BOOKS = ROOT / "data" / "books"
SEGMENT = 16
NUM_SEGMENTS = 6


def miniature(out: Path, base: Path, **changes) -> list[str]:
    settings = {
        "output_dir": str(out),
        "model.base": str(base),
        "model.memory.segment_length": str(SEGMENT),
        "model.memory.memory_layers": "[1]",
        "model.memory.memory_heads": "2",
        "data.source": str(BOOKS / "train" / "pride_and_prejudice.txt"),
        "data.num_segments": "4",
        "evaluation.num_segments": f"[{NUM_SEGMENTS}]",
        "evaluation.num_examples": "3",
        "evaluation.batch_size": "2",
        "comparison.repeats": "2",
        "training.max_steps": "2",
        "training.per_device_train_batch_size": "2",
        "training.logging_steps": "1",
        **changes,
    }
    return [a for key, value in settings.items() for a in (f"--{key}", value)]


@pytest.fixture(scope="module")
def mini_job(tiny_pretrained_base, tmp_path_factory) -> Path:
    """configs/smollm2_lm_books_cpu.yaml in miniature, end to end: memory model and no_memory baseline for two
    seeds, the untrained base and full-attention baselines, the report and the card."""
    out = tmp_path_factory.mktemp("smollm2_lm_books") / "run"
    assert main(["train", str(CONFIG), *miniature(out, tiny_pretrained_base)]) == 0
    return out


def _nll_by_segment(model, rows, window) -> list[float]:
    """Plain forward of a causal LM over consecutive windows: per-segment summed NLL, written out the long way."""
    sums = [0.0] * NUM_SEGMENTS
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row])
            for start in range(0, len(row), window):
                piece = ids[:, start : start + window]
                logits = model(input_ids=piece).logits[0].float()
                for offset in range(piece.shape[1]):
                    position = start + offset
                    if position + 1 >= len(row):
                        break
                    nll = -torch.log_softmax(logits[offset], -1)[row[position + 1]].item()
                    sums[position // SEGMENT] += nll
    return sums


def test_pretrained_baselines_score_what_the_base_computes(mini_job, tiny_pretrained_base):
    results = json.loads((mini_job / "eval" / "perplexity.json").read_text())
    assert list(results["models"]) == ["memory", "no_memory", "base", "full_attention", "memory_disabled"]
    config = load_train_config(CONFIG, miniature(mini_job, tiny_pretrained_base))
    from hf_memlm.integrations.gguf import load_base_tokenizer

    rows, _ = held_out_rows(config["evaluation"], load_base_tokenizer(str(tiny_pretrained_base)), SEGMENT)
    base = AutoModelForCausalLM.from_pretrained(tiny_pretrained_base).eval()
    counts = [SEGMENT * len(rows)] * (NUM_SEGMENTS - 1) + [(SEGMENT - 1) * len(rows)]
    for name, window in (("base", SEGMENT), ("full_attention", SEGMENT * NUM_SEGMENTS)):
        expected = [math.exp(s / c) for s, c in zip(_nll_by_segment(base, rows, window), counts)]
        for seed_scores in results["models"][name]["perplexity_by_seed"]:  # one score, beside every seed
            assert seed_scores == pytest.approx(expected, rel=1e-4), name
    # full attention sees the earlier segments: on a trained-looking base it would be lower; here it must at
    # least differ from the windowed base after the first segment, and equal it in the first
    by_seed = results["models"]
    assert by_seed["full_attention"]["perplexity_by_seed"][0][0] == pytest.approx(
        by_seed["base"]["perplexity_by_seed"][0][0]
    )
    assert by_seed["full_attention"]["perplexity_by_seed"][0][1:] != pytest.approx(
        by_seed["base"]["perplexity_by_seed"][0][1:]
    )
    card = (mini_job / "README.md").read_text()
    assert "base as shipped" in card and "full attention" in card
    assert (
        "| compared with | no_memory, trained the same way; seeds 0, 1; base, full_attention: the base as shipped |"
        in card
    )


def test_the_no_memory_baseline_of_a_memory_only_model_trains_a_lora_of_the_memorys_size(
    mini_job, tiny_pretrained_base
):
    summary = json.loads((mini_job / "comparison" / "no_memory" / "seed-0" / "train_summary.json").read_text())
    memory_summary = json.loads((mini_job / "train_summary.json").read_text())
    trained, budget = summary["parameters"]["trainable"], memory_summary["parameters"]["trainable_memory"]
    per_rank = 2 * ((32 + 32) + (32 + 32))  # tiny Llama, 2 layers of q_proj and v_proj (32 -> 32), per rank
    assert abs(trained - budget) <= per_rank  # the closest rank
    # merged into the base when saved: a plain Llama, its weights moved away from the shipped ones by training
    saved = AutoModelForCausalLM.from_pretrained(mini_job / "comparison" / "no_memory" / "seed-0")
    shipped = AutoModelForCausalLM.from_pretrained(tiny_pretrained_base)
    assert saved.config.model_type == "llama"
    moved = [k for k, v in saved.state_dict().items() if not torch.equal(v, shipped.state_dict()[k])]
    assert moved and all("q_proj" in k or "v_proj" in k for k in moved)


def test_matched_lora_rank_comes_closest_to_the_budget():
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM(tiny_llama_config(vocab_size=260, hidden_size=32))
    per_rank = 2 * ((32 + 32) + (32 + 32))  # two layers of q_proj and v_proj, 32 -> 32
    assert matched_lora_rank(base, ["q_proj", "v_proj"], 10 * per_rank) == 10
    assert matched_lora_rank(base, ["q_proj", "v_proj"], 10 * per_rank + per_rank // 3) == 10
    assert matched_lora_rank(base, ["q_proj", "v_proj"], 1) == 1
    with pytest.raises(ValueError, match="no linear layer of the base is named"):
        matched_lora_rank(base, ["c_attn"], 100)


def test_lora_baseline_starts_from_the_shipped_base(tiny_pretrained_base, tmp_path):
    config = load_train_config(CONFIG, miniature(tmp_path / "run", tiny_pretrained_base))
    prepared = prepare_run(config)
    baseline = prepare_baseline(prepared, SEGMENT, "memory_only")
    shipped = AutoModelForCausalLM.from_pretrained(tiny_pretrained_base)
    merged = baseline.model.merge_and_unload()  # LoRA's B starts at zero: merged, it is the shipped base
    for key, value in shipped.state_dict().items():
        assert torch.equal(merged.state_dict()[key], value), key


def test_a_lora_memory_models_baseline_gets_the_same_lora(tiny_pretrained_base, tmp_path):
    """model.trainable: lora: the no-memory baseline trains the memory model's LoRA (its settings, its targets)."""
    overrides = miniature(tmp_path / "run", tiny_pretrained_base, **{"model.trainable": "lora", "lora.r": "4"})
    config = load_train_config(CONFIG, overrides)
    run = next(r for r in compared_runs(config) if r.name == "no_memory")
    assert (run.trainable, run.lora["r"], run.config["model"]["trainable"]) == ("lora", 4, "memory_only")
    baseline = prepare_baseline(prepare_run(run.config), SEGMENT, run.trainable, run.lora).model
    adapted = {name.rsplit(".", 1)[-1] for name, module in baseline.named_modules() if hasattr(module, "lora_A")}
    assert adapted == {"q_proj", "v_proj"} and baseline.peft_config["default"].r == 4
    assert not any("memory" in name for name, _ in baseline.named_parameters())


def test_model_calibrate_tokens_rescales_the_new_memory_before_training(tiny_pretrained_base, tmp_path):
    plain = prepare_run(load_train_config(CONFIG, miniature(tmp_path / "plain", tiny_pretrained_base))).model
    prepared = prepare_run(
        load_train_config(
            CONFIG, miniature(tmp_path / "calibrated", tiny_pretrained_base, **{"model.calibrate_tokens": "64"})
        )
    )
    calibrated = prepared.model
    block, reference = calibrated.memory_blocks["1"], plain.memory_blocks["1"]
    for projection, untouched in zip(block.input_projections, reference.input_projections):
        assert not torch.equal(projection.weight, untouched.weight)
        # columns scaled, one factor per hidden feature, shared by every projection
        ratio = projection.weight / untouched.weight
        torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio))
    ids = torch.tensor([prepared.train_dataset[0]["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(calibrated(ids).logits, plain(ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"model\.base is null"):
        scratch = load_train_config(
            CONFIG, miniature(tmp_path / "scratch", tiny_pretrained_base, **{"model.calibrate_tokens": "64"})
        )
        scratch["model"]["base"] = None
        prepare_run(scratch)
    with pytest.raises(ValueError, match="non-negative integer"):
        prepare_run(
            load_train_config(
                CONFIG, miniature(tmp_path / "bad", tiny_pretrained_base, **{"model.calibrate_tokens": "-1"})
            )
        )
