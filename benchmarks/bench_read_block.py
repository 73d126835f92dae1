"""Where the memory overhead goes: one memory block's read and write, segment by segment, on their own.

The overhead figures (`bench_overhead.py`) time whole models; this times only the memory block beside
layer 2 of the same `kv` (or `slot`) model, called as the model calls it (`block(h, state, mode=...)`), on
the hidden states of the benchmark text, for each of the 4 segments of the overhead setting (the read of
segment s sees the entries of segments 1..s-1). It also times the base model on one segment, so each
figure reads as a share of what the base spends on the same tokens. Minimum over repetitions (the least
disturbed by a shared machine's load), inference (`torch.no_grad()`); with `--training`, the read's forward
and backward (gradients for the hidden states and the stored keys and values, which earlier segments wrote
with gradients) and the write's forward, against the base's forward and backward on one segment.

    python benchmarks/bench_read_block.py            # the overhead setting, 1 thread
    python benchmarks/bench_read_block.py --training # forward and backward
    python benchmarks/bench_read_block.py --quick    # a tiny model, seconds (CI smoke)
"""

from __future__ import annotations

import argparse
import time

import torch
from common import base_config, build_models, environment, markdown_table, report, text_tokens


def fastest_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and few repeats (smoke test)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions (default 9; quick 2)")
    parser.add_argument("--segments", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--kind", default="kv")
    parser.add_argument("--training", action="store_true", help="time the read's forward and backward")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/read_block[_quick].json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    hidden, layers, segment = (64, 2, 32) if args.quick else (256, 4, 256)
    repeats = args.repeats or (2 if args.quick else 9)

    models = build_models(base_config(hidden, layers, segment), segment, (args.kind,))
    model, base = models[args.kind], models["base"]
    layer = model.config.memory_layers[0]
    block = model.memory_blocks[str(layer)]
    tokens = text_tokens(args.segments * segment, args.batch)
    mask = torch.ones(args.batch, segment, dtype=torch.bool)
    with torch.no_grad():
        # the hidden states the block sees beside its layer, segment by segment
        captured = [
            base(input_ids=piece, output_hidden_states=True).hidden_states[layer + 1]
            for piece in tokens.split(segment, dim=1)
        ]
    if args.training:
        captured = [hidden_states.clone().requires_grad_() for hidden_states in captured]
        first = tokens[:, :segment]
        base_ms = fastest_ms(lambda: base(input_ids=first, labels=first).loss.backward(), repeats)
    else:
        with torch.no_grad():
            base_ms = fastest_ms(lambda: base(input_ids=tokens[:, :segment]), repeats)

    def read(hidden_states, state):
        out = block(hidden_states, state, mode="read")
        if args.training and out.requires_grad:  # (an empty memory reads zeros, with nothing to differentiate)
            # gradients for what the read takes in, not for the writes that made the state
            inputs = [hidden_states] + [tensor for tensor in state.values() if tensor.requires_grad]
            torch.autograd.grad(out.square().sum(), inputs, allow_unused=True, retain_graph=True)

    rows = []
    with torch.set_grad_enabled(args.training):
        state = model.init_memory_state(args.batch).layers[layer]
        for number, hidden_states in enumerate(captured, start=1):
            entries = int(model.memory_blocks[str(layer)].count_entries(state).max()) if number > 1 else 0
            read_ms = fastest_ms(lambda: read(hidden_states, state), repeats)  # noqa: B023
            write_ms = fastest_ms(lambda: block(hidden_states, state, mode="write", mask=mask), repeats)  # noqa: B023
            rows.append({"segment": number, "entries": entries, "read_ms": read_ms, "write_ms": write_ms})
            state = block(hidden_states, state, mode="write", mask=mask)
    total = sum(row["read_ms"] + row["write_ms"] for row in rows)
    setting = {
        "base": f"llama hidden {hidden}, {layers} layers",
        "segment_length": segment,
        "batch": args.batch,
        "memory": args.kind,
        "repeats": repeats,
        "statistic": "minimum",
        "mode": "training (forward and backward of the read)" if args.training else "inference",
    }
    payload = {"benchmark": "read_block", "quick": args.quick, "setting": setting, "environment": environment()}
    payload["figures"] = {"segments": rows, "base_segment_ms": base_ms, "block_total_ms": total}
    table_rows = [
        [
            row["segment"],
            row["entries"],
            f"{row['read_ms']:.1f}",
            f"{row['write_ms']:.1f}",
            f"{(row['read_ms'] + row['write_ms']) / base_ms:.1%}",
        ]
        for row in rows
    ]
    table = markdown_table(
        ["segment", "entries per row (max)", "read ms", "write ms", "of the base's time on the segment"],
        table_rows,
    )
    table += (
        f"\n\nbase model, one segment{' (forward and backward)' if args.training else ''}: {base_ms:.1f} ms; memory block, all segments: {total:.1f} ms "
        f"({total / (base_ms * len(rows)):.1%} of the base)"
    )
    return report("read_block", payload, table, args)


if __name__ == "__main__":
    main()
