"""A loss on what a `kv` memory's reads pick, beside the language-model loss.

Trained only through the reply's loss, a read learns slowly which of several similar entries to take: among 4
named pass keys ("The pass key of the blue door is 48213.") the asked one's is no likelier than the others'. Where a
task knows which stored token a query should bring back, that can be said directly. Each example may carry
`read_targets`, one per column: the column of the earlier token whose entry the read at this column should pick
(the entry holding that token's value, `memory_value_shift` included), or -100. Reading the pass key back, the
reply's token before each digit targets the same digit in the asked needle.

The loss is the cross-entropy of each memory head's softmax over all stored entries (the read's own scores:
cosine times the head's temperature) toward the target entry, averaged over heads and targeted queries. The
read's top-k only keeps the best entries of that softmax, so the loss ranks the target first for any k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hf_memlm.data import IGNORE_INDEX
from hf_memlm.memory_hooks import ReadRecord


def read_supervision_loss(
    records: list[ReadRecord], read_targets: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor | None:
    """The mean cross-entropy of the recorded reads toward `read_targets` (B, L) in the call's columns, or None
    where no targeted query read a stored target (nothing to learn from).

    `records`: from `record_reads()` around one forward call of that batch. A target the call had evicted, or had
    not yet written when the query read (in the same segment or later), has no entry and is skipped.
    """
    total, count = None, 0
    for scores, entry in targeted_scores(records, read_targets, attention_mask):
        heads = scores.shape[1]
        loss = F.cross_entropy(scores.flatten(0, 1).float(), entry.repeat_interleave(heads), reduction="sum") / heads
        total = loss if total is None else total + loss
        count += len(entry)
    return None if total is None else total / count


def read_accuracy(
    records: list[ReadRecord], read_targets: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> float | None:
    """The share of targeted (query, head) pairs whose best-scored entry is the target; None where there is none."""
    hits, total = 0, 0
    with torch.no_grad():
        for scores, entry in targeted_scores(records, read_targets, attention_mask):
            hits += int((scores.argmax(-1) == entry[:, None]).sum())
            total += scores.shape[0] * scores.shape[1]
    return None if total == 0 else hits / total


def targeted_scores(records: list[ReadRecord], read_targets: torch.Tensor, attention_mask: torch.Tensor | None):
    """For each recorded read of a memory layer with targets it stores: the targeted queries' scores over the
    entries they read (N, heads, entries; padding entries at the dtype's minimum) and each one's target entry (N,)."""
    for record in records:
        for layer, (rows, columns, entry) in targeted_entries(record, read_targets, attention_mask).items():
            block, state = record.blocks[layer], record.layers[layer]
            queries = block.queries(record.captured[layer], record.mask)  # (B, H, W, d)
            query = queries[rows, :, columns]  # (N, H, d)
            keys = state["keys"][rows].to(query.dtype)  # (N, H, S, d)
            scores = torch.einsum("nhd,nhsd->nhs", query, keys) * block.log_scale.exp()[None, :, None]
            yield scores.masked_fill(~state["valid"][rows][:, None, :], torch.finfo(scores.dtype).min), entry


def targeted_entries(record: ReadRecord, read_targets: torch.Tensor, attention_mask: torch.Tensor | None) -> dict:
    """Memory layer -> (rows, segment columns, entries): the recorded segment's queries that have a target, and the
    position of that target's entry in the state they read. Targets evicted by then, or not yet written (in the
    same segment or later), are left out; layers where none is left, too."""
    length = read_targets.shape[1]
    mask = torch.ones_like(read_targets, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    targets = read_targets.gather(1, record.source).masked_fill(~record.mask, IGNORE_INDEX)
    rows, columns = (targets >= 0).nonzero(as_tuple=True)
    if len(rows) == 0:
        return {}
    target_columns = targets[rows, columns]
    if bool((target_columns >= length).any()):
        raise ValueError(
            f"read_targets holds column {int(target_columns.max())} but the batch has {length} columns: a target is "
            "the column of an earlier token of the same example."
        )
    rank = mask.long().cumsum(1) - 1  # each column's number among its row's real tokens
    # the entry of real token k is (starts - k) entries back from the newest one the segment read
    back = torch.tensor(record.starts, device=rows.device)[rows] - rank[rows, target_columns]
    found = {}
    for layer, state in record.layers.items():
        if "keys" not in state:
            raise ValueError(
                f"read_targets name entries of a `kv` memory; the memory beside layer {layer} is another kind. Train "
                "it with read_loss_weight 0."
            )
        entry = state["valid"].sum(-1)[rows] - back
        known = (back >= 1) & (entry >= 0)
        if bool(known.any()):
            found[layer] = (rows[known], columns[known], entry[known])
    return found


__all__ = ["read_accuracy", "read_supervision_loss", "targeted_entries", "targeted_scores"]
