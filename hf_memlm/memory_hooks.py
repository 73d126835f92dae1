"""Memory reads inside the base model: a forward hook beside each chosen decoder layer, and how the
decoder layers of any causal LM are found.

The hook adds `W_o · read(h)` to the layer's output and keeps `h` for the write after the segment. What it
needs during one base-model call (the memory block, its state) is set per call in a `ContextVar`, never on
the shared modules, so threads calling one model never see each other's memory.

Part of the Hub payload: flat sibling files, single-dot relative imports, torch + transformers only.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

# The memory contexts of the base-model call running in this thread (or task), keyed by decoder layer.
# Kept out of the shared modules so that threads calling one model never see each other's memory.
_ACTIVE_CONTEXTS: ContextVar[dict | None] = ContextVar("hf_memlm_active_contexts", default=None)
# Under torch.compile, which cannot trace a ContextVar (a graph break per segment), the contexts travel with the
# base-model call instead, as this keyword, which transformers' models pass on to their decoder layers.
CONTEXTS_KEYWORD = "memlm_contexts"
# The reads of the calls running in this thread, recorded for a loss on what they pick (`record_reads`); None: off.
_READ_RECORDS: ContextVar[list | None] = ContextVar("hf_memlm_read_records", default=None)


class StopAfterCapture(Exception):
    """Raised by the hook of the last memory layer in a write-only pass (`MemLMForCausalLM.memorize`): no layer
    above it can change what memory writes, so the rest of the base model need not run."""


class LayerContext:
    """What the hook on one decoder layer needs during one segment: the block, its state, and a place
    to leave the layer's output for the write that follows the segment.

    `read=False` skips the memory read (a write-only pass needs no read at the last memory layer, whose output
    no write uses); `stop=True` ends the base-model call once the output is captured (`StopAfterCapture`).
    `mask` (real tokens of the attention window, earlier tokens first) and `recent` (this layer's outputs for the
    window's earlier tokens, during generation) are for kinds that read in context (`reads_in_context`)."""

    def __init__(
        self,
        block: nn.Module,
        state: dict[str, torch.Tensor] | None,
        read: bool = True,
        stop: bool = False,
        mask: torch.Tensor | None = None,
        recent: torch.Tensor | None = None,
    ):
        self.block = block
        self.state = state
        self.read = read
        self.stop = stop
        self.mask = mask
        self.recent = recent
        self.captured: torch.Tensor | None = None


def memory_read_hook(layer_index: int, module: nn.Module, args, kwargs, output):
    # Runs outside any activation checkpoint (transformers checkpoints `forward`, not `__call__`), so a
    # recomputation never reads twice. No context: the base model is being called on its own.
    contexts = kwargs.get(CONTEXTS_KEYWORD)
    if contexts is None:
        contexts = _ACTIVE_CONTEXTS.get()
    context = contexts.get(module) if contexts else None
    if context is None:
        return None
    hidden = output[0] if isinstance(output, tuple) else output
    context.captured = hidden
    if context.stop:
        raise StopAfterCapture
    if not context.read:
        return None
    read = context.block(hidden, context.state, mode="read", mask=context.mask, recent=context.recent)
    updated = hidden + read.to(hidden.dtype)
    return (updated, *output[1:]) if isinstance(output, tuple) else updated


def passes_keywords(model: nn.Module) -> bool:
    """Whether `model.forward` takes keywords it does not name (transformers' models pass them on to their layers)."""
    parameters = inspect.signature(model.forward).parameters.values()
    return any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters)


def call_with_contexts(model: nn.Module, inputs: dict, options: dict, contexts, by_keyword: bool, may_stop: bool):
    """`model(**inputs, **options)` with the hooks seeing `contexts` (decoder layer -> its context); None when a
    hook stopped it (`StopAfterCapture`, allowed by `may_stop`).

    Under torch.compile, which traces no ContextVar (a graph break per call), the contexts travel as a keyword
    (`by_keyword`: the model takes it and passes nothing else on but keywords); a model that does not pass it on
    to its layers (no layer saw its context) is called again the usual way."""
    if contexts and by_keyword and torch.compiler.is_compiling():
        out = model(**inputs, **options, **{CONTEXTS_KEYWORD: contexts})
        if all(context.captured is not None for context in contexts.values()):
            return out
        for context in contexts.values():
            context.captured = None
    with active_contexts(contexts):
        try:
            return model(**inputs, **options)
        except StopAfterCapture:
            if not may_stop:
                raise
    return None


