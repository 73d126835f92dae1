"""`hf-memlm train` from start to end: prepare → train → compare → evaluate → publish.

The steps are the other recipes' (`train.py`: prepare and train; `comparison.py`: the models trained beside
it and the perplexity comparison; `final_eval.py`: the evaluation after training; `integrations.hub`: the
model card and the upload); this module alone runs them in order, so none of them imports another. Progress
goes to `log` (the command line passes `print`).
"""

from __future__ import annotations

import time
from pathlib import Path

from hf_memlm.recipes.comparison import (
    MEMORY,
    check_comparison,
    compared_runs,
    evaluate_comparison,
    has_comparison,
    prepare_baseline,
)
from hf_memlm.recipes.config import PRETRAINED_BASELINES, card_datasets, check_card
from hf_memlm.recipes.final_eval import check_evaluation, run_final_evaluation
from hf_memlm.recipes.train import PreparedRun, check_training_config, prepare_run, run_training


class ComparisonError(ValueError):
    """A model of the `comparison` section could not be prepared or trained (after the main model was)."""


def check_config(config: dict) -> None:
    """Every check that needs neither data nor weights (what `--dry-run` runs): training, evaluation and
    comparison sections. Raises ValueError naming the section."""
    check_training_config(config)
    check_evaluation(config)
    check_comparison(config)
    check_card(config)


def prepare(config: dict) -> PreparedRun:
    """Check the whole config, then build the main run (`train.prepare_run`); nothing is written yet."""
    check_config(config)
    return prepare_run(config)


def train_compared_models(config: dict, tokenizer, log=print) -> dict[str, list[Path]]:
    """Train the further seeds and the baselines (`comparison.compared_runs`), all with `tokenizer`, the
    memory model's, so that every model sees the same tokens. Returns model name -> saved folders, one per
    seed, the memory model's first folder being `output_dir`."""
    runs = {MEMORY: [Path(config["output_dir"])]}
    for run in compared_runs(config):
        if run.window is None:
            log(f"\n== comparison: memory model, seed {run.seed} -> {run.folder} ==", flush=True)
        else:
            log(
                f"\n== comparison: {run.name} (base model, windows of {run.window} tokens), seed {run.seed} "
                f"-> {run.folder} ==",
                flush=True,
            )
        try:
            prepared = prepare_run(run.config, tokenizer)
            if run.window is not None:
                prepared = prepare_baseline(prepared, run.window, run.trainable, run.lora)
            run_training(prepared)
        except (ValueError, OSError) as error:
            raise ComparisonError(f"comparison: {error}") from error
        runs.setdefault(run.name, []).append(run.folder)
    return runs


def evaluate(config: dict, tokenizer, compared: dict | None = None, log=print) -> dict:
    """The `evaluation` section on the saved model(s): perplexity side by side with the compared models
    (`compared`, or the memory model alone), else the retrieval or chat pass-key evaluation. Writes the report
    to `<output_dir>/eval/` and returns {"results", "paths"}."""
    from hf_memlm.evaluation import format_markdown

    section = config["evaluation"]
    if section["task"] == "chat_passkey":
        log(
            f"\n== evaluation: pass key asked in chat, {section['options'].get('distances', 'default')} tokens "
            f"back, held-out text {section['source'] or 'the bundled excerpt'}, seed {section['seed']} ==",
            flush=True,
        )
    elif section["task"] == "suite":
        options, filler = section["options"], section["source"] or "the bundled excerpt"
        log(
            f"\n== evaluation: the long-context suite {options.get('suites', ['ruler', 'babilong'])} at "
            f"{options.get('lengths', 'the default lengths')} tokens, filler {filler}, seed {section['seed']} ==",
            flush=True,
        )
    elif section["task"] == "perplexity":
        log(
            f"\n== evaluation: perplexity by segment on {section['source'] or 'the bundled excerpt'}, up to "
            f"{section['num_examples']} examples of {section['num_segments'][0]} segments ==",
            flush=True,
        )
    else:
        log(
            f"\n== evaluation: {section['task']}, {section['num_examples']} examples per length of "
            f"{'/'.join(map(str, section['num_segments']))} segments, seed {section['seed']} ==",
            flush=True,
        )
    start = time.perf_counter()
    if section["task"] == "perplexity":  # the memory model against its weights with memory disabled, and more
        outcome = evaluate_comparison(config, compared or {MEMORY: [Path(config["output_dir"])]}, tokenizer, log=log)
    else:
        outcome = run_final_evaluation(config, config["output_dir"], tokenizer)
    log("\n" + format_markdown(outcome["results"]), flush=True)
    log(f"evaluated in {time.perf_counter() - start:.1f} s; wrote: " + ", ".join(outcome["paths"].values()))
    return outcome


