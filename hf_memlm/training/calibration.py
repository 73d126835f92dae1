"""Fit a new memory block's input projections to the hidden states of a pretrained base, before training.

A pretrained model's hidden states are dominated by a few features with huge values (hundreds of times the
median, in every token). Projected with random weights, those features swamp the rest: every query then looks
alike, and a cosine read matches whatever token has most of them, not the token that means the same thing.
`calibrate_memory` reads some text into memory, measures each feature's root mean square in the states each
memory block writes from, and scales the columns of the block's input projections (queries, keys, values, write
strengths) so that every feature starts on the same footing. The output projection is still zero, so the
calibrated model computes exactly what the base computes; only where training starts from changes.

On SmolLM2-135M with `kv` beside layer 8 the largest feature's RMS is about 40 times the median one; what
calibration changes in the pass-key read and in training is measured in docs/results/smollm2_passkey.md
("Telling named needles apart").
"""

from __future__ import annotations

import torch

__all__ = ["calibrate_memory"]


@torch.no_grad()
def calibrate_memory(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[int, float]:
    """Rescale each memory block's input projections by the feature RMS of the states it writes from.

    Args:
        model: a `MemLMForCausalLM` whose memory blocks are untrained (output projections all zero): the
            call changes no output, only the projections training starts from.
        input_ids / attention_mask: text read into memory (for example some training documents), (batch, tokens).

    Returns: {memory layer: the largest feature RMS over the median one}, before calibration.
    Calling it again rescales again: call it once, on a freshly wrapped model.
    """
    blocks = {int(index): block for index, block in model.memory_blocks.items()}
    trained = [index for index, block in blocks.items() if block.output_projection.weight.abs().max() > 0]
    if trained:
        raise ValueError(
            f"calibrate_memory rescales untrained memory blocks, but the blocks at layers {trained} have a "
            "non-zero output projection (they were trained or loaded): calibrating them would change what the "
            "model computes. Call it right after MemLMForCausalLM.from_base, before training."
        )
    sums = {index: None for index in blocks}
    counts = dict.fromkeys(blocks, 0)

    def capturing(index, write):
        def write_and_measure(hidden_states, mask, *args, **kwargs):
            states = hidden_states[mask.bool()].float()
            squares = states.pow(2).sum(0)
            sums[index] = squares if sums[index] is None else sums[index] + squares
            counts[index] += states.shape[0]
            return write(hidden_states, mask, *args, **kwargs)

        return write_and_measure

    for index, block in blocks.items():
        block.write = capturing(index, block.write)
    try:
        model.memorize(input_ids, attention_mask=attention_mask)
    finally:
        for block in blocks.values():
            del block.write  # the class's own method again
    spread = {}
    for index, block in blocks.items():
        rms = (sums[index] / counts[index]).sqrt()
        median = rms.median().clamp(min=1e-6)
        spread[index] = float(rms.max() / median)
        scale = (median / rms.clamp(min=1e-6 * median)).to(block.output_projection.weight.dtype)
        for projection in block.input_projections:
            projection.weight.mul_(scale.to(projection.weight.device)[None, :])
    return spread
