"""Training with transformers.Trainer: memory learns, freezing modes, LoRA + memory (gradients, save, reload),
optimizer groups, activation checkpointing, and a 2-process `accelerate launch` run matching one process."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SEGMENT, base_config, memory_settings
from datasets import Dataset
from transformers import AutoModelForCausalLM, default_data_collator

import hf_memlm
from hf_memlm import MemLMConfig, MemLMForCausalLM
from hf_memlm.memory_base import MemoryBlock
from hf_memlm.training import (
    MemLMTrainer,
    MemLMTrainingArguments,
    build_model,
    configure_trainable,
    lora_target_modules,
    memory_weights,
    save_trained_model,
)

ROOT = Path(__file__).resolve().parents[1]

VOCAB = 32  # token ids 2..31 are the random symbols of the copy task; chance level is ln(30)
CHANCE = math.log(VOCAB - 2)


def copy_task(num_examples: int, seed: int = 0) -> Dataset:
    """Segment 0: random symbols; segment 1: the same symbols again. The loss is on segment 1 only (from its
    second token), so it can beat chance only by reading what segment 0 wrote into memory."""
    generator = torch.Generator().manual_seed(seed)
    first = torch.randint(2, VOCAB, (num_examples, SEGMENT), generator=generator)
    input_ids = torch.cat([first, first], dim=1)
    labels = input_ids.clone()
    labels[:, : SEGMENT + 1] = -100
    return Dataset.from_dict({"input_ids": input_ids.tolist(), "labels": labels.tolist()})


def tiny_base(seed: int = 0):
    """The table's Llama with the copy task's vocabulary."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(
        base_config("llama", vocab_size=VOCAB, num_key_value_heads=2, max_position_embeddings=64, eos_token_id=1)
    )


def training_memory(kind: str = "kv") -> dict:
    """The table's memory settings, large enough to hold a whole example, read exactly."""
    return memory_settings(kind, memory_size=64, memory_topk=None, num_slots=8)


def tiny_memlm(kind: str = "kv", seed: int = 0) -> MemLMForCausalLM:
    torch.manual_seed(seed)
    config = MemLMConfig(text_config=tiny_base().config, **training_memory(kind))
    return MemLMForCausalLM(config)


def training_args(tmp_path, **overrides) -> MemLMTrainingArguments:
    settings = {
        "output_dir": str(tmp_path / "run"),
        "per_device_train_batch_size": 16,
        "learning_rate": 1e-2,
        "max_steps": 40,
        "logging_steps": 10,
        "save_strategy": "no",
        "report_to": "none",
        "optim": "adamw_torch",
        "disable_tqdm": True,
        "seed": 0,
        "use_cpu": True,
    }
    settings.update(overrides)
    return MemLMTrainingArguments(**settings)


def train(model, tmp_path, dataset=None, **overrides) -> MemLMTrainer:
    trainer = MemLMTrainer(
        model=model,
        args=training_args(tmp_path, **overrides),
        train_dataset=dataset if dataset is not None else copy_task(640),
        data_collator=default_data_collator,
    )
    trainer.train()
    return trainer


@torch.no_grad()
def task_loss(model, dataset) -> float:
    model.eval()
    batch = default_data_collator([dataset[i] for i in range(len(dataset))])
    return model(**batch).loss.item()


# -- memory learns ---------------------------------------------------------------------------------------
def test_trainer_steps_lower_the_loss_on_a_task_that_needs_memory(tmp_path):
    model = tiny_memlm("kv")
    held_out = copy_task(64, seed=1)
    before = task_loss(model, held_out)
    # memory blocks start as a no-op and need a larger step than the base: the memory learning rate
    train(model, tmp_path, lr_scheduler_type="constant", memory_learning_rate=3e-2)
    after = task_loss(model, held_out)
    with model.memory_disabled():
        without_memory = task_loss(model, held_out)
    assert before > CHANCE - 0.1  # untrained: chance
    # below chance: only possible by reading segment 0 back from memory ...
    assert after < CHANCE - 0.7, (before, after)
    # ... which the same weights cannot do with memory switched off
    assert without_memory > CHANCE - 0.15, without_memory


