"""The approximate search behind large `kv` memories: faiss IVF indexes over a memory state's keys, held as 8-bit
codes, with the entries least like their list's centroid scored exactly by every search (`_SearchIndex`, one
`_RowIndex` per row), and the candidates re-scored exactly from the state's own keys;
a state a short write made from an indexed one reads through that index plus its new entries, scored exactly
(`_AppendedIndex`), so the state written from keeps its index.

faiss is optional (`pip install hf-memlm[faiss]`): it is imported lazily, and without it `KVMemory` reads
exactly and warns once. The index only selects entries; scores and values are computed by `memory_kv.py`,
so reads stay differentiable.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from .memory_base import LayerState
from .memory_kv_read import _entry_table

# An IVF index is built with lists for `_LOOKAHEAD` times the entries it holds (at most the capacity),
# `_ENTRIES_PER_LIST` each when full, so a search scans about `probes * _ENTRIES_PER_LIST` entries per query
# up to `_MAX_LISTS` lists: at the default 65,536 entries, 512 lists and 32 probes scan 4,096 entries.
_LOOKAHEAD = 4
_ENTRIES_PER_LIST = 128
# A row is re-clustered once as many entries have been written to it since its lists were placed as it
# held then: each time it doubles while it grows, and once full, each time all its entries were replaced.
# Keys drift along a stream (new text, new topics): on the benchmark stream's keys at 65k entries
# (`benchmarks/bench_index_settings.py`), 1,024 lists placed on its first quarter searched 1.5 times as long
# as lists placed on all of it (later keys crowd into fewer lists), at recall@32 0.957 against 0.967. The
# builds cost about twice the last one in all. Past
# `_RECLUSTER_UNTIL` entries a build (k-means plus assigning every entry) costs more than the writes it
# serves, and the lists stay as they are.
_RECLUSTER_UNTIL = 1 << 18
# Lists stop growing here (reached at 131,072 entries when the capacity allows it): the cost of a build
# is k-means over `lists * _TRAINING_POINTS_PER_LIST` points plus assigning every entry to a list. Past the
# cap the lists grow instead (256 entries each at 1M), so a search scans more.
_MAX_LISTS = 4096
# k-means on a sample of 4 points per list, 4 iterations, instead of 16 and 10: builds 2-3 times cheaper
# (k-means costs points x lists x iterations) for recall@32 0.948 against 0.967 at 1,024 lists and 0.979
# against 0.972 at 512 (`benchmarks/bench_index_settings.py`).
_TRAINING_POINTS_PER_LIST = 4
_KMEANS_ITERATIONS = 4
_MAX_TRAINING_POINTS = 32768
# The share of a build's entries least like their list's centroid that are kept out of the lists and scored
# exactly by every search (`_RowIndex`). A trained reader's query can match such an entry well while ranking its
# list low: on the real-model pass key the needle's digits are such entries. Of the reads whose best entry was the
# needle's, 32 lists found it in 0.861 (128 lists: 0.987), and 1.000 with the lowest 1% scored exactly
# (`scripts/index_recall_on_reads.py`, 64k tokens back; docs/results/smollm2_passkey.md).
_OUTLIER_SHARE = 0.01
# The lists hold each key as 8-bit codes (faiss scalar quantizer, one range per feature), a quarter of float32's
# bytes to keep and to scan. Their scores only nominate candidates: each search takes `_CANDIDATES_PER_PICK` times
# the picks it returns (at least `_MIN_CANDIDATES`) and re-scores them exactly from the state's keys, so the picks and
# their order are an exact read's wherever the codes nominate the right entries. On a tiny model's keys of text
# (16 features per head, top-32) twice the picks recalled 0.90 of the exact top-32, four times 0.98 (float32 lists:
# 0.999; tests/test_kv_index.py). On the trained real-model pass key at 64k (top-4, 16 candidates) recall@4 is 0.986
# against 0.998 with float32 lists, and the needle's entry is found in every read where it is the best
# (`scripts/index_recall_on_reads.py`, docs/results/smollm2_passkey.md).
_CANDIDATES_PER_PICK = 4
_MIN_CANDIDATES = 16
# Once every head holds more than `_EXACT_OUTLIERS` outlying entries (a share of builds of about 400k entries and
# more), scoring them all is a large part of a generated token's read at a million entries (4 heads of about 10,500
# float32 keys, read from memory for every token): they get float32 IVF lists of their own, `_OUTLIERS_PER_LIST` each,
# of which a search scans one in `_OUTLIER_PROBE_FRACTION`. On the trained real-model pass key's keys of a million
# tokens of book text, a search with the caches cold took 1.53 ms instead of 1.94, recall@4 of its 16 candidates
# 0.898 in both (`scripts/outlier_lists.py`). With the key a million tokens back, the needle's entry is found in all
# 239 reads where it is the best, recall@4 0.855 against 0.858 (one list in 8 scanned: 0.987 of them;
# `scripts/index_recall_on_reads.py --exact-outliers / --outlier-probe-fraction`, 10 examples).
_EXACT_OUTLIERS = 4096
_OUTLIERS_PER_LIST = 64
_OUTLIER_PROBE_FRACTION = 4
# faiss's name of the lists' scalar quantizer (`faiss.ScalarQuantizer.QT_8bit`: 8 bits per feature).
_LIST_CODES = "QT_8bit"


def _import_faiss():
    """faiss if installed, else None (it is an optional dependency: `pip install hf-memlm[faiss]`)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


