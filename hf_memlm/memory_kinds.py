"""The memory kinds, by the name `MemLMConfig.memory_type` gives them: the one registry of kinds.

A kind is a `MemoryBlock` subclass in a flat file of its own (`memory_<name>.py`, see `memory_base.py` for
what it implements). Registering it here is the only other change a new kind needs (plus `MemLMConfig`
fields for settings of its own): the config then accepts its name, the model builds its blocks beside the
chosen layers, `MemoryState` files name it, the model card describes it, and the test table in
`tests/conftest.py` runs every model behaviour over it.
"""

from __future__ import annotations

from .memory_base import MemoryBlock
from .memory_kv import KVMemory
from .memory_slot import SlotMemory

MEMORY_KINDS: dict[str, type[MemoryBlock]] = {
    "kv": KVMemory,
    "slot": SlotMemory,
}

__all__ = ["MEMORY_KINDS"]
