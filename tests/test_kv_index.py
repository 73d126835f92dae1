"""The `kv` index (faiss): recall against the exact top-k, how it is built, follows writes and evictions and is
re-clustered, its memory at scale, remote code without faiss, and beam search over an indexed memory."""

from __future__ import annotations

import copy
import gc
import itertools
import math
import os
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    KV_HIDDEN,
    base_config,
    clustered_hidden,
    kv_block,
    run_in_threads,
    selection_recall,
    write_segments,
)

import hf_memlm
import hf_memlm.memory_kv_index as kv_index
from hf_memlm import MemLMConfig, MemLMForCausalLM
from hf_memlm.data import default_text


def _recall_against_exact(block, state, queries) -> float:
    exact = kv_block(memory_search="exact", memory_size=block.capacity)
    exact.load_state_dict(block.state_dict())
    assert block.uses_index(state) and not exact.uses_index(state)
    selected, selected_valid = block.select_entries(queries, state)
    reference, _ = exact.select_entries(queries, state)
    return selection_recall(selected, selected_valid, reference)


def test_approximate_selection_recalls_the_exact_top_k_on_clustered_keys():
    pytest.importorskip("faiss")
    block = kv_block(memory_search_threshold=1024)
    generator = torch.Generator().manual_seed(3)
    state = write_segments(block, clustered_hidden(generator, 2, 6144))
    assert _recall_against_exact(block, state, clustered_hidden(generator, 2, 64)) >= 0.95


def test_approximate_selection_recalls_the_exact_top_k_on_model_keys_of_text():
    pytest.importorskip("faiss")
    torch.manual_seed(0)
    config = MemLMConfig(
        text_config=base_config("llama"), memory_type="kv", memory_layers=[0], segment_length=64, memory_heads=2
    )
    model = MemLMForCausalLM(config).eval()
    data = torch.tensor(list(default_text().encode("utf-8")[:6400]), dtype=torch.long) % 97
    with torch.no_grad():  # the hidden states the memory block sees: layer 0's output
        hidden = model.language_model(input_ids=data.view(100, 64), output_hidden_states=True).hidden_states[1]
    hidden = hidden.reshape(1, 6400, KV_HIDDEN)
    block = kv_block(memory_search_threshold=1024)
    block.load_state_dict(model.memory_blocks["0"].state_dict())
    state = write_segments(block, hidden[:, :6144])
    assert _recall_against_exact(block, state, hidden[:, 6144:]) >= 0.95


def test_approximate_selection_recalls_the_exact_top_k_on_keys_of_a_trained_model():
    # Training sharpens keys (the read learns to single out matching contexts), which makes them cluster
    # more tightly than a random model's: the index must keep its recall on those too.
    pytest.importorskip("faiss")
    torch.manual_seed(0)
    config = MemLMConfig(
        text_config=base_config("llama"), memory_type="kv", memory_layers=[0], segment_length=64, memory_heads=2
    )
    model = MemLMForCausalLM(config)
    data = torch.tensor(list(default_text().encode("utf-8")[:40960]), dtype=torch.long) % 97
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(24):  # 4 rows of 4 segments per step
        batch = data[step * 1024 : (step + 1) * 1024].view(4, 256)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-4:]) < sum(losses[:4])  # it learned something
    model.eval()
    with torch.no_grad():  # the hidden states the memory block sees: layer 0's output
        text = data[-6400:].view(100, 64)
        hidden = model.language_model(input_ids=text, output_hidden_states=True).hidden_states[1]
    hidden = hidden.reshape(1, 6400, KV_HIDDEN)
    block = kv_block(memory_search_threshold=1024)
    block.load_state_dict(model.memory_blocks["0"].state_dict())
    state = write_segments(block, hidden[:, :6144])
    assert _recall_against_exact(block, state, hidden[:, 6144:]) >= 0.95


def test_reads_notice_a_validity_mask_edited_in_place():
    pytest.importorskip("faiss")
    block = kv_block(memory_search_threshold=512)
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        state = write_segments(block, clustered_hidden(generator, 1, 2048))
        queries = clustered_hidden(generator, 1, 16)
        assert block.uses_index(state)
        state["valid"][:, :1024] = False  # the first half masked out after the index was built
        picks, picks_valid = block.select_entries(queries, state)
    assert picks_valid.all() and (picks >= 1024).all()


