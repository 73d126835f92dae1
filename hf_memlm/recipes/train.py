"""The training recipe behind `hf-memlm train`: a config (`hf_memlm.recipes.config`) in, a trained model out.

`prepare_run(config)` checks everything training needs before it starts (config values, output folder,
corpus, tokenizer, data, tokenizer-vs-model fit, training arguments) and builds the pieces without
writing anything, so a bad input leaves no half-written output folder behind.
`run_training(prepared)` trains with `MemLMTrainer`, saves the model (`save_pretrained`, reloadable with
`AutoModelForCausalLM`) with its tokenizer, and returns a summary. What comes after training (comparison,
evaluation, model card, upload) is `pipeline.py`'s, which also checks those sections before training.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from hf_memlm.recipes.config import dump_config

logger = logging.getLogger(__name__)

# (read_targets: for the read loss, `training.read_loss_weight`; the Trainer drops it where that is 0)
MODEL_COLUMNS = ("input_ids", "labels", "attention_mask", "read_targets")
# Tasks whose examples vary in length and are labelled only at their end: padded per batch, and the document
# before the labels runs only up to the memory (`LabelledTailCollator`).
TAIL_LABELLED_TASKS = frozenset({"chat_passkey", "chat_suite"})
SUMMARY_FILE = "train_summary.json"
CONFIG_FILE = "train_config.yaml"


@dataclass
class PreparedRun:
    """Everything `run_training` needs, built and checked, nothing written yet."""

    config: dict
    output_dir: Path
    tokenizer: object
    model: object
    train_dataset: object
    eval_dataset: object | None
    training_args: object
    resume_from: str | None = None
    stale_checkpoints: list[Path] = field(default_factory=list)  # removed when training starts
    data_collator: object = None  # None: transformers' default_data_collator


# -- preparation (no writes) ---------------------------------------------------------------------------
def prepare_run(config: dict, tokenizer=None) -> PreparedRun:
    """Check and build everything for training; raises ValueError/FileNotFoundError with a clear message.

    `config` is a resolved config (`load_train_config`). `tokenizer`: use this one instead of building the
    config's (runs that must see the same tokens, e.g. a comparison). Nothing is written to disk.
    """
    import torch

    from hf_memlm.data import check_tokenizer_fits
    from hf_memlm.training.model_setup import build_model, configure_trainable

    output_dir = Path(config["output_dir"])
    resume_from, stale_checkpoints = _check_output_dir(output_dir, config)
    check_training_config(config)
    model_cfg, data_cfg = config["model"], config["data"]

    documents = _load_documents(data_cfg) if data_cfg["task"] == "text" else None
    if tokenizer is None:
        tokenizer = _build_tokenizer(config["tokenizer"], model_cfg, documents)

    text_config = model_cfg["text_config"] or None  # next to a model.base, build_model rejects it
    if model_cfg["base"] is None:
        text_config = _text_config_for(model_cfg["text_config"], tokenizer)
        check_tokenizer_fits(tokenizer, text_config)  # before building: a too-small embedding fails obscurely
    torch.manual_seed(config["seed"])
    try:
        model = build_model(
            dict(model_cfg["memory"]),
            base=model_cfg["base"],
            base_kwargs=model_cfg["base_kwargs"],
            text_config=text_config,
            vocab_size=_tokenizer_size(tokenizer),
        )
    except (TypeError, ValueError) as error:
        raise ValueError(f"model: {error}") from error
    check_tokenizer_fits(tokenizer, model.config.text_config)
    if resume_from is not None:
        check_checkpoint_matches(Path(resume_from), model.config, config)

    train_dataset, eval_dataset = _build_examples(
        data_cfg, tokenizer, model.config.segment_length, documents, config["seed"]
    )
    new = []
    if model_cfg["memory_from"]:
        from hf_memlm.training.memory_start import load_memory_from

        new = load_memory_from(model, model_cfg["memory_from"])
        print(f"memory weights from {model_cfg['memory_from']}" + (f"; new here: {', '.join(new)}" if new else ""))
    if model_cfg["calibrate_tokens"]:
        _calibrate(model, train_dataset, model_cfg["calibrate_tokens"])
    lora = config["lora"] if model_cfg["trainable"] == "lora" else None
    if config["lora"] and model_cfg["trainable"] != "lora":
        raise ValueError(f"lora settings are given but model.trainable={model_cfg['trainable']!r}; set it to lora.")
    model = configure_trainable(model, model_cfg["trainable"], lora, new_memory=new)

    training_args = _training_arguments(config, output_dir)
    if training_args.eval_strategy != "no" and eval_dataset is None:
        raise ValueError(
            f"training.eval_strategy={training_args.eval_strategy.value!r} needs evaluation data: "
            "set data.eval_fraction (e.g. 0.1)."
        )
    if training_args.read_loss_weight > 0 and "read_targets" not in train_dataset.column_names:
        raise ValueError(
            f"training.read_loss_weight={training_args.read_loss_weight} needs examples that say what the memory's "
            f"reads should pick (read_targets); data.task {data_cfg['task']!r} gives none (chat_passkey and "
            "chat_suite do). Set it to 0."
        )
    collator = None
    if data_cfg["task"] in TAIL_LABELLED_TASKS:
        from hf_memlm.training.collate import LabelledTailCollator

        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        collator = LabelledTailCollator(pad, read_targets=training_args.read_loss_weight > 0)
    return PreparedRun(
        config,
        output_dir,
        tokenizer,
        model,
        train_dataset,
        eval_dataset,
        training_args,
        resume_from,
        stale_checkpoints,
        data_collator=collator,
    )


def _calibrate(model, train_dataset, tokens: int) -> None:
    """`calibrate_memory` on the first training examples holding `tokens` tokens, cut to the shortest of them."""
    import torch

    from hf_memlm.training import calibrate_memory

    rows, total = [], 0
    for example in train_dataset:
        rows.append(example["input_ids"])
        total += len(example["input_ids"])
        if total >= tokens:
            break
    width = min(len(row) for row in rows)
    spread = calibrate_memory(model, torch.tensor([row[:width] for row in rows]))
    described = ", ".join(f"layer {index}: {ratio:.0f}x" for index, ratio in spread.items())
    print(f"memory calibrated on {len(rows)} x {width} tokens (largest feature RMS over the median: {described})")


def _text_config_for(settings: dict, tokenizer):
    """The from-scratch base config: sized to the tokenizer unless vocab_size is given, and speaking the
    tokenizer's special tokens (so generation stops at its eos)."""
    from hf_memlm.training.model_setup import build_text_config

    settings = dict(settings)
    vocab_size = settings.get("vocab_size") or _tokenizer_size(tokenizer)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        token_id = getattr(tokenizer, name, None)
        if name not in settings and (token_id is None or token_id < vocab_size):
            settings[name] = token_id
    return build_text_config(settings, vocab_size)


