"""Memory overhead: tokens/s of each memory model relative to its base model on the same segments.

Figures of the memory-at-scale issue: `kv` and `slot` inference tokens/s vs the base model (target
>= 0.90x), plus the training step (forward + backward) ratio. The base model runs each segment on its own
(its window); the memory model runs the whole input in one call and reads/writes memory between segments.
Base and memory runs are interleaved in one process; each ratio is median(base time) / median(memory time).

    python benchmarks/bench_overhead.py            # the issue's setting (Llama 256 wide, 4 layers, ...)
    python benchmarks/bench_overhead.py --quick    # a tiny model, seconds (CI smoke)
"""

from __future__ import annotations

import argparse

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


def operator_ms(run, calls: int = 3, top: int = 12) -> dict[str, float]:
    """CPU ms per call of `run` by torch operator (self time, the `top` largest), from torch.profiler."""
    from torch.profiler import profile

    with profile() as prof:
        for _ in range(calls):
            run()
    averages = sorted(prof.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)[:top]
    return {event.key: event.self_cpu_time_total / 1000 / calls for event in averages}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and few repeats (smoke test)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per model (default 7; quick 3)")
    parser.add_argument("--segments", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--kinds", default="kv,slot")
    parser.add_argument("--no-training", action="store_true", help="inference figures only")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile 3 inference calls of each memory model (torch.profiler): ms per call by operator",
    )
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/overhead[_quick].json)")
    add_base_size_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    hidden, layers, segment = base_size(args)
    repeats = args.repeats or (3 if args.quick else 7)
    kinds = tuple(kind for kind in args.kinds.split(",") if kind)

    models = build_models(base_config(hidden, layers, segment), segment, kinds)
    tokens = text_tokens(args.segments * segment, args.batch)
    segments = tokens.split(segment, dim=1)

    def infer_base():
        with torch.no_grad():
            for piece in segments:
                models["base"](input_ids=piece)

    def infer(kind):
        def run():
            with torch.no_grad():
                models[kind](input_ids=tokens)

        return run

    def train_base():
        for piece in segments:
            models["base"](input_ids=piece, labels=piece).loss.backward()
        models["base"].zero_grad(set_to_none=True)

    def train(kind):
        def run():
            models[kind](input_ids=tokens, labels=tokens).loss.backward()
            models[kind].zero_grad(set_to_none=True)

        return run

    figures = {}
    modes = [("inference", infer_base, infer)] + ([] if args.no_training else [("training", train_base, train)])
    for mode, base_fn, kind_fn in modes:
        wall, cpu = interleaved({"base": base_fn, **{kind: kind_fn(kind) for kind in kinds}}, repeats)
        count = tokens.numel()
        figures[mode] = {
            name: {
                "median_wall_s": median(wall[name]),
                "median_cpu_s": median(cpu[name]),
                "tokens_per_s": count / median(wall[name]),
                "wall_s": wall[name],
                "cpu_s": cpu[name],
            }
            for name in wall
        }
        for kind in kinds:
            figures[mode][kind]["ratio_vs_base"] = median(wall["base"]) / median(wall[kind])
            figures[mode][kind]["cpu_ratio_vs_base"] = median(cpu["base"]) / median(cpu[kind])

    profiled = {kind: operator_ms(infer(kind)) for kind in kinds} if args.profile else {}
    if profiled:
        profiled["base"] = operator_ms(infer_base)

    setting = {
        "base": f"llama hidden {hidden}, {layers} layers",
        "segment_length": segment,
        "segments": args.segments,
        "batch": args.batch,
        "repeats": repeats,
        "dtype": "float32",
        "memory_settings": "MemLMConfig defaults (memory_type and segment_length set)",
    }
    payload = {"benchmark": "overhead", "quick": args.quick, "setting": setting, "environment": environment()}
    payload["figures"] = figures
    if profiled:
        payload["profile_ms_per_call"] = profiled
    rows = [
        [
            mode,
            kind,
            f"{figures[mode][kind]['tokens_per_s']:.0f}",
            f"{figures[mode]['base']['tokens_per_s']:.0f}",
            f"{figures[mode][kind]['ratio_vs_base']:.2f}x",
            f"{figures[mode][kind]['cpu_ratio_vs_base']:.2f}x",
        ]
        for mode in figures
        for kind in kinds
    ]
    table = markdown_table(
        ["mode", "memory", "memory tokens/s", "base tokens/s", "ratio (wall)", "ratio (CPU time)"], rows
    )
    if profiled:
        operators = list(dict.fromkeys(name for by_operator in profiled.values() for name in by_operator))
        table += "\n\n" + markdown_table(
            ["operator (ms per inference call, self CPU)", *profiled],
            [[name, *(f"{profiled[model].get(name, 0.0):.1f}" for model in profiled)] for name in operators],
        )
    return report("overhead", payload, table, args)


if __name__ == "__main__":
    main()
