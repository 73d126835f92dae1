"""A haystack read once and put after each example's head gives the memory of reading the example whole."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import SEGMENT, build, memory_settings

from hf_memlm.evaluation.shared_haystack import SharedHaystack


def _kv_model(value_shift: int, memory_layers=(0,), **extra):
    model = build("llama", "kv").eval()
    settings = memory_settings(
        "kv", memory_size=4096, memory_value_shift=value_shift, memory_layers=list(memory_layers), **extra
    )
    from hf_memlm import MemLMConfig, MemLMForCausalLM

    config = MemLMConfig(text_config=model.config.text_config, **settings)
    fresh = MemLMForCausalLM(config).eval()
    fresh.load_state_dict(model.state_dict(), strict=False)
    return fresh


@pytest.mark.parametrize("value_shift", [0, 1])
@pytest.mark.parametrize("tokens", [SEGMENT, 3 * SEGMENT, 6 * SEGMENT])
def test_shared_haystack_equals_reading_the_example_whole(value_shift, tokens):
    torch.manual_seed(0)
    model = _kv_model(value_shift)
    generator = torch.Generator().manual_seed(1)
    haystack = torch.randint(1, 90, (6 * SEGMENT,), generator=generator)
    shared = SharedHaystack(model, haystack, head_segments=2)
    for seed in (2, 3):  # the buffers are reused: a second head must not keep anything of the first
        head = torch.randint(1, 90, (2 * SEGMENT,), generator=torch.Generator().manual_seed(seed))
        spliced = shared.state(head, tokens).layers[0]
        whole = model.memorize(torch.cat([head, haystack[:tokens]])[None]).layers[0]
        assert spliced.keys() == whole.keys()
        for name, tensor in whole.items():
            assert spliced[name].shape == tensor.shape, name
            torch.testing.assert_close(spliced[name], tensor, rtol=0, atol=1e-6, msg=name)
        # and a read of it answers the same
        prompt = torch.randint(1, 90, (1, 5), generator=generator)
        state = shared.state(head, tokens)
        torch.testing.assert_close(
            model(prompt, memory_state=state).logits,
            model(prompt, memory_state=model.memorize(torch.cat([head, haystack[:tokens]])[None])).logits,
        )


def test_shared_haystack_refuses_what_it_cannot_share():
    model = _kv_model(1, memory_layers=(0, 1))
    with pytest.raises(ValueError, match="single layer"):
        SharedHaystack(model, torch.ones(2 * SEGMENT, dtype=torch.long), head_segments=1)
    model = _kv_model(1)
    with pytest.raises(ValueError, match="whole segments"):
        SharedHaystack(model, torch.ones(2 * SEGMENT + 1, dtype=torch.long), head_segments=1)
    with pytest.raises(ValueError, match="memory_size"):
        SharedHaystack(model, torch.ones(4096, dtype=torch.long), head_segments=1)
    shared = SharedHaystack(model, torch.ones(2 * SEGMENT, dtype=torch.long), head_segments=1)
    with pytest.raises(ValueError, match="whole number of segments"):
        shared.state(torch.ones(SEGMENT, dtype=torch.long), SEGMENT + 1)
    # the approximate index would be built anew for every example: a warning that says to read exactly
    searched = _kv_model(1, memory_search="auto", memory_search_threshold=SEGMENT)
    with pytest.warns(UserWarning, match="memory_search='exact'"):
        SharedHaystack(searched, torch.ones(2 * SEGMENT, dtype=torch.long), head_segments=1)
    exact = _kv_model(1, memory_search="exact", memory_search_threshold=SEGMENT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SharedHaystack(exact, torch.ones(2 * SEGMENT, dtype=torch.long), head_segments=1)
