"""`kv` memory: an episodic store of past tokens' keys and values, read by (top-k) attention.

Each row keeps up to `memory_size` entries, oldest evicted first (FIFO). An entry pairs the key of token `j` with the
value of token `j + memory_value_shift`: with shift 1 a query that matches a past context retrieves "what followed
it" (kNN-LM style), which trains far faster than same-token values. Keys and queries are L2-normalised; a learned
per-head temperature sharpens the softmax. Anchors: Memorizing Transformers (Wu et al. 2022), LongLLaMA / FoT.

Large memories (`memory_search="auto"`, more than `memory_search_threshold` entries) are read through faiss IVF
indexes held by the state they index (`memory_kv_index.py`); below the threshold, without faiss, or off CPU, exactly.
"""

from __future__ import annotations

import math
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from .memory_base import LayerState, MemoryBlock, merge_heads, split_heads
from .memory_kv_index import (
    _AppendedIndex,
    _fitting_index,
    _import_faiss,
    _keep_index,
    _SearchIndex,
    _warn_faiss_missing,
    valid_counts,
)

# Cap on one chunk of the (batch, heads, queries, entries) score tensor, in elements.
_SCORE_CHUNK_ELEMENTS = 1 << 25
# Integer views of each float dtype's bits, in which non-negative floats keep their order (`top_k`).
_SAME_WIDTH_INTS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Initial softmax temperature on cosine scores (learned per head afterwards); see `reset_parameters`.
INITIAL_TEMPERATURE = 16.0


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


