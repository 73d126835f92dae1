"""Associative recall (MQAR) capacity curve: exact match against the number of key-value pairs written, per memory
kind, with the queries D segments after the pairs. Trains a tiny memory LM from scratch per kind, on 2 CPU cores.

    PYTHONPATH=$PWD python scripts/recall_capacity.py --output-dir outputs/recall_capacity
    PYTHONPATH=$PWD python scripts/recall_capacity.py --quick --output-dir /tmp/recall_quick   # seconds: a smoke test

Writes recall_capacity.json (every point and the settings), recall_capacity.md (the table) and
recall_capacity.png (x: pairs written, y: exact match; one panel per distance, one line per memory).

Task (`make_recall_dataset` with single-token keys): pairs " K7" (a key from the 84 printable non-digit ASCII
characters, a digit value; 21 pairs fill a segment of 64 byte tokens) are written in the first
ceil(pairs / 21) segments, then D segments later the last segment asks up to 21 of them (" K" -> "7"), loss on
the values only. Chance (a uniform digit) is 0.1. `--key-length 2` writes " ab:7" instead (12 pairs to a segment). Each kind trains on a curriculum: first 1-10 pairs with the
queries in the next segment, then 1-84 pairs with the queries 1-6 segments after the last pair segment.

Model: the 2-layer, 64-wide Llama of configs/passkey_cpu.yaml (byte tokens, segments of 64, memory beside layer 0,
value shift 1, AdamW 2e-3 / memory 6e-3, beta2 0.98, 20 warm-up steps). Exact match is teacher-forced (the argmax
given the true text before it, = greedy generation of the one-token answer), scored by
`hf_memlm.evaluation.conditions.streamed_predictions` with memory and with memory disabled.
"""

from __future__ import annotations

import argparse
import json
import math
import string
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hf_memlm import MemLMConfig, MemLMForCausalLM
from hf_memlm.data import build_tokenizer, make_recall_dataset, tokenizer_size
from hf_memlm.data.tasks import RECALL_SINGLE_TOKEN_KEYS
from hf_memlm.evaluation.conditions import shift_labels, streamed_predictions
from hf_memlm.recipes.defaults import tiny_llama_config

SEGMENT_LENGTH = 64
VALUE_ALPHABET = string.digits
# --key-length 1 (the curve): " K7", a one-token key right before its value, 21 pairs to a segment.
# --key-length 2: " ab:7", two letters and a separator, 12 pairs to a segment: the memory beside layer 0 sees
# the key only if the first attention layer has carried the letters into the ":" before the value.
KEY_FORMATS = {
    1: {"key_alphabet": RECALL_SINGLE_TOKEN_KEYS, "separator": "", "example": "' K7' (one-token key, digit value)"},
    2: {"key_alphabet": string.ascii_lowercase, "separator": ":", "example": "' ab:7' (two-letter key, digit value)"},
}
EASY_MAX_PAIRS = 10  # the curriculum's first phase: few pairs, queried in the next segment
CHANCE = 1.0 / len(VALUE_ALPHABET)
FILE_STEM = "recall_capacity"

