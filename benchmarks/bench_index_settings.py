"""IVF settings on the keys of a streamed memory: search time and recall@k of faiss indexes placed on part or
all of a stream, against the exact top-k, next to the exact read at the short stream's size.

The numbers behind the `kv` index's settings (`hf_memlm/memory_kv_index.py`): how many lists, how many
probes, how much k-means, and why lists are placed again as a row grows (keys drift along a stream, so
lists placed on its first part crowd the later keys into a few lists). The model of `bench_streaming.py`
streams `--long` segments, one per call; its final state's keys and the next segment's queries (the memory
block's own projections) then go to faiss directly, one index per head as the model builds them.

    python benchmarks/bench_index_settings.py            # 65,536 tokens of the bundled text (about a minute)
    python benchmarks/bench_index_settings.py --quick    # a tiny model, 8,192 tokens (seconds)
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from common import base_config, build_models, environment, markdown_table, median, report, text_tokens

from hf_memlm.memory_base import split_heads
from hf_memlm.memory_kv_index import _import_faiss

# (lists, probes, share of the stream the lists are placed on, k-means points per list, k-means iterations)
SETTINGS = [
    (1024, 32, 0.25, 16, 10),
    (1024, 32, 1.0, 16, 10),
    (1024, 32, 1.0, 4, 4),
    (512, 32, 0.5, 16, 10),
    (512, 32, 0.5, 4, 4),
    (512, 32, 1.0, 4, 4),
    (2048, 16, 1.0, 4, 4),
    (1024, 16, 1.0, 4, 4),
]


def parse_setting(text: str) -> tuple[int, int, float, int, int]:
    """`LISTS/PROBES/SHARE/POINTS/ITERATIONS` (e.g. `1024/32/1.0/4/4`) as a `SETTINGS` row."""
    parts = text.split("/")
    try:
        lists, probes, share, points, iterations = (
            int(parts[0]),
            int(parts[1]),
            float(parts[2]),
            int(parts[3]),
            int(parts[4]),
        )
    except (IndexError, ValueError):
        raise ValueError(
            f"--settings {text!r}: expected LISTS/PROBES/SHARE/POINTS/ITERATIONS, e.g. 1024/32/1.0/4/4"
        ) from None
    if len(parts) != 5 or min(lists, probes, points, iterations) <= 0 or not 0 < share <= 1:
        raise ValueError(f"--settings {text!r}: counts must be positive and SHARE in (0, 1], e.g. 1024/32/1.0/4/4")
    return lists, probes, share, points, iterations


def timed_ms(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, short stream (smoke test)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--long", type=int, default=None, help="segments streamed (default 256; quick 256)")
    parser.add_argument("--short", type=int, default=16, help="segments of the short stream (exact read size)")
    parser.add_argument("--repeats", type=int, default=5, help="timed searches per setting (median)")
    parser.add_argument(
        "--settings",
        nargs="+",
        default=None,
        metavar="LISTS/PROBES/SHARE/POINTS/ITERATIONS",
        help="settings to try instead of the built-in ones, e.g. 1024/40/1.0/4/4 (share: of the stream the lists "
        "are placed on; points: k-means points per list)",
    )
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/index_settings.json)")
    args = parser.parse_args(argv)
    settings = SETTINGS if args.settings is None else [parse_setting(text) for text in args.settings]
    faiss = _import_faiss()
    if faiss is None:
        raise SystemExit("bench_index_settings needs faiss: pip install faiss-cpu")
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    hidden, layers, segment = (64, 2, 32) if args.quick else (256, 4, 256)
    long = args.long or 256

    model = build_models(base_config(hidden, layers, segment), segment, kinds=("kv",))["kv"]
    layer = model.config.memory_layers[0]
    block = model.memory_blocks[str(layer)]
    tokens = text_tokens((long + 1) * segment, 1)
    pieces = tokens.split(segment, dim=1)
    state = None
    with torch.no_grad():
        for piece in pieces[:long]:
            state = model(input_ids=piece, memory_state=state).memory_state
        # the next segment's queries, as the block computes them (its input: the layer's output, memory off)
        probe = model.language_model(input_ids=pieces[long], output_hidden_states=True).hidden_states[layer + 1]
        queries = F.normalize(split_heads(block.mem_query(probe), block.num_heads), dim=-1)[0]  # (H, T, d)
    keys = state.layers[layer]["keys"][0].float().contiguous()  # (H, entries, d)
    heads, entries, dim = keys.shape
    topk = block.topk
    exact = [(queries[h] @ keys[h].T).topk(topk, dim=-1).indices for h in range(heads)]
    short_entries = args.short * segment - 1
    exact_ms = timed_ms(
        lambda: [(queries[h] @ keys[h, :short_entries].T).topk(topk, dim=-1) for h in range(heads)], args.repeats
    )

    rows = []
    for lists, probes, share, points, iterations in settings:
        if args.quick:
            lists = max(8, lists // 16)
        placed = max(lists, int(entries * share))
        indexes = []
        start = time.perf_counter()
        for h in range(heads):
            data = keys[h].numpy()
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
            index.cp.niter, index.cp.max_points_per_centroid, index.cp.min_points_per_centroid = iterations, points, 1
            index.train(data[:placed])
            index.add(data)
            index.nprobe = probes
            indexes.append((index, quantizer))
        build_ms = 1000 * (time.perf_counter() - start)
        per_head = [queries[h].contiguous().numpy() for h in range(heads)]
        search_ms = timed_ms(
            lambda indexes=indexes, per_head=per_head: [indexes[h][0].search(per_head[h], topk) for h in range(heads)],
            args.repeats,
        )
        hits = []
        for h in range(heads):
            _, found = indexes[h][0].search(per_head[h], topk)
            found = torch.from_numpy(found)
            hits.append((found.unsqueeze(-1) == exact[h].unsqueeze(-2)).any(-2).float().mean().item())
        rows.append(
            {
                "lists": lists,
                "probes": probes,
                "placed_on_entries": placed,
                "kmeans_points_per_list": points,
                "kmeans_iterations": iterations,
                "search_ms": search_ms,
                "recall_at_k": sum(hits) / heads,
                "build_ms": build_ms,
            }
        )

    setting = {
        "base": f"llama hidden {hidden}, {layers} layers",
        "segment_length": segment,
        "streamed_segments": long,
        "entries": entries,
        "heads": heads,
        "queries_per_head": queries.shape[1],
        "topk": topk,
        "memory_settings": "MemLMConfig defaults (memory_type and segment_length set)",
    }
    figures = {"settings": rows, "exact_ms_at_short_stream": exact_ms, "short_stream_entries": short_entries}
    payload = {"benchmark": "index_settings", "quick": args.quick, "setting": setting, "environment": environment()}
    payload["figures"] = figures
    table = markdown_table(
        [
            "lists",
            "probes",
            "lists placed on (entries)",
            "k-means points/list, iterations",
            "build ms",
            "search ms",
            "recall@k",
        ],
        [
            [
                row["lists"],
                row["probes"],
                f"{row['placed_on_entries']:,}",
                f"{row['kmeans_points_per_list']}, {row['kmeans_iterations']}",
                f"{row['build_ms']:.0f}",
                f"{row['search_ms']:.1f}",
                f"{row['recall_at_k']:.3f}",
            ]
            for row in rows
        ],
    )
    table += (
        f"\n\nexact top-{topk} over the short stream's {short_entries:,} entries, same queries: {exact_ms:.1f} ms "
        f"({entries:,} entries streamed, {heads} heads x {queries.shape[1]} queries)"
    )
    return report("index_settings", payload, table, args)


if __name__ == "__main__":
    main()