def keep_newest(valid: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FIFO eviction: for each row, the indices (oldest first) of its newest `capacity` valid entries.

    valid (B, N) bool, entries ordered oldest -> newest. Returns (index (B, S), kept (B, S) bool) with
    S = the largest number kept in any row; rows keeping fewer are padded with `kept == False`.
    """
    batch, total = valid.shape
    newer_valid = valid.flip(-1).long().cumsum(-1).flip(-1)  # 1 = the newest valid entry
    keep = valid & (newer_valid <= capacity)
    counts = keep.sum(-1)
    size = int(counts.max()) if batch else 0
    positions = torch.arange(total, device=valid.device).expand(batch, total)
    # kept entries sort first, in their original (age) order
    order = torch.where(keep, positions, positions + total).argsort(dim=-1)[:, :size]
    kept = torch.arange(size, device=valid.device)[None, :] < counts[:, None]
    return order, kept


# Several threads may read one state (a document remembered once, asked about in parallel): an index must not
# change between the check that it fits a state and the search (or the append) that relies on it.
_INDEX_LOCK = threading.RLock()


class _AppendBuffers:
    """Key and value buffers (B, H, size, d) holding a run of entries at [start, end), with room after it."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, size: int):
        batch, heads, stored, dim = keys.shape
        self.keys = keys.new_empty(batch, heads, size, dim)
        self.values = values.new_empty(batch, heads, size, values.shape[3])
        self.keys[:, :, :stored] = keys
        self.values[:, :, :stored] = values
        self.end = stored

    def _ends_here(self, view: torch.Tensor, buffer: torch.Tensor) -> bool:
        if view.dtype != buffer.dtype or view.device != buffer.device or view.shape[:2] != buffer.shape[:2]:
            return False
        if view.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr():
            return False
        if view.stride() != buffer.stride() or view.shape[3] != buffer.shape[3]:
            return False
        offset = view.storage_offset() - buffer.storage_offset()
        return offset % buffer.stride(2) == 0 and offset // buffer.stride(2) + view.shape[2] == self.end

    def ends_with(self, keys: torch.Tensor, values: torch.Tensor) -> bool:
        """True when `keys`/`values` are views of these buffers ending at the newest entry."""
        return self._ends_here(keys, self.keys) and self._ends_here(values, self.values)

    def append(self, keys: torch.Tensor, values: torch.Tensor, live: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `keys`/`values` after the newest entry; return views of the newest `live` entries."""
        added = keys.shape[2]
        self.keys[:, :, self.end : self.end + added] = keys
        self.values[:, :, self.end : self.end + added] = values
        self.end += added
        return self.keys[:, :, self.end - live : self.end], self.values[:, :, self.end - live : self.end]


# The growable buffers of each block's newest state (see `KVMemory._append_in_place`).
_APPEND_BUFFERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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


class KVMemory(MemoryBlock):
    state_names = ("keys", "values", "valid", "pending_key", "pending_valid")
    writes_tokenwise = True
    takes_written = True

    def __init__(self, config, layer_index: int):
        super().__init__(config, layer_index)
        width = self.num_heads * self.head_dim
        settings = config.memory_settings  # KVSettings (memory_settings.py)
        self.capacity = settings.memory_size
        self.topk = settings.memory_topk
        self.value_shift = settings.memory_value_shift
        self.storage_dtype = _DTYPES.get(settings.memory_dtype) if settings.memory_dtype else None
        self.search = settings.memory_search
        self.search_threshold = settings.memory_search_threshold
        self.search_probes = settings.memory_search_probes
        # Names no base model uses: PEFT matches `target_modules` by name suffix, so a memory projection
        # called `q_proj` would silently get LoRA from LoraConfig(target_modules=["q_proj", "v_proj"]).
        self.mem_query = nn.Linear(self.hidden_size, width, bias=False)
        self.mem_key = nn.Linear(self.hidden_size, width, bias=False)
        self.mem_value = nn.Linear(self.hidden_size, width, bias=False)
        self.mem_out = nn.Linear(width, self.hidden_size, bias=False)
        # log of the per-head softmax temperature applied to cosine similarities
        self.log_scale = nn.Parameter(torch.empty(self.num_heads))

    @property
    def output_projection(self) -> nn.Linear:
        return self.mem_out

    @staticmethod
    def count_entries(state):
        return state["valid"].sum(-1)

    @staticmethod
    def follow_rows(state, selected, rows) -> None:
        # Beam search reorders the rows at every step: without this each step would build the index anew
        # (k-means over every row), about 100 times the cost of the step at 65k entries. The source keeps its
        # index for its next reader (a remembered document asked several questions).
        with _INDEX_LOCK:
            source = _fitting_index(state)
            if source is not None:
                _keep_index(selected, source.rows_of(rows, selected["keys"], selected["valid"]))

    @staticmethod
    def describe_settings(config):
        read = f"top-{config.memory_topk}" if config.memory_topk else "exact softmax over all entries"
        if config.memory_topk and config.memory_search == "auto":
            read += f" (an index above {config.memory_search_threshold:,} entries when faiss is installed)"
        return [
            ("capacity", f"{config.memory_size:,} entries per sequence (oldest evicted first)"),
            ("read", read),
            ("value shift", str(config.memory_value_shift)),
        ]

    def reset_parameters(self, std: float) -> None:
        for proj in (self.mem_query, self.mem_value):
            init.normal_(proj.weight, mean=0.0, std=std)
        # Keys start equal to queries: a query then best matches stored tokens of the same context, and with value
        # shift 1 reads "what followed it last time" from step 0 (random q/k: noise, a from-scratch passkey at chance).
        init.copy_(self.mem_key.weight, self.mem_query.weight)
        init.zeros_(self.mem_out.weight)
        # Scores are cosines in [-1, 1]: a temperature of sqrt(head_dim) (4 at head_dim 16) leaves the softmax
        # over hundreds of entries almost flat; 16 lets the best match dominate from the start.
        init.constant_(self.log_scale, math.log(INITIAL_TEMPERATURE))

    def _store_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.storage_dtype or dtype

    def init_state(self, batch_size: int, device, dtype) -> LayerState:
        store = self._store_dtype(dtype)
        heads, dim = self.num_heads, self.head_dim
        return LayerState(
            {
                "keys": torch.zeros(batch_size, heads, 0, dim, device=device, dtype=store),
                "values": torch.zeros(batch_size, heads, 0, dim, device=device, dtype=store),
                "valid": torch.zeros(batch_size, 0, device=device, dtype=torch.bool),
                "pending_key": torch.zeros(batch_size, heads, dim, device=device, dtype=store),
                "pending_valid": torch.zeros(batch_size, device=device, dtype=torch.bool),
            }
        )

    def check_state(self, state, batch_size: int) -> None:
        super().check_state(state, batch_size)
        expected = (self.num_heads, self.head_dim)
        for name in ("keys", "values"):
            got = state[name].shape
            if state[name].dim() != 4 or (got[1], got[3]) != expected:
                raise ValueError(
                    f"memory_state '{name}' for layer {self.layer_index} has shape {tuple(got)}; this model "
                    f"stores (batch, {expected[0]} heads, entries, {expected[1]}). Was it made by another model?"
                )
        if state["valid"].shape[1] != state["keys"].shape[2]:
            raise ValueError(f"memory_state for layer {self.layer_index}: 'valid' does not match 'keys'.")

    def read(self, hidden_states, state):
        if state["keys"].shape[2] == 0:
            return torch.zeros_like(hidden_states)
        queries = F.normalize(split_heads(self.mem_query(hidden_states), self.num_heads), dim=-1)
        scale = self.log_scale.exp()
        picks = self._index_picks(queries, state)
        if picks is None:
            out = retrieve(queries, state["keys"], state["values"], state["valid"], scale, self.topk)
        else:
            out = retrieve_selected(queries, state["keys"], state["values"], scale, *picks)
        return self.mem_out(merge_heads(out))

    def _index_picks(self, queries, state) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The approximate index's picks for `queries`, or None where the read is exact."""
        if torch.compiler.is_compiling():
            return None  # faiss runs on the host, outside any graph: compiled reads are exact
        with _INDEX_LOCK:
            index = self._search_index(state)
            return None if index is None else index.search(queries, self.topk)

    def select_entries(self, hidden_states, state) -> tuple[torch.Tensor, torch.Tensor]:
        """The entries a top-k read of `hidden_states` attends to: positions (B, H, T, k) into the state's
        entries, and whether each pick is a real entry (False for padding picks, or where fewer were found).

        Exact top-k, or the approximate index's picks where a read would use it. Needs `memory_topk`.
        """
        if self.topk is None:
            raise ValueError("select_entries needs memory_topk: with memory_topk=None a read attends to every entry.")
        queries = F.normalize(split_heads(self.mem_query(hidden_states), self.num_heads), dim=-1)
        with torch.no_grad():
            picks = self._index_picks(queries, state)
            if picks is not None:
                return picks
            keys, valid = state["keys"].to(queries.dtype), state["valid"]
            scores = torch.matmul(queries, keys.transpose(-1, -2)).masked_fill(~valid[:, None, None, :], -math.inf)
            top_scores, top_index = scores.topk(min(self.topk, keys.shape[2]), dim=-1)
            return top_index, top_scores > -math.inf

    def uses_index(self, state) -> bool:
        """Whether a read of `state` goes through the approximate index (else it is exact)."""
        with _INDEX_LOCK:
            return self._search_index(state) is not None

    def _search_index(self, state) -> _SearchIndex | None:
        """The approximate index for `state`, built if needed (and kept by the state); None where the read is
        exact."""
        keys, valid = state["keys"], state["valid"]
        if self.topk is None or self.search == "exact" or keys.shape[2] <= self.search_threshold:
            return None
        index = _fitting_index(state)
        if index is not None:
            index.probes = self.search_probes  # lists searched per query: the block's setting as it is now
            return index if max(index.counts) > self.search_threshold else None
        faiss = _import_faiss()
        if faiss is None:
            _warn_faiss_missing(self.search_threshold)
            return None
        if keys.device.type != "cpu":
            return None  # faiss-cpu would copy the whole store to the host per read; exact is faster there
        counts = valid_counts(valid)
        if counts is None or max(counts) <= self.search_threshold:
            return None
        index = _SearchIndex(faiss, keys, counts, self.search_probes, self.capacity)
        index.remember_valid(valid)
        _keep_index(state, index)
        return index

    def _append_in_place(self, state, entry_keys, entry_values, drop: int):
        """Without autograd, append to this block's growable buffers instead of copying the whole store.

        The new state's keys/values are views of a buffer with room after them; appending writes only past the old
        state's end, so the old state still reads what it held. Returns None when the old state does not end where
        its buffer's last write ended (not the newest state, e.g. a branch, or made elsewhere) and no buffer could
        be used, or when gradients are being recorded.
        """
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            # in-place writes would invalidate tensors saved for backward; compiled code keeps no buffers
            return None
        if (added := entry_keys.shape[2]) > self.capacity:
            return None
        with _INDEX_LOCK:
            return self._append_locked(state, entry_keys, entry_values, drop, added)

    def _append_locked(self, state, entry_keys, entry_values, drop: int, added: int):
        buffers = _APPEND_BUFFERS.get(self)
        keys, values = state["keys"], state["values"]
        live = keys.shape[2] - drop + added
        if buffers is None or not buffers.ends_with(keys, values) or buffers.keys.shape[2] - buffers.end < added:
            buffers = self._new_buffers(keys[:, :, drop:], values[:, :, drop:], live, added)
            _APPEND_BUFFERS[self] = buffers
        return buffers.append(entry_keys, entry_values, live)

    def _new_buffers(self, keys, values, live: int, added: int) -> _AppendBuffers:
        """Buffers holding `keys`/`values` with room for the next writes. On CPU they reserve the whole capacity
        (plus a quarter): pages are backed only once written, and a long read never copies its entries into a
        doubled buffer, which held both copies at once (a 1M-token SmolLM2 read peaked at 5.5 GiB, now 3.3).
        Elsewhere, or where the reservation is refused, they grow by doubling."""
        whole = max(live, self.capacity + max(self.capacity // 4, added))
        if keys.device.type == "cpu":
            try:
                return _AppendBuffers(keys, values, whole)
            except RuntimeError:  # the address space refused (a huge capacity times many rows): grow instead
                pass
        return _AppendBuffers(keys, values, max(live, min(2 * live, whole), 1024))

    def _follow_write(self, state, new_state, entry_valid) -> None:
        """Move `state`'s index to `new_state` (adding and evicting what the write did)."""
        if torch.compiler.is_compiling():
            return  # compiled reads are exact (`_index_picks`): no index to follow
        with _INDEX_LOCK:
            self._follow_write_locked(state, new_state, entry_valid)

    def _follow_write_locked(self, state, new_state, entry_valid) -> None:
        index = _fitting_index(state)
        if index is not None:
            new_counts, added = valid_counts(new_state["valid"]), entry_valid.sum(-1).tolist()
            if new_counts is not None:
                evicted = [old + new - count for old, new, count in zip(index.counts, added, new_counts, strict=True)]
                appended = _AppendedIndex.over(index, new_state["keys"], new_state["valid"], new_counts, evicted)
                if appended is not None:  # a few entries more: `state` keeps its index
                    return _keep_index(new_state, appended)
            # the index becomes the new state's: it no longer indexes `state` (read again, that builds its own)
            _keep_index(state, None)
            if isinstance(index, _AppendedIndex):  # what was appended since its base was moved, then this write
                added = [new + count - base for new, count, base in zip(added, index.counts, index.base_counts)]
                index = index.base
            if new_counts is not None and index.advance(new_state["keys"], added, new_counts):
                index.remember_valid(new_state["valid"])
                index.refresh(new_state["keys"])
                _keep_index(new_state, index)
                return
            index.retire()
        if not torch.is_grad_enabled():
            # Streaming or memorizing: build the index as soon as the memory outgrows exact search, so that
            # it grows with the writes (re-clustered as the row doubles, up to 262k entries) instead of being
            # built over the whole memory by the first read after a long write-only pass.
            self._search_index(new_state)

    def write(self, hidden_states, mask, state, written=None):
        batch, tokens, _ = hidden_states.shape
        store = self._store_dtype(hidden_states.dtype)
        keys = F.normalize(split_heads(self.mem_key(hidden_states), self.num_heads), dim=-1).to(store)
        values = split_heads(self.mem_value(hidden_states), self.num_heads).to(store)  # (B, H, T, d)
        pending_key, pending_valid = state["pending_key"], state["pending_valid"]
        if self.value_shift == 1:
            # Entry at token e pairs the key of the previous *valid* token (or the pending key carried over
            # from the last segment) with the value of token e.
            positions = torch.arange(tokens, device=mask.device).expand(batch, tokens)
            last_valid = torch.where(mask, positions, torch.full_like(positions, -1)).cummax(-1).values
            previous = torch.cat([torch.full_like(last_valid[:, :1], -1), last_valid[:, :-1]], dim=1)  # (B, T)
            with_pending = torch.cat([pending_key[:, :, None], keys], dim=2)  # index 0 = pending
            gather_index = (previous + 1)[:, None, :, None].expand(-1, self.num_heads, -1, self.head_dim)
            entry_keys = with_pending.gather(2, gather_index)
            entry_valid = mask & torch.where(previous >= 0, torch.ones_like(mask), pending_valid[:, None])
            # The last valid token's key waits for the value of the next segment's first token.
            has_valid = mask.any(-1)
            last_index = (
                last_valid[:, -1].clamp(min=0)[:, None, None, None].expand(-1, self.num_heads, 1, self.head_dim)
            )
            last_key = keys.gather(2, last_index)[:, :, 0]
            pending_key = torch.where(has_valid[:, None, None], last_key, pending_key)
            pending_valid = pending_valid | has_valid
        else:
            entry_keys, entry_valid = keys, mask

        if written == 0 and self.value_shift == 1:
            # A fresh state has no pending key, so the first token's entry is not real (`entry_valid` says so):
            # known on the host here, it is left out by shape and every entry left is real, with no sync.
            entry_keys, values, entry_valid = entry_keys[:, :, 1:], values[:, :, 1:], entry_valid[:, 1:]
        all_valid = torch.cat([state["valid"], entry_valid], dim=1)
        total = all_valid.shape[1]
        if written is not None or bool(all_valid.all()):
            # Every entry is real: eviction is a slice of the oldest, no sort and no gather.
            drop = max(0, total - self.capacity)
            appended = self._append_in_place(state, entry_keys, values, drop)
            if appended is None:
                all_keys = torch.cat([state["keys"], entry_keys], dim=2)[:, :, drop:]
                all_values = torch.cat([state["values"], values], dim=2)[:, :, drop:]
            else:
                all_keys, all_values = appended
            new_state = {
                "keys": all_keys,
                "values": all_values,
                "valid": all_valid[:, drop:],
                "pending_key": pending_key,
                "pending_valid": pending_valid,
            }
        else:
            all_keys = torch.cat([state["keys"], entry_keys], dim=2)
            all_values = torch.cat([state["values"], values], dim=2)
            index, kept = keep_newest(all_valid, self.capacity)
            gather_index = index[:, None, :, None].expand(-1, self.num_heads, -1, self.head_dim)
            # Zero the padding entries: a padded token's hidden state may be garbage (even NaN) and 0 * NaN
            # would leak into reads.
            keep = kept[:, None, :, None]
            new_state = {
                "keys": torch.where(keep, all_keys.gather(2, gather_index), 0.0),
                "values": torch.where(keep, all_values.gather(2, gather_index), 0.0),
                "valid": kept,
                "pending_key": pending_key,
                "pending_valid": pending_valid,
            }
        new_state = LayerState(new_state)  # it holds the index the write moves from `state`
        self._follow_write(state, new_state, entry_valid)
        return new_state
