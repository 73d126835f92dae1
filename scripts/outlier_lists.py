"""What the outlying entries' own lists (`memory_kv_index._EXACT_OUTLIERS`) cost and find: one row's index over the
keys a trained model writes for a long text, searched with the queries its reads make while it continues that text.

    PYTHONPATH=$PWD python scripts/outlier_lists.py outputs/smollm2_passkey_cpu --tokens 1048576 \
        --text data/books/held_out/moby_dick.txt

The model reads `--tokens` tokens of the text into memory, then generates after a few prompts taken from the text
past them; every generated token's queries are kept. For each setting (outlying entries all scored one by one; in
lists of their own) the script builds `_RowIndex` over the memory's keys as `_SearchIndex` does, then times
`search` for each query with the caches cold (as in generation, where the base model's weights pass through them
between two reads: a stream over 64 MiB and 30 matrix-vector products before each search), and counts how many of
the exact top-k are among its candidates (recall@k, before the exact re-scoring).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_memlm  # noqa: F401  (registers the memlm auto classes)
from hf_memlm import memory_kv, memory_kv_index
from hf_memlm.evaluation import environment, environment_line

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_real_model import book_tokens, read_long


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a trained memory model folder with its tokenizer (one kv memory layer)")
    parser.add_argument("--tokens", type=int, default=1 << 20, help="tokens read into memory")
    parser.add_argument("--text", default="data/books/held_out/moby_dick.txt")
    parser.add_argument("--prompts", type=int, default=4, help="prompts generated after, 16 new tokens each")
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    faiss = memory_kv_index._import_faiss()
    if faiss is None:
        raise SystemExit("scripts/outlier_lists.py needs faiss: pip install hf-memlm[faiss]")
    model = AutoModelForCausalLM.from_pretrained(
        args.model, memory_size=args.tokens + 4096, memory_topk=args.topk, memory_search="auto", dtype=torch.float32
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    print(environment_line(environment()), flush=True)
    ids = book_tokens(tokenizer, args.tokens + 1024 * args.prompts, args.text)
    state = read_long(model, ids[:, : args.tokens], 65536)["state"]
    queries = []
    original = memory_kv.KVMemory.queries

    def keep_queries(block, *inputs, **options):
        made = original(block, *inputs, **options)
        if made.shape[2] == 1:  # a generated token's read
            queries.append(made[0, :, 0].detach().float().clone())
        return made

    memory_kv.KVMemory.queries = keep_queries
    try:
        with torch.no_grad():
            for start in range(args.tokens, args.tokens + 1024 * args.prompts, 1024):
                options = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
                model.generate(ids[:, start : start + 64], memory_state=state, **options)
    finally:
        memory_kv.KVMemory.queries = original
    (layer,) = model.config.memory_layers
    keys = state.layers[layer]["keys"][0].float()  # (heads, entries, d)
    state = None
    queries = torch.stack(queries)  # (queries, heads, d)
    heads, entries, _ = keys.shape
    candidates = memory_kv_index.candidates_for(args.topk)
    exact = torch.einsum("qhd,hnd->qhn", queries, keys).topk(args.topk, dim=-1).indices
    reach = min(args.tokens + 4096, memory_kv_index._LOOKAHEAD * entries)  # as `_SearchIndex._lists_for`
    lists = max(1, min(memory_kv_index._MAX_LISTS, reach // memory_kv_index._ENTRIES_PER_LIST))
    probes = model.memory_blocks[str(layer)].search_probes
    flush_weights, flush_input = torch.randn(30, 1536, 576), torch.randn(1, 576)
    stream = torch.zeros(16 << 20)

    def cool_caches():
        for weight in flush_weights:
            torch.nn.functional.linear(flush_input, weight)
        stream.add_(1.0)

    figures = {}
    for name, exact_outliers in (("one by one", 1 << 62), ("in lists of their own", memory_kv_index._EXACT_OUTLIERS)):
        kept, memory_kv_index._EXACT_OUTLIERS = memory_kv_index._EXACT_OUTLIERS, exact_outliers
        try:
            started = time.perf_counter()
            index = memory_kv_index._RowIndex(
                faiss, heads, lambda head: keys[head].contiguous().numpy(), np.arange(entries), lists, probes
            )
            build = time.perf_counter() - started
        finally:
            memory_kv_index._EXACT_OUTLIERS = kept
        per_query = [queries[q][:, None].contiguous().numpy() for q in range(len(queries))]
        times = []
        for _ in range(args.repeats):
            spent = 0.0
            for data in per_query:
                cool_caches()
                started = time.perf_counter()
                index.search(data, candidates)
                spent += time.perf_counter() - started
            times.append(spent / len(per_query))
        found = torch.stack([index.search(data, candidates)[:, 0] for data in per_query])  # (queries, heads, c)
        recall = (found[..., None] == exact[..., None, :]).any(-2).float().mean().item()
        figures[name] = {
            "search_ms": 1000 * statistics.median(times),
            "recall_at_k": recall,
            "build_s": build,
            "outliers_per_head": list(index.outliers.sizes),
            "outlier_lists_per_head": None if index.outliers.lists is None else [i.nlist for i in index.outliers.lists],
        }
        print(
            f"outlying entries {name}: search {figures[name]['search_ms']:.3f} ms (caches cold), recall@{args.topk} "
            f"of {candidates} candidates {recall:.3f}, build {build:.1f} s, {index.outliers.sizes} outlying",
            flush=True,
        )
    results = {"figures": figures, "queries": len(queries), "entries": entries, "settings": vars(args)}
    results["environment"] = environment()
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