_FAISS_MISSING_WARNED = False


def _warn_faiss_missing(threshold: int) -> None:
    global _FAISS_MISSING_WARNED
    if not _FAISS_MISSING_WARNED:
        _FAISS_MISSING_WARNED = True
        warnings.warn(
            f"kv memory holds more than memory_search_threshold={threshold} entries per row, but faiss is not "
            "installed: reads fall back to exact search, whose cost grows with the memory. Install it with "
            "`pip install hf-memlm[faiss]` (or `pip install faiss-cpu`), or set memory_search='exact' to "
            "silence this warning.",
            stacklevel=3,
        )


def _fitting_index(state):
    """The index `state` holds, if it indexes the state's keys as they are (not written since, no mask edit)."""
    index = getattr(state, "index", None)
    return index if index is not None and index.fits(state["keys"], state["valid"]) else None


def _keep_index(state, index: _SearchIndex | None) -> None:
    """Give `state` its index. A plain dict (a state made by hand, not by this block) cannot hold one: its
    reads build their own each time."""
    if isinstance(state, LayerState):
        state.index = index


def _fingerprint(tensor: torch.Tensor) -> tuple:
    """Identity of a tensor: its storage and layout. (Not its version counter: a store streamed without
    gradients is a view of a buffer that later writes append to, past the view's end.)"""
    return (tensor.data_ptr(), tuple(tensor.shape), tensor.stride())


def _mask_fingerprint(valid: torch.Tensor) -> tuple:
    """`_fingerprint` plus the version counter, which in-place edits of the mask bump (tensors made under
    `torch.inference_mode()` have none; they cannot be edited outside it)."""
    return (*_fingerprint(valid), None if valid.is_inference() else valid._version)


def valid_counts(valid: torch.Tensor) -> list[int] | None:
    """Entries per row when each row's valid entries form a prefix (as writes leave them), else None."""
    counts = valid.sum(-1)
    prefix = torch.arange(valid.shape[1], device=valid.device)[None, :] < counts[:, None]
    return counts.tolist() if torch.equal(prefix, valid) else None


def _as_float32_numpy(tensor: torch.Tensor):
    return tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()


def candidates_for(topk: int) -> int:
    """How many candidates a search takes from the lists to return `topk` picks after `rescore`."""
    return max(_CANDIDATES_PER_PICK * topk, _MIN_CANDIDATES)


