"""`slot` memory learns: a few training steps on a task that only memory can solve."""

from __future__ import annotations

import math

import torch
from transformers import LlamaConfig

from hf_memlm import MemLMConfig, MemLMForCausalLM

VOCAB = 32  # ids 2..31 are the random symbols; chance is ln(30)
SEGMENT = 8
CHANCE = math.log(VOCAB - 2)


def copy_batch(num_examples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment 0: random symbols; segment 1: the same symbols. The loss is on segment 1 from its second token,
    so it beats chance only by reading segment 0 back from memory (the base model's window is one segment)."""
    generator = torch.Generator().manual_seed(seed)
    first = torch.randint(2, VOCAB, (num_examples, SEGMENT), generator=generator)
    input_ids = torch.cat([first, first], dim=1)
    labels = input_ids.clone()
    labels[:, : SEGMENT + 1] = -100
    return input_ids, labels


def tiny_slot_model(num_slots: int = 64) -> MemLMForCausalLM:
    torch.manual_seed(0)
    text = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    config = MemLMConfig(
        text_config=text,
        memory_type="slot",
        memory_layers=[0],
        segment_length=SEGMENT,
        memory_heads=2,
        num_slots=num_slots,
    )
    return MemLMForCausalLM(config)


@torch.no_grad()
def losses(model, input_ids, labels) -> tuple[float, float]:
    model.eval()
    with_memory = model(input_ids, labels=labels).loss.item()
    with model.memory_disabled():
        without_memory = model(input_ids, labels=labels).loss.item()
    return with_memory, without_memory


def test_slot_memory_trains_below_the_memory_disabled_loss():
    model = tiny_slot_model()
    held_out = copy_batch(64, seed=1)
    before, _ = losses(model, *held_out)
    memory = [p for n, p in model.named_parameters() if n.startswith("memory_blocks.")]
    base = [p for n, p in model.named_parameters() if not n.startswith("memory_blocks.")]
    # the memory learning rate is 3x the base's, as in the main job
    optimizer = torch.optim.AdamW([{"params": base, "lr": 1e-2}, {"params": memory, "lr": 3e-2}], weight_decay=0.0)
    model.train()
    for step in range(40):
        input_ids, labels = copy_batch(16, seed=100 + step)
        loss = model(input_ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with_memory, without_memory = losses(model, *held_out)
    assert before > CHANCE - 0.1  # untrained: chance (the output projection starts at zero)
    # well below chance: only possible by reading segment 0 back from the slots ...
    assert with_memory < CHANCE - 0.8, (before, with_memory)
    # ... which the same weights cannot do with memory switched off
    assert without_memory > CHANCE - 0.15, without_memory
