"""Which needle a chat pass-key report's answers came from, for reports written before answers kept the other
needles' keys: the examples are drawn again from the report's seed (no model runs), and each answer's number is
looked up among its example's needles.

    PYTHONPATH=$PWD python scripts/chat_passkey_replay.py docs/results/smollm2_passkey/chat_passkey.json \
        --text data/books/test/persuasion.txt

Prints, per row of the report: examples, right answers, answers that gave another needle's key, other misses.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from hf_memlm.evaluation.chat_passkey import (
    ChatPasskeySettings,
    _whole_segments,
    draw_example,
    first_number,
    held_out_haystack,
)
from hf_memlm.integrations.gguf import load_base_tokenizer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", help="a chat_passkey.json written by the evaluation")
    parser.add_argument("--text", required=True, help="the held-out text the evaluation read")
    parser.add_argument("--tokenizer", default="smollm2-135m-instruct", help="the model's tokenizer (base or folder)")
    args = parser.parse_args(argv)
    report = json.loads(Path(args.report).read_text(encoding="utf-8"))
    settings, segment = ChatPasskeySettings(**report["settings"]), report["segment_length"]
    tokenizer = load_base_tokenizer(args.tokenizer)
    rng = np.random.default_rng(settings.seed)
    longest = max(_whole_segments(d, segment) for d, _, _ in settings.plan())
    filler, _ = held_out_haystack(tokenizer, Path(args.text).read_text(encoding="utf-8"), rng, segment, longest)
    answers = iter(report["answers"])
    for distance, count, needles in settings.plan():
        right = other = 0
        for _ in range(count):
            example = draw_example(rng, tokenizer, filler, segment, needles)
            answer = next(answers)
            if answer["key"] != example["key"]:
                raise SystemExit(f"the replay drew key {example['key']}, the report has {answer['key']}: wrong --text?")
            given = first_number(answer["memory"])
            right += given == example["key"]
            other += given in example["other_keys"]
        print(
            f"{needles} needle(s), {distance:,} back: {count} examples, {right} right, {other} another needle's key, "
            f"{count - right - other} other misses"
        )


if __name__ == "__main__":
    main()