def check_training_config(config: dict) -> None:
    """The training checks that need neither data nor weights (`--dry-run` runs them, with the evaluation's
    and comparison's, `pipeline.check_config`): the output folder, a local corpus, the memory settings against
    the base architecture (`MemLMConfig`) and the training arguments (learning rates included). Raises
    ValueError naming the section."""
    from transformers import AutoConfig

    from hf_memlm import MemLMConfig
    from hf_memlm.integrations.gguf import locating_kwargs, resolve_base
    from hf_memlm.training.model_setup import build_text_config

    _check_output_dir(Path(config["output_dir"]), config)
    _check_data_source(config["data"])
    model_cfg = config["model"]
    calibrate = model_cfg["calibrate_tokens"]
    if isinstance(calibrate, bool) or not isinstance(calibrate, int) or calibrate < 0:
        raise ValueError(f"model.calibrate_tokens must be a non-negative integer (0: off), got {calibrate!r}.")
    if calibrate and model_cfg["base"] is None:
        raise ValueError(
            "model.calibrate_tokens fits a new memory to a pretrained base's hidden states, but model.base is "
            "null (a model trained from scratch): set model.base, or model.calibrate_tokens: 0."
        )
    if model_cfg["trainable"] == "memory_new" and not model_cfg["memory_from"]:
        raise ValueError(
            "model.trainable=memory_new trains only the memory weights a first stage lacks: set model.memory_from "
            "to that stage's folder, or model.trainable: memory_only."
        )
    if calibrate and model_cfg["memory_from"]:
        raise ValueError(
            "model.calibrate_tokens fits a new memory's input projections, which would overwrite the trained ones "
            "model.memory_from loads: set one of them (model.calibrate_tokens: 0 to continue a trained memory)."
        )
    if model_cfg["base"] is not None:
        try:
            folder, base_kwargs = resolve_base(model_cfg["base"], model_cfg["base_kwargs"])
            text_config = AutoConfig.from_pretrained(folder, **locating_kwargs(base_kwargs))
        except (OSError, ValueError, ImportError) as error:
            raise ValueError(f"model.base: cannot read the config of {model_cfg['base']!r}: {error}") from error
    else:
        # the vocabulary comes from the tokenizer later; any size checks the rest of the architecture
        text_config = build_text_config(model_cfg["text_config"], vocab_size=_ANY_VOCAB_SIZE)
    try:
        memory_config = MemLMConfig(text_config=text_config, **model_cfg["memory"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"model.memory: {error}") from error
    if model_cfg["memory_from"]:
        from hf_memlm.training.memory_start import check_memory_source

        check_memory_source(model_cfg["memory_from"], memory_config)
    _training_arguments(config, Path(config["output_dir"]))


_ANY_VOCAB_SIZE = 256


def _check_data_source(data_cfg: dict) -> None:
    """A local corpus that is not there, for any task (a Hub id is checked when it is loaded). A string that cannot
    be a Hub id ("data/books/train": ids are name or owner/name) is a path: a relative one missing because the run
    started in another folder fails here, before any weights load."""
    from hf_memlm.data.corpus import _is_local_path
    from hf_memlm.integrations.model_card import is_hub_id

    source = data_cfg["source"]
    if isinstance(source, str) and (_is_local_path(source) or not is_hub_id(source)):
        if not Path(source).expanduser().exists():
            relative = "" if Path(source).expanduser().is_absolute() else f", from the working folder {Path.cwd()}"
            raise FileNotFoundError(
                f"data.source: the corpus file {source} does not exist (nor a folder of that name{relative}). Run "
                "from the folder it is relative to (the repository root for data/...), or give an absolute path."
            )


def _check_output_dir(output_dir: Path, config: dict) -> tuple[str | None, list[Path]]:
    """Refuse to mix a new run into a folder with files; find the checkpoint to resume from.

    Returns (checkpoint to resume from, stale checkpoints: `checkpoint-*` folders of an earlier run that
    `overwrite_output_dir` replaces, so that a later resume cannot pick them up instead of the new run).
    """
    resume = config["training"].get("resume_from_checkpoint")
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output_dir {str(output_dir)!r} is a file; choose a folder.")
    _check_writable(output_dir)
    if resume in ("last", "latest"):
        last = last_complete_checkpoint(output_dir) if output_dir.is_dir() else None
        if last is None:
            raise ValueError(
                f"training.resume_from_checkpoint={resume!r} but {str(output_dir)!r} holds no complete "
                "checkpoint-* folder (one with trainer_state.json)."
            )
        return str(last), []
    if resume:
        if not Path(resume).is_dir():
            raise ValueError(f"training.resume_from_checkpoint: checkpoint folder {resume!r} does not exist.")
        from transformers.trainer import TRAINER_STATE_NAME

        if not (Path(resume) / TRAINER_STATE_NAME).is_file():
            raise ValueError(
                f"training.resume_from_checkpoint: {resume!r} is not a Trainer checkpoint (it has no "
                f"{TRAINER_STATE_NAME}, so no optimizer and schedule to continue): pass a checkpoint-<step> folder of "
                "a run (or 'last' for the newest in output_dir). To train a saved model further, start a new run."
            )
        return str(resume), []
    if output_dir.is_dir() and any(output_dir.iterdir()) and not config["overwrite_output_dir"]:
        raise ValueError(
            f"output_dir {str(output_dir)!r} already holds files; choose a new folder, continue the run with "
            "--training.resume_from_checkpoint last, or pass --overwrite_output_dir true to write into it anyway."
        )
    return None, _checkpoints(output_dir)


# What a checkpoint's weights and optimizer state are shaped by: memory settings (`MemLMConfig`) and the
# base architecture (`text_config`). Resuming with any of them changed cannot load the checkpoint.
_BASE_SHAPE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "head_dim",
    "n_embd",
    "n_layer",
    "n_head",
)


