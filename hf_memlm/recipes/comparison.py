"""Models trained beside the memory model, and the perplexity evaluation that puts them side by side.

With `comparison.baselines` and/or `comparison.repeats` in a train config (and `evaluation.task:
perplexity`), `hf-memlm train` trains, after the memory model in `output_dir`:

* the memory model again for every further seed: `output_dir/comparison/memory/seed-<k>/`;
* each trained baseline once per seed: `output_dir/comparison/<baseline>/seed-<k>/`. A baseline is the base
  architecture alone (`model.language_model`, from the same initial weights as the memory model of that
  seed) trained on the same examples in the same order, with the same steps, schedule and optimizer,
  but reading each example in independent windows (`no_memory`: windows of `segment_length` tokens, the
  equal-compute model without memory; `double_window`: windows of twice that). What trains follows
  `model.trainable`: the whole base (`full`); the same LoRA as the memory model's (`lora`); or, when only the
  memory trains (`memory_only`), a LoRA of about the memory's parameter count (`matched_lora_rank`), so that
  the baseline has the same trainable budget.

With a pretrained `model.base`, two untrained baselines are scored beside them: `base`, the base as shipped
reading windows of `segment_length` tokens (so that adapting to the training text is not counted as memory),
and `full_attention`, the base as shipped attending over each whole evaluation example (up to its positions):
not equal compute, the ceiling a memory aims at.

This module plans those runs (`compared_runs`) and turns a prepared memory-model run into its baseline
(`prepare_baseline`); `pipeline.py` trains them. Then every model is scored on the same held-out documents
(`evaluate_comparison`) and the report goes to `output_dir/eval/perplexity.{json,md,png}`.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from torch import nn
from transformers import default_data_collator

from hf_memlm.recipes.config import BASELINE_WINDOWS, PRETRAINED_BASELINES
from hf_memlm.recipes.held_out import held_out_corpus

MEMORY = "memory"
MEMORY_DISABLED = "memory_disabled"
COMPARISON_FOLDER = "comparison"
REPORT_NAME = "perplexity"


class WindowCollator:
    """Batches examples as usual, then cuts every example into rows of `window` tokens, each read on its own.

    The batch keeps the same tokens (and the Trainer the same examples, order and steps) as the memory
    model's; only what a prediction can see changes.
    """

    def __init__(self, window: int):
        self.window = window

    def __call__(self, features):
        batch = default_data_collator(features)
        for key in ("input_ids", "labels", "attention_mask"):
            if key in batch:
                batch[key] = batch[key].reshape(-1, self.window)
        return batch


def comparison_seeds(config: dict) -> list[int]:
    return [config["seed"] + k for k in range(config["comparison"]["repeats"])]


def has_comparison(config: dict) -> bool:
    section = config["comparison"]
    return bool(section["baselines"]) or section["repeats"] > 1


def check_comparison(config: dict) -> None:
    """Fail before training on a comparison that cannot run (config checks only)."""
    section = config["comparison"]
    if section["repeats"] < 1:
        raise ValueError(f"comparison.repeats must be at least 1, got {section['repeats']}.")
    if len(set(section["baselines"])) != len(section["baselines"]):
        raise ValueError(f"comparison.baselines names a baseline twice: {section['baselines']}.")
    if not has_comparison(config):
        return
    if config["evaluation"]["task"] != "perplexity":
        raise ValueError(
            "comparison.* trains models to compare by perplexity: set evaluation.task: perplexity "
            f"(it is {config['evaluation']['task']!r})."
        )
    if config["data"]["task"] != "text":
        raise ValueError(
            f"comparison.* compares language models: data.task must be text, got {config['data']['task']!r}."
        )
    untrained = [name for name in section["baselines"] if name in PRETRAINED_BASELINES]
    if untrained and config["model"]["base"] is None:
        raise ValueError(
            f"comparison.baselines {untrained} score the pretrained base as shipped: set model.base (a model "
            "trained from scratch has no such base; compare it with no_memory or double_window)."
        )
    num_segments = config["data"]["num_segments"]
    for name in trained_baselines(config):
        if num_segments % BASELINE_WINDOWS[name]:
            raise ValueError(
                f"comparison.baselines: {name} reads windows of {BASELINE_WINDOWS[name]} segments, which must "
                f"divide data.num_segments={num_segments}; use an even number of segments."
            )


def trained_baselines(config: dict) -> list[str]:
    return [name for name in config["comparison"]["baselines"] if name in BASELINE_WINDOWS]


@dataclasses.dataclass
class ComparedRun:
    """One model to train beside the memory model: `config` is the run's own (seed, output folder); `window`
    is a baseline's window in tokens, None for the memory model of a further seed; `trainable` and `lora` are
    the memory model's (a baseline's run is prepared with its base frozen, `prepare_baseline` adds its LoRA)."""

    name: str
    seed: int
    folder: Path
    config: dict
    window: int | None = None
    trainable: str = "full"
    lora: dict | None = None


def compared_runs(config: dict) -> list[ComparedRun]:
    """The further seeds of the memory model, then each baseline once per seed (the memory model of the
    first seed is the main run, `output_dir`)."""
    output_dir = Path(config["output_dir"])
    seeds = comparison_seeds(config)
    segment_length = config["model"]["memory"]["segment_length"]
    planned = []
    for seed in seeds[1:]:
        folder = output_dir / COMPARISON_FOLDER / MEMORY / f"seed-{seed}"
        planned.append(ComparedRun(MEMORY, seed, folder, _variant(config, seed, folder)))
    trainable = config["model"]["trainable"]
    for name in trained_baselines(config):
        window = BASELINE_WINDOWS[name] * segment_length
        for seed in seeds:
            folder = output_dir / COMPARISON_FOLDER / name / f"seed-{seed}"
            variant = _variant(config, seed, folder)
            if trainable != "full":  # built with the base frozen (its memory's trainable share is the baseline's
                # budget); its LoRA comes in prepare_baseline
                variant["model"]["trainable"] = "memory_only" if trainable == "lora" else trainable
                variant["lora"] = {}
            lora = dict(config["lora"]) if trainable == "lora" else None
            planned.append(ComparedRun(name, seed, folder, variant, window, trainable, lora))
    return planned


def _variant(config: dict, seed: int, folder: Path) -> dict:
    variant = copy.deepcopy(config)
    variant.update(seed=seed, output_dir=str(folder), overwrite_output_dir=False)
    variant["training"].pop("resume_from_checkpoint", None)
    variant["training"]["push_to_hub"] = False  # only the main model is shared
    return variant


def prepare_baseline(prepared, window: int, trainable: str = "full", lora: dict | None = None):
    """The run of a baseline from the memory model's prepared run (`train.prepare_run` of the baseline's
    config): the base model alone, with the same initial weights, reading windows of `window` tokens; with
    `trainable` lora or memory_only, the base frozen under LoRA adapters (`lora`'s settings, or of the memory's
    parameter count), merged into the base when the run is saved."""
    memory_model = prepared.model
    base = memory_model.language_model  # the same initial weights as the memory model of this seed
    text_config = base.config
    positions = getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)
    if positions is not None and positions < window:
        raise ValueError(
            f"comparison.baselines: a window of {window} tokens needs model.text_config.max_position_embeddings "
            f">= {window} (it is {positions})."
        )
    if trainable != "full":
        base = _with_lora(base, memory_model, lora)
    return dataclasses.replace(prepared, model=base, data_collator=WindowCollator(window))


def _with_lora(base, memory_model, lora: dict | None):
    """`base` under LoRA: `lora`'s settings (the memory model's), or, for a memory-only memory model, adapters
    on PEFT's default targets with the rank that comes closest to the memory's parameter count."""
    from peft import LoraConfig, get_peft_model

    from hf_memlm.integrations.lora import default_lora_targets
    from hf_memlm.training.model_setup import parameter_counts

    if lora is None:
        targets = default_lora_targets(memory_model)
        budget = parameter_counts(memory_model)["trainable_memory"]
        rank = matched_lora_rank(base, targets, budget)
        lora = {"r": rank, "lora_alpha": 2 * rank, "target_modules": targets}
    settings = {"task_type": "CAUSAL_LM", **lora}
    if settings.get("target_modules") is None:
        settings["target_modules"] = default_lora_targets(memory_model)
    return get_peft_model(base, LoraConfig(**settings))


def matched_lora_rank(base: nn.Module, targets: list[str], budget: int) -> int:
    """The LoRA rank on the linear layers named `targets` whose parameter count comes closest to `budget`
    (a rank-r adapter on an (in, out) linear has r * (in + out) parameters)."""
    from transformers.pytorch_utils import Conv1D

    per_rank = sum(
        sum(module.weight.shape)  # in + out, for a Linear (out, in) and GPT-2's Conv1D (in, out) alike
        for name, module in base.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and name.rsplit(".", 1)[-1] in targets
    )
    if not per_rank:
        raise ValueError(f"comparison: no linear layer of the base is named {targets}; LoRA has nothing to adapt.")
    return max(1, round(budget / per_rank))


@torch.no_grad()
def evaluate_comparison(config: dict, runs: dict[str, list[Path]], tokenizer, log=print) -> dict:
    """Score every trained model on the held-out documents; write and return the comparison report."""
    from transformers import AutoModelForCausalLM

    import hf_memlm  # noqa: F401  (registers the memlm auto classes)
    from hf_memlm.evaluation import write_report
    from hf_memlm.evaluation.comparison import compare_perplexity, segment_nll
    from hf_memlm.evaluation.retrieval import describe_model

    section = config["evaluation"]
    output_dir = Path(config["output_dir"])
    segment_length = config["model"]["memory"]["segment_length"]
    rows, source = held_out_rows(section, tokenizer, segment_length)
    seeds = comparison_seeds(config)
    measurements, main_model = {}, None

    def measure(name, label, description, folder_list, **how):
        entry = measurements.setdefault(
            name, {"label": label, "description": description, "seeds": seeds[: len(folder_list)], "nll": []}
        )
        for folder in folder_list:
            model = AutoModelForCausalLM.from_pretrained(folder).eval()
            sums, counts = segment_nll(model, rows, segment_length, batch_size=section["batch_size"], **how)
            entry["nll"].append(sums)
            entry["counts"] = counts
        log(f"scored {label} ({len(folder_list)} seed(s))", flush=True)

    untrained = [name for name in config["comparison"]["baselines"] if name in PRETRAINED_BASELINES]

    main_model = AutoModelForCausalLM.from_pretrained(runs[MEMORY][0])
    kind = main_model.config.memory_type
    measure(
        MEMORY,
        f"{kind} memory",
        f"the memory model: segments of {segment_length} tokens, each reading the memory written by all "
        "earlier segments of the example",
        runs[MEMORY],
    )
    for name in trained_baselines(config):
        window = BASELINE_WINDOWS[name] * segment_length
        label = "no memory" if name == "no_memory" else f"no memory, window {window}"
        measure(
            name,
            label,
            f"the base architecture trained without memory on the same examples, steps and schedule, reading "
            f"windows of {window} tokens each on its own"
            + (" (equal compute)" if name == "no_memory" else " (what a longer attention window buys)"),
            runs[name],
            window=window,
        )
    if untrained:
        measurements.update(_score_pretrained_base(config, untrained, rows, seeds, log))
    measure(
        MEMORY_DISABLED,
        "memory disabled",
        "the memory model's weights inside disable_memory(): its segments with no memory reads or writes",
        runs[MEMORY],
        use_memory=False,
    )
    reference = "no_memory" if "no_memory" in measurements else MEMORY_DISABLED
    results = compare_perplexity(
        measurements, segment_length=segment_length, num_examples=len(rows), reference=reference
    )
    results["data"] = {"source": source, "num_segments": section["num_segments"][0], "num_examples": len(rows)}
    results["model"] = describe_model(main_model)
    paths = write_report(results, output_dir / "eval", name=REPORT_NAME)
    return {"results": results, "paths": {k: str(v) for k, v in paths.items()}}


def _score_pretrained_base(config: dict, names: list[str], rows, seeds: list[int], log) -> dict[str, dict]:
    """The untrained baselines: `model.base` as shipped, in windows of one segment (`base`) or over each whole
    example, up to the base's positions (`full_attention`). Scored once; the score stands beside every seed."""
    from hf_memlm.evaluation.comparison import segment_nll
    from hf_memlm.integrations.gguf import resolve_base
    from hf_memlm.model_inputs import load_base

    section, model_cfg = config["evaluation"], config["model"]
    segment_length = model_cfg["memory"]["segment_length"]
    model = load_base(*resolve_base(model_cfg["base"], model_cfg["base_kwargs"])).eval()
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    length = len(rows[0])
    scored = {}
    for name in names:
        whole = min(length, positions or length)
        window = segment_length if name == "base" else whole
        if name == "base":
            label = "base as shipped"
            description = f"model.base as shipped, no fine-tuning, reading windows of {window} tokens (equal compute)"
        else:
            label = f"base, full attention ({window} tokens)"
            description = (
                f"model.base as shipped attending over windows of {window} tokens"
                + (" (each whole example)" if window == length else f" (its {positions} positions)")
                + ": not equal compute, the ceiling a memory aims at"
            )
        # a window's logits are (batch, window, vocabulary): keep that about what one segment's batch takes
        batch_size = max(1, section["batch_size"] * segment_length // window)
        sums, counts = segment_nll(model, rows, segment_length, window=window, batch_size=batch_size)
        scored[name] = {
            "label": label,
            "description": description + "; untrained, so its one score stands beside every seed",
            "seeds": list(seeds),
            "nll": [sums] * len(seeds),
            "counts": counts,
        }
        log(f"scored {label}", flush=True)
    return scored


def held_out_rows(section: dict, tokenizer, segment_length: int) -> tuple[list[list[int]], str]:
    """`num_examples` windows of `num_segments` segments, taken evenly over the held-out documents."""
    from datasets import Dataset

    from hf_memlm.data import default_text, pack_documents

    source = section["source"]
    if source is None:
        corpus, source = Dataset.from_dict({"text": [default_text()]}), "the bundled excerpt"
    else:
        corpus = held_out_corpus(source)
    packed = pack_documents(corpus, tokenizer, segment_length, section["num_segments"][0])
    wanted = min(section["num_examples"], len(packed))
    picked = torch.linspace(0, len(packed) - 1, wanted).round().long().unique().tolist()
    return [list(row) for row in packed.select(picked)["input_ids"]], str(source)


__all__ = [
    "ComparedRun",
    "WindowCollator",
    "check_comparison",
    "compared_runs",
    "comparison_seeds",
    "evaluate_comparison",
    "has_comparison",
    "held_out_rows",
    "matched_lora_rank",
    "prepare_baseline",
    "trained_baselines",
]
