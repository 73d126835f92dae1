"""Memory semantics, block by block: what a write stores is what a read returns."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import base_config

from hf_memlm import MemLMConfig
from hf_memlm.memory_kv import KVMemory, keep_newest, retrieve
from hf_memlm.memory_slot import SlotMemory

HIDDEN = 32


def _config(**kw):
    settings = dict(memory_layers=[0], memory_heads=4, segment_length=8)
    settings.update(kw)
    return MemLMConfig(text_config=base_config("llama"), **settings)


def _identity_kv(capacity=64, topk=None, shift=0, sharp=50.0) -> KVMemory:
    """A kv block whose projections are identities, so stored values are the written hidden states."""
    block = KVMemory(_config(memory_type="kv", memory_size=capacity, memory_topk=topk, memory_value_shift=shift), 0)
    with torch.no_grad():
        for proj in (block.mem_query, block.mem_key, block.mem_value, block.mem_out):
            proj.weight.copy_(torch.eye(HIDDEN))
        block.log_scale.fill_(math.log(sharp))
    return block


def test_kv_write_then_read_same_key_returns_its_value():
    block = _identity_kv()
    hidden = torch.nn.functional.normalize(torch.randn(1, 6, HIDDEN), dim=-1) * 3
    state = block.write(hidden, torch.ones(1, 6, dtype=torch.bool), block.init_state(1, "cpu", torch.float32))
    read = block.read(hidden[:, 2:3], state)  # query = the key of entry 2
    torch.testing.assert_close(read[0, 0], hidden[0, 2], rtol=1e-3, atol=1e-3)


def test_kv_value_shift_retrieves_what_followed():
    block = _identity_kv(shift=1)
    hidden = torch.nn.functional.normalize(torch.randn(1, 5, HIDDEN), dim=-1)
    mask = torch.ones(1, 5, dtype=torch.bool)
    state = block.write(hidden, mask, block.init_state(1, "cpu", torch.float32))
    assert int(state["valid"].sum()) == 4  # the last token's key waits for its successor
    read = block.read(hidden[:, 1:2], state)
    torch.testing.assert_close(read[0, 0], hidden[0, 2], rtol=1e-3, atol=1e-3)
    # the next segment's first token completes the pending pair
    nxt = torch.nn.functional.normalize(torch.randn(1, 3, HIDDEN), dim=-1)
    state = block.write(nxt, torch.ones(1, 3, dtype=torch.bool), state)
    torch.testing.assert_close(block.read(hidden[:, 4:5], state)[0, 0], nxt[0, 0], rtol=1e-3, atol=1e-3)


def test_topk_equals_full_softmax_when_k_covers_the_entries():
    torch.manual_seed(0)
    queries = torch.randn(2, 3, 5, 8)
    keys, values = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 4)
    valid = torch.zeros(2, 10, dtype=torch.bool)
    valid[0, :6] = True
    valid[1, 3:9] = True  # 6 valid entries per row; the top-k path runs since k < 10 stored slots
    scale = torch.full((3,), 2.0)
    full = retrieve(queries, keys, values, valid, scale, topk=None)
    for k in (6, 8):  # k == valid entries, and k > valid entries (masked slots in the top-k get no weight)
        torch.testing.assert_close(retrieve(queries, keys, values, valid, scale, topk=k), full, rtol=1e-5, atol=1e-6)
    # and with fewer than the valid entries it is a different (sparser) read
    assert (retrieve(queries, keys, values, valid, scale, topk=2) - full).abs().max() > 1e-3


def test_topk_chunking_matches_unchunked(monkeypatch):
    import hf_memlm.memory_kv_read as kv

    torch.manual_seed(1)
    q, k, v = torch.randn(1, 2, 40, 8), torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    valid, scale = torch.ones(1, 30, dtype=torch.bool), torch.ones(2)
    whole = retrieve(q, k, v, valid, scale, topk=5)
    monkeypatch.setattr(kv, "_SCORE_CHUNK_ELEMENTS", 2 * 30 * 3)  # 3 queries per chunk
    torch.testing.assert_close(retrieve(q, k, v, valid, scale, topk=5), whole)


def test_eviction_keeps_newest_and_respects_capacity():
    block = _identity_kv(capacity=5)
    state = block.init_state(2, "cpu", torch.float32)
    written = []
    for _ in range(4):
        hidden = torch.randn(2, 3, HIDDEN)
        mask = torch.ones(2, 3, dtype=torch.bool)
        mask[1, 2] = False  # row 1 writes fewer entries
        state = block.write(hidden, mask, state)
        written.append((hidden, mask))
        assert state["valid"].sum(-1).max() <= 5 and state["keys"].shape[2] <= 5
    for row in range(2):
        entries = torch.cat([h[row][m[row]] for h, m in written])  # oldest -> newest
        stored = state["values"][row].transpose(0, 1).reshape(-1, HIDDEN)[state["valid"][row]]
        torch.testing.assert_close(stored, entries[-5:])


def test_keep_newest_orders_oldest_first():
    valid = torch.tensor([[True, False, True, True, True], [False, False, True, False, False]])
    index, kept = keep_newest(valid, capacity=2)
    assert index[0].tolist() == [3, 4] and kept[0].tolist() == [True, True]
    assert index[1, 0].item() == 2 and kept[1].tolist() == [True, False]


def _slot(num_slots=4, heads=1, shift=0) -> SlotMemory:
    """A slot block with random (non-zero) weights; one head by default so slots are whole rows."""
    block = SlotMemory(
        _config(memory_type="slot", num_slots=num_slots, memory_heads=heads, memory_value_shift=shift), 0
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return block


def test_slot_write_is_the_seed_erase_add_applied_token_by_token():
    """apply_write equals M <- M * (1 - w_t e_t^T) + w_t a_t^T for t = 1..T with e_t = beta_t 1, a_t = beta_t v_t."""
    generator = torch.Generator().manual_seed(0)
    memory = torch.randn(2, 5, 3, generator=generator)
    weights = torch.softmax(3 * torch.randn(2, 7, 5, generator=generator), dim=-1)  # (B, T, N)
    beta = torch.rand(2, 7, 1, generator=generator)
    values = torch.randn(2, 7, 3, generator=generator)
    expected = memory.clone()
    for t in range(7):
        w, erase, add = weights[:, t, :, None], beta[:, t, None] * torch.ones(3), beta[:, t, None] * values[:, t, None]
        expected = expected * (1 - w * erase) + w * add
    torch.testing.assert_close(SlotMemory.apply_write(memory, weights * beta, values), expected)


def test_slot_full_write_erases_then_adds_and_the_latest_write_wins():
    memory = torch.randn(1, 4, 6)
    gates = torch.zeros(1, 2, 4)
    gates[0, :, 2] = 1.0  # two tokens write slot 2 with full strength, in order
    values = torch.randn(1, 2, 6)
    written = SlotMemory.apply_write(memory, gates, values)
    torch.testing.assert_close(written[0, 2], values[0, 1], rtol=0, atol=1e-5)  # the old content and token 0 are gone
    torch.testing.assert_close(written[0, [0, 1, 3]], memory[0, [0, 1, 3]], rtol=0, atol=0)
    assert written.shape == memory.shape


def test_slot_contents_stay_bounded_when_many_tokens_write_one_slot():
    """A slot holds a weighted average of what was written to it: 200 writes never pile up beyond |v|."""
    gates = torch.zeros(1, 200, 3)
    gates[0, :, 0] = 0.5
    values = torch.rand(1, 200, 4) * 2 - 1  # in [-1, 1]
    written = SlotMemory.apply_write(torch.zeros(1, 3, 4), gates, values)
    assert written[0, 0].abs().max() <= 1.0
    assert written[0, 0].abs().max() > 0.1  # and it does hold something (mostly the newest values)
    assert torch.equal(written[0, 1:], torch.zeros(2, 4))


def test_slot_state_size_is_constant_over_a_long_stream():
    block = _slot(num_slots=6, heads=2)
    state = block.init_state(2, "cpu", torch.float32)
    shapes = {name: tensor.shape for name, tensor in state.items()}
    for _ in range(20):
        state = block.write(torch.randn(2, 8, HIDDEN), torch.ones(2, 8, dtype=torch.bool), state)
        assert {name: tensor.shape for name, tensor in state.items()} == shapes
    assert state["memory"].abs().max() < 1e3 and torch.isfinite(state["memory"]).all()


def test_slot_padded_tokens_do_not_write():
    block = _slot(num_slots=4, shift=1)
    state = block.write(
        torch.randn(1, 3, HIDDEN), torch.ones(1, 3, dtype=torch.bool), block.init_state(1, "cpu", torch.float32)
    )
    hidden = torch.randn(1, 5, HIDDEN)
    hidden[0, 3:] = float("nan")  # garbage in padded positions
    mask = torch.tensor([[True, True, True, False, False]])
    padded = block.write(hidden, mask, state)
    unpadded = block.write(hidden[:, :3], mask[:, :3], state)
    for name, tensor in padded.items():
        assert not tensor.is_floating_point() or torch.isfinite(tensor).all(), name
        torch.testing.assert_close(tensor, unpadded[name], msg=name)


@pytest.mark.parametrize("shared_offset", [0.0, 50.0])
def test_slot_read_returns_the_value_written_at_the_same_address(shared_offset):
    """Value shift 1: reading with the context of token j returns the value of token j+1, also when every hidden
    state carries one large shared component (keys are centred on the stream's mean before addressing)."""
    block = _slot(num_slots=8, shift=1)
    addresses = torch.nn.functional.normalize(torch.randn(8, HIDDEN), dim=-1)
    addresses[:, 0] = 0.0  # the shared component lies along feature 0, outside the slot addresses ...
    addresses = torch.nn.functional.normalize(addresses, dim=-1)
    no_offset = torch.eye(HIDDEN)
    no_offset[0, 0] = 0.0  # ... and outside the stored values
    with torch.no_grad():
        block.address_proj.weight.copy_(torch.eye(HIDDEN))
        block.add_proj.weight.copy_(no_offset)
        block.readout_proj.weight.copy_(torch.eye(HIDDEN))
        block.erase_proj.weight.zero_()
        block.erase_proj.bias.fill_(20.0)  # beta = 1: every write replaces what the slot held
        block.log_temperature.fill_(math.log(16.0))  # the initial temperature
        block.slot_addresses.copy_(addresses[None])
    order = [3, 5, 1, 6, 0, 2]
    hidden = addresses[order][None] * 4
    hidden[..., 0] += shared_offset
    state = block.write(hidden, torch.ones(1, len(order), dtype=torch.bool), block.init_state(1, "cpu", torch.float32))
    for j in range(len(order) - 1):
        read = block.read(hidden[:, j : j + 1], state)[0, 0]
        similarity = torch.nn.functional.cosine_similarity(read, addresses[order[j + 1]], dim=0)
        assert similarity > 0.9, (j, similarity)
