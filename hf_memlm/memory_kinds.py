"""The memory kinds, by the name `MemLMConfig.memory_type` gives them: the one registry of kinds.

A kind is a settings class (`memory_settings.py`: its config keys, defaults and checks) paired with a
`MemoryBlock` subclass in a flat file of its own (`memory_<name>.py`, see `memory_base.py`), as PEFT's
`register_peft_method` pairs a config class with its model. Registering it here is the only other change a new
kind needs: the config then accepts its name and its settings, the model builds its blocks beside the chosen
layers, `MemoryState` files name it, the model card describes it, and the test table in `tests/conftest.py`
runs every model behaviour over it.

Plain Python until a block is asked for: the config reads the settings without importing torch. (The block
modules are imported inside functions; transformers still copies them next to saved weights, as it finds
relative imports anywhere in a file.)
"""

from __future__ import annotations

from collections.abc import Callable

from .memory_settings import KVSettings, MemorySettings, SlotSettings


class MemoryKind:
    """A registered kind: `settings` (a `MemorySettings` subclass) and `block` (its `MemoryBlock` subclass,
    imported the first time it is asked for)."""

    def __init__(self, settings: type[MemorySettings], block: type | Callable[[], type]):
        self.settings = settings
        self._block = block

    @property
    def block(self) -> type:
        if not isinstance(self._block, type):
            self._block = self._block()
        return self._block

    def describe_settings(self, config) -> list[tuple[str, str]]:
        """(name, value) rows of this kind's settings in `config`, for the model card."""
        return self.block.describe_settings(config)


def _kv_block() -> type:
    from .memory_kv import KVMemory

    return KVMemory


def _slot_block() -> type:
    from .memory_slot import SlotMemory

    return SlotMemory


MEMORY_KINDS: dict[str, MemoryKind] = {}


def register_memory_kind(name: str, settings: type[MemorySettings], block: type | Callable[[], type]) -> None:
    """Register kind `name`: its settings class and its block class (or a function returning it, so that the
    block's module is imported only when a model is built)."""
    MEMORY_KINDS[name] = MemoryKind(settings, block)


register_memory_kind("kv", KVSettings, _kv_block)
register_memory_kind("slot", SlotSettings, _slot_block)


def memory_block(name: str) -> type:
    """The `MemoryBlock` subclass of kind `name`."""
    return MEMORY_KINDS[name].block


__all__ = ["MEMORY_KINDS", "MemoryKind", "memory_block", "register_memory_kind"]