def check_checkpoint_matches(checkpoint: Path, model_config, config: dict | None = None) -> None:
    """Refuse to resume from a checkpoint whose model was built with other settings (its weights or optimizer
    state would not fit), naming each setting that differs: the saved model config, and what is trained
    (model.trainable, lora.*) from the run config each checkpoint carries (`CONFIG_FILE`)."""
    import yaml

    from hf_memlm.configuration_memlm import WEIGHT_SETTINGS

    differences = []
    run_config = checkpoint / CONFIG_FILE
    if config is not None and run_config.is_file():
        try:
            saved_run = yaml.safe_load(run_config.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError):
            saved_run = {}
        before, now = saved_run.get("model", {}).get("trainable"), config["model"]["trainable"]
        if before is not None and before != now:
            differences.append(f"model.trainable: {before!r} in the checkpoint, {now!r} now")
        if "lora" in saved_run and now == "lora" and saved_run["lora"] != config["lora"]:
            changed = sorted(
                k for k in {*saved_run["lora"], *config["lora"]} if saved_run["lora"].get(k) != config["lora"].get(k)
            )
            differences.append(f"lora settings {', '.join(changed)} differ from the checkpoint's")
    saved_path = checkpoint / "config.json"
    try:  # a LoRA checkpoint saves the adapter only (no config.json); PEFT checks its own shapes
        saved = json.loads(saved_path.read_text(encoding="utf-8")) if saved_path.is_file() else {}
    except (ValueError, UnicodeDecodeError):
        saved = {}
    current = model_config.to_dict()
    for name in WEIGHT_SETTINGS:
        if name in saved and saved[name] != current.get(name):
            differences.append(f"model.memory.{name}: {saved[name]!r} in the checkpoint, {current.get(name)!r} now")
    saved_text, text = saved.get("text_config") or {}, current.get("text_config") or {}
    for name in _BASE_SHAPE_KEYS:
        if name in saved_text and saved_text[name] != text.get(name):
            differences.append(f"base {name}: {saved_text[name]!r} in the checkpoint, {text.get(name)!r} now")
    if differences:
        raise ValueError(
            f"training.resume_from_checkpoint: {str(checkpoint)!r} was trained with other model settings ("
            + "; ".join(differences)
            + "). Resume with the settings of that run (its train_config.yaml, or the values above), or start a "
            "new run in another output_dir (or with --overwrite_output_dir true)."
        )


