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


@pytest.mark.parametrize("outlier_lists", [False, True])
def test_a_row_index_with_every_list_searched_is_the_exact_top_k_through_adds_removals_and_copies(
    monkeypatch, outlier_lists
):
    # The outlying entries of all heads are scored in one batched product over a padded buffer, or once they are
    # many, searched in lists of their own: heads holding different numbers of them, entries evicted from the middle
    # of that buffer's order, and a copy written apart from its source must each still give every head its own
    # exact top-k.
    faiss = pytest.importorskip("faiss")
    monkeypatch.setattr(kv_index, "_OUTLIER_SHARE", 0.05)
    if outlier_lists:  # lists of 8 from 40 outliers on, every one searched
        monkeypatch.setattr(kv_index, "_EXACT_OUTLIERS", 40)
        monkeypatch.setattr(kv_index, "_OUTLIERS_PER_LIST", 8)
        monkeypatch.setattr(kv_index, "_OUTLIER_PROBE_FRACTION", 1)
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
    assert (index.outliers.lists is not None) == outlier_lists
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

    assert min(copy.outliers.sizes) > 40  # (the copy's searches still go through its outliers' lists)
    assert torch.equal(searched(index), exact(300))
    assert torch.equal(searched(copy), exact(700))


def test_outlying_entries_get_lists_of_their_own_while_many_placed_anew_as_they_double(monkeypatch):
    # Scoring every outlying entry cost a generated token 1.1 ms at a million entries: past `_EXACT_OUTLIERS` per head
    # they are searched through IVF lists of their own, placed again once the smallest head doubles, and dropped
    # when eviction leaves few. Every list searched, the picks are those of scoring them one by one throughout.
    faiss = pytest.importorskip("faiss")
    monkeypatch.setattr(kv_index, "_OUTLIER_SHARE", 0.05)
    monkeypatch.setattr(kv_index, "_OUTLIERS_PER_LIST", 8)
    monkeypatch.setattr(kv_index, "_OUTLIER_PROBE_FRACTION", 1)
    generator = torch.Generator().manual_seed(3)
    centres = F.normalize(torch.randn(8, 16, generator=generator), dim=-1)
    near = F.normalize(centres.repeat(128, 1) + 0.05 * torch.randn(1024, 16, generator=generator), dim=-1)
    far = F.normalize(torch.randn(1, 256, 16, generator=generator), dim=-1)  # unlike every list: mostly outlying
    keys = torch.cat([near, far[0]])
    queries = F.normalize(far[0, :12] + 0.1 * torch.randn(12, 16, generator=generator), dim=-1)

    def build(exact_outliers: int):
        monkeypatch.setattr(kv_index, "_EXACT_OUTLIERS", exact_outliers)
        index = kv_index._RowIndex(faiss, 1, lambda head: near.numpy(), torch.arange(1024).numpy(), 8, 8)
        assert index.outliers.sizes == [51] and (index.outliers.listed == 51) == (exact_outliers < 51)
        index.add(far.numpy(), torch.arange(1024, 1280).numpy())
        return index

    def picks(index) -> torch.Tensor:
        candidates = index.search(queries[None].numpy(), 24)[None]
        return kv_index.rescore(keys[None, None], queries[None, None], candidates.clamp(min=0), candidates >= 0, 4)[0]

    listed, one_by_one = build(40), build(1 << 30)
    (size,) = listed.outliers.sizes
    assert size > 2 * 51 and listed.outliers.listed == size  # doubled: placed anew
    lists = listed.outliers.lists[0]
    assert lists.nlist == size // 8 and sum(lists.invlists.list_size(i) for i in range(lists.nlist)) == size
    assert one_by_one.outliers.lists is None and torch.equal(picks(listed), picks(one_by_one))
    for index in (listed, one_by_one):
        index.remove_range(0, 1200)  # 80 entries left, few of them outlying: scored one by one again
    assert listed.outliers.lists is None and listed.outliers.sizes == one_by_one.outliers.sizes
    assert torch.equal(picks(listed), picks(one_by_one))


def test_the_outlier_lists_script_times_and_counts_both_settings(monkeypatch, tmp_path):
    # scripts/outlier_lists.py: a saved model reads a text, its generated tokens' queries search one row's index built
    # with the outlying entries scored one by one, then in lists of their own
    pytest.importorskip("faiss")
    import importlib
    import json
    from pathlib import Path

    import conftest

    from hf_memlm.data import build_tokenizer
    from hf_memlm.data.bundled import default_text

    tokenizer = build_tokenizer("byte")
    torch.manual_seed(0)
    model = conftest.tiny_chat_kv_model(tokenizer, segment_length=64, memory_size=8192)
    conftest.randomize_memory(model)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "book.txt").write_text(default_text()[:20000], encoding="utf-8")
    monkeypatch.setattr(kv_index, "_OUTLIER_SHARE", 0.05)
    monkeypatch.setattr(kv_index, "_EXACT_OUTLIERS", 8)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))
    script = importlib.import_module("outlier_lists")
    argv = [str(tmp_path / "model"), "--tokens", "3000", "--text", str(tmp_path / "book.txt"), "--prompts", "2"]
    results = script.main([*argv, "--repeats", "1", "--threads", "1", "--output", str(tmp_path / "out.json")])
    assert results["queries"] == 2 * 15 and results["entries"] == 2999  # 15 reads of one new token per prompt
    one_by_one, listed = results["figures"]["one by one"], results["figures"]["in lists of their own"]
    assert one_by_one["outlier_lists_per_head"] is None and len(listed["outlier_lists_per_head"]) == 2
    assert one_by_one["outliers_per_head"] == listed["outliers_per_head"] and min(listed["outliers_per_head"]) > 8
    assert all(0 < figure["recall_at_k"] <= 1 and figure["search_ms"] > 0 for figure in (one_by_one, listed))
    assert json.loads((tmp_path / "out.json").read_text())["figures"]["one by one"] == one_by_one
