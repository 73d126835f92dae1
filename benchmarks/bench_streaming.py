"""Scaling with length: `kv` time per token streaming a long input vs a short one, one row.

Figure of the memory-at-scale issue: time per token streaming 256 segments (65,536 tokens) relative to
16 segments (4,096 tokens), target <= 1.3x. The stream is fed one segment per call with the memory
state handed over, as an application streaming a document would (inference, no gradients). The long
stream is cut into chunks; after each chunk a whole short stream runs, so both see the same machine
load. Also reported: time per segment along the long stream, RSS, and bytes of memory state.

    python benchmarks/bench_streaming.py            # the issue's setting (Llama 256 wide, 4 layers, ...)
    python benchmarks/bench_streaming.py --quick    # a tiny model, seconds (CI smoke)
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import psutil
import torch
from common import (
    add_base_size_arguments,
    base_config,
    base_size,
    build_models,
    cpu_seconds,
    environment,
    markdown_table,
    median,
    report,
    text_tokens,
)

from hf_memlm import MemLMForCausalLM


def state_bytes(state) -> int:
    return sum(t.numel() * t.element_size() for layer in state.layers.values() for t in layer.values())


def file_tokens(path: str, count: int) -> torch.Tensor:
    """The first `count` bytes of the file at `path` as one row of byte tokens."""
    data = Path(path).read_bytes()[:count]
    if len(data) < count:
        raise ValueError(f"--text {path} holds {len(data)} bytes; the long stream needs {count}.")
    return torch.tensor(list(data), dtype=torch.long)[None]


def index_recall(model, state, probe: torch.Tensor) -> float | None:
    """recall@k of the entries a read of `probe` selects in `state` against the exact top-k (None when the
    reads of `state` are exact). The queries are the memory layer's inputs on `probe`, the memory off."""
    layer = model.config.memory_layers[0]
    block = model.memory_blocks[str(layer)]
    if not block.uses_index(state.layers[layer]):
        return None
    config = copy.deepcopy(model.config)
    config.memory_search = "exact"
    exact = MemLMForCausalLM(config).eval()
    exact.load_state_dict(model.state_dict())
    with torch.no_grad():
        hidden = model.language_model(input_ids=probe, output_hidden_states=True).hidden_states[layer + 1]
        picks, picks_valid = block.select_entries(hidden, state.layers[layer])
        reference, _ = exact.memory_blocks[str(layer)].select_entries(hidden, state.layers[layer])
    hits = ((picks.unsqueeze(-1) == reference.unsqueeze(-2)) & picks_valid.unsqueeze(-1)).any(-2)
    return hits.float().mean().item()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, short streams (smoke test)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None, help="long streams to time (default 3; quick 1)")
    parser.add_argument("--short", type=int, default=None, help="segments of the short stream (default 16)")
    parser.add_argument("--long", type=int, default=None, help="segments of the long stream (default 256)")
    parser.add_argument("--chunks", type=int, default=8, help="short streams run between chunks of a long one")
    parser.add_argument("--kind", default="kv")
    parser.add_argument(
        "--probes",
        type=int,
        default=None,
        help="memory_search_probes (default: MemLMConfig's; fewer: faster, lower recall)",
    )
    parser.add_argument(
        "--text", default=None, help="a UTF-8 text file to stream, as bytes (default: the bundled text, repeated)"
    )
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/streaming[_quick].json)")
    add_base_size_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    hidden, layers, segment = base_size(args)
    short = args.short or (4 if args.quick else 16)
    long = args.long or (32 if args.quick else 256)
    repeats = args.repeats or (1 if args.quick else 3)
    if long % args.chunks:
        raise ValueError(f"--long={long} must be a multiple of --chunks={args.chunks}")

    settings = {} if args.probes is None else {"memory_search_probes": args.probes}
    model = build_models(base_config(hidden, layers, segment), segment, kinds=(args.kind,), **settings)[args.kind]
    tokens = text_tokens(long * segment, 1) if args.text is None else file_tokens(args.text, long * segment)
    segments = tokens.split(segment, dim=1)

    def stream(pieces, state=None, per_segment=None):
        for piece in pieces:
            start = time.perf_counter()
            state = model(input_ids=piece, memory_state=state).memory_state
            if per_segment is not None:
                per_segment.append(time.perf_counter() - start)
        return state

    short_times, long_times, per_segment = [], [], []
    short_cpu, long_cpu = [], []
    process = psutil.Process()
    peak_rss = 0
    with torch.no_grad():
        stream(segments[:short])  # warm-up
        for repeat in range(repeats):
            state, elapsed, used = None, 0.0, 0.0
            timings = [] if repeat == 0 else None
            per_chunk = long // args.chunks
            for chunk in range(args.chunks):
                pieces = segments[chunk * per_chunk : (chunk + 1) * per_chunk]
                start, cpu = time.perf_counter(), cpu_seconds()
                state = stream(pieces, state, timings)
                elapsed += time.perf_counter() - start
                used += cpu_seconds() - cpu
                peak_rss = max(peak_rss, process.memory_info().rss)
                start, cpu = time.perf_counter(), cpu_seconds()
                stream(segments[:short])
                short_times.append((time.perf_counter() - start) / (short * segment))
                short_cpu.append((cpu_seconds() - cpu) / (short * segment))
            long_times.append(elapsed / (long * segment))
            long_cpu.append(used / (long * segment))
            if timings is not None:
                per_segment = timings
                final_bytes = state_bytes(state)
                entries = int(state.num_entries()[0])

    recall = index_recall(model, state, tokens[:, -segment:]) if args.kind == "kv" else None
    short_per_token, long_per_token = median(short_times), median(long_times)
    ratio = long_per_token / short_per_token
    cpu_ratio = median(long_cpu) / median(short_cpu)
    band = max(1, long // 8)
    curve = [
        {"segments": f"{i + 1}-{min(i + band, long)}", "ms_per_segment": 1000 * median(per_segment[i : i + band])}
        for i in range(0, long, band)
    ]
    setting = {
        "base": f"llama hidden {hidden}, {layers} layers",
        "memory": args.kind,
        "segment_length": segment,
        "short_segments": short,
        "long_segments": long,
        "batch": 1,
        "repeats_long": repeats,
        "runs_short": len(short_times),
        "dtype": "float32",
        "text": args.text or "bundled text (repeated)",
        "memory_settings": "MemLMConfig defaults (memory_type and segment_length set)"
        + ("" if args.probes is None else f", memory_search_probes={args.probes}"),
    }
    figures = {
        "short_us_per_token": 1e6 * short_per_token,
        "long_us_per_token": 1e6 * long_per_token,
        "ratio_long_vs_short": ratio,
        "cpu_ratio_long_vs_short": cpu_ratio,
        "short_cpu_us_per_token": [1e6 * t for t in short_cpu],
        "long_cpu_us_per_token": [1e6 * t for t in long_cpu],
        "long_times_us_per_token": [1e6 * t for t in long_times],
        "short_times_us_per_token": [1e6 * t for t in short_times],
        "ms_per_segment_along_long_stream": curve,
        "entries_per_row_after_long": entries,
        "state_bytes_after_long": final_bytes,
        "peak_rss_bytes": peak_rss,
        "index_recall_at_k_after_long": recall,
    }
    payload = {"benchmark": "streaming", "quick": args.quick, "setting": setting, "environment": environment()}
    payload["figures"] = figures
    table = markdown_table(
        [
            "memory",
            f"us/token, {short} segments",
            f"us/token, {long} segments",
            "ratio (wall)",
            "ratio (CPU time)",
            "peak RSS (MiB)",
            "index recall@k at the end",
        ],
        [
            [
                args.kind,
                f"{1e6 * short_per_token:.0f}",
                f"{1e6 * long_per_token:.0f}",
                f"{ratio:.2f}x",
                f"{cpu_ratio:.2f}x",
                f"{peak_rss / 2**20:.0f}",
                "exact reads" if recall is None else f"{recall:.3f}",
            ]
        ],
    )
    table += "\n\n" + markdown_table(
        ["long-stream segments", "ms per segment (median)"],
        [[row["segments"], f"{row['ms_per_segment']:.0f}"] for row in curve],
    )
    return report("streaming", payload, table, args)


if __name__ == "__main__":
    main()
