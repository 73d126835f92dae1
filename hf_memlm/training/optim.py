"""Optimizer parameter groups, written out plainly: decay / no decay / memory.

  * decay     weight matrices and embeddings of the base model: `weight_decay`;
  * no decay  biases and normalisation gains of the base model: no weight decay;
  * memory    every parameter of the memory blocks: its own learning rate (`memory_learning_rate`,
              default: the main one) and its own weight decay (`memory_weight_decay`).

Memory blocks start as a no-op (zero output projection) and have to discover what to store, so they
often want a larger learning rate than a pretrained base being fine-tuned (lucidrains' habit).
Groups are decided by module type and parameter name, not by shape, so they stay right when FSDP
flattens parameters.
"""

from __future__ import annotations

from torch import nn

from hf_memlm.memory_base import MemoryBlock


def _is_normalization(module: nn.Module) -> bool:
    # LayerNorm, RMSNorm, LlamaRMSNorm, Qwen2RMSNorm, GemmaRMSNorm, ... all carry "Norm" in their class name
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


def parameter_groups(
    model: nn.Module,
    *,
    learning_rate: float,
    weight_decay: float,
    memory_learning_rate: float | None = None,
    memory_weight_decay: float = 0.0,
) -> list[dict]:
    """Three optimizer groups over the trainable parameters of `model` (frozen ones are left out).

    Each group carries `lr`, `weight_decay` and a `name` ("decay", "no_decay", "memory"); empty groups are
    dropped. A parameter shared by several modules (tied embeddings) is counted once.
    """
    memory_ids = {id(p) for module in model.modules() if isinstance(module, MemoryBlock) for p in module.parameters()}
    decay, no_decay, memory = [], [], []
    seen = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            if id(param) in memory_ids:
                memory.append(param)
            elif name == "bias" or name.endswith("_bias") or _is_normalization(module):
                no_decay.append(param)
            else:
                decay.append(param)
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


def describe_groups(groups: list[dict]) -> str:
    """One line per group: name, parameter count, learning rate, weight decay."""
    lines = []
    for group in groups:
        count = sum(p.numel() for p in group["params"])
        lines.append(f"{group['name']}: {count:,} params, lr {group['lr']:g}, weight decay {group['weight_decay']:g}")
    return "; ".join(lines)


__all__ = ["describe_groups", "parameter_groups"]
