"""Build the model to train and choose what trains: everything, only the memory, or LoRA on the base
plus the memory.

The four modes (`TRAINABLE_MODES`):
  * `full`         every parameter trains (training from scratch, or full fine-tuning);
  * `memory_only`  the base model is frozen, only the memory blocks train (the base keeps computing
                   exactly what it computed before; memory adds to it);
  * `memory_new`   a second stage (`model.memory_from`): the base and the memory weights loaded from the first
                   stage are frozen, only the memory weights the first stage lacked train (what the first
                   stage learned to read stays as it was);
  * `lora`         PEFT LoRA adapters on the base's projections plus fully trainable memory blocks.

PEFT has no default LoRA targets for `model_type="memlm"`, so they are derived from the base model's
type (`text_config.model_type`) and restricted to `language_model.` by a regex
(`hf_memlm.integrations.lora.lora_target_modules`). The memory blocks go in `modules_to_save` by their
leaf names (`memory_blocks.0`, ...), since PEFT rejects the `ModuleDict` that holds them.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from hf_memlm.configuration_memlm import MemLMConfig
from hf_memlm.integrations.lora import is_peft_model, lora_target_modules
from hf_memlm.memory_base import MemoryBlock
from hf_memlm.modeling_memlm import MemLMForCausalLM

logger = logging.getLogger(__name__)

TRAINABLE_MODES = ("full", "memory_only", "memory_new", "lora")
ADAPTER_FOLDER = "adapter"


# -- building ------------------------------------------------------------------------------------------
def build_model(
    memory_settings: dict,
    *,
    base=None,
    base_kwargs: dict | None = None,
    text_config=None,
    vocab_size: int | None = None,
) -> MemLMForCausalLM:
    """A memory LM: `base` (Hub id, folder or loaded model) wrapped with `from_base`, or a fresh model whose
    base has the architecture `text_config` (a base config, or a dict with `model_type` and its fields).

    `vocab_size` fills `text_config["vocab_size"]` when the dict leaves it out (the tokenizer's size).
    """
    if base is not None:
        if text_config:
            raise ValueError(
                "model.base and model.text_config are both set: a pretrained base brings its own architecture. "
                "Remove model.text_config, or set model.base to null to train from scratch."
            )
        if isinstance(base, str):  # a shipped GGUF base's short name, or a GGUF file's folder
            from hf_memlm.integrations.gguf import resolve_base

            base, base_kwargs = resolve_base(base, base_kwargs)
        return MemLMForCausalLM.from_base(base, base_kwargs=base_kwargs or None, **memory_settings)
    if base_kwargs:
        raise ValueError("model.base_kwargs only apply with model.base (a pretrained model to load).")
    if isinstance(text_config, dict) or text_config is None:
        text_config = build_text_config(text_config, vocab_size)
    config = MemLMConfig(text_config=text_config, **memory_settings)
    return MemLMForCausalLM(config)


def build_text_config(text_config: dict | None, vocab_size: int | None = None):
    """The base architecture's config from a plain dict (`model_type` plus that config's fields)."""
    from transformers import AutoConfig

    settings = dict(text_config or {})
    if "model_type" not in settings:
        raise ValueError(
            "model.text_config needs a `model_type` (e.g. llama, gpt2, qwen2) to build a base model from scratch, "
            "or set model.base to a pretrained model to wrap."
        )
    model_type = settings.pop("model_type")
    _check_text_config_keys(model_type, settings)
    if settings.get("vocab_size") is None:
        if vocab_size is None:
            raise ValueError("model.text_config.vocab_size is not set and there is no tokenizer to take it from.")
        settings["vocab_size"] = vocab_size
    try:
        return AutoConfig.for_model(model_type, **settings)
    except (TypeError, ValueError) as error:
        raise ValueError(f"model.text_config: {error}") from error


def _check_text_config_keys(model_type: str, settings: dict) -> None:
    """Config classes keep unknown keyword arguments as plain attributes, so a typo such as `hiden_size`
    would silently build a model of the default size; reject keys the config class does not declare."""
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=3)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"model.text_config.model_type={model_type!r} is not a model type transformers knows.{hint}")
    config_class = CONFIG_MAPPING[model_type]
    if not dataclasses.is_dataclass(config_class):
        return
    known = {f.name for f in dataclasses.fields(config_class)} | set(getattr(config_class, "attribute_map", {}))
    known.add("attn_implementation")
    for key in settings:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"model.text_config.{key}: {config_class.__name__} has no such field.{hint}")


# -- trainable parts -----------------------------------------------------------------------------------
def memory_block_names(model: nn.Module) -> list[str]:
    """Leaf names of the memory blocks (`memory_blocks.0`, ...), relative to the MemLM model."""
    return [f"memory_blocks.{index}" for index in model.config.memory_layers]


def memory_parameter_ids(model: nn.Module) -> set[int]:
    """`id()` of every parameter that lives in a memory block, found by module type (works under PEFT,
    DDP and FSDP wrappers, where names gain prefixes)."""
    ids = set()
    for module in model.modules():
        if isinstance(module, MemoryBlock):
            ids.update(id(param) for param in module.parameters())
    return ids


def configure_trainable(
    model: MemLMForCausalLM, mode: str, lora_settings: dict | None = None, new_memory: Iterable[str] = ()
):
    """Freeze according to `mode`; returns the model to train (a `PeftModel` for `lora`). `new_memory`: for
    `memory_new`, the names of the memory weights that train (those `load_memory_from` found no saved value for)."""
    if mode not in TRAINABLE_MODES:
        raise ValueError(f"model.trainable={mode!r} is unknown; choose one of {TRAINABLE_MODES}.")
    if mode != "lora" and lora_settings:
        raise ValueError(f"lora settings were given but model.trainable={mode!r}; set model.trainable to lora.")
    if mode == "full":
        model.requires_grad_(True)
        return model
    if mode == "memory_only":
        model.requires_grad_(False)
        model.memory_blocks.requires_grad_(True)
        return model
    if mode == "memory_new":
        new_memory = set(new_memory)
        if not new_memory:
            raise ValueError(
                "model.trainable=memory_new trains the memory weights that model.memory_from's folder lacks, and it "
                "lacks none here: give this model weights the first stage has not (memory_key_projections: "
                "per_token with a larger memory_key_window), or set model.trainable: memory_only."
            )
        for name, param in model.named_parameters():
            param.requires_grad = name in new_memory
        return model
    return wrap_with_lora(model, lora_settings or {})


def wrap_with_lora(model: MemLMForCausalLM, lora_settings: dict):
    """LoRA adapters on the base model plus trainable (and saved) memory blocks."""
    from peft import LoraConfig, TaskType, get_peft_model

    settings = dict(lora_settings)
    for reserved in ("modules_to_save", "task_type"):
        if reserved in settings:
            raise ValueError(f"lora.{reserved} is set by hf_memlm (the memory blocks, a causal LM); remove it.")
    target_names = settings.pop("target_modules", None)
    lora_config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        target_modules=lora_target_modules(model, target_names),
        modules_to_save=memory_block_names(model),
        **settings,
    )
    peft_model = get_peft_model(model, lora_config)
    # Make the PEFT promise visible: every memory parameter trains (the trainable copies inside the wrappers).
    frozen = [
        name
        for name, param in peft_model.named_parameters()
        if ".memory_blocks." in name and ".modules_to_save." in name and not param.requires_grad
    ]
    if frozen:  # pragma: no cover - a PEFT behaviour change would land here
        raise RuntimeError(f"PEFT left memory parameters frozen: {frozen}")
    return peft_model


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable / total parameter counts, and how many trainable ones sit in memory blocks."""
    memory_ids = memory_parameter_ids(model)
    seen, total, trainable, trainable_memory = set(), 0, 0, 0
    for param in model.parameters():
        if id(param) in seen:  # tied weights
            continue
        seen.add(id(param))
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
            if id(param) in memory_ids:
                trainable_memory += param.numel()
    return {"total": total, "trainable": trainable, "trainable_memory": trainable_memory}


