"""`MemLMForCausalLM.memorize`: reading a document into memory gives the state a forward gives, without
logits over every token and without an autograd graph."""

from __future__ import annotations

import pytest
import torch
from conftest import SEGMENT, VOCAB, build


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


def test_memorize_keeps_no_graph_and_no_full_logits():
    model = build("llama", "kv").train()  # even in training mode with gradients enabled
    ids = torch.randint(1, VOCAB, (1, 5 * SEGMENT))
    logit_shapes = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, output: logit_shapes.append(tuple(output.shape)))
    try:
        with torch.enable_grad():
            state = model.memorize(ids)
    finally:
        handle.remove()
    assert all(not tensor.requires_grad for tensors in state.layers.values() for tensor in tensors.values())
    # one logit row per segment, never (tokens x vocab)
    assert logit_shapes == [(1, 1, VOCAB)] * 5
    assert int(state.num_entries()[0]) == model.config.memory_size  # it did read: the memory is full


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
