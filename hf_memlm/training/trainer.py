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

from hf_memlm.memory_hooks import record_reads

from .cpu_allocator import keep_freed_memory
from .optim import parameter_groups
from .read_supervision import read_accuracy, read_supervision_loss


@dataclass
class MemLMTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the memory blocks' own optimizer settings."""

    memory_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the memory blocks (default: learning_rate)."}
    )
    memory_weight_decay: float = field(default=0.0, metadata={"help": "Weight decay of the memory blocks."})
    read_loss_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the loss on what `kv` reads pick, where examples carry `read_targets` "
            "(read_supervision.py); 0: the language-model loss alone."
        },
    )

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
        if not (math.isfinite(self.read_loss_weight) and self.read_loss_weight >= 0):
            raise ValueError(f"read_loss_weight={self.read_loss_weight} must be a finite number >= 0 (e.g. 1.0).")


class MemLMTrainer(Trainer):
    """A `Trainer` whose optimizer has three parameter groups: decay, no decay, memory (see `optim.py`), and
    whose `push_to_hub` uploads hf_memlm's model card (code snippet, memory settings, training facts).

    With `read_loss_weight > 0` and examples that carry `read_targets`, the loss adds that weight times the loss on
    what the memory's reads pick (`read_supervision.py`); the logs then also show `read_loss` and `read_accuracy`
    (the share of targeted reads whose best entry is the target), averaged since the last log."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # each step back-propagates through all segments of a call: glibc would unmap their activations and
        # page-fault them in again every step (`cpu_allocator.py`)
        keep_freed_memory()
        self._read_logs: dict[str, list[float]] = {"read_loss": [], "read_accuracy": []}

    def _set_signature_columns_if_needed(self) -> None:
        # `read_targets` is no argument of the model's forward: kept for `compute_loss`, which takes it out
        super()._set_signature_columns_if_needed()
        if getattr(self.args, "read_loss_weight", 0.0) > 0 and "read_targets" not in self._signature_columns:
            self._signature_columns.append("read_targets")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        read_targets = inputs.pop("read_targets", None)
        weight = getattr(self.args, "read_loss_weight", 0.0)
        if weight == 0 or read_targets is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with record_reads() as records:
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        if not records:
            raise ValueError(
                "training.read_loss_weight needs the model's memory reads recorded, which a compiled model does not "
                "do (and a model without memory has none): set torch_compile false, or read_loss_weight 0."
            )
        read_loss = read_supervision_loss(records, read_targets, inputs.get("attention_mask"))
        if read_loss is not None:
            self._read_logs["read_loss"].append(float(read_loss.detach()))
            accuracy = read_accuracy(records, read_targets, inputs.get("attention_mask"))
            self._read_logs["read_accuracy"].append(accuracy)
            if self._loss_scaled_for_accumulation(num_items_in_batch):
                # the language-model loss is already a share of the accumulated batch's; the read loss is a mean
                read_loss = read_loss / self.current_gradient_accumulation_steps
            loss = loss + weight * read_loss
        return (loss, outputs) if return_outputs else loss

    def _loss_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """Whether the Trainer takes the loss as already scaled for gradient accumulation (its own rule)."""
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # a training log: add the read's figures since the last one
            for name, values in self._read_logs.items():
                if values:
                    logs[name] = round(sum(values) / len(values), 4)
                    values.clear()
        super().log(logs, *args, **kwargs)

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
