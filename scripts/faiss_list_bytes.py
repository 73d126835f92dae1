"""What faiss's IVF lists hold beyond their codes: an index like one head's of a `kv` memory (8-bit codes, 4,096
lists, 144 features) grows by writes of 8,192 entries, as a long read adds them, and the process's RSS growth is
compared with the bytes of its codes and ids. Each list is a vector grown by doubling, so it holds room it has not
filled yet. Linux only (reads /proc/self/statm; glibc's `malloc_trim` before each measurement).

    OMP_NUM_THREADS=2 python scripts/faiss_list_bytes.py --entries 1048576
"""

from __future__ import annotations

import argparse
import ctypes
import resource

import faiss
import numpy as np


def rss_gib() -> float:
    ctypes.CDLL(None).malloc_trim(0)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**30


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1 << 20)
    parser.add_argument("--dim", type=int, default=144)
    parser.add_argument("--lists", type=int, default=4096)
    parser.add_argument("--write", type=int, default=8192, help="entries added per call")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    quantizer = faiss.IndexFlatIP(args.dim)
    index = faiss.IndexIVFScalarQuantizer(
        quantizer, args.dim, args.lists, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
    )
    index.cp.min_points_per_centroid = 1
    index.train(rng.standard_normal((4 * args.lists, args.dim)).astype("float32"))
    before = rss_gib()
    for start in range(0, args.entries, args.write):
        data = rng.standard_normal((args.write, args.dim)).astype("float32")
        index.add_with_ids(data, np.arange(start, start + args.write, dtype="int64"))
    grown = rss_gib() - before
    stored = index.ntotal * (index.code_size + 8) / 2**30  # codes and int64 ids
    print(
        f"{index.ntotal:,} entries: RSS grew {grown:.3f} GiB for {stored:.3f} GiB of codes and ids ({grown / stored:.2f}x)"
    )


if __name__ == "__main__":
    main()
