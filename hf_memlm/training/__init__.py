"""Training memory LMs with `transformers.Trainer` (+ Accelerate, + PEFT): model setup, freezing modes,
LoRA, optimizer parameter groups with a memory learning rate.

Library-only code (not part of the Hub payload): it may import hf_memlm, peft and accelerate.
"""

from .calibration import calibrate_memory
from .cpu_allocator import keep_freed_memory
from .memory_start import load_memory_from
from .model_setup import (
    ADAPTER_FOLDER,
    TRAINABLE_MODES,
    build_model,
    configure_trainable,
    is_peft_model,
    lora_target_modules,
    memory_block_names,
    memory_weights,
    parameter_counts,
    save_trained_model,
)
from .optim import parameter_groups
from .trainer import MemLMTrainer, MemLMTrainingArguments

__all__ = [
    "ADAPTER_FOLDER",
    "TRAINABLE_MODES",
    "MemLMTrainer",
    "MemLMTrainingArguments",
    "build_model",
    "calibrate_memory",
    "configure_trainable",
    "is_peft_model",
    "keep_freed_memory",
    "load_memory_from",
    "lora_target_modules",
    "memory_block_names",
    "memory_weights",
    "parameter_counts",
    "parameter_groups",
    "save_trained_model",
]
