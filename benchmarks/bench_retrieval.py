"""Retrieval: exact top-k vs the approximate index on the keys a model writes from natural text.

For the issue's model (default memory settings), the memory layer's hidden states of a long text are
written segment by segment; at each checkpoint size the next segment is read with exact search and with
the index (`memory_search="auto"`), timed side by side, and the recall@k of the index's picks against
the exact top-k is measured (`KVMemory.select_entries`). One row.

    python benchmarks/bench_retrieval.py            # 4k, 16k, 65k entries
    python benchmarks/bench_retrieval.py --quick    # tiny model, seconds
"""

from __future__ import annotations

import argparse

import torch
from common import (
    base_config,
    build_models,
    environment,
    interleaved,
    markdown_table,
    median,
    text_tokens,
    write_results,
)

from hf_memlm.memory_kv import KVMemory


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    hidden, layers, segment = (64, 2, 32) if args.quick else (256, 4, 256)
    checkpoints = [128, 512, 2048] if args.quick else [4096, 16384, 65280]

    # quick: a lower threshold, so that the tiny memory reaches the index
    settings = {"memory_search_threshold": 256} if args.quick else {}
    model = build_models(base_config(hidden, layers, segment), segment, kinds=("kv",), **settings)["kv"]
    layer = model.config.memory_layers[0]
    block = model.memory_blocks[str(layer)]
    exact = KVMemory(model.config, layer)
    exact.load_state_dict(block.state_dict())
    exact.search = "exact"
    total = checkpoints[-1] + 2 * segment
    tokens = text_tokens(total, 1).view(-1, segment)
    with torch.no_grad():  # the hidden states the memory block sees (no memory before its layer)
        states = [
            model.language_model(input_ids=chunk, output_hidden_states=True).hidden_states[layer + 1]
            for chunk in tokens.split(16)
        ]
    hidden_states = torch.cat(states).view(1, -1, hidden)
    mask = torch.ones(1, segment, dtype=torch.bool)

    rows = []
    state = block.init_state(1, "cpu", torch.float32)
    written = 0
    with torch.no_grad():
        for target in checkpoints:
            while int(state["valid"].sum()) < target:
                state = block(hidden_states[:, written : written + segment], state, mode="write", mask=mask)
                written += segment
            queries = hidden_states[:, written : written + segment]
            picks, picks_valid = block.select_entries(queries, state)
            reference, _ = exact.select_entries(queries, state)
            hits = ((picks.unsqueeze(-1) == reference.unsqueeze(-2)) & picks_valid.unsqueeze(-1)).any(-2)
            wall, _ = interleaved(
                {
                    "exact": lambda q=queries, s=state: exact(q, s, mode="read"),
                    "auto": lambda q=queries, s=state: block(q, s, mode="read"),
                },
                args.repeats,
            )
            rows.append(
                {
                    "entries": int(state["valid"].sum()),
                    "uses_index": block.uses_index(state),
                    "recall_at_k": hits.float().mean().item(),
                    "exact_read_ms": 1000 * median(wall["exact"]),
                    "auto_read_ms": 1000 * median(wall["auto"]),
                }
            )
    payload = {"benchmark": "retrieval", "quick": args.quick, "environment": environment(), "rows": rows}
    payload["setting"] = {
        "base": f"llama hidden {hidden}, {layers} layers",
        "segment_length": segment,
        "queries": segment,
        "topk": model.config.memory_topk,
        "heads": model.config.memory_heads,
        "memory_search_threshold": model.config.memory_search_threshold,
        "memory_search_probes": model.config.memory_search_probes,
        "keys": "untrained model on the bundled Pride and Prejudice text",
    }
    table = markdown_table(
        ["stored entries", "index used", "recall@k", "exact read (ms)", "default read (ms)"],
        [
            [
                r["entries"],
                r["uses_index"],
                f"{r['recall_at_k']:.3f}",
                f"{r['exact_read_ms']:.0f}",
                f"{r['auto_read_ms']:.0f}",
            ]
            for r in rows
        ],
    )
    payload["table"] = table
    path = write_results("retrieval_quick" if args.quick else "retrieval", payload, args.output)
    print(table)
    print(f"written {path}")
    return payload


if __name__ == "__main__":
    main()
