"""`forward` speaks transformers' language: its argument names, its output class, its base-model prefix."""

from __future__ import annotations

import pytest
import torch
from conftest import KINDS, VOCAB, build
from transformers.modeling_outputs import CausalLMOutputWithPast

from hf_memlm.modeling_memlm import MemLMBackbone


@pytest.mark.parametrize("base", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["past_key_values", "cache"])
def test_a_cached_continuation_scores_the_new_token_with_its_context(base, kind, name):
    model = build(base, kind)
    ids = torch.randint(1, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        out = model(ids[:, :-1], use_cache=True)
        past = out.past_key_values if name == "past_key_values" else out.cache
        step = model(ids[:, -1:], **{name: past}, use_cache=True).logits[:, -1]
        alone = model(ids[:, -1:]).logits[:, -1]
    assert not torch.allclose(alone, full, atol=1e-4)  # the context matters, so the check below can fail
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-4)


def test_the_cache_passed_under_two_names_is_refused():
    model = build("llama", "kv")
    ids = torch.randint(1, VOCAB, (1, 5))
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
        with pytest.raises(ValueError, match="both cache= and past_key_values="):
            model(ids[:, -1:], cache=cache, past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("kwargs", [{"pst_key_values": 123}, {"output_attention": True}, {"labels_mask": None}])
def test_unknown_keyword_arguments_are_refused_by_name(kwargs):
    model = build("llama", "slot")
    (name,) = kwargs
    with pytest.raises(TypeError, match=rf"unexpected keyword argument\(s\) \['{name}'\].*past_key_values"):
        model(torch.randint(1, VOCAB, (1, 5)), **kwargs)


def test_token_type_ids_are_refused_with_the_tokenizer_setting_that_drops_them():
    model = build("llama", "kv")
    ids = torch.randint(1, VOCAB, (1, 5))
    with pytest.raises(TypeError, match="return_token_type_ids=False"):
        model(ids, token_type_ids=torch.zeros_like(ids))


def test_what_the_trainer_generation_and_peft_pass_is_accepted():
    model = build("llama", "kv")
    ids = torch.randint(1, VOCAB, (2, 11))
    out = model(
        ids,
        labels=ids,
        num_items_in_batch=torch.tensor(20),
        output_attentions=False,
        position_ids=None,
        cache_position=None,
        past_key_values=None,
        return_dict=True,
    )
    assert torch.isfinite(out.loss)


def test_the_output_is_a_causal_lm_output_with_past_and_keeps_the_memory_fields():
    model = build("qwen2", "kv")
    ids = torch.randint(1, VOCAB, (1, 12))
    out = model(ids, labels=ids, use_cache=True)
    assert isinstance(out, CausalLMOutputWithPast)
    assert out.cache is out.past_key_values and out.cache is not None
    assert out.memory_state is not None and out.memory_state.memory_type == "kv"
    assert out.attentions is None and out.loss is not None
    # tuple order: loss, logits, cache, then the memory state (None fields are left out, as transformers does)
    assert model(ids, return_dict=False)[-1].memory_type == "kv"


def test_base_model_prefix_names_the_headless_memory_model_and_leaves_weight_names_alone(tmp_path):
    model = build("gpt2", "slot")
    assert isinstance(getattr(model, model.base_model_prefix), MemLMBackbone)
    assert isinstance(model.base_model, MemLMBackbone)  # not the wrapped base, which would run without memory
    names = set(model.state_dict())
    assert all(name.startswith(("language_model.", "memory_blocks.")) for name in names)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert set(reloaded.state_dict()) == names
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor)
