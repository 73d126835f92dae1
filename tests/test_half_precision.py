"""Memory in bfloat16 / float16 models: strong writes stay finite and close to float32."""

from __future__ import annotations

import pytest
import torch
from conftest import KINDS, VOCAB, build

HALF = [torch.bfloat16, torch.float16]


def strongest_writes(model):
    """Writes at their strongest: write strength sigmoid(30) (1 in half precision) and one-hot addressing."""
    with torch.no_grad():
        for block in model.memory_blocks.values():
            for name, param in block.named_parameters():
                if name == "erase_proj.bias":
                    param.fill_(30.0)
                if name in ("log_temperature", "log_scale"):
                    param.fill_(8.0)
    return model


def run(base, kind, dtype, ids):
    model = strongest_writes(build(base, kind)).to(dtype)
    with torch.no_grad():
        out = model(ids)
        with model.memory_disabled():
            base_logits = model(ids).logits
    return out, base_logits


def finite_state(state) -> bool:
    return all(bool(torch.isfinite(t).all()) for layer in state.layers.values() for t in layer.values())


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("base", ["llama", "gpt2"])
def test_strong_writes_in_half_precision_stay_finite_and_close_to_float32(base, kind, dtype):
    ids = torch.randint(1, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))  # five segments
    reference, reference_base = run(base, kind, torch.float32, ids)
    out, half_base = run(base, kind, dtype, ids)
    assert torch.isfinite(reference.logits).all() and finite_state(reference.memory_state)
    assert torch.isfinite(out.logits).all(), f"{kind} memory gives non-finite logits in {dtype}"
    assert finite_state(out.memory_state), f"{kind} memory state is not finite in {dtype}"
    if base == "llama":
        # as close as the half-precision base is to its float32 self, up to a margin for memory's own rounding
        base_error = (half_base.float() - reference_base).abs().max().item()
        error = (out.logits.float() - reference.logits).abs().max().item()
        assert error <= 4 * base_error + 2e-3, (error, base_error)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_slot_statistics_keep_counting_past_half_precision_integers(dtype):
    """The key count and sum of a long stream are kept in float32: in half precision 4096 + 7 is not 4103."""
    model = build("llama", "slot").to(dtype)
    block = model.memory_blocks["0"]
    state = block.init_state(1, "cpu", dtype)
    state["key_count"] += 4096
    hidden = torch.randn(1, 8, 32, dtype=dtype)
    with torch.no_grad():
        state = block(hidden, state, mode="write", mask=torch.arange(8)[None] < 7)
    assert state["key_count"].item() == 4103
