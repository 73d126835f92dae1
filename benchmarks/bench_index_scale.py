"""The `kv` index at 1M entries per row: time to build and follow it while 1M tokens are written, search
time per query, and recall@k of its picks against exact top-k, on random clustered keys.

The memory block beside layer 2 of the issue's model (`MemLMConfig` defaults, `memory_size` raised to hold
the whole fill) is driven directly: one segment of hidden states per write, without gradients, as
`memorize` writes them; the hidden states are random points around fixed centres, so that keys cluster
as real keys do. The index is built when a row first holds more than `memory_search_threshold` entries
and then follows every write (appends; re-clustered each time the row doubles, up to 262,144 entries).

    python benchmarks/bench_index_scale.py            # 1,048,576 entries (a few minutes, ~4 GB RAM)
    python benchmarks/bench_index_scale.py --quick    # 16,384 entries, a tiny block (seconds; CI smoke)
"""

from __future__ import annotations

import argparse
import copy
import time

import psutil
import torch
import torch.nn.functional as F
from common import base_config, build_models, environment, markdown_table, median, report

from hf_memlm import MemLMForCausalLM
from hf_memlm.memory_kv import KVMemory


def clustered_hidden(centres: torch.Tensor, tokens: int, generator: torch.Generator, noise: float) -> torch.Tensor:
    """(1, tokens, hidden) points around randomly picked `centres`."""
    pick = torch.randint(0, centres.shape[0], (tokens,), generator=generator)
    return (centres[pick] + noise * torch.randn(tokens, centres.shape[1], generator=generator))[None]


def recall_at_k(picked: torch.Tensor, picked_valid: torch.Tensor, exact: torch.Tensor) -> float:
    """Share of the exact top-k entries among the picks, over every query and head."""
    hits = ((picked.unsqueeze(-1) == exact.unsqueeze(-2)) & picked_valid.unsqueeze(-1)).any(-2)
    return hits.float().mean().item()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny block, 16k entries (smoke test)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--entries", type=int, default=None, help="entries written per row (default 1,048,576)")
    parser.add_argument(
        "--clusters", type=int, default=None, help="centres the points are drawn around (default entries / 256)"
    )
    parser.add_argument(
        "--noise", type=float, default=0.25, help="spread of the points around their centre, relative to its norm"
    )
    parser.add_argument("--queries", type=int, default=256, help="queries for recall and the batched search")
    parser.add_argument(
        "--output", default=None, help="JSON path (default benchmarks/results/index_scale[_quick].json)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    hidden, layers, segment = (64, 2, 64) if args.quick else (256, 4, 256)
    entries = args.entries or (16384 if args.quick else 1 << 20)
    if entries <= 0 or entries % segment:
        raise ValueError(f"--entries must be a positive multiple of the segment length {segment}, got {entries}.")
    clusters = args.clusters or max(1, entries // 256)

    model: MemLMForCausalLM = build_models(
        base_config(hidden, layers, segment), segment, kinds=("kv",), memory_size=entries
    )["kv"]
    layer = model.config.memory_layers[0]
    block = model.memory_blocks[str(layer)]
    exact_config = copy.deepcopy(model.config)
    exact_config.memory_search = "exact"
    exact_block = KVMemory(exact_config, layer)
    exact_block.load_state_dict(block.state_dict())
    generator = torch.Generator().manual_seed(0)
    # Centres of norm sqrt(hidden) (hidden states' scale); noise of norm ~ args.noise times that.
    centres = F.normalize(torch.randn(clusters, hidden, generator=generator), dim=-1) * hidden**0.5
    noise = args.noise
    mask = torch.ones(1, segment, dtype=torch.bool)
    process = psutil.Process()
    rss_before = process.memory_info().rss

    state = block.init_state(1, "cpu", torch.float32)
    write_seconds = []
    with torch.no_grad():
        for _ in range(entries // segment):
            piece = clustered_hidden(centres, segment, generator, noise)
            start = time.perf_counter()
            state = block(piece, state, mode="write", mask=mask)
            write_seconds.append(time.perf_counter() - start)
        rss_after = process.memory_info().rss
        stored = int(block.count_entries(state)[0])
        uses_index = block.uses_index(state)

        queries = clustered_hidden(centres, args.queries, generator, noise)
        single = []
        for position in range(min(args.queries, 64)):
            start = time.perf_counter()
            block.select_entries(queries[:, position : position + 1], state)
            single.append(time.perf_counter() - start)
        start = time.perf_counter()
        picked, picked_valid = block.select_entries(queries, state)
        batched = time.perf_counter() - start
        exact_parts, exact_single = [], []
        for chunk in queries.split(16, dim=1):  # exact scores of 16 queries at a time bound the score tensor
            start = time.perf_counter()
            exact_parts.append(exact_block.select_entries(chunk, state)[0])
            exact_single.append((time.perf_counter() - start) / chunk.shape[1])
        exact = torch.cat(exact_parts, dim=2)
    recall = recall_at_k(picked, picked_valid, exact)

    total_write = sum(write_seconds)
    slowest = sorted(write_seconds, reverse=True)
    figures = {
        "entries_per_row": stored,
        "uses_index": uses_index,
        "write_seconds_total": total_write,
        "write_ms_per_segment_median": 1000 * median(write_seconds),
        "write_ms_slowest_segments": [1000 * seconds for seconds in slowest[:5]],
        "search_ms_per_query_single": 1000 * median(single),
        "search_ms_per_segment_batched": 1000 * batched,
        "exact_ms_per_query": 1000 * median(exact_single),
        "recall_at_k": recall,
        "topk": block.topk,
        "rss_before_bytes": rss_before,
        "rss_after_fill_bytes": rss_after,
    }
    setting = {
        "block": f"kv memory beside layer {layer} of a llama {hidden} wide, {layers} layers",
        "segment_length": segment,
        "entries": entries,
        "clusters": clusters,
        "noise": args.noise,
        "queries": args.queries,
        "dtype": "float32",
        "memory_settings": f"MemLMConfig defaults except memory_size={entries}",
    }
    payload = {"benchmark": "index_scale", "quick": args.quick, "setting": setting, "environment": environment()}
    payload["figures"] = figures
    table = markdown_table(
        [
            "entries per row",
            "writes, total s",
            "write ms/segment (median / slowest)",
            "search ms, 1 query",
            f"search ms, {args.queries} queries",
            "exact ms per query",
            f"recall@{block.topk}",
            "RSS after (MiB)",
        ],
        [
            [
                f"{stored:,}",
                f"{total_write:.1f}",
                f"{figures['write_ms_per_segment_median']:.1f} / {slowest[0] * 1000:.0f}",
                f"{figures['search_ms_per_query_single']:.2f}",
                f"{figures['search_ms_per_segment_batched']:.1f}",
                f"{figures['exact_ms_per_query']:.2f}",
                f"{recall:.3f}",
                f"{rss_after / 2**20:.0f}",
            ]
        ],
    )
    return report("index_scale", payload, table, args)


if __name__ == "__main__":
    main()
