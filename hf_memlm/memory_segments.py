"""How a call's tokens are cut into base-model calls ("pieces"), row by row, for forward and generation.

Row b's real token number k (counting only tokens where its attention mask is 1) belongs to segment
k // segment_length, whatever padding surrounds it. A piece feeds every row its next real tokens, up to
the end of that row's segment, packed to the left of the piece; with a generation window a row whose
window is full is written to memory (flushed) before it goes on. The plan is made on the host from the
padding pattern, once per call; outputs are then gathered back to the caller's columns, and the loss over them
is computed a segment's columns at a time (`sequence_loss`).

Part of the Hub payload: flat sibling files, single-dot relative imports, torch + transformers only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss


@dataclass
class Piece:
    """One base-model call. Row b feeds its real tokens [starts[b], starts[b] + counts[b]) (numbered among
    its real tokens only) at columns [0, counts[b]) of a piece `width` columns wide; the rest is padding.
    `flush[b]`: row b's window is full, write it to memory before this piece."""

    starts: list[int]
    counts: list[int]
    width: int
    flush: list[bool]


def plan_pieces(real_counts: list[int], live: list[int], segment_length: int, keep_window: bool) -> list[Piece]:
    """The pieces of one call, given each row's number of new real tokens and of tokens already in its window."""
    batch = len(real_counts)
    consumed, live = [0] * batch, list(live)
    pieces = []
    while any(done < total for done, total in zip(consumed, real_counts)):
        remaining = [total - done for total, done in zip(real_counts, consumed)]
        # a full window is written only when its row has more tokens (as a row alone does)
        flush = [live[b] >= segment_length and remaining[b] > 0 for b in range(batch)]
        live = [0 if full else n for full, n in zip(flush, live)]
        counts = [min(segment_length - n, r) for n, r in zip(live, remaining)]
        pieces.append(Piece(starts=list(consumed), counts=counts, width=max(counts), flush=flush))
        consumed = [done + n for done, n in zip(consumed, counts)]
        live = [n + c for n, c in zip(live, counts)] if keep_window else [0] * batch
    return pieces


def locate_outputs(pieces: list[Piece], host_mask: torch.Tensor, wanted: int):
    """For the caller's last `wanted` columns: which piece, and which column of it, gives each one's outputs
    (a padded column takes those of the nearest real token before it, else of the row's first real token)."""
    real_before = host_mask.long().cumsum(-1)[:, host_mask.shape[1] - wanted :]
    token = (real_before - 1).clamp(min=0)  # (B, wanted): the row's real token number to read
    starts = torch.tensor([p.starts for p in pieces]).T.contiguous()  # (B, P)
    ends = starts + torch.tensor([p.counts for p in pieces]).T
    piece = torch.searchsorted(ends.contiguous(), token, right=True)
    piece = torch.where(ends[:, -1:] == 0, 0, piece)  # a row without real tokens: its first piece, column 0
    return piece, token - starts.gather(1, piece)


def gather_index(pieces: list[Piece], piece: torch.Tensor, column: torch.Tensor, keep_all: bool):
    """How many trailing columns of each piece's outputs to keep, and where each wanted output lands in the
    concatenation of the kept columns."""
    widths = torch.tensor([p.width for p in pieces])
    if keep_all:
        first = torch.zeros_like(widths)
    else:
        first = widths.scatter_reduce(0, piece.flatten(), column.flatten(), reduce="amin")
    kept = widths - first
    offsets = torch.cumsum(kept, 0) - kept
    return kept.tolist(), offsets[piece] + column - first[piece]


def unpadded_kept(pieces: list[Piece], length: int, wanted: int) -> list[int] | None:
    """When no row has padding and every row feeds the same tokens to every piece, the pieces tile the
    caller's columns in order: how many trailing outputs of each piece are among the last `wanted` columns.
    None otherwise (outputs must be gathered)."""
    if any(count != piece.width for piece in pieces for count in piece.counts):
        return None
    if sum(piece.width for piece in pieces) != length:
        return None
    kept, end = [], 0
    for piece in pieces:
        end += piece.width
        kept.append(max(0, min(piece.width, wanted - (length - end))))
    return kept


def to_caller_columns(parts: list[torch.Tensor], index: torch.Tensor | None) -> torch.Tensor:
    """Concatenate the pieces' outputs and gather them to the caller's columns (`index`; None: in order)."""
    joined = torch.cat(parts, dim=1)
    if index is None:
        return joined
    batch, wanted = index.shape
    if joined.shape[1] == wanted and torch.equal(index, torch.arange(wanted).expand(batch, wanted)):
        return joined  # no padding moved anything
    index = index.to(joined.device)[..., None].expand(-1, -1, joined.shape[-1])
    return joined.gather(1, index)


def logits_to_compute(kept: int) -> int:
    """`logits_to_keep` for a piece whose last `kept` outputs are wanted: the base model's 0 means "all", so a
    piece needing none still computes one."""
    return max(kept, 1)


def keep_last_logits(logits: torch.Tensor, kept: int) -> torch.Tensor:
    return logits[:, logits.shape[1] - kept :]


def sequence_loss(loss_function, logits: torch.Tensor, labels: torch.Tensor, chunk: int, **loss_kwargs) -> torch.Tensor:
    """The model's loss over a whole call's `logits`. transformers' causal-LM loss (labels shifted left, float32
    cross-entropy, the mean over scored tokens or the sum over `num_items_in_batch`) is computed `chunk` columns at a
    time, with the same result: its float32 copy of the logits and their log-softmax are then one segment's, as the
    base model's own are, not the whole call's (1,024 x 49,152 bfloat16 logits: 200 MB in float32, whose log-softmax
    in one piece took 2.3x as long as in four on a 2-core CPU). Any other loss function is called as it is."""
    if loss_function is not ForCausalLMLoss or set(loss_kwargs) - {"num_items_in_batch", "ignore_index"}:
        return loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1], **loss_kwargs)
    ignore_index = loss_kwargs.get("ignore_index", -100)
    shifted = F.pad(labels.to(logits.device), (0, 1), value=ignore_index)[:, 1:]
    total = None
    # `split`, not slices: its backward joins the chunks' gradients once instead of filling a whole-call zero tensor
    # per chunk
    for part_logits, part_labels in zip(logits.split(chunk, dim=1), shifted.split(chunk, dim=1), strict=True):
        part = F.cross_entropy(
            part_logits.float().flatten(0, 1), part_labels.flatten(), ignore_index=ignore_index, reduction="sum"
        )
        total = part if total is None else total + part
    items = loss_kwargs.get("num_items_in_batch")
    if items is None:
        return total / (shifted != ignore_index).sum()
    return total / (items.to(total.device) if torch.is_tensor(items) else items)


__all__ = [
    "Piece",
    "gather_index",
    "keep_last_logits",
    "locate_outputs",
    "logits_to_compute",
    "plan_pieces",
    "sequence_loss",
    "to_caller_columns",
    "unpadded_kept",
]