def has_memory_hook(layer: nn.Module) -> bool:
    return any(getattr(hook, "func", None) is memory_read_hook for hook in layer._forward_hooks.values())


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The `nn.ModuleList` of decoder layers: items of a class named in `_no_split_modules`, else a list
    with `num_hidden_layers` items of one class."""
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    config = getattr(model, "config", None)
    num_layers = getattr(config, "num_hidden_layers", None)
    fallback = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(item).__name__ for item in module}
        if len(kinds) == 1 and kinds & no_split:
            return name, module
        if fallback is None and len(kinds) == 1 and len(module) == num_layers:
            fallback = (name, module)
    if fallback is not None:
        return fallback
    model_type = getattr(config, "model_type", type(model).__name__)
    raise ValueError(
        f"hf_memlm cannot find the decoder layers of a '{model_type}' model ({type(model).__name__}): no "
        "nn.ModuleList of layers named in its `_no_split_modules` or with `num_hidden_layers` items. "
        "Supported bases are causal LMs with a list of decoder layers (Llama, Qwen2, Mistral, GPT-2, GPT-NeoX, ...)."
    )


def install_read_hooks(layers: nn.ModuleList, indices: list[int]) -> None:
    """Put the memory read hook on `layers[i]` for each `i` in `indices`."""
    for index in indices:
        layers[index].register_forward_hook(partial(memory_read_hook, index), with_kwargs=True)


@contextmanager
def active_contexts(contexts: dict[nn.Module, LayerContext]) -> Iterator[None]:
    """Make `contexts` (decoder layer -> its context) what the hooks read, in this thread, for the block."""
    token = _ACTIVE_CONTEXTS.set(contexts)
    try:
        yield
    finally:
        _ACTIVE_CONTEXTS.reset(token)


@dataclass
class ReadRecord:
    """One segment's memory reads, as `record_reads` keeps them.

    blocks: each memory layer's block; layers: its state as the segment read it (before its own write); captured:
    each memory layer's output for the segment (what its read made queries from); mask (B, W): the segment's real
    tokens; source (B, W): the call's column of each segment column; starts[b]: row b's real tokens in the call
    before the segment."""

    blocks: dict
    layers: dict
    captured: dict
    mask: torch.Tensor
    source: torch.Tensor
    starts: list[int]


@contextmanager
def record_reads() -> Iterator[list[ReadRecord]]:
    """Keep a `ReadRecord` of every segment that reads memory in the forward calls this thread makes inside the
    block (not generation's). The records hold the tensors with their autograd history: a loss on what the reads
    pick can train the memory (`hf_memlm.training.read_supervision`)."""
    records: list[ReadRecord] = []
    token = _READ_RECORDS.set(records)
    try:
        yield records
    finally:
        _READ_RECORDS.reset(token)


def note_read(
    blocks: nn.ModuleDict, layers: dict, captured: dict, mask: torch.Tensor, source: torch.Tensor, starts: list[int]
) -> None:
    """Record one segment's reads where `record_reads` is on (nothing is kept otherwise). `blocks`: the memory
    blocks by layer number as a string (`MemLMForCausalLM.memory_blocks`)."""
    if torch.compiler.is_compiling() or not captured:
        # a ContextVar would break the graph: a compiled model records nothing (MemLMTrainer says so); nor does a
        # model whose memory is disabled (no layer output was captured)
        return
    records = _READ_RECORDS.get()
    if records is not None:
        used = {index: blocks[str(index)] for index in layers}
        records.append(ReadRecord(used, dict(layers), dict(captured), mask, source, list(starts)))


__all__ = [
    "CONTEXTS_KEYWORD",
    "LayerContext",
    "ReadRecord",
    "StopAfterCapture",
    "active_contexts",
    "call_with_contexts",
    "find_decoder_layers",
    "has_memory_hook",
    "install_read_hooks",
    "note_read",
    "passes_keywords",
    "record_reads",
]