# -- optimizer groups and freezing -----------------------------------------------------------------------
def test_parameter_groups_are_decay_no_decay_and_memory(tmp_path):
    model = tiny_memlm("slot")
    args = training_args(
        tmp_path, learning_rate=1e-3, weight_decay=0.1, memory_learning_rate=5e-3, memory_weight_decay=0.01
    )
    groups = MemLMTrainer(model=model, args=args, train_dataset=copy_task(4)).create_optimizer().param_groups
    by_name = {group["name"]: group for group in groups}
    assert list(by_name) == ["decay", "no_decay", "memory"]
    assert (by_name["memory"]["lr"], by_name["memory"]["weight_decay"]) == (5e-3, 0.01)
    assert (by_name["decay"]["lr"], by_name["decay"]["weight_decay"]) == (1e-3, 0.1)
    assert by_name["no_decay"]["weight_decay"] == 0.0
    ids = {name: {id(p) for p in group["params"]} for name, group in by_name.items()}
    assert ids["memory"] == {id(p) for p in model.memory_blocks.parameters()}
    norms = {id(p) for n, p in model.language_model.named_parameters() if "norm" in n}
    assert norms and norms <= ids["no_decay"]
    assert id(model.language_model.model.layers[0].self_attn.q_proj.weight) in ids["decay"]
    assert id(model.memory_blocks["0"].erase_proj.bias) in ids["memory"]  # memory wins over "bias"
    # every trainable parameter exactly once (the tied embedding counted once)
    all_ids = [id(p) for group in groups for p in group["params"]]
    assert len(all_ids) == len(set(all_ids)) == len({id(p) for p in model.parameters()})


def test_trainer_optimizer_uses_the_memory_learning_rate(tmp_path):
    model = configure_trainable(tiny_memlm("kv"), "memory_only")
    trainer = MemLMTrainer(
        model=model,
        args=training_args(tmp_path, memory_learning_rate=3e-2),
        train_dataset=copy_task(16),
        data_collator=default_data_collator,
    )
    optimizer = trainer.create_optimizer()
    assert [(g["name"], g["lr"]) for g in optimizer.param_groups] == [("memory", 3e-2)]  # base frozen: no other group


def test_memory_only_mode_trains_memory_and_leaves_the_base_unchanged(tmp_path):
    model = configure_trainable(tiny_memlm("kv"), "memory_only")
    base_before = {n: p.detach().clone() for n, p in model.language_model.named_parameters()}
    memory_before = memory_weights(model)
    train(model, tmp_path, max_steps=3)
    assert all(torch.equal(p, base_before[n]) for n, p in model.language_model.named_parameters())
    memory_after = memory_weights(model)
    assert all(not torch.equal(memory_after[n], memory_before[n]) for n in memory_before)


