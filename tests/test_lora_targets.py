"""PEFT LoRA never lands in the memory blocks: neither with plain target names nor with our targets."""

from __future__ import annotations

import pytest
import torch
from conftest import SEGMENT, build
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

import hf_memlm


def _lora_modules(peft_model) -> list[str]:
    base = peft_model.get_base_model()
    return [name for name, module in base.named_modules() if isinstance(module, LoraLayer)]


@pytest.mark.parametrize("names", [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"]])
def test_plain_target_names_never_reach_memory(arch_kind, names):
    """PEFT matches target names by suffix: memory projections must not share names with a base's."""
    model = build(*arch_kind)
    memory_names = {name for name, _ in model.memory_blocks.named_modules()}
    assert not {name.rsplit(".", 1)[-1] for name in memory_names} & set(names)
    try:
        peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=names))
    except ValueError as error:  # a base without those names (GPT-2, GPT-NeoX, Phi-3): PEFT says so
        assert "not found" in str(error) or "Target modules" in str(error), error
        return
    wrapped = _lora_modules(peft_model)
    assert wrapped
    assert all(name.startswith("language_model.") for name in wrapped), wrapped


def test_recommended_targets_are_base_projections_only(arch_kind):
    model = build(*arch_kind)
    ids = torch.randint(3, 90, (1, 2 * SEGMENT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    targets = hf_memlm.lora_target_modules(model)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=targets))
    wrapped = _lora_modules(peft_model)
    assert wrapped and all(name.startswith("language_model.") for name in wrapped), wrapped
    assert not any("memory_blocks" in name for name, p in peft_model.named_parameters() if "lora_" in name)
    # LoRA starts as a no-op (B = 0): the wrapped model computes what it did before
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, expected)


def test_recommended_targets_follow_peft_defaults_or_decoder_linears():
    llama = build("llama", "kv")
    assert hf_memlm.lora_target_modules(llama) == r"language_model\..*\.(q_proj|v_proj)"
    phi3 = build("phi3", "kv")  # PEFT has no default for phi3: every linear of the decoder layers
    assert hf_memlm.lora_target_modules(phi3) == r"language_model\..*\.(down_proj|gate_up_proj|o_proj|qkv_proj)"


def test_target_names_are_checked():
    model = build("llama", "kv")
    with pytest.raises(ValueError, match=r"\['c_attn'\] name no module of the llama base model"):
        hf_memlm.lora_target_modules(model, ["c_attn"])
    with pytest.raises(ValueError, match="target_modules is empty"):
        hf_memlm.lora_target_modules(model, [])
    with pytest.raises(TypeError, match="expects a MemLMForCausalLM"):
        hf_memlm.lora_target_modules(model.language_model)
