"""`memory_key_window`: `kv` keys and queries made from the last few tokens of their attention window.

The behaviour tests that must hold for any memory (memorize equals forward, streaming, generation equals forward,
padding, batch isolation, threads) run again here, over every architecture, with a window of 3 tokens, made into a
key both ways (`memory_key_projections`: one projection of their mean, or one per token, all non-zero): a key then
depends on tokens before it, so every path that cuts a text into pieces (segments, generation steps, flushes of
the generation window, memorize's segments side by side, padding on either side) must cut it the same way.
"""

from __future__ import annotations

import conftest
import pytest
import torch
import torch.nn.functional as F
from conftest import BASES, SEGMENT, VOCAB, build
from test_memorize import (  # noqa: F401  (collected again here, with the window)
    test_memorize_gives_the_forward_state_over_every_architecture,
    test_memorize_runs_many_segments_per_call_and_writes_them_in_order,
    test_memorize_then_generate_equals_generating_from_the_whole_text,
    test_memorize_with_two_memory_layers_and_left_padding_gives_the_forward_state,
)
from test_model_behaviour import (  # noqa: F401
    test_batch_isolation_with_padding,
    test_generate_matches_forward,
    test_padded_tokens_are_never_written,
    test_streaming_equivalence,
)
from test_padding import (  # noqa: F401
    test_padded_forward_equals_each_row_alone,
    test_padded_generate_equals_each_row_alone,
    test_padded_generate_state_equals_each_row_alone,
)
from test_threads import (  # noqa: F401
    test_concurrent_calls_equal_serial_calls,
    test_concurrent_generation_equals_serial,
    test_memorize_in_some_threads_leaves_forwards_in_others_whole,
)
from transformers import AutoModelForCausalLM

from hf_memlm import MemLMConfig, MemLMForCausalLM
from hf_memlm.memory_base import key_window_mean, key_window_states, split_heads

WINDOW = 3


@pytest.fixture(autouse=True, params=["shared", "per_token"])
def _key_window(monkeypatch, request):
    settings = conftest.memory_settings
    window = {"memory_key_window": WINDOW, "memory_key_projections": request.param}

    def with_window(kind, **overrides):
        return settings(kind, **(window | overrides) if kind == "kv" else overrides)

    monkeypatch.setattr(conftest, "memory_settings", with_window)
    import test_memorize

    monkeypatch.setattr(test_memorize, "memory_settings", with_window)


@pytest.fixture(params=list(BASES))
def arch_kind(request):
    return request.param, "kv"


@pytest.fixture(params=["kv"])
def kind(request):
    return request.param


def test_the_window_is_on(arch_kind):
    model = build(*arch_kind)
    assert model.config.memory_key_window == WINDOW
    if model.config.memory_key_projections == "per_token":
        earlier = model.memory_blocks["0"].mem_key_earlier
        assert len(earlier) == WINDOW - 1 and all(bool(proj.weight.abs().sum() > 0) for proj in earlier)


def test_keys_are_made_from_the_last_real_tokens_of_the_segment():
    model = build("llama", "kv", randomized=True)
    block = model.memory_blocks["0"]
    captured = {}
    write = block.write

    def keep(hidden_states, mask, *args, **kwargs):
        captured["hidden"], captured["mask"] = hidden_states, mask
        return write(hidden_states, mask, *args, **kwargs)

    block.write = keep
    ids = torch.randint(1, VOCAB, (1, SEGMENT), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 2] = 0  # a hole: the key of token 3 averages tokens 0, 1 and 3
    with torch.no_grad():
        state = model(ids, attention_mask=mask).memory_state.layers[0]
    hidden = captured["hidden"][0]
    real = captured["mask"][0].nonzero()[:, 0].tolist()  # the row's real tokens, as the model laid them out
    assert len(real) == SEGMENT - 1
    # value shift 1: each real token's key waits for the next real token's value; the last one is pending
    if model.config.memory_key_projections == "shared":  # one projection of the window's mean
        means = [hidden[real[max(0, n - WINDOW + 1) : n + 1]].mean(0) for n in range(len(real) - 1)]
        projected = block.mem_key(torch.stack(means))
    else:  # the token's own projection, plus that of the j-th real token before it for each j there is
        projected = torch.stack(
            [
                block.mem_key(hidden[real[n]])
                + sum(block.mem_key_earlier[j - 1](hidden[real[n - j]]) for j in range(1, WINDOW) if n - j >= 0)
                for n in range(len(real) - 1)
            ]
        )
    expected = F.normalize(split_heads(projected[None], block.num_heads), dim=-1)[0]
    stored = state["keys"][0][:, state["valid"][0]]
    torch.testing.assert_close(stored, expected.to(stored.dtype), rtol=1e-5, atol=1e-6)


def test_key_window_mean_skips_padding_and_continues_from_recent_states():
    hidden = torch.arange(1.0, 7.0)[None, :, None].expand(2, 6, 2).clone()  # token t holds t + 1
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 0, 1, 1]], dtype=torch.bool)
    out = key_window_mean(hidden, 3, mask)[..., 0]
    assert out[0].tolist() == [1.0, 1.5, 2.0, 3.0, 4.0, 5.0]
    torch.testing.assert_close(out[1, [2, 4, 5]], torch.tensor([3.0, 4.0, (3.0 + 5.0 + 6.0) / 3]))
    # the last two tokens alone, the four before them given as recent states: the same means
    tail = key_window_mean(hidden[:, 4:], 3, mask, recent=hidden[:, :4])
    torch.testing.assert_close(tail, key_window_mean(hidden, 3, mask)[:, 4:])
    assert key_window_mean(hidden, 1, mask) is hidden


