"""A new memory kind is one file plus one registry line: registered in `MEMORY_KINDS` with its settings class, a
toy kind is accepted by the config with a setting of its own, built beside the chosen layers, carried, saved and
reloaded as state and as a saved model, counted, and described on the model card, with nothing else changed."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import SEGMENT, VOCAB, base_config
from torch import nn

import hf_memlm
from hf_memlm.integrations.model_card import render_model_card
from hf_memlm.memory_base import MemoryBlock, merge_heads, split_heads
from hf_memlm.memory_kinds import MEMORY_KINDS, MemoryKind
from hf_memlm.memory_settings import MemorySettings


@dataclass(frozen=True)
class RunningMeanSettings(MemorySettings):
    mean_scale: float = 1.0  # the read is the running mean times this

    def check(self) -> None:
        if not self.mean_scale > 0:
            raise ValueError(f"MemLMConfig: mean_scale={self.mean_scale!r} must be positive.")


class RunningMeanMemory(MemoryBlock):
    """Remembers the running mean of the values written so far (one entry per row)."""

    state_names = ("total", "count")

    def __init__(self, config, layer_index: int):
        super().__init__(config, layer_index)
        width = self.num_heads * self.head_dim
        self.scale = config.memory_settings.mean_scale
        self.value = nn.Linear(self.hidden_size, width, bias=False)
        self.readout = nn.Linear(width, self.hidden_size, bias=False)

    @property
    def output_projection(self) -> nn.Linear:
        return self.readout

    @staticmethod
    def count_entries(state):
        return (state["count"] > 0).long()

    @staticmethod
    def describe_settings(config):
        return [("capacity", "one running mean per sequence")]

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.value.weight, std=std)
        nn.init.zeros_(self.readout.weight)

    def init_state(self, batch_size, device, dtype):
        width = self.num_heads * self.head_dim
        return {
            "total": torch.zeros(batch_size, width, device=device, dtype=dtype),
            "count": torch.zeros(batch_size, device=device, dtype=dtype),
        }

    def read(self, hidden_states, state):
        mean = self.scale * state["total"] / state["count"].clamp(min=1)[:, None]
        heads = split_heads(mean[:, None, :].expand(-1, hidden_states.shape[1], -1), self.num_heads)
        return self.readout(merge_heads(heads))

    def write(self, hidden_states, mask, state):
        values = torch.where(mask[..., None], self.value(hidden_states), 0.0)
        return {"total": state["total"] + values.sum(1), "count": state["count"] + mask.sum(1)}


def test_a_registered_kind_works_everywhere_without_other_changes(monkeypatch, tmp_path):
    monkeypatch.setitem(MEMORY_KINDS, "running_mean", MemoryKind(RunningMeanSettings, RunningMeanMemory))
    config = hf_memlm.MemLMConfig(
        text_config=base_config("llama"),
        memory_type="running_mean",
        memory_layers=[1],
        segment_length=SEGMENT,
        mean_scale=2.0,
    )
    assert config.memory_settings == RunningMeanSettings(mean_scale=2.0)
    with pytest.raises(ValueError, match="mean_scale=-1 must be positive"):
        hf_memlm.MemLMConfig(text_config=base_config("llama"), memory_type="running_mean", mean_scale=-1)
    model = hf_memlm.MemLMForCausalLM(config).eval()
    assert isinstance(model.memory_blocks["1"], RunningMeanMemory) and model.memory_blocks["1"].scale == 2.0
    model.save_pretrained(tmp_path / "model")
    reloaded = hf_memlm.MemLMForCausalLM.from_pretrained(tmp_path / "model")
    assert reloaded.config.memory_settings == RunningMeanSettings(mean_scale=2.0)
    ids = torch.randint(3, VOCAB, (2, 3 * SEGMENT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.memory_blocks["1"].output_projection.weight.normal_(std=0.3)
        whole = model(ids)
        first = model(ids[:, : 2 * SEGMENT])
        rest = model(ids[:, 2 * SEGMENT :], memory_state=first.memory_state)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), whole.logits, rtol=1e-5, atol=1e-5)
    assert whole.memory_state.num_entries().tolist() == [1, 1]
    whole.memory_state.save(tmp_path / "memory.safetensors")
    loaded = hf_memlm.MemoryState.load(tmp_path / "memory.safetensors")
    assert loaded.memory_type == "running_mean"
    torch.testing.assert_close(loaded.layers[1]["total"], whole.memory_state.layers[1]["total"])
    assert "| capacity | one running mean per sequence |" in render_model_card(model.config)


def test_an_unregistered_kind_is_refused_with_the_registered_ones_named():
    with pytest.raises(ValueError, match=r"memory_type='lstm' is unknown; choose one of \('kv', 'slot'\)"):
        hf_memlm.MemLMConfig(text_config=base_config("llama"), memory_type="lstm")
