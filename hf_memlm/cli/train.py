"""`hf-memlm train CONFIG.yaml [--section.key value ...]`: train a memory LM with transformers.Trainer.

The YAML file gives the settings, flags override them (`--training.learning_rate 1e-3`,
`--model.memory.memory_type slot`, `--output_dir out`); `hf_memlm.recipes.config` parses and checks them.
Unknown keys and bad values are errors that name the key. Everything is checked (config, corpus,
tokenizer, model) before the output folder is created. Runs the same under `python -m hf_memlm train ...`
and `accelerate launch -m hf_memlm train ...`.
"""

from __future__ import annotations

import argparse

from hf_memlm.cli.common import fail

EXAMPLES = """examples:
  hf-memlm train configs/tiny_cpu.yaml
  hf-memlm train configs/tiny_cpu.yaml --training.max_steps 20 --output_dir outputs/try
  hf-memlm train configs/tiny_cpu.yaml --dry-run            # check the config and print it resolved
  accelerate launch --config_file configs/accelerate/ddp_cpu.yaml -m hf_memlm train configs/tiny_cpu.yaml

sections: output_dir, overwrite_output_dir, seed, model (base, base_kwargs, text_config, memory.*, trainable),
lora.* (PEFT LoraConfig), tokenizer.*, data.*, evaluation.*, comparison.*, card.* (license, datasets: the
model card's Hub metadata), training.* (any transformers TrainingArguments field, plus memory_learning_rate,
memory_weight_decay)
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train or fine-tune a memory LM from a YAML config (Trainer, Accelerate, PEFT)",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument(
        "overrides",
        nargs=argparse.REMAINDER,
        metavar="--section.key VALUE",
        help="override config values; --dry-run checks the config and prints it without training",
    )
    parser.add_argument("--dry-run", action="store_true", help=argparse.SUPPRESS)


def run(args) -> int:
    from hf_memlm.recipes.comparison import has_comparison, train_compared_models
    from hf_memlm.recipes.config import ConfigError, dump_config, load_train_config
    from hf_memlm.recipes.train import check_config, prepare_run, publish, run_training

    overrides = list(args.overrides)
    dry_run = args.dry_run or "--dry-run" in overrides
    overrides = [item for item in overrides if item != "--dry-run"]
    try:
        config = load_train_config(args.config, overrides)
        if dry_run:
            check_config(config)
    except (ConfigError, ValueError, OSError) as error:
        return fail("train", str(error))
    if dry_run:
        print(dump_config(config), end="")
        return 0

    _quiet_libraries()
    print(f"hf-memlm train: {args.config} -> {config['output_dir']}", flush=True)
    try:
        prepared = prepare_run(config)
    except (ConfigError, ValueError, OSError) as error:
        return fail("train", str(error))
    if prepared.stale_checkpoints:
        names = ", ".join(p.name for p in prepared.stale_checkpoints)
        print(f"overwrite_output_dir: removing the earlier run's checkpoints ({names})", flush=True)
    summary = run_training(prepared)
    if not summary["is_main_process"]:
        return 0
    print(format_summary(summary), flush=True)
    if "model" not in summary["saved"]:  # a LoRA adapter or sharded weights only: no card, no push
        return 0
    evaluation = None
    if has_comparison(config):
        try:
            runs = train_compared_models(config, prepared.tokenizer)
        except (ValueError, OSError) as error:
            return fail("train", f"comparison: {error}")
        evaluation = _evaluate(config, prepared.tokenizer, runs)
    elif config["evaluation"]["task"] is not None:
        evaluation = _evaluate(config, prepared.tokenizer)
    done = publish(config, summary, evaluation, config_path=args.config)
    if done["model_card"]:
        print(f"model card: {done['model_card']}", flush=True)
    if "pushed_to" in done:
        print(f"pushed to the Hub: {done['pushed_to']}", flush=True)
    return 0


def _evaluate(config: dict, tokenizer, compared_runs: dict | None = None) -> dict:
    import time

    from hf_memlm.evaluation import format_markdown
    from hf_memlm.recipes.comparison import evaluate_comparison
    from hf_memlm.recipes.final_eval import run_final_evaluation

    section = config["evaluation"]
    if section["task"] == "chat_passkey":
        options = section["options"]
        print(
            f"\n== evaluation: pass key asked in chat, {options.get('distances', 'default')} tokens back, "
            f"held-out text {section['source'] or 'the bundled excerpt'}, seed {section['seed']} ==",
            flush=True,
        )
    elif section["task"] == "perplexity":
        print(
            f"\n== evaluation: perplexity by segment on {section['source'] or 'the bundled excerpt'}, up to "
            f"{section['num_examples']} examples of {section['num_segments'][0]} segments ==",
            flush=True,
        )
    else:
        print(
            f"\n== evaluation: {section['task']}, {section['num_examples']} examples per length of "
            f"{'/'.join(map(str, section['num_segments']))} segments, seed {section['seed']} ==",
            flush=True,
        )
    start = time.perf_counter()
    if compared_runs is not None:
        outcome = evaluate_comparison(config, compared_runs, tokenizer)
    else:
        outcome = run_final_evaluation(config, config["output_dir"], tokenizer)
    print()
    print(format_markdown(outcome["results"]))
    print(f"evaluated in {time.perf_counter() - start:.1f} s; wrote: " + ", ".join(outcome["paths"].values()))
    return outcome


def _quiet_libraries() -> None:
    # Keep the console to progress bars, our summary and real warnings.
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()


def format_summary(summary: dict) -> str:
    """The end-of-run report printed by `hf-memlm train`."""
    counts = summary["parameters"]
    lines = ["", "== training finished =="]
    final = summary["final_loss"]
    lines.append(
        f"final loss {final:.4f}"
        if final is not None
        else "final loss: none logged (raise training.max_steps or lower training.logging_steps)"
    )
    lines[-1] += f" | mean loss over the run {summary['mean_train_loss']:.4f}"
    if summary["eval_loss"] is not None:
        lines.append(f"eval loss {summary['eval_loss']:.4f}")
    lines.append(
        f"{summary['steps']} steps in {summary['seconds']:.1f} s on {summary['processes']} process(es)"
        + (f", resumed from {summary['resumed_from']}" if summary["resumed_from"] else "")
    )
    lines.append(
        f"trained {counts['trainable']:,} of {counts['total']:,} parameters ({counts['trainable_memory']:,} in memory)"
    )
    saved = summary["saved"]
    if "model" in saved:
        lines.append(f"model + tokenizer saved to {saved['model']} (load with AutoModelForCausalLM.from_pretrained)")
    if "adapter" in saved:
        lines.append(f"LoRA adapter + memory weights saved to {saved['adapter']} (load with PeftModel.from_pretrained)")
    if summary["removed_checkpoints"]:
        lines.append(f"removed the earlier run's checkpoints: {', '.join(summary['removed_checkpoints'])}")
    if summary["checkpoints"]:
        lines.append(f"checkpoints: {', '.join(summary['checkpoints'])}")
    return "\n".join(lines)