def test_index_is_built_while_writing_without_gradients_and_read_without_rebuilding(monkeypatch):
    pytest.importorskip("faiss")
    block = kv_block(memory_search_threshold=512, memory_size=8192)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # as `memorize` writes: no read between the writes
        state = write_segments(block, clustered_hidden(generator, 2, 4096))
        queries = clustered_hidden(generator, 2, 64)

        def no_build(*args, **kwargs):
            raise AssertionError("the index was built again by a read")

        monkeypatch.setattr(kv_index._SearchIndex, "_build_row", no_build)
        assert block.uses_index(state)
        recall = _recall_against_exact(block, state, queries)
    assert recall >= 0.95


def test_index_follows_writes_and_evictions():
    pytest.importorskip("faiss")
    block = kv_block(memory_search_threshold=512, memory_size=2048)
    generator = torch.Generator().manual_seed(4)
    state = None
    with torch.no_grad():
        for _ in range(12):  # 3072 entries written into 2048: the oldest third evicted
            state = write_segments(block, clustered_hidden(generator, 2, 256), state=state)
            block(clustered_hidden(generator, 2, 4), state, mode="read")  # reads keep the index in use
    assert state["keys"].shape[2] == 2048
    assert _recall_against_exact(block, state, clustered_hidden(generator, 2, 64)) >= 0.95


def _record_builds(monkeypatch) -> list[tuple[int, int]]:
    """A list that each (re)build of an index row appends to: (entries in the row, lists built)."""
    builds = []
    build_row = kv_index._SearchIndex._build_row

    def counted(index, row, keys):
        build_row(index, row, keys)
        builds.append((index.counts[row], index.built_lists[row]))

    monkeypatch.setattr(kv_index._SearchIndex, "_build_row", counted)
    return builds


def test_index_is_re_clustered_as_the_row_doubles_and_once_a_full_memory_is_replaced(monkeypatch):
    # Keys drift along a stream: lists placed on old entries would crowd new ones into a few lists. So the
    # lists are placed again each time as many entries were written as the row held at the last build.
    pytest.importorskip("faiss")
    builds = _record_builds(monkeypatch)
    monkeypatch.setattr(kv_index, "_APPENDED_EXACTLY", 0)  # every write moves the index (no entries read apart)
    block = kv_block(memory_search_threshold=512, memory_size=2048)
    generator = torch.Generator().manual_seed(10)
    state = None
    with torch.no_grad():
        for _ in range(24):  # 6,144 entries through a memory of 2,048
            state = write_segments(block, clustered_hidden(generator, 1, 256), state=state)
    # built past 512 entries (at 767), again once 767 more were written (1,535), once 1,535 more were (the
    # memory full by then), and once all 2,048 of those were replaced
    assert [count for count, _ in builds] == [767, 1535, 2048, 2048], builds
    assert block.uses_index(state)


