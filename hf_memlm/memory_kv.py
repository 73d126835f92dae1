"""`kv` memory: an episodic store of past tokens' keys and values, read by (top-k) attention.

Each row keeps up to `memory_size` entries, oldest evicted first (FIFO). An entry pairs the key of token
`j` with the value of token `j + memory_value_shift`: with shift 1 a query that matches a past context
retrieves "what followed it" (kNN-LM style), which trains far faster than same-token values.
Keys and queries are L2-normalised; a learned per-head temperature sharpens the softmax.
Anchors: Memorizing Transformers (Wu et al. 2022), LongLLaMA / Focused Transformer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from .memory_base import MemoryBlock, merge_heads, split_heads

# Cap on one chunk of the (batch, heads, queries, entries) score tensor, in elements.
_SCORE_CHUNK_ELEMENTS = 1 << 25
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Initial softmax temperature on cosine scores (learned per head afterwards); see `reset_parameters`.
INITIAL_TEMPERATURE = 16.0


def retrieve(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor,
    scale: torch.Tensor,
    topk: int | None,
) -> torch.Tensor:
    """Attention of `queries` over stored entries.

    queries (B, H, T, d), keys (B, H, S, d), values (B, H, S, dv), valid (B, S) bool, scale (H,).
    Exact softmax over all valid entries when `topk` is None or >= S; otherwise an exact top-k per
    query (chunked over queries so the score tensor stays bounded). Rows with no valid entry read 0.
    """
    batch, heads, tokens, _ = queries.shape
    stored = keys.shape[2]
    keys = keys.to(queries.dtype)
    values = values.to(queries.dtype)
    has_entries = valid.any(-1)
    if topk is None or topk >= stored:
        # Exact softmax over every entry through the fused kernel (no (B, H, T, S) score tensor kept).
        # A row with no entry may attend to its (zeroed) first slot so the kernel sees no empty row;
        # its read is replaced by 0 below.
        attend = (valid | ~has_entries[:, None])[:, None, None, :]
        scaled = queries * scale.view(1, heads, 1, 1).to(queries.dtype)
        out = F.scaled_dot_product_attention(scaled, keys, values, attn_mask=attend, scale=1.0)
        return torch.where(has_entries[:, None, None, None], out, torch.zeros_like(out))
    invalid = ~valid[:, None, None, :]  # (B, 1, 1, S)
    chunk = max(1, _SCORE_CHUNK_ELEMENTS // max(1, batch * heads * stored))
    outputs = []
    for start in range(0, tokens, chunk):
        q = queries[:, :, start : start + chunk]
        scores = torch.matmul(q, keys.transpose(-1, -2)) * scale.view(1, heads, 1, 1)
        scores = scores.masked_fill(invalid, torch.finfo(scores.dtype).min)
        top_scores, top_index = scores.topk(topk, dim=-1)  # (B, H, t, k)
        weights = torch.softmax(top_scores, dim=-1)
        # Masked entries can enter the top-k of rows with fewer than k entries: give them no weight.
        top_valid = valid[:, None, None, :].expand(-1, heads, q.shape[2], -1).gather(-1, top_index)
        weights = weights * top_valid
        # gather from the (B, H, S, dv) store with flat indices: its backward is a scatter into the
        # store, not into a (B, H, t, S, dv) expansion
        flat_index = top_index.reshape(batch, heads, -1, 1).expand(-1, -1, -1, values.shape[-1])
        gathered = values.gather(2, flat_index).view(batch, heads, q.shape[2], topk, values.shape[-1])
        out = torch.matmul(weights.unsqueeze(-2), gathered).squeeze(-2)
        outputs.append(out)
    out = torch.cat(outputs, dim=2)
    return torch.where(has_entries[:, None, None, None], out, torch.zeros_like(out))


def keep_newest(valid: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FIFO eviction: for each row, the indices (oldest first) of its newest `capacity` valid entries.

    valid (B, N) bool, entries ordered oldest -> newest. Returns (index (B, S), kept (B, S) bool) with
    S = the largest number kept in any row; rows keeping fewer are padded with `kept == False`.
    """
    batch, total = valid.shape
    newer_valid = valid.flip(-1).long().cumsum(-1).flip(-1)  # 1 = the newest valid entry
    keep = valid & (newer_valid <= capacity)
    counts = keep.sum(-1)
    size = int(counts.max()) if batch else 0
    positions = torch.arange(total, device=valid.device).expand(batch, total)
    # kept entries sort first, in their original (age) order
    order = torch.where(keep, positions, positions + total).argsort(dim=-1)[:, :size]
    kept = torch.arange(size, device=valid.device)[None, :] < counts[:, None]
    return order, kept


