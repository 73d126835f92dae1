"""`slot` memory: a fixed number of slots per sequence, content-addressed read, gated erase/add write.

Read: `s_i = <q_t, k(m_i)> / sqrt(d)`, `w = softmax(s)`, `r_t = sum_i w_i m_i` (multi-head over slot
chunks). Write (NTM-style, one step per segment): per-token write weights by content `w_t`, erase
`e_t = sigmoid(W_e h_t)`, add `a_t = W_a h_t`,
`M <- M * (1 - clamp(sum_t w_t e_t^T, max=1)) + sum_t w_t a_t^T`.
The state has the same size whatever the stream length and stays differentiable across segments.
Anchors: Neural Turing Machine / DNC, Larimar.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import initialization as init

from .memory_base import MemoryBlock, merge_heads, split_heads


class SlotMemory(MemoryBlock):
    state_names = ("memory",)

    def __init__(self, config, layer_index: int):
        super().__init__(config, layer_index)
        width = self.num_heads * self.head_dim
        self.num_slots = config.num_slots
        self.width = width
        # Learned initial contents: distinct slots, so content addressing can tell them apart from the start.
        self.initial_slots = nn.Parameter(torch.empty(self.num_slots, width))
        self.q_proj = nn.Linear(self.hidden_size, width, bias=False)
        self.slot_key_proj = nn.Linear(width, width, bias=False)
        self.write_key_proj = nn.Linear(self.hidden_size, width, bias=False)
        self.erase_proj = nn.Linear(self.hidden_size, width)
        self.add_proj = nn.Linear(self.hidden_size, width, bias=False)
        self.o_proj = nn.Linear(width, self.hidden_size, bias=False)

    def reset_parameters(self, std: float) -> None:
        init.normal_(self.initial_slots, mean=0.0, std=1.0 / math.sqrt(self.width))
        for proj in (self.q_proj, self.write_key_proj, self.erase_proj, self.add_proj):
            init.normal_(proj.weight, mean=0.0, std=std)
        init.normal_(self.slot_key_proj.weight, mean=0.0, std=1.0 / math.sqrt(self.width))
        init.zeros_(self.erase_proj.bias)
        init.zeros_(self.o_proj.weight)

    def init_state(self, batch_size: int, device, dtype) -> dict[str, torch.Tensor]:
        slots = self.initial_slots.to(device=device, dtype=dtype)
        return {"memory": slots.unsqueeze(0).expand(batch_size, -1, -1)}

    def check_state(self, state, batch_size: int) -> None:
        super().check_state(state, batch_size)
        got = tuple(state["memory"].shape)
        if len(got) != 3 or got[1:] != (self.num_slots, self.width):
            raise ValueError(
                f"memory_state 'memory' for layer {self.layer_index} has shape {got}; this model keeps "
                f"(batch, {self.num_slots} slots, {self.width}). Was it made by another model?"
            )

    def read(self, hidden_states, state):
        memory = state["memory"].to(hidden_states.dtype)  # (B, N, W)
        queries = split_heads(self.q_proj(hidden_states), self.num_heads)  # (B, H, T, d)
        slot_keys = split_heads(self.slot_key_proj(memory), self.num_heads)  # (B, H, N, d)
        scores = torch.matmul(queries, slot_keys.transpose(-1, -2)) / math.sqrt(self.head_dim)
        out = torch.matmul(torch.softmax(scores, dim=-1), split_heads(memory, self.num_heads))
        return self.o_proj(merge_heads(out))

    def write_weights(self, hidden_states, memory):
        """Per-token softmax over slots, (B, T, N): where each token writes."""
        write_keys = self.write_key_proj(hidden_states)  # (B, T, W)
        slot_keys = self.slot_key_proj(memory)  # (B, N, W)
        scores = torch.matmul(write_keys, slot_keys.transpose(-1, -2)) / math.sqrt(self.width)
        return torch.softmax(scores, dim=-1)

    def write(self, hidden_states, mask, state):
        memory = state["memory"]
        hidden_states = hidden_states.to(memory.dtype)
        token_mask = mask[..., None]
        weights = torch.where(token_mask, self.write_weights(hidden_states, memory), 0.0)  # (B, T, N)
        # where (not multiply): padded tokens may carry garbage, even NaN, that must not reach memory
        erase = torch.where(token_mask, torch.sigmoid(self.erase_proj(hidden_states)), 0.0)  # (B, T, W)
        add = torch.where(token_mask, self.add_proj(hidden_states), 0.0)
        return {"memory": self.apply_write(memory, weights, erase, add)}

    @staticmethod
    def apply_write(memory, weights, erase, add):
        """M * (1 - clamp(sum_t w_t e_t^T, max=1)) + sum_t w_t a_t^T, batched: (B,N,W), (B,T,N), (B,T,W)x2."""
        erase_total = torch.einsum("btn,btw->bnw", weights, erase).clamp(max=1.0)
        add_total = torch.einsum("btn,btw->bnw", weights, add)
        return memory * (1.0 - erase_total) + add_total
