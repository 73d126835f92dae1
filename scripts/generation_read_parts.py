"""Where a generated token's extra time goes with a long document in memory: the shipped SmolLM2 with the pass-key
config's memory (as `benchmarks/bench_real_model.py` builds it), a book read into memory, then generation timed
against the base and against the same model with memory disabled, with the read's parts timed inside.

    OMP_NUM_THREADS=2 PYTHONPATH=$PWD python scripts/generation_read_parts.py --tokens 1048576 \
        --memory-dtype float8_e4m3fn

Prints each repetition, the medians, and per part of the read (`KVMemory.read`, the index's list search, its
outlying entries, the exact re-scoring) the milliseconds per generation and per call.
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
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = bench_real_model.shipped_model_with_index(
        args.tokens + 4096, args.memory_dtype, args.memory_value_dtype
    )
    ids = bench_real_model.book_tokens(tokenizer, args.tokens + 1024, args.text)
    document, prompt = ids[:, : args.tokens], ids[:, args.tokens : args.tokens + 64]
    started = time.perf_counter()
    state = bench_real_model.read_long(model, document, 65536)["state"]
    print(f"read {args.tokens:,} tokens in {time.perf_counter() - started:.1f} s", flush=True)

    spent, calls = collections.defaultdict(float), collections.Counter()
    for owner, name, label in PARTS:
        setattr(owner, name, _timed(getattr(owner, name), label, spent, calls))
    options = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

    def memory():
        model.generate(prompt, memory_state=state, **options)

    def base():
        model.language_model.generate(prompt, **options)

    def disabled():
        with model.memory_disabled():
            model.generate(prompt, memory_state=state, **options)

    runs = {"base": base, "memory": memory, "memory disabled": disabled}
    with torch.no_grad():
        for _ in range(2):  # warm-up
            for run in runs.values():
                run()
        spent.clear(), calls.clear()
        times = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                started = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - started)
            print("  ".join(f"{name} {values[-1]:.3f} s" for name, values in times.items()), flush=True)
    median = {name: statistics.median(values) for name, values in times.items()}
    per_token = 1000 / args.new_tokens
    print(
        f"medians: base {median['base'] * per_token:.1f} ms per token; more per token: memory "
        f"{(median['memory'] - median['base']) * per_token:.1f} ms, memory disabled "
        f"{(median['memory disabled'] - median['base']) * per_token:.1f} ms"
    )
    for label, seconds in spent.items():
        print(
            f"{label}: {seconds / args.repeats * 1000:.1f} ms per generation, "
            f"{calls[label] / args.repeats:.0f} calls, {seconds / calls[label] * 1000:.3f} ms per call"
        )


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
