"""The chat pass-key curve of a trained folder at distances of your choice, without baselines: a quick look at a
recipe before its config's full evaluation (`evaluation.task: chat_passkey`).

    PYTHONPATH=$PWD python scripts/chat_passkey_distances.py outputs/smollm2_passkey_cpu \
        --distances 256 16384 65536 --examples 30

Each example's document (its own 4 segments with the needle, then held-out text read as a shared haystack) is
read into memory, the question is asked in a fresh call through the chat template, and the answer is right when
its first number is the key (`hf_memlm.evaluation.chat_passkey`). Prints exact match per distance and the misses.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_memlm  # noqa: F401  (registers the memlm auto classes)
from hf_memlm.evaluation import environment, environment_line
from hf_memlm.evaluation.chat_passkey import ChatPasskeySettings, evaluate_chat_passkey

HELD_OUT = Path(__file__).resolve().parents[1] / "data" / "books" / "held_out" / "moby_dick.txt"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a saved memory model folder with its tokenizer")
    parser.add_argument("--distances", type=int, nargs="+", required=True, help="haystack tokens after the needle")
    parser.add_argument("--examples", type=int, default=30, help="examples per distance")
    parser.add_argument("--topk", type=int, default=4, help="memory_topk at load time")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--text", default=str(HELD_OUT), help="held-out text (default: Moby-Dick)")
    args = parser.parse_args(argv)
    memory_size = max(args.distances) + 8192  # the haystack, the example's own segments and the question
    model = AutoModelForCausalLM.from_pretrained(args.model, memory_topk=args.topk, memory_size=memory_size)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    print(environment_line(environment()), flush=True)
    settings = ChatPasskeySettings.memory_only(args.distances, args.examples, seed=args.seed)
    results = evaluate_chat_passkey(model, tokenizer, Path(args.text).read_text(encoding="utf-8"), settings, False)
    for row in results["rows"]:
        print(f"key {row['distance']:,} tokens back: exact match {row['memory']:.3f} ({row['examples']} examples)")
    for answer in results["answers"]:
        if not answer["memory_correct"]:
            print(f"  missed at {answer['distance']:,}: {answer['key']!r} answered {answer['memory']!r}")


if __name__ == "__main__":
    main()