class KVMemory(MemoryBlock):
    state_names = ("keys", "values", "valid", "pending_key", "pending_valid")

    def __init__(self, config, layer_index: int):
        super().__init__(config, layer_index)
        width = self.num_heads * self.head_dim
        self.capacity = config.memory_size
        self.topk = config.memory_topk
        self.value_shift = config.memory_value_shift
        self.storage_dtype = _DTYPES.get(config.memory_dtype) if config.memory_dtype else None
        # Names no base model uses: PEFT matches `target_modules` by name suffix, so a memory projection
        # called `q_proj` would silently get LoRA from LoraConfig(target_modules=["q_proj", "v_proj"]).
        self.mem_query = nn.Linear(self.hidden_size, width, bias=False)
        self.mem_key = nn.Linear(self.hidden_size, width, bias=False)
        self.mem_value = nn.Linear(self.hidden_size, width, bias=False)
        self.mem_out = nn.Linear(width, self.hidden_size, bias=False)
        # log of the per-head softmax temperature applied to cosine similarities
        self.log_scale = nn.Parameter(torch.empty(self.num_heads))

    def reset_parameters(self, std: float) -> None:
        for proj in (self.mem_query, self.mem_value):
            init.normal_(proj.weight, mean=0.0, std=std)
        # Keys start equal to queries: a token's query then best matches stored tokens in the same context,
        # and with value shift 1 the read returns "what followed this context last time" from step 0.
        # With independent random q/k the read is noise and a from-scratch passkey model stays at chance.
        init.copy_(self.mem_key.weight, self.mem_query.weight)
        init.zeros_(self.mem_out.weight)
        # Scores are cosines in [-1, 1]: a temperature of sqrt(head_dim) (4 at head_dim 16) leaves the softmax
        # over hundreds of entries almost flat; 16 lets the best match dominate from the start.
        init.constant_(self.log_scale, math.log(INITIAL_TEMPERATURE))

    def _store_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.storage_dtype or dtype

    def init_state(self, batch_size: int, device, dtype) -> dict[str, torch.Tensor]:
        store = self._store_dtype(dtype)
        heads, dim = self.num_heads, self.head_dim
        return {
            "keys": torch.zeros(batch_size, heads, 0, dim, device=device, dtype=store),
            "values": torch.zeros(batch_size, heads, 0, dim, device=device, dtype=store),
            "valid": torch.zeros(batch_size, 0, device=device, dtype=torch.bool),
            "pending_key": torch.zeros(batch_size, heads, dim, device=device, dtype=store),
            "pending_valid": torch.zeros(batch_size, device=device, dtype=torch.bool),
        }

    def check_state(self, state, batch_size: int) -> None:
        super().check_state(state, batch_size)
        expected = (self.num_heads, self.head_dim)
        for name in ("keys", "values"):
            got = state[name].shape
            if state[name].dim() != 4 or (got[1], got[3]) != expected:
                raise ValueError(
                    f"memory_state '{name}' for layer {self.layer_index} has shape {tuple(got)}; this model "
                    f"stores (batch, {expected[0]} heads, entries, {expected[1]}). Was it made by another model?"
                )
        if state["valid"].shape[1] != state["keys"].shape[2]:
            raise ValueError(f"memory_state for layer {self.layer_index}: 'valid' does not match 'keys'.")

    def read(self, hidden_states, state):
        if state["keys"].shape[2] == 0:
            return torch.zeros_like(hidden_states)
        queries = F.normalize(split_heads(self.mem_query(hidden_states), self.num_heads), dim=-1)
        out = retrieve(queries, state["keys"], state["values"], state["valid"], self.log_scale.exp(), self.topk)
        return self.mem_out(merge_heads(out))

    def write(self, hidden_states, mask, state):
        batch, tokens, _ = hidden_states.shape
        store = self._store_dtype(hidden_states.dtype)
        keys = F.normalize(split_heads(self.mem_key(hidden_states), self.num_heads), dim=-1).to(store)
        values = split_heads(self.mem_value(hidden_states), self.num_heads).to(store)  # (B, H, T, d)
        pending_key, pending_valid = state["pending_key"], state["pending_valid"]
        if self.value_shift == 1:
            # Entry at token e pairs the key of the previous *valid* token (or the pending key carried over
            # from the last segment) with the value of token e.
            positions = torch.arange(tokens, device=mask.device).expand(batch, tokens)
            last_valid = torch.where(mask, positions, torch.full_like(positions, -1)).cummax(-1).values
            previous = torch.cat([torch.full_like(last_valid[:, :1], -1), last_valid[:, :-1]], dim=1)  # (B, T)
            with_pending = torch.cat([pending_key[:, :, None], keys], dim=2)  # index 0 = pending
            gather_index = (previous + 1)[:, None, :, None].expand(-1, self.num_heads, -1, self.head_dim)
            entry_keys = with_pending.gather(2, gather_index)
            entry_valid = mask & torch.where(previous >= 0, torch.ones_like(mask), pending_valid[:, None])
            # The last valid token's key waits for the value of the next segment's first token.
            has_valid = mask.any(-1)
            last_index = (
                last_valid[:, -1].clamp(min=0)[:, None, None, None].expand(-1, self.num_heads, 1, self.head_dim)
            )
            last_key = keys.gather(2, last_index)[:, :, 0]
            pending_key = torch.where(has_valid[:, None, None], last_key, pending_key)
            pending_valid = pending_valid | has_valid
        else:
            entry_keys, entry_valid = keys, mask

        all_keys = torch.cat([state["keys"], entry_keys], dim=2)
        all_values = torch.cat([state["values"], values], dim=2)
        all_valid = torch.cat([state["valid"], entry_valid], dim=1)
        index, kept = keep_newest(all_valid, self.capacity)
        gather_index = index[:, None, :, None].expand(-1, self.num_heads, -1, self.head_dim)
        # Zero the padding entries: a padded token's hidden state may be garbage (even NaN) and 0 * NaN
        # would leak into reads.
        keep = kept[:, None, :, None]
        return {
            "keys": torch.where(keep, all_keys.gather(2, gather_index), 0.0),
            "values": torch.where(keep, all_values.gather(2, gather_index), 0.0),
            "valid": kept,
            "pending_key": pending_key,
            "pending_valid": pending_valid,
        }
