"""`model.memory_from`: a training stage that starts from the memory a previous stage saved.

The saved memory is perturbed away from any initialisation, so "loaded" cannot pass by chance; the folder's base
weights are changed too, so a load that took more than the memory would show.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import randomize_memory

from hf_memlm.cli import main
from hf_memlm.recipes.config import load_train_config
from hf_memlm.recipes.train import prepare_run
from hf_memlm.training import build_model, memory_weights

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smollm2_lm_books_cpu.yaml"
BOOKS = ROOT / "data" / "books"
MEMORY = {"memory_type": "kv", "memory_layers": [1], "segment_length": 16, "memory_heads": 2, "memory_size": 512}


def _first_stage(base: Path, folder: Path, sharded: bool = False, **memory) -> Path:
    """A trained-looking first stage: memory weights far from any initialisation, a base weight changed."""
    model = build_model({**MEMORY, **memory}, base=str(base))
    randomize_memory(model, seed=123)
    with torch.no_grad():
        model.language_model.model.embed_tokens.weight.mul_(2.0)
    model.save_pretrained(folder, **({"max_shard_size": "100KB"} if sharded else {}))
    return folder


def _stage_args(out: Path, base: Path, **changes) -> list[str]:
    settings = {
        "output_dir": str(out),
        "model.base": str(base),
        **{
            f"model.memory.{key}": value if isinstance(value, str) else json.dumps(value)
            for key, value in MEMORY.items()
        },
        "data.source": str(BOOKS / "train" / "pride_and_prejudice.txt"),
        "data.num_segments": "3",
        "evaluation.num_segments": "[3]",
        "evaluation.num_examples": "1",
        "comparison.baselines": "[]",
        "comparison.repeats": "1",
        "training.max_steps": "2",
        "training.per_device_train_batch_size": "2",
        "training.logging_steps": "1",
        **changes,
    }
    return [a for key, value in settings.items() for a in (f"--{key}", value)]


def _prepared(tmp_path, base, **changes):
    return prepare_run(load_train_config(CONFIG, _stage_args(tmp_path / "stage2", base, **changes)))


@pytest.mark.parametrize("sharded", [False, True], ids=["single_file", "sharded"])
def test_the_second_stage_starts_from_the_saved_memory_and_the_shipped_base(tiny_pretrained_base, tmp_path, sharded):
    saved = _first_stage(tiny_pretrained_base, tmp_path / "stage1", sharded=sharded)
    assert (saved / "model.safetensors.index.json").is_file() == sharded
    from transformers import AutoModelForCausalLM

    first = AutoModelForCausalLM.from_pretrained(saved)
    model = _prepared(tmp_path, tiny_pretrained_base, **{"model.memory_from": str(saved)}).model
    fresh = _prepared(tmp_path / "fresh", tiny_pretrained_base).model
    loaded, trained = memory_weights(model), memory_weights(first)
    assert loaded.keys() == trained.keys()
    for name, value in trained.items():
        assert torch.equal(loaded[name], value), name
        assert not torch.equal(memory_weights(fresh)[name], value), name
    # the base is the shipped one, not the folder's changed copy
    shipped = fresh.language_model.state_dict()
    for name, value in model.language_model.state_dict().items():
        assert torch.equal(value, shipped[name]), name


def test_weights_new_in_the_second_stage_keep_their_zero_start_so_it_reads_as_the_first(tiny_pretrained_base, tmp_path):
    """One-token keys first, then per-token keys of 3 tokens: the new projections start at zero, the logits of a
    whole example (memory read included) equal the first stage's."""
    from transformers import AutoModelForCausalLM

    saved = _first_stage(tiny_pretrained_base, tmp_path / "stage1")
    prepared = _prepared(
        tmp_path,
        tiny_pretrained_base,
        **{
            "model.memory_from": str(saved),
            "model.memory.memory_key_window": "3",
            "model.memory.memory_key_projections": "per_token",
        },
    )
    block = prepared.model.memory_blocks["1"]
    assert len(block.mem_key_earlier) == 2 and all(not p.any() for p in block.mem_key_earlier.parameters())
    first = AutoModelForCausalLM.from_pretrained(saved)
    first.language_model.load_state_dict(prepared.model.language_model.state_dict())  # the shipped base in both
    ids = torch.tensor([prepared.train_dataset[0]["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(prepared.model(ids).logits, first(ids).logits)


def test_memory_new_trains_only_what_the_first_stage_lacked(tiny_pretrained_base, tmp_path):
    """model.trainable: memory_new: one step of the Trainer moves the new per-token projections and nothing else."""
    from hf_memlm.recipes.train import run_training

    saved = _first_stage(tiny_pretrained_base, tmp_path / "stage1")
    changes = {
        "model.memory_from": str(saved),
        "model.memory.memory_key_window": "3",
        "model.memory.memory_key_projections": "per_token",
        "model.trainable": "memory_new",
        "training.max_steps": "1",
        "training.learning_rate": "1e-2",
        "training.memory_learning_rate": "1e-2",
        "training.warmup_steps": "0",  # a learning rate from the first step
    }
    prepared = _prepared(tmp_path, tiny_pretrained_base, **changes)
    trainable = {name for name, param in prepared.model.named_parameters() if param.requires_grad}
    assert trainable == {f"memory_blocks.1.mem_{side}_earlier.{i}.weight" for side in ("key", "query") for i in (0, 1)}
    before = {name: value.clone() for name, value in prepared.model.state_dict().items()}
    run_training(prepared)
    after = prepared.model.state_dict()
    moved = {name for name, value in before.items() if not torch.equal(value, after[name])}
    assert moved and moved <= trainable
    with pytest.raises(ValueError, match="lacks none here"):  # nothing new: nothing would train
        _prepared(
            tmp_path / "same",
            tiny_pretrained_base,
            **{"model.memory_from": str(saved), "model.trainable": "memory_new"},
        )
    with pytest.raises(ValueError, match=r"set model\.memory_from"):
        _prepared(tmp_path / "alone", tiny_pretrained_base, **{"model.trainable": "memory_new"})


def test_a_second_stage_trains_end_to_end_from_the_cli_with_lora(tiny_pretrained_base, tmp_path, capsys):
    saved = _first_stage(tiny_pretrained_base, tmp_path / "stage1")
    out = tmp_path / "stage2"
    args = _stage_args(
        out, tiny_pretrained_base, **{"model.memory_from": str(saved), "model.trainable": "lora", "lora.r": "2"}
    )
    assert main(["train", str(CONFIG), *args]) == 0
    assert f"memory weights from {saved}" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["model_type"] == "memlm"
    assert load_train_config(out / "train_config.yaml", [])["model"]["memory_from"] == str(saved)


@pytest.mark.parametrize(
    ("saved_memory", "changes", "message"),
    [
        ({}, {"model.memory.memory_layers": "[0]"}, r"memory_layers=\[1\], this model \[0\]"),
        ({}, {"model.memory.memory_type": "slot"}, r"memory_type='kv', this model 'slot'"),
        (
            {"memory_key_window": 3, "memory_key_projections": "per_token"},
            {},
            r"no place for: \['memory_blocks\.1\.mem_key_earlier\.0\.weight'",
        ),
        ({}, {"model.memory.memory_head_dim": "8"}, r"other shapes \(memory_blocks\.1\.mem_key\.weight: saved"),
        ({}, {"model.calibrate_tokens": "64"}, "set one of them"),
    ],
    ids=["layers", "kind", "unexpected_weights", "shapes", "with_calibration"],
)
def test_a_memory_that_does_not_fit_is_refused_before_anything_is_written(
    tiny_pretrained_base, tmp_path, saved_memory, changes, message
):
    saved = _first_stage(tiny_pretrained_base, tmp_path / "stage1", **saved_memory)
    with pytest.raises(ValueError, match=message):
        _prepared(tmp_path, tiny_pretrained_base, **{"model.memory_from": str(saved), **changes})
    assert not (tmp_path / "stage2").exists()


def test_a_source_that_holds_no_saved_memory_is_named(tiny_pretrained_base, tmp_path):
    file = tmp_path / "weights.safetensors"
    file.write_bytes(b"not a folder")
    cases = {
        str(tmp_path / "missing"): (FileNotFoundError, "no folder"),
        str(file): (ValueError, "is a file"),
        str(tiny_pretrained_base): (ValueError, "holds a 'llama' model, not a memory model"),
    }
    for source, (error, message) in cases.items():
        with pytest.raises(error, match=message):
            _prepared(tmp_path, tiny_pretrained_base, **{"model.memory_from": source})
    no_weights = tmp_path / "config_only"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps({"model_type": "memlm", **MEMORY}))
    with pytest.raises(ValueError, match="holds no safetensors weights"):
        _prepared(tmp_path, tiny_pretrained_base, **{"model.memory_from": str(no_weights)})
    assert not (tmp_path / "stage2").exists()
