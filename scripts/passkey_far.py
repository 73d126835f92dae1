"""Passkey exact match of a saved memory model with the key far back (16k to 1M tokens), in held-out text.

The quick check behind the recipe notes of `configs/passkey_1m_cpu.yaml`: load a trained model with its
memory settings changed at load time, hide the key in the first segment of `--segments` segments of
*Moby-Dick* (`data/books/held_out`, the validation book recipes are chosen on; `--text
data/books/test/persuasion.txt` for the test book), ask at the end, and print exact match per length and the misses.

    PYTHONPATH=$PWD python scripts/passkey_far.py outputs/passkey_cpu --segments 257 1025 4097 --topk 32
    PYTHONPATH=$PWD python scripts/passkey_far.py outputs/passkey_1m_cpu --segments 16385 --topk 4

The full curve with baselines is the config's own evaluation section; this script only scores the memory
model, on `--examples` examples per length (drawn with `--seed`, 1000 as the config's evaluation; runs with other
seeds score other examples, so a long evaluation can be split into runs that each hold less in memory).
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_memlm  # noqa: F401  (registers the memlm auto classes)
from hf_memlm.evaluation import environment, environment_line, evaluate_retrieval, retrieval_dataset

HELD_OUT = Path(__file__).resolve().parents[1] / "data" / "books" / "held_out" / "moby_dick.txt"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a saved memory model folder (hf-memlm train's output_dir)")
    parser.add_argument("--segments", type=int, nargs="+", required=True, help="example lengths in segments")
    parser.add_argument("--examples", type=int, default=20, help="examples per length")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1000, help="seed that draws the examples")
    parser.add_argument("--topk", default="32", help="memory_topk at load time (an integer, or none)")
    parser.add_argument("--search", default="exact", choices=("exact", "auto"), help="memory_search at load time")
    parser.add_argument("--dtype", default="float16", help="memory_dtype at load time")
    parser.add_argument("--memory-size", type=int, default=1_100_000, help="memory_size at load time")
    parser.add_argument(
        "--text", default=str(HELD_OUT), help="filler text file (default: Moby-Dick, data/books/held_out)"
    )
    args = parser.parse_args(argv)
    topk = None if args.topk == "none" else int(args.topk)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, memory_size=args.memory_size, memory_topk=topk, memory_search=args.search, memory_dtype=args.dtype
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    print(environment_line(environment()), flush=True)
    options = {"needle_segment": 0, "filler": "natural", "text": Path(args.text).read_text(encoding="utf-8")}
    for segments in args.segments:
        start = time.perf_counter()
        dataset = retrieval_dataset(
            "passkey", tokenizer, args.examples, model.config.segment_length, [segments], args.seed, options
        )
        results = evaluate_retrieval(
            model, dataset, batch_size=args.batch_size, baselines=False, task="passkey", progress=False
        )
        metrics = results["overall"]["metrics"]["memory"]
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(
            f"key {(segments - 1) * model.config.segment_length:,} tokens back: exact match "
            f"{metrics['exact_match']:.3f}, digits {metrics['token_accuracy']:.3f} ({args.examples} examples, "
            f"seed {args.seed}, {time.perf_counter() - start:.0f} s, peak RSS {rss:.1f} GB)",
            flush=True,
        )
        for answer in results["answers"]:
            if not answer["exact"]["memory"]:
                wanted, got = tokenizer.decode(answer["target"]), tokenizer.decode(answer["predicted"]["memory"])
                print(f"  missed: {wanted!r} read as {got!r}")


if __name__ == "__main__":
    main()