# -- saving --------------------------------------------------------------------------------------------
def save_trained_model(model, output_dir: str | Path, tokenizer=None) -> dict[str, Path]:
    """Save the trained model so `AutoModelForCausalLM.from_pretrained(output_dir)` loads it.

    A `PeftModel` is saved twice: its adapter (LoRA + memory weights) under `output_dir/adapter`, then the
    merged model (LoRA folded into the base) in `output_dir`. Returns the paths written. The model is
    unwrapped in place for the merge: call this at the end of training.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    if is_peft_model(model):
        adapter_dir = output_dir / ADAPTER_FOLDER
        model.save_pretrained(adapter_dir)
        written["adapter"] = adapter_dir
        model = model.merge_and_unload()
    model.save_pretrained(output_dir)
    written["model"] = output_dir
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
        written["tokenizer"] = output_dir
    return written


@torch.no_grad()
def memory_weights(model) -> dict[str, torch.Tensor]:
    """Copies of the memory weights by plain names (`memory_blocks.0.mem_query.weight`), under PEFT or not."""
    base = model.get_base_model() if is_peft_model(model) else model
    weights = {}
    for index in base.config.memory_layers:
        block = base.memory_blocks[str(index)]
        if hasattr(block, "modules_to_save"):  # PEFT wrapper: the trained copy, not the frozen original
            block = block.modules_to_save[block.active_adapters[0]]
        for name, param in block.named_parameters():
            weights[f"memory_blocks.{index}.{name}"] = param.detach().clone()
    return weights


__all__ = [
    "ADAPTER_FOLDER",
    "TRAINABLE_MODES",
    "build_model",
    "build_text_config",
    "configure_trainable",
    "is_peft_model",
    "lora_target_modules",
    "memory_block_names",
    "memory_parameter_ids",
    "memory_weights",
    "parameter_counts",
    "save_trained_model",
    "wrap_with_lora",
]