# -- LoRA + memory ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi3"])
def test_lora_targets_are_derived_from_the_base_type_and_stay_out_of_memory(model_type):
    model = MemLMForCausalLM(MemLMConfig(text_config=base_config(model_type), **memory_settings("kv")))
    pattern = lora_target_modules(model)
    assert pattern.startswith(r"language_model\.")
    peft_model = configure_trainable(model, "lora", {"r": 2})
    lora_modules = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]
    assert lora_modules and all(".language_model." in n for n in lora_modules)
    assert not any("memory_blocks" in n and "lora_" in n for n, _ in peft_model.named_parameters())
    # phi3 has no PEFT default: every linear of the decoder layers is a target
    if model_type == "phi3":
        assert {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"} <= {n.rsplit(".", 2)[-2] for n in lora_modules}


def test_lora_with_memory_trains_memory_saves_and_reloads_tensor_by_tensor(tmp_path):
    from peft import PeftModel, get_peft_model_state_dict

    base = tiny_base(seed=0)
    torch.manual_seed(0)
    model = configure_trainable(build_model(training_memory("kv"), base=base), "lora", {"r": 4, "lora_alpha": 8})
    # the wrapped base still attends causally: later tokens never change earlier logits
    probe_ids = torch.tensor(copy_task(1)["input_ids"])
    changed = probe_ids.clone()
    changed[:, 5:] = 2
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=probe_ids).logits[:, :5], model(input_ids=changed).logits[:, :5])
    wrapper = model.get_base_model().memory_blocks["0"]
    assert type(wrapper).__name__ == "ModulesToSaveWrapper"
    assert not any(p.requires_grad for p in wrapper.original_module.parameters())

    # memory parameters receive gradients through the PEFT wrapper (one backward on the task); at init only
    # the zero output projection's gradient is non-zero (the others are multiplied by it)
    batch = default_data_collator([copy_task(4)[i] for i in range(4)])
    model.train()
    model(**batch).loss.backward()
    trained_copy = wrapper.modules_to_save["default"]
    for name, param in trained_copy.named_parameters():
        assert param.requires_grad and param.grad is not None, f"memory {name} is not in the graph"
    assert trained_copy.mem_out.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in wrapper.original_module.parameters())
    model.zero_grad()

    memory_before = memory_weights(model)
    original_before = {n: p.detach().clone() for n, p in wrapper.original_module.named_parameters()}
    train(model, tmp_path, max_steps=5)
    memory_after = memory_weights(model)
    assert all(not torch.equal(memory_after[n], memory_before[n]) for n in memory_before), "memory did not train"
    assert all(torch.equal(p, original_before[n]) for n, p in wrapper.original_module.named_parameters())

    model.eval()
    probe = torch.tensor(copy_task(2, seed=5)["input_ids"])
    with torch.no_grad():
        expected_logits = model(input_ids=probe).logits
    trained_state = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    assert any("lora_B" in k for k in trained_state) and any("memory_blocks" in k for k in trained_state)

    written = save_trained_model(model, tmp_path / "out")  # adapter, then the merged model

    # adapter: onto a fresh wrap of the same base whose memory starts elsewhere (seed 1), so a weight that
    # failed to load would show
    torch.manual_seed(1)
    fresh = build_model(training_memory("kv"), base=tiny_base(seed=0))
    reloaded = PeftModel.from_pretrained(fresh, written["adapter"]).eval()
    reloaded_state = get_peft_model_state_dict(reloaded)
    assert set(reloaded_state) == set(trained_state)
    for key, tensor in trained_state.items():
        assert torch.equal(reloaded_state[key], tensor), key
    for name, tensor in memory_weights(reloaded).items():
        assert torch.equal(tensor, memory_after[name]), name

    # merged model: a plain MemLM checkpoint for AutoModelForCausalLM, same outputs
    merged = AutoModelForCausalLM.from_pretrained(written["model"]).eval()
    assert isinstance(merged, MemLMForCausalLM)
    for name, tensor in memory_weights(merged).items():
        assert torch.equal(tensor, memory_after[name]), name
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=probe).logits, expected_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reloaded(input_ids=probe).logits, expected_logits, atol=1e-5, rtol=1e-5)


# -- activation checkpointing ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["kv", "slot"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(kind, monkeypatch):
    dataset = copy_task(4)
    batch = default_data_collator([dataset[i] for i in range(4)])
    writes = []
    original_write = MemoryBlock.forward

    def counting_forward(self, hidden_states, state, mode, mask=None, **kwargs):
        if mode == "write":
            writes.append(self.layer_index)
        return original_write(self, hidden_states, state, mode, mask, **kwargs)

    monkeypatch.setattr(MemoryBlock, "forward", counting_forward)

    def loss_and_grads(checkpointing: bool):
        model = tiny_memlm(kind, seed=3)
        with torch.no_grad():  # non-zero output projection, so the memory read matters
            model.memory_blocks["0"].output_projection.weight.normal_(0, 0.3)
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        recomputed = []
        model.language_model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: recomputed.append(1))
        writes.clear()
        loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads, len(writes), len(recomputed)

    loss_plain, grads_plain, writes_plain, calls_plain = loss_and_grads(False)
    loss_ckpt, grads_ckpt, writes_ckpt, calls_ckpt = loss_and_grads(True)
    assert calls_ckpt == 2 * calls_plain  # the layer really was recomputed on backward
    assert writes_plain == writes_ckpt == 2  # one write per segment, never replayed
    torch.testing.assert_close(loss_ckpt, loss_plain, atol=1e-6, rtol=1e-6)
    assert set(grads_ckpt) == set(grads_plain)
    assert any(n.startswith("memory_blocks") for n in grads_plain)
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], atol=1e-6, rtol=1e-5, msg=name)


