"""`MemLMForCausalLM`: any 🤗 causal LM with external memory blocks beside chosen decoder layers.

How a call runs (DESIGN.md §4):
  * the input is cut into segments of `config.segment_length` tokens; each segment runs through the
    unchanged base model with local positions;
  * a forward hook on each chosen decoder layer adds the memory read, `h + W_o · read(h)`, reading the
    state written by earlier segments only;
  * after the segment, its hidden states at those layers are written into the state;
  * logits and loss cover all segments; the final `MemoryState` is returned to continue the stream.

With `use_cache=True` (generation) the newest, partial segment stays in the base model's KV cache (the
"window"); when the window is full its tokens are written to memory and the cache is emptied, so
generation runs past the window with bounded RAM and the same segment boundaries as a plain forward.

Part of the Hub payload: flat sibling files, single-dot relative imports, torch + transformers only.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache, GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_memlm import MemLMConfig
from .memory_base import MemoryBlock
from .memory_kv import KVMemory
from .memory_slot import SlotMemory
from .memory_state import MemoryState

MEMORY_KINDS: dict[str, type[MemoryBlock]] = {"kv": KVMemory, "slot": SlotMemory}
_CONTEXT_ATTR = "_memlm_context"


@dataclass
class MemLMCausalLMOutput(ModelOutput):
    """Output of [`MemLMForCausalLM`]: the usual causal-LM fields plus the memory state after the call."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: object | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    memory_state: MemoryState | None = None


class MemLMCache(DynamicCache):
    """The base model's KV cache for the current window, plus the memory state, so that `generate`
    carries, reorders (beam search) and expands (several return sequences) both together."""

    def __init__(self, config=None, memory_state: MemoryState | None = None):
        super().__init__(config=config)
        self.memory_state = memory_state

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.memory_state = self.memory_state.select(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.memory_state = self.memory_state.repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.memory_state = self.memory_state.select(indices)

    def clear(self) -> None:
        """Drop every cached token (the window was written to memory)."""
        length = self.get_seq_length()
        if length:
            self.crop(-length)


class _LayerContext:
    """What the hook on one decoder layer needs during one segment: the block, its state, and a place
    to leave the layer's output for the write that follows the segment."""

    def __init__(self, block: nn.Module, state: dict[str, torch.Tensor]):
        self.block = block
        self.state = state
        self.captured: torch.Tensor | None = None


def _memory_read_hook(layer_index: int, module: nn.Module, args, output):
    # Runs outside any activation checkpoint (transformers checkpoints `forward`, not `__call__`), so a
    # recomputation never reads twice. No context: the base model is being called on its own.
    context = module.__dict__.get(_CONTEXT_ATTR)
    if context is None:
        return None
    hidden = output[0] if isinstance(output, tuple) else output
    context.captured = hidden
    updated = hidden + context.block(hidden, context.state, mode="read").to(hidden.dtype)
    return (updated, *output[1:]) if isinstance(output, tuple) else updated


def _has_memory_hook(layer: nn.Module) -> bool:
    return any(getattr(hook, "func", None) is _memory_read_hook for hook in layer._forward_hooks.values())


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


class MemLMPreTrainedModel(PreTrainedModel):
    config_class = MemLMConfig
    base_model_prefix = "memlm"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ("KVMemory", "SlotMemory")  # post_init adds the base's decoder layer class

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, MemoryBlock):
            std = self.config.memory_init_std or getattr(self.config.text_config, "initializer_range", None) or 0.02
            module.reset_parameters(std)