def test_approximate_read_is_the_exact_read_over_its_picks_and_differentiable():
    pytest.importorskip("faiss")
    block = kv_block(memory_search_threshold=256, memory_topk=8)
    generator = torch.Generator().manual_seed(5)
    state = write_segments(block, clustered_hidden(generator, 1, 1024, noise=0.05))
    keys = state["keys"].clone().requires_grad_()
    values = state["values"].clone().requires_grad_()
    leaf_state = dict(state, keys=keys, values=values)
    queries = clustered_hidden(generator, 1, 16, noise=0.05)
    picks, picks_valid = block.select_entries(queries, state)
    read = block(queries, leaf_state, mode="read")  # the index built for `state` serves its alias too
    assert block.uses_index(leaf_state)
    # the same attention written out over the picked entries
    q = F.normalize(block.mem_query(queries).view(1, 16, 2, 16).transpose(1, 2), dim=-1)
    scale = block.log_scale.exp().view(1, 2, 1, 1)
    picked_keys = keys[0][torch.arange(2)[:, None, None], picks[0]]  # (H, T, k, d)
    picked_values = values[0][torch.arange(2)[:, None, None], picks[0]]
    scores = (picked_keys @ (q[0] * scale[0]).unsqueeze(-1)).squeeze(-1).masked_fill(~picks_valid[0], -math.inf)
    expected = (torch.softmax(scores, -1).unsqueeze(-1) * picked_values).sum(-2)
    expected = block.mem_out(expected.unsqueeze(0).transpose(1, 2).reshape(1, 16, 32))
    torch.testing.assert_close(read, expected)
    grad_keys, grad_values = torch.autograd.grad(read.square().sum(), (keys, values))
    assert grad_keys.abs().sum() > 0 and grad_values.abs().sum() > 0
    picked = torch.zeros(2, keys.shape[2], dtype=torch.bool)
    picked[torch.arange(2)[:, None, None], picks[0]] = True
    assert torch.equal(grad_values[0].abs().sum(-1) > 0, picked)  # gradients reach exactly the picks


