"""Where a long read's memory goes: the shipped SmolLM2 with the pass-key config's memory (as
`benchmarks/bench_real_model.py` builds it, the index on) reads a book into memory, one `memorize` call per chunk, and
after each call prints the process's RSS now, its RSS once glibc has handed its free heap pages back
(`malloc_trim`), and its peak RSS so far (GiB).

    OMP_NUM_THREADS=2 PYTHONPATH=$PWD python scripts/memory_read_rss.py --tokens 131072 --chunk 16384 \
        --memory-dtype bfloat16 --memory-value-dtype float8_e4m3fn

"Now" above "trimmed" is heap that was freed but kept by the allocator; "trimmed" grows with what is live (the model,
the entries, the index's codes); the peak adds what a call holds while it runs. Linux (glibc) only.
"""

from __future__ import annotations

import argparse
import ctypes
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_real_model

from hf_memlm.memory_settings import MEMORY_DTYPES


def rss_gib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**30


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=131072, help="tokens read into memory")
    parser.add_argument("--chunk", type=int, default=16384, help="tokens per memorize call")
    parser.add_argument("--memory-dtype", default=None, choices=list(MEMORY_DTYPES))
    parser.add_argument("--memory-value-dtype", default=None, choices=list(MEMORY_DTYPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--text", default="data/books/held_out/moby_dick.txt")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    trim = ctypes.CDLL(None).malloc_trim
    model, tokenizer = bench_real_model.shipped_model_with_index(
        args.tokens + 4096, args.memory_dtype, args.memory_value_dtype
    )
    ids = bench_real_model.book_tokens(tokenizer, args.tokens, args.text)
    trim(0)
    print(f"model loaded, text tokenized: RSS {rss_gib():.2f} GiB, peak {peak_gib():.2f} GiB", flush=True)
    print("tokens read | RSS now | RSS trimmed | peak RSS")
    state = None
    with torch.no_grad():
        for start in range(0, args.tokens, args.chunk):
            state = model.memorize(ids[:, start : start + args.chunk], memory_state=state)
            now = rss_gib()
            trim(0)
            print(
                f"{min(start + args.chunk, args.tokens):,} | {now:.2f} | {rss_gib():.2f} | {peak_gib():.2f}", flush=True
            )


if __name__ == "__main__":
    main()
