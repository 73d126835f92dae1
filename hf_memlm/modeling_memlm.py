"""`MemLMForCausalLM`: any 🤗 causal LM with external memory blocks beside chosen decoder layers.

How a call runs:
  * each row is cut into segments of `config.segment_length` of its own real tokens (those where
    `attention_mask` is 1), so padding on any side never moves a segment boundary; each segment runs
    through the unchanged base model with local positions;
  * a forward hook on each chosen decoder layer adds the memory read, `h + W_o · read(h)`, reading the
    state written by earlier segments only (the per-call state lives in a `ContextVar`, not on the shared
    layers, so threads can share one model);
  * after the segment, its hidden states at those layers are written into the state (padding never is);
  * logits and loss cover all segments; the final `MemoryState` is returned to continue the stream.

With `use_cache=True` (generation) each row's newest, partial segment stays in the base model's KV cache
(the "window"); when a row's window is full and it has more tokens, that row's window is written to its
memory and masked out of its attention, while other rows go on; cache columns no row attends to are
dropped. Generation thus runs past the window with bounded RAM (about two segments of cache) and the
same segment boundaries as a plain forward, row by row.

Part of the Hub payload: flat sibling files, single-dot relative imports, torch + transformers only.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache, GenerationMixin, PreTrainedModel

from .configuration_memlm import MemLMConfig
from .hub_sharing import HubSharingMixin
from .memory_base import MemoryBlock
from .memory_cache import MemLMCache
from .memory_hooks import (
    LayerContext,
    call_with_contexts,
    find_decoder_layers,
    has_memory_hook,
    install_read_hooks,
    note_read,
    passes_keywords,
)
from .memory_kinds import MEMORY_KINDS
from .memory_segments import (
    gather_index,
    keep_last_logits,
    locate_outputs,
    logits_to_compute,
    plan_pieces,
    sequence_loss,
    to_caller_columns,
    unpadded_kept,
)
from .memory_state import MemoryState
from .memory_switch import MemorySwitch
from .memory_writes import write_only_pass
from .model_inputs import check_embedding_width, check_inputs, check_memorize_inputs, load_base
from .model_interface import MemLMBackbone, MemLMCausalLMOutput, MemLMModelOutput, check_forward_kwargs


class MemLMPreTrainedModel(HubSharingMixin, PreTrainedModel):
    config_class = MemLMConfig
    base_model_prefix = "backbone"  # `model.base_model`: the model with its memory, without the LM head
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = tuple(kind.block.__name__ for kind in MEMORY_KINDS.values())  # + the base's layer class

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, MemoryBlock):
            std = self.config.memory_init_std or getattr(self.config.text_config, "initializer_range", None) or 0.02
            module.reset_parameters(std)


class MemLMForCausalLM(MemorySwitch, MemLMPreTrainedModel, GenerationMixin):
    """A causal LM with memory. `language_model` is the unchanged base (its parameter names are kept, so
    base checkpoints and PEFT target names apply); `memory_blocks[str(i)]` sits beside decoder layer `i`."""

    def __init__(self, config: MemLMConfig, language_model: PreTrainedModel | None = None):
        super().__init__(config)
        if language_model is None:
            language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.language_model = language_model
        self._layers_name, layers = find_decoder_layers(self.language_model)
        if len(layers) <= max(config.memory_layers):
            raise ValueError(
                f"memory_layers={config.memory_layers} but the {config.text_config.model_type} base has only "
                f"{len(layers)} decoder layers."
            )
        if any(has_memory_hook(layer) for layer in layers):
            raise ValueError(
                "This base model is already wrapped by a MemLMForCausalLM (its layers carry memory hooks); "
                "wrap a fresh copy of the base, or use the existing memory model."
            )
        memory_class = MEMORY_KINDS[config.memory_type].block
        self.memory_blocks = nn.ModuleDict({str(i): memory_class(config, i) for i in config.memory_layers})
        install_read_hooks(layers, config.memory_layers)
        self._keyword_contexts = passes_keywords(self.language_model)
        self._warned_no_labels = False
        self.post_init()

    @property
    def backbone(self) -> MemLMBackbone:
        """This model without its LM head (`model.base_model`): returns the final hidden states, memory included.
        (`language_model` is the wrapped base alone: calling it directly runs no memory.)"""
        return MemLMBackbone(self)

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
            language_model = load_base(base, base_kwargs or {})
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

    def _check_memory_state(self, state, batch_size: int, place: bool = True) -> MemoryState:
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
        if not place:
            return state
        # a state made elsewhere (another dtype or device) is cast to what this model's blocks make themselves
        return state.placed_like(self.init_memory_state(1), self.get_input_embeddings().weight)

    def _write(self, state: MemoryState, captured: dict, mask: torch.Tensor, written: int | None = None) -> MemoryState:
        if not self.memory_enabled:
            return state
        layers = {
            i: self.memory_blocks[str(i)](captured[i], state.layers[i], mode="write", mask=mask, written=written)
            for i in self.config.memory_layers
        }
        return MemoryState(state.memory_type, layers, state.window)

    # -- one piece through the base model ----------------------------------------------------------------
    def _run_segment(
        self,
        inputs: dict,
        attention_mask,
        position_ids,
        state,
        cache,
        logits_to_keep,
        output_hidden,
        write_only=False,
        recent: dict | None = None,
    ):
        """One piece through the base model with the memory hooks active; returns (output, captured hidden
        states by memory layer). `write_only`: only what memory writes is wanted, so the last memory layer does
        not read and the base model stops right after it (the output is then None). `recent`: the memory layers'
        hidden states of the generation window's earlier tokens (`attention_mask` covers them, then the piece)."""
        # A row with no live token (padding only) would give NaNs in attention; let it attend to its padding
        # instead. Its outputs are never used and the memory write still uses the real mask.
        empty_rows = ~attention_mask.any(-1, keepdim=True)
        base_mask = (attention_mask | empty_rows).long()
        layers = self.decoder_layers
        contexts = {}
        if self.memory_enabled:
            last = self.config.memory_layers[-1] if write_only else None
            contexts = {
                layers[i]: LayerContext(
                    self.memory_blocks[str(i)],
                    state.layers[i] if state is not None else None,
                    i != last,
                    i == last,
                    attention_mask,
                    recent.get(i) if recent else None,
                )
                for i in self.config.memory_layers
            }
        # Per call, not per module: threads sharing this model each see only their own contexts.
        out = call_with_contexts(
            self.language_model,
            dict(inputs, attention_mask=base_mask, position_ids=position_ids, cache=cache, use_cache=cache is not None),
            dict(logits_to_keep=logits_to_keep, output_hidden_states=output_hidden, return_dict=True),
            contexts,
            by_keyword=self._keyword_contexts and not write_only and cache is None,
            may_stop=write_only,
        )
        captured = {i: contexts[layers[i]].captured for i in self.config.memory_layers} if contexts else {}
        return out, captured

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
        logits_to_keep (`int`): compute logits for the last N columns only (0: all); `labels` are scored there.
            A segment none of whose columns is kept runs only up to the last memory layer (what memory writes
            needs), so a long document with the question and answer at its end trains at the cost of reading it.

        Each row is segmented from its own first real token (`attention_mask`), so left, right or any padding
        gives every row the outputs and memory it has alone. A padded column's logits and hidden states are
        those of the nearest real token before it in its row (of its first real token when none is before).
        Positions are local to each segment and computed here, so `position_ids` is not accepted.
        `past_key_values` (transformers' earlier name of `cache`) is read as `cache`; any keyword this model does
        not use is refused with a TypeError rather than dropped.
        """
        cache = check_forward_kwargs(cache, kwargs)
        if kwargs.get("position_ids") is not None:
            raise ValueError(
                "MemLMForCausalLM computes positions itself (local to each segment); do not pass position_ids."
            )
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions is not supported: attention is per segment and cannot be stacked.")
        ignore_index = kwargs.get("ignore_index", -100)
        vocab_size = self.get_input_embeddings().num_embeddings
        batch, length, no_label_counts = check_inputs(
            input_ids, inputs_embeds, labels, ignore_index, vocab_size, check_labels=not self._warned_no_labels
        )
        check_embedding_width(inputs_embeds, self.get_input_embeddings().embedding_dim)
        if no_label_counts:
            self._warned_no_labels = True
            warnings.warn(
                f"every label is {ignore_index} (ignored), so the loss is NaN/0 and gives no gradient; check the "
                "data collator (labels of real tokens must be their ids). Warned once per model.",
                UserWarning,
                stacklevel=2,
            )
        generating = cache is not None or bool(use_cache)
        mask = self._token_mask(
            attention_mask, batch, length, (input_ids if input_ids is not None else inputs_embeds).device, generating
        )
        output_hidden = bool(output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        if generating:
            cache, state = self._cache_and_state(cache, memory_state, batch)
        else:
            state = self._prepare_state(memory_state, batch)
            if state.window:
                raise ValueError(
                    "memory_state holds a generation window (tokens still in a KV cache); continue it with "
                    "use_cache=True and its cache, or write the window first: model.commit_window(memory_state)."
                )
            cache = None
        fresh, unmasked = memory_state is None, attention_mask is None
        logits, hidden, state = self._forward_pieces(
            input_ids, inputs_embeds, mask, state, cache, logits_to_keep, output_hidden, fresh, unmasked
        )
        if cache is not None:
            cache.memory_state = state

        loss = None
        if labels is not None:
            # With `logits_to_keep` the loss covers the kept columns (a label before them has no logit to score it).
            labels = labels[:, labels.shape[1] - logits.shape[1] :]
            loss_kwargs = {k: kwargs[k] for k in ("num_items_in_batch", "ignore_index") if k in kwargs}
            loss = sequence_loss(self.loss_function, logits, labels, self.config.segment_length, **loss_kwargs)
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

    def _cache_and_state(self, cache, memory_state, batch):
        if isinstance(cache, MemLMCache) and cache.memory_state is not None:
            # the state this model left in its cache: already in the model's dtype and on its device
            return cache, self._check_memory_state(cache.memory_state, batch, place=False)
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError(
                "MemLMForCausalLM needs its own MemLMCache (returned in `.cache`) to continue from cached tokens; "
                "got a non-empty plain cache."
            )
        state = self._prepare_state(memory_state, batch)
        if state.window and state.window["mask"].shape[1]:
            raise ValueError(
                "memory_state holds a generation window (tokens whose keys/values were in the KV cache of the call "
                "that returned it) but no MemLMCache holding them was passed. Pass that call's `.cache` "
                "(it carries the state), or write the window to memory first: model.commit_window(memory_state)."
            )
        return MemLMCache(config=self.config.get_text_config(), memory_state=state), state

    def _forward_pieces(
        self, input_ids, inputs_embeds, mask, state, cache, logits_to_keep, output_hidden, fresh, unmasked
    ):
        """Run the call's tokens through the base model in pieces, segmenting every row by its own real tokens.

        Row b's real token number k (counting only tokens where `mask` is True) belongs to segment
        k // segment_length, whatever padding surrounds it, so a row gives the same outputs and memory
        batched (left-, right- or otherwise padded) as alone, and padding is never written. Each piece feeds
        every row its next real tokens (up to the end of its segment) packed to the left of the piece.

        Without a cache every piece is one segment per row, written to memory right after it runs. With a
        cache (generation) a row's current segment stays in the KV cache as its window; when the window is
        full and the row has more tokens, the window is written to memory for that row alone and its cache
        columns are masked out for it (and dropped once no row uses them), so the cache holds at most about
        two segments.

        Outputs come back in the caller's columns; a padded column carries the outputs of the nearest real
        token before it in its row (of the row's first real token when none is before it), so the last
        column of a right-padded row predicts what follows its last real token.
        `unmasked` (no attention_mask): no host sync plans the pieces; `fresh` (empty `state`) without padding or
        cache: the writes are told what they write (`written`), so they need none either.
        """
        keep_window = cache is not None
        batch, length = mask.shape
        window = dict(state.window) if keep_window else {}
        window.setdefault("mask", mask.new_zeros(batch, 0))
        state = state.without_window()
        if unmasked and not keep_window:
            host_mask = host_window = None
            real_counts, window_counts = [length] * batch, [0] * batch
        else:
            # The call's one host sync: the padding pattern decides the pieces.
            host = torch.cat([mask, window["mask"]], dim=1).cpu()
            host_mask, host_window = host[:, :length], host[:, length:]
            real_counts, window_counts = torch.stack([host_mask.sum(-1), host_window.sum(-1)]).tolist()
        if not any(real_counts):
            raise ValueError(
                "attention_mask is 0 for every token of every row: there is nothing to compute. Mark real tokens with 1."
            )
        pieces = plan_pieces(real_counts, window_counts, self.config.segment_length, keep_window)
        # tokens written into every row so far, all real (None: not known on the host)
        written = 0 if fresh and not keep_window and all(count == length for count in real_counts) else None
        wanted = length if not logits_to_keep else min(logits_to_keep, length)
        logits_kept = unpadded_kept(pieces, length, wanted)
        logits_index = hidden_index = None  # None: the pieces' outputs are already in the caller's columns
        if logits_kept is None:
            piece_of, column_in = locate_outputs(pieces, host_mask, wanted)
            logits_kept, logits_index = gather_index(pieces, piece_of, column_in, keep_all=False)
            if output_hidden:
                all_of, all_in = locate_outputs(pieces, host_mask, length)
                _, hidden_index = gather_index(pieces, all_of, all_in, keep_all=True)

        device = mask.device
        # each row's real tokens first, in order (a stable sort moves its padding behind them)
        real_first = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
        bptt = self.config.bptt_segments
        logits, hidden = [], []
        for number, piece in enumerate(pieces):
            if any(piece.flush):
                state, window, host_window = self._flush_rows(state, window, host_window, piece.flush, cache)
            columns = torch.arange(piece.width, device=device)
            starts = torch.tensor(piece.starts, device=device)
            counts = torch.tensor(piece.counts, device=device)
            source = real_first.gather(1, (starts[:, None] + columns).clamp(max=length - 1))
            piece_mask = columns[None, :] < counts[:, None]
            if input_ids is not None:
                inputs = {"input_ids": input_ids.gather(1, source)}
            else:
                index = source[..., None].expand(-1, -1, inputs_embeds.shape[-1])
                inputs = {"inputs_embeds": inputs_embeds.gather(1, index)}
            attention = torch.cat([window["mask"], piece_mask], dim=1) if keep_window else piece_mask
            positions = (attention.long().cumsum(-1) - 1).clamp(min=0)[:, -piece.width :]
            kept = logits_kept[number]
            # A piece none of whose outputs are wanted (e.g. a document's segments before the labelled question,
            # with `logits_to_keep`) only has to write memory: it runs up to the last memory layer, as `memorize`.
            write_only = kept == 0 and not output_hidden and not keep_window and self.memory_enabled
            recent = {i: window[f"hidden.{i}"] for i in self.config.memory_layers if f"hidden.{i}" in window}
            out, captured = self._run_segment(
                inputs, attention, positions, state, cache, logits_to_compute(kept), output_hidden, write_only, recent
            )
            if not write_only:
                logits.append(keep_last_logits(out.logits, kept))
            if output_hidden:
                hidden.append(out.hidden_states)
            if keep_window:
                window["mask"] = attention
                for index, h in captured.items():
                    key = f"hidden.{index}"
                    window[key] = h if key not in window else torch.cat([window[key], h], dim=1)
                host_piece = torch.arange(piece.width)[None, :] < torch.tensor(piece.counts)[:, None]
                host_window = torch.cat([host_window, host_piece], dim=1)
            else:
                if not write_only:  # for a loss on what the reads pick (`record_reads`); off, it keeps nothing
                    note_read(self.memory_blocks, state.layers, captured, piece_mask, source, piece.starts)
                state = self._write(state, captured, piece_mask, written)
                written = None if written is None else written + piece.width
                if bptt is not None and (number + 1) % bptt == 0 and number + 1 < len(pieces):
                    state = state.detach()
        logits = to_caller_columns(logits, logits_index)
        hidden = tuple(to_caller_columns(list(layer), hidden_index) for layer in zip(*hidden)) if hidden else None
        return logits, hidden, MemoryState(state.memory_type, state.layers, window if keep_window else None)

    def _flush_rows(self, state, window, host_window, flush, cache):
        """Write the windows of rows `flush` to memory (theirs only), mask them out of those rows' attention,
        and drop cache columns that no row attends to any more."""
        device = window["mask"].device
        rows = torch.tensor(flush, device=device)[:, None]
        if self.memory_enabled:
            captured = {i: window[f"hidden.{i}"] for i in self.config.memory_layers}
            state = self._write(state, captured, window["mask"] & rows)
        window = {**window, "mask": window["mask"] & ~rows}
        host_window = host_window & ~torch.tensor(flush)[:, None]
        live = host_window.any(0)
        if not live.all():
            keep = live.nonzero().squeeze(1)
            cache.keep_columns(keep.to(device))
            window = {name: tensor.index_select(1, keep.to(tensor.device)) for name, tensor in window.items()}
            host_window = host_window[:, live]
        return state, window, host_window

    def commit_window(self, memory_state: MemoryState) -> MemoryState:
        """Write the generation window (tokens still only in the KV cache) into memory, e.g. to save a state
        after `generate`. Returns a state without window."""
        if not memory_state.window:
            return memory_state
        if self.memory_enabled and memory_state.window["mask"].shape[1]:
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
        .memory_state` returns (the same segments of each row's real tokens; the same mode: call `eval()` first
        for inference), computed under `torch.no_grad()` by a write-only pass (`memory_writes.py`): no read
        that changes no write, no layer above the last memory layer, no logits, segments side by side where
        nothing they write depends on the memory. Continue with `memorize(more_ids, memory_state=state)`;
        then ask with `generate(prompt_ids, memory_state=state)`.
        """
        check_memorize_inputs(input_ids, attention_mask)
        batch, length = input_ids.shape
        check_inputs(input_ids, None, None, -100, self.get_input_embeddings().num_embeddings, check_labels=False)
        state = self._prepare_state(memory_state, batch)
        if state.window:
            raise ValueError(
                "memorize: memory_state holds a generation window (tokens still in a KV cache); write it first: "
                "model.commit_window(memory_state)."
            )
        mask = self._token_mask(attention_mask, batch, length, input_ids.device, generating=False)
        if not bool(mask.any()):
            raise ValueError("memorize: attention_mask is 0 for every token of every row: there is nothing to read.")
        if not self.memory_enabled:
            return state
        return write_only_pass(self, input_ids, mask, state)

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

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        # Beams and several return sequences repeat each prompt; repeat its memory with it (a one-row state is
        # shared by every row anyway).
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        state = model_kwargs.get("memory_state")
        if expand_size > 1 and isinstance(state, MemoryState) and state.batch_size > 1:
            model_kwargs["memory_state"] = state.repeat_interleave(expand_size)
        return input_ids, model_kwargs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        # The state now travels inside the MemLMCache; the caller's initial state must not be re-read.
        model_kwargs["memory_state"] = None
        return model_kwargs


__all__ = [
    "MemLMBackbone",
    "MemLMCache",
    "MemLMCausalLMOutput",
    "MemLMForCausalLM",
    "MemLMModelOutput",
    "MemLMPreTrainedModel",
    "find_decoder_layers",
]
