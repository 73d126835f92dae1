"""The write-only pass behind `MemLMForCausalLM.memorize`: what memory holds after a long input, computed
without what cannot change it.

A memory layer writes its output *before* its own read is added, so the read at the last memory layer
changes no write: it is skipped, and so are the decoder layers above it and the LM head (the hook raises
`StopAfterCapture` once that layer's output is captured). With one memory layer nothing a segment writes
depends on the memory, so many segments run through the base model side by side, as rows, and are then
written in order (`kv` writes them in one call: `MemoryBlock.writes_tokenwise`). With several memory
layers the earlier ones read, and their reads change what later ones write: segments run one by one.

Part of the Hub payload: flat sibling files, single-dot relative imports, torch + transformers only.
"""

from __future__ import annotations

import torch

# Tokens per base-model call when segments run side by side as rows.
TOKENS_PER_CALL = 8192


def pack_segments(input_ids: torch.Tensor, mask: torch.Tensor, segment_length: int):
    """Each row's real tokens (`mask` True) packed to the left and padded to whole segments, as forward cuts
    them. Returns (ids (B, S * L), packed mask (B, S * L) bool, number of segments S)."""
    batch, length = input_ids.shape
    counts = mask.sum(-1)
    real_first = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    segments = -(-int(counts.max()) // segment_length)
    width = segments * segment_length
    ids = input_ids.gather(1, real_first)
    if width > length:
        ids = torch.cat([ids, ids.new_zeros(batch, width - length)], dim=1)
    packed_mask = torch.arange(width, device=mask.device)[None, :] < counts[:, None]
    return ids[:, :width], packed_mask, segments


def capture_for_write(model, ids: torch.Tensor, piece_mask: torch.Tensor, state) -> dict[int, torch.Tensor]:
    """What each memory layer writes for one piece (rows of real tokens first): the base runs up to the last one."""
    positions = (piece_mask.long().cumsum(-1) - 1).clamp(min=0)
    return model._run_segment({"input_ids": ids}, piece_mask, positions, state, None, 1, False, write_only=True)[1]


def write_only_pass(model, input_ids: torch.Tensor, mask: torch.Tensor, state):
    """The memory state after `model` reads `input_ids` (`mask`: real tokens) on from `state`, each memory block's
    layer settled for the reads to come (`MemoryBlock.settle`)."""
    read = _write_pieces(model, input_ids, mask, state)
    for layer in model.config.memory_layers:
        model.memory_blocks[str(layer)].settle(read.layers[layer], state.layers[layer])
    return read


def _write_pieces(model, input_ids: torch.Tensor, mask: torch.Tensor, state):
    segment = model.config.segment_length
    ids, packed_mask, segments = pack_segments(input_ids, mask, segment)
    batch = ids.shape[0]
    if len(model.config.memory_layers) > 1:
        for start in range(0, segments * segment, segment):
            columns = slice(start, start + segment)
            captured = capture_for_write(model, ids[:, columns], packed_mask[:, columns], state)
            state = model._write(state, captured, packed_mask[:, columns])
        return state
    layer = model.config.memory_layers[0]
    tokenwise = model.memory_blocks[str(layer)].writes_tokenwise
    per_call = max(1, TOKENS_PER_CALL // (batch * segment))
    for first in range(0, segments, per_call):
        count = min(per_call, segments - first)
        columns = slice(first * segment, (first + count) * segment)
        chunk_mask = packed_mask[:, columns]
        # rows (b, s): segment s of row b, each on its own
        hidden = capture_for_write(
            model, ids[:, columns].reshape(batch * count, segment), chunk_mask.reshape(batch * count, segment), None
        )[layer]
        hidden = hidden.view(batch, count * segment, hidden.shape[-1])
        if tokenwise:
            state = model._write(state, {layer: hidden}, chunk_mask)
            continue
        for number in range(count):
            piece = slice(number * segment, (number + 1) * segment)
            state = model._write(state, {layer: hidden[:, piece]}, chunk_mask[:, piece])
    return state


__all__ = ["TOKENS_PER_CALL", "capture_for_write", "pack_segments", "write_only_pass"]
