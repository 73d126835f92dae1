"""`calibrate_memory`: a new memory's input projections scaled to the base's hidden states, outputs unchanged."""

from __future__ import annotations

import pytest
import torch
from conftest import SEGMENT, VOCAB, build, randomize_memory

from hf_memlm.training import calibrate_memory


def test_calibration_scales_every_input_projection_by_the_feature_rms_and_changes_no_output(arch_kind):
    model_type, kind = arch_kind
    model = build(model_type, kind, randomized=False)  # output projections at zero, as from_base leaves them
    block = model.memory_blocks["0"]
    before = {name: p.detach().clone() for name, p in block.named_parameters()}
    ids = torch.randint(1, VOCAB, (3, SEGMENT), generator=torch.Generator().manual_seed(0))
    probe = torch.randint(1, VOCAB, (2, 3 * SEGMENT), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(probe).logits
        # one segment per row: the memory layer's states are the base's own, after decoder layer 0
        states = model.language_model(ids, output_hidden_states=True).hidden_states[1]
    rms = states.reshape(-1, states.shape[-1]).pow(2).mean(0).sqrt()

    spread = calibrate_memory(model, ids)

    assert spread == {0: pytest.approx(float(rms.max() / rms.median()), rel=1e-4)}
    scale = rms.median() / rms
    inputs = {id(p) for projection in block.input_projections for p in projection.parameters()}
    for name, param in block.named_parameters():
        if name.endswith("weight") and id(param) in inputs:
            torch.testing.assert_close(param, before[name] * scale[None, :], rtol=1e-4, atol=1e-6)
        else:  # biases, the output projection, temperatures, slot addresses: untouched
            assert torch.equal(param, before[name]), name
    with torch.no_grad():
        assert torch.equal(model(probe).logits, logits)


def test_calibration_refuses_a_trained_memory_and_text_without_tokens():
    model = build("llama", "kv", randomized=True)
    weights = {name: p.detach().clone() for name, p in model.memory_blocks.named_parameters()}
    with pytest.raises(ValueError, match=r"layers \[0\] have a non-zero output projection.*before training"):
        calibrate_memory(model, torch.ones(1, SEGMENT, dtype=torch.long))
    for name, param in model.memory_blocks.named_parameters():
        assert torch.equal(param, weights[name])  # refused before anything changed
    fresh = build("llama", "kv", randomized=False)
    with pytest.raises(ValueError, match="nothing to read"):
        calibrate_memory(fresh, torch.ones(1, SEGMENT, dtype=torch.long), attention_mask=torch.zeros(1, SEGMENT))
    # the block's own write method is back: it writes what an untouched model's block writes
    untouched = build("llama", "kv", randomized=True)
    randomize_memory(fresh)
    ids = torch.arange(1, 2 * SEGMENT + 1)[None]
    written, expected = fresh.memorize(ids).layers[0], untouched.memorize(ids).layers[0]
    assert "write" not in vars(fresh.memory_blocks["0"])
    for name in expected:
        assert torch.equal(written[name], expected[name]), name
