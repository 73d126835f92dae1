"""One long haystack read into `kv` memory once, shared by many examples that differ only in their first
segments: the way to ask a hundred questions a million tokens back without reading a million tokens each time.

Why it is exact: with a single memory layer, what a segment writes depends on that segment's tokens only
(nothing below the memory layer reads memory, and a layer writes its output before its own read is added:
`memory_writes.py`). An example that reads `head` (whole segments: the needle and what surrounds it) and then
the first `n` tokens of the haystack therefore holds the head's entries followed by the haystack's entries as
the haystack writes them alone. The one entry that joins them, with `memory_value_shift=1`, pairs the head's
last key with the haystack's first value. `tests/test_shared_haystack.py` checks that the state built here
equals reading the example whole, entry by entry.

Read through the approximate index (`memory_search='auto'` above the threshold), the haystack's faiss index is
built once too, while it is read, as a user's read builds it; a copy is kept at each length examples will ask
for (`lengths`). Each example adds its head's entries to the copy of its length and removes them after
(`_SplicedIndex`), so the needle is found through the same lists as in a whole read, and no index is built per
example (30 s per head at a million entries otherwise).
"""

from __future__ import annotations

import warnings

import torch

from hf_memlm.memory_base import LayerState
from hf_memlm.memory_kv_index import (
    _AppendedIndex,
    _fingerprint,
    _import_faiss,
    _keep_index,
    _mask_fingerprint,
    candidates_for,
    rescore,
)
from hf_memlm.memory_state import MemoryState

# haystack tokens memorized per call (bounds the token ids and activations held at once)
READ_CHUNK_TOKENS = 65536
# faiss ids of an example's head entries in a haystack index: far above any haystack entry's id
_HEAD_IDS = 1 << 40


