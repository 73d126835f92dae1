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

from .memory_base import LayerState, MemoryBlock, key_window_mean, key_window_states, merge_heads, split_heads
from .memory_kv_index import (
    _AppendedIndex,
    _fitting_index,
    _import_faiss,
    _keep_index,
    _SearchIndex,
    _warn_faiss_missing,
    valid_counts,
)
from .memory_kv_read import retrieve, retrieve_selected

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
}
# Initial softmax temperature on cosine scores (learned per head afterwards); see `reset_parameters`.
INITIAL_TEMPERATURE = 16.0


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


# Storage dtypes without CPU gather kernels, moved as integers of the same width (the same bytes). Autograd cannot
# sum their gradients either: writes under autograd store entries in the model's dtype (`_store_dtypes`).
_BIT_VIEWS = {torch.float8_e4m3fn: torch.uint8}


def _kept_entries(store: torch.Tensor, gather_index: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`store`'s entries at `gather_index` (along dim 2), zero where not `keep`."""
    bits = _BIT_VIEWS.get(store.dtype)
    moved = store if bits is None else store.view(bits)
    kept = torch.where(keep, moved.gather(2, gather_index), torch.zeros((), dtype=moved.dtype))
    return kept if bits is None else kept.view(store.dtype)


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


class KVMemory(MemoryBlock):
    state_names = ("keys", "values", "valid", "pending_key", "pending_valid")
    takes_written = True
    reads_in_context = True

    def __init__(self, config, layer_index: int):
        super().__init__(config, layer_index)
        width = self.num_heads * self.head_dim
        settings = config.memory_settings  # KVSettings (memory_settings.py)
        self.capacity = settings.memory_size
        self.topk = settings.memory_topk
        self.value_shift = settings.memory_value_shift
        self.key_window = settings.memory_key_window
        # keys made from several tokens stop at an attention window's start: a write must hold one window
        self.writes_tokenwise = self.key_window == 1
        self.storage_dtype = _DTYPES.get(settings.memory_dtype) if settings.memory_dtype else None
        value_dtype = settings.memory_value_dtype
        self.value_storage_dtype = _DTYPES[value_dtype] if value_dtype else self.storage_dtype
        self.search = settings.memory_search
        self.search_threshold = settings.memory_search_threshold
        self.search_probes = settings.memory_search_probes
        # Names no base model uses: PEFT matches `target_modules` by name suffix, so a memory projection
        # called `q_proj` would silently get LoRA from LoraConfig(target_modules=["q_proj", "v_proj"]).
        self.mem_query = nn.Linear(self.hidden_size, width, bias=False)
        self.mem_key = nn.Linear(self.hidden_size, width, bias=False)
        self.mem_value = nn.Linear(self.hidden_size, width, bias=False)
        self.mem_out = nn.Linear(width, self.hidden_size, bias=False)
        # `memory_key_projections="per_token"`: projection j of these is that of the j+1-th token before (mem_query /
        # mem_key being the token's own), a learned causal convolution over the key window; empty otherwise
        earlier = self.key_window - 1 if settings.memory_key_projections == "per_token" else 0
        self.mem_query_earlier = nn.ModuleList(nn.Linear(self.hidden_size, width, bias=False) for _ in range(earlier))
        self.mem_key_earlier = nn.ModuleList(nn.Linear(self.hidden_size, width, bias=False) for _ in range(earlier))
        # log of the per-head softmax temperature applied to cosine similarities
        self.log_scale = nn.Parameter(torch.empty(self.num_heads))

    @property
    def output_projection(self) -> nn.Linear:
        return self.mem_out

    @property
    def input_projections(self) -> tuple[nn.Linear, ...]:
        return (self.mem_query, self.mem_key, self.mem_value, *self.mem_query_earlier, *self.mem_key_earlier)

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
    def settle(state, started_from) -> None:
        """After `memorize`: a last write of at most `_APPENDED_EXACTLY` entries left `state` reading through its
        index's base plus those entries scored exactly, so that the state it was written from kept that base. Where
        the read had already moved the base past `started_from`'s entries, nothing keeps it for another state: the
        base takes the entries in, and each later read (every token of a generation) searches them in its lists
        instead of scoring up to 4,096 entries per head one by one (a quarter of a generated token's time at 1M)."""
        with _INDEX_LOCK:
            index = _fitting_index(state)
            if not isinstance(index, _AppendedIndex):
                return
            earlier = _fitting_index(started_from)
            if (earlier.base if isinstance(earlier, _AppendedIndex) else earlier) is index.base:
                return  # `started_from` still reads through the base
            _keep_index(state, index.settle(state["keys"], state["valid"]))

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
        # the earlier tokens start unheard: keys from one token, which learn single keys fastest, and training adds
        # what of the context tells entries apart
        for proj in (*self.mem_query_earlier, *self.mem_key_earlier):
            init.zeros_(proj.weight)
        # Scores are cosines in [-1, 1]: a temperature of sqrt(head_dim) (4 at head_dim 16) leaves the softmax
        # over hundreds of entries almost flat; 16 lets the best match dominate from the start.
        init.constant_(self.log_scale, math.log(INITIAL_TEMPERATURE))

    def _store_dtypes(self, dtype: torch.dtype) -> dict[str, torch.dtype]:
        """The dtype each entry tensor of a state is stored in, for a model computing in `dtype`."""
        stores = {}
        for names, chosen in ((("keys", "pending_key"), self.storage_dtype), (("values",), self.value_storage_dtype)):
            store = chosen or dtype
            if store in _BIT_VIEWS and torch.is_grad_enabled():
                store = dtype  # training: see `_BIT_VIEWS`
            stores.update(dict.fromkeys(names, store))
        return stores

    def init_state(self, batch_size: int, device, dtype) -> LayerState:
        store = self._store_dtypes(dtype)
        heads, dim = self.num_heads, self.head_dim
        return LayerState(
            {
                "keys": torch.zeros(batch_size, heads, 0, dim, device=device, dtype=store["keys"]),
                "values": torch.zeros(batch_size, heads, 0, dim, device=device, dtype=store["values"]),
                "valid": torch.zeros(batch_size, 0, device=device, dtype=torch.bool),
                "pending_key": torch.zeros(batch_size, heads, dim, device=device, dtype=store["pending_key"]),
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

    def read(self, hidden_states, state, mask=None, recent=None):
        if state["keys"].shape[2] == 0:
            return torch.zeros_like(hidden_states)
        queries = self.queries(hidden_states, mask, recent)
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

    def queries(self, hidden_states, mask=None, recent=None) -> torch.Tensor:
        """The L2-normalised queries (B, H, T, d) a read of `hidden_states` makes (arguments as `read`'s)."""
        projected = self._in_context(self.mem_query, self.mem_query_earlier, hidden_states, mask, recent)
        return F.normalize(split_heads(projected, self.num_heads), dim=-1)

    def _in_context(self, projection, earlier: nn.ModuleList, hidden_states, mask=None, recent=None) -> torch.Tensor:
        """`projection` of each token in its key window (`memory_key_window`), or with the `earlier` tokens'
        projections (`memory_key_projections="per_token"`) their sum."""
        if not earlier:
            return projection(key_window_mean(hidden_states, self.key_window, mask, recent))
        pairs = key_window_states(hidden_states, self.key_window, mask, recent)
        out = projection(hidden_states)
        for before, (states, _) in zip(earlier, pairs[1:], strict=True):
            out = out + before(states)  # absent tokens are zeros, and the projections have no bias
        return out

    def select_entries(self, hidden_states, state, mask=None, recent=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The entries a top-k read of `hidden_states` attends to: positions (B, H, T, k) into the state's
        entries, and whether each pick is a real entry (False for padding picks, or where fewer were found).

        Exact top-k, or the approximate index's picks where a read would use it. Needs `memory_topk`.
        """
        if self.topk is None:
            raise ValueError("select_entries needs memory_topk: with memory_topk=None a read attends to every entry.")
        queries = self.queries(hidden_states, mask, recent)
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
        stores = self._store_dtypes(hidden_states.dtype)
        if any(
            state[name].dtype != store and {state[name].dtype, store} & set(_BIT_VIEWS)
            for name, store in stores.items()
        ):
            # a float8 state written to under autograd, or the other way round: torch promotes no float8 type
            state = LayerState({name: t.to(stores[name]) if name in stores else t for name, t in state.items()})
        store, value_store = stores["keys"], stores["values"]
        # (in the compute dtype until stored: torch has no gather for float8 on CPU)
        projected = self._in_context(self.mem_key, self.mem_key_earlier, hidden_states, mask)
        keys = F.normalize(split_heads(projected, self.num_heads), dim=-1)
        values = split_heads(self.mem_value(hidden_states), self.num_heads).to(value_store)  # (B, H, T, d)
        pending_key, pending_valid = state["pending_key"].to(keys.dtype), state["pending_valid"]
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
        entry_keys, pending_key = entry_keys.to(store), pending_key.to(store)

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
                "keys": _kept_entries(all_keys, gather_index, keep),
                "values": _kept_entries(all_values, gather_index, keep),
                "valid": kept,
                "pending_key": pending_key,
                "pending_valid": pending_valid,
            }
        new_state = LayerState(new_state)  # it holds the index the write moves from `state`
        self._follow_write(state, new_state, entry_valid)
        return new_state
