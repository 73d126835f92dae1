"""Configuration of a memory-augmented causal LM: a base model's config plus the memory settings.

This file is part of the Hub payload (copied next to the weights by `save_pretrained`), so it imports
nothing but torch and transformers and uses single-dot relative imports only.
"""

from __future__ import annotations

import difflib
from typing import ClassVar

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, DynamicCache, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .memory_kinds import MEMORY_KINDS

try:  # the cache layer of recurrent (state-space, linear-attention) layers, in recent transformers
    from transformers.cache_utils import LinearAttentionCacheLayerMixin
except ImportError:  # older releases: such bases are told by model_type and layer_types only
    LinearAttentionCacheLayerMixin = None

MEMORY_DTYPES = ("float32", "float16", "bfloat16")
MEMORY_SEARCHES = ("auto", "exact")
# Settings that may change when a saved model is loaded (`from_pretrained(folder, memory_size=...)`): they
# change how much is kept and how it is searched, not what the weights compute.
LOAD_TIME_SETTINGS = (
    "memory_size",
    "memory_topk",
    "memory_dtype",
    "memory_search",
    "memory_search_threshold",
    "memory_search_probes",
    "bptt_segments",
)
# Settings the weights were trained with: changing them at load time would run the weights on a different
# computation (other layers, segment boundaries, heads, addressing).
WEIGHT_SETTINGS = (
    "memory_type",
    "memory_layers",
    "segment_length",
    "memory_heads",
    "memory_head_dim",
    "num_slots",
    "memory_value_shift",
)
# The bases hf_memlm is tested on (tests/conftest.py); other decoder-only causal LMs usually work as well.
TESTED_BASES = ("gpt2", "llama", "mistral", "qwen2", "gpt_neox", "phi3", "opt", "gemma")
# Causal-LM mappings whose attention is not causal (XLNet's permutation LM attends both ways) and bases whose
# layers keep a recurrent state that the memory's segment window cannot carry (no per-token KV cache).
NON_CAUSAL_BASES = ("xlnet",)
RECURRENT_BASES = (
    "mamba",
    "mamba2",
    "falcon_mamba",
    "rwkv",
    "xlstm",
    "recurrent_gemma",
    "jamba",
    "zamba",
    "zamba2",
    "bamba",
    "falcon_h1",
    "granitemoehybrid",
    "nemotron_h",
    "lfm2",
    "lfm2_moe",
    "qwen3_next",
    "minimax",
)
_RECURRENT_LAYER_WORDS = ("mamba", "conv", "linear", "recurrent", "rwkv", "mlstm", "hybrid", "ssm")


