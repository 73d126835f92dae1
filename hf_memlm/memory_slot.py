"""`slot` memory: a fixed number of slots per sequence, read by softmax content addressing, written by erase/add.

The seed's equations, per head, with `N` slots `m_i` of width `d` (the state never grows):

* read:  `w_t = softmax(tau * <q_t, a_i>)`, `r_t = sum_i w_i m_i`, output `W_o r_t` (`W_o` starts at zero);
* write: `M <- M * (1 - w_t e_t^T) + w_t a_t^T`, token by token in stream order, with erase
  `e_t = beta_t * 1` and add `a_t = beta_t * v_t`, where `beta_t = sigmoid(W_e h_t)` is a per-head write
  strength and `v_t = W_a h_t`. Per slot this is the soft delta rule `m_i <- m_i + beta_t w_ti (v_t - m_i)`:
  a slot holds a weighted average of what was written to it, never a pile-up, and a strong write replaces
  what the slot held (the latest fact wins).

What makes it learn (tried on the passkey job; a plain content-addressed version stayed at chance):

* Slots are addressed by where they sit in key space: each slot has a learned unit address `a_i`, and a
  token's write weights `softmax(tau * <k_t, a_i>)` and read weights `softmax(tau * <q_t, a_i>)` use the
  *same* projection for read queries and write keys (`address_proj`), so a query finds what a key with the
  same context wrote. Addressing by the slot contents moved the addresses whenever anything was written.
* Keys and queries are centred on the mean of this stream's keys (a sum and a count carried in the state), then
  cosine-normalised. A write centres with every key written so far, its own segment's included (the write comes
  after the segment was read, so nothing any token reads depends on its own or later tokens); a read centres
  with the keys of the earlier segments. The hidden states of a small LM share one dominant direction:
  uncentred, most tokens address the same few slots, and a mean over the tokens before each
  one is too noisy early in a stream.
* With `memory_value_shift=1` (default) token `t` is written at the address of token `t-1`: the memory maps a
  context to "what followed it", as in the `kv` kind. The last key of a segment waits in the state for the
  next segment's first value.
* `beta_t` is computed from the token being stored, so it can learn to skip filler. On passkey it stayed only
  weakly selective (a little higher on key digits than on filler) and starting it low (sigmoid(-2)) stopped
  learning altogether; what keeps a key over 1,000 filler tokens is the spread of keys over many slots
  (more slots per head, longer reach).

Writes happen after the segment is read (a token never reads what it or later tokens wrote). Within the
segment the per-token updates are applied exactly, in order, by a closed form with suffix products
(`M_new = prod_t (1 - g_t) * M + sum_t g_t prod_{s>t} (1 - g_s) v_t^T`, `g_t = beta_t w_t`), not a loop.
Anchors: Neural Turing Machine / DNC (erase/add), Schlag et al. 2021 and ARMT (delta rule), Larimar.

In bfloat16 / float16 models the projections run in the model's dtype, but the write itself (centring,
addressing, gates and the closed form) runs in float32, and the stream's key sum and count are kept in float32:
in half precision `1 - g` rounds to 0 for a strong write (log 0 = -inf, then NaN), and a count or a sum of keys
stops growing (bfloat16) or overflows (float16) on a long stream.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from .memory_base import MemoryBlock, merge_heads, split_heads

# Initial softmax temperature on cosine scores (learned per head afterwards), as in `kv`.
INITIAL_TEMPERATURE = 16.0


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class SlotMemory(MemoryBlock):
    """Constant-size slot memory. State per sequence: `memory` (N slots x heads*d) plus the stream's key sum
    and count (for centring) and the pending key of the last written token (for the value shift)."""

    state_names = ("memory", "key_sum", "key_count", "pending_key", "pending_valid")

    def __init__(self, config, layer_index: int):
        super().__init__(config, layer_index)
        width = self.num_heads * self.head_dim
        settings = config.memory_settings  # SlotSettings (memory_settings.py)
        self.num_slots = settings.num_slots
        self.width = width
        self.value_shift = settings.memory_value_shift
        # Submodule names differ from the base's attention names (q_proj, ...) so that PEFT never matches them.
        self.address_proj = nn.Linear(self.hidden_size, width, bias=False)  # read queries and write keys
        self.slot_addresses = nn.Parameter(torch.empty(self.num_heads, self.num_slots, self.head_dim))
        self.erase_proj = nn.Linear(self.hidden_size, self.num_heads)  # write strength beta (erase e = beta * 1)
        self.add_proj = nn.Linear(self.hidden_size, width, bias=False)  # value v (add a = beta * v)
        self.readout_proj = nn.Linear(width, self.hidden_size, bias=False)  # W_o
        self.log_temperature = nn.Parameter(torch.empty(self.num_heads))

    @property
    def output_projection(self) -> nn.Linear:
        return self.readout_proj

    @property
    def input_projections(self) -> tuple[nn.Linear, ...]:
        return (self.address_proj, self.erase_proj, self.add_proj)

    @staticmethod
    def count_entries(state):
        memory = state["memory"]
        return torch.full((memory.shape[0],), memory.shape[1], dtype=torch.long, device=memory.device)

    @staticmethod
    def describe_settings(config):
        return [
            ("capacity", f"{config.num_slots} slots per sequence (constant size)"),
            ("value shift", str(config.memory_value_shift)),
        ]

    def reset_parameters(self, std: float) -> None:
        for proj in (self.address_proj, self.erase_proj, self.add_proj):
            init.normal_(proj.weight, mean=0.0, std=std)
        init.normal_(self.slot_addresses, mean=0.0, std=1.0)
        init.zeros_(self.erase_proj.bias)  # beta = 0.5 at first; starting at sigmoid(-2) stopped learning
        init.zeros_(self.readout_proj.weight)
        init.constant_(self.log_temperature, math.log(INITIAL_TEMPERATURE))

    # -- state -------------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, device, dtype) -> dict[str, torch.Tensor]:
        statistics = _at_least_float32(dtype)  # a running sum and count: half precision would stall or overflow
        return {
            "memory": torch.zeros(batch_size, self.num_slots, self.width, device=device, dtype=dtype),
            "key_sum": torch.zeros(batch_size, self.width, device=device, dtype=statistics),
            "key_count": torch.zeros(batch_size, device=device, dtype=statistics),
            "pending_key": torch.zeros(batch_size, self.width, device=device, dtype=dtype),
            "pending_valid": torch.zeros(batch_size, device=device, dtype=torch.bool),
        }

    def check_state(self, state, batch_size: int) -> None:
        # the slot tensor first: a state from another model is most often told apart by it
        if "memory" in state:
            got = tuple(state["memory"].shape)
            if len(got) != 3 or got[1:] != (self.num_slots, self.width):
                raise ValueError(
                    f"memory_state 'memory' for layer {self.layer_index} has shape {got}; this model keeps "
                    f"(batch, {self.num_slots} slots, {self.width}). Was it made by another model?"
                )
        super().check_state(state, batch_size)
        for name in ("key_sum", "pending_key"):
            if tuple(state[name].shape[1:]) != (self.width,):
                raise ValueError(
                    f"memory_state '{name}' for layer {self.layer_index} has shape {tuple(state[name].shape)}; "
                    f"this model keeps (batch, {self.width}). Was it made by another model?"
                )

    # -- addressing --------------------------------------------------------------------------------------
    def address_weights(self, centred: torch.Tensor) -> torch.Tensor:
        """Softmax over slots of the cosine between centred keys/queries (B, T, W) and the slot addresses,
        per head: (B, H, T, N)."""
        directions = F.normalize(split_heads(centred, self.num_heads), dim=-1)
        addresses = F.normalize(self.slot_addresses, dim=-1).to(directions.dtype)
        scores = torch.matmul(directions, addresses.transpose(-1, -2).unsqueeze(0))
        temperature = self.log_temperature.exp().to(directions.dtype).view(1, -1, 1, 1)
        return torch.softmax(scores * temperature, dim=-1)

    def read(self, hidden_states, state):
        if not torch.compiler.is_compiling() and not bool(state["memory"].any()):
            # nothing written yet (the first segment): every slot is 0, so is the read, and so is its gradient
            # (compiled code reads the zeros instead of asking the host: a sync, and a graph break)
            return torch.zeros_like(hidden_states)
        memory = state["memory"].to(hidden_states.dtype)
        queries = self.address_proj(hidden_states)
        # centred on the mean of the keys written so far (earlier segments), as the keys were when written
        count = state["key_count"].clamp(min=1.0)[:, None]
        queries = queries - (state["key_sum"] / count).to(queries.dtype)[:, None, :]
        weights = self.address_weights(queries)  # (B, H, T, N)
        slots = memory.view(memory.shape[0], self.num_slots, self.num_heads, self.head_dim).transpose(1, 2)
        return self.readout_proj(merge_heads(torch.matmul(weights, slots)))

    # -- writing -----------------------------------------------------------------------------------------
    def write(self, hidden_states, mask, state):
        dtype = state["memory"].dtype
        compute = _at_least_float32(dtype)  # the write runs in float32 even in a half-precision model
        memory = state["memory"].to(compute)
        hidden_states = hidden_states.to(dtype)
        batch, tokens, _ = hidden_states.shape
        token_mask = mask[..., None]
        # where (not multiply): padded tokens may carry garbage, even NaN, that must not reach memory
        keys = torch.where(token_mask, self.address_proj(hidden_states).to(compute), 0.0)  # (B, T, W)
        # Centre on the mean of every key written so far, this segment's included: the write happens after the
        # segment was read, so no token ever reads anything centred with its own or a later token's key.
        key_sum = state["key_sum"].to(compute) + keys.sum(1)
        key_count = state["key_count"].to(compute) + mask.to(compute).sum(1)
        centred = keys - key_sum[:, None, :] / key_count.clamp(min=1.0)[:, None, None]

        if self.value_shift == 1:
            # the value of token t goes to the address of the previous valid token (or the pending one)
            positions = torch.arange(tokens, device=mask.device).expand(batch, tokens)
            last_valid = torch.where(mask, positions, torch.full_like(positions, -1)).cummax(-1).values
            previous = torch.cat([torch.full_like(last_valid[:, :1], -1), last_valid[:, :-1]], dim=1)
            with_pending = torch.cat([state["pending_key"][:, None, :], centred], dim=1)  # index 0 = pending
            entry_keys = with_pending.gather(1, (previous + 1)[..., None].expand(-1, -1, self.width))
            entry_valid = mask & torch.where(previous >= 0, torch.ones_like(mask), state["pending_valid"][:, None])
            has_valid = mask.any(-1)
            last_key = centred.gather(1, last_valid[:, -1].clamp(min=0)[:, None, None].expand(-1, 1, self.width))
            pending_key = torch.where(has_valid[:, None], last_key[:, 0], state["pending_key"].to(compute))
            pending_valid = state["pending_valid"] | has_valid
        else:
            entry_keys, entry_valid = centred, mask
            pending_key, pending_valid = state["pending_key"], state["pending_valid"]

        weights = self.address_weights(entry_keys)  # (B, H, T, N)
        strength = torch.sigmoid(self.erase_proj(hidden_states).to(compute)).transpose(1, 2)  # beta (B, H, T)
        gates = torch.where(entry_valid[:, None, :, None], weights * strength[..., None], 0.0)
        values = torch.where(token_mask, self.add_proj(hidden_states).to(compute), 0.0)
        slots = memory.view(batch, self.num_slots, self.num_heads, self.head_dim).transpose(1, 2)
        slots = self.apply_write(slots, gates, split_heads(values, self.num_heads))
        return {
            "memory": slots.transpose(1, 2).reshape(batch, self.num_slots, self.width).to(dtype),
            "key_sum": key_sum.to(state["key_sum"].dtype),
            "key_count": key_count.to(state["key_count"].dtype),
            "pending_key": pending_key.to(state["pending_key"].dtype),
            "pending_valid": pending_valid,
        }

    @staticmethod
    def apply_write(memory: torch.Tensor, gates: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Apply `M <- M * (1 - w_t e_t^T) + w_t a_t^T` for t = 1..T in order, with `e_t = beta_t * 1` and
        `a_t = beta_t v_t`, i.e. per slot `m_i <- (1 - g_ti) m_i + g_ti v_t` with `g_t = beta_t w_t`.

        memory (..., N, d), gates g (..., T, N) in [0, 1], values v (..., T, d) -> new memory (..., N, d).
        Closed form of the sequential updates: `prod_t (1 - g_t) * M + sum_t g_t prod_{s>t} (1 - g_s) v_t^T`.
        A token with `g_t = 0` (padding) changes nothing.
        """
        if gates.shape[-2] == 0:
            return memory
        # products as sums of logs (cumsum along tokens, no flips); the clamp keeps log(1 - g) finite when a
        # write is total (g = 1), where the slot's earlier content is wiped either way (a bound below 1 in the
        # gates' dtype: 1 - 1e-6 rounds to 1 in half precision)
        log_keep = torch.log1p(-gates.clamp(max=1.0 - max(1e-6, torch.finfo(gates.dtype).eps)))
        prefix = log_keep.cumsum(-2)  # sum_{s<=t} log(1 - g_s)
        total = prefix[..., -1:, :]  # (..., 1, N)
        survive = torch.exp(total - prefix)  # prod_{s>t} (1 - g_s): what is left of token t's write
        added = torch.matmul((gates * survive).transpose(-1, -2), values)  # (..., N, d)
        return torch.exp(total).transpose(-1, -2) * memory + added