FULL = {
    "memories": ["slot:16", "slot:64", "slot:256", "kv"],
    "pairs": [1, 2, 4, 8, 16, 32, 48, 64, 84],
    "distances": [4, 16],
    "steps": 400,
    "easy_steps": 150,
    "batch_size": 16,
    "max_train_distance": 6,
    "eval_examples": 40,
}
QUICK = {
    "memories": ["slot:16", "kv"],
    "pairs": [1, 4],
    "distances": [1, 2],
    "steps": 6,
    "easy_steps": 3,
    "batch_size": 4,
    "max_train_distance": 2,
    "eval_examples": 3,
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True, help="folder for recall_capacity.{json,md,png}")
    parser.add_argument("--quick", action="store_true", help="a few steps and points: checks the pipeline only")
    parser.add_argument(
        "--memories",
        nargs="+",
        help="kinds to train: slot:<num_slots> or kv (default: slot:16 slot:64 slot:256 kv)",
    )
    parser.add_argument("--pairs", nargs="+", type=int, help="numbers of pairs written (x axis)")
    parser.add_argument("--distances", nargs="+", type=int, help="segments from the last pair segment to the queries")
    parser.add_argument("--steps", type=int, help="training steps per kind (curriculum included)")
    parser.add_argument("--easy-steps", type=int, help="first steps on 1-10 pairs queried in the next segment")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--max-train-distance", type=int, help="training queries 1..this many segments after pairs")
    parser.add_argument("--eval-examples", type=int, help="examples per point (each asks up to 21 pairs)")
    parser.add_argument("--key-length", type=int, choices=sorted(KEY_FORMATS), default=1, help="1: ' K7'; 2: ' ab:7'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the shared machine: 1)")
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.memories = [parse_memory(spec) for spec in args.memories]
    for name in ("pairs", "distances"):
        if any(value < 1 for value in getattr(args, name)):
            parser.error(f"--{name} must be positive integers, got {getattr(args, name)}")
    keys = len(KEY_FORMATS[args.key_length]["key_alphabet"]) ** args.key_length
    if max(args.pairs) > keys:
        parser.error(f"--pairs: at most {keys} distinct keys of --key-length {args.key_length} exist")
    for name in ("steps", "batch_size", "max_train_distance", "eval_examples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0 <= args.easy_steps <= args.steps:
        parser.error(f"--easy-steps must be from 0 to --steps ({args.steps}), got {args.easy_steps}")
    return args


def parse_memory(spec: str) -> dict:
    """ "slot:64" -> slot memory with 64 slots per head; "kv" -> kv memory (every token kept, up to 2048)."""
    kind, _, slots = spec.partition(":")
    if kind == "kv" and not slots:
        return {"kind": "kv", "num_slots": None, "label": "kv"}
    if kind == "slot" and slots.isdigit() and int(slots) > 0:
        return {"kind": "slot", "num_slots": int(slots), "label": f"slot, {int(slots)} slots"}
    raise SystemExit(f"--memories: {spec!r} is not understood; write slot:<number of slots> (e.g. slot:64) or kv.")


def build_model(memory: dict, vocab_size: int, seed: int) -> MemLMForCausalLM:
    torch.manual_seed(seed)
    text = tiny_llama_config(vocab_size, max_positions=256)  # the main job's 2-layer, 64-wide Llama
    own = {"kv": {"memory_size": 2048, "memory_topk": None}, "slot": {"num_slots": memory["num_slots"]}}
    config = MemLMConfig(
        text_config=text,
        memory_type=memory["kind"],
        memory_layers=[0],
        segment_length=SEGMENT_LENGTH,
        memory_heads=4,
        memory_value_shift=1,
        **own[memory["kind"]],
    )
    return MemLMForCausalLM(config)


def pairs_per_segment(key_length: int) -> int:
    """Pairs " <key><separator><digit>" that fit in one segment (21 for " K7", 12 for " ab:7")."""
    return SEGMENT_LENGTH // (1 + key_length + len(KEY_FORMATS[key_length]["separator"]) + 1)


def recall_data(tokenizer, num_examples: int, num_pairs: int, distance: int, seed: int, key_length: int = 1):
    """Pairs in the first ceil(num_pairs / per segment) segments, as many as a segment holds asked `distance`
    segments later."""
    per_segment = pairs_per_segment(key_length)
    write_segments = math.ceil(num_pairs / per_segment)
    return make_recall_dataset(
        tokenizer,
        num_examples,
        SEGMENT_LENGTH,
        write_segments + distance,
        num_pairs=num_pairs,
        num_queries=min(num_pairs, per_segment),
        write_segments=write_segments,
        key_length=key_length,
        key_alphabet=KEY_FORMATS[key_length]["key_alphabet"],
        value_length=1,
        value_alphabet=VALUE_ALPHABET,
        separator=KEY_FORMATS[key_length]["separator"],
        seed=seed,
    )


def train(model, tokenizer, args, log) -> dict:
    memory = [p for name, p in model.named_parameters() if name.startswith("memory_blocks")]
    rest = [p for name, p in model.named_parameters() if not name.startswith("memory_blocks")]
    optimizer = torch.optim.AdamW(
        [{"params": rest, "lr": 2e-3}, {"params": memory, "lr": 6e-3}], betas=(0.9, 0.98), weight_decay=0.0
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 20))
    rng = np.random.default_rng(args.seed)
    most_pairs = max(args.pairs)
    start, smoothed = time.time(), None
    model.train()
    for step in range(args.steps):
        easy = step < args.easy_steps
        num_pairs = int(rng.integers(1, min(EASY_MAX_PAIRS, most_pairs) + 1 if easy else most_pairs + 1))
        distance = 1 if easy else int(rng.integers(1, args.max_train_distance + 1))
        # training seeds start at 10**6, evaluation seeds stay below it: the two never draw the same stream
        seed = 10**6 + args.seed * 10**4 + step
        rows = recall_data(tokenizer, args.batch_size, num_pairs, distance, seed, args.key_length)[:]
        loss = model(torch.tensor(rows["input_ids"]), labels=torch.tensor(rows["labels"])).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        smoothed = loss.item() if smoothed is None else 0.9 * smoothed + 0.1 * loss.item()
        if (step + 1) % 25 == 0 or step + 1 == args.steps:
            log(f"  step {step + 1}/{args.steps} loss {smoothed:.3f} ({time.time() - start:.0f}s)")
    model.eval()
    return {"train_seconds": round(time.time() - start, 1), "final_loss": round(smoothed, 4)}


