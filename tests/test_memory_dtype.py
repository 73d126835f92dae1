"""`kv` entries stored in another dtype than the model's (`memory_dtype`), float8 included: the bytes they take,
reads close to the model's own dtype, padded batches, the index over them, and memory files."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    BASES,
    SEGMENT,
    VOCAB,
    base_config,
    clustered_hidden,
    kv_block,
    memory_settings,
    randomize_memory,
    run_in_threads,
    write_segments,
)

import hf_memlm
from hf_memlm import MemoryState
from hf_memlm.memory_settings import MEMORY_DTYPES

BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1}
# How far the memory's effect on the logits may move with the storage dtype, as a share of that effect (measured:
# 0.015, 0.031 and 0.137; entries zeroed or stored as garbage move it by about 1).
DRIFT = {"float32": 0.0, "float16": 0.03, "bfloat16": 0.06, "float8_e4m3fn": 0.25}


def _model(memory_dtype: str | None, base: str = "llama", value_dtype: str | None = None):
    torch.manual_seed(0)
    settings = memory_settings(
        "kv", memory_size=64, memory_topk=4, memory_dtype=memory_dtype, memory_value_dtype=value_dtype
    )
    model = hf_memlm.MemLMForCausalLM(hf_memlm.MemLMConfig(text_config=base_config(base), **settings)).eval()
    randomize_memory(model, 0)
    return model


def _left_padded(pads=(3, 0, 5), length=5 * SEGMENT + 1):
    """Rows of `length` tokens, left-padded by `pads` (not multiples of the segment)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (len(pads), length), generator=generator)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        ids[row, :pad], mask[row, :pad] = 0, 0
    return ids, mask


def test_the_storage_dtypes_are_the_ones_tested():
    assert set(MEMORY_DTYPES) == set(BYTES) == set(DRIFT)


def _drift(memory_dtype: str, base: str = "llama", value_dtype: str | None = None):
    """A left-padded batch read with `memory_dtype` entries (values in `value_dtype` where given): its memory's
    entries, how far its logits are from float32 entries' as a share of the memory's effect on them, and that
    effect."""
    ids, mask = _left_padded()
    model = _model(memory_dtype, base, value_dtype)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        reference = _model(None, base)(ids, attention_mask=mask).logits  # float32 entries
        with model.memory_disabled():
            alone = model(ids, attention_mask=mask).logits
    real = mask.bool()
    effect = (reference - alone)[real].norm()
    return out.memory_state.layers[0], ((out.logits - reference)[real].norm() / effect).item(), effect


@pytest.mark.parametrize("memory_dtype", MEMORY_DTYPES)
def test_entries_take_their_dtype_bytes_and_read_close_to_float32(memory_dtype):
    entries, drift, effect = _drift(memory_dtype)
    for name in ("keys", "values", "pending_key"):
        assert entries[name].element_size() == BYTES[memory_dtype], name
    assert effect > 1.0  # the memory changes the logits: the comparison below means something
    assert drift <= DRIFT[memory_dtype], drift
    if memory_dtype != "float32":
        assert drift > 0  # the entries really are stored narrower


@pytest.mark.parametrize(("key_dtype", "value_dtype"), [("float8_e4m3fn", "bfloat16"), ("float32", "float8_e4m3fn")])
def test_values_stored_in_their_own_dtype(key_dtype, value_dtype):
    entries, drift, effect = _drift(key_dtype, value_dtype=value_dtype)
    assert entries["keys"].dtype == entries["pending_key"].dtype == getattr(torch, key_dtype)
    assert entries["values"].dtype == getattr(torch, value_dtype)
    assert effect > 1.0
    assert 0 < drift <= max(DRIFT[key_dtype], DRIFT[value_dtype]), drift


def test_an_unknown_value_dtype_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="memory_value_dtype='int4' is not supported; choose one of"):
        _model("float8_e4m3fn", value_dtype="int4")


def test_the_value_dtype_may_change_when_a_saved_model_is_loaded(tmp_path):
    ids, mask = _left_padded()
    _model("float8_e4m3fn").save_pretrained(tmp_path / "model")
    loaded = hf_memlm.MemLMForCausalLM.from_pretrained(tmp_path / "model", memory_value_dtype="float16").eval()
    with torch.no_grad():
        entries = loaded(ids, attention_mask=mask).memory_state.layers[0]
    assert (entries["keys"].dtype, entries["values"].dtype) == (torch.float8_e4m3fn, torch.float16)


# float8 entries, and bfloat16 keys with float8 values
NARROW = [("float8_e4m3fn", None), ("bfloat16", "float8_e4m3fn")]


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize(("key_dtype", "value_dtype"), NARROW)
def test_float8_entries_on_every_base_read_close_to_float32(base, key_dtype, value_dtype):
    entries, drift, effect = _drift(key_dtype, base, value_dtype)
    assert entries["values"].dtype == torch.float8_e4m3fn and effect > 0
    assert 0 < drift <= DRIFT["float8_e4m3fn"]


