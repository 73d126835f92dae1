"""Cheaper memory per entry: bytes of memory state per remembered token, by kind and `memory_dtype`,
and (with `--passkey-model`) passkey accuracy of a trained model with each storage dtype.

    python benchmarks/bench_memory_bytes.py                                   # bytes per token
    python benchmarks/bench_memory_bytes.py --passkey-model DIR               # + passkey by dtype
    python benchmarks/bench_memory_bytes.py --quick                           # tiny model (CI smoke)

DIR is a model trained by `hf-memlm train configs/passkey_cpu.yaml --output_dir DIR`; it is loaded with
`AutoModelForCausalLM.from_pretrained(DIR, memory_dtype=...)` and scored on the evaluation the training
config names (teacher-forced exact match of the key, memory condition only).
"""

from __future__ import annotations

import argparse

import torch
from common import base_config, environment, markdown_table, passkey_scores, report, text_tokens
from transformers import AutoModelForCausalLM

from hf_memlm import MemLMForCausalLM
from hf_memlm.memory_settings import MEMORY_DTYPES as DTYPES


def state_bytes(state) -> int:
    return sum(t.numel() * t.element_size() for layer in state.layers.values() for t in layer.values())


def bytes_per_token(hidden, layers, segment, segments) -> list[dict]:
    config = base_config(hidden, layers, segment)
    tokens = text_tokens(segments * segment, 1)
    rows = []
    for kind, dtype in [("kv", d) for d in DTYPES] + [("slot", None)]:
        settings = {"memory_dtype": dtype} if kind == "kv" else {}
        torch.manual_seed(0)
        model = MemLMForCausalLM.from_base(
            AutoModelForCausalLM.from_config(config), memory_type=kind, segment_length=segment, **settings
        ).eval()
        with torch.no_grad():
            state = model(input_ids=tokens).memory_state
        size = state_bytes(state)
        rows.append(
            {
                "memory": kind,
                "memory_dtype": dtype or "(model dtype) float32",
                "tokens_streamed": tokens.shape[1],
                "state_bytes": size,
                "bytes_per_token": size / tokens.shape[1],
                "note": "fixed size: per token falls as the stream grows" if kind == "slot" else "grows per entry",
            }
        )
    return rows


def passkey_by_dtype(folder: str, num_examples: int | None) -> list[dict]:
    return [{"memory_dtype": dtype, **passkey_scores(folder, num_examples, memory_dtype=dtype)[0]} for dtype in DTYPES]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model (smoke test)")
    parser.add_argument("--segments", type=int, default=8, help="segments streamed to fill the memory")
    parser.add_argument("--passkey-model", default=None, help="folder of a model trained on passkey")
    parser.add_argument("--num-examples", type=int, default=None, help="passkey examples per length")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    hidden, layers, segment = (64, 2, 32) if args.quick else (256, 4, 256)
    payload = {"benchmark": "memory_bytes", "quick": args.quick, "environment": environment()}
    payload["setting"] = {"base": f"llama hidden {hidden}, {layers} layers", "segment_length": segment}
    payload["bytes"] = bytes_per_token(hidden, layers, segment, args.segments)
    table = markdown_table(
        ["memory", "memory_dtype", "tokens streamed", "state bytes", "bytes per remembered token"],
        [
            [r["memory"], r["memory_dtype"], r["tokens_streamed"], r["state_bytes"], f"{r['bytes_per_token']:.0f}"]
            for r in payload["bytes"]
        ],
    )
    if args.passkey_model:
        payload["passkey"] = passkey_by_dtype(args.passkey_model, args.num_examples)
        distances = [k for k in payload["passkey"][0] if k.startswith("distance_")]
        table += "\n\n" + markdown_table(
            ["memory_dtype", "exact match (all)", *[f"{d.split('_')[1]} segments" for d in distances]],
            [
                [r["memory_dtype"], f"{r['exact_match']:.3f}", *[f"{r[d]:.3f}" for d in distances]]
                for r in payload["passkey"]
            ],
        )
    return report("memory_bytes", payload, table, args)


if __name__ == "__main__":
    main()
