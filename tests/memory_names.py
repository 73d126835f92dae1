"""Names of memory-block submodules that differ between memory kinds (for tests that poke at weights)."""

from __future__ import annotations

from torch import nn


def memory_output_projection(block: nn.Module) -> nn.Linear:
    """The zero-initialised output projection `W_o` of a memory block of any kind.

    kv memory calls it `mem_out` (names no base model uses, so PEFT name matching never reaches it);
    slot memory still calls it `o_proj` until its own rename.
    """
    projection = getattr(block, "mem_out", None)
    return projection if projection is not None else block.o_proj
