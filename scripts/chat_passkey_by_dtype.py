"""The chat pass-key curve of a trained real-model folder reloaded in float32 and in bfloat16, side by side: does
reading (and answering) in bfloat16 change the answers?

    python scripts/chat_passkey_by_dtype.py outputs/smollm2_passkey_cpu --distances 16384 65536 --examples 30

Memory settings at load: top-4 reads, room for the longest distance; held-out text: Moby-Dick. Prints each dtype's
exact match by distance, its reading and answering seconds, and how many replies are identical.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_memlm  # noqa: F401  (registers the memlm auto classes)
from hf_memlm.evaluation.chat_passkey import ChatPasskeySettings, evaluate_chat_passkey


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a folder written by hf-memlm train (e.g. outputs/smollm2_passkey_cpu)")
    parser.add_argument("--distances", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--examples", type=int, default=30, help="examples per distance")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--text", default="data/books/held_out/moby_dick.txt")
    args = parser.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    text = open(args.text, encoding="utf-8").read()
    settings = ChatPasskeySettings.memory_only(args.distances, args.examples)
    results = {}
    for name in args.dtypes:
        model = AutoModelForCausalLM.from_pretrained(
            args.model, dtype=getattr(torch, name), memory_topk=4, memory_size=max(args.distances) + 4096
        ).eval()
        results[name] = evaluate_chat_passkey(model, tokenizer, text, settings, progress=False)
        scores = {row["distance"]: row["memory"] for row in results[name]["rows"]}
        print(f"{name}: exact match by distance {scores}; seconds {results[name]['seconds']}", flush=True)
    if len(results) > 1:
        first, *others = results.values()
        for name, other in zip(args.dtypes[1:], others):
            same = sum(a["memory"] == b["memory"] for a, b in zip(first["answers"], other["answers"]))
            print(f"identical replies, {args.dtypes[0]} vs {name}: {same} of {len(first['answers'])}")
    return results


if __name__ == "__main__":
    main()
