"""What transformers callers see of `MemLMForCausalLM`: the keyword arguments `forward` accepts besides its named
ones, its output classes, and `MemLMBackbone`, the model without its LM head (`model.base_model`).

Part of the Hub payload: flat sibling files, single-dot relative imports, torch + transformers only.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .memory_state import MemoryState

# Keyword arguments that callers of a causal LM pass besides the named ones of `forward`: the Trainer's loss
# normaliser, the loss's ignore index, and what generation and PEFT pass as None/False (positions and attention
# maps are refused when set). Any other keyword is a mistake and is refused (it would be silently dropped).
_EXTRA_FORWARD_KWARGS = ("num_items_in_batch", "ignore_index", "position_ids", "output_attentions", "cache_position")
# transformers' earlier names of `cache`
_CACHE_ALIASES = ("past_key_values", "cache_params")


@dataclass
class MemLMCausalLMOutput(CausalLMOutputWithPast):
    """Output of [`MemLMForCausalLM`]: transformers' `CausalLMOutputWithPast` (loss, logits, cache, hidden_states;
    `attentions` is always None) plus the memory state after the call."""

    memory_state: MemoryState | None = None


@dataclass
class MemLMModelOutput(BaseModelOutputWithPast):
    """Output of [`MemLMBackbone`]: the final hidden states (what the LM head reads), plus the memory state."""

    memory_state: MemoryState | None = None


class MemLMBackbone:
    """`model.base_model` of a [`MemLMForCausalLM`]: the same model, memory included, without its LM head. Calling it
    takes `forward`'s arguments (but `labels`) and returns `last_hidden_state`, the final hidden states that the
    LM head turns into logits, as transformers' headless models do (TRL's fused LM head reads them).

    A view, not a module: it holds no weights of its own, so parameter names and checkpoints are unchanged. The
    logits are still computed inside (segments run through the whole base model) and dropped."""

    _tp_plan = None  # read through `base_model` by transformers' parallelism checks
    _pp_plan = None

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs) -> MemLMModelOutput:
        if kwargs.get("labels") is not None:
            raise TypeError("The backbone has no LM head and takes no labels; call the model itself for a loss.")
        kwargs.pop("labels", None)
        hidden_wanted = bool(kwargs.pop("output_hidden_states", False))
        kwargs.pop("return_dict", None)
        out = type(self.model).forward(self.model, *args, output_hidden_states=True, return_dict=True, **kwargs)
        return MemLMModelOutput(
            last_hidden_state=out.hidden_states[-1],
            cache=out.cache,
            hidden_states=out.hidden_states if hidden_wanted else None,
            memory_state=out.memory_state,
        )

    forward = __call__


def check_forward_kwargs(cache, kwargs: dict):
    """The KV cache, taken from `past_key_values=` / `cache_params=` too (popped from `kwargs`), as transformers
    reads them; a TypeError naming any keyword `forward` does not use."""
    for alias in _CACHE_ALIASES:
        if alias not in kwargs:
            continue
        value = kwargs.pop(alias)
        if value is None:
            continue
        if cache is not None:
            raise ValueError(f"Pass the KV cache once: got both cache= and {alias}= (they are the same argument).")
        cache = value
    unknown = sorted(set(kwargs) - set(_EXTRA_FORWARD_KWARGS))
    if unknown:
        raise TypeError(
            f"MemLMForCausalLM.forward got unexpected keyword argument(s) {unknown}. It takes input_ids, "
            "attention_mask, cache (or past_key_values), inputs_embeds, labels, use_cache, memory_state, "
            f"logits_to_keep, output_hidden_states, return_dict and {', '.join(_EXTRA_FORWARD_KWARGS)}."
            + (
                " A tokenizer that returns token_type_ids: call it with return_token_type_ids=False."
                if "token_type_ids" in unknown
                else ""
            )
        )
    return cache


__all__ = ["MemLMBackbone", "MemLMCausalLMOutput", "MemLMModelOutput", "check_forward_kwargs"]
