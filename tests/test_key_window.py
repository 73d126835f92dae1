"""`memory_key_window`: `kv` keys and queries made from the last few tokens of their attention window.

The behaviour tests that must hold for any memory (memorize equals forward, streaming, generation equals forward,
padding, batch isolation, threads) run again here, over every architecture, with a window of 3 tokens: a key then
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

from hf_memlm import MemLMConfig
from hf_memlm.memory_base import key_window_mean, split_heads

WINDOW = 3


@pytest.fixture(autouse=True)
def _key_window(monkeypatch):
    settings = conftest.memory_settings

    def with_window(kind, **overrides):
        return settings(kind, **({"memory_key_window": WINDOW} | overrides) if kind == "kv" else overrides)

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
    assert build(*arch_kind).config.memory_key_window == WINDOW


def test_keys_are_the_projected_mean_of_the_last_real_tokens_of_the_segment():
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
    means = [hidden[real[max(0, n - WINDOW + 1) : n + 1]].mean(0) for n in range(len(real) - 1)]
    expected = F.normalize(split_heads(block.mem_key(torch.stack(means)[None]), block.num_heads), dim=-1)[0]
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


def test_key_window_must_be_a_positive_integer():
    with pytest.raises(ValueError, match="memory_key_window"):
        MemLMConfig(text_config=conftest.base_config("llama"), memory_type="kv", memory_key_window=0)
