"""`MemLMCache`: the base model's KV cache for the generation window, plus the memory state.

Part of the Hub payload: flat sibling files, single-dot relative imports, torch + transformers only.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from .memory_state import MemoryState


class MemLMCache(DynamicCache):
    """The base model's KV cache for the current window, plus the memory state, so that `generate`
    carries, reorders (beam search) and expands (several return sequences) both together."""

    def __init__(self, config=None, memory_state: MemoryState | None = None):
        super().__init__(config=config)
        self.memory_state = memory_state

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.memory_state = self.memory_state.select(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.memory_state = self.memory_state.repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.memory_state = self.memory_state.select(indices)

    def keep_columns(self, columns: torch.Tensor) -> None:
        """Keep only the cached tokens at `columns` (1-D indices, in order), in every layer: the others were
        written to memory by every row."""
        for layer in self.layers:
            if getattr(layer, "is_sliding", False):
                raise ValueError(
                    "hf_memlm generation does not support sliding-window cache layers; the window is already "
                    "bounded by segment_length (set the base config's sliding_window to None)."
                )
            if layer.is_initialized and layer.keys is not None and layer.keys.numel():
                layer.keys = layer.keys.index_select(-2, columns)
                layer.values = layer.values.index_select(-2, columns)


__all__ = ["MemLMCache"]
