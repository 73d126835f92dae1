"""Optimizer parameter groups, written out plainly: decay / no decay / memory.

  * decay     the base model's parameters that `Trainer.get_decay_parameter_names` decays: `weight_decay`;
  * no decay  the rest of the base model (biases, normalisation gains): no weight decay;
  * memory    every parameter of the memory blocks: its own learning rate (`memory_learning_rate`,
              default: the main one) and its own weight decay (`memory_weight_decay`).

Memory blocks start as a no-op (zero output projection) and have to discover what to store, so they
often want a larger learning rate than a pretrained base being fine-tuned (lucidrains' habit).
Memory parameters are found by module type (`memory_parameter_ids`), so they stay right under PEFT, DDP
and FSDP wrappers whose names gain prefixes.
"""

from __future__ import annotations

from torch import nn

from .model_setup import memory_parameter_ids


def parameter_groups(
    model: nn.Module,
    *,
    decay_parameter_names: list[str],
    learning_rate: float,
    weight_decay: float,
    memory_learning_rate: float | None = None,
    memory_weight_decay: float = 0.0,
) -> list[dict]:
    """Three optimizer groups over the trainable parameters of `model` (frozen ones are left out).

    `decay_parameter_names` are the names (as `model.named_parameters()` gives them) that get weight decay,
    e.g. `Trainer.get_decay_parameter_names(model)`. Each group carries `lr`, `weight_decay` and a `name`
    ("decay", "no_decay", "memory"); empty groups are dropped. A parameter shared by several modules (tied
    embeddings) is counted once.
    """
    memory_ids = memory_parameter_ids(model)
    decay_names = set(decay_parameter_names)
    decay, no_decay, memory = [], [], []
    for name, param in model.named_parameters():  # yields a shared parameter once
        if not param.requires_grad:
            continue
        if id(param) in memory_ids:
            memory.append(param)
        elif name in decay_names:
            decay.append(param)
        else:
            no_decay.append(param)
    groups = [
        {"name": "decay", "params": decay, "lr": learning_rate, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "lr": learning_rate, "weight_decay": 0.0},
        {
            "name": "memory",
            "params": memory,
            "lr": learning_rate if memory_learning_rate is None else memory_learning_rate,
            "weight_decay": memory_weight_decay,
        },
    ]
    groups = [group for group in groups if group["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameter; check model.trainable (everything is frozen).")
    return groups


__all__ = ["parameter_groups"]