def rescore(keys, queries, candidates, real, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best `topk` of each query's `candidates` (B, H, T, c positions into `keys` (B, H, S, d)) by exact score
    against `queries` (B, H, T, d), and whether each is real (`real`: False for padding candidates, which rank last)."""
    table, first = _entry_table(keys)
    chosen = F.embedding(candidates.clamp(max=keys.shape[2] - 1) + first, table)  # (B, H, T, c, d)
    scores = (chosen.to(queries.dtype) @ queries[..., None]).squeeze(-1).masked_fill(~real, -math.inf)
    best = scores.topk(min(topk, scores.shape[-1]), dim=-1).indices
    return candidates.gather(-1, best), real.gather(-1, best)


def _inner_product_lists(faiss, dim: int, lists: int, codes: str | None = None):
    """An untrained faiss IVF index (inner product) of `lists` lists, holding float32 keys or, with `codes` (a
    `faiss.ScalarQuantizer` name), codes; k-means on `_KMEANS_ITERATIONS` iterations. It owns its flat quantizer:
    freed with it, copied by `clone_index` (a quantizer owned by its Python object too would be freed twice)."""
    quantizer = faiss.IndexFlatIP(dim)
    if codes is None:
        index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
    else:
        code = getattr(faiss.ScalarQuantizer, codes)
        index = faiss.IndexIVFScalarQuantizer(quantizer, dim, lists, code, faiss.METRIC_INNER_PRODUCT)
    index.own_fields = True
    quantizer.this.disown()
    index.cp.niter = _KMEANS_ITERATIONS
    index.cp.min_points_per_centroid = 1  # no warning when there are few entries per list
    return index


class _Outliers:
    """The entries of one row's heads that its lists do not hold, scored exactly by every search: all heads' in one
    (heads, capacity, d) float32 buffer, so that one batched product scores them for every head at once (a search
    per head cost four times as much at a million entries). Slot `i` of head `h` is used where `ids[h, i] >= 0`;
    each head's used slots come first, in the order they were added.

    Once every head holds more than `_EXACT_OUTLIERS`, each head's also go to float32 IVF lists of their own
    (`lists`), which searches scan instead of the buffer; they are placed anew each time the smallest head doubles."""

    def __init__(self, heads: int, dim: int, faiss=None):
        self.data = torch.zeros(heads, 0, dim)
        self.ids = torch.full((heads, 0), -1, dtype=torch.int64)
        self.sizes = [0] * heads
        self.faiss, self.lists, self.listed = faiss, None, 0

    def add(self, head: int, data: torch.Tensor, ids: torch.Tensor) -> None:
        size, count = self.sizes[head], len(ids)
        if size + count > self.data.shape[1]:  # grow by doubling: appends cost amortized O(entries)
            capacity = max(size + count, 2 * self.data.shape[1], 64)
            data_buffer = self.data.new_zeros(self.data.shape[0], capacity, self.data.shape[2])
            id_buffer = self.ids.new_full((self.ids.shape[0], capacity), -1)
            data_buffer[:, : self.data.shape[1]], id_buffer[:, : self.ids.shape[1]] = self.data, self.ids
            self.data, self.ids = data_buffer, id_buffer
        self.data[head, size : size + count] = data
        self.ids[head, size : size + count] = ids
        self.sizes[head] = size + count
        if self.lists is not None and count:
            self.lists[head].add_with_ids(data.contiguous().numpy(), ids.contiguous().numpy())

    def refresh(self) -> None:
        """Give the heads lists of their own once they all hold more than `_EXACT_OUTLIERS` (anew when the smallest
        doubled since the last placement); drop them below."""
        smallest = min(self.sizes)
        if self.faiss is None or smallest <= _EXACT_OUTLIERS:
            self.lists, self.listed = None, 0
            return
        if self.lists is not None and smallest < 2 * self.listed:
            return
        faiss, dim = self.faiss, self.data.shape[2]
        self.lists = []
        for head, size in enumerate(self.sizes):
            data, ids = self.data[head, :size].contiguous().numpy(), self.ids[head, :size].contiguous().numpy()
            index = _inner_product_lists(faiss, dim, max(1, size // _OUTLIERS_PER_LIST))
            index.train(data)
            index.add_with_ids(data, ids)
            self.lists.append(index)
        self.listed = smallest

    def remove_range(self, first: int, end: int) -> None:
        for head, size in enumerate(self.sizes):
            kept = (self.ids[head, :size] < first) | (self.ids[head, :size] >= end)
            remaining = int(kept.sum())
            if remaining < size:
                self.data[head, :remaining] = self.data[head, :size][kept]
                self.ids[head, :remaining] = self.ids[head, :size][kept]
                self.ids[head, remaining:size] = -1
                self.sizes[head] = remaining
        if self.lists is not None:
            selector = self.faiss.IDSelectorRange(first, end)
            for index in self.lists:
                index.remove_ids(selector)
            if min(self.sizes) <= _EXACT_OUTLIERS:
                self.lists, self.listed = None, 0

    def search(self, queries: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Scores and ids (heads, n, k) of each head's best outliers for its queries (heads, n, d); -inf (or faiss's
        lowest float) and -1 where a head holds fewer than k. None when no head holds any."""
        width = max(self.sizes)
        if not width:
            return None
        if self.lists is not None:
            return self._search_lists(queries, topk)
        scores = torch.bmm(queries, self.data[:, :width].transpose(1, 2))
        ids = self.ids[:, None, :width]
        scores = scores.masked_fill(ids < 0, -math.inf)
        best, picked = scores.topk(min(topk, width), dim=-1)
        return best, ids.expand_as(scores).gather(-1, picked)

    def _search_lists(self, queries: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
        data = queries.contiguous().numpy()
        parallel_mode = 1 if data.shape[1] < self.faiss.omp_get_max_threads() else 0
        scores, ids = [], []
        for head, index in enumerate(self.lists):
            index.nprobe = max(1, index.nlist // _OUTLIER_PROBE_FRACTION)
            index.parallel_mode = parallel_mode
            head_scores, head_ids = index.search(data[head], topk)
            scores.append(torch.from_numpy(head_scores))
            ids.append(torch.from_numpy(head_ids))
        return torch.stack(scores), torch.stack(ids)

    def clone(self) -> _Outliers:
        copy = object.__new__(_Outliers)
        copy.data, copy.ids, copy.sizes = self.data.clone(), self.ids.clone(), list(self.sizes)
        copy.faiss, copy.listed = self.faiss, self.listed
        copy.lists = None if self.lists is None else [self.faiss.clone_index(index) for index in self.lists]
        return copy


class _RowIndex:
    """The index of one row's heads: per head, faiss IVF lists (inner product) over most entries; the entries least
    like their list's centroid (below the head's `threshold`, the `_OUTLIER_SHARE` quantile at the build) in
    `_Outliers`, which every search scores exactly. Ids are the callers' (`_SearchIndex`: `first_id + position`).

    `head_data(h)` gives head `h`'s entries (n, d) as a float32 numpy array: one head's at a time (a float32 store's
    slice is passed to faiss without a copy)."""

    def __init__(self, faiss, heads: int, head_data, ids, lists: int, probes: int):
        self.faiss, self.probes = faiss, probes
        self.lists, self.thresholds, self.outliers = [], [], None
        for head in range(heads):
            data = head_data(head)
            dim = data.shape[1]
            if self.outliers is None:
                self.outliers = _Outliers(heads, dim, faiss)
            index = _inner_product_lists(faiss, dim, lists, _LIST_CODES)
            index.cp.max_points_per_centroid = max(1, min(_TRAINING_POINTS_PER_LIST, _MAX_TRAINING_POINTS // lists))
            index.train(data)
            self.lists.append(index)
            similarity, assigned = index.quantizer.search(data, 1)
            similarity = torch.from_numpy(similarity[:, 0])
            outlying = int(_OUTLIER_SHARE * len(similarity))
            # with one list every search scans every entry: nothing to score apart
            threshold = float(similarity.kthvalue(outlying).values) if lists > 1 and outlying else -math.inf
            self.thresholds.append(threshold)
            self._add_assigned(head, data, ids, similarity, assigned[:, 0])
        self.outliers.refresh()

    def add(self, data, ids) -> None:
        """Add entries `data` (heads, n, d) (float32 numpy) under `ids` (n,)."""
        for head, index in enumerate(self.lists):
            similarity, assigned = index.quantizer.search(data[head], 1)
            self._add_assigned(head, data[head], ids, torch.from_numpy(similarity[:, 0]), assigned[:, 0])
        self.outliers.refresh()

    def _add_assigned(self, head: int, data, ids, similarity: torch.Tensor, assigned) -> None:
        """Add head `head`'s entries (numpy `data` (n, d), `ids` (n,)) whose nearest lists are `assigned`: those
        at most `threshold` like their list's centroid to the exact side, the others to their list."""
        outlying = similarity <= self.thresholds[head]
        data, ids, assigned = torch.from_numpy(data), torch.from_numpy(ids), torch.from_numpy(assigned)
        if bool(outlying.any()):
            self.outliers.add(head, data[outlying], ids[outlying])
            kept = ~outlying
            data, ids, assigned = data[kept].contiguous(), ids[kept].contiguous(), assigned[kept].contiguous()
        if len(ids):  # the lists each entry was just found nearest to: no second assignment
            swig = self.faiss.swig_ptr
            self.lists[head].add_core(len(ids), swig(data.numpy()), swig(ids.numpy()), swig(assigned.numpy()))

    def remove_range(self, first: int, end: int) -> None:
        """Remove the entries with ids in [first, end)."""
        selector = self.faiss.IDSelectorRange(first, end)
        for index in self.lists:
            index.remove_ids(selector)
        self.outliers.remove_range(first, end)

    def search(self, queries, topk: int) -> torch.Tensor:
        """Ids (heads, n, topk) of the best entries for each head's queries (heads, n, d) (float32 numpy), -1
        where fewer were found."""
        # One query (generation) is searched over its lists by all threads; several, a query per thread.
        parallel_mode = 1 if len(queries[0]) < self.faiss.omp_get_max_threads() else 0
        scores, ids = [], []
        for head, index in enumerate(self.lists):
            index.nprobe = min(self.probes, index.nlist)  # `probes` may change after the build
            index.parallel_mode = parallel_mode
            head_scores, head_ids = index.search(queries[head], topk)
            scores.append(torch.from_numpy(head_scores))
            ids.append(torch.from_numpy(head_ids))
        scores, ids = torch.stack(scores), torch.stack(ids)
        outlying = self.outliers.search(torch.from_numpy(queries), topk)
        if outlying is None:
            return ids
        scores, ids = torch.cat([scores, outlying[0]], -1), torch.cat([ids, outlying[1]], -1)
        return ids.gather(-1, scores.topk(topk, dim=-1).indices)

    def clone(self) -> _RowIndex:
        copy = object.__new__(_RowIndex)
        copy.faiss, copy.probes, copy.thresholds = self.faiss, self.probes, list(self.thresholds)
        copy.lists = [self.faiss.clone_index(index) for index in self.lists]  # each owns its quantizer's copy
        copy.outliers = self.outliers.clone()
        return copy


class _SearchIndex:
    """faiss IVF indexes (inner product on the unit keys) over one `kv` memory state, one per (row, head).

    Entry `p` of row `r` has the id `first_id[r] + p`; a write appends ids and evicts the smallest ones, so
    the index follows the state without being rebuilt. The state it indexes holds it (`LayerState.index`); it
    is bound to that state's keys tensor (`matches`) and holds it, so that the storage cannot be freed and
    reused by another state while the index could still be taken for it.
    """

    def __init__(self, faiss, keys: torch.Tensor, counts: list[int], probes: int, capacity: int):
        self.faiss = faiss
        self.probes = probes
        self.capacity = capacity
        self.heads = keys.shape[1]
        self.first_id = [0] * len(counts)
        self.counts = list(counts)
        self.built_lists = [0] * len(counts)
        self.built_counts = [0] * len(counts)
        self.written_since_build = [0] * len(counts)
        self.indexes: list[_RowIndex | None] = [None] * len(counts)
        # Rows whose faiss indexes another row or another `_SearchIndex` also holds (`rows_of`): a write
        # copies them first.
        self.shared = [False] * len(counts)
        self._bind(keys)
        for row in range(len(counts)):
            self._build_row(row, keys)

    def rows_of(self, rows: list[int], keys: torch.Tensor, valid: torch.Tensor) -> _SearchIndex:
        """The index of the state made of this state's rows `rows` (in that order), `keys` and `valid`.

        A row taken more than once shares its faiss indexes with its copies until a write changes one of
        them (`_own_row`), so a reorder copies nothing."""
        derived = object.__new__(_SearchIndex)
        derived.faiss, derived.probes, derived.capacity, derived.heads = (
            self.faiss,
            self.probes,
            self.capacity,
            self.heads,
        )
        for name in ("first_id", "counts", "built_lists", "built_counts", "written_since_build", "indexes"):
            setattr(derived, name, [getattr(self, name)[row] for row in rows])
        for row in rows:
            self.shared[row] = True
        derived.shared = [True] * len(rows)
        derived._bind(keys)
        derived.remember_valid(valid)
        return derived

    def _own_row(self, row: int) -> None:
        """Give row `row` faiss indexes of its own before a write changes them (see `rows_of`)."""
        if self.shared[row]:
            self.indexes[row] = self.indexes[row].clone()
            self.shared[row] = False

    def _bind(self, keys: torch.Tensor) -> None:
        self.keys = keys
        self.fingerprint = _fingerprint(keys)
        self.valid_fingerprint = None

    def retire(self) -> None:
        """Match no state any more (a write it could not follow left it part-way)."""
        self.keys, self.fingerprint, self.valid_fingerprint = None, None, None

    def matches(self, keys: torch.Tensor, counts: list[int]) -> bool:
        """True when this index was built for `keys` (the same tensor, a detached alias of it, unchanged)."""
        return _fingerprint(keys) == self.fingerprint and counts == self.counts

    def fits(self, keys: torch.Tensor, valid: torch.Tensor) -> bool:
        """`matches` for a state's keys and validity mask; the same tensors as last time are recognised
        without counting the mask again (an O(entries) pass per read, ~1 ms per token at 1M entries)."""
        if self.valid_fingerprint is not None and self.valid_fingerprint == _mask_fingerprint(valid):
            return _fingerprint(keys) == self.fingerprint
        if not self.matches(keys, valid_counts(valid) or []):
            return False
        self.remember_valid(valid)
        return True

    def remember_valid(self, valid: torch.Tensor) -> None:
        """Record `valid` as the mask of the state this index follows (its counts must be `self.counts`)."""
        self.valid_fingerprint = _mask_fingerprint(valid)

    def _build_row(self, row: int, keys: torch.Tensor) -> None:
        faiss, count = self.faiss, self.counts[row]
        faiss.omp_set_num_threads(torch.get_num_threads())  # as many threads as torch is told to use
        lists = self._lists_for(count)
        ids = torch.arange(self.first_id[row], self.first_id[row] + count, dtype=torch.int64).numpy()
        self.indexes[row] = _RowIndex(
            faiss, self.heads, lambda head: _as_float32_numpy(keys[row, head, :count]), ids, lists, self.probes
        )
        self.built_lists[row] = lists
        self.built_counts[row] = count
        self.written_since_build[row] = 0
        self.shared[row] = False

    def _lists_for(self, count: int) -> int:
        return max(1, min(_MAX_LISTS, min(self.capacity, _LOOKAHEAD * count) // _ENTRIES_PER_LIST))

    def refresh(self, keys: torch.Tensor) -> None:
        """Re-cluster the rows written to as many times as they held entries when their lists were placed."""
        for row, count in enumerate(self.counts):
            if count <= _RECLUSTER_UNTIL and self.written_since_build[row] >= self.built_counts[row]:
                self._build_row(row, keys)

    def advance(self, new_keys: torch.Tensor, added: list[int], new_counts: list[int]) -> bool:
        """Follow a write: row `r` appended its newest `added[r]` entries (the last ones of `new_keys`'s
        valid prefix) and evicted its oldest. Returns False (index unusable) when it cannot follow."""
        self.faiss.omp_set_num_threads(torch.get_num_threads())
        if any(new > new_count for new, new_count in zip(added, new_counts, strict=True)):
            return False  # one write replaced everything
        for row, (count, new, new_count) in enumerate(zip(self.counts, added, new_counts, strict=True)):
            evicted = count + new - new_count
            self.written_since_build[row] += new
            if new or evicted:
                self._own_row(row)
            if new:
                data = _as_float32_numpy(new_keys[row, :, new_count - new : new_count])
                start = self.first_id[row] + count
                ids = torch.arange(start, start + new, dtype=torch.int64).numpy()
                self.indexes[row].add(data, ids)
            if evicted:
                self.indexes[row].remove_range(self.first_id[row], self.first_id[row] + evicted)
                self.first_id[row] += evicted
        self.counts = list(new_counts)
        self._bind(new_keys)
        return True

    def search(self, queries: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Entry positions (B, H, T, k) of the approximate top-k of each query, and which are real picks."""
        self.faiss.omp_set_num_threads(torch.get_num_threads())
        batch, heads, tokens, _ = queries.shape
        wanted = candidates_for(topk)
        found = torch.empty(batch, heads, tokens, wanted, dtype=torch.int64)
        data = _as_float32_numpy(queries)
        for row, index in enumerate(self.indexes):
            index.probes = self.probes  # the reading block's setting as it is now
            found[row] = index.search(data[row], wanted) - self.first_id[row]
        # faiss pads with -1 (below first_id) when the probed lists hold fewer than k entries
        counts = torch.tensor(self.counts, dtype=torch.int64).view(batch, 1, 1, 1)
        selected_valid = (found >= 0) & (found < counts)
        found, selected_valid = found.clamp(min=0).to(queries.device), selected_valid.to(queries.device)
        return rescore(self.keys, queries, found, selected_valid, topk)


# A write appending at most this many entries per row since the index was last moved leaves that index as it is and
# gives the new state an `_AppendedIndex` over it: a question and its reply written after a remembered document
# (a generation's window, when it fills) then leave the document's own state with its index, to be asked again
# without a rebuild (k-means over every entry: tens of seconds at a million). Searching the appended entries costs them.
_APPENDED_EXACTLY = 4096


class _AppendedIndex:
    """The index of a state made by appending entries to an indexed state, with no eviction: the older state's
    index (`base`, left unchanged, still that state's) for the entries it holds, and the appended entries scored
    exactly. Built anew for each write (`over`), so every older state keeps an index that fits it. Once more than
    `_APPENDED_EXACTLY` entries per row are appended, the write moves `base` itself instead (`KVMemory` asks
    `holds`); older states holding an `_AppendedIndex` over it then no longer fit (`fits`) and read through an index
    of their own."""

    def __init__(self, base: _SearchIndex, base_counts: list[int], keys: torch.Tensor, valid: torch.Tensor, counts):
        self.base, self.base_counts, self.counts = base, base_counts, list(counts)
        self.keys, self.fingerprint, self.valid_fingerprint = keys, _fingerprint(keys), _mask_fingerprint(valid)

    @staticmethod
    def over(index, keys: torch.Tensor, valid: torch.Tensor, new_counts: list[int], evicted: list[int]):
        """The index of the state (`keys`, `valid`, `new_counts`) a write made from the state `index` fits, or None
        where the appended entries are too many or the write evicted entries (the write then moves the index)."""
        base = index.base if isinstance(index, _AppendedIndex) else index
        base_counts = index.base_counts if isinstance(index, _AppendedIndex) else list(index.counts)
        appended = [new - old for new, old in zip(new_counts, base_counts, strict=True)]
        if any(evicted) or max(appended) > _APPENDED_EXACTLY or min(appended) < 0:
            return None
        return _AppendedIndex(base, base_counts, keys, valid, new_counts)

    @property
    def probes(self) -> int:
        return self.base.probes

    @probes.setter
    def probes(self, value: int) -> None:
        self.base.probes = value

    def fits(self, keys: torch.Tensor, valid: torch.Tensor) -> bool:
        if self.base.counts != self.base_counts:
            return False  # `base` was moved on by a later write of the state it came from
        return _fingerprint(keys) == self.fingerprint and _mask_fingerprint(valid) == self.valid_fingerprint

    def search(self, queries: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`base`'s picks and every appended entry, the best `topk` of them by exact score."""
        picks, picked = self.base.search(queries, topk)
        batch, heads, tokens, _ = queries.shape
        first, width = min(self.base_counts), max(self.counts) - min(self.base_counts)
        appended = torch.arange(first, first + width, device=queries.device).expand(batch, heads, tokens, width)
        start = torch.tensor(self.base_counts, device=queries.device).view(batch, 1, 1, 1)
        end = torch.tensor(self.counts, device=queries.device).view(batch, 1, 1, 1)
        candidates = torch.cat([picks, appended], -1)
        real = torch.cat([picked, (appended >= start) & (appended < end)], -1)
        return rescore(self.keys, queries, candidates, real, topk)

    def settle(self, keys: torch.Tensor, valid: torch.Tensor) -> _SearchIndex | None:
        """Move `base` over the appended entries (the state of `keys` and `valid`, which this index fits, may then
        hold `base` itself); None where it cannot follow."""
        added = [count - base for count, base in zip(self.counts, self.base_counts, strict=True)]
        if not self.base.advance(keys, added, self.counts):
            return None
        self.base.remember_valid(valid)
        self.base.refresh(keys)
        return self.base

    def rows_of(self, rows: list[int], keys: torch.Tensor, valid: torch.Tensor) -> _AppendedIndex:
        base = self.base.rows_of(rows, keys, valid)
        return _AppendedIndex(base, list(base.counts), keys, valid, [self.counts[row] for row in rows])

    def remember_valid(self, valid: torch.Tensor) -> None:
        self.valid_fingerprint = _mask_fingerprint(valid)

    def retire(self) -> None:
        self.fingerprint = self.valid_fingerprint = None