class SharedHaystack:
    """The memory of `haystack_ids` (1-D), read once, to be put after each example's own head.

    `state(head_ids, tokens)` is the memory after reading `head_ids` and then the haystack's first `tokens`
    tokens. Its tensors are views of buffers this object reuses: a state is valid until the next `state` call.
    Where reads go through the approximate index, `lengths` are the values of `tokens` examples will ask for
    (default: the whole haystack); another length builds an index for its example, and says so.
    """

    def __init__(self, model, haystack_ids: torch.Tensor, head_segments: int, progress=None, lengths=None):
        config = model.config
        if config.memory_type != "kv" or len(config.memory_layers) != 1:
            raise ValueError(
                "a shared haystack needs kv memory at a single layer (what a segment writes then depends on that "
                f"segment alone); this model has {config.memory_type} memory at layers {config.memory_layers}."
            )
        if haystack_ids.dim() != 1 or len(haystack_ids) % config.segment_length:
            raise ValueError(
                f"the haystack must be a 1-D run of whole segments of {config.segment_length} tokens, got shape "
                f"{tuple(haystack_ids.shape)}."
            )
        self.model = model
        self.segment_length = config.segment_length
        self.head_tokens = head_segments * config.segment_length
        self.layer = config.memory_layers[0]
        self.value_shift = config.memory_value_shift
        self.haystack_length = len(haystack_ids)
        if self.head_tokens + len(haystack_ids) > config.memory_size:
            raise ValueError(
                f"memory_size={config.memory_size:,} entries cannot hold a head of {self.head_tokens:,} tokens and a "
                f"haystack of {len(haystack_ids):,}: the oldest entries would be evicted. Load the model with a "
                "larger memory_size."
            )
        lengths = sorted(set(lengths or [self.haystack_length]))
        for tokens in lengths:
            self._check_tokens(tokens)
        self._lengths = lengths
        block = model.memory_blocks[str(self.layer)]
        # Read one segment before the haystack (any will do: its own first segment), so that the haystack's
        # first token has an entry (with shift 1 the first token of a stream has none); that entry's key is
        # replaced by each head's last key.
        before = haystack_ids[: self.segment_length]
        offset = int(model.memorize(before[None].to(model.device)).layers[self.layer]["valid"].sum())
        state, stream = None, torch.cat([before, haystack_ids])
        # chunks end where a length ends, to keep a copy of the index there
        ends = sorted({*range(READ_CHUNK_TOKENS, len(stream), READ_CHUNK_TOKENS), *(len(before) + t for t in lengths)})
        self._snapshots, start = {}, 0
        for end in ends:
            state = model.memorize(stream[start:end][None].to(model.device), memory_state=state)
            start = end
            if progress is not None:
                progress(end - len(before))
            if end - len(before) in lengths:
                self._keep_snapshot(block, state.layers[self.layer], offset, end - len(before))
        hay = state.layers[self.layer]
        if not bool(hay["valid"][:, offset:].all()) or hay["keys"].shape[2] - offset != len(haystack_ids):
            raise AssertionError("every haystack token must have one valid entry")
        # The head's entries: one per token, less the first one's with shift 1 (it has no key before it).
        self.head_entries = self.head_tokens - (1 if self.value_shift == 1 else 0)
        # a haystack entry's position in the state, from its position in the stream read here
        self._shift = self.head_entries - offset
        keys, values = hay["keys"][:, :, offset:], hay["values"][:, :, offset:]
        _, heads, _, dim = keys.shape
        total = self.head_entries + self.haystack_length
        self._keys = keys.new_empty(1, heads, total, dim)
        self._values = values.new_empty(1, heads, total, values.shape[3])
        self._keys[:, :, self.head_entries :] = keys
        self._values[:, :, self.head_entries :] = values
        self._valid = torch.ones(1, total, dtype=torch.bool, device=keys.device)
        self._pending_key = hay["pending_key"]
        self._pending_valid = hay["pending_valid"]
        self._headed = None  # the snapshot the last example's head was added to
        self._warned = False

    def _check_tokens(self, tokens: int) -> None:
        if tokens % self.segment_length or not 0 < tokens <= self.haystack_length:
            raise ValueError(
                f"tokens={tokens} must be a whole number of segments ({self.segment_length}) up to the haystack's "
                f"{self.haystack_length:,}."
            )

    def _keep_snapshot(self, block, layer_state, offset: int, tokens: int) -> None:
        """Keep a copy of the faiss indexes the read has built so far (the index a read of `tokens` haystack
        tokens builds), without the entries that are not the haystack's: the segment read before it, and the
        one entry that joins it to a head (its key is each head's)."""
        index = getattr(layer_state, "index", None)
        if index is None or block.search == "exact" or not index.fits(layer_state["keys"], layer_state["valid"]):
            return  # reads of this length are exact (or build their own index: a short memory)
        if isinstance(index, _AppendedIndex):  # a short chunk's entries are beside the index: put them in it
            index = index.settle(layer_state["keys"], layer_state["valid"])
            _keep_index(layer_state, index)
            if index is None:
                return
        first, live = index.first_id[0], index.indexes[0]
        copy = live if tokens == self.haystack_length else live.clone()  # the whole haystack's: the read's own
        copy.remove_range(first, first + offset + 1)
        self._snapshots[tokens] = (copy, first)

    def state(self, head_ids: torch.Tensor, tokens: int) -> MemoryState:
        """The memory after reading `head_ids` ((head_segments * segment_length,) tokens, all real) and then the
        haystack's first `tokens` tokens (a whole number of segments)."""
        if head_ids.dim() != 1 or len(head_ids) != self.head_tokens:
            raise ValueError(
                f"head_ids must hold exactly {self.head_tokens} tokens, got shape {tuple(head_ids.shape)}."
            )
        self._check_tokens(tokens)
        head = self.model.memorize(head_ids[None].to(self.model.device)).layers[self.layer]
        count = head["keys"].shape[2]
        if count != self.head_entries or not bool(head["valid"].all()):
            raise AssertionError(f"the head wrote {count} entries, expected {self.head_entries} valid ones")
        self._keys[:, :, :count] = head["keys"]
        self._values[:, :, :count] = head["values"]
        end = count + tokens
        if self.value_shift == 1:
            # the haystack's first entry pairs the head's last key (pending after the head) with its first value
            self._keys[:, :, count] = head["pending_key"]
            if end < self._keys.shape[2]:  # the key of the haystack's token `tokens - 1` is the next entry's
                pending_key, pending_valid = self._keys[:, :, end].clone(), torch.ones_like(self._pending_valid)
            else:
                pending_key, pending_valid = self._pending_key, self._pending_valid
        else:
            pending_key, pending_valid = head["pending_key"], head["pending_valid"]
        layer = {
            "keys": self._keys[:, :, :end],
            "values": self._values[:, :, :end],
            "valid": self._valid[:, :end],
            "pending_key": pending_key,
            "pending_valid": pending_valid,
        }
        return MemoryState("kv", {self.layer: LayerState(layer, self._spliced_index(layer, tokens))})

    def _spliced_index(self, layer: dict, tokens: int) -> _SplicedIndex | None:
        """The haystack's index at `tokens` with this example's head entries in it, or None (an exact read, or a
        length with no snapshot: the read builds its own index)."""
        if self._headed is not None:  # the last example's head leaves the index it was added to
            copy, _ = self._snapshots[self._headed]
            copy.remove_range(_HEAD_IDS, _HEAD_IDS + self.head_entries + 1)
            self._headed = None
        block = self.model.memory_blocks[str(self.layer)]
        if block.topk is None or block.search == "exact" or layer["keys"].shape[2] <= block.search_threshold:
            return None
        if tokens not in self._snapshots:
            if tokens not in self._lengths and not self._warned:
                self._warned = True
                warnings.warn(
                    f"a shared haystack read through the approximate index was asked for {tokens:,} tokens, not one "
                    "of its `lengths`: the read builds an index for this example (slow at a million entries). Pass "
                    "every length examples will ask for as `lengths`.",
                    stacklevel=3,
                )
            return None
        copy, first = self._snapshots[tokens]
        # the head's entries and the entry that joins it to the haystack (its key is the head's)
        head_keys = self._keys[0, :, : self.head_entries + 1].float().contiguous().numpy()
        copy.add(head_keys, torch.arange(_HEAD_IDS, _HEAD_IDS + self.head_entries + 1, dtype=torch.int64).numpy())
        self._headed = tokens
        return _SplicedIndex(copy, self._shift - first, layer["keys"], layer["valid"])


