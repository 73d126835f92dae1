"""Configuration of a memory-augmented causal LM: a base model's config plus the memory settings.

This file is part of the Hub payload (copied next to the weights by `save_pretrained`), so it uses
single-dot relative imports only. It imports transformers and the plain-Python kind registry, not torch nor
a memory block (transformers' own `PreTrainedConfig` may load torch where it is installed).
"""

from __future__ import annotations

import difflib
import warnings
from typing import ClassVar

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import is_torch_available

from .memory_kinds import MEMORY_KINDS
from .memory_settings import KVSettings, MemorySettings, SlotSettings, check_positive_int

# The settings all kinds share; each kind's own are its settings class's (`memory_settings.py`).
# `bptt_segments` may change when a saved model is loaded (it changes where gradients stop, not what the
# weights compute); the others were trained with: changing them at load time would run the weights on a
# different computation (other layers, segment boundaries, heads).
COMMON_LOAD_TIME_SETTINGS = ("bptt_segments",)
COMMON_WEIGHT_SETTINGS = ("memory_type", "memory_layers", "segment_length", "memory_heads", "memory_head_dim")
# The weight settings of the built-in kinds too, for checks that compare two configs setting by setting.
WEIGHT_SETTINGS = COMMON_WEIGHT_SETTINGS + tuple(
    dict.fromkeys(
        name for kind in MEMORY_KINDS.values() for name in kind.settings.names() if name not in kind.settings.load_time
    )
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

    Settings marked with a kind belong to that kind (its class in `memory_settings.py`; `config.memory_settings`
    holds this config's kind's). A setting of another kind than `memory_type` is ignored with a warning (left at
    its default).

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
        memory_init_std (`float` or `None`): std of the memory projections at init (default: the base
            model's `initializer_range`). The output projection always starts at zero.
        memory_value_shift (`int`, `kv` and `slot`): memory pairs the key of token `j` with the value of token
            `j + memory_value_shift` (1 = "what followed this context", which trains much faster than 0).
        memory_key_window (`int`, `kv`): keys and queries are made from the mean of the hidden states of the
            last `memory_key_window` real tokens of the same attention window (the token itself included), values
            from the token alone. 1 (default): the token alone. More lets an entry's key say what came just before
            it: the entry of the space in "the pass key of the blue door is 48213" also says "blue door".
        memory_key_projections (`str`, `kv`): how the `memory_key_window` tokens make a key or query. `"shared"`
            (default): one projection of their mean. `"per_token"`: each of them through its own projection, summed
            (a learned causal convolution over the window); the earlier tokens' projections start at zero, so the
            model starts as with keys from one token, and training decides what of the context a key keeps. Among
            4 named needles the entry of the space before a key's digits is told apart from the other needles'
            only this way (`scripts/named_needle_keys.py`).
        num_slots (`int`, `slot`): slots per sequence.
        memory_size (`int`, `kv`): stored entries per sequence before FIFO eviction.
        memory_topk (`int` or `None`, `kv`): read only the top-k entries per head when more are stored;
            `None` reads all with an exact softmax.
        memory_dtype (`str` or `None`, `kv`): storage dtype of the entries (default: the model's dtype):
            `"float32"`, `"float16"`, `"bfloat16"`, or `"float8_e4m3fn"`: 1 byte per number, a quarter of
            float32's memory, for reading. Reads compute in the model's dtype; keys are unit vectors, well within
            float8's range, and values beyond +-448 are clipped to it. Writes under autograd (training) store
            the model's dtype instead, as autograd cannot sum gradients in float8.
        memory_value_dtype (`str` or `None`, `kv`): storage dtype of the values alone (default: `memory_dtype`).
            Keys choose the entries a read attends to, and a read averages the chosen values: on the real-model
            pass key, bfloat16 keys with float8 values answer word for word as bfloat16 entries do, where float8
            keys lose answers (`memory_dtype="bfloat16", memory_value_dtype="float8_e4m3fn"`: 3 bytes per key and
            value number pair instead of 4).
        memory_search (`str`, `kv`): how a top-k read finds its entries. `"exact"`: score every stored entry.
            `"auto"` (default): exact while a row holds at most `memory_search_threshold` entries, then an
            approximate nearest-neighbour index (faiss IVF, `pip install hf-memlm[faiss]`; without faiss,
            exact with a warning). The index only selects entries: scores and values stay differentiable.
        memory_search_threshold (`int`, `kv`): stored entries per row above which `"auto"` search uses the index.
        memory_search_probes (`int`, `kv`): index lists searched per query (more: higher recall, slower reads).
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
    memory_init_std: float | None = None
    # the built-in kinds' settings, flat as config.json holds them; defaults and checks are the kind's
    memory_value_shift: int = KVSettings.memory_value_shift
    memory_key_window: int = KVSettings.memory_key_window
    memory_key_projections: str = KVSettings.memory_key_projections
    num_slots: int = SlotSettings.num_slots
    memory_size: int = KVSettings.memory_size
    memory_topk: int | None = KVSettings.memory_topk
    memory_dtype: str | None = KVSettings.memory_dtype
    memory_value_dtype: str | None = KVSettings.memory_value_dtype
    memory_search: str = KVSettings.memory_search
    memory_search_threshold: int = KVSettings.memory_search_threshold
    memory_search_probes: int = KVSettings.memory_search_probes
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        kind = MEMORY_KINDS.get(self.memory_type)
        if kind is None:
            raise ValueError(
                f"MemLMConfig: memory_type={self.memory_type!r} is unknown; choose one of {tuple(MEMORY_KINDS)}."
            )
        _check_unknown_settings(kwargs, kind.settings)
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

        check_positive_int("segment_length", self.segment_length)
        check_positive_int("memory_heads", self.memory_heads)
        for name in ("bptt_segments", "memory_head_dim"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        self._ignore_other_kinds_settings(kind.settings)
        for name, default in kind.settings.defaults().items():
            if not hasattr(self, name):  # a setting of a registered kind that MemLMConfig does not declare
                setattr(self, name, default)
        self.memory_settings.check()
        if self.memory_init_std is not None and (
            not isinstance(self.memory_init_std, (int, float)) or self.memory_init_std <= 0
        ):
            raise ValueError(f"MemLMConfig: memory_init_std={self.memory_init_std!r} must be a positive number.")
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
        kind = MEMORY_KINDS.get(config_dict.get("memory_type", cls.memory_type))
        is_memlm = config_dict.get("model_type", cls.model_type) == cls.model_type and "text_config" in config_dict
        if is_memlm and kind is not None:  # (an unknown kind is refused by __post_init__, naming the known ones)
            own = kind.settings.names()
            others = [name for name in _settings_of_kinds() if name not in own]
            given = [name for name in others if name in kwargs]
            if given:
                raise ValueError(
                    f"MemLMConfig: {', '.join(given)} cannot be set when loading this model: "
                    f"{_owned_by(given)}, and this model has {config_dict['memory_type']!r} memory. Its settings "
                    f"that may change at load time: {', '.join(kind.settings.load_time + COMMON_LOAD_TIME_SETTINGS)}."
                )
            # A config.json written before settings belonged to kinds holds every kind's; other kinds' were never read.
            for name in others:
                config_dict.pop(name, None)
            load_time = kind.settings.load_time + COMMON_LOAD_TIME_SETTINGS
            weight = COMMON_WEIGHT_SETTINGS + tuple(name for name in own if name not in load_time)
            changed = [
                name for name in weight if name in kwargs and name in config_dict and kwargs[name] != config_dict[name]
            ]
            if changed:
                given = ", ".join(f"{name}={kwargs[name]!r}" for name in changed)
                saved = ", ".join(f"{name}={config_dict[name]!r}" for name in changed)
                raise ValueError(
                    f"MemLMConfig: {given} cannot change when loading a saved model (it holds {saved}): its weights "
                    f"were trained for those settings and would compute something else. Only "
                    f"{', '.join(load_time)} may change at load time; to use other settings, build a new "
                    "model (MemLMForCausalLM.from_base) and train it."
                )
            # validated by __post_init__ with the rest, instead of set on the built config unchecked
            for name in load_time:
                if name in kwargs:
                    config_dict[name] = kwargs.pop(name)
        return super().from_dict(config_dict, **kwargs)

    @property
    def memory_settings(self) -> MemorySettings:
        """The settings of this config's memory kind (a `memory_settings.py` class): what its blocks read."""
        settings = MEMORY_KINDS[self.memory_type].settings
        return settings(**{name: getattr(self, name) for name in settings.names()})

    def _ignore_other_kinds_settings(self, settings: type[MemorySettings]) -> None:
        """A setting only other kinds have (`memory_topk` given to a `slot` config, as when a config file
        written for `kv` runs with `--model.memory.memory_type slot`) is put back to its default, with a warning,
        so that it reads and saves as what it is: unused."""
        ignored = []
        for name in _settings_of_kinds():
            field = type(self).__dataclass_fields__.get(name)
            if name in settings.names() or field is None or getattr(self, name) == field.default:
                continue
            ignored.append(f"{name}={getattr(self, name)!r}")
            setattr(self, name, field.default)
        if ignored:
            warnings.warn(
                f"MemLMConfig: {', '.join(ignored)} {'is a setting' if len(ignored) == 1 else 'are settings'} of "
                f"other memory kinds, not of {self.memory_type!r} memory (whose settings are "
                f"{', '.join(settings.names())}): ignored, left at the default.",
                UserWarning,
                stacklevel=4,
            )

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
    if not is_recurrent:
        is_recurrent = _caches_recurrent_layers(text_config)
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
    if not is_torch_available():
        return  # the checks below ask transformers' model classes (torch); a config read without torch runs no model
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

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


def _settings_of_kinds() -> dict[str, list[str]]:
    """Every registered kind's setting names, each with the kinds that have it."""
    owners: dict[str, list[str]] = {}
    for name, kind in MEMORY_KINDS.items():
        for setting in kind.settings.names():
            owners.setdefault(setting, []).append(name)
    return owners


def _owned_by(names: list[str]) -> str:
    owners = _settings_of_kinds()
    return "; ".join(f"{name} is a setting of {' and '.join(repr(k) for k in owners[name])} memory" for name in names)


def _caches_recurrent_layers(text_config: PreTrainedConfig) -> bool:
    """Whether transformers' cache for this base keeps a recurrent layer state (a linear-attention cache layer,
    in recent releases), read from the cache it would build; False where that cannot be told (no torch, an older
    transformers, a layout it cannot build)."""
    if not is_torch_available():
        return False
    try:
        from transformers import DynamicCache
        from transformers.cache_utils import LinearAttentionCacheLayerMixin
    except ImportError:  # older releases: such bases are told by model_type and layer_types only
        return False
    try:
        layers = DynamicCache(config=text_config).layers
    except Exception:  # a cache layout transformers cannot build from this config: nothing to learn from it
        return False
    return any(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in layers)


def _check_unknown_settings(kwargs: dict, settings: type[MemorySettings]) -> None:
    """A misspelt memory setting would be kept as an unused attribute and the default used silently. Settings
    that a registered kind declares and `MemLMConfig` does not (a new kind's) are accepted for that kind."""
    fields = [name for name in MemLMConfig.__dataclass_fields__ if name != "text_config"]
    fields += [name for name in settings.names() if name not in fields]
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


__all__ = ["MemLMConfig"]
