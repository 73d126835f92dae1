"""One long haystack read into `kv` memory once, shared by many examples that differ only in their first
segments: the way to ask a hundred questions a million tokens back without reading a million tokens each time.

Why it is exact: with a single memory layer, what a segment writes depends on that segment's tokens only
(nothing below the memory layer reads memory, and a layer writes its output before its own read is added:
`memory_writes.py`). An example that reads `head` (whole segments: the needle and what surrounds it) and then
the first `n` tokens of the haystack therefore holds the head's entries followed by the haystack's entries as
the haystack writes them alone. The one entry that joins them, with `memory_value_shift=1`, pairs the head's
last key with the haystack's first value. `tests/test_shared_haystack.py` checks that the state built here
equals reading the example whole, entry by entry.
"""

from __future__ import annotations

import warnings

import torch

from hf_memlm.memory_state import MemoryState

# haystack tokens memorized per call (bounds the token ids and activations held at once)
READ_CHUNK_TOKENS = 65536


class SharedHaystack:
    """The memory of `haystack_ids` (1-D), read once, to be put after each example's own head.

    `state(head_ids, tokens)` is the memory after reading `head_ids` and then the haystack's first `tokens`
    tokens. Its tensors are views of buffers this object reuses: a state is valid until the next `state` call.
    """

    def __init__(self, model, haystack_ids: torch.Tensor, head_segments: int, progress=None):
        config = model.config
        if config.memory_type != "kv" or len(config.memory_layers) != 1:
            raise ValueError(
                "a shared haystack needs kv memory at a single layer (what a segment writes then depends on that "
                f"segment alone); this model has {config.memory_type} memory at layers {config.memory_layers}."
            )
        if haystack_ids.dim() != 1 or len(haystack_ids) % config.segment_length:
            raise ValueError(
                f"the haystack must be a 1-D run of whole segments of {config.segment_length} tokens, got shape "
                f"{tuple(haystack_ids.shape)}."
            )
        self.model = model
        self.segment_length = config.segment_length
        self.head_tokens = head_segments * config.segment_length
        self.layer = config.memory_layers[0]
        self.value_shift = config.memory_value_shift
        if self.head_tokens + len(haystack_ids) > config.memory_size:
            raise ValueError(
                f"memory_size={config.memory_size:,} entries cannot hold a head of {self.head_tokens:,} tokens and a "
                f"haystack of {len(haystack_ids):,}: the oldest entries would be evicted. Load the model with a "
                "larger memory_size."
            )
        block, entries = model.memory_blocks[str(self.layer)], self.head_tokens + len(haystack_ids)
        if block.topk is not None and block.search == "auto" and entries > block.search_threshold:
            # Each example rewrites the head's entries in place and gets a new state: an index of the whole
            # haystack is built for every example (30 s per head at a million entries, 1 thread, 4,096 lists).
            warnings.warn(
                f"a shared haystack of {entries:,} entries read through the approximate index (memory_search="
                f"'auto' searches above memory_search_threshold={block.search_threshold:,}) builds that index anew "
                "for every example, since the head's entries change with each. Load the model with "
                "memory_search='exact' to read it exactly, which is faster here.",
                stacklevel=2,
            )
        # Read one segment before the haystack (any will do: its own first segment), so that the haystack's
        # first token has an entry (with shift 1 the first token of a stream has none); that entry's key is
        # replaced by each head's last key.
        before = haystack_ids[: self.segment_length]
        offset = int(model.memorize(before[None].to(model.device)).layers[self.layer]["valid"].sum())
        state, stream = None, torch.cat([before, haystack_ids])
        for start in range(0, len(stream), READ_CHUNK_TOKENS):
            chunk = stream[start : start + READ_CHUNK_TOKENS][None].to(model.device)
            state = model.memorize(chunk, memory_state=state)
            if progress is not None:
                progress(min(start + chunk.shape[1], len(stream)) - len(before))
        hay = state.layers[self.layer]
        if not bool(hay["valid"][:, offset:].all()) or hay["keys"].shape[2] - offset != len(haystack_ids):
            raise AssertionError("every haystack token must have one valid entry")
        self.haystack_length = len(haystack_ids)
        # The head's entries: one per token, less the first one's with shift 1 (it has no key before it).
        self.head_entries = self.head_tokens - (1 if self.value_shift == 1 else 0)
        keys, values = hay["keys"][:, :, offset:], hay["values"][:, :, offset:]
        _, heads, _, dim = keys.shape
        total = self.head_entries + self.haystack_length
        self._keys = keys.new_empty(1, heads, total, dim)
        self._values = values.new_empty(1, heads, total, values.shape[3])
        self._keys[:, :, self.head_entries :] = keys
        self._values[:, :, self.head_entries :] = values
        self._valid = torch.ones(1, total, dtype=torch.bool, device=keys.device)
        self._pending_key = hay["pending_key"]
        self._pending_valid = hay["pending_valid"]

    def state(self, head_ids: torch.Tensor, tokens: int) -> MemoryState:
        """The memory after reading `head_ids` ((head_segments * segment_length,) tokens, all real) and then the
        haystack's first `tokens` tokens (a whole number of segments)."""
        if head_ids.dim() != 1 or len(head_ids) != self.head_tokens:
            raise ValueError(
                f"head_ids must hold exactly {self.head_tokens} tokens, got shape {tuple(head_ids.shape)}."
            )
        if tokens % self.segment_length or not 0 < tokens <= self.haystack_length:
            raise ValueError(
                f"tokens={tokens} must be a whole number of segments ({self.segment_length}) up to the haystack's "
                f"{self.haystack_length:,}."
            )
        head = self.model.memorize(head_ids[None].to(self.model.device)).layers[self.layer]
        count = head["keys"].shape[2]
        if count != self.head_entries or not bool(head["valid"].all()):
            raise AssertionError(f"the head wrote {count} entries, expected {self.head_entries} valid ones")
        self._keys[:, :, :count] = head["keys"]
        self._values[:, :, :count] = head["values"]
        end = count + tokens
        if self.value_shift == 1:
            # the haystack's first entry pairs the head's last key (pending after the head) with its first value
            self._keys[:, :, count] = head["pending_key"]
            if end < self._keys.shape[2]:  # the key of the haystack's token `tokens - 1` is the next entry's
                pending_key, pending_valid = self._keys[:, :, end].clone(), torch.ones_like(self._pending_valid)
            else:
                pending_key, pending_valid = self._pending_key, self._pending_valid
        else:
            pending_key, pending_valid = head["pending_key"], head["pending_valid"]
        layer = {
            "keys": self._keys[:, :, :end],
            "values": self._values[:, :, :end],
            "valid": self._valid[:, :end],
            "pending_key": pending_key,
            "pending_valid": pending_valid,
        }
        return MemoryState("kv", {self.layer: layer})


__all__ = ["READ_CHUNK_TOKENS", "SharedHaystack"]
