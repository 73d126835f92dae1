"""How often the approximate index finds what an exact read finds, on the reads that answer a pass key: a trained
chat folder, its own examples (`hf_memlm.evaluation.chat_passkey`), several numbers of lists searched per query.

    PYTHONPATH=$PWD python scripts/index_recall_on_reads.py outputs/smollm2_passkey_cpu --distance 65536 \
        --examples 20 --probes 32 128 512 --text data/books/test/persuasion.txt --dtype bfloat16

Each example's memory is built as the evaluation builds it (`SharedHaystack`: the haystack read once, its faiss
index built while reading, the example's head added to it). The model reads the question and the right reply
(teacher forcing), and every read that predicts a token of the reply is searched twice: exactly, and through the
index. Prints, for each setting, the share of the exact top-k the index also picks (recall@k), and for the reads
whose best entry is one of the example's own (the needle's segments), the share where the index picks it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_memlm  # noqa: F401  (registers the memlm auto classes)
from hf_memlm import memory_kv_index
from hf_memlm.evaluation import environment, environment_line
from hf_memlm.evaluation.chat_passkey import HEAD_SEGMENTS, chat_prompt_ids, draw_example, held_out_haystack
from hf_memlm.evaluation.shared_haystack import SharedHaystack


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a saved chat pass-key folder with its tokenizer")
    parser.add_argument("--distance", type=int, required=True, help="haystack tokens after the example's head")
    parser.add_argument("--examples", type=int, default=20)
    parser.add_argument("--probes", type=int, nargs="+", default=[32], help="lists searched per query, each setting")
    parser.add_argument("--topk", type=int, default=4, help="memory_topk at load time")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--text", required=True, help="held-out text for the haystack and the examples")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--list-codes",
        default=None,
        choices=["QT_8bit", "QT_6bit", "QT_4bit"],
        help="the lists' scalar quantizer instead of the library's (memory_kv_index._LIST_CODES)",
    )
    parser.add_argument("--candidates", type=int, default=None, help="candidates re-scored per query (default 16)")
    parser.add_argument(
        "--exact-outliers",
        type=int,
        default=None,
        help="outlying entries per head scored one by one before they get lists of their own (default "
        f"{memory_kv_index._EXACT_OUTLIERS:,}; a large number: always one by one)",
    )
    parser.add_argument("--output", help="also write the figures to this JSON file")
    parser.add_argument(
        "--outlier-probe-fraction",
        type=int,
        default=None,
        help=f"scan one of this many of the outlying entries' lists (default {memory_kv_index._OUTLIER_PROBE_FRACTION})",
    )
    args = parser.parse_args(argv)
    if args.list_codes:
        memory_kv_index._LIST_CODES = args.list_codes
    if args.exact_outliers is not None:
        memory_kv_index._EXACT_OUTLIERS = args.exact_outliers
    if args.outlier_probe_fraction is not None:
        memory_kv_index._OUTLIER_PROBE_FRACTION = args.outlier_probe_fraction
    if args.candidates:
        memory_kv_index._MIN_CANDIDATES = args.candidates
        memory_kv_index._CANDIDATES_PER_PICK = max(1, args.candidates // args.topk)
    model = AutoModelForCausalLM.from_pretrained(
        args.model,
        memory_topk=args.topk,
        memory_size=args.distance + 8192,
        memory_search="auto",
        dtype=getattr(torch, args.dtype),
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    print(environment_line(environment()), flush=True)
    (layer,) = model.config.memory_layers
    block, segment = model.memory_blocks[str(layer)], model.config.segment_length
    rng = np.random.default_rng(args.seed)
    distance = -(-args.distance // segment) * segment  # whole segments, as the evaluation reads them
    text = Path(args.text).read_text(encoding="utf-8")
    filler, haystack = held_out_haystack(tokenizer, text, rng, segment, distance)
    shared = SharedHaystack(model, torch.from_numpy(haystack), HEAD_SEGMENTS, lengths=[distance])
    own_entries = shared.head_entries + 1  # the example's segments and the entry that joins them to the haystack

    captured = []  # the hidden states each read of the forward sees
    hook = block.register_forward_hook(
        lambda _, args, kwargs, __: captured.append(args[0]) if kwargs.get("mode") == "read" else None,
        with_kwargs=True,
    )
    found = {probes: {"recall": [], "own_best": 0, "own_best_found": 0} for probes in args.probes}
    for _ in range(args.examples):
        example = draw_example(rng, tokenizer, filler, segment, 1)
        prompt = chat_prompt_ids(tokenizer, example["name"])
        reply = tokenizer(f"The pass key is {example['key']}.", add_special_tokens=False)["input_ids"]
        state = shared.state(torch.from_numpy(example["head"]), distance)
        captured.clear()
        with torch.no_grad():
            model(torch.tensor([prompt + reply]), memory_state=state)
        if len(captured) != 1:  # a second segment would read a memory that holds the first: not `state`
            raise ValueError(f"the question and its reply ({len(prompt + reply)} tokens) must fit one segment.")
        hidden = captured[0][:, len(prompt) - 1 : -1]  # the reads that predict the reply's tokens
        layer_state = state.layers[layer]
        with torch.no_grad():
            block.search = "exact"
            exact, _ = block.select_entries(hidden, layer_state)
            block.search = "auto"
            for probes, tally in found.items():
                block.search_probes = probes
                picks, picked = block.select_entries(hidden, layer_state)
                picks = picks.masked_fill(~picked, -1)
                hits = (exact[..., :, None] == picks[..., None, :]).any(-1)  # (1, H, T, k)
                tally["recall"].append(hits.float().mean().item())
                best_is_own = exact[..., 0] < own_entries  # exact top-k comes sorted: [..., 0] is the best
                tally["own_best"] += int(best_is_own.sum())
                tally["own_best_found"] += int((best_is_own & hits[..., 0]).sum())
    hook.remove()
    figures = {
        probes: {
            "recall_at_k": float(np.mean(tally["recall"])),
            "own_best_reads": tally["own_best"],
            "own_best_found": tally["own_best_found"] / max(tally["own_best"], 1),
        }
        for probes, tally in found.items()
    }
    print(f"{args.examples} examples, key {args.distance:,} tokens back, top-{args.topk} reads of the reply's tokens")
    for probes, figure in figures.items():
        print(
            f"  {probes:4d} lists per query: recall@{args.topk} {figure['recall_at_k']:.3f}; the example's own entry "
            f"was the best in {figure['own_best_reads']} reads, found in {figure['own_best_found']:.3f} of them"
        )
    results = {"figures": figures, "settings": vars(args), "environment": environment()}
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
