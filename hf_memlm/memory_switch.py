"""`disable_memory()`: the same weights with memory switched off, per caller (thread or asyncio task).

Part of the Hub payload: flat sibling files, single-dot relative imports, torch + transformers only.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from contextvars import ContextVar

# The models whose memory `disable_memory()` switched off in this thread (or task): a per-caller switch, so a
# baseline computed in one thread never turns memory off for another thread serving the same model.
_DISABLED_MODELS: ContextVar[frozenset[int]] = ContextVar("hf_memlm_disabled_models", default=frozenset())
# How many `disable_memory()` blocks are open, in any thread. While none is, memory is on without reading the
# ContextVar, which torch.compile cannot trace (a graph break per read); the compiled code guards on this count.
_OPEN_DISABLED = 0
_OPEN_DISABLED_LOCK = threading.Lock()


class MemorySwitch:
    """`memory_enabled` and `disable_memory()` for a memory model (mixed into `MemLMForCausalLM`)."""

    @property
    def memory_enabled(self) -> bool:
        """False inside `disable_memory()` (in the thread that entered it)."""
        return _OPEN_DISABLED == 0 or id(self) not in _DISABLED_MODELS.get()

    @contextmanager
    def disable_memory(self):
        """`with model.disable_memory():` runs the same weights with memory switched off (no reads, no writes):
        the no-memory baseline, named like PEFT's `disable_adapter()`. It holds for calls made by the thread (or
        asyncio task) that entered it; other threads calling this model meanwhile keep their memory."""
        global _OPEN_DISABLED
        with _OPEN_DISABLED_LOCK:
            _OPEN_DISABLED += 1
        token = _DISABLED_MODELS.set(_DISABLED_MODELS.get() | {id(self)})
        try:
            yield self
        finally:
            _DISABLED_MODELS.reset(token)
            with _OPEN_DISABLED_LOCK:
                _OPEN_DISABLED -= 1

    memory_disabled = disable_memory  # the earlier name, kept working


__all__ = ["MemorySwitch"]