def test_key_window_states_skip_padding_and_continue_from_recent_states():
    hidden = torch.arange(1.0, 7.0)[None, :, None].expand(2, 6, 2).clone()  # token t holds t + 1
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 0, 1, 1]], dtype=torch.bool)
    pairs = key_window_states(hidden, 3, mask)
    assert [states[0, :, 0].tolist() for states, _ in pairs] == [
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
        [0.0, 0.0, 1.0, 2.0, 3.0, 4.0],
    ]
    # row 1's real tokens are 3, 5 and 6: the token before 6 is 5, and the one before that 3, never the padding
    assert [float(states[1, 5, 0]) for states, _ in pairs] == [6.0, 5.0, 3.0]
    assert [bool(found[1, 4, 0]) for _, found in pairs] == [True, True, False]
    tail = key_window_states(hidden[:, 4:], 3, mask, recent=hidden[:, :4])
    for (part, part_found), (whole, whole_found) in zip(tail, pairs, strict=True):
        torch.testing.assert_close(part, whole[:, 4:])
        assert torch.equal(part_found, whole_found[:, 4:])


@pytest.mark.parametrize("earlier", [0, 1, 5, 6])
def test_key_window_states_of_the_last_tokens_equal_the_whole_windows(earlier):
    """A generated token's earlier tokens found from the window's other states (`recent`, in another dtype) equal
    those found over the whole window at once, with left padding and padding between real tokens."""
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0, 1], [1, 1, 0, 1, 0, 0, 1]], dtype=torch.bool)
    whole = key_window_states(hidden, 4, mask)
    recent = hidden[:, :earlier].to(torch.bfloat16) if earlier else None
    tail = hidden[:, earlier:]
    # the part kept in bfloat16 is compared at that precision
    reference = key_window_states(torch.cat([hidden[:, :earlier].to(torch.bfloat16).float(), tail], 1), 4, mask)
    for (part, part_found), (full, full_found) in zip(key_window_states(tail, 4, mask, recent), reference, strict=True):
        torch.testing.assert_close(part, full[:, earlier:])
        assert torch.equal(part_found, full_found[:, earlier:])
    assert whole[3][1][2, -1, 0] and not whole[3][1][1, -1, 0]  # row 2 has three real tokens before its last, row 1 two


def _per_token(**overrides):
    settings = conftest.memory_settings("kv", memory_key_window=WINDOW, memory_key_projections="per_token")
    return MemLMConfig(text_config=conftest.base_config("llama"), **(settings | overrides))


def test_per_token_keys_start_as_keys_from_one_token():
    """As initialised, the earlier tokens' projections are zero: the model reads and writes as with a window of 1."""
    torch.manual_seed(0)
    model = MemLMForCausalLM(_per_token()).eval()
    earlier = [*model.memory_blocks["0"].mem_query_earlier, *model.memory_blocks["0"].mem_key_earlier]
    assert len(earlier) == 2 * (WINDOW - 1) and all(not proj.weight.any() for proj in earlier)
    conftest.randomize_memory(model)  # memory that changes the logits, then the earlier tokens unheard again
    with torch.no_grad():
        for proj in earlier:
            proj.weight.zero_()
    one = MemLMForCausalLM(_per_token(memory_key_window=1)).eval()
    missing, unexpected = one.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all("_earlier." in name for name in unexpected) and unexpected
    ids = torch.randint(1, VOCAB, (2, 3 * SEGMENT), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, reference = model(ids), one(ids)
    torch.testing.assert_close(out.logits, reference.logits)
    torch.testing.assert_close(out.memory_state.layers[0]["keys"], reference.memory_state.layers[0]["keys"])
    assert not torch.equal(out.logits, model.language_model(ids).logits)  # the memory was read


def test_per_token_projections_learn_from_zero():
    model = MemLMForCausalLM(_per_token()).train()
    conftest.randomize_memory(model)
    block = model.memory_blocks["0"]
    with torch.no_grad():
        for proj in (*block.mem_query_earlier, *block.mem_key_earlier):
            proj.weight.zero_()
    ids = torch.randint(1, VOCAB, (2, 3 * SEGMENT), generator=torch.Generator().manual_seed(2))
    model(ids, labels=ids).loss.backward()
    for proj in (*block.mem_query_earlier, *block.mem_key_earlier):
        assert proj.weight.grad is not None and bool(proj.weight.grad.abs().sum() > 0)


def test_per_token_projections_round_trip_through_a_saved_folder(tmp_path):
    model = MemLMForCausalLM(_per_token()).eval()
    conftest.randomize_memory(model)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")  # a folder that already holds something
    model.save_pretrained(tmp_path / "model")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert loaded.config.memory_key_projections == "per_token"
    saved, reloaded = model.state_dict(), loaded.state_dict()
    assert saved.keys() == reloaded.keys()
    for name, tensor in saved.items():
        assert torch.equal(tensor, reloaded[name]), name
    ids = torch.randint(1, VOCAB, (1, 2 * SEGMENT), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_key_window_must_be_a_positive_integer():
    with pytest.raises(ValueError, match="memory_key_window"):
        MemLMConfig(text_config=conftest.base_config("llama"), memory_type="kv", memory_key_window=0)


def test_key_projections_must_be_a_known_choice():
    with pytest.raises(ValueError, match=r"memory_key_projections='conv'.*'shared', 'per_token'"):
        _per_token(memory_key_projections="conv")