class MemLMConfig(PreTrainedConfig):
    r"""
    Configuration of [`MemLMForCausalLM`]: any causal LM (`text_config`) with external memory blocks beside
    some of its decoder layers.

    Args:
        text_config (`dict` or `PreTrainedConfig`): config of the base causal LM (any type `AutoConfig` knows).
            Required: there is no default base.
        memory_type (`str`): `"kv"` (episodic store of past keys/values, top-k read) or `"slot"` (fixed
            number of slots, softmax-addressed read, erase/add write).
        memory_layers (`list[int]`): decoder-layer indices that get a memory block beside them (negative
            indices count from the end; stored normalised). Default: the middle layer.
        segment_length (`int`): tokens per segment, the window the base model attends over. Longer inputs
            are processed segment by segment with memory carried between segments.
        bptt_segments (`int` or `None`): memory state is detached after every `bptt_segments` segments
            (truncated back-propagation through time). `None`: gradients flow through all segments of a call.
        memory_heads (`int`): heads of the memory read.
        memory_head_dim (`int` or `None`): width per head (default `hidden_size // memory_heads`).
        num_slots (`int`): slots per sequence (`slot` memory).
        memory_size (`int`): stored entries per sequence before FIFO eviction (`kv` memory).
        memory_topk (`int` or `None`): read only the top-k entries per head when more are stored (`kv`);
            `None` reads all with an exact softmax.
        memory_value_shift (`int`): memory pairs the key of token `j` with the value of token
            `j + memory_value_shift` (1 = "what followed this context", which trains much faster than 0).
        memory_dtype (`str` or `None`): storage dtype of the `kv` entries (default: the model's dtype).
        memory_init_std (`float` or `None`): std of the memory projections at init (default: the base
            model's `initializer_range`). The output projection always starts at zero.
        memory_search (`str`): how a `kv` top-k read finds its entries. `"exact"`: score every stored entry.
            `"auto"` (default): exact while a row holds at most `memory_search_threshold` entries, then an
            approximate nearest-neighbour index (faiss IVF, `pip install hf-memlm[faiss]`; without faiss,
            exact with a warning). The index only selects entries: scores and values stay differentiable.
        memory_search_threshold (`int`): stored entries per row above which `"auto"` search uses the index.
        memory_search_probes (`int`): index lists searched per query (more: higher recall, slower reads).
    """

    model_type = "memlm"
    sub_configs_defaults: ClassVar = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    memory_type: str = "kv"
    memory_layers: list[int] | None = None
    segment_length: int = 512
    bptt_segments: int | None = None
    memory_heads: int = 4
    memory_head_dim: int | None = None
    num_slots: int = 64
    memory_size: int = 65536
    memory_topk: int | None = 32
    memory_value_shift: int = 1
    memory_dtype: str | None = None
    memory_init_std: float | None = None
    memory_search: str = "auto"
    memory_search_threshold: int = 4096
    memory_search_probes: int = 32
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        _check_unknown_settings(kwargs)
        if isinstance(self.text_config, dict) and "model_type" not in self.text_config:
            # Without this the sub-config default (a full-size Llama) would be built from the dict silently.
            raise ValueError(
                "MemLMConfig: text_config is a dict without 'model_type', so the kind of base model is unknown; "
                "add it (e.g. {'model_type': 'llama', ...}) or pass a config object "
                "(AutoConfig.from_pretrained(base) or AutoConfig.for_model('llama', ...))."
            )
        if self.text_config is None:
            # Without this the sub-config default (a full-size Llama) would be built silently.
            raise ValueError(
                "MemLMConfig needs `text_config`, the config of the base causal LM (a PreTrainedConfig or its dict, "
                "e.g. AutoConfig.from_pretrained(base).to_dict()); to wrap a pretrained model use "
                "MemLMForCausalLM.from_base(...). A config.json of model_type 'memlm' must contain it."
            )
        super().__post_init__(**kwargs)
        text = self.text_config
        if text.model_type == self.model_type:
            raise ValueError(
                "MemLMConfig: text_config is itself a memlm config; wrap a plain causal LM (its config) instead."
            )
        check_causal_base(text)
        # Tied embeddings live in the base model's config; mirror it so tools reading the top level agree.
        self.tie_word_embeddings = bool(getattr(text, "tie_word_embeddings", False))
        num_layers = _base_num_layers(text)
        hidden = getattr(text, "hidden_size", None)
        if not isinstance(hidden, int):
            raise ValueError(
                f"MemLMConfig: the base config ({text.model_type}) has no integer `hidden_size`; "
                "use a causal-LM config such as LlamaConfig, GPT2Config or Qwen2Config."
            )

        if self.memory_type not in MEMORY_KINDS:
            raise ValueError(
                f"MemLMConfig: memory_type={self.memory_type!r} is unknown; choose one of {tuple(MEMORY_KINDS)}."
            )
        _check_positive_int("segment_length", self.segment_length)
        _check_positive_int("memory_heads", self.memory_heads)
        _check_positive_int("num_slots", self.num_slots)
        _check_positive_int("memory_size", self.memory_size)
        for name in ("bptt_segments", "memory_head_dim", "memory_topk"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        if self.memory_topk is not None and self.memory_topk > self.memory_size:
            raise ValueError(
                f"MemLMConfig: memory_topk={self.memory_topk} is larger than memory_size={self.memory_size}; "
                "top-k cannot read more entries than the memory holds. Lower memory_topk or raise memory_size."
            )
        if self.memory_value_shift not in (0, 1) or isinstance(self.memory_value_shift, bool):
            raise ValueError(
                f"MemLMConfig: memory_value_shift={self.memory_value_shift!r} must be 0 (value of the same token) "
                "or 1 (value of the next token)."
            )
        if self.memory_dtype is not None and self.memory_dtype not in MEMORY_DTYPES:
            raise ValueError(
                f"MemLMConfig: memory_dtype={self.memory_dtype!r} is not supported; choose one of {MEMORY_DTYPES} "
                "or None (the model's dtype)."
            )
        if self.memory_init_std is not None and (
            not isinstance(self.memory_init_std, (int, float)) or self.memory_init_std <= 0
        ):
            raise ValueError(f"MemLMConfig: memory_init_std={self.memory_init_std!r} must be a positive number.")
        if self.memory_search not in MEMORY_SEARCHES:
            raise ValueError(
                f"MemLMConfig: memory_search={self.memory_search!r} is unknown; choose one of {MEMORY_SEARCHES}."
            )
        _check_positive_int("memory_search_threshold", self.memory_search_threshold)
        _check_positive_int("memory_search_probes", self.memory_search_probes)
        if self.memory_head_dim is None:
            if hidden % self.memory_heads:
                raise ValueError(
                    f"MemLMConfig: hidden_size={hidden} of the base is not divisible by memory_heads="
                    f"{self.memory_heads}; set memory_head_dim explicitly or pick another memory_heads."
                )
            self.memory_head_dim = hidden // self.memory_heads

        max_positions = getattr(text, "max_position_embeddings", None)
        if isinstance(max_positions, int) and self.segment_length > max_positions:
            raise ValueError(
                f"MemLMConfig: segment_length={self.segment_length} exceeds the base model's "
                f"max_position_embeddings={max_positions}; each segment must fit in the base model's window."
            )

        if self.memory_layers is None:
            self.memory_layers = [num_layers // 2]
        if isinstance(self.memory_layers, int) and not isinstance(self.memory_layers, bool):
            self.memory_layers = [self.memory_layers]
        if not isinstance(self.memory_layers, (list, tuple)) or not self.memory_layers:
            raise ValueError(
                f"MemLMConfig: memory_layers={self.memory_layers!r} must be a non-empty list of decoder-layer indices."
            )
        normalised = []
        for index in self.memory_layers:
            if not isinstance(index, int) or isinstance(index, bool):
                raise ValueError(f"MemLMConfig: memory_layers entries must be integers, got {index!r}.")
            if not -num_layers <= index < num_layers:
                raise ValueError(
                    f"MemLMConfig: memory layer {index} is out of range for the base model "
                    f"({text.model_type} with {num_layers} decoder layers: valid indices are 0..{num_layers - 1}, "
                    f"or -{num_layers}..-1 from the end)."
                )
            normalised.append(index % num_layers)
        if len(set(normalised)) != len(normalised):
            raise ValueError(f"MemLMConfig: memory_layers={self.memory_layers!r} names a layer twice.")
        self.memory_layers = sorted(normalised)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """`PreTrainedConfig.from_dict`, with memory settings given at load time (`from_pretrained(folder,
        memory_size=...)`) checked as at construction; settings the weights depend on may not change."""
        config_dict = dict(config_dict)
        if config_dict.get("model_type", cls.model_type) == cls.model_type and "text_config" in config_dict:
            changed = [
                name
                for name in WEIGHT_SETTINGS
                if name in kwargs and name in config_dict and kwargs[name] != config_dict[name]
            ]
            if changed:
                given = ", ".join(f"{name}={kwargs[name]!r}" for name in changed)
                saved = ", ".join(f"{name}={config_dict[name]!r}" for name in changed)
                raise ValueError(
                    f"MemLMConfig: {given} cannot change when loading a saved model (it holds {saved}): its weights "
                    f"were trained for those settings and would compute something else. Only "
                    f"{', '.join(LOAD_TIME_SETTINGS)} may change at load time; to use other settings, build a new "
                    "model (MemLMForCausalLM.from_base) and train it."
                )
            # validated by __post_init__ with the rest, instead of set on the built config unchecked
            for name in LOAD_TIME_SETTINGS:
                if name in kwargs:
                    config_dict[name] = kwargs.pop(name)
        return super().from_dict(config_dict, **kwargs)

    @property
    def memory_width(self) -> int:
        """Width of a memory read before the output projection (heads x head_dim)."""
        return self.memory_heads * self.memory_head_dim


def _base_num_layers(text_config: PreTrainedConfig) -> int:
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(text_config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(
        f"MemLMConfig: cannot tell how many decoder layers the base config ({text_config.model_type}) has; "
        "it should define `num_hidden_layers`."
    )


def check_causal_base(text_config: PreTrainedConfig) -> None:
    """Refuse a base that is not a causal decoder: one that sees later tokens would let every position read
    the future, and a recurrent one keeps a state the segment window cannot carry."""
    model_type = text_config.model_type
    supported = (
        f"Supported bases are decoder-only causal LMs that AutoModelForCausalLM loads with a per-token attention "
        f"cache (tested: {', '.join(TESTED_BASES)})."
    )
    if getattr(text_config, "is_encoder_decoder", False):
        raise ValueError(
            f"MemLMConfig: the base {model_type!r} is an encoder-decoder model, not a causal LM. {supported}"
        )
    is_recurrent = model_type in RECURRENT_BASES or any(
        word in str(layer_type).lower()
        for layer_type in (getattr(text_config, "layer_types", None) or ())
        for word in _RECURRENT_LAYER_WORDS
    )
    if not is_recurrent and LinearAttentionCacheLayerMixin is not None:
        try:
            layers = DynamicCache(config=text_config).layers
            is_recurrent = any(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in layers)
        except Exception:  # a cache layout transformers cannot build from this config: nothing to learn from it
            is_recurrent = False
    if is_recurrent:
        raise ValueError(
            f"MemLMConfig: the base {model_type!r} has recurrent (state-space or linear-attention) layers; "
            f"hf_memlm needs attention layers whose keys and values are cached per token. {supported}"
        )
    if model_type in NON_CAUSAL_BASES:
        raise ValueError(
            f"MemLMConfig: the base {model_type!r} attends to later tokens (it is not a causal LM), so every "
            f"position would see the future. {supported}"
        )
    # BERT-like encoders that can also run as decoders are causal only with is_decoder=True (an `is_decoder`
    # field alone says nothing: GPT-NeoX declares it, and older config.json files store it for every model)
    is_encoder = type(text_config) in AutoModelForMaskedLM._model_mapping
    if is_encoder and getattr(text_config, "is_decoder", None) is not True:
        raise ValueError(
            f"MemLMConfig: the base {model_type!r} is configured as a bidirectional encoder (is_decoder=False), "
            f"so every position would see the future. Use a causal LM, or set is_decoder=True in its config to "
            f"run it as a causal decoder. {supported}"
        )
    known = type(text_config) in AutoModelForCausalLM._model_mapping
    remote = "AutoModelForCausalLM" in (getattr(text_config, "auto_map", None) or {})
    if not (known or remote):
        raise ValueError(
            f"MemLMConfig: the base {model_type!r} has no causal-LM class (AutoModelForCausalLM does not load it). "
            f"{supported}"
        )


def _check_unknown_settings(kwargs: dict) -> None:
    """A misspelt memory setting would be kept as an unused attribute and the default used silently."""
    fields = [name for name in MemLMConfig.__dataclass_fields__ if name != "text_config"]
    memory_names = [n for n in fields if n not in PreTrainedConfig.__dataclass_fields__ and n != "tie_word_embeddings"]
    for key in kwargs:
        if key in fields:
            continue
        close = difflib.get_close_matches(key, memory_names, n=1, cutoff=0.8)
        if close or key.startswith("memory_"):
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(
                f"MemLMConfig got an unknown setting {key!r}; {hint}The memory settings are: {', '.join(memory_names)}."
            )


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"MemLMConfig: {name}={value!r} must be a positive integer.")


__all__ = ["MemLMConfig"]