def exact_match(model, dataset, use_memory: bool, batch_size: int = 20) -> tuple[int, int]:
    """(answers right, answers) over the values of `dataset` (one token each), teacher-forced."""
    right = total = 0
    for first in range(0, len(dataset), batch_size):
        rows = dataset[first : first + batch_size]
        ids, labels = torch.tensor(rows["input_ids"]), torch.tensor(rows["labels"])
        targets = shift_labels(labels)
        predicted, _ = streamed_predictions(model, ids, torch.ones_like(ids), targets, use_memory=use_memory)
        scored = targets != -100
        right += int((predicted[scored] == targets[scored]).sum())
        total += int(scored.sum())
    return right, total


def evaluate(model, tokenizer, args, log) -> list[dict]:
    points = []
    for distance in args.distances:
        for num_pairs in args.pairs:
            seed = 1000 * distance + num_pairs
            dataset = recall_data(tokenizer, args.eval_examples, num_pairs, distance, seed, args.key_length)
            right, answers = exact_match(model, dataset, use_memory=True)
            right_off, _ = exact_match(model, dataset, use_memory=False)
            back = dataset["distance_segments"]
            point = {
                "pairs": num_pairs,
                "distance": distance,
                "num_segments": len(dataset[0]["input_ids"]) // SEGMENT_LENGTH,
                "answers": answers,
                "segments_back_min": min(min(row) for row in back),
                "segments_back_max": max(max(row) for row in back),
                "memory": right / answers,
                "memory_disabled": right_off / answers,
            }
            points.append(point)
            log(
                f"  {num_pairs:3d} pairs, {distance:2d} segments later: with memory {point['memory']:.2f}, "
                f"memory disabled {point['memory_disabled']:.2f} ({answers} answers)"
            )
    return points


def write_markdown(results: dict, path: Path) -> None:
    runs, distances = results["runs"], results["settings"]["distances"]
    header = ["pairs written"] + [f"{run['label']}, {d} later" for d in distances for run in runs]
    lines = [
        "# Associative recall (MQAR) capacity",
        "",
        f"Pairs {results['format']}, {results['pairs_per_segment']} to a segment of {SEGMENT_LENGTH} tokens.",
        f"Exact match of the queried values with memory ({results['answers_per_point_max']} answers at most per "
        f"cell); chance {CHANCE:.2f}; memory disabled at most {results['memory_disabled_max']:.2f} over all cells.",
        f"Command: `{results['command']}`",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |",
    ]
    table = {(run["label"], p["distance"], p["pairs"]): p["memory"] for run in runs for p in run["points"]}
    for num_pairs in results["settings"]["pairs"]:
        cells = [f"{table[(run['label'], d, num_pairs)]:.2f}" for d in distances for run in runs]
        lines.append(f"| {num_pairs} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Training per kind: "
        + "; ".join(f"{run['label']} {run['train_seconds']:.0f} s, final loss {run['final_loss']:.3f}" for run in runs)
        + ".",
    ]
    path.write_text("\n".join(lines) + "\n")


