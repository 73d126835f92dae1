"""`MemoryState`: what a memory LM remembers about each sequence of a batch.

Memory contents are data, not weights: they live outside the model, are passed into `forward` and come
back in its output, and are saved with `save()` / `load()` (safetensors) apart from the checkpoint.
Part of the Hub payload: imports only torch and transformers-side dependencies.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch
from safetensors.torch import load_file, save_file

_FORMAT = "hf_memlm.MemoryState/1"
# Tensors of the generation window (tokens held in the base model's KV cache whose memory writes are
# still pending) are kept under this pseudo-layer name.
WINDOW = "window"


class MemoryState:
    """Per-layer memory tensors, batch first, plus the pending generation window.

    `layers[layer_index][name]` is a tensor whose first dimension is the batch. `window` holds the
    hidden states (per memory layer) and attention mask of tokens that are in the base model's KV cache
    but not yet written to memory (used by `generate`); it is empty after a plain forward.
    """

    def __init__(
        self,
        memory_type: str,
        layers: dict[int, dict[str, torch.Tensor]],
        window: dict[str, torch.Tensor] | None = None,
    ):
        self.memory_type = memory_type
        self.layers = {int(k): dict(v) for k, v in layers.items()}
        self.window = dict(window) if window else {}

    # -- shape -------------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        for tensors in self.layers.values():
            for tensor in tensors.values():
                return tensor.shape[0]
        raise ValueError("MemoryState has no tensors")

    @property
    def window_length(self) -> int:
        mask = self.window.get("mask")
        return 0 if mask is None else mask.shape[1]

    def _tensors(self):
        for layer, tensors in self.layers.items():
            for name, tensor in tensors.items():
                yield f"layer.{layer}.{name}", tensor
        for name, tensor in self.window.items():
            yield f"{WINDOW}.{name}", tensor

    def _map(self, fn) -> MemoryState:
        layers = {layer: {name: fn(t) for name, t in tensors.items()} for layer, tensors in self.layers.items()}
        window = {name: fn(t) for name, t in self.window.items()}
        return MemoryState(self.memory_type, layers, window)

    # -- tensor-like helpers -----------------------------------------------------------------------------
    def detach(self) -> MemoryState:
        """A copy cut from the autograd graph (truncated back-propagation through time)."""
        return self._map(lambda t: t.detach())

    def to(self, *args, **kwargs) -> MemoryState:
        """Move (or cast floating tensors) like `Tensor.to`; masks keep their dtype."""

        def move(t: torch.Tensor) -> torch.Tensor:
            if t.is_floating_point():
                return t.to(*args, **kwargs)
            device = kwargs.get("device") or next((a for a in args if isinstance(a, (str, torch.device))), None)
            return t.to(device) if device is not None else t

        return self._map(move)

    def select(self, batch_indices: Sequence[int] | torch.Tensor) -> MemoryState:
        """Rows `batch_indices` in that order (beam search reorders, filtering finished rows, ...)."""
        index = torch.as_tensor(batch_indices, dtype=torch.long)
        return self._map(lambda t: t.index_select(0, index.to(t.device)))

    def repeat_interleave(self, repeats: int) -> MemoryState:
        """Each row `repeats` times (num_return_sequences / beams)."""
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def without_window(self) -> MemoryState:
        return MemoryState(self.memory_type, self.layers)

    def num_entries(self) -> torch.Tensor:
        """Stored entries per row (kv: valid entries of the first memory layer; slot: number of slots)."""
        first = self.layers[min(self.layers)]
        if "valid" in first:
            return first["valid"].sum(-1)
        return torch.full((self.batch_size,), first["memory"].shape[1], dtype=torch.long)

    # -- persistence -------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write to a safetensors file (e.g. `memory.safetensors`)."""
        tensors = {name: t.detach().contiguous().cpu() for name, t in self._tensors()}
        metadata = {
            "format": _FORMAT,
            "memory_type": self.memory_type,
            "layers": json.dumps(sorted(self.layers)),
        }
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> MemoryState:
        """Read a file written by `save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != _FORMAT:
            raise ValueError(
                f"{path} is not a MemoryState file (format {metadata.get('format')!r}, expected {_FORMAT!r}); "
                "write it with MemoryState.save()."
            )
        flat = load_file(str(path), device=str(device))
        layers: dict[int, dict[str, torch.Tensor]] = {int(i): {} for i in json.loads(metadata["layers"])}
        window: dict[str, torch.Tensor] = {}
        for key, tensor in flat.items():
            head, _, rest = key.partition(".")
            if head == WINDOW:
                window[rest] = tensor
            else:
                layer, _, name = rest.partition(".")
                layers[int(layer)][name] = tensor
        return cls(metadata["memory_type"], layers, window)

    def __repr__(self) -> str:
        parts = []
        for layer, tensors in sorted(self.layers.items()):
            shapes = ", ".join(f"{name}={tuple(t.shape)}" for name, t in tensors.items())
            parts.append(f"{layer}: {shapes}")
        window = f", window={self.window_length} tokens" if self.window else ""
        return f"MemoryState({self.memory_type}, layers={{{'; '.join(parts)}}}{window})"


__all__ = ["MemoryState"]
