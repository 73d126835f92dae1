"""Where a generated token's extra time goes with a long document in memory: the shipped SmolLM2 with the pass-key
config's memory (as `benchmarks/bench_real_model.py` builds it), a book read into memory, then generation timed
against the base and against the same model with memory disabled, with the read's parts timed inside.

    OMP_NUM_THREADS=2 PYTHONPATH=$PWD python scripts/generation_read_parts.py --tokens 1048576 \
        --memory-dtype float8_e4m3fn

Prints each repetition, the medians (each run is also timed making one token, so that a new token's cost leaves the
prompt's pass out), and per part of the read (`KVMemory.read`, the index's list search, its outlying entries, the
exact re-scoring) the milliseconds per generation and per call. `--no-search` gives every read the first 16 entries
as its candidates instead of searching: what a token costs with a search that costs nothing.
"""

from __future__ import annotations

import argparse
import collections
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_real_model

import hf_memlm.memory_kv as memory_kv
import hf_memlm.memory_kv_index as memory_kv_index
from hf_memlm.memory_settings import MEMORY_DTYPES

PARTS = (
    (memory_kv.KVMemory, "read", "the read (KVMemory.read)"),
    (memory_kv_index._SearchIndex, "search", "the index's search, all of it"),
    (memory_kv_index._RowIndex, "search", "faiss's lists and the outlying entries"),
    (memory_kv_index._Outliers, "search", "the outlying entries"),
    (memory_kv_index, "rescore", "the exact re-scoring"),
)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=262144, help="tokens read into memory")
    parser.add_argument("--memory-dtype", default=None, choices=list(MEMORY_DTYPES))
    parser.add_argument("--memory-value-dtype", default=None, choices=list(MEMORY_DTYPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--text", default="data/books/held_out/moby_dick.txt")
    parser.add_argument("--no-search", action="store_true", help="the first entries as candidates, no search")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        raise ValueError("--new-tokens must be at least 2 (a new token's cost is that of those after the first).")
    torch.set_num_threads(args.threads)
    model, tokenizer = bench_real_model.shipped_model_with_index(
        args.tokens + 4096, args.memory_dtype, args.memory_value_dtype
    )
    ids = bench_real_model.book_tokens(tokenizer, args.tokens + 1024, args.text)
    document, prompt = ids[:, : args.tokens], ids[:, args.tokens : args.tokens + 64]
    started = time.perf_counter()
    state = bench_real_model.read_long(model, document, 65536)["state"]
    print(f"read {args.tokens:,} tokens in {time.perf_counter() - started:.1f} s", flush=True)

    if args.no_search:
        memory_kv_index._SearchIndex.search = _first_entries
    spent, calls = collections.defaultdict(float), collections.Counter()
    for owner, name, label in PARTS:
        setattr(owner, name, _timed(getattr(owner, name), label, spent, calls))
    many = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    one = dict(many, max_new_tokens=1, min_new_tokens=1)

    def memory(options):
        model.generate(prompt, memory_state=state, **options)

    def base(options):
        model.language_model.generate(prompt, **options)

    def disabled(options):
        with model.memory_disabled():
            model.generate(prompt, memory_state=state, **options)

    runs = {"base": base, "memory": memory, "memory disabled": disabled}
    with torch.no_grad():
        for _ in range(2):  # warm-up
            for run in runs.values():
                run(many)
        times = {name: [] for name in runs}
        first = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                started = time.perf_counter()
                run(one)
                first[name].append(time.perf_counter() - started)
        spent.clear(), calls.clear()  # the parts are timed over the whole generations below
        for _ in range(args.repeats):
            for name, run in runs.items():
                started = time.perf_counter()
                run(many)
                times[name].append(time.perf_counter() - started)
            print("  ".join(f"{name} {values[-1]:.3f} s" for name, values in times.items()), flush=True)
    median = {name: statistics.median(values) for name, values in times.items()}
    per_new = {
        name: 1000 * bench_real_model.new_token_seconds(times[name], first[name], args.new_tokens) for name in runs
    }
    per_token = 1000 / args.new_tokens
    print(
        f"medians: base {median['base'] * per_token:.1f} ms per token; more per token: memory "
        f"{(median['memory'] - median['base']) * per_token:.1f} ms, memory disabled "
        f"{(median['memory disabled'] - median['base']) * per_token:.1f} ms"
    )
    print(
        f"new tokens alone (the prompt's pass left out): base {per_new['base']:.1f} ms per token; more per token: "
        f"memory {per_new['memory'] - per_new['base']:.2f} ms, memory disabled "
        f"{per_new['memory disabled'] - per_new['base']:.2f} ms; memory / base speed "
        f"{per_new['base'] / per_new['memory']:.3f}"
    )
    for label, seconds in spent.items():
        print(
            f"{label}: {seconds / args.repeats * 1000:.1f} ms per generation, "
            f"{calls[label] / args.repeats:.0f} calls, {seconds / calls[label] * 1000:.3f} ms per call"
        )


def _first_entries(index, queries, topk):
    """`_SearchIndex.search` without the search: the row's first entries as candidates, re-scored as usual."""
    batch, heads, tokens, _ = queries.shape
    first = torch.arange(memory_kv_index.candidates_for(topk), device=queries.device)
    candidates = first.expand(batch, heads, tokens, -1)
    return memory_kv_index.rescore(index.keys, queries, candidates, torch.ones_like(candidates, dtype=torch.bool), topk)


def _timed(fn, label, spent, calls):
    @functools.wraps(fn)
    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter() - started
            calls[label] += 1

    return timed


if __name__ == "__main__":
    main()
