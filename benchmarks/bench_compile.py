"""`torch.compile` on a fixed-shape training step: graph breaks, and the step's time compiled vs eager.

A training step is forward + backward of one batch (2 rows of 200 tokens by default, segments of 50, so 4
segments) with labels, a fresh memory state and no padding, as `Trainer` runs it. The graph breaks are counted
by `torch._dynamo.explain` (nothing is compiled for that); the step is then timed eager and through
`torch.compile(model)` (inductor), interleaved in one process after warm-up (which compiles), median of
`--repeats` runs each.

    python benchmarks/bench_compile.py                 # Llama 64 wide, 2 layers, both kinds
    python benchmarks/bench_compile.py --mask          # with an all-ones attention_mask (as collators give)
    python benchmarks/bench_compile.py --eager-only    # eager step time only (to compare two checkouts)
"""

from __future__ import annotations

import argparse
import collections

import torch
from common import base_config, environment, interleaved, markdown_table, median, report
from transformers import AutoModelForCausalLM

from hf_memlm import MemLMForCausalLM


def build(kind: str, hidden: int, layers: int, segment: int, seed: int = 0) -> MemLMForCausalLM:
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(base_config(hidden, layers, segment))
    model = MemLMForCausalLM.from_base(base, memory_type=kind, segment_length=segment).train()
    with torch.no_grad():  # memory that changes the outputs (its output projection starts at zero)
        for param in model.memory_blocks.parameters():
            param.normal_(0.0, 0.3)
    return model


def break_reasons(model, inputs: dict) -> tuple[int, list[str]]:
    """(graph breaks, "count  file:line  reason" lines) of one call of `model` under torch._dynamo.explain."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(**inputs)
    reasons = collections.Counter()
    for entry in explained.break_reasons:
        frame = entry.user_stack[-1] if entry.user_stack else None
        where = f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}" if frame else "?"
        reasons[f"{where}  {entry.reason.splitlines()[0][:90]}"] += 1
    return explained.graph_break_count, [f"{count}x {reason}" for reason, count in reasons.most_common()]


def step(model, inputs: dict):
    def run():
        model.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", default=["kv", "slot"])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--segment", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--mask", action="store_true", help="pass an all-ones attention_mask")
    parser.add_argument("--eager-only", action="store_true", help="time the eager step only (no compile)")
    parser.add_argument("--quick", action="store_true", help="(name of the results file only)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    ids = torch.randint(0, 256, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "labels": ids}
    if args.mask:
        inputs["attention_mask"] = torch.ones_like(ids)
    rows, results = [], {}
    for kind in args.kinds:
        model = build(kind, args.hidden, args.layers, args.segment)
        runs = {"eager": step(model, inputs)}
        breaks, reasons = (None, []) if args.eager_only else break_reasons(model, inputs)
        if not args.eager_only:
            torch._dynamo.reset()
            runs["compiled"] = step(torch.compile(model), inputs)
        wall, cpu = interleaved(runs, args.repeats, warmup=2)
        eager_ms = median(wall["eager"]) * 1000
        compiled_ms = median(wall["compiled"]) * 1000 if "compiled" in wall else None
        speedup = eager_ms / compiled_ms if compiled_ms else None
        results[kind] = {
            "graph_breaks": breaks,
            "break_reasons": reasons,
            "wall_s": wall,
            "cpu_s": cpu,
            "eager_ms": eager_ms,
            "compiled_ms": compiled_ms,
            "speedup": speedup,
        }
        rows.append(
            [
                kind,
                "-" if breaks is None else breaks,
                f"{eager_ms:.1f}",
                "-" if compiled_ms is None else f"{compiled_ms:.1f}",
                "-" if speedup is None else f"{speedup:.2f}x",
            ]
        )
        for reason in reasons:
            print(f"{kind}: {reason}")
    table = markdown_table(["kind", "graph breaks", "eager step ms", "compiled step ms", "speed-up"], rows)
    payload = {"settings": vars(args), "environment": environment(), "results": results}
    report("compile_eager" if args.eager_only else "compile", payload, table, args)


if __name__ == "__main__":
    main()
