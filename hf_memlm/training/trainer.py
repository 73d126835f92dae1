"""`transformers.Trainer` with a separate learning rate for the memory blocks.

Everything else is the stock Trainer: Accelerate (DDP, FSDP, DeepSpeed), gradient accumulation,
activation checkpointing, checkpoints and resuming. The model builds a fresh `MemoryState` inside
each forward call, so memory lives per example: rows of a batch, and processes of a multi-process run,
never share it, and nothing about memory has to be synchronised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainingArguments

from .optim import parameter_groups


@dataclass
class MemLMTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the memory blocks' own optimizer settings."""

    memory_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the memory blocks (default: learning_rate)."}
    )
    memory_weight_decay: float = field(default=0.0, metadata={"help": "Weight decay of the memory blocks."})

    def __post_init__(self):
        if self.dataloader_pin_memory and not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # nothing to pin for; avoids a warning per data loader
        super().__post_init__()
        # optimizers reject these only when they are built, after the output folder exists
        for name in ("learning_rate", "memory_learning_rate"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value} must be a finite number >= 0 (e.g. 1e-3).")
        if self.memory_weight_decay < 0:
            raise ValueError(f"memory_weight_decay={self.memory_weight_decay} must be >= 0.")


class MemLMTrainer(Trainer):
    """A `Trainer` whose optimizer has three parameter groups: decay, no decay, memory (see `optim.py`), and
    whose `push_to_hub` uploads hf_memlm's model card (code snippet, memory settings, training facts)."""

    def create_model_card(self, *args, **kwargs) -> None:
        # Trainer writes this card right before its final upload; TRL's trainers override it the same way
        from hf_memlm.integrations.hub import create_trainer_card

        create_trainer_card(self, *args, **kwargs)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        groups = parameter_groups(
            opt_model,
            decay_parameter_names=self.get_decay_parameter_names(opt_model),
            learning_rate=self.args.learning_rate,
            weight_decay=self.args.weight_decay,
            memory_learning_rate=getattr(self.args, "memory_learning_rate", None),
            memory_weight_decay=getattr(self.args, "memory_weight_decay", 0.0),
        )
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        builds_own_groups = {"params", "model", "optimizer_dict"} & set(optimizer_kwargs)
        if builds_own_groups or not (
            isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)
        ):
            raise ValueError(
                f"optim={self.args.optim!r} builds its own parameter groups, so the memory blocks cannot get their "
                "own learning rate; use a standard optimizer such as adamw_torch or adamw_torch_fused."
            )
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer


__all__ = ["MemLMTrainer", "MemLMTrainingArguments"]