@pytest.mark.slow  # a fresh interpreter importing transformers: ~10 s on a quiet 2-core machine
def test_remote_code_loads_and_reads_without_faiss(tmp_path):
    # The Hub payload must work where neither hf_memlm nor faiss is installed (exact search + warning).
    torch.manual_seed(0)
    config = MemLMConfig(
        text_config=base_config("llama"),
        memory_type="kv",
        memory_layers=[0],
        segment_length=16,
        memory_heads=2,
        memory_search_threshold=32,
    )
    model = MemLMForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    script = textwrap.dedent(
        f"""
        import sys, warnings
        sys.modules["hf_memlm"] = None
        sys.modules["faiss"] = None
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                out = model(input_ids=torch.randint(0, 97, (1, 16 * 5)))
        assert torch.isfinite(out.logits).all()
        assert any("faiss is not installed" in str(w.message) for w in caught), [str(w.message) for w in caught]
        print("ok")
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.slow  # 4,096 segments through a tiny model: about a minute on a quiet 2-core machine
def test_streaming_a_million_tokens_keeps_rss_bounded_by_the_capacity():
    psutil = pytest.importorskip("psutil")
    torch.manual_seed(0)
    segment, capacity = 256, 16384
    config = MemLMConfig(
        text_config=base_config("llama"),
        memory_type="kv",
        memory_layers=[0],
        segment_length=segment,
        memory_heads=2,
        memory_size=capacity,
    )
    model = MemLMForCausalLM(config).eval()
    data = torch.tensor(list(default_text().encode("utf-8")), dtype=torch.long) % 97
    process = psutil.Process()
    state, rss_when_full = None, None
    with torch.no_grad():
        for number in range(1_000_000 // segment + 1):
            start = (number * segment) % (data.numel() - segment)
            state = model(input_ids=data[start : start + segment][None], memory_state=state).memory_state
            if number == 2 * capacity // segment:  # full for a while: buffers and index at their size
                rss_when_full = process.memory_info().rss
    assert int(state.num_entries()[0]) == capacity
    stored = state.layers[0]["keys"]
    assert stored.shape[2] == capacity
    growth = process.memory_info().rss - rss_when_full
    state_size = sum(t.numel() * t.element_size() for t in state.layers[0].values())
    assert growth < max(64 * 2**20, 2 * state_size), f"RSS grew {growth / 2**20:.0f} MiB after the memory was full"


@pytest.mark.slow  # 262,144 entries per row written and indexed: ~30 s on a quiet 2-core machine
def test_index_at_a_quarter_million_entries_is_built_a_few_times_with_capped_lists(monkeypatch):
    pytest.importorskip("faiss")
    builds = _record_builds(monkeypatch)
    entries = 1 << 18
    block = kv_block(memory_size=entries)  # the default threshold (4,096 entries) and probes
    generator = torch.Generator().manual_seed(8)
    centres = F.normalize(torch.randn(1024, KV_HIDDEN, generator=generator), dim=-1) * 3
    state = None
    with torch.no_grad():
        for _ in range(entries // 4096):
            pick = torch.randint(0, 1024, (1, 4096), generator=generator)
            hidden = centres[pick] + 0.3 * torch.randn(1, 4096, KV_HIDDEN, generator=generator)
            state = write_segments(block, hidden, segment=4096, state=state)
        pick = torch.randint(0, 1024, (1, 64), generator=generator)
        queries = centres[pick] + 0.3 * torch.randn(1, 64, KV_HIDDEN, generator=generator)
        recall = _recall_against_exact(block, state, queries)
    assert int(block.count_entries(state)[0]) == entries - 1  # the last key waits for its value
    # built once past the threshold, re-clustered each time the row doubled up to `_RECLUSTER_UNTIL`, never
    # more lists than the capacity allows; none after that
    counts, lists = zip(*builds, strict=True)
    assert all(later >= 2 * earlier for earlier, later in itertools.pairwise(counts)), builds
    assert counts[-1] <= kv_index._RECLUSTER_UNTIL < 2 * counts[-1], builds
    assert list(lists) == sorted(lists) and lists[-1] == min(kv_index._MAX_LISTS, entries // kv_index._ENTRIES_PER_LIST)
    assert recall >= 0.95


def _indexed_model(search: str) -> MemLMForCausalLM:
    """A kv model whose reads past 64 entries go through the index (probing every list it has: with a few
    hundred entries that is all 8 of them, so its picks are the exact ones), or exact ones. It generates to
    `max_new_tokens` (no end-of-sequence token)."""
    torch.manual_seed(0)
    settings = dict(memory_type="kv", memory_layers=[0], segment_length=16, memory_heads=2, memory_size=1024)
    config = MemLMConfig(text_config=base_config("llama"), memory_search=search, memory_search_threshold=64, **settings)
    model = MemLMForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for param in model.memory_blocks.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    model.generation_config.eos_token_id = None
    return model


def test_beam_search_follows_the_index_through_reorders_and_window_writes(monkeypatch):
    # Beam search reorders the memory's rows at every step and writes each beam's window when it is full.
    # The index follows the rows (a row taken twice shares its lists until a write changes them) instead of
    # being built again per step; with every list probed, the result is that of exact search.
    pytest.importorskip("faiss")
    tokens = torch.randint(0, 97, (1, 400), generator=torch.Generator().manual_seed(12))
    document, prompt = tokens[:, :384], tokens[:, 384:]
    options = dict(num_beams=3, num_return_sequences=3, max_new_tokens=24, do_sample=False, pad_token_id=0)
    results = {}
    for search in ("exact", "auto"):
        model = _indexed_model(search)
        state = model.memorize(document)
        builds = _record_builds(monkeypatch)
        with torch.no_grad():  # 16 prompt tokens + 24 new ones: the beams' windows are written on the way
            out = model.generate(
                prompt, memory_state=state, return_dict_in_generate=True, output_scores=True, **options
            )
        results[search] = out
        if search == "auto":
            assert builds == [], builds  # the index built while memorizing served every step
    assert torch.equal(results["auto"].sequences, results["exact"].sequences)
    torch.testing.assert_close(results["auto"].sequences_scores, results["exact"].sequences_scores)


def test_a_memorized_document_keeps_its_index_for_the_next_beam_search(monkeypatch):
    # Memorize once, ask several questions with beams: the beams' reordered states get indexes of their own
    # (sharing the document's lists) and the document's index stays for the next question.
    pytest.importorskip("faiss")
    model = _indexed_model("auto")
    tokens = torch.randint(0, 97, (1, 420), generator=torch.Generator().manual_seed(16))
    state = model.memorize(tokens[:, :384])
    builds = _record_builds(monkeypatch)
    # 16-token prompts and 24 new tokens: each beam writes its window to its rows on the way, which must not
    # reach the document's lists that the beams' rows share
    options = dict(num_beams=2, max_new_tokens=24, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        first = model.generate(tokens[:, 384:400], memory_state=state, **options)
        second = model.generate(tokens[:, 400:416], memory_state=state, **options)
        again = model.generate(tokens[:, 384:400], memory_state=state, **options)
    assert builds == [], builds
    assert torch.equal(again, first) and second.shape == first.shape


def test_beam_searches_in_threads_over_one_indexed_document_equal_serial_ones():
    # Threads asking about one memorized document with beams derive indexes from the document's and write
    # their windows into lists they share with it: each thread must get what it gets alone.
    pytest.importorskip("faiss")
    model = _indexed_model("auto")
    tokens = torch.randint(0, 97, (1, 384 + 4 * 16), generator=torch.Generator().manual_seed(17))
    state = model.memorize(tokens[:, :384])
    prompts = [tokens[:, 384 + 16 * t : 400 + 16 * t] for t in range(4)]
    options = dict(num_beams=2, max_new_tokens=24, do_sample=False, pad_token_id=0, memory_state=state)
    with torch.no_grad():
        serial = [model.generate(prompt, **options) for prompt in prompts]
        results = run_in_threads(lambda thread: model.generate(prompts[thread], **options), len(prompts))
    for thread, expected in enumerate(serial):
        assert torch.equal(results[thread], expected), f"thread {thread}"


def test_rows_taken_twice_share_the_index_until_one_is_written():
    pytest.importorskip("faiss")
    model = _indexed_model("auto")
    block = model.memory_blocks["0"]
    tokens = torch.randint(0, 97, (1, 400), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        state = model.memorize(tokens[:, :384]).select([0, 0])
        queries = torch.randn(2, 8, KV_HIDDEN, generator=torch.Generator().manual_seed(14))
        before, _ = block.select_entries(queries, state.layers[0])
        # only the second row gets new entries (the first one's tokens are all padding)
        mask = torch.tensor([[0] * 16, [1] * 16])
        written = model(input_ids=tokens[:, 384:].repeat(2, 1), attention_mask=mask, memory_state=state).memory_state
        assert block.uses_index(written.layers[0])
        after, after_valid = block.select_entries(queries, written.layers[0])
    assert int(written.num_entries()[0]) == 383 and int(written.num_entries()[1]) == 399
    # the first row's lists did not change (its picks come back ordered by their exact scores)
    assert torch.equal(after[0].sort(-1).values, before[0].sort(-1).values) and after_valid[0].all()
    assert (after[1] >= 383).any()  # the second row finds its new entries


def _same_picks(block, exact, queries, state) -> bool:
    """Whether `block` (through its index, every list probed) picks the entries exact search picks."""
    picks, _ = block.select_entries(queries, state)
    return torch.equal(picks.sort(-1).values, exact.select_entries(queries, state)[0].sort(-1).values)


def test_each_state_owns_its_index_and_drops_it_with_itself(monkeypatch, tmp_path):
    # Three remembered documents on one model: each keeps an index of its own (none evicts another), which
    # goes along with its tensors (detach), is derived for its rows (select), is not saved or copied, stays its own
    # when a short write appends beside it, and is freed with the state.
    pytest.importorskip("faiss")
    model = _indexed_model("auto")
    block = model.memory_blocks["0"]
    tokens = torch.randint(0, 97, (3, 400), generator=torch.Generator().manual_seed(18))
    queries = torch.randn(1, 8, KV_HIDDEN, generator=torch.Generator().manual_seed(19))
    exact = _indexed_model("exact").memory_blocks["0"]
    with torch.no_grad():
        documents = [model.memorize(tokens[row : row + 1, :384]) for row in range(3)]
        builds = _record_builds(monkeypatch)
        for document in documents:  # each reads through the index built while it was memorized
            assert _same_picks(block, exact, queries, document.layers[0])
        assert builds == []
        indexes = [document.layers[0].index for document in documents]
        assert all(index is not None for index in indexes) and len({id(index) for index in indexes}) == 3
        assert documents[0].detach().layers[0].index is indexes[0]
        assert documents[0].select([0, 0]).layers[0].index not in (None, indexes[0])
        documents[0].save(tmp_path / "memory.safetensors")
        assert hf_memlm.MemoryState.load(tmp_path / "memory.safetensors").layers[0].index is None
        assert copy.deepcopy(documents[0]).layers[0].index is None
        written = model(input_ids=tokens[:1, 384:], memory_state=documents[0]).memory_state
        # a short write appends beside the document's index (`_AppendedIndex`), which stays the document's
        assert written.layers[0].index.base is indexes[0] and documents[0].layers[0].index is indexes[0]
        assert _same_picks(block, exact, queries, written.layers[0]) and builds == []
        # the document's entries did not change: read again, it finds them, not the written ones, with no build
        assert _same_picks(block, exact, queries, documents[0].layers[0]) and builds == []
    freed = weakref.ref(indexes[2])
    del documents, indexes, document  # (the loop above leaves the last document in `document`)
    gc.collect()
    assert freed() is None


def test_threads_with_states_of_their_own_read_what_they_read_alone():
    pytest.importorskip("faiss")
    model = _indexed_model("auto")
    block = model.memory_blocks["0"]
    tokens = torch.randint(0, 97, (4, 432), generator=torch.Generator().manual_seed(21))
    queries = torch.randn(1, 8, KV_HIDDEN, generator=torch.Generator().manual_seed(22))

    def task(thread):
        row = tokens[thread : thread + 1]
        with torch.no_grad():
            state = model.memorize(row[:, :384])
            picks = []
            for start in range(384, 432, 16):  # read, then write a segment, three times
                picks.append(block.select_entries(queries, state.layers[0])[0])
                state = model(input_ids=row[:, start : start + 16], memory_state=state).memory_state
        return torch.stack(picks), state.layers[0].index

    serial = {thread: task(thread)[0] for thread in range(4)}
    results = run_in_threads(task, 4)
    for thread in range(4):
        assert torch.equal(results[thread][0], serial[thread]), f"thread {thread}"
    assert len({id(index) for _, index in results.values()}) == 4


def test_lists_searched_per_query_follow_the_block_setting_after_the_index_is_built():
    # A user trades speed for recall on a document already read: `search_probes` applies to the next read.
    pytest.importorskip("faiss")
    block = kv_block(memory_search_threshold=1024, memory_search_probes=1)
    generator = torch.Generator().manual_seed(3)
    state = write_segments(block, clustered_hidden(generator, 2, 6144))
    queries = clustered_hidden(generator, 2, 64)
    one_list = _recall_against_exact(block, state, queries)
    block.search_probes = 1 << 20  # every list: the exact top-k
    assert one_list < 0.99 and _recall_against_exact(block, state, queries) == 1.0


def test_a_memorized_document_keeps_its_index_when_a_question_fills_a_window(monkeypatch):
    # A question longer than a segment writes its window to memory on the way. That write must leave the
    # document's index as it was (the appended entries are scored exactly beside it), or the next question would
    # build the index again: k-means over every entry, tens of seconds at a million. With every list probed (a few hundred
    # entries: all 8 lists) the answers are those of exact search.
    pytest.importorskip("faiss")
    tokens = torch.randint(0, 97, (1, 480), generator=torch.Generator().manual_seed(21))
    document, questions = tokens[:, :384], [tokens[:, 384:424], tokens[:, 424:440], tokens[:, 384:424]]
    options = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    answers = {}
    for search in ("exact", "auto"):
        model = _indexed_model(search)
        state = model.memorize(document)
        builds = _record_builds(monkeypatch)
        with torch.no_grad():  # 40 prompt tokens, segments of 16: two windows written
            answers[search] = [model.generate(question, memory_state=state, **options) for question in questions]
        if search == "auto":
            assert builds == [], builds
    for got, expected in zip(answers["auto"], answers["exact"], strict=True):
        assert torch.equal(got, expected)


def test_appended_entries_are_read_exactly_until_the_index_moves_and_older_states_still_read_right(monkeypatch):
    # Small writes after an indexed state leave its index alone and score what they append exactly; past
    # `_APPENDED_EXACTLY` entries a write moves the index itself (no build). An older state whose index has moved on
    # reads through an index of its own. Every pick, of every state, is the exact one (all lists probed).
    pytest.importorskip("faiss")
    monkeypatch.setattr(kv_index, "_APPENDED_EXACTLY", 48)
    block = kv_block(memory_search_threshold=256, memory_search_probes=1 << 20, memory_size=4096)
    exact = kv_block(memory_search="exact", memory_size=4096)
    exact.load_state_dict(block.state_dict())
    generator = torch.Generator().manual_seed(22)
    with torch.no_grad():
        states = [write_segments(block, clustered_hidden(generator, 2, 512))]
        assert block.uses_index(states[0])
        builds = _record_builds(monkeypatch)
        for _ in range(5):  # 16 entries a write: 48 appended after 3 writes; the 4th moves the index (off state 3)
            states.append(write_segments(block, clustered_hidden(generator, 2, 16), state=states[-1]))
        kinds = [type(state.index).__name__ for state in states]
        assert kinds == ["_SearchIndex", *["_AppendedIndex"] * 2, "NoneType", "_SearchIndex", "_AppendedIndex"], kinds
        assert builds == [], builds
        queries = clustered_hidden(generator, 2, 8)
        for number, state in enumerate(states):
            assert _same_picks(block, exact, queries, state), f"state {number}"
    assert 0 < len(builds) <= 2 * 4, builds  # states 0-3 hold indexes moved on by the 4th write: theirs are built


def test_a_state_loaded_from_a_file_builds_its_index_once_for_several_questions(monkeypatch, tmp_path):
    # A saved memory comes back without its index. The first read builds one on the call's detached copy of the
    # state; it must stay with the caller's state (same tensors), or every question would build it again.
    pytest.importorskip("faiss")
    model = _indexed_model("auto")
    tokens = torch.randint(0, 97, (1, 420), generator=torch.Generator().manual_seed(23))
    model.memorize(tokens[:, :384]).save(tmp_path / "memory.safetensors")
    state = hf_memlm.MemoryState.load(tmp_path / "memory.safetensors")
    assert state.layers[0].index is None
    builds = _record_builds(monkeypatch)
    options = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        first = model.generate(tokens[:, 384:400], memory_state=state, **options)
        assert len(builds) == 1 and state.layers[0].index is not None  # one row: one build
        model.generate(tokens[:, 400:416], memory_state=state, **options)
        again = model.generate(tokens[:, 384:400], memory_state=state, **options)
    assert len(builds) == 1, builds
    assert torch.equal(again, first)


def test_memorize_leaves_its_state_reading_through_the_index_alone_and_a_short_one_keeps_the_earlier_index(
    monkeypatch,
):
    # memorize writes a long document in pieces; a last piece of at most `_APPENDED_EXACTLY` entries would leave the
    # state scoring those entries one by one at every later read (every token of a generation). Nothing else holds
    # the index by then, so memorize settles it: the state reads through its index alone, without a build, and
    # picks what exact search picks (all lists probed). A short memorize after a document keeps the document's index.
    pytest.importorskip("faiss")
    import hf_memlm.memory_writes as memory_writes

    monkeypatch.setattr(kv_index, "_APPENDED_EXACTLY", 48)
    monkeypatch.setattr(memory_writes, "TOKENS_PER_CALL", 64)  # writes of 4 segments: 64, ..., 64, then 16 tokens
    model, exact = _indexed_model("auto"), _indexed_model("exact")
    tokens = torch.randint(0, 97, (1, 420), generator=torch.Generator().manual_seed(24))
    queries = torch.randn(1, 8, KV_HIDDEN, generator=torch.Generator().manual_seed(25))
    with torch.no_grad():
        document = model.memorize(tokens[:, :400])
        builds = _record_builds(monkeypatch)
        assert type(document.layers[0].index).__name__ == "_SearchIndex"
        assert _same_picks(model.memory_blocks["0"], exact.memory_blocks["0"], queries, document.layers[0])
        question = model.memorize(tokens[:, 400:420], memory_state=document)
        assert type(question.layers[0].index).__name__ == "_AppendedIndex"
        assert kv_index._fitting_index(document.layers[0]) is question.layers[0].index.base
        for state in (document, question):
            assert _same_picks(model.memory_blocks["0"], exact.memory_blocks["0"], queries, state.layers[0])
    assert builds == [], builds
