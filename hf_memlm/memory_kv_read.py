"""Reading a `kv` memory: top-k attention of queries over stored entries, exact (`retrieve`) or over the entries
an index picked (`retrieve_selected`), with the sparse backward that keeps training reads cheap.

Part of the Hub payload: flat sibling files, single-dot relative imports, torch + transformers only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Cap on one chunk of the (batch, heads, queries, entries) score tensor, in elements.
_SCORE_CHUNK_ELEMENTS = 1 << 25
# Integer views of each float dtype's bits, in which non-negative floats keep their order (`top_k`).
_SAME_WIDTH_INTS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def retrieve(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor,
    scale: torch.Tensor,
    topk: int | None,
) -> torch.Tensor:
    """Attention of `queries` over stored entries.

    queries (B, H, T, d), keys (B, H, S, d), values (B, H, S, dv), valid (B, S) bool, scale (H,).
    Exact softmax over all valid entries when `topk` is None or >= S; otherwise an exact top-k per
    query (chunked over queries so the score tensor stays bounded). Rows with no valid entry read 0.
    """
    batch, heads, tokens, width = queries.shape
    if batch > 1 and keys.stride(0) == 0 and values.stride(0) == 0 and valid.stride(0) == 0:
        # Every row reads the same memory (one row seen several times, `MemoryState.select`): read it once
        # for all rows' queries instead of copying it per row.
        folded = queries.transpose(0, 1).reshape(1, heads, batch * tokens, width)
        out = retrieve(folded, keys[:1], values[:1], valid[:1], scale, topk)
        return out.view(heads, batch, tokens, -1).transpose(0, 1)
    stored = keys.shape[2]
    keys = keys.to(queries.dtype)
    has_entries = valid.any(-1)
    # Under torch.compile the masks are always applied (they change nothing where every entry is valid) instead
    # of asking the host whether they are needed: a sync, and a graph break.
    compiling = torch.compiler.is_compiling()
    every_row_has_entries = not compiling and bool(has_entries.all())
    # The temperature is applied to the (T, d) queries, not to the (T, S) scores.
    scaled = queries * scale.view(1, heads, 1, 1).to(queries.dtype)
    if topk is None or topk >= stored:
        # Exact softmax over every entry through the fused kernel (no (B, H, T, S) score tensor kept).
        # A row with no entry may attend to its (zeroed) first slot so the kernel sees no empty row;
        # its read is replaced by 0 below.
        attend = None if not compiling and bool(valid.all()) else (valid | ~has_entries[:, None])[:, None, None, :]
        values = values.to(queries.dtype)
        out = F.scaled_dot_product_attention(scaled, keys, values, attn_mask=attend, scale=1.0)
    else:
        all_valid = not compiling and bool(valid.all())
        invalid = ~valid[:, None, None, :]  # (B, 1, 1, S)
        chunk = max(1, _SCORE_CHUNK_ELEMENTS // max(1, batch * heads * stored))
        outputs = []
        for start in range(0, tokens, chunk):
            scores = torch.matmul(scaled[:, :, start : start + chunk], keys.transpose(-1, -2))
            if not all_valid:
                scores = scores.masked_fill(invalid, torch.finfo(scores.dtype).min)
            top_scores, top_index = top_k(scores, topk)  # (B, H, t, k); the selection carries no gradient
            if scores.requires_grad:
                top_scores = scores.gather(-1, top_index)  # the same values, with a gradient
            entry_valid = None if all_valid else valid[:, None, None, :].expand_as(scores).gather(-1, top_index)
            outputs.append(attend_selected(top_scores, top_index, values, entry_valid))
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    if every_row_has_entries:
        return out
    return torch.where(has_entries[:, None, None, None], out, torch.zeros_like(out))


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` largest `scores` along the last dimension and their positions, in descending order, without
    gradient: the values of `scores.topk(k)` (where scores tie, the positions may differ), made faster on CPU.

    torch's top-k compares integers about twice as fast as floats (whose comparisons check for NaN), and
    non-negative floats order like their bit patterns read as integers. Negative floats do not (their integers
    are all below those of non-negative ones, in reverse order), so a row whose k-th pick is negative is
    selected again on floats. The values come with the selection, so an inference read needs no gather.
    """
    with torch.no_grad():
        # (under torch.compile the check below would be a graph break; the compiled top-k is fast anyway)
        if scores.device.type != "cpu" or scores.dtype not in _SAME_WIDTH_INTS or torch.compiler.is_compiling():
            return scores.topk(k, dim=-1)
        bits = scores.contiguous().view(_SAME_WIDTH_INTS[scores.dtype])
        top_bits, index = bits.topk(k, dim=-1)
        top = top_bits.view(scores.dtype)
        redo = top_bits[..., -1] < 0  # fewer than k non-negative scores (or a -0.0 among the picks)
        if bool(redo.any()):
            top[redo], index[redo] = scores[redo].topk(k, dim=-1)
        return top, index


