"""Retrieval: exact top-k vs the approximate index on the keys a model writes from natural text.

For the issue's model (default memory settings), the memory layer's hidden states of a long text are
written segment by segment; at each checkpoint size the next segment is read with exact search and with
the index (`memory_search="auto"`), timed side by side, and the recall@k of the index's picks against
the exact top-k is measured (`KVMemory.select_entries`). One row.

    python benchmarks/bench_retrieval.py            # 4k, 16k, 65k entries
    python benchmarks/bench_retrieval.py --quick    # tiny model, seconds
    python benchmarks/bench_retrieval.py --passkey-model DIR --skip-model-keys

With `--passkey-model DIR` (a model trained by `hf-memlm train configs/passkey_cpu.yaml`): its passkey exact
match with exact search and with the index (the threshold lowered to `--passkey-threshold` entries so that
the index serves its reads), and the recall@k of the index on its trained keys (memory written from all
but the last segment of the longest examples, queries from the last segment).
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
    passkey_scores,
    report,
    text_tokens,
)

from hf_memlm import MemLMConfig
from hf_memlm.memory_kv import KVMemory


def model_key_rows(args, hidden, layers, segment, checkpoints) -> list[dict]:
    # quick: a lower threshold, so that the tiny memory reaches the index
    settings = {"memory_search_threshold": 256} if args.quick else {}
    if args.probes is not None:
        settings["memory_search_probes"] = args.probes
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
    return rows


def passkey_rows(folder: str, threshold: int, num_examples: int | None, topk: int = 32) -> list[dict]:
    rows = [{"memory_search": "exact", "memory_topk": None, **passkey_scores(folder, num_examples)[0]}]
    for search in ("exact", "auto"):
        # the index serves top-k reads only: a model trained with memory_topk=None reads its top 32 here
        scores, model, dataset = passkey_scores(
            folder, num_examples, memory_search=search, memory_search_threshold=threshold, memory_topk=topk
        )
        rows.append({"memory_search": search, "memory_search_threshold": threshold, "memory_topk": topk, **scores})
    # recall on the trained keys: the longest examples, memory from all but their last segment
    segment = model.config.segment_length
    layer = model.config.memory_layers[0]
    block = model.memory_blocks[str(layer)]
    exact = KVMemory(model.config, layer)
    exact.load_state_dict(block.state_dict())
    exact.search = "exact"
    longest = max(len(row) for row in dataset["input_ids"])
    inputs = torch.tensor([row for row in dataset["input_ids"] if len(row) == longest])
    with torch.no_grad():
        state = model(input_ids=inputs[:, :-segment]).memory_state.layers[layer]
        queries = model.language_model(input_ids=inputs[:, -segment:], output_hidden_states=True).hidden_states[
            layer + 1
        ]
        picks, picks_valid = block.select_entries(queries, state)
        reference, _ = exact.select_entries(queries, state)
    hits = ((picks.unsqueeze(-1) == reference.unsqueeze(-2)) & picks_valid.unsqueeze(-1)).any(-2)
    rows[-1]["recall_at_k_trained_keys"] = hits.float().mean().item()
    rows[-1]["entries_per_row"] = int(state["valid"].sum(-1)[0])
    rows[-1]["index_used"] = block.uses_index(state)
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=None)
    parser.add_argument("--passkey-model", default=None, help="folder of a model trained on passkey")
    parser.add_argument("--passkey-threshold", type=int, default=256)
    parser.add_argument("--num-examples", type=int, default=None, help="passkey examples per length")
    parser.add_argument("--probes", type=int, default=None, help="memory_search_probes (default: MemLMConfig's)")
    parser.add_argument("--skip-model-keys", action="store_true", help="only the passkey-model figures")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    hidden, layers, segment = (64, 2, 32) if args.quick else (256, 4, 256)
    checkpoints = [128, 512, 2048] if args.quick else [4096, 16384, 65280]

    rows = [] if args.skip_model_keys else model_key_rows(args, hidden, layers, segment, checkpoints)
    payload = {"benchmark": "retrieval", "quick": args.quick, "environment": environment(), "rows": rows}
    payload["setting"] = {
        "base": f"llama hidden {hidden}, {layers} layers",
        "segment_length": segment,
        "queries": segment,
        "topk": MemLMConfig.memory_topk,
        "heads": MemLMConfig.memory_heads,
        "memory_search_threshold": 256 if args.quick else MemLMConfig.memory_search_threshold,
        "memory_search_probes": args.probes or MemLMConfig.memory_search_probes,
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
    if args.passkey_model:
        payload["passkey"] = passkey_rows(args.passkey_model, args.passkey_threshold, args.num_examples)
        distances = [k for k in payload["passkey"][0] if k.startswith("distance_")]
        table += "\n\n" + markdown_table(
            ["memory_search", "memory_topk", "exact match (all)", *[f"{d.split('_')[1]} segments" for d in distances]],
            [
                [r["memory_search"], r["memory_topk"], f"{r['exact_match']:.3f}", *[f"{r[d]:.3f}" for d in distances]]
                for r in payload["passkey"]
            ],
        )
        last = payload["passkey"][-1]
        table += (
            f"\n\nrecall@k of the index on the trained keys: {last['recall_at_k_trained_keys']:.3f} "
            f"({last['entries_per_row']} entries per row, index used: {last['index_used']})"
        )
    return report("retrieval", payload, table, args)


if __name__ == "__main__":
    main()
