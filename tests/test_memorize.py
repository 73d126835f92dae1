"""`MemLMForCausalLM.memorize`: reading a document into memory gives the state a forward gives, without
logits over every token and without an autograd graph."""

from __future__ import annotations

import pytest
import torch
from conftest import KINDS, SEGMENT, VOCAB, base_config, build, memory_settings, randomize_memory

import hf_memlm
from hf_memlm import memory_writes


def _assert_same_state(left, right) -> None:
    assert left.memory_type == right.memory_type and sorted(left.layers) == sorted(right.layers)
    assert not left.window and not right.window
    for layer in left.layers:
        assert sorted(left.layers[layer]) == sorted(right.layers[layer])
        for name, tensor in left.layers[layer].items():
            torch.testing.assert_close(tensor, right.layers[layer][name], msg=f"layer {layer} {name}")


def test_memorize_gives_the_forward_state_over_every_architecture(arch_kind):
    model = build(*arch_kind)
    generator = torch.Generator().manual_seed(1)
    # 3.5 segments, two rows, the second right-padded: eviction (memory_size=12) and a partial segment run
    ids = torch.randint(1, VOCAB, (2, 3 * SEGMENT + SEGMENT // 2), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 2 * SEGMENT + 3 :] = 0
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).memory_state
    _assert_same_state(model.memorize(ids, attention_mask=mask), expected)

    # continuing a remembered stream: a state handed in is read on from, as a forward does
    more = torch.randint(1, VOCAB, (2, SEGMENT + 3), generator=generator)
    with torch.no_grad():
        continued = model(more, memory_state=expected).memory_state
    _assert_same_state(model.memorize(more, memory_state=expected), continued)


@pytest.mark.parametrize("kind", KINDS)
def test_memorize_with_two_memory_layers_and_left_padding_gives_the_forward_state(kind, monkeypatch):
    # The lower memory layer's reads change what the upper one writes, so segments run one after another.
    # Left padding of 5 and 11 tokens (not multiples of the segment) must not move any row's segments.
    torch.manual_seed(0)
    config = hf_memlm.MemLMConfig(text_config=base_config("llama"), **memory_settings(kind, memory_layers=[0, 1]))
    model = hf_memlm.MemLMForCausalLM(config).eval()
    randomize_memory(model)
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(1, VOCAB, (3, 4 * SEGMENT + 3), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :11] = 0
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).memory_state
    _assert_same_state(model.memorize(ids, attention_mask=mask), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_memorize_runs_many_segments_per_call_and_writes_them_in_order(kind, monkeypatch):
    # Two segments per base-model call, seven segments, rows of different lengths: the chunks, the write
    # order inside a chunk (slot writes segment by segment) and rows that end inside a chunk all matter.
    monkeypatch.setattr(memory_writes, "TOKENS_PER_CALL", 2 * 2 * SEGMENT)
    model = build("qwen2", kind)
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (2, 7 * SEGMENT), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :13] = 0  # left-padded: the row's segments start at its 14th column
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).memory_state
    _assert_same_state(model.memorize(ids, attention_mask=mask), expected)


@pytest.mark.parametrize("memory_size", [4096, 1 << 50], ids=["reservable", "too-large-to-reserve"])
def test_a_read_chunk_by_chunk_gives_the_whole_read_state_and_copies_no_entry_on_cpu(memory_size):
    # A long document is read chunk by chunk. On CPU the entries go to a buffer that reserves the whole capacity
    # (pages are backed once written), so no chunk copies the entries before it: copying held them twice (a
    # 5.5 GiB peak for a 1M-token read of SmolLM2 instead of 3.3). A capacity too large to reserve grows the
    # buffer instead, with the same entries.
    torch.manual_seed(0)
    config = hf_memlm.MemLMConfig(text_config=base_config("llama"), **memory_settings("kv", memory_size=memory_size))
    model = hf_memlm.MemLMForCausalLM(config).eval()
    randomize_memory(model, 0)
    ids = torch.randint(1, VOCAB, (1, 2048), generator=torch.Generator().manual_seed(4))
    state, storages = None, []
    for chunk in ids.split(256, dim=1):
        state = model.memorize(chunk, memory_state=state)
        storages.append(state.layers[0]["keys"].untyped_storage().data_ptr())
    _assert_same_state(state, model.memorize(ids))
    assert state.layers[0]["keys"].shape[2] == 2048 - config.memory_value_shift  # the last entry waits its value
    if memory_size < 1 << 50:  # (the first chunk's state is made before any buffer)
        assert len(set(storages[1:])) == 1, "a chunk copied the entries before it into a new buffer"


def test_memorize_keeps_no_graph_and_runs_nothing_above_the_last_memory_layer():
    model = build("llama", "kv").train()  # even in training mode with gradients enabled
    ids = torch.randint(1, VOCAB, (1, 5 * SEGMENT))
    calls = {"head": 0, "upper layer": 0, "read": 0}
    head = model.get_output_embeddings()
    upper = model.decoder_layers[1]  # the memory is beside layer 0
    block = model.memory_blocks["0"]
    original_read = block.read

    def counting_read(*args, **kwargs):
        calls["read"] += 1
        return original_read(*args, **kwargs)

    handles = [
        head.register_forward_hook(lambda *_: calls.__setitem__("head", calls["head"] + 1)),
        upper.register_forward_hook(lambda *_: calls.__setitem__("upper layer", calls["upper layer"] + 1)),
    ]
    block.read = counting_read
    try:
        with torch.enable_grad():
            state = model.memorize(ids)
    finally:
        for handle in handles:
            handle.remove()
        del block.read
    assert all(not tensor.requires_grad for tensors in state.layers.values() for tensor in tensors.values())
    # no logits, no layer above the memory, no read (the last memory layer's read changes no write)
    assert calls == {"head": 0, "upper layer": 0, "read": 0}
    assert int(state.num_entries()[0]) == model.config.memory_size  # it did write: the memory is full


def test_memorize_then_generate_equals_generating_from_the_whole_text():
    model = build("llama", "kv")
    document = torch.randint(1, VOCAB, (1, 3 * SEGMENT))  # whole segments: the prompt then starts a new one
    prompt = torch.randint(1, VOCAB, (1, 5))
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    state = model.memorize(document)
    with torch.no_grad():
        asked = model.generate(prompt, memory_state=state, **settings)[:, prompt.shape[1] :]
        whole = model.generate(torch.cat([document, prompt], dim=1), **settings)[:, document.shape[1] + 5 :]
    assert torch.equal(asked, whole)


def test_memorize_rejects_bad_input():
    model = build("llama", "kv")
    with pytest.raises(ValueError, match=r"memorize: input_ids must be a \(batch, tokens\) tensor"):
        model.memorize(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"memorize: input_ids must be a \(batch, tokens\) tensor .* got list"):
        model.memorize([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"memorize: attention_mask has shape \(1, 3\) but input_ids has \(1, 4\)"):
        model.memorize(torch.ones(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 3, dtype=torch.long))
    slot_state = build("llama", "slot").memorize(torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="memory_state holds 'slot' memory but this model uses 'kv'"):
        model.memorize(torch.ones(1, 4, dtype=torch.long), memory_state=slot_state)
    with pytest.raises(ValueError, match="memorize: attention_mask is 0 for every token of every row"):
        model.memorize(torch.ones(2, 4, dtype=torch.long), attention_mask=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        model.memorize(torch.full((1, 4), VOCAB + 5, dtype=torch.long))
