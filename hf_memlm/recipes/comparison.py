"""Models trained beside the memory model, and the perplexity evaluation that puts them side by side.

With `comparison.baselines` and/or `comparison.repeats` in a train config (and `evaluation.task:
perplexity`), `hf-memlm train` trains, after the memory model in `output_dir`:

* the memory model again for every further seed: `output_dir/comparison/memory/seed-<k>/`;
* each baseline once per seed: `output_dir/comparison/<baseline>/seed-<k>/`. A baseline is the base
  architecture alone (`model.language_model`, from the same initial weights as the memory model of that
  seed) trained on the same examples in the same order, with the same steps, schedule and optimizer,
  but reading each example in independent windows (`no_memory`: windows of `segment_length` tokens, the
  equal-compute model without memory; `double_window`: windows of twice that).

This module plans those runs (`compared_runs`) and turns a prepared memory-model run into its baseline
(`prepare_baseline`); `pipeline.py` trains them. Then every model is scored on the same held-out documents
(`evaluate_comparison`) and the report goes to `output_dir/eval/perplexity.{json,md,png}`.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from transformers import default_data_collator

from hf_memlm.recipes.config import BASELINE_WINDOWS
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
    if config["model"]["trainable"] != "full":
        raise ValueError(
            "comparison.baselines train the base model in full; set model.trainable: full "
            f"(it is {config['model']['trainable']!r})."
        )
    num_segments = config["data"]["num_segments"]
    for name in section["baselines"]:
        if num_segments % BASELINE_WINDOWS[name]:
            raise ValueError(
                f"comparison.baselines: {name} reads windows of {BASELINE_WINDOWS[name]} segments, which must "
                f"divide data.num_segments={num_segments}; use an even number of segments."
            )


@dataclasses.dataclass
class ComparedRun:
    """One model to train beside the memory model: `config` is the run's own (seed, output folder); `window`
    is a baseline's window in tokens, None for the memory model of a further seed."""

    name: str
    seed: int
    folder: Path
    config: dict
    window: int | None = None


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
    for name in config["comparison"]["baselines"]:
        window = BASELINE_WINDOWS[name] * segment_length
        for seed in seeds:
            folder = output_dir / COMPARISON_FOLDER / name / f"seed-{seed}"
            planned.append(ComparedRun(name, seed, folder, _variant(config, seed, folder), window))
    return planned


def _variant(config: dict, seed: int, folder: Path) -> dict:
    variant = copy.deepcopy(config)
    variant.update(seed=seed, output_dir=str(folder), overwrite_output_dir=False)
    variant["training"].pop("resume_from_checkpoint", None)
    variant["training"]["push_to_hub"] = False  # only the main model is shared
    return variant


def prepare_baseline(prepared, window: int):
    """The run of a baseline from the memory model's prepared run (`train.prepare_run` of the baseline's
    config): the base model alone, with the same initial weights, reading windows of `window` tokens."""
    base = prepared.model.language_model  # the same initial weights as the memory model of this seed
    text_config = base.config
    positions = getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)
    if positions is not None and positions < window:
        raise ValueError(
            f"comparison.baselines: a window of {window} tokens needs model.text_config.max_position_embeddings "
            f">= {window} (it is {positions})."
        )
    return dataclasses.replace(prepared, model=base, data_collator=WindowCollator(window))


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

    main_model = AutoModelForCausalLM.from_pretrained(runs[MEMORY][0])
    kind = main_model.config.memory_type
    measure(
        MEMORY,
        f"{kind} memory",
        f"the memory model: segments of {segment_length} tokens, each reading the memory written by all "
        "earlier segments of the example",
        runs[MEMORY],
    )
    for name in config["comparison"]["baselines"]:
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
    "prepare_baseline",
]
