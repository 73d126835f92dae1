"""Checks of what a forward receives, so bad input fails with a message that names it and says how to fix it,
instead of an index error deep in the base model (or a memory silently poisoned by NaN), and of what
`from_base` is given to load. Part of the Hub payload.
"""

from __future__ import annotations

import os

import torch


def check_inputs(
    input_ids, inputs_embeds, labels, ignore_index: int, vocab_size: int, check_labels: bool
) -> tuple[int, int, bool]:
    """(batch, tokens, no label counts) of a forward's inputs; a clear error for inputs the base model would
    fail on obscurely (or silently). The value checks are read back in one host sync; `check_labels`
    adds "is every label ignored?" to it."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
    name, tokens = ("input_ids", input_ids) if input_ids is not None else ("inputs_embeds", inputs_embeds)
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tokens).__name__}.")
    expected_dims = 2 if input_ids is not None else 3
    if tokens.dim() != expected_dims:
        layout = "(batch, tokens)" if input_ids is not None else "(batch, tokens, hidden)"
        raise ValueError(
            f"{name} must be {expected_dims}-D {layout}, got shape {tuple(tokens.shape)}; for a single sequence "
            f"add the batch dimension ({name}[None])."
        )
    if tokens.shape[0] == 0:
        raise ValueError(f"{name} has no rows (shape {tuple(tokens.shape)}); pass at least one sequence.")
    if tokens.shape[1] == 0:
        raise ValueError(f"{name} has no tokens (shape {tuple(tokens.shape)}); pass at least one token per row.")
    if input_ids is not None:
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise TypeError(
                f"input_ids must hold integer token ids, got dtype {input_ids.dtype}; convert with "
                "input_ids.long() (and check they are token ids, not embeddings or scores)."
            )
    batch, length = tokens.shape[:2]
    if labels is not None and labels.shape[:2] != (batch, length):
        raise ValueError(f"labels have shape {tuple(labels.shape)}, expected ({batch}, {length}) like the input.")
    if input_ids is not None:
        values = [input_ids.min().long(), input_ids.max().long()]
    else:
        values = [torch.isfinite(inputs_embeds).all().long()]
    check_labels = check_labels and labels is not None
    if check_labels:
        values.append((labels != ignore_index).any().to(values[0].device).long())
    values = torch.stack(values).tolist()
    some_label_counts = values.pop() if check_labels else True
    if input_ids is not None:
        low, high = values
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"input_ids must lie in [0, {vocab_size}) (the model's vocabulary), got values from {low} to "
                f"{high}; was it tokenized with another tokenizer, or padded with a negative id (use "
                "attention_mask for padding)?"
            )
    elif not values[0]:
        raise ValueError(
            "inputs_embeds contains NaN or inf; it would poison the memory of its row for good. "
            "Check what produced the embeddings."
        )
    return batch, length, not some_label_counts


def check_embedding_width(inputs_embeds, width: int) -> None:
    """`inputs_embeds` as wide as the model's input embeddings (else the base fails with a bare size mismatch)."""
    if inputs_embeds is not None and inputs_embeds.shape[-1] != width:
        raise ValueError(
            f"inputs_embeds has width {inputs_embeds.shape[-1]} (shape {tuple(inputs_embeds.shape)}) but this "
            f"model's input embeddings have width {width}; make them with model.get_input_embeddings()(input_ids)."
        )


def load_base(base, base_kwargs: dict):
    """The base causal LM `from_base` wraps, loaded from a Hub id or a local folder (a GGUF file in it too)."""
    from transformers import AutoModelForCausalLM

    check_local_base(base, base_kwargs.get("gguf_file"))
    return without_unpacked_gguf_config(AutoModelForCausalLM.from_pretrained(base, **base_kwargs))


def without_unpacked_gguf_config(language_model):
    """A base loaded from a GGUF file whose weights were all unpacked to plain tensors (transformers does so where
    no GGUF matmul kernel is installed) keeps its `quantization_config` saying "gguf": saved with it, every reload
    would go through transformers' GGUF quantizer and warn about packed weights it does not have. Drop it then;
    a base whose weights stay packed keeps it."""
    quantization = getattr(language_model.config, "quantization_config", None)
    method = (
        quantization.get("quant_method")
        if isinstance(quantization, dict)
        else getattr(quantization, "quant_method", None)
    )
    packed = any(type(module).__name__.startswith("Gguf") for module in language_model.modules())
    if str(getattr(method, "value", method)).lower() == "gguf" and not packed:
        del language_model.config.quantization_config
        language_model.hf_quantizer = None
        language_model.is_quantized = False
    return language_model


def check_local_base(base, gguf_file: str | None = None) -> None:
    """A `base` written as a local path (absolute, relative with ./ or ../, ~, or a path object) must be a model
    folder (holding `gguf_file` when one is named); without this a missing folder is reported as a malformed Hub id."""
    path = os.fsdecode(os.fspath(base))
    looks_local = not isinstance(base, (str, bytes)) or path.startswith(("/", "./", "../", "~", ".\\", "..\\"))
    looks_local = looks_local or os.path.isabs(path) or path in (".", "..")
    if os.path.exists(os.path.expanduser(path)):
        if not os.path.isdir(os.path.expanduser(path)):
            raise FileNotFoundError(
                f"from_base: {path!r} is a file; pass the folder holding a saved causal LM (config.json + weights)."
            )
        if gguf_file is not None:
            if not os.path.isfile(os.path.join(os.path.expanduser(path), gguf_file)):
                raise FileNotFoundError(f"from_base: the folder {path!r} has no GGUF file {gguf_file!r}.")
        elif not os.path.isfile(os.path.join(os.path.expanduser(path), "config.json")):
            raise FileNotFoundError(
                f"from_base: the folder {path!r} has no config.json, so it holds no saved model; pass a folder "
                "written by save_pretrained, or a Hub id such as 'gpt2'."
            )
    elif looks_local:
        raise FileNotFoundError(
            f"from_base: the folder {path!r} does not exist; pass a local folder holding a saved causal LM "
            "(config.json + weights) or a Hub id such as 'gpt2' or 'Qwen/Qwen2.5-0.5B'."
        )


def check_memorize_inputs(input_ids, attention_mask) -> None:
    """`memorize` reads a (batch, tokens) tensor of ids, with one mask value per token when a mask is given."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"memorize: input_ids must be a (batch, tokens) tensor with tokens > 0, got {shape}.")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"memorize: attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
            f"{tuple(input_ids.shape)}; pass one mask value per token."
        )


__all__ = [
    "check_embedding_width",
    "check_inputs",
    "check_local_base",
    "check_memorize_inputs",
    "load_base",
    "without_unpacked_gguf_config",
]
