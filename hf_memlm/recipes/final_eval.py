"""Evaluation right after training (the `evaluation` section of a train config).

The trained model is reloaded from its output folder with `AutoModelForCausalLM`, so the numbers are
those of what was saved; then retrieval accuracy by distance is measured with the no-memory baselines
beside it (or the pass key asked in chat, `chat_passkey`, or the long-context suite, `suite`: the options of
`SuiteSettings`, as `hf-memlm eval --suite` takes them), and written to `<output_dir>/eval/` as JSON,
Markdown and a PNG. Perplexity by segment position is `comparison.evaluate_comparison`'s (it scores the
models of the `comparison` section too); `pipeline.py` picks the one a config asks for.
"""

from __future__ import annotations

from pathlib import Path

from hf_memlm.recipes.held_out import filler_text

# Retrieval tasks whose natural filler can come from held-out text (`evaluation.source`): their generators
# take the filler as `text`.
FILLER_TASKS = frozenset({"passkey", "recall", "copy", "update", "chat_passkey", "suite"})
# evaluation.options of chat_passkey and suite that are settings of the reloaded model (a million entries, exact search, the
# dtype it computes in), not settings of the curve
LOAD_SETTINGS = ("memory_size", "memory_dtype", "memory_value_dtype", "memory_search", "memory_topk", "dtype")
LOAD_DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: bfloat16 where native (`reading_dtype`)


def check_evaluation(config: dict) -> None:
    """Fail before training, not after it, on an evaluation section that cannot run."""
    section = config["evaluation"]
    if section["task"] is None:
        return
    lengths = section["num_segments"]
    if not lengths or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in lengths):
        raise ValueError(f"evaluation.num_segments must be a list of positive integers, got {lengths!r}.")
    for name in ("num_examples", "batch_size"):
        if section[name] <= 0:
            raise ValueError(f"evaluation.{name} must be positive, got {section[name]}.")
    if section["task"] == "perplexity" and len(lengths) != 1:
        raise ValueError(
            f"evaluation.task: perplexity takes one example length, evaluation.num_segments: [N]; got {lengths}."
        )
    if section["source"] is not None and section["task"] not in FILLER_TASKS | {"perplexity"}:
        raise ValueError(
            f"evaluation.source (held-out text) applies to evaluation.task: perplexity and to tasks with natural "
            f"filler ({', '.join(sorted(FILLER_TASKS))}), not to {section['task']!r}."
        )
    if section["source"] is not None and "text" in section["options"]:
        raise ValueError("give the filler text once: evaluation.source or evaluation.options.text, not both.")
    if section["source"] is not None and section["task"] in FILLER_TASKS:
        filler_text(section["source"])  # a missing or empty source fails now, not after training
    if section["task"] == "chat_passkey":
        chat_passkey_settings(section)
    if section["task"] == "suite":
        suite_settings(section)


def run_final_evaluation(config: dict, output_dir, tokenizer, progress: bool = True) -> dict | None:
    """Reload the saved model, evaluate it with baselines, write the report; return results and paths."""
    section = config["evaluation"]
    if section["task"] is None:
        return None
    if section["task"] == "chat_passkey":
        return _run_chat_passkey(section, Path(output_dir), tokenizer, progress)
    if section["task"] == "suite":
        return _run_suite(section, Path(output_dir), tokenizer, progress)
    if section["task"] == "perplexity":
        raise ValueError(
            "evaluation.task: perplexity is scored by hf_memlm.recipes.comparison.evaluate_comparison "
            "(hf_memlm.recipes.pipeline.evaluate picks it)."
        )
    from transformers import AutoModelForCausalLM

    import hf_memlm  # noqa: F401  (registers the memlm auto classes)
    from hf_memlm.evaluation import answer_alphabet, evaluate_retrieval, retrieval_dataset, write_report

    output_dir = Path(output_dir)
    model = AutoModelForCausalLM.from_pretrained(output_dir).eval()
    task, options = section["task"], dict(section["options"])
    if section["source"] is not None:
        options["text"] = filler_text(section["source"])
    dataset = retrieval_dataset(
        task,
        tokenizer,
        section["num_examples"],
        model.config.segment_length,
        section["num_segments"],
        section["seed"],
        options,
    )
    results = evaluate_retrieval(
        model,
        dataset,
        batch_size=section["batch_size"],
        baselines=True,
        task=task,
        check_generate=section["check_generate"],
        progress=progress,
        answer_alphabet=answer_alphabet(task, options),
    )
    described = {k: v for k, v in options.items() if k != "text"}
    results["data"] = {
        "seed": section["seed"],
        "num_segments": section["num_segments"],
        "task_options": described,
        "num_examples": len(dataset),
    }
    if section["source"] is not None:
        results["data"]["filler_source"] = str(section["source"])
    paths = write_report(results, output_dir / "eval")
    return {"results": results, "paths": {k: str(v) for k, v in paths.items()}}


