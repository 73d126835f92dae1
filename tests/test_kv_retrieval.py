"""`kv` reads: the exact top-k read and its gradients, the in-place append used when streaming without
gradients, the retrieval settings' errors, and reads without faiss installed. The index: `test_kv_index.py`."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    KV_HIDDEN,
    base_config,
    clustered_hidden,
    kv_block,
    write_segments,
)

import hf_memlm.memory_kv_index as kv_index
import hf_memlm.memory_kv_read as kv
from hf_memlm import MemLMConfig, MemLMForCausalLM
from hf_memlm.memory_kv import retrieve


def _reference_read(queries, keys, values, valid, scale, topk):
    """Top-k attention written the obvious way (dense scores, mask, top-k, softmax, weighted sum)."""
    scores = (queries * scale.view(1, -1, 1, 1)) @ keys.transpose(-1, -2)
    scores = scores.masked_fill(~valid[:, None, None, :], -math.inf)
    top, index = scores.topk(min(topk, keys.shape[2]), dim=-1)
    weights = torch.nan_to_num(torch.softmax(top, dim=-1))
    picked = values[:, :, None].expand(-1, -1, queries.shape[2], -1, -1)
    picked = picked.gather(3, index[..., None].expand(-1, -1, -1, -1, values.shape[-1]))
    return (weights[..., None] * picked).sum(-2)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("entries", [40, 400])  # the backward through dense matmuls, and through embedding_bag
def test_exact_topk_read_and_gradients_match_the_reference(padded, entries):
    generator = torch.Generator().manual_seed(0)
    queries = F.normalize(torch.randn(2, 3, 7, 8, generator=generator), dim=-1).requires_grad_()
    keys = F.normalize(torch.randn(2, 3, entries, 8, generator=generator), dim=-1).requires_grad_()
    values = torch.randn(2, 3, entries, 5, generator=generator).requires_grad_()
    valid = torch.ones(2, entries, dtype=torch.bool)
    if padded:
        valid[1, 25:] = False
    scale = torch.tensor([4.0, 8.0, 16.0])
    ours = retrieve(queries, keys, values, valid, scale, topk=6)
    reference = _reference_read(queries, keys, values, valid, scale, 6)
    torch.testing.assert_close(ours, reference)
    grads = torch.autograd.grad(ours.square().sum(), (queries, keys, values))
    expected = torch.autograd.grad(reference.square().sum(), (queries, keys, values))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("entries", [20, 200])  # the backward through dense matmuls, and through embedding_bag
def test_read_of_selected_entries_and_gradients_count_each_real_pick_once(entries):
    # As the index leaves them: the last picks of each query are padding (not valid) at entry 0, which is also
    # a real pick of the first query.
    generator = torch.Generator().manual_seed(0)
    queries = F.normalize(torch.randn(1, 2, 5, 8, generator=generator), dim=-1).requires_grad_()
    keys = F.normalize(torch.randn(1, 2, entries, 8, generator=generator), dim=-1).requires_grad_()
    values = torch.randn(1, 2, entries, 4, generator=generator).requires_grad_()
    scale = torch.tensor([4.0, 16.0])
    index = torch.stack([torch.randperm(entries - 1, generator=generator)[:6] + 1 for _ in range(10)]).view(1, 2, 5, 6)
    index[:, :, 0, 0] = 0
    index[..., 4:] = 0
    selected_valid = torch.ones_like(index, dtype=torch.bool)
    selected_valid[..., 4:] = False
    ours = kv.retrieve_selected(queries, keys, values, scale, index, selected_valid)

    picked_keys = keys[:, :, None].expand(-1, -1, 5, -1, -1).gather(3, index[..., None].expand(-1, -1, -1, -1, 8))
    picked_values = values[:, :, None].expand(-1, -1, 5, -1, -1).gather(3, index[..., None].expand(-1, -1, -1, -1, 4))
    scores = ((queries * scale.view(1, -1, 1, 1))[..., None, :] * picked_keys).sum(-1)
    weights = torch.softmax(scores.masked_fill(~selected_valid, -math.inf), dim=-1)
    reference = (weights[..., None] * picked_values).sum(-2)
    torch.testing.assert_close(ours, reference)
    grads = torch.autograd.grad(ours.square().sum(), (queries, keys, values))
    expected = torch.autograd.grad(reference.square().sum(), (queries, keys, values))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_top_k_selection_picks_the_k_largest_scores_of_every_row(dtype):
    # rows of mostly negative scores (fewer than k non-negative), a -0.0, masked entries at the dtype's minimum,
    # a row of many ties
    generator = torch.Generator().manual_seed(0)
    shifts = torch.tensor([0.0, 3.0, -3.0, -0.5])[:, None, None]
    scores = (torch.randn(4, 5, 300, generator=generator) + shifts).to(dtype)
    scores[0, 0, :10] = -0.0
    scores[1, :, 100:] = torch.finfo(dtype).min
    scores[0, 1] = scores[0, 1].round()
    top, picked = kv.top_k(scores, 32)
    assert picked.shape == (4, 5, 32)
    # the same values as torch's top-k, in the same (descending) order; ties may pick other positions
    torch.testing.assert_close(top, scores.topk(32, dim=-1).values, rtol=0, atol=0)
    torch.testing.assert_close(scores.gather(-1, picked), top, rtol=0, atol=0)
    assert bool((picked.sort(-1).values.diff(dim=-1) > 0).all())  # k distinct entries


@pytest.mark.parametrize("grad", [True, False])
def test_full_segments_evict_oldest_in_order(grad):
    # every token real: the write evicts by slicing (and appends in place without autograd)
    block = kv_block(memory_size=10, memory_topk=4, memory_value_shift=0)
    state = block.init_state(2, "cpu", torch.float32)
    written = []
    with torch.set_grad_enabled(grad):
        for _ in range(5):
            hidden = torch.randn(2, 4, KV_HIDDEN)
            state = block(hidden, state, mode="write", mask=torch.ones(2, 4, dtype=torch.bool))
            written.append(block.mem_value(hidden).detach())
    assert state["keys"].shape[2] == 10 and bool(state["valid"].all())
    expected = torch.cat(written, dim=1)[:, -10:].view(2, 10, 2, 16).transpose(1, 2)
    torch.testing.assert_close(state["values"].detach(), expected)


def test_streaming_without_grad_leaves_earlier_states_as_they_were():
    block = kv_block(memory_value_shift=0)
    generator = torch.Generator().manual_seed(1)
    first, second, other = (torch.randn(1, 16, KV_HIDDEN, generator=generator) for _ in range(3))
    mask = torch.ones(1, 16, dtype=torch.bool)
    with torch.no_grad():
        start = block(first, block.init_state(1, "cpu", torch.float32), mode="write", mask=mask)
        snapshot = {name: t.clone() for name, t in start.items()}
        continued = block(second, start, mode="write", mask=mask)
        branch = block(other, start, mode="write", mask=mask)  # a second continuation of the same state
    for name in snapshot:
        assert torch.equal(start[name], snapshot[name]), name
    assert torch.equal(
        continued["values"][:, :, 16:], block.mem_value(second).detach().view(1, 16, 2, 16).transpose(1, 2)
    )
    assert torch.equal(branch["values"][:, :, 16:], block.mem_value(other).detach().view(1, 16, 2, 16).transpose(1, 2))
    # and the same states as with autograd on (plain concatenation)
    with torch.enable_grad():
        reference = block(second, start, mode="write", mask=mask)
    torch.testing.assert_close(continued["keys"], reference["keys"].detach())


@pytest.mark.parametrize("search", ["exact", "auto"])
def test_reads_of_a_streamed_state_match_reads_of_its_copy(search):
    # without autograd the stored entries are views into a larger buffer; reads must see exactly them
    block = kv_block(memory_search=search, memory_search_threshold=256, memory_size=512)  # evicts: views start late
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        state = write_segments(block, torch.randn(2, 1024, KV_HIDDEN, generator=generator), segment=128)
        assert not state["keys"].is_contiguous()  # the case under test: a view into the append buffer
        queries = torch.randn(2, 32, KV_HIDDEN, generator=generator)
        picks = block.select_entries(queries, state)
        copy = {name: tensor.clone() for name, tensor in state.items()}
        torch.testing.assert_close(block(queries, state, mode="read"), block(queries, copy, mode="read"))
        scale = block.log_scale.exp()
        normalized = F.normalize(block.mem_query(queries).view(2, 32, 2, 16).transpose(1, 2), dim=-1)
        torch.testing.assert_close(
            kv.retrieve_selected(normalized, state["keys"], state["values"], scale, *picks),
            kv.retrieve_selected(normalized, copy["keys"], copy["values"], scale, *picks),
        )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(memory_search="faiss"), "memory_search='faiss' is unknown"),
        (dict(memory_search_threshold=0), "memory_search_threshold=0 must be a positive integer"),
        (dict(memory_search_probes=2.5), "memory_search_probes=2.5 must be a positive integer"),
    ],
)
def test_retrieval_settings_are_checked(settings, message):
    with pytest.raises(ValueError, match=message):
        MemLMConfig(text_config=base_config("llama"), **settings)


def test_select_entries_needs_topk():
    block = kv_block(memory_topk=None)
    state = write_segments(block, torch.randn(1, 8, KV_HIDDEN), segment=8)
    with pytest.raises(ValueError, match="select_entries needs memory_topk"):
        block.select_entries(torch.randn(1, 2, KV_HIDDEN), state)


@pytest.mark.parametrize("topk", [None, 6])
def test_a_memory_shared_by_every_row_is_read_once_for_all_of_them(topk):
    # A one-row memory seen by several rows (stride 0 over the batch) is read with all rows' queries at once;
    # each row reads what it reads from its own copy.
    generator = torch.Generator().manual_seed(15)
    queries = F.normalize(torch.randn(3, 2, 5, 8, generator=generator), dim=-1)
    keys = F.normalize(torch.randn(1, 2, 30, 8, generator=generator), dim=-1)
    values = torch.randn(1, 2, 30, 4, generator=generator)
    valid = torch.ones(1, 30, dtype=torch.bool)
    valid[0, 20:] = False
    scale = torch.tensor([4.0, 16.0])
    shared = retrieve(
        queries, keys.expand(3, -1, -1, -1), values.expand(3, -1, -1, -1), valid.expand(3, -1), scale, topk
    )
    copies = retrieve(queries, keys.repeat(3, 1, 1, 1), values.repeat(3, 1, 1, 1), valid.repeat(3, 1), scale, topk)
    torch.testing.assert_close(shared, copies)


def _block_faiss(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError


def test_exact_reads_are_identical_with_and_without_faiss(monkeypatch):
    torch.manual_seed(0)
    config = MemLMConfig(
        text_config=base_config("llama"), memory_type="kv", memory_layers=[0], segment_length=16, memory_heads=2
    )
    model = MemLMForCausalLM(config).eval()
    with torch.no_grad():
        model.memory_blocks["0"].mem_out.weight.normal_(0.0, 0.5)
    tokens = torch.randint(0, 97, (2, 16 * 6))
    with torch.no_grad():
        installed = model(input_ids=tokens).logits
        _block_faiss(monkeypatch)
        missing = model(input_ids=tokens).logits
    assert torch.equal(installed, missing)


def test_without_faiss_a_large_memory_reads_exactly_with_a_warning(monkeypatch):
    block = kv_block(memory_search_threshold=100)
    exact = kv_block(memory_search="exact")
    exact.load_state_dict(block.state_dict())
    generator = torch.Generator().manual_seed(2)
    state = write_segments(block, clustered_hidden(generator, 1, 512))
    queries = clustered_hidden(generator, 1, 8)
    _block_faiss(monkeypatch)
    monkeypatch.setattr(kv_index, "_FAISS_MISSING_WARNED", False)
    with pytest.warns(UserWarning, match="faiss is not installed"):
        fallback = block(queries, state, mode="read")
    assert not block.uses_index(state)
    assert torch.equal(fallback, exact(queries, state, mode="read"))
