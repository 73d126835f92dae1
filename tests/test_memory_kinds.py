"""Memory semantics, block by block: what a write stores is what a read returns."""

from __future__ import annotations

import math

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
    import hf_memlm.memory_kv as kv

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


def test_slot_full_erase_clears_and_add_writes():
    memory = torch.randn(1, 4, 6)
    weights = torch.zeros(1, 1, 4)
    weights[0, 0, 2] = 1.0  # one token writes slot 2 with full weight
    cleared = SlotMemory.apply_write(memory, weights, erase=torch.ones(1, 1, 6), add=torch.zeros(1, 1, 6))
    assert torch.equal(cleared[0, 2], torch.zeros(6))
    torch.testing.assert_close(cleared[0, [0, 1, 3]], memory[0, [0, 1, 3]])
    value = torch.randn(1, 1, 6)
    written = SlotMemory.apply_write(cleared, weights, erase=torch.ones(1, 1, 6), add=value)
    torch.testing.assert_close(written[0, 2], value[0, 0])
    torch.testing.assert_close(written[0, [0, 1, 3]], memory[0, [0, 1, 3]])


def test_slot_erase_is_bounded_when_many_tokens_write_one_slot():
    memory = torch.ones(1, 2, 3)
    weights = torch.zeros(1, 5, 2)
    weights[0, :, 0] = 1.0
    out = SlotMemory.apply_write(memory, weights, erase=torch.ones(1, 5, 3), add=torch.zeros(1, 5, 3))
    assert torch.equal(out[0, 0], torch.zeros(3))  # not negative: the erase total is clamped at 1


def test_slot_padded_tokens_do_not_write():
    block = SlotMemory(_config(memory_type="slot", num_slots=4), 0)
    torch.nn.init.normal_(block.initial_slots)
    for p in (block.write_key_proj.weight, block.erase_proj.weight, block.add_proj.weight, block.slot_key_proj.weight):
        torch.nn.init.normal_(p)
    state = block.init_state(1, "cpu", torch.float32)
    hidden = torch.randn(1, 3, HIDDEN)
    hidden[0, 2] = float("nan")  # garbage in a padded position
    mask = torch.tensor([[True, True, False]])
    out = block.write(hidden, mask, state)["memory"]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, block.write(hidden[:, :2], mask[:, :2], state)["memory"])