def chat_passkey_settings(section: dict):
    """(curve settings, load-time memory settings) of a chat_passkey evaluation section."""
    from hf_memlm.evaluation.chat_passkey import ChatPasskeySettings

    return _task_settings(section, ChatPasskeySettings, "chat_passkey")


def suite_settings(section: dict):
    """(suite settings, load-time memory settings) of a suite evaluation section."""
    from hf_memlm.evaluation.suite import SuiteSettings

    return _task_settings(section, SuiteSettings, "suite")


def _task_settings(section: dict, settings_class, task: str):
    options = dict(section["options"])
    load = _load_settings(options, task)
    try:
        return settings_class(seed=section["seed"], **options), load
    except TypeError as error:
        raise ValueError(f"evaluation.options for {task}: {error}") from error


def _load_settings(options: dict, task: str) -> dict:
    """Take the reloaded model's settings out of `options` (what is left is the evaluation's own)."""
    load = {key: options.pop(key) for key in LOAD_SETTINGS if key in options}
    if "dtype" in load:
        if load["dtype"] not in LOAD_DTYPES:
            raise ValueError(
                f"evaluation.options.dtype for {task}: {load['dtype']!r} is not one of {', '.join(LOAD_DTYPES)} "
                "(the dtype the saved model is reloaded in for the evaluation)."
            )
        from hf_memlm.evaluation.report import reading_dtype

        load["dtype"] = reading_dtype(load["dtype"])
    return load


def _run_chat_passkey(section: dict, output_dir: Path, tokenizer, progress: bool) -> dict:
    """The real-model curve: pass keys 16k to 1M tokens back, asked in chat (`evaluation.chat_passkey`)."""
    from transformers import AutoModelForCausalLM

    import hf_memlm  # noqa: F401  (registers the memlm auto classes)
    from hf_memlm.evaluation import write_report
    from hf_memlm.evaluation.chat_passkey import evaluate_chat_passkey

    settings, load = chat_passkey_settings(section)
    model = AutoModelForCausalLM.from_pretrained(output_dir, **load).eval()
    text = filler_text(section["source"]) if section["source"] is not None else None
    if text is None:
        from hf_memlm.data import default_text

        text = default_text()
    results = evaluate_chat_passkey(model, tokenizer, text, settings, progress=progress)
    if section["source"] is not None:
        results["filler_source"] = str(section["source"])
    paths = write_report(results, output_dir / "eval")
    return {"results": results, "paths": {k: str(v) for k, v in paths.items()}}


def _run_suite(section: dict, output_dir: Path, tokenizer, progress: bool) -> dict:
    """RULER and BABILong by task and length (`evaluation.suite`), the book filler from `evaluation.source`."""
    from transformers import AutoModelForCausalLM

    import hf_memlm  # noqa: F401  (registers the memlm auto classes)
    from hf_memlm.evaluation import write_report
    from hf_memlm.evaluation.suite import evaluate_suite

    settings, load = suite_settings(section)
    model = AutoModelForCausalLM.from_pretrained(output_dir, **load).eval()
    text = filler_text(section["source"]) if section["source"] is not None else None
    results = evaluate_suite(model, tokenizer, settings, text=text, progress=progress)
    if section["source"] is not None:
        results["filler_source"] = str(section["source"])
    paths = write_report(results, output_dir / "eval")
    return {"results": results, "paths": {k: str(v) for k, v in paths.items()}}