def _check_writable(output_dir: Path) -> None:
    """The run can create files in `output_dir` (or, when it does not exist yet, in its nearest existing
    parent): found out now, not as an OSError when the first checkpoint is saved."""
    import os
    import tempfile

    place = output_dir
    while not place.exists() and place != place.parent:
        place = place.parent
    if not place.is_dir():
        raise ValueError(f"output_dir {str(output_dir)!r}: {str(place)!r} is a file, so no folder can be made there.")
    try:
        handle, probe = tempfile.mkstemp(prefix=".hf_memlm_write_check_", dir=place)
    except OSError as error:
        raise ValueError(
            f"output_dir {str(output_dir)!r} cannot be written: {str(place)!r} does not accept new files "
            f"({error.strerror}); choose a folder you can write to."
        ) from None
    os.close(handle)
    os.unlink(probe)


def _checkpoints(folder: Path) -> list[Path]:
    """`checkpoint-<step>` folders, newest step first."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    if not folder.is_dir():
        return []
    found = [p for p in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True)


def last_complete_checkpoint(folder: str | Path) -> Path | None:
    """The newest checkpoint whose save finished. The Trainer writes `trainer_state.json` last, so a folder
    without it is a save that was interrupted (a kill mid-save) and cannot be resumed from."""
    from transformers.trainer import TRAINER_STATE_NAME

    for checkpoint in _checkpoints(Path(folder)):
        if (checkpoint / TRAINER_STATE_NAME).is_file():
            return checkpoint
        logger.warning("skipping %s: incomplete (no %s; the save was interrupted)", checkpoint, TRAINER_STATE_NAME)
    return None


def _load_documents(data_cfg: dict):
    from datasets import Dataset

    from hf_memlm.data import default_text, load_text_corpus

    if data_cfg["source"] is None:
        return Dataset.from_dict({"text": [default_text()]})
    try:
        return load_text_corpus(data_cfg["source"], text_column=data_cfg["text_column"])
    except (FileNotFoundError, ValueError) as error:
        raise type(error)(f"data.source: {error}") from error


def _build_tokenizer(tok_cfg: dict, model_cfg: dict, documents):
    from hf_memlm.data import build_tokenizer

    kind = tok_cfg["kind"]
    if kind == "auto":
        kind = "pretrained" if model_cfg["base"] or tok_cfg["path"] else "byte"
    if tok_cfg["path"] and kind != "pretrained":
        raise ValueError(f"tokenizer.path is set but tokenizer.kind={kind!r}; a path means kind: pretrained.")
    if tok_cfg["vocab_size"] is not None and kind != "bpe":
        raise ValueError(f"tokenizer.vocab_size only applies to kind: bpe (got kind {kind!r}).")
    if kind == "pretrained":
        from hf_memlm.integrations.gguf import load_base_tokenizer

        path = tok_cfg["path"] or model_cfg["base"]
        if path is None:
            raise ValueError(
                "tokenizer.kind=pretrained needs tokenizer.path (or model.base) to load the tokenizer from."
            )
        try:
            # the base's own tokenizer comes with the base's from_pretrained arguments (its GGUF file, revision)
            return load_base_tokenizer(path, model_cfg["base_kwargs"] if path == model_cfg["base"] else None)
        except (OSError, ValueError, ImportError) as error:
            raise ValueError(f"tokenizer: cannot load a tokenizer from {path!r}: {error}") from error
    if kind == "bpe":
        from hf_memlm.data import default_text

        texts = documents["text"] if documents is not None else [default_text()]
        return build_tokenizer("bpe", texts=texts, vocab_size=tok_cfg["vocab_size"])
    return build_tokenizer("byte")


def _tokenizer_size(tokenizer) -> int:
    from hf_memlm.data import tokenizer_size

    return tokenizer_size(tokenizer)


def _build_examples(data_cfg: dict, tokenizer, segment_length: int, documents, seed: int):
    """(train, eval or None) datasets with only the model's columns."""
    from hf_memlm.data import TASK_BUILDERS, pack_documents

    task, options = data_cfg["task"], dict(data_cfg["options"])
    if not 0.0 <= data_cfg["eval_fraction"] < 1.0:
        raise ValueError(f"data.eval_fraction={data_cfg['eval_fraction']} must be at least 0 and below 1.")
    try:
        if task == "text":
            if options:
                raise ValueError(f"data.options {sorted(options)} apply to synthetic tasks only, not to task: text.")
            examples = pack_documents(documents, tokenizer, segment_length, data_cfg["num_segments"])
        else:
            if data_cfg["source"] is not None:  # the filler of a synthetic task: the source's documents
                if "text" in options:
                    raise ValueError("give the filler text once: data.source or data.options.text, not both.")
                options["text"] = "\n\n".join(_load_documents(data_cfg)["text"])
            examples = TASK_BUILDERS[task](
                tokenizer, data_cfg["num_examples"], segment_length, data_cfg["num_segments"], seed=seed, **options
            )
    except TypeError as error:  # an unknown option of the task builder
        raise ValueError(f"data.options for task {task!r}: {error}") from error
    except ValueError as error:
        raise ValueError(f"data: {error}") from error
    examples = examples.select_columns([c for c in MODEL_COLUMNS if c in examples.column_names])
    if len(examples) == 0:
        raise ValueError("data: no training example could be built; use more or longer documents.")
    if not data_cfg["eval_fraction"]:
        return examples, None
    held_out = max(1, round(len(examples) * data_cfg["eval_fraction"]))
    if held_out >= len(examples):
        raise ValueError(
            f"data.eval_fraction={data_cfg['eval_fraction']} leaves no training example out of {len(examples)}; "
            "lower it or use more data."
        )
    split = examples.train_test_split(test_size=held_out, shuffle=True, seed=seed)
    return split["train"], split["test"]


