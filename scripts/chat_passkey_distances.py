"""The chat pass-key curve of a trained folder at distances of your choice, without baselines: a quick look at a
recipe before its config's full evaluation (`evaluation.task: chat_passkey`).

    PYTHONPATH=$PWD python scripts/chat_passkey_distances.py outputs/smollm2_passkey_cpu \
        --distances 256 16384 65536 --examples 30

Each example's document (its own 4 segments with the needle, then held-out text read as a shared haystack) is
read into memory, the question is asked in a fresh call through the chat template, and the answer is right when
its first number is the key (`hf_memlm.evaluation.chat_passkey`). Prints exact match per distance and the misses.

With the same seed, distances and examples per distance as a config's evaluation, the single-needle examples are
the config's own (only the draws of examples use the seed), so `--dtype bfloat16` reruns a trained model's curve in
the dtype that reads fastest, answer by answer beside the config's report:

    PYTHONPATH=$PWD python scripts/chat_passkey_distances.py outputs/smollm2_passkey_cpu \
        --distances 16384 65536 262144 1048576 --examples 100 100 50 20 --text data/books/test/persuasion.txt \
        --dtype bfloat16 --output bfloat16_curve.json

`--base-inside-examples N` adds the base model alone with a 4,096-token document inside its window (N examples;
the figure does not depend on the memory, and with no `--distances` nothing is read into memory):

    PYTHONPATH=$PWD python scripts/chat_passkey_distances.py outputs/smollm2_passkey_cpu --base-inside-examples 100 \
        --text data/books/test/persuasion.txt

Reads are exact by default. `--search auto` reads through the approximate index (faiss IVF, `--probes` lists per
query), as a user's read of a long document does: the examples share one haystack read (`SharedHaystack`), which
builds the index once while it reads and keeps a copy at each distance; each example's head is added to it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_memlm  # noqa: F401  (registers the memlm auto classes)
from hf_memlm.evaluation import environment, environment_line
from hf_memlm.evaluation.chat_passkey import ChatPasskeySettings, evaluate_chat_passkey
from hf_memlm.evaluation.report import reading_dtype

HELD_OUT = Path(__file__).resolve().parents[1] / "data" / "books" / "held_out" / "moby_dick.txt"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a saved memory model folder with its tokenizer")
    parser.add_argument(
        "--distances", type=int, nargs="*", default=[], help="haystack tokens after the needle (none: base model only)"
    )
    parser.add_argument(
        "--examples", type=int, nargs="+", default=[30], help="examples per distance: one count, or one per distance"
    )
    parser.add_argument("--topk", type=int, default=4, help="memory_topk at load time")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--text", default=str(HELD_OUT), help="held-out text (default: Moby-Dick)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["auto", "float32", "bfloat16"],
        help="the model's and memory's (auto: bfloat16 on a GPU or an AVX-512 CPU, else float32)",
    )
    parser.add_argument(
        "--search", default="exact", choices=["exact", "auto"], help="exact reads, or the approximate index"
    )
    parser.add_argument("--probes", type=int, default=None, help="memory_search_probes (default: the model's)")
    parser.add_argument(
        "--memory-dtype", default=None, help="memory_dtype: the entries' storage dtype (default: the model's dtype)"
    )
    parser.add_argument(
        "--memory-value-dtype", default=None, help="memory_value_dtype: the values' storage dtype (default: the keys')"
    )
    parser.add_argument(
        "--needle-distances",
        type=int,
        nargs="*",
        default=[],
        help="also these distances with the key among 3 other named needles, one asked (the config's multi-needle row)",
    )
    parser.add_argument("--needle-examples", type=int, default=30, help="examples per --needle-distances distance")
    parser.add_argument(
        "--base-inside-examples",
        type=int,
        default=0,
        help="also the base model alone with a 4,096-token document inside its window: this many examples (they do "
        "not depend on the memory; drawn after the memory's examples)",
    )
    parser.add_argument("--output", help="also write the results (answers, timings, environment) to this JSON file")
    args = parser.parse_args(argv)
    if not args.distances and not args.base_inside_examples:
        parser.error("give --distances, --base-inside-examples or both.")
    if len(args.examples) not in (1, len(args.distances)) and args.distances:
        parser.error(f"--examples takes one count or one per distance ({len(args.distances)}), got {args.examples}.")
    examples = args.examples * len(args.distances) if len(args.examples) == 1 else args.examples
    memory_size = (
        max(args.distances + args.needle_distances, default=0) + 8192
    )  # the haystack, the example's own segments and the question
    model = AutoModelForCausalLM.from_pretrained(
        args.model,
        memory_topk=args.topk,
        memory_size=memory_size,
        memory_search=args.search,
        dtype=reading_dtype(args.dtype),
        **({} if args.probes is None else {"memory_search_probes": args.probes}),
        **({} if args.memory_dtype is None else {"memory_dtype": args.memory_dtype}),
        **({} if args.memory_value_dtype is None else {"memory_value_dtype": args.memory_value_dtype}),
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    measured_in = environment()
    print(environment_line(measured_in), flush=True)
    settings = ChatPasskeySettings.memory_only(
        args.distances,
        examples,
        seed=args.seed,
        multi_needle_distances=args.needle_distances,
        multi_needle_examples=args.needle_examples,
        base_inside_examples=args.base_inside_examples,
    )
    results = evaluate_chat_passkey(model, tokenizer, Path(args.text).read_text(encoding="utf-8"), settings, False)
    results.update(
        environment=measured_in,
        dtype=str(model.dtype).removeprefix("torch."),
        text=args.text,
        search=args.search,
        probes=model.config.memory_search_probes,
    )
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(
        f"haystack read in {results['seconds']['read_haystack']} s; examples {results['seconds']['memory_examples']} s"
    )
    for row in results["rows"]:
        among = "" if row["needles"] == 1 else f" among {row['needles']} named needles"
        if row["needles"] > 1:
            among += (
                f" (another needle's key: {row['memory_other_needle']:.3f}, "
                f"one digit wrong: {row['memory_one_digit_off']:.3f})"
            )
        print(
            f"key {row['distance']:,} tokens back{among}: exact match {row['memory']:.3f} ({row['examples']} examples)"
        )
    inside = results["base_inside_window"]
    if inside["examples"]:
        print(
            f"base model alone, {inside['tokens']:,}-token document inside its window: exact match "
            f"{inside['base_model']:.3f} ({inside['examples']} examples)"
        )
    for answer in results["answers"]:
        if not answer["memory_correct"]:
            name = f" ({answer['name']})" if answer["name"] else ""
            print(f"  missed at {answer['distance']:,}: {answer['key']!r}{name} answered {answer['memory']!r}")


if __name__ == "__main__":
    main()
