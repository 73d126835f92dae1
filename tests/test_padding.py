"""Padding never changes a row's results: each row is segmented from its own first real token.

Checked over the architecture table, both memory kinds, with left, right and scattered padding whose
lengths are and are not multiples of `segment_length`.
"""

from __future__ import annotations

import pytest
import torch
from conftest import SEGMENT, VOCAB, build

PAD = 1
# Against the longest row the others get 2 * SEGMENT (a multiple) and SEGMENT - 2 (not one) pad tokens.
LENGTHS = [3 * SEGMENT + 3, SEGMENT + 3, 2 * SEGMENT + 5]


def _rows(lengths=LENGTHS, seed=20) -> list[torch.Tensor]:
    return [
        torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed + i)) for i, n in enumerate(lengths)
    ]


def _pad(rows: list[torch.Tensor], side: str, extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `rows` padded on `side` ("left", "right" or "scattered": pad tokens between real ones)."""
    width = max(len(r) for r in rows) + extra
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        if side == "left":
            columns = torch.arange(width - len(row), width)
        elif side == "right":
            columns = torch.arange(len(row))
        else:
            generator = torch.Generator().manual_seed(i)
            columns = torch.randperm(width, generator=generator)[: len(row)].sort().values
        ids[i, columns] = row
        mask[i, columns] = 1
    return ids, mask


def _assert_same_row_state(batched, b: int, alone) -> None:
    """Row `b` of a batched MemoryState equals a single-row state. `kv` stores may be longer in the batch
    (rows hold different numbers of entries); the extra entries must be invalid and zero (never read)."""
    for layer, tensors in alone.layers.items():
        for name, expected in tensors.items():
            got = batched.layers[layer][name][b : b + 1]
            if name in ("keys", "values", "valid") and got.shape != expected.shape:
                entries_dim = 2 if name != "valid" else 1
                stored = expected.shape[entries_dim]
                extra = got.narrow(entries_dim, stored, got.shape[entries_dim] - stored)
                assert not extra.any(), f"{name}: entries beyond the row's own are not empty"
                got = got.narrow(entries_dim, 0, stored)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"layer {layer} {name}")


@pytest.mark.parametrize("side", ["left", "right", "scattered"])
def test_padded_forward_equals_each_row_alone(arch_kind, side):
    """Logits of real tokens and the returned memory of each row equal that row's single-row call."""
    model = build(*arch_kind)
    rows = _rows()
    ids, mask = _pad(rows, side, extra=3 if side == "scattered" else 0)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, output_hidden_states=True)
        assert torch.isfinite(batched.logits).all()
        for b, row in enumerate(rows):
            alone = model(row[None], output_hidden_states=True)
            real = mask[b].bool()
            torch.testing.assert_close(batched.logits[b, real], alone.logits[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(batched.hidden_states[-1][b, real], alone.hidden_states[-1][0])
            _assert_same_row_state(batched.memory_state, b, alone.memory_state)
            # a padded column repeats the outputs of the nearest real token before it (the first one if none)
            nearest = (real.long().cumsum(0) - 1).clamp(min=0)
            torch.testing.assert_close(batched.logits[b], alone.logits[0, nearest])


def test_padded_gradients_equal_the_sum_of_each_row_alone(arch_kind):
    """Left padding (pads that are and are not multiples of the segment): the gradient of an objective over the
    real tokens' logits, for every parameter, is the sum of each row's alone (the memory read's backward
    included: rows may not leak gradient into each other through padding or stored entries)."""
    model = build(*arch_kind)  # eval mode (no dropout), gradients on
    rows = _rows()
    ids, mask = _pad(rows, "left")
    generator = torch.Generator().manual_seed(3)
    targets = [torch.randn(len(row), VOCAB, generator=generator) for row in rows]
    batched = model(ids, attention_mask=mask).logits
    sum((batched[b, mask[b].bool(), :VOCAB] * target).sum() for b, target in enumerate(targets)).backward()
    together = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    model.zero_grad(set_to_none=True)
    for row, target in zip(rows, targets, strict=True):
        (model(row[None]).logits[0, :, :VOCAB] * target).sum().backward()  # gradients add up over the rows
    alone = {name: param.grad for name, param in model.named_parameters() if param.grad is not None}
    assert together.keys() == alone.keys() and any("memory" in name for name in alone)
    for name, grad in alone.items():
        torch.testing.assert_close(together[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_padded_forward_with_memory_disabled_is_the_base_per_row():
    model = build("llama", "slot")
    rows = _rows()
    ids, mask = _pad(rows, "left")
    with torch.no_grad(), model.memory_disabled():
        batched = model(ids, attention_mask=mask).logits
        for b, row in enumerate(rows):
            torch.testing.assert_close(batched[b, mask[b].bool()], model(row[None]).logits[0], rtol=1e-5, atol=1e-5)


def test_padded_tokens_change_nothing(arch_kind):
    """Whatever stands in padded columns changes neither real-token logits nor memory."""
    model = build(*arch_kind)
    ids, mask = _pad(_rows(), "left")
    garbage = torch.where(mask.bool(), ids, torch.randint(3, VOCAB, ids.shape, generator=torch.Generator()))
    with torch.no_grad():
        a, b = model(ids, attention_mask=mask), model(garbage, attention_mask=mask)
    real = mask.bool()
    assert torch.equal(a.logits[real], b.logits[real])
    for layer, tensors in a.memory_state.layers.items():
        for name, tensor in tensors.items():
            assert torch.equal(tensor, b.memory_state.layers[layer][name]), name


def test_padded_logits_to_keep_and_streaming():
    """`logits_to_keep` keeps the caller's last columns; a padded batch continues from its state like each row."""
    model = build("qwen2", "kv")
    rows = _rows()
    more = _rows([SEGMENT + 2, 5, 2 * SEGMENT], seed=40)
    ids, mask = _pad(rows, "left")
    more_ids, more_mask = _pad(more, "right")
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        last = model(ids, attention_mask=mask, logits_to_keep=3)
        torch.testing.assert_close(last.logits, full.logits[:, -3:])
        second = model(more_ids, attention_mask=more_mask, memory_state=full.memory_state)
        for b in range(len(rows)):
            state = model(rows[b][None]).memory_state
            alone = model(more[b][None], memory_state=state).logits[0]
            torch.testing.assert_close(second.logits[b, : len(more[b])], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_generate_equals_each_row_alone(arch_kind, side):
    """Batched greedy generation of prompts of different lengths (longer than a segment, generating past
    the window) gives every row exactly the tokens of its single-row run."""
    model = build(*arch_kind)
    model.generation_config.eos_token_id = None
    rows = _rows()
    ids, mask = _pad(rows, side)
    new_tokens = SEGMENT + 4
    settings = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD)
    batched = model.generate(ids, attention_mask=mask, **settings)
    for b, row in enumerate(rows):
        alone = model.generate(row[None], **settings)
        assert torch.equal(batched[b, ids.shape[1] :], alone[0, len(row) :]), f"row {b} ({side} padded)"


def test_padded_generate_state_equals_each_row_alone():
    """The memory (and pending window) after a batched generation equals each row's, once committed."""
    model = build("llama", "kv")
    model.generation_config.eos_token_id = None
    rows = _rows()
    ids, mask = _pad(rows, "left")
    settings = dict(max_new_tokens=SEGMENT + 4, do_sample=False, pad_token_id=PAD, return_dict_in_generate=True)
    batched = model.generate(ids, attention_mask=mask, **settings)
    batched_state = model.commit_window(batched.cache.memory_state)
    for b, row in enumerate(rows):
        alone = model.generate(row[None], **settings)
        _assert_same_row_state(batched_state, b, model.commit_window(alone.cache.memory_state))


def test_generation_cache_stays_bounded():
    """Rows in different phases of their segments keep the KV cache at about two segments, not growing."""
    model = build("llama", "kv")
    model.generation_config.eos_token_id = None
    ids, mask = _pad(_rows(), "left")
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=4 * SEGMENT,
        do_sample=False,
        pad_token_id=PAD,
        return_dict_in_generate=True,
    )
    assert out.sequences.shape[1] == ids.shape[1] + 4 * SEGMENT
    assert out.cache.get_seq_length() <= 2 * SEGMENT
    assert out.cache.memory_state.window["mask"].sum(-1).max() <= SEGMENT