class MemLMForCausalLM(MemLMPreTrainedModel, GenerationMixin):
    """A causal LM with memory. `language_model` is the unchanged base (its parameter names are kept, so
    base checkpoints and PEFT target names apply); `memory_blocks[str(i)]` sits beside decoder layer `i`."""

    def __init__(self, config: MemLMConfig, language_model: PreTrainedModel | None = None):
        super().__init__(config)
        if config.text_config.model_type == "memlm":
            raise ValueError("MemLMConfig.text_config is itself a memlm config; wrap a plain causal LM instead.")
        if language_model is None:
            language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.language_model = language_model
        self._layers_name, layers = find_decoder_layers(self.language_model)
        if len(layers) <= max(config.memory_layers):
            raise ValueError(
                f"memory_layers={config.memory_layers} but the {config.text_config.model_type} base has only "
                f"{len(layers)} decoder layers."
            )
        if any(_has_memory_hook(layer) for layer in layers):
            raise ValueError(
                "This base model is already wrapped by a MemLMForCausalLM (its layers carry memory hooks); "
                "wrap a fresh copy of the base, or use the existing memory model."
            )
        memory_class = MEMORY_KINDS[config.memory_type]
        self.memory_blocks = nn.ModuleDict({str(i): memory_class(config, i) for i in config.memory_layers})
        for index in config.memory_layers:
            layers[index].register_forward_hook(partial(_memory_read_hook, index))
        self.memory_enabled = True
        self.post_init()

    @contextmanager
    def memory_disabled(self):
        """Run the same weights with memory switched off (no reads, no writes): the no-memory baseline."""
        previous, self.memory_enabled = self.memory_enabled, False
        try:
            yield self
        finally:
            self.memory_enabled = previous

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_base(cls, base, *, base_kwargs: dict | None = None, **memory_settings) -> MemLMForCausalLM:
        """Wrap a pretrained causal LM: `base` is a Hub id, a local folder or a loaded `PreTrainedModel`.

        `memory_settings` are `MemLMConfig` fields (`memory_type`, `memory_layers`, `segment_length`, ...);
        `base_kwargs` go to `AutoModelForCausalLM.from_pretrained` (`dtype`, `revision`, ...). The base
        weights are kept as loaded; only the memory blocks are initialised (output projections at zero,
        so the wrapped model starts out computing exactly what the base computes).
        """
        if isinstance(base, PreTrainedModel):
            if base_kwargs:
                raise ValueError("base_kwargs only apply when `base` is a model id or folder to load.")
            language_model = base
        elif isinstance(base, (str, bytes)) or hasattr(base, "__fspath__"):
            language_model = AutoModelForCausalLM.from_pretrained(base, **(base_kwargs or {}))
        else:
            raise TypeError(
                f"from_base expects a model id, a local folder or a PreTrainedModel, got {type(base).__name__}."
            )
        unknown = set(memory_settings) - set(MemLMConfig.__dataclass_fields__)
        if unknown:
            raise TypeError(f"from_base got unknown memory settings {sorted(unknown)}; see MemLMConfig's fields.")
        # A composite config resets its sub-configs' attention implementation; keep the one the base runs with
        # (without it the base would build no causal mask).
        base_config = language_model.config
        config = MemLMConfig(
            text_config=base_config,
            attn_implementation=base_config._attn_implementation,
            experts_implementation=getattr(base_config, "_experts_implementation", None),
            **memory_settings,
        )
        # Keep the loaded weights: mark them initialised so `post_init` only initialises the memory blocks.
        for module in language_model.modules():
            module._is_hf_initialized = True
        for tensor in [*language_model.parameters(), *language_model.buffers()]:
            tensor._is_hf_initialized = True
        model = cls(config, language_model=language_model)
        reference = next(language_model.parameters())
        model.memory_blocks.to(device=reference.device, dtype=reference.dtype)
        model.generation_config = language_model.generation_config
        return model

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.language_model.set_output_embeddings(value)

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.get_submodule(self._layers_name)

    # -- memory state ------------------------------------------------------------------------------------
    def init_memory_state(self, batch_size: int, device=None, dtype=None) -> MemoryState:
        """An empty memory for `batch_size` sequences."""
        reference = self.get_input_embeddings().weight
        device = device or reference.device
        dtype = dtype or reference.dtype
        layers = {
            i: self.memory_blocks[str(i)].init_state(batch_size, device, dtype) for i in self.config.memory_layers
        }
        return MemoryState(self.config.memory_type, layers)

    def _check_memory_state(self, state, batch_size: int) -> MemoryState:
        if not isinstance(state, MemoryState):
            raise TypeError(
                f"memory_state must be a hf_memlm.MemoryState (the `.memory_state` of an earlier output), "
                f"got {type(state).__name__}."
            )
        if state.memory_type != self.config.memory_type:
            raise ValueError(
                f"memory_state holds '{state.memory_type}' memory but this model uses '{self.config.memory_type}'."
            )
        if sorted(state.layers) != list(self.config.memory_layers):
            raise ValueError(
                f"memory_state has layers {sorted(state.layers)} but this model has memory at "
                f"{self.config.memory_layers}."
            )
        if state.batch_size == 1 and batch_size > 1:
            state = state.repeat_interleave(batch_size)  # one remembered document, many prompts
        for index in self.config.memory_layers:
            self.memory_blocks[str(index)].check_state(state.layers[index], batch_size)
        if state.window and state.window["mask"].shape[0] != batch_size:
            raise ValueError(
                f"memory_state window has batch size {state.window['mask'].shape[0]}, input has {batch_size}."
            )
        return state

    def _write(self, state: MemoryState, captured: dict[int, torch.Tensor], mask: torch.Tensor) -> MemoryState:
        if not self.memory_enabled:
            return state
        layers = {
            i: self.memory_blocks[str(i)](captured[i], state.layers[i], mode="write", mask=mask)
            for i in self.config.memory_layers
        }
        return MemoryState(state.memory_type, layers, state.window)

    # -- one segment through the base model --------------------------------------------------------------
    def _run_segment(self, inputs: dict, attention_mask, position_ids, state, cache, logits_to_keep, output_hidden):
        # A row with no real token (padding only) would give NaNs in attention; let it attend to its padding
        # instead. Its outputs are ignored and the memory write still uses the real mask.
        empty_rows = ~attention_mask.any(-1, keepdim=True)
        base_mask = (attention_mask | empty_rows).long()
        layers = self.decoder_layers
        contexts = {}
        if self.memory_enabled:
            contexts = {
                i: _LayerContext(self.memory_blocks[str(i)], state.layers[i]) for i in self.config.memory_layers
            }
        for index, context in contexts.items():
            setattr(layers[index], _CONTEXT_ATTR, context)
        try:
            out = self.language_model(
                **inputs,
                attention_mask=base_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=cache is not None,
                logits_to_keep=logits_to_keep,
                output_hidden_states=output_hidden,
                return_dict=True,
            )
        finally:
            for index in contexts:
                layers[index].__dict__.pop(_CONTEXT_ATTR, None)
        return out, {i: c.captured for i, c in contexts.items()}

    # -- forward -----------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        memory_state: MemoryState | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        r"""
        memory_state (`MemoryState`, *optional*): memory from an earlier call (its `.memory_state`), to
            continue a stream. Gradients do not flow into it (it is detached). Default: empty memory.
        use_cache (`bool`): keep the newest partial segment in a KV cache for generation (see module doc).

        Positions are local to each segment and computed here, so `position_ids` is not accepted.
        """
        if kwargs.get("position_ids") is not None:
            raise ValueError(
                "MemLMForCausalLM computes positions itself (local to each segment); do not pass position_ids."
            )
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions is not supported: attention is per segment and cannot be stacked.")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        tokens = input_ids if input_ids is not None else inputs_embeds
        if tokens.dim() < 2 or tokens.shape[1] == 0:
            raise ValueError(f"The input is empty (shape {tuple(tokens.shape)}); pass at least one token per row.")
        batch, length = tokens.shape[:2]
        if labels is not None and labels.shape[:2] != (batch, length):
            raise ValueError(f"labels have shape {tuple(labels.shape)}, expected ({batch}, {length}) like the input.")
        mask = self._token_mask(
            attention_mask, batch, length, tokens.device, generating=cache is not None or bool(use_cache)
        )
        output_hidden = bool(output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        if cache is not None or use_cache:
            cache, state = self._cache_and_state(cache, memory_state, batch)
            logits, hidden, state = self._forward_window(
                input_ids, inputs_embeds, mask, state, cache, logits_to_keep, output_hidden
            )
            cache.memory_state = state
        else:
            state = self._prepare_state(memory_state, batch)
            logits, hidden, state = self._forward_segments(
                input_ids, inputs_embeds, mask, state, logits_to_keep, output_hidden
            )
            cache = None

        loss = None
        if labels is not None:
            loss_kwargs = {k: kwargs[k] for k in ("num_items_in_batch", "ignore_index") if k in kwargs}
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1], **loss_kwargs)
        output = MemLMCausalLMOutput(loss=loss, logits=logits, cache=cache, hidden_states=hidden, memory_state=state)
        return output if return_dict else output.to_tuple()

    @staticmethod
    def _token_mask(attention_mask, batch, length, device, generating):
        if attention_mask is None:
            return torch.ones(batch, length, dtype=torch.bool, device=device)
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch:
            raise ValueError(
                f"attention_mask must be 2-D (batch, tokens) with {batch} rows, got shape {tuple(attention_mask.shape)}."
            )
        if attention_mask.shape[1] != length and not (generating and attention_mask.shape[1] > length):
            raise ValueError(f"attention_mask covers {attention_mask.shape[1]} tokens but the input has {length}.")
        # During generation the mask covers the whole sequence so far; the new tokens are its tail.
        return attention_mask[:, -length:].bool()

    def _prepare_state(self, memory_state, batch) -> MemoryState:
        if memory_state is None:
            return self.init_memory_state(batch)
        # A state crosses calls detached: back-propagation stops at the call boundary.
        return self._check_memory_state(memory_state, batch).detach()

    def _forward_segments(self, input_ids, inputs_embeds, mask, state, logits_to_keep, output_hidden):
        if state.window:
            raise ValueError(
                "memory_state holds a generation window (tokens still in a KV cache); continue it with "
                "use_cache=True, or start from a state returned by a forward without cache."
            )
        length = mask.shape[1]
        seg_len, bptt = self.config.segment_length, self.config.bptt_segments
        logits, hidden = [], []
        starts = list(range(0, length, seg_len))
        for number, start in enumerate(starts):
            end = min(start + seg_len, length)
            seg_mask = mask[:, start:end]
            positions = (seg_mask.long().cumsum(-1) - 1).clamp(min=0)
            inputs = _slice_inputs(input_ids, inputs_embeds, start, end)
            needed = _logits_needed(logits_to_keep, start, end, length)
            out, captured = self._run_segment(
                inputs, seg_mask, positions, state, None, _run_kwargs_for(needed), output_hidden
            )
            logits.append(_keep_logits(out.logits, needed))
            if output_hidden:
                hidden.append(out.hidden_states)
            state = self._write(state, captured, seg_mask)
            if bptt is not None and (number + 1) % bptt == 0 and end < length:
                state = state.detach()
        return torch.cat(logits, dim=1), _stack_hidden(hidden), state

    def _cache_and_state(self, cache, memory_state, batch):
        if isinstance(cache, MemLMCache) and cache.memory_state is not None:
            return cache, self._check_memory_state(cache.memory_state, batch)
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError(
                "MemLMForCausalLM needs its own MemLMCache (returned in `.cache`) to continue from cached tokens; "
                "got a non-empty plain cache."
            )
        state = self._prepare_state(memory_state, batch)
        return MemLMCache(config=self.config.get_text_config(), memory_state=state), state

    def _forward_window(self, input_ids, inputs_embeds, mask, state, cache, logits_to_keep, output_hidden):
        """Feed tokens into the cached window; when the window is full, write it to memory and empty it."""
        length = mask.shape[1]
        seg_len = self.config.segment_length
        logits, hidden = [], []
        position = 0
        while position < length:
            if state.window_length == seg_len:
                state = self._flush_window(state, cache)
            take = min(seg_len - state.window_length, length - position)
            chunk_mask = mask[:, position : position + take]
            window_mask = torch.cat([state.window["mask"], chunk_mask], dim=1) if state.window else chunk_mask
            positions = (window_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -take:]
            inputs = _slice_inputs(input_ids, inputs_embeds, position, position + take)
            needed = _logits_needed(logits_to_keep, position, position + take, length)
            out, captured = self._run_segment(
                inputs, window_mask, positions, state, cache, _run_kwargs_for(needed), output_hidden
            )
            logits.append(_keep_logits(out.logits, needed))
            if output_hidden:
                hidden.append(out.hidden_states)
            window = {"mask": window_mask}
            for index, h in captured.items():
                key = f"hidden.{index}"
                window[key] = torch.cat([state.window[key], h], dim=1) if state.window else h
            state = MemoryState(state.memory_type, state.layers, window)
            position += take
        return torch.cat(logits, dim=1), _stack_hidden(hidden), state

    def _flush_window(self, state: MemoryState, cache: MemLMCache) -> MemoryState:
        state = self.commit_window(state)
        cache.clear()
        return state

    def commit_window(self, memory_state: MemoryState) -> MemoryState:
        """Write the generation window (tokens still only in the KV cache) into memory, e.g. to save a state
        after `generate`. Returns a state without window."""
        if not memory_state.window:
            return memory_state
        if self.memory_enabled:
            captured = {i: memory_state.window[f"hidden.{i}"] for i in self.config.memory_layers}
            memory_state = self._write(memory_state, captured, memory_state.window["mask"])
        return memory_state.without_window()

    # -- reading documents into memory -----------------------------------------------------------------
    @torch.no_grad()
    def memorize(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        memory_state: MemoryState | None = None,
    ) -> MemoryState:
        """Read `input_ids` (batch, tokens) into memory and return the state after them, keeping no logits:
        the first step of "remember this book, then answer many questions about it".

        The state is the one `self(input_ids, attention_mask=attention_mask, memory_state=memory_state)
        .memory_state` returns (the same segment boundaries, the same mode: call `eval()` first for inference),
        but it is computed one segment per call under `torch.no_grad()`: no autograd graph, and one logit row
        per segment instead of (tokens x vocab) logits, so RAM stays bounded whatever the length. Continue a
        document with `memorize(more_ids, memory_state=state)`; then ask with `generate(prompt_ids,
        memory_state=state)`. `attention_mask` (right padding) marks the real tokens; padding is never written.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"memorize: input_ids must be a (batch, tokens) tensor with tokens > 0, got {shape}.")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"memorize: attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                f"{tuple(input_ids.shape)}; pass one mask value per token."
            )
        state = memory_state
        segment_length = self.config.segment_length
        for start in range(0, input_ids.shape[1], segment_length):
            end = start + segment_length
            mask = None if attention_mask is None else attention_mask[:, start:end]
            output = self(
                input_ids[:, start:end], attention_mask=mask, memory_state=state, use_cache=False, logits_to_keep=1
            )
            state = output.memory_state
        return state

    # -- generation --------------------------------------------------------------------------------------
    def prepare_inputs_for_generation(
        self,
        input_ids,
        next_sequence_length=None,
        cache=None,
        attention_mask=None,
        inputs_embeds=None,
        is_first_iteration=False,
        **kwargs,
    ):
        kwargs.pop("position_ids", None)  # positions are ours (local to the window)
        return super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            cache=cache,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        # The state now travels inside the MemLMCache; the caller's initial state must not be re-read.
        model_kwargs["memory_state"] = None
        return model_kwargs


