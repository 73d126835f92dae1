"""Passkey retrieval through lm-evaluation-harness: `--model hf` next to `--model hf-memlm`, and our own
evaluation of the same examples.

    python scripts/lm_eval_passkey.py outputs/passkey_cpu --num-segments 9 --num-examples 100

Writes the examples as a local lm-eval task (`passkey.jsonl` + `passkey_local.yaml` in --output-dir): a
multiple choice between the true key and `--num-choices - 1` random keys after the question, scored by
log-likelihood. (Multiple choice, because lm-eval moves the space before the key into the continuation, and
a model trained with the loss on the key digits only never learned to predict that space.) Runs it with
both model types and prints a Markdown table next to our teacher-forced exact match of the key
(`hf_memlm.evaluation`, a stricter measure: every digit must be the most likely token).
Needs `pip install "hf-memlm[lm-eval]"` and a model folder with its tokenizer (`hf-memlm train` writes both).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--num-segments", type=int, default=9, help="example length; the key is in segment 0")
    parser.add_argument("--num-examples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--num-choices", type=int, default=10, help="the true key and random others")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output-dir", default="outputs/lm_eval_passkey")
    args = parser.parse_args(argv)

    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_memlm.integrations.lm_eval  # noqa: F401  (registers hf-memlm)
    from hf_memlm.data import make_passkey_dataset
    from hf_memlm.evaluation import MEMORY, evaluate_retrieval

    torch.set_num_threads(max(1, torch.get_num_threads()))
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir).eval()
    dataset = make_passkey_dataset(
        tokenizer,
        args.num_examples,
        model.config.segment_length,
        args.num_segments,
        needle_segment=0,
        seed=args.seed,
    )
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    with open(output_dir / "passkey.jsonl", "w") as handle:
        for row in dataset:
            start = row["answer_start"]
            context = tokenizer.decode(row["input_ids"][:start])
            answer = tokenizer.decode(row["input_ids"][start : start + row["answer_length"]])
            others = set()
            while len(others) < args.num_choices - 1:
                other = str(rng.randint(10 ** (len(answer) - 1), 10 ** len(answer) - 1))
                if other != answer:
                    others.add(other)
            choices = [answer, *sorted(others)]
            handle.write(json.dumps({"context": context, "choices": choices, "gold": 0}) + "\n")
    (output_dir / "passkey_local.yaml").write_text(
        "task: passkey_local\n"
        "dataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {json.dumps(str((output_dir / 'passkey.jsonl').resolve()))}}}}}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{gold}}"\n'
        "target_delimiter: ''\n"
        "metric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
    )
    task_manager = TaskManager(include_path=str(output_dir))
    scores = {}
    for model_type in ("hf", "hf-memlm"):
        results = lm_eval.simple_evaluate(
            model=model_type,
            model_args={"pretrained": args.model_dir},
            tasks=["passkey_local"],
            task_manager=task_manager,
            batch_size=args.batch_size,
            device="cpu",
        )
        scores[model_type] = results["results"]["passkey_local"]["acc,none"]
    ours = evaluate_retrieval(model, dataset, batch_size=args.batch_size, baselines=False, progress=False)
    scores["hf_memlm.evaluation"] = ours["overall"]["metrics"][MEMORY]["exact_match"]

    tokens = len(dataset[0]["input_ids"])
    print(
        f"\npasskey, {args.num_examples} examples of {args.num_segments} segments ({tokens} tokens), key in segment 0"
    )
    print(f"base model's max_position_embeddings: {model.config.text_config.max_position_embeddings}\n")
    print("| evaluation | accuracy |\n| --- | ---: |")
    print(f"| lm-eval `--model hf`, true key among {args.num_choices} | {scores['hf']:.3f} |")
    print(f"| lm-eval `--model hf-memlm`, true key among {args.num_choices} | {scores['hf-memlm']:.3f} |")
    print(f"| `hf_memlm.evaluation`, exact match of the key | {scores['hf_memlm.evaluation']:.3f} |")
    print(f"\nchance: {1 / args.num_choices:.3f} for the choice")
    return scores


if __name__ == "__main__":
    main()
