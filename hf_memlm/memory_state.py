"""`MemoryState`: what a memory LM remembers about each sequence of a batch.

Memory contents are data, not weights: they live outside the model, are passed into `forward` and come
back in its output, and are saved with `save()` / `load()` (safetensors) apart from the checkpoint.
Part of the Hub payload: imports only torch and transformers-side dependencies.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .memory_base import LayerState
from .memory_kinds import MEMORY_KINDS, memory_block

_FORMAT = "hf_memlm.MemoryState/1"
# Tensors of the generation window (tokens held in the base model's KV cache whose memory writes are
# still pending) are kept under this pseudo-layer name.
WINDOW = "window"


class MemoryState:
    """Per-layer memory tensors, batch first, plus the pending generation window.

    `layers[layer_index][name]` is a tensor whose first dimension is the batch; `layers[layer_index]` is a
    `LayerState`, whose `index` (the `kv` search index) belongs to this state: it follows the state's rows
    (`select`), goes with the state's own tensors (`detach`, and `to` where nothing moves), and is dropped with
    the state. `window` holds the hidden states (per memory layer) and attention mask of tokens that are in the
    base model's KV cache but not yet written to memory (used by `generate`); it is empty after a plain forward.
    """

    def __init__(
        self,
        memory_type: str,
        layers: dict[int, dict[str, torch.Tensor]],
        window: dict[str, torch.Tensor] | None = None,
    ):
        self.memory_type = memory_type
        # the same tensors, so the same index (a write moves it to the state it makes; a state whose tensors
        # it no longer indexes does not use it: `KVMemory` checks that it fits first)
        self.layers = {
            int(k): LayerState(v, same_tensors_as=v) if isinstance(v, LayerState) else LayerState(v)
            for k, v in layers.items()
        }
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
        layers = {layer: _mapped(tensors, lambda _, t: fn(t)) for layer, tensors in self.layers.items()}
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
        rows = index.tolist()
        if rows == list(range(self.batch_size)):
            return self._map(lambda t: t)  # every row where it was (beams that all kept their place): no copy

        def pick(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.shape[0] == 1 or tensor.stride(0) == 0:
                # One row, or rows that are one row seen several times (a document remembered once for many
                # prompts or beams): a view of it, not a copy per row. A write gives each row its own.
                return tensor[:1].expand(len(rows), *tensor.shape[1:])
            return tensor.index_select(0, index.to(tensor.device))

        layers = {layer: {name: pick(t) for name, t in tensors.items()} for layer, tensors in self.layers.items()}
        window = {name: t.index_select(0, index.to(t.device)) for name, t in self.window.items()}
        selected = MemoryState(self.memory_type, layers, window)
        # An index built from the old rows (kv) is derived for the new ones, instead of being built again.
        kind = memory_block(self.memory_type)
        for layer, tensors in self.layers.items():
            kind.follow_rows(tensors, selected.layers[layer], rows)
        return selected

    def placed_like(self, reference: MemoryState, window_like: torch.Tensor) -> MemoryState:
        """This state with each floating tensor cast to the dtype of, and every tensor moved to the device of,
        the tensor of the same name in `reference` (e.g. a fresh state of the model that will read it); the
        window's tensors follow `window_like`."""

        def place(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            dtype = like.dtype if tensor.is_floating_point() else tensor.dtype
            return tensor.to(device=like.device, dtype=dtype)

        layers = {}
        for layer, tensors in self.layers.items():
            like = reference.layers[layer]
            layers[layer] = _mapped(tensors, lambda name, t, like=like: place(t, like.get(name, t)))
        window = {name: place(t, window_like) for name, t in self.window.items()}
        return MemoryState(self.memory_type, layers, window)

    def repeat_interleave(self, repeats: int) -> MemoryState:
        """Each row `repeats` times (num_return_sequences / beams)."""
        return self.select(torch.arange(self.batch_size).repeat_interleave(repeats))

    def without_window(self) -> MemoryState:
        return MemoryState(self.memory_type, self.layers)

    def num_entries(self) -> torch.Tensor:
        """Entries held per row, as the memory kind counts them (kv: stored tokens of the first memory layer;
        slot: its constant number of slots)."""
        first = self.layers[min(self.layers)]
        return memory_block(self.memory_type).count_entries(first)

    # -- persistence -------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, model=None) -> None:
        """Write to a safetensors file (e.g. `memory.safetensors`).

        With `model` (the model that wrote this memory) the file records a fingerprint of its weights, and
        `load(path, model=other)` warns when `other` is not that model: another model's memory has the
        same shapes but means nothing to it.

        The file is written next to its destination and then renamed over it, so a crash never leaves a
        half-written file. An existing file is replaced only if it is a MemoryState file (or empty): saving
        onto a model's `model.safetensors`, or any other file, raises a ValueError and leaves it untouched.
        """
        path = Path(path)
        check_save_target(path)
        tensors = {name: t.detach().contiguous().cpu() for name, t in self._tensors()}
        metadata = {
            "format": _FORMAT,
            "memory_type": self.memory_type,
            "layers": json.dumps(sorted(self.layers)),
        }
        if model is not None:
            metadata["model_fingerprint"] = model_fingerprint(model)
        # A unique hidden name in the same folder: the final rename stays on one file system (atomic).
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.partial")
        try:
            save_file(tensors, str(partial), metadata=metadata)
            with open(partial, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu", model=None) -> MemoryState:
        """Read a file written by `save`.

        Raises FileNotFoundError when `path` does not exist and ValueError, naming the file and what is
        wrong, when it is not a readable MemoryState file (a folder, empty, truncated, another safetensors
        file, metadata that does not match the tensors stored, NaN or inf values), or when `device` is not
        available. With `model`, warns when the file records the fingerprint of other weights (see `save`).
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"memory file {str(path)!r} does not exist.")
        _check_device(device, path)
        # header and tensors from one open file: a save that renames a new file over `path` cannot mix them
        with _open(path, device) as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != _FORMAT:
                raise ValueError(
                    f"{path} is not a MemoryState file (format {metadata.get('format')!r}, expected {_FORMAT!r}); "
                    "write it with MemoryState.save()."
                )
            memory_type, layer_names, window_names = _check_layout(path, metadata, list(handle.keys()))
            try:
                flat = {name: handle.get_tensor(name) for name in handle.keys()}
            except SafetensorError as error:
                raise ValueError(f"memory file {path} cannot be read: {error}") from error
        layers = {
            layer: {name: flat[f"layer.{layer}.{name}"] for name in names} for layer, names in layer_names.items()
        }
        window = {name: flat[f"{WINDOW}.{name}"] for name in window_names}
        state = cls(memory_type, layers, window)
        for name, tensor in state._tensors():
            if tensor.is_floating_point() and not _all_finite(tensor):
                raise ValueError(
                    f"memory file {path} holds NaN or inf values (in {name!r}); the memory is damaged (it was saved "
                    "from a run whose values overflowed). Read the documents into memory again."
                )
        recorded = metadata.get("model_fingerprint")
        if model is not None and recorded is not None and recorded != model_fingerprint(model):
            warnings.warn(
                f"memory file {path} was written by a model with other weights than this one (fingerprint "
                f"{recorded} vs {model_fingerprint(model)}); its contents mean nothing to this model. Read the "
                "documents again with this model.",
                UserWarning,
                stacklevel=2,
            )
        sizes = {tensor.shape[0] if tensor.dim() else None for _, tensor in state._tensors()}
        if len(sizes) != 1 or None in sizes:
            raise ValueError(
                f"memory file {path} is inconsistent: its tensors do not share one batch size (first dimensions "
                f"{sorted(s for s in sizes if s is not None)}); it was not written by MemoryState.save()."
            )
        return state

    def __repr__(self) -> str:
        parts = []
        for layer, tensors in sorted(self.layers.items()):
            shapes = ", ".join(f"{name}={tuple(t.shape)}" for name, t in tensors.items())
            parts.append(f"{layer}: {shapes}")
        window = f", window={self.window_length} tokens" if self.window else ""
        return f"MemoryState({self.memory_type}, layers={{{'; '.join(parts)}}}{window})"


def _mapped(tensors: LayerState, fn) -> LayerState:
    """`fn(name, tensor)` of each tensor; the index goes along where every tensor is still the same one (or a
    view of it in place: `detach`, a `to` that changes nothing), and is dropped where any was copied."""
    mapped = {name: fn(name, t) for name, t in tensors.items()}
    same = all(_same_memory(mapped[name], t) for name, t in tensors.items())
    return LayerState(mapped, same_tensors_as=tensors) if same else LayerState(mapped)


def _all_finite(tensor: torch.Tensor) -> bool:
    if tensor.dtype == torch.float8_e4m3fn:  # no isfinite kernel; it has no inf, and NaN is S.1111.111
        return not bool(((tensor.view(torch.uint8) & 0x7F) == 0x7F).any())
    return bool(torch.isfinite(tensor).all())


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    def where(t: torch.Tensor) -> tuple:
        return (t.device, t.dtype, t.data_ptr(), t.shape, t.stride())

    return where(a) == where(b)


_OPEN_ATTEMPTS = 5


def _open(path: Path, device="cpu"):
    """`safe_open` of `path`, whose checks of the header against the file's size give a ValueError naming the
    file (a folder, an empty, truncated or damaged file)."""
    if path.is_dir():
        raise ValueError(
            f"memory file {str(path)!r} is a folder; pass the path of a file written by MemoryState.save()."
        )
    for attempt in range(_OPEN_ATTEMPTS):
        if path.stat().st_size == 0:
            raise ValueError(f"memory file {path} is empty; it was not (completely) written by MemoryState.save().")
        try:
            return safe_open(str(path), framework="pt", device=str(device))
        except SafetensorError as error:
            reason = str(error).removeprefix("Error while deserializing header: ")
            raise ValueError(
                f"memory file {path} is truncated or damaged, not a whole safetensors file ({reason}); it was not "
                "(completely) written by MemoryState.save()."
            ) from error
        except RuntimeError as error:
            # safe_open reads the header and maps the file in two opens of the path: a save that renamed
            # another file over it in between leaves a header of one file and the size of the other. Once
            # open, the mapping stays on one file, so opening again reads the new file whole.
            if attempt == _OPEN_ATTEMPTS - 1:
                raise ValueError(f"memory file {path} kept changing while being opened ({error}).") from error


def _check_layout(path: Path, metadata: dict, stored: list[str]) -> tuple[str, dict[int, list[str]], list[str]]:
    """Check the metadata (memory type, layers) against the tensors stored; return the memory type, the
    tensor names per layer and the window's tensor names."""

    memory_type = metadata.get("memory_type")
    if memory_type not in MEMORY_KINDS:
        raise ValueError(
            f"memory file {path} names memory type {memory_type!r}; known types are {sorted(MEMORY_KINDS)}."
        )
    try:
        listed = json.loads(metadata.get("layers", ""))
    except json.JSONDecodeError:
        listed = None
    if not (
        isinstance(listed, list) and listed and all(isinstance(i, int) and not isinstance(i, bool) for i in listed)
    ):
        raise ValueError(
            f"memory file {path} has damaged metadata: 'layers' must list layer indices, got {metadata.get('layers')!r}."
        )
    layer_names: dict[int, list[str]] = {layer: [] for layer in listed}
    window_names = []
    for key in stored:
        head, _, rest = key.partition(".")
        layer, _, name = rest.partition(".")
        if head == WINDOW and rest:
            window_names.append(rest)
        elif head == "layer" and name and layer.lstrip("-").isdigit() and int(layer) in layer_names:
            layer_names[int(layer)].append(name)
        else:
            raise ValueError(
                f"memory file {path} holds tensor {key!r}, which belongs to no layer listed in its metadata "
                f"({listed}); the file is damaged or was not written by MemoryState.save()."
            )
    expected = set(memory_block(memory_type).state_names)
    for layer, names in layer_names.items():
        if set(names) != expected:
            raise ValueError(
                f"memory file {path} does not match its metadata: layer {layer} holds tensors {sorted(names)} but "
                f"'{memory_type}' memory stores {sorted(expected)}."
            )
    return memory_type, layer_names, window_names


def model_fingerprint(model) -> str:
    """A short digest of a memory model's weights: names, shapes and a strided sample of the values of its
    memory blocks and input embeddings (cheap for any model size; two trainings differ in it)."""
    digest = hashlib.sha256()
    parts = list(model.memory_blocks.named_parameters()) + [("embeddings", model.get_input_embeddings().weight)]
    for name, param in sorted(parts, key=lambda item: item[0]):
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu()
        digest.update(f"{name}{tuple(param.shape)}".encode())
        digest.update(repr(sample.tolist()).encode())
    return digest.hexdigest()[:16]


def _check_device(device, path: Path) -> None:
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"cannot load memory file {path}: {device!r} is not a device ({error}).") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"cannot load memory file {path} onto {str(target)!r}: CUDA is not available here (no GPU, or torch "
            "built without CUDA). Load it with device='cpu'."
        )


def is_memory_file(path: str | os.PathLike) -> bool:
    """True when `path` is a file written by `MemoryState.save` (only its header is read)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with _open(path) as handle:
            metadata = handle.metadata() or {}
    except (ValueError, OSError):
        return False
    return metadata.get("format") == _FORMAT


def check_save_target(path: str | os.PathLike) -> None:
    """Refuse to replace anything but an earlier MemoryState file (or an empty file): raises ValueError (a
    folder, another file) or FileNotFoundError (no such folder), naming the path."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"cannot save memory to {str(path)!r}: it is a folder; give a file path such as memory.safetensors."
        )
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot save memory to {str(path)!r}: folder {str(path.parent)!r} does not exist.")
    if not path.exists() or path.stat().st_size == 0:
        return
    if not is_memory_file(path):
        raise ValueError(
            f"refusing to overwrite {path}: it exists and is not a MemoryState file (it may hold model weights); "
            "save the memory under another name, such as memory.safetensors, or delete the file first."
        )


__all__ = ["MemoryState", "check_save_target", "is_memory_file", "model_fingerprint"]
