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
memory_weight_decay, read_loss_weight)
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
    from hf_memlm.recipes.config import ConfigError, dump_config, load_train_config
    from hf_memlm.recipes.pipeline import ComparisonError, check_config, prepare, run_pipeline

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
        prepared = prepare(config)
    except (ConfigError, ValueError, OSError) as error:
        return fail("train", str(error))
    try:  # prepare -> train -> compare -> evaluate -> publish
        run_pipeline(prepared, config_path=args.config)
    except ComparisonError as error:
        return fail("train", str(error))
    return 0


def _quiet_libraries() -> None:
    # Keep the console to progress bars, our summary and real warnings.
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()