class _SplicedIndex:
    """A read's index over one `SharedHaystack.state`: the haystack's index (`_RowIndex`) at its length, holding this
    example's head entries under ids from `_HEAD_IDS`. It answers the reads of that state as the index of a
    whole read would (`memory_kv.KVMemory` asks `fits`, `counts` and `search`); it cannot follow a write (a
    write builds the new state its own index)."""

    def __init__(self, index, shift: int, keys: torch.Tensor, valid: torch.Tensor):
        self.index, self.shift, self.keys = index, shift, keys
        self.counts = [keys.shape[2]]
        self.probes = index.probes  # lists searched per query (the reading block sets it)
        self.fingerprint, self.valid_fingerprint = _fingerprint(keys), _mask_fingerprint(valid)

    def fits(self, keys: torch.Tensor, valid: torch.Tensor) -> bool:
        return _fingerprint(keys) == self.fingerprint and _mask_fingerprint(valid) == self.valid_fingerprint

    def search(self, queries: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Entry positions (B, H, T, k) of the approximate top-k of each query, and which are real picks."""
        _import_faiss().omp_set_num_threads(torch.get_num_threads())
        data = queries.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        self.index.probes = self.probes
        found = self.index.search(data[0], candidates_for(topk))[None]
        picked = found >= 0  # faiss pads with -1 where the probed lists hold fewer than k entries
        positions = torch.where(found >= _HEAD_IDS, found - _HEAD_IDS, found + self.shift)
        positions, picked = positions.masked_fill(~picked, 0).to(queries.device), picked.to(queries.device)
        return rescore(self.keys, queries, positions, picked, topk)

    def advance(self, *_) -> bool:
        return False  # a write makes a new state, which builds its own index

    def retire(self) -> None:
        self.fingerprint = self.valid_fingerprint = None

    def rows_of(self, *_) -> None:
        return None  # a reordered state (beam search) builds its own


__all__ = ["READ_CHUNK_TOKENS", "SharedHaystack"]
