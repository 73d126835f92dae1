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
    with pytest.raises(ValueError, match="whole number of segments"):
        SharedHaystack(model, torch.ones(2 * SEGMENT, dtype=torch.long), head_segments=1, lengths=[3 * SEGMENT])


def _searched_model():
    """A kv model whose reads above 8 entries go through the faiss index, searched exhaustively (every list
    probed), so that its picks must be the exact top-k."""
    pytest.importorskip("faiss")
    # at layer 1 a key depends on the tokens before it (at layer 0 a repeated token repeats its key: ties)
    return _kv_model(
        1, memory_layers=(1,), memory_search="auto", memory_search_threshold=SEGMENT, memory_search_probes=4096
    )


def test_shared_haystack_index_is_built_once_and_finds_what_an_exact_read_finds(monkeypatch):
    torch.manual_seed(0)
    model = _searched_model()
    block = model.memory_blocks["1"]
    generator = torch.Generator().manual_seed(1)
    haystack = torch.randint(1, 90, (128 * SEGMENT,), generator=generator)  # 1,024 entries: 32 lists
    lengths = [16 * SEGMENT, 128 * SEGMENT]
    shared = SharedHaystack(model, haystack, head_segments=2, lengths=lengths)
    import hf_memlm.memory_kv as memory_kv

    built, real_index = [], memory_kv._SearchIndex
    monkeypatch.setattr(memory_kv, "_SearchIndex", lambda *args: built.append(1) or real_index(*args))
    hidden = torch.randn(1, 6, model.config.text_config.hidden_size, generator=generator)
    prompt = torch.randint(1, 90, (1, 5), generator=generator)
    for seed, tokens in [(2, lengths[0]), (3, lengths[1]), (4, lengths[0])]:  # each head leaves its index
        head = torch.randint(1, 90, (2 * SEGMENT,), generator=torch.Generator().manual_seed(seed))
        state = shared.state(head, tokens)
        before = len(built)
        assert block.uses_index(state.layers[1])
        picks, picked = block.select_entries(hidden, state.layers[1])
        read = model(prompt, memory_state=state).logits
        assert len(built) == before, "a read of the shared haystack built an index"
        monkeypatch.setattr(block, "search", "exact")
        whole = model.memorize(torch.cat([head, haystack[:tokens]])[None])
        exact, _ = block.select_entries(hidden, whole.layers[1])
        torch.testing.assert_close(read, model(prompt, memory_state=whole).logits)
        monkeypatch.setattr(block, "search", "auto")
        assert bool(picked.all())
        # the same top-k scores (ids may differ where two entries' keys tie, as repeated contexts' do)
        found, wanted = (
            _pick_scores(block, hidden, state.layers[1], picks),
            _pick_scores(block, hidden, whole.layers[1], exact),
        )
        torch.testing.assert_close(found, wanted, msg=lambda m, case=(seed, tokens): f"{case}: {m}")


def _pick_scores(block, hidden, layer_state, picks) -> torch.Tensor:
    """The scores of a read's picks (B, H, T, k) for the queries of `hidden`, sorted."""
    queries, keys = block.queries(hidden), layer_state["keys"]
    index = picks[..., None].expand(-1, -1, -1, -1, keys.shape[-1])
    chosen = keys[:, :, None].expand(-1, -1, queries.shape[2], -1, -1).gather(3, index)
    return (chosen.to(queries.dtype) @ queries[..., None]).squeeze(-1).sort(-1).values


def test_shared_haystack_warns_for_a_length_it_kept_no_index_for():
    model = _searched_model()
    haystack = torch.randint(1, 90, (8 * SEGMENT,), generator=torch.Generator().manual_seed(1))
    shared = SharedHaystack(model, haystack, head_segments=1, lengths=[8 * SEGMENT])
    head = torch.ones(SEGMENT, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shared.state(head, 8 * SEGMENT)
    with pytest.warns(UserWarning, match="not one of its `lengths`"):
        state = shared.state(head, 4 * SEGMENT)
    assert model.memory_blocks["1"].uses_index(state.layers[1])  # it builds its own: still a read through an index