@pytest.mark.parametrize(("key_dtype", "value_dtype"), NARROW)
def test_a_float8_memory_read_from_several_threads_gives_each_what_it_gives_alone(key_dtype, value_dtype):
    ids, mask = _left_padded()
    model = _model(key_dtype, value_dtype=value_dtype)
    questions = torch.randint(1, VOCAB, (4, 3, SEGMENT), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        state = model(ids, attention_mask=mask).memory_state
        alone = [model(q, memory_state=state).logits for q in questions]

        def ask(thread: int) -> torch.Tensor:
            return model(questions[thread], memory_state=state).logits

        threaded = run_in_threads(ask, len(questions))
    for thread, logits in enumerate(alone):
        torch.testing.assert_close(threaded[thread], logits)


@pytest.mark.parametrize(
    ("memory_dtype", "value_dtype"), [("bfloat16", None), ("float8_e4m3fn", None), ("float8_e4m3fn", "bfloat16")]
)
def test_narrow_entries_keep_each_padded_row_its_own(memory_dtype, value_dtype):
    # padding makes writes keep the newest real entries by gathering them (not by slicing)
    ids, mask = _left_padded()
    model = _model(memory_dtype, value_dtype=value_dtype)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        for row in range(ids.shape[0]):
            real = mask[row].bool()
            alone = model(ids[row : row + 1, real])
            torch.testing.assert_close(batched.logits[row, real], alone.logits[0], rtol=1e-4, atol=1e-4)
            count = int(batched.memory_state.layers[0]["valid"][row].sum())
            assert count == int(alone.memory_state.layers[0]["valid"].sum())
            for name in ("keys", "values"):
                ours = batched.memory_state.layers[0][name][row, :, :count].float()
                torch.testing.assert_close(ours, alone.memory_state.layers[0][name][0, :, :count].float())


def test_the_index_over_float8_entries_picks_the_exact_top_k():
    pytest.importorskip("faiss")
    generator = torch.Generator().manual_seed(3)
    block = kv_block(memory_search_threshold=1024, memory_dtype="float8_e4m3fn")
    with torch.no_grad():
        state = write_segments(block, clustered_hidden(generator, 2, 6144))
        hidden = clustered_hidden(generator, 2, 64)
        assert state["keys"].dtype == torch.float8_e4m3fn and block.uses_index(state)
        selected, selected_valid = block.select_entries(hidden, state)
        # float8 keys of nearby tokens often tie exactly: a pick counts where it scores as high as the exact k-th
        scores = block.queries(hidden) @ state["keys"].float().transpose(-1, -2)
        kth = scores.topk(block.topk, dim=-1).values[..., -1:]
        found = (scores.gather(-1, selected) >= kth) & selected_valid
        assert found.float().mean().item() >= 0.95


@pytest.mark.parametrize("value_dtype", [None, "bfloat16"])
def test_float8_memory_files_round_trip_byte_for_byte_and_damage_is_refused(tmp_path, value_dtype):
    ids, mask = _left_padded()
    model = _model("float8_e4m3fn", value_dtype=value_dtype)
    with torch.no_grad():
        state = model(ids, attention_mask=mask).memory_state
    state.save(tmp_path / "memory.safetensors")
    loaded = MemoryState.load(tmp_path / "memory.safetensors")
    for name, tensor in state.layers[0].items():
        again = loaded.layers[0][name]
        assert again.dtype == tensor.dtype, name
        bits = torch.uint8 if tensor.dtype == torch.float8_e4m3fn else tensor.dtype
        assert torch.equal(again.view(bits), tensor.view(bits)), name
    with torch.no_grad():
        nxt = torch.randint(1, VOCAB, (3, SEGMENT))
        torch.testing.assert_close(model(nxt, memory_state=loaded).logits, model(nxt, memory_state=state).logits)
    damaged = state.layers[0]["keys"].clone()
    damaged.view(torch.uint8)[0, 0, 0, 0] = 0x7F  # float8's NaN
    state.layers[0]["keys"] = damaged
    state.save(tmp_path / "damaged.safetensors")
    with pytest.raises(ValueError, match="NaN or inf"):
        MemoryState.load(tmp_path / "damaged.safetensors")


@pytest.mark.parametrize("value_dtype", [None, "float8_e4m3fn"])
def test_training_with_float8_entries_set_stores_them_in_the_model_dtype_and_trains(value_dtype):
    ids, mask = _left_padded()
    model = _model("float8_e4m3fn", value_dtype=value_dtype).train()
    out = model(ids, attention_mask=mask, labels=ids)
    out.loss.backward()  # autograd cannot sum gradients in float8: the write kept float32 entries
    assert out.memory_state.layers[0]["keys"].dtype == out.memory_state.layers[0]["values"].dtype == torch.float32
    grads = [p.grad for p in model.memory_blocks.parameters()]
    assert all(g is not None and bool(g.abs().sum() > 0) for g in grads)
    with torch.no_grad():  # a float8 state written to under autograd, and a float32 one read without
        remembered = model(ids, attention_mask=mask).memory_state
    assert remembered.layers[0]["keys"].dtype == torch.float8_e4m3fn
    nxt = torch.randint(1, VOCAB, (3, 2 * SEGMENT))
    model(nxt, memory_state=remembered, labels=nxt).loss.backward()
    with torch.no_grad():
        assert model(nxt, memory_state=out.memory_state.detach()).memory_state.layers[0]["keys"].dtype == (
            torch.float8_e4m3fn
        )