def _training_arguments(config: dict, output_dir: Path):
    import torch

    from hf_memlm.training.trainer import MemLMTrainingArguments

    settings = dict(config["training"])
    settings.pop("resume_from_checkpoint", None)  # resolved by _check_output_dir
    if not torch.cuda.is_available():
        settings.setdefault("dataloader_pin_memory", False)  # pinning needs an accelerator
        mps = getattr(torch.backends, "mps", None)
        if not (mps and mps.is_available()):
            # no accelerator: say so, so that several processes (accelerate launch / torchrun) run DDP over
            # gloo on CPU and bf16 means CPU autocast instead of an error
            settings.setdefault("use_cpu", True)
    try:
        return MemLMTrainingArguments(output_dir=str(output_dir), seed=config["seed"], **settings)
    except (TypeError, ValueError) as error:
        raise ValueError(f"training: {error}") from error


# -- training ------------------------------------------------------------------------------------------
def run_config_callback(config: dict):
    """A callback writing the run config (`CONFIG_FILE`) into every checkpoint, so a resume can tell what the
    checkpoint's run trained (model.trainable, lora) and refuse another setting before the optimizer fails."""
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class _RunConfigCallback(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                (folder / CONFIG_FILE).write_text(dump_config(config))

    return _RunConfigCallback()


def run_training(prepared: PreparedRun) -> dict:
    """Train, save the model and tokenizer, and return a summary (also written to `train_summary.json`)."""
    from transformers import default_data_collator

    from hf_memlm.evaluation import environment
    from hf_memlm.training.model_setup import is_peft_model, parameter_counts, save_trained_model
    from hf_memlm.training.trainer import MemLMTrainer

    counts = parameter_counts(prepared.model)
    if prepared.training_args.should_save:  # overwrite_output_dir: the earlier run's checkpoints go
        for checkpoint in prepared.stale_checkpoints:
            shutil.rmtree(checkpoint)
    from hf_memlm.integrations.hub import HubCodeCallback

    # pushes during training (Trainer's hub_strategy) carry the modeling code and the card
    callbacks = [run_config_callback(prepared.config)] + (
        [HubCodeCallback()] if prepared.training_args.push_to_hub else []
    )
    trainer = MemLMTrainer(
        callbacks=callbacks,
        model=prepared.model,
        args=prepared.training_args,
        train_dataset=prepared.train_dataset,
        eval_dataset=prepared.eval_dataset,
        data_collator=prepared.data_collator or default_data_collator,
        processing_class=prepared.tokenizer,
    )
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=prepared.resume_from)
    seconds = time.perf_counter() - start
    eval_loss = trainer.evaluate()["eval_loss"] if prepared.eval_dataset is not None else None

    output_dir = prepared.output_dir
    saved = {}
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        # sharded weights: the Trainer gathers them (under PEFT it saves the adapter, with the memory blocks)
        trainer.save_model(str(output_dir))
        saved["adapter" if is_peft_model(trainer.model) else "model"] = output_dir
    elif trainer.args.should_save:
        saved = save_trained_model(trainer.model, output_dir, prepared.tokenizer)

    losses = [entry for entry in trainer.state.log_history if "loss" in entry]
    summary = {
        "final_loss": losses[-1]["loss"] if losses else None,
        "mean_train_loss": result.training_loss,
        "eval_loss": eval_loss,
        "steps": trainer.state.global_step,
        "seconds": round(seconds, 2),
        "processes": trainer.args.world_size,
        "resumed_from": prepared.resume_from,
        "removed_checkpoints": [str(p) for p in prepared.stale_checkpoints],
        "parameters": counts,
        "saved": {name: str(path) for name, path in saved.items()},
        "checkpoints": sorted(str(p) for p in output_dir.glob("checkpoint-*")),
        "log_history": losses,
        "is_main_process": trainer.is_world_process_zero(),
        "environment": environment(),  # versions, threads and CPU kernels: a rerun elsewhere may learn otherwise
    }
    if trainer.args.should_save:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        (output_dir / CONFIG_FILE).write_text(dump_config(prepared.config))
    return summary


__all__ = [
    "CONFIG_FILE",
    "SUMMARY_FILE",
    "PreparedRun",
    "check_training_config",
    "last_complete_checkpoint",
    "prepare_run",
    "run_training",
]
