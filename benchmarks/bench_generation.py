"""Generation far from the window: new tokens/s of greedy `generate` with 1M tokens already in `kv` memory,
against the base model generating from its window alone.

Figure 5 of the memory-at-scale issue (target >= 0.90x). The memory is filled through the public API
(`model.memorize(ids)`), then `model.generate(prompt, memory_state=state, ...)` is timed against
`model.language_model.generate(prompt, ...)` (the same base weights, no memory), interleaved, medians of
the repetitions. The model is the one of `bench_overhead.py` (Llama 256 wide, 4 layers, segment 256,
memory beside layer 2) with `MemLMConfig`'s default memory settings except `memory_size`, raised to hold
the whole fill. Also reported: fill time (memorize, index upkeep included), RSS after the fill, whether
the reads went through the approximate index, and the memory model with its memory switched off
(`memory_disabled()`), which separates the wrapper's own cost per token from the memory read's.

    python benchmarks/bench_generation.py            # 1,048,576 tokens in memory (minutes, ~5 GB RAM)
    python benchmarks/bench_generation.py --quick    # a tiny model, 8k tokens (seconds; CI smoke)
"""

from __future__ import annotations

import argparse
import time

import psutil
import torch
from common import (
    add_base_size_arguments,
    base_config,
    base_size,
    build_models,
    environment,
    interleaved,
    markdown_table,
    median,
    report,
    text_tokens,
)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, small fill (smoke test)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--fill", type=int, default=None, help="tokens memorized first (default 1,048,576; quick 8,192)"
    )
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 64; quick 16)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens generated per run (default 128; quick 16)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per model (default 5; quick 2)")
    parser.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (default greedy)")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/generation[_quick].json)")
    add_base_size_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    hidden, layers, segment = base_size(args)
    fill = args.fill or (8192 if args.quick else 1 << 20)
    prompt_length = args.prompt or (16 if args.quick else 64)
    new_tokens = args.new_tokens or (16 if args.quick else 128)
    repeats = args.repeats or (2 if args.quick else 5)
    for name, value in (("--fill", fill), ("--prompt", prompt_length), ("--new-tokens", new_tokens)):
        if value <= 0:
            raise ValueError(f"{name} must be a positive number of tokens, got {value}.")

    models = build_models(base_config(hidden, layers, segment), segment, kinds=("kv",), memory_size=fill)
    model, base = models["kv"], models["kv"].language_model
    tokens = text_tokens(fill + prompt_length, 1)
    document, prompt = tokens[:, :fill], tokens[:, fill:]
    process = psutil.Process()
    rss_before = process.memory_info().rss

    start = time.perf_counter()
    state = model.memorize(document)
    fill_seconds = time.perf_counter() - start
    rss_after_fill = process.memory_info().rss
    block = model.memory_blocks[str(model.config.memory_layers[0])]
    layer_state = state.layers[model.config.memory_layers[0]]
    uses_index = block.uses_index(layer_state)

    options = dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, num_beams=args.num_beams
    )

    def generate_base():
        with torch.no_grad():
            return base.generate(prompt, **options)

    def generate_memory():
        with torch.no_grad():
            return model.generate(prompt, memory_state=state, **options)

    def generate_wrapper_only():
        # The memory model with memory switched off: what the wrapper costs per token without any read.
        with torch.no_grad(), model.memory_disabled():
            return model.generate(prompt, **options)

    # Time spent inside the memory block's reads during the memory model's runs (forward hooks on the block).
    read_seconds, started = [0.0], [0.0]

    def before_read(module, args, kwargs):
        started[0] = time.perf_counter()

    def after_read(module, args, kwargs, output):
        if kwargs.get("mode", args[2] if len(args) > 2 else None) == "read":
            read_seconds[0] += time.perf_counter() - started[0]

    def generate_memory_timing_reads():
        read_seconds[0] = 0.0
        generate_memory()
        read_times.append(read_seconds[0])

    read_times: list[float] = []
    hooks = [
        block.register_forward_pre_hook(before_read, with_kwargs=True),
        block.register_forward_hook(after_read, with_kwargs=True),
    ]
    runs = {"base": generate_base, "kv": generate_memory_timing_reads, "memory_disabled": generate_wrapper_only}
    try:
        wall, cpu = interleaved(runs, repeats)
    finally:
        for hook in hooks:
            hook.remove()
    peak_rss = max(process.memory_info().rss, rss_after_fill)
    figures = {
        name: {
            "median_wall_s": median(wall[name]),
            "median_cpu_s": median(cpu[name]),
            "new_tokens_per_s": new_tokens / median(wall[name]),
            "wall_s": wall[name],
            "cpu_s": cpu[name],
        }
        for name in wall
    }
    figures["ratio_vs_base"] = median(wall["base"]) / median(wall["kv"])
    figures["memory_disabled_ratio_vs_base"] = median(wall["base"]) / median(wall["memory_disabled"])
    figures["cpu_ratio_vs_base"] = median(cpu["base"]) / median(cpu["kv"])
    figures["ms_per_new_token"] = {name: 1000 * median(wall[name]) / new_tokens for name in wall}
    figures["read_ms_per_new_token"] = 1000 * median(read_times[-repeats:]) / new_tokens
    figures["fill_seconds"] = fill_seconds
    figures["fill_tokens_per_s"] = fill / fill_seconds
    figures["entries_per_row"] = int(state.num_entries()[0])
    figures["reads_use_index"] = uses_index
    figures["rss_before_fill_bytes"] = rss_before
    figures["rss_after_fill_bytes"] = rss_after_fill
    figures["peak_rss_bytes"] = peak_rss
    setting = {
        "base": f"llama hidden {hidden}, {layers} layers",
        "segment_length": segment,
        "fill_tokens": fill,
        "prompt_tokens": prompt_length,
        "new_tokens": new_tokens,
        "batch": 1,
        "repeats": repeats,
        "dtype": "float32",
        "memory_settings": f"MemLMConfig defaults except memory_size={fill}",
        "decoding": ("greedy" if args.num_beams == 1 else f"beam search, {args.num_beams} beams")
        + " (do_sample=False), min_new_tokens=max_new_tokens",
    }
    payload = {"benchmark": "generation", "quick": args.quick, "setting": setting, "environment": environment()}
    payload["figures"] = figures
    table = markdown_table(
        [
            "tokens in memory",
            "memory new tokens/s",
            "base new tokens/s",
            "ratio (wall)",
            "ratio (CPU time)",
            "memory off: ratio (wall)",
            "fill s",
            "RSS after fill (MiB)",
            "index",
        ],
        [
            [
                f"{figures['entries_per_row']:,}",
                f"{figures['kv']['new_tokens_per_s']:.1f}",
                f"{figures['base']['new_tokens_per_s']:.1f}",
                f"{figures['ratio_vs_base']:.2f}x",
                f"{figures['cpu_ratio_vs_base']:.2f}x",
                f"{figures['memory_disabled_ratio_vs_base']:.2f}x",
                f"{fill_seconds:.1f}",
                f"{rss_after_fill / 2**20:.0f}",
                "yes" if uses_index else "no (exact)",
            ]
        ],
    )
    per_token = figures["ms_per_new_token"]
    table += "\n\n" + markdown_table(
        ["ms per new token: base", "memory off", "memory", "inside the memory reads"],
        [
            [
                f"{per_token['base']:.2f}",
                f"{per_token['memory_disabled']:.2f}",
                f"{per_token['kv']:.2f}",
                f"{figures['read_ms_per_new_token']:.2f}",
            ]
        ],
    )
    return report("generation", payload, table, args)


if __name__ == "__main__":
    main()