def publish(config: dict, summary: dict, evaluation: dict | None, config_path: str | None = None) -> dict:
    """After the final save (and evaluation): write the model card with what was trained and measured, and
    upload the folder when `training.push_to_hub` is set. Call on the main process. Returns what was done."""
    from hf_memlm.integrations.hub import push_trained_model, write_model_card

    output_dir = Path(config["output_dir"])
    training = config["training"]
    data = config["data"]
    model_id = training.get("hub_model_id")
    facts = {
        "data": data["task"] + (f" ({data['source']})" if data.get("source") else " (bundled text)"),
        "examples": f"{data['num_segments']} segments of {config['model']['memory']['segment_length']} tokens",
        "steps": summary["steps"],
        "trainable": config["model"]["trainable"],
    }
    if config["model"].get("memory_from"):
        facts["memory started from"] = config["model"]["memory_from"]
    comparison = config.get("comparison") or {}
    if comparison.get("baselines") or comparison.get("repeats", 1) > 1:
        seeds = ", ".join(str(config["seed"] + k) for k in range(comparison.get("repeats", 1)))
        baselines = comparison.get("baselines") or []
        trained = [name for name in baselines if name not in PRETRAINED_BASELINES] or ["its own seeds"]
        facts["compared with"] = f"{', '.join(trained)}, trained the same way; seeds {seeds}"
        untrained = [name for name in baselines if name in PRETRAINED_BASELINES]
        if untrained:
            facts["compared with"] += f"; {', '.join(untrained)}: the base as shipped"
    command = f"hf-memlm train {config_path}" if config_path else None
    card = write_model_card(
        output_dir,
        training=facts,
        evaluation=evaluation["results"] if evaluation else [],  # []: none (not an earlier run's)
        evaluation_command=command,
        model_id=model_id,
        license=(config.get("card") or {}).get("license"),
        datasets=card_datasets(config) or None,
    )
    done = {"model_card": str(card) if card else None}
    if training.get("push_to_hub"):
        repo_id = model_id or output_dir.resolve().name
        push_trained_model(
            output_dir,
            repo_id,
            token=training.get("hub_token"),
            private=training.get("hub_private_repo"),
            revision=training.get("hub_revision"),
        )
        done["pushed_to"] = repo_id
    return done


def run_pipeline(prepared: PreparedRun, config_path: str | None = None, log=print) -> dict:
    """Train the prepared run (`prepare`), then, on the main process and when a whole model was saved, train the
    compared models, evaluate and publish. Returns {"summary", "evaluation", "published"} (the last two None
    where the step did not run). Raises ComparisonError when a compared model fails."""
    config = prepared.config
    if prepared.stale_checkpoints:
        names = ", ".join(p.name for p in prepared.stale_checkpoints)
        log(f"overwrite_output_dir: removing the earlier run's checkpoints ({names})", flush=True)
    summary = run_training(prepared)
    outcome = {"summary": summary, "evaluation": None, "published": None}
    if not summary["is_main_process"]:
        return outcome
    log(format_summary(summary), flush=True)
    if "model" not in summary["saved"]:  # a LoRA adapter or sharded weights only: no card, no push
        return outcome
    compared = train_compared_models(config, prepared.tokenizer, log=log) if has_comparison(config) else None
    if config["evaluation"]["task"] is not None:
        outcome["evaluation"] = evaluate(config, prepared.tokenizer, compared, log=log)
    done = outcome["published"] = publish(config, summary, outcome["evaluation"], config_path=config_path)
    if done["model_card"]:
        log(f"model card: {done['model_card']}", flush=True)
    if "pushed_to" in done:
        log(f"pushed to the Hub: {done['pushed_to']}", flush=True)
    return outcome


def format_summary(summary: dict) -> str:
    """The end-of-run report of a training run."""
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


__all__ = [
    "ComparisonError",
    "check_config",
    "evaluate",
    "format_summary",
    "prepare",
    "publish",
    "run_pipeline",
    "train_compared_models",
]