def _slice_inputs(input_ids, inputs_embeds, start, end) -> dict:
    if input_ids is not None:
        return {"input_ids": input_ids[:, start:end]}
    return {"inputs_embeds": inputs_embeds[:, start:end]}


def _logits_needed(logits_to_keep: int, start: int, end: int, length: int) -> int | None:
    """How many trailing logits of the piece [start, end) are among the call's last `logits_to_keep`
    (None: all of them, as `logits_to_keep=0` means)."""
    if not logits_to_keep:
        return None
    return max(0, min(end - start, logits_to_keep - (length - end)))


def _run_kwargs_for(needed: int | None) -> int:
    # the base model's `logits_to_keep=0` means "all", so a piece needing none still computes one
    return 0 if needed is None else max(needed, 1)


def _keep_logits(logits: torch.Tensor, needed: int | None) -> torch.Tensor:
    return logits if needed is None else logits[:, logits.shape[1] - needed :]


def _stack_hidden(per_segment: list) -> tuple[torch.Tensor, ...] | None:
    if not per_segment:
        return None
    return tuple(torch.cat(layer_states, dim=1) for layer_states in zip(*per_segment))


__all__ = ["MemLMCache", "MemLMCausalLMOutput", "MemLMForCausalLM", "MemLMPreTrainedModel", "find_decoder_layers"]
