"""The settings of each memory kind: which `MemLMConfig` keys a kind reads, their defaults and their checks.

Plain Python, no torch: the config reads them without importing a memory block. A kind's settings class is
registered beside its block in `memory_kinds.py`. `MemLMConfig` keeps every setting under its flat key (as
config.json files have always held them) and gives the block `config.memory_settings`, an instance of its
kind's class.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

MEMORY_DTYPES = ("float32", "float16", "bfloat16", "float8_e4m3fn")
MEMORY_SEARCHES = ("auto", "exact")
KEY_PROJECTIONS = ("shared", "per_token")


@dataclass(frozen=True)
class MemorySettings:
    """Base of a kind's settings; each field is a `MemLMConfig` key, its default the config's default."""

    #: fields that may change when a saved model is loaded: they change how much is kept or how it is
    #: searched, not what the weights compute (`from_pretrained(folder, memory_size=...)`)
    load_time: ClassVar[tuple[str, ...]] = ()
    #: True when a row keeps one entry per token read, up to `memory_size`, oldest forgotten first: what a
    #: long text overflows can then be told, and a larger memory asked for at load time
    entries_per_token: ClassVar[bool] = False

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(field.name for field in fields(cls))

    @classmethod
    def defaults(cls) -> dict:
        return {field.name: field.default for field in fields(cls)}

    def check(self) -> None:
        """Raise ValueError naming the setting that is out of range and what it may be."""

    def capacity(self) -> dict:
        """The settings that say how much a row holds and reads (for evaluation reports)."""
        return {}


@dataclass(frozen=True)
class KVSettings(MemorySettings):
    """`kv` memory (`memory_kv.py`). See `MemLMConfig` for what each setting does."""

    memory_size: int = 65536
    memory_topk: int | None = 32
    memory_value_shift: int = 1
    memory_key_window: int = 1
    memory_key_projections: str = "shared"
    memory_dtype: str | None = None
    memory_value_dtype: str | None = None
    memory_search: str = "auto"
    memory_search_threshold: int = 4096
    memory_search_probes: int = 32

    load_time: ClassVar[tuple[str, ...]] = (
        "memory_size",
        "memory_topk",
        "memory_dtype",
        "memory_value_dtype",
        "memory_search",
        "memory_search_threshold",
        "memory_search_probes",
    )
    entries_per_token: ClassVar[bool] = True

    def check(self) -> None:
        check_positive_int("memory_size", self.memory_size)
        if self.memory_topk is not None:
            check_positive_int("memory_topk", self.memory_topk)
            if self.memory_topk > self.memory_size:
                raise ValueError(
                    f"MemLMConfig: memory_topk={self.memory_topk} is larger than memory_size={self.memory_size}; "
                    "top-k cannot read more entries than the memory holds. Lower memory_topk or raise memory_size."
                )
        check_value_shift(self.memory_value_shift)
        check_positive_int("memory_key_window", self.memory_key_window)
        if self.memory_key_projections not in KEY_PROJECTIONS:
            raise ValueError(
                f"MemLMConfig: memory_key_projections={self.memory_key_projections!r} is unknown; choose one of "
                f"{KEY_PROJECTIONS}."
            )
        for name, default in (("memory_dtype", "the model's dtype"), ("memory_value_dtype", "memory_dtype")):
            if (value := getattr(self, name)) is not None and value not in MEMORY_DTYPES:
                raise ValueError(
                    f"MemLMConfig: {name}={value!r} is not supported; choose one of {MEMORY_DTYPES} or None "
                    f"({default})."
                )
        if self.memory_search not in MEMORY_SEARCHES:
            raise ValueError(
                f"MemLMConfig: memory_search={self.memory_search!r} is unknown; choose one of {MEMORY_SEARCHES}."
            )
        check_positive_int("memory_search_threshold", self.memory_search_threshold)
        check_positive_int("memory_search_probes", self.memory_search_probes)

    def capacity(self) -> dict:
        return {"memory_size": self.memory_size, "memory_topk": self.memory_topk}


@dataclass(frozen=True)
class SlotSettings(MemorySettings):
    """`slot` memory (`memory_slot.py`): its size is part of its weights, so nothing changes at load time."""

    num_slots: int = 64
    memory_value_shift: int = 1

    def check(self) -> None:
        check_positive_int("num_slots", self.num_slots)
        check_value_shift(self.memory_value_shift)

    def capacity(self) -> dict:
        return {"num_slots": self.num_slots}


def check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"MemLMConfig: {name}={value!r} must be a positive integer.")


def check_value_shift(value) -> None:
    if value not in (0, 1) or isinstance(value, bool):
        raise ValueError(
            f"MemLMConfig: memory_value_shift={value!r} must be 0 (value of the same token) "
            "or 1 (value of the next token)."
        )


__all__ = ["KVSettings", "MemorySettings", "SlotSettings"]
