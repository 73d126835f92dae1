"""LoRA targets for a memory LM: the base model's projections, never the memory blocks.

PEFT has no default `target_modules` for `model_type="memlm"`, and it matches names by suffix, so a
plain `["q_proj", "v_proj"]` would reach any submodule with that name anywhere in the model. The memory
blocks use names no supported base uses (`mem_query`, ...), and `lora_target_modules` goes further: it
returns a regex anchored in `language_model.`, which PEFT matches against whole module names.
"""

from __future__ import annotations

import logging
import re

from torch import nn

logger = logging.getLogger(__name__)


def lora_target_modules(model: nn.Module, names: list[str] | str | None = None) -> str:
    """A regex for `LoraConfig(target_modules=...)` that matches LoRA targets inside the base model only.

    `model` is a `MemLMForCausalLM` (also one loaded through `trust_remote_code=True`). `names` are leaf
    module names such as `["q_proj", "v_proj"]`; by default PEFT's own defaults for the base's
    `model_type` (what `LoraConfig()` picks for that base on its own, e.g. `q_proj`/`v_proj` for Llama,
    `c_attn` for GPT-2), or every linear layer of the decoder layers when PEFT has none for that type.
    Raises ValueError when a name matches no module of the base.

        from peft import LoraConfig, get_peft_model
        peft_model = get_peft_model(model, LoraConfig(target_modules=hf_memlm.lora_target_modules(model)))
    """
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "memlm" or not hasattr(model, "language_model"):
        raise TypeError(
            f"lora_target_modules expects a MemLMForCausalLM (not wrapped by PEFT yet), got {type(model).__name__}."
        )
    base_type = config.text_config.model_type
    if names is None:
        names = default_lora_targets(model)
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if not names:
        raise ValueError("lora target_modules is empty; name at least one module of the base model (e.g. q_proj).")
    present = {name.rsplit(".", 1)[-1] for name, _ in model.language_model.named_modules()}
    missing = [name for name in names if name not in present]
    if missing:
        raise ValueError(
            f"lora target_modules {missing} name no module of the {base_type} base model; the linear layers of its "
            f"decoder layers are {decoder_linear_names(model)}."
        )
    alternatives = "|".join(re.escape(name) for name in names)
    return rf"language_model\..*\.({alternatives})"


def default_lora_targets(model: nn.Module) -> list[str]:
    """PEFT's default LoRA targets for the base of the `MemLMForCausalLM` `model` (what `LoraConfig()` picks for
    that `model_type`), or every linear layer of its decoder layers when PEFT has none for that type."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    base_type = model.config.text_config.model_type
    names = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(base_type)
    if names is None:
        names = decoder_linear_names(model)
        logger.info("PEFT has no default LoRA targets for %s; using the decoder layers' linears %s", base_type, names)
    return list(names)


def decoder_linear_names(model: nn.Module) -> list[str]:
    """Leaf names of the linear layers (incl. GPT-2's `Conv1D`) inside the base model's decoder layers."""
    from transformers.pytorch_utils import Conv1D

    layers = model.decoder_layers.named_modules()
    return sorted({name.rsplit(".", 1)[-1] for name, module in layers if isinstance(module, (nn.Linear, Conv1D))})


def is_peft_model(model) -> bool:
    """Whether `model` is wrapped by PEFT (a `PeftModel`: adapters, `get_base_model()`)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


__all__ = ["decoder_linear_names", "default_lora_targets", "is_peft_model", "lora_target_modules"]