def _entry_table(store: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`store` (B, H, S, d) as a 2-D table of entries and the row of each (b, h)'s first entry (B, H, 1, 1),
    so that `store[b, h, s] == table[first[b, h] + s]`, without copying the store where possible.

    A store streamed without gradients is a strided view into a larger append buffer (`_AppendBuffers`);
    reshaping it would copy every entry on every read, so the table is then the whole buffer.
    """
    batch, heads, stored, dim = store.shape
    # (torch.compile traces no storage offsets and sizes, and keeps no append buffers: a reshape there)
    if store.is_contiguous() or (torch.is_grad_enabled() and store.requires_grad) or torch.compiler.is_compiling():
        first = torch.arange(batch * heads, device=store.device).view(batch, heads, 1, 1) * stored
        return store.reshape(-1, dim), first
    strides, offset = store.stride(), store.storage_offset()
    if strides[3] != 1 or strides[2] != dim or any(value % dim for value in (strides[0], strides[1], offset)):
        return _entry_table(store.contiguous())
    rows = store.untyped_storage().nbytes() // (store.element_size() * dim)
    table = store.as_strided((rows, dim), (dim, 1), 0)
    first = (
        offset // dim
        + torch.arange(batch, device=store.device).view(batch, 1, 1, 1) * (strides[0] // dim)
        + torch.arange(heads, device=store.device).view(1, heads, 1, 1) * (strides[1] // dim)
    )
    return table, first


def attend_selected(
    scores: torch.Tensor, index: torch.Tensor, values: torch.Tensor, selected_valid: torch.Tensor | None
) -> torch.Tensor:
    """Softmax over the selected entries' `scores` (B, H, t, k) and the weighted sum of their values.

    `index` (B, H, t, k) are entry positions in `values` (B, H, S, dv); `selected_valid` (same shape as
    `index`, or None when all are valid) gives padding picks no weight. A query with no valid pick reads 0.
    """
    batch, heads, tokens, count = index.shape
    width = values.shape[3]
    if selected_valid is not None:
        scores = scores.masked_fill(~selected_valid, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1)
    if selected_valid is not None:
        weights = weights * selected_valid
    if values.dtype == weights.dtype:
        if torch.is_grad_enabled() and values.shape[2] <= _DENSE_BACKWARD_ENTRIES * count:
            return _SumWithDenseBackward.apply(weights, index, values)
        # its backward scatters into the store and into the weights
        return _sum_picked(weights, index, values)
    # A store kept in another dtype (`memory_dtype`): cast only the picked rows, not the whole store.
    table, first = _entry_table(values)
    picked = F.embedding((index + first).view(batch * heads * tokens, count), table).to(weights.dtype)
    out = torch.bmm(weights.reshape(-1, 1, count), picked).squeeze(1)
    return out.view(batch, heads, tokens, width)


def _sum_picked(weights: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """out (B, H, t, dv): the picks' values weighted and summed, one fused gather-and-sum per query over the
    flattened (B*H*S, dv) store, with no (B*H*t, k, dv) copy of the picked values."""
    batch, heads, tokens, count = index.shape
    table, first = _entry_table(values)
    flat = (index + first).view(batch * heads * tokens, count)
    out = F.embedding_bag(flat, table, per_sample_weights=weights.reshape(-1, count), mode="sum")
    return out.view(batch, heads, tokens, values.shape[3])


# Up to this many stored entries per pick, the backward of a read goes through dense matmuls (see below).
_DENSE_BACKWARD_ENTRIES = 16


class _SumWithDenseBackward(torch.autograd.Function):
    """`attend_selected`'s weighted sum of the picked values, out (B, H, t, dv), whose backward goes through
    dense (t, S) matmuls instead of `embedding_bag`'s (which sorts every pick and adds rows one by one).

    For a memory of few entries per pick (S <= 16 k, e.g. the first segments of a training example) it is the
    faster one: the read's forward and backward at top-32, one thread, took 27-28 ms against 34 at 255
    entries and 41-42 against 45 at 511 (`python benchmarks/bench_read_block.py --training`, before and after).
    Its cost grows with S, so larger memories keep `embedding_bag`'s.
    """

    @staticmethod
    def forward(ctx, weights, index, values):
        ctx.save_for_backward(weights, index, values)
        return _sum_picked(weights, index, values)

    @staticmethod
    def backward(ctx, grad):
        weights, index, values = ctx.saved_tensors
        grad_weights = grad_values = None
        if ctx.needs_input_grad[0]:  # d out / d weight[j] = value[index[j]]
            grad_weights = torch.matmul(grad, values.transpose(-1, -2)).gather(-1, index)
        if ctx.needs_input_grad[2]:  # d out / d value[s] = the weight of s (0 where s was not picked)
            # summed, not assigned: padding picks repeat a position (with weight 0)
            dense = weights.new_zeros(*index.shape[:-1], values.shape[2]).scatter_add_(-1, index, weights)
            grad_values = torch.matmul(dense.transpose(-1, -2), grad)
        return grad_weights, None, grad_values


def retrieve_selected(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: torch.Tensor,
    index: torch.Tensor,
    selected_valid: torch.Tensor,
) -> torch.Tensor:
    """Attention of `queries` (B, H, T, d) over the entries at positions `index` (B, H, T, k) only.

    Scores are recomputed from the selected keys, so the read is differentiable in queries, keys and
    values exactly like the exact top-k read; the search that chose `index` is not.
    """
    batch, heads, tokens, count = index.shape
    dim = keys.shape[3]
    scaled = queries * scale.view(1, heads, 1, 1).to(queries.dtype)
    table, first = _entry_table(keys)
    # Gather in the storage dtype, then cast only the k picks per query (not the whole store).
    selected_keys = F.embedding((index + first).reshape(-1), table).to(queries.dtype)
    rows = batch * heads * tokens
    scores = torch.bmm(selected_keys.view(rows, count, dim), scaled.reshape(rows, dim, 1)).view(index.shape)
    all_valid = bool(selected_valid.all())
    return attend_selected(scores, index, values, None if all_valid else selected_valid)
