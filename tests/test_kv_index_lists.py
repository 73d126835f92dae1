"""The `kv` index's lists for one row (`_RowIndex`): the entries unlike every list scored exactly, the keys held as
8-bit codes, and every list searched giving the exact top-k once the candidates are re-scored."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

import hf_memlm.memory_kv_index as kv_index


@pytest.mark.parametrize("outlier_share", [0.0, kv_index._OUTLIER_SHARE])
def test_an_entry_unlike_every_list_is_found_by_the_query_it_matches(monkeypatch, outlier_share):
    # A trained read's query can match one entry far from every centroid (the real-model pass key's digits) while
    # ranking that entry's list low: the entries least like their list are scored exactly by every search.
    faiss = pytest.importorskip("faiss")
    monkeypatch.setattr(kv_index, "_OUTLIER_SHARE", outlier_share)
    generator = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(64, 32, generator=generator), dim=-1)
    keys = F.normalize(centres.repeat(64, 1) + 0.05 * torch.randn(4096, 32, generator=generator), dim=-1)
    odd = F.normalize(torch.randn(32, generator=generator), dim=-1)
    keys[1234] = odd
    query = F.normalize(odd + 0.8 * F.normalize(centres[0] - (centres[0] @ odd) * odd, dim=-1), dim=-1)
    assert int((keys @ query).argmax()) == 1234  # the exact read's best entry
    ids = torch.arange(4096, dtype=torch.int64).numpy()
    index = kv_index._RowIndex(faiss, 1, lambda head: keys.numpy(), ids, lists=64, probes=1)
    found = int(index.search(query[None, None].numpy(), 1)[0, 0, 0])
    assert (found == 1234) == (outlier_share > 0)
    index.remove_range(1234, 1235)  # and an evicted outlier is gone from the exact side too
    assert 1234 not in index.search(query[None, None].numpy(), 4)[0, 0].tolist()


def test_an_index_holds_its_keys_in_a_quarter_of_float32s_bytes():
    # The lists hold 8-bit codes (a quarter of float32: 16 MiB here; with the build's leftovers about 33 MiB, where
    # float32 lists held about 95): at a million entries a float32 copy of the keys beside the state's own was 2.4 GB.
    faiss = pytest.importorskip("faiss")
    psutil = pytest.importorskip("psutil")
    entries, dim = 1 << 17, 128
    generator = torch.Generator().manual_seed(2)
    keys = F.normalize(torch.randn(entries, dim, generator=generator), dim=-1).numpy()
    ids = torch.arange(entries, dtype=torch.int64).numpy()
    gc.collect()
    before = psutil.Process().memory_info().rss
    index = kv_index._RowIndex(faiss, 1, lambda head: keys, ids, lists=256, probes=8)
    held = psutil.Process().memory_info().rss - before
    float32_bytes = keys.nbytes
    assert held < 0.75 * float32_bytes, f"the index holds {held / 2**20:.0f} MiB for {float32_bytes / 2**20:.0f} MiB"
    assert index.search(keys[None, :4], 1)[0, :, 0].tolist() == [0, 1, 2, 3]  # and finds each entry itself


def test_a_row_index_with_every_list_searched_is_the_exact_top_k_through_adds_removals_and_copies(monkeypatch):
    # The outlying entries of all heads are scored in one batched product over a padded buffer: heads holding
    # different numbers of them, entries evicted from the middle of that buffer's order, and a copy written apart
    # from its source must each still give every head its own exact top-k.
    faiss = pytest.importorskip("faiss")
    monkeypatch.setattr(kv_index, "_OUTLIER_SHARE", 0.05)
    generator = torch.Generator().manual_seed(1)
    heads, dim = 3, 16

    def entries(count: int, spread: float) -> torch.Tensor:
        centres = F.normalize(torch.randn(heads, 8, dim, generator=generator), dim=-1)
        picked = centres[:, torch.randint(0, 8, (count,), generator=generator)]
        return F.normalize(picked + spread * torch.randn(heads, count, dim, generator=generator), dim=-1)

    keys = entries(1024, torch.tensor([0.05, 0.3, 1.0]).view(heads, 1, 1))
    index = kv_index._RowIndex(faiss, heads, lambda head: keys[head].numpy(), torch.arange(1024).numpy(), 16, 16)
    more = entries(512, 0.5)  # further from the first entries' lists than the tightest head's outliers were
    index.add(more.contiguous().numpy(), torch.arange(1024, 1536).numpy())
    assert len(set(index.outliers.sizes)) == heads
    keys = torch.cat([keys, more], 1)
    index.remove_range(0, 300)
    copy = index.clone()
    copy.remove_range(300, 700)  # the copy only
    queries = entries(20, 0.4)

    def exact(first: int) -> torch.Tensor:
        scores = queries @ keys[:, first:].transpose(1, 2)
        return scores.topk(5, dim=-1).indices + first

    def searched(row_index) -> torch.Tensor:  # its candidates (8-bit codes) re-scored from the keys, as reads do
        candidates = row_index.search(queries.numpy(), 20)[None]
        return kv_index.rescore(keys[None], queries[None], candidates.clamp(min=0), candidates >= 0, 5)[0][0]

    assert torch.equal(searched(index), exact(300))
    assert torch.equal(searched(copy), exact(700))
