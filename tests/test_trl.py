"""TRL trains memory models: SFT (a loaded model, with a LoRA config, from a saved folder) and DPO.

TRL scores tokens with its fused LM head: it runs `model.base_model` for the final hidden states and applies the
LM head itself, so `base_model` must be the memory model without its head (memory included), not the wrapped base.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from conftest import KINDS, VOCAB, build, kind_settings_only, randomize_memory
from datasets import Dataset
from transformers import AutoModelForCausalLM

import hf_memlm
from hf_memlm.data.tokenizer import BYTE_VOCAB_SIZE, build_tokenizer
from hf_memlm.recipes.defaults import tiny_llama_config


@pytest.mark.parametrize("base", ["llama", "gpt2", "gemma"])
@pytest.mark.parametrize("kind", KINDS)
def test_base_model_is_the_memory_model_without_its_head(base, kind):
    model = build(base, kind)
    ids = torch.randint(1, VOCAB, (2, 21), generator=torch.Generator().manual_seed(0))  # three segments
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        hidden = model.base_model(ids, attention_mask=mask, use_cache=False).last_hidden_state
        alone = model.language_model(ids, attention_mask=mask).logits  # the wrapped base: no memory
    assert getattr(model, model.base_model_prefix) is not None
    torch.testing.assert_close(model.get_output_embeddings()(hidden), out.logits)
    assert not torch.allclose(alone[:, -1], out.logits[:, -1], atol=1e-4)  # memory is read in the backbone


def test_the_backbone_refuses_labels():
    model = build("llama", "kv")
    ids = torch.randint(1, VOCAB, (1, 5))
    with pytest.raises(TypeError, match="no LM head and takes no labels"):
        model.base_model(ids, labels=ids)


def test_a_saved_model_class_is_found_by_its_architecture_name(tmp_path):
    """Tools (TRL before 1.0) load a folder with `getattr(transformers, config.architectures[0])`."""
    build("llama", "slot").save_pretrained(tmp_path)
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    loaded = getattr(transformers, config.architectures[0]).from_pretrained(tmp_path)
    assert isinstance(loaded, hf_memlm.MemLMForCausalLM)


# -- training through TRL ----------------------------------------------------------------------------------------
def tiny_chat_model(kind: str, seed: int = 0) -> hf_memlm.MemLMForCausalLM:
    """A tiny Llama on the byte tokenizer with memory beside layer 0, memory weights randomised (non-zero output
    projection) so that every memory parameter gets a gradient from the first step."""
    text = tiny_llama_config(BYTE_VOCAB_SIZE, hidden_size=32, max_positions=64)
    text.pad_token_id, text.bos_token_id, text.eos_token_id = 256, 257, 258  # the byte tokenizer's
    torch.manual_seed(seed)
    settings = dict(memory_type=kind, memory_layers=[0], segment_length=16, memory_heads=2, num_slots=8, memory_size=64)
    config = hf_memlm.MemLMConfig(text_config=text, **kind_settings_only(settings))
    model = hf_memlm.MemLMForCausalLM(config)
    randomize_memory(model, seed, std=0.1)
    return model


TEXTS = [f"note {i}: the passkey is {10000 + 7 * i}. keep it. what is the passkey? {10000 + 7 * i}." for i in range(8)]


def memory_parameters(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "memory_blocks" in n and p.requires_grad}


def assert_all_changed(before: dict, after: dict) -> None:
    assert before and sorted(before) == sorted(after)
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert not unchanged, f"memory parameters left unchanged by training: {unchanged}"


def sft_config(tmp_path, **overrides):
    from trl import SFTConfig

    settings = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        use_cpu=True,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        max_length=96,  # several segments of 16 tokens: memory is read and written
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
    )
    return SFTConfig(**{**settings, **overrides})


@pytest.mark.parametrize("kind", KINDS)
def test_sft_trainer_trains_memory(tmp_path, kind):
    trl = pytest.importorskip("trl")
    model = tiny_chat_model(kind)
    before = memory_parameters(model)
    trainer = trl.SFTTrainer(
        model=model,
        args=sft_config(tmp_path),
        train_dataset=Dataset.from_dict({"text": TEXTS}),
        processing_class=build_tokenizer("byte"),
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert_all_changed(before, memory_parameters(model))


def test_sft_trainer_with_a_lora_config_trains_memory_in_full_and_the_base_through_lora(tmp_path):
    trl = pytest.importorskip("trl")
    from peft import LoraConfig

    model = tiny_chat_model("kv")
    base_before = {n: p.detach().clone() for n, p in model.language_model.named_parameters()}
    lora = LoraConfig(
        r=4,
        target_modules=hf_memlm.lora_target_modules(model),
        modules_to_save=[f"memory_blocks.{i}" for i in model.config.memory_layers],
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=sft_config(tmp_path),
        train_dataset=Dataset.from_dict({"text": TEXTS}),
        processing_class=build_tokenizer("byte"),
        peft_config=lora,
    )
    before = memory_parameters(trainer.model)
    assert any("modules_to_save" in name for name in before)
    trainer.train()
    assert_all_changed(before, memory_parameters(trainer.model))
    merged = trainer.model.merge_and_unload()
    assert isinstance(merged, hf_memlm.MemLMForCausalLM)
    changed = [n for n, p in merged.language_model.named_parameters() if not torch.equal(p, base_before[n])]
    assert changed and all("proj" in name for name in changed)  # only LoRA targets moved in the base


def test_sft_trainer_loads_a_saved_memory_model_folder(tmp_path):
    trl = pytest.importorskip("trl")
    folder = tmp_path / "model"
    tiny_chat_model("slot").save_pretrained(folder)
    build_tokenizer("byte").save_pretrained(folder)
    before = memory_parameters(AutoModelForCausalLM.from_pretrained(folder))
    trainer = trl.SFTTrainer(
        model=str(folder), args=sft_config(tmp_path), train_dataset=Dataset.from_dict({"text": TEXTS})
    )
    assert isinstance(trainer.model, hf_memlm.MemLMForCausalLM)
    trainer.train()
    assert_all_changed(before, memory_parameters(trainer.model))


def test_dpo_trainer_trains_memory(tmp_path):
    trl = pytest.importorskip("trl")
    model = tiny_chat_model("kv")
    before = memory_parameters(model)
    prompts = [text.rsplit("?", 1)[0] + "? " for text in TEXTS]
    data = Dataset.from_dict(
        {
            "prompt": prompts,
            "chosen": [text.rsplit("? ", 1)[1] for text in TEXTS],
            "rejected": [f"{20000 + i}." for i in range(len(TEXTS))],
        }
    )
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "dpo"),
        max_steps=3,
        use_cpu=True,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
    )
    trainer = trl.DPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),  # a model built in memory has no folder for TRL to load its reference from
        args=args,
        train_dataset=data,
        processing_class=build_tokenizer("byte"),
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert_all_changed(before, memory_parameters(model))