def write_plot(results: dict, path: Path) -> None:
    """One panel per distance, one line per memory; equal curves (often at 1.00) are shifted sideways a little."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, distances, pairs = results["runs"], results["settings"]["distances"], results["settings"]["pairs"]
    figure, axes = plt.subplots(1, len(distances), figsize=(5 * len(distances) + 2, 4.8), sharey=True, squeeze=False)
    markers = ["o", "s", "^", "D", "v", "P"]
    colours = plt.get_cmap("tab10")
    for axis, distance in zip(axes[0], distances):
        for number, run in enumerate(runs):
            points = [p for p in run["points"] if p["distance"] == distance]
            shift = 2 ** (0.05 * (number - (len(runs) - 1) / 2))  # log axis: the same small shift at every x
            axis.plot(
                [p["pairs"] * shift for p in points],
                [p["memory"] for p in points],
                marker=markers[number % len(markers)],
                markersize=5,
                color=colours(number),
                label=run["label"],
            )
        disabled = max(p["memory_disabled"] for run in runs for p in run["points"] if p["distance"] == distance)
        axis.axhline(
            disabled, color="black", linestyle=":", linewidth=1, label=f"memory disabled, max ({disabled:.2f})"
        )
        axis.axhline(CHANCE, color="grey", linestyle="--", linewidth=1, label=f"chance ({CHANCE:.2f})")
        axis.set_xscale("log", base=2)
        axis.set_xticks(pairs, [str(p) for p in pairs])
        axis.minorticks_off()
        axis.set_ylim(-0.02, 1.04)
        axis.set_xlabel("key-value pairs written")
        axis.set_title(f"queried {distance} segment{'s' if distance != 1 else ''} after the last pair")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("exact match of the queried value")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    figure.suptitle(f"Associative recall (MQAR) over segments of 64 tokens: pairs {results['format']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer("byte")

    def log(message: str) -> None:
        print(message, flush=True)

    runs = []
    for memory in args.memories:
        log(f"{memory['label']}: training")
        model = build_model(memory, tokenizer_size(tokenizer), args.seed)
        run = {**memory, **train(model, tokenizer, args, log)}
        log(f"{memory['label']}: evaluating")
        run["points"] = evaluate(model, tokenizer, args, log)
        runs.append(run)
    settings = {
        name: getattr(args, name)
        for name in ("pairs", "distances", "steps", "easy_steps", "batch_size", "max_train_distance", "eval_examples")
    }
    results = {
        "task": "recall",
        "format": KEY_FORMATS[args.key_length]["example"],
        "key_length": args.key_length,
        "key_alphabet": KEY_FORMATS[args.key_length]["key_alphabet"],
        "separator": KEY_FORMATS[args.key_length]["separator"],
        "value_alphabet": VALUE_ALPHABET,
        "segment_length": SEGMENT_LENGTH,
        "pairs_per_segment": pairs_per_segment(args.key_length),
        "chance": CHANCE,
        "command": "python scripts/recall_capacity.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {**settings, "seed": args.seed, "quick": args.quick},
        "memory_disabled_max": max(p["memory_disabled"] for run in runs for p in run["points"]),
        "answers_per_point_max": max(p["answers"] for run in runs for p in run["points"]),
        "runs": runs,
    }
    (output_dir / f"{FILE_STEM}.json").write_text(json.dumps(results, indent=1) + "\n")
    write_markdown(results, output_dir / f"{FILE_STEM}.md")
    write_plot(results, output_dir / f"{FILE_STEM}.png")
    log(f"wrote {output_dir}/{FILE_STEM}.json, .md, .png")
    return results


if __name__ == "__main__":
    main()