# -- several processes -----------------------------------------------------------------------------------
QUICK_RUN = [
    "--training.max_steps",
    "3",
    "--training.logging_steps",
    "1",
    "--training.save_strategy",
    "no",
    "--training.eval_strategy",
    "no",
    "--data.eval_fraction",
    "0",
    "--training.warmup_steps",
    "0",
    "--training.per_device_train_batch_size",
    "2",
    "--training.disable_tqdm",
    "true",
]


def launch_two_processes(accelerate_config: Path, output_dir: Path, *extra: str) -> dict:
    """`accelerate launch -m hf_memlm train configs/tiny_cpu.yaml ...` with 2 CPU processes; the run's summary."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(accelerate_config),
        "-m",
        "hf_memlm",
        "train",
        str(ROOT / "configs" / "tiny_cpu.yaml"),
        *QUICK_RUN,
        *extra,
        "--output_dir",
        str(output_dir),
    ]
    for attempt in range(2):
        # one retry: process-group start-up on a loaded 2-core machine failed once in ~20 runs (not reproduced);
        # a second failure is a real one and fails the test with both launches' output
        result = subprocess.run(
            launch, env=env, cwd=output_dir.parent, capture_output=True, text=True, timeout=600, check=False
        )
        if result.returncode == 0:
            break
        print(f"launch attempt {attempt + 1} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        shutil.rmtree(output_dir, ignore_errors=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "on 2 process(es)" in result.stdout
    return json.loads((output_dir / "train_summary.json").read_text())


def one_process_like_two(output_dir: Path, *extra: str) -> dict:
    """The same 4 examples per step in one process: 2 per micro-batch, 2 accumulation steps."""
    from hf_memlm.cli import main

    assert (
        main(
            [
                "train",
                str(ROOT / "configs" / "tiny_cpu.yaml"),
                *QUICK_RUN,
                *extra,
                "--training.gradient_accumulation_steps",
                "2",
                "--output_dir",
                str(output_dir),
            ]
        )
        == 0
    )
    return json.loads((output_dir / "train_summary.json").read_text())


def assert_same_losses(two: dict, one: dict) -> None:
    assert (two["processes"], one["processes"]) == (2, 1)
    losses_two = [entry["loss"] for entry in two["log_history"]]
    losses_one = [entry["loss"] for entry in one["log_history"]]
    assert len(losses_two) == len(losses_one) == 3
    assert losses_two[-1] < losses_two[0]  # it trained
    assert losses_two == pytest.approx(losses_one, rel=1e-4)


def test_two_process_accelerate_run_matches_one_process(tmp_path):
    """DDP over gloo with 2 CPU processes, 2 examples per process and step, against one process with 2
    examples per micro-batch and 2 accumulation steps: the seeded sampler puts the same 4 examples in each
    step, so the per-step losses agree. Runs through `accelerate launch -m hf_memlm train`."""
    two = launch_two_processes(ROOT / "configs" / "accelerate" / "ddp_cpu.yaml", tmp_path / "two")
    one = one_process_like_two(tmp_path / "one")
    assert_same_losses(two, one)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "two")
    assert isinstance(reloaded, hf_memlm.MemLMForCausalLM)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["kv", "slot"])
def test_fsdp_two_processes_match_one_process(tmp_path, kind):
    """configs/accelerate/fsdp.yaml (FSDP2, one unit per decoder layer and per memory block) on 2 CPU
    processes, without mixed precision: same losses as one process, and a full checkpoint is saved."""
    import yaml

    settings = yaml.safe_load((ROOT / "configs" / "accelerate" / "fsdp.yaml").read_text())
    settings.update(num_processes=2, mixed_precision="no")
    cpu_config = tmp_path / "fsdp_cpu.yaml"
    cpu_config.write_text(yaml.safe_dump(settings))
    two = launch_two_processes(cpu_config, tmp_path / "two", "--model.memory.memory_type", kind)
    one = one_process_like_two(tmp_path / "one", "--model.memory.memory_type", kind)
    assert_same_losses(two, one)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "two")
    assert reloaded.config.memory_type == kind
