"""`hf-memlm eval MODEL_DIR --task passkey|recall|copy|update|perplexity --output-dir DIR`: measure a saved memory LM.
`hf-memlm eval MODEL_DIR --suite ruler babilong --lengths 4k 16k --output-dir DIR`: the long-context suite.

Loads the model with `AutoModelForCausalLM` (and the tokenizer saved beside it), generates the task data
with `hf_memlm.data` (seeded), evaluates with memory, with memory disabled and (retrieval tasks) the base
model alone reading its own window, prints the table and writes <task>.json, <task>.md and <task>.png.
`--memory-size` / `--memory-topk` change the kv memory's settings at load time (e.g. to evaluate lengths
beyond the saved memory_size). The folder, its weights, the settings and --output-dir are checked first.

--suite generates RULER and BABILong tasks (hf_memlm.data.long_context) at each --lengths (tokens of the
model's tokenizer), reads each document into memory and asks its question in a fresh call (the chat template
when the tokenizer has one), and writes suite.json, suite.md and suite.png: scores by task and length with
memory, with memory disabled and for the base model alone with its own window. docs/long_context_suite.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hf_memlm.data import TASK_BUILDERS
from hf_memlm.data.long_context import DEFAULT_EXAMPLES, DEFAULT_LENGTHS, MAX_NEW_TOKENS, SUITES

from .common import fail
from .model_folder import (
    add_memory_arguments,
    check_output_dir,
    check_weights,
    memory_overrides,
    read_saved_config,
    resolve_device,
)

RETRIEVAL_TASKS = tuple(TASK_BUILDERS)  # the synthetic tasks of hf_memlm.data
TASKS = (*RETRIEVAL_TASKS, "perplexity")


class EvalInputError(ValueError):
    """Bad input to `hf-memlm eval` (reported as one line, exit status 2)."""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="retrieval accuracy by distance or perplexity by segment, vs memory disabled and the base model",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "model_dir", metavar="MODEL_DIR", help="folder written by save_pretrained (memlm model + tokenizer)"
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--task", choices=TASKS)
    what.add_argument(
        "--suite",
        nargs="+",
        metavar="SUITE",
        help=f"long-context suites ({', '.join(SUITES)}) or single tasks of them ({', '.join(MAX_NEW_TOKENS)})",
    )
    parser.add_argument("--output-dir", required=True, help="where <task>.json, <task>.md and <task>.png go")
    parser.add_argument(
        "--num-examples",
        type=int,
        default=None,
        help=f"generated examples per length (default: 64 for a retrieval task, {DEFAULT_EXAMPLES} per task for --suite)",
    )
    parser.add_argument(
        "--lengths",
        nargs="+",
        default=[f"{n // 1024}k" for n in DEFAULT_LENGTHS],
        help="--suite: example lengths in tokens of the tokenizer (4096, 4k, 1m)",
    )
    parser.add_argument(
        "--filler-text", default=None, help="--suite: a text file for the book filler (default: the bundled excerpt)"
    )
    parser.add_argument(
        "--base-window",
        type=int,
        default=None,
        help="--suite: the base model's window in tokens (default: its max_position_embeddings)",
    )
    parser.add_argument(
        "--num-segments",
        type=int,
        nargs="+",
        default=[8],
        help="segments per example (length = this x segment_length); retrieval tasks take several (a grid)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated data")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--task-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra argument for the data generator, e.g. filler=synthetic or num_pairs=8 (repeatable; YAML values)",
    )
    parser.add_argument(
        "--data",
        nargs="+",
        default=None,
        help="perplexity: text files or folders (default: the package's embedded book excerpt)",
    )
    parser.add_argument(
        "--max-examples", type=int, default=None, help="perplexity: use at most this many packed examples"
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer folder (default: MODEL_DIR), or 'byte' for the byte-level tokenizer of hf_memlm.data",
    )
    parser.add_argument("--no-baselines", action="store_true", help="score only the memory model")
    parser.add_argument(
        "--check-generate",
        type=int,
        default=2,
        help="retrieval: greedy-generate this many answers to confirm the teacher-forced exact match",
    )
    parser.add_argument(
        "--distance-bin-tokens",
        type=int,
        default=None,
        help="width of token-distance buckets (default: segment length)",
    )
    parser.add_argument("--device", default="auto", help="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="what the model computes in; auto: bfloat16 on a GPU or an AVX-512 CPU, else float32",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_memory_arguments(parser)


def run(args) -> int:
    try:
        return _run(args)
    except EvalInputError as error:
        return fail("eval", str(error))


def _run(args) -> int:
    if args.num_examples is None:
        args.num_examples = DEFAULT_EXAMPLES if args.suite else 64
    for name in ("num_examples", "batch_size"):
        if getattr(args, name) <= 0:
            raise EvalInputError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}.")
    if any(n <= 0 for n in args.num_segments):
        raise EvalInputError(f"--num-segments must be positive, got {args.num_segments}.")
    if args.task == "perplexity" and len(args.num_segments) != 1:
        raise EvalInputError(f"--task perplexity takes one --num-segments value, got {args.num_segments}.")
    suite_settings, filler_text = suite_arguments(args) if args.suite else (None, None)
    model_dir = check_model_dir(args.model_dir)
    try:
        overrides = memory_overrides(args, read_saved_config(model_dir), model_dir)
        check_output_dir(args.output_dir, "--output-dir")
        check_training_report(args.output_dir, args.task or "suite")
        device = resolve_device(args.device)
    except ValueError as error:
        raise EvalInputError(str(error)) from error
    task_options = parse_task_options(args.task_option)

    from transformers import AutoModelForCausalLM

    import hf_memlm  # noqa: F401  (registers the memlm auto classes)
    from hf_memlm.evaluation import (
        answer_alphabet,
        evaluate_perplexity,
        evaluate_retrieval,
        format_markdown,
        retrieval_dataset,
        write_report,
    )
    from hf_memlm.evaluation.report import reading_dtype

    if args.no_progress:
        import datasets
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        datasets.disable_progress_bars()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=reading_dtype(args.dtype), **overrides)
    model = model.to(device).eval()
    tokenizer = load_tokenizer(args.tokenizer, model_dir, model)
    segment_length = model.config.segment_length
    progress = not args.no_progress
    if suite_settings is not None:
        return run_suite(model, tokenizer, suite_settings, filler_text, args, progress)
    print(
        f"model: {model_dir} ({model.config.memory_type} memory on {model.config.get_text_config().model_type}, "
        f"segment length {segment_length}); task {args.task}, {'/'.join(map(str, args.num_segments))} segments "
        f"per example, device {device}"
    )

    if args.task == "perplexity":
        dataset = perplexity_dataset(args, tokenizer, segment_length)
        print(f"data: {len(dataset)} examples of {args.num_segments[0] * segment_length} tokens")
        results = evaluate_perplexity(
            model, dataset, batch_size=args.batch_size, baselines=not args.no_baselines, progress=progress
        )
    else:
        try:
            dataset = retrieval_dataset(
                args.task, tokenizer, args.num_examples, segment_length, args.num_segments, args.seed, task_options
            )
        except ValueError as error:
            raise EvalInputError(str(error)) from error
        results = evaluate_retrieval(
            model,
            dataset,
            batch_size=args.batch_size,
            baselines=not args.no_baselines,
            task=args.task,
            distance_bin_tokens=args.distance_bin_tokens,
            check_generate=args.check_generate,
            progress=progress,
            answer_alphabet=answer_alphabet(args.task, task_options),
        )
    results["data"] = {
        "seed": args.seed,
        "num_segments": args.num_segments,
        "task_options": task_options,
        "num_examples": len(dataset),
        "sources": args.data,
    }
    paths = write_report(results, args.output_dir)
    print()
    print(format_markdown(results))
    print("wrote: " + ", ".join(str(p) for p in paths.values()))
    return 0


def suite_arguments(args):
    """The suite's settings and filler text from the arguments, checked before the model is loaded."""
    from hf_memlm.evaluation.suite import SuiteSettings

    text = None
    if args.filler_text is not None:
        try:
            text = Path(args.filler_text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise EvalInputError(f"--filler-text {args.filler_text!r} cannot be read as UTF-8 text: {error}") from error
    try:
        settings = SuiteSettings(
            suites=args.suite,
            lengths=args.lengths,
            num_examples=args.num_examples,
            seed=args.seed,
            baselines=not args.no_baselines,
            base_window=args.base_window,
        )
    except ValueError as error:
        raise EvalInputError(str(error)) from error
    return settings, text


def run_suite(model, tokenizer, settings, text, args, progress: bool) -> int:
    from hf_memlm.evaluation import write_report
    from hf_memlm.evaluation.suite import evaluate_suite, format_suite

    print(
        f"model: {args.model_dir} ({model.config.memory_type} memory, segment length {model.config.segment_length}); "
        f"suite {' '.join(settings.tasks)} at {', '.join(f'{n:,}' for n in settings.lengths)} tokens"
    )
    try:
        results = evaluate_suite(model, tokenizer, settings, text=text, progress=progress)
    except ValueError as error:
        raise EvalInputError(str(error)) from error
    results["data"] = {"filler_text": args.filler_text}
    paths = write_report(results, args.output_dir)
    print()
    print(format_suite(results))
    print("wrote: " + ", ".join(str(p) for p in paths.values()))
    return 0


def check_model_dir(path) -> Path:
    """The folder exists and holds a saved memlm model (config.json with model_type 'memlm') with its weights."""
    folder = Path(path)
    try:
        model_type = read_saved_config(folder).get("model_type")
        if model_type != "memlm":
            raise ValueError(
                f"{folder} holds a {model_type!r} model, not a memlm model; wrap it first with "
                "MemLMForCausalLM.from_base(...) (and train it), then save_pretrained()."
            )
        check_weights(folder)
    except ValueError as error:
        raise EvalInputError(str(error)) from error
    return folder


def check_training_report(output_dir: str, task: str) -> None:
    """Refuse to replace the report that training wrote into a trained model's `eval/` folder (the model card
    shows it); other folders may be written into again."""
    folder = Path(output_dir)
    report = folder / f"{task}.json"
    from hf_memlm.recipes.train import SUMMARY_FILE

    if report.is_file() and (folder.parent / SUMMARY_FILE).is_file() and (folder.parent / "config.json").is_file():
        raise ValueError(
            f"--output-dir {output_dir!r} is the evaluation folder of the trained model in {str(folder.parent)!r}: "
            f"its {task} report from training ({report.name}, shown in the model card) would be replaced. Choose "
            "another --output-dir."
        )


def parse_task_options(items: list[str]) -> dict:
    """KEY=VALUE strings -> dict, values read as YAML (8 -> int, true -> bool, synthetic -> str)."""
    import yaml

    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise EvalInputError(f"--task-option {item!r} is not KEY=VALUE (e.g. --task-option filler=synthetic).")
        options[key.strip()] = yaml.safe_load(value)
    return options


def load_tokenizer(name, model_dir: Path, model):
    """The tokenizer saved with the model, another folder, or 'byte'; checked against the model's vocabulary."""
    if name == "byte":
        from hf_memlm.data import build_tokenizer

        tokenizer = build_tokenizer("byte")
    else:
        from transformers import AutoTokenizer

        folder = Path(name) if name else model_dir
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, TypeError) as error:
            raise EvalInputError(
                f"no tokenizer could be loaded from {folder} ({type(error).__name__}); save the training tokenizer "
                "there with tokenizer.save_pretrained(), pass --tokenizer FOLDER, or --tokenizer byte."
            ) from error
    from hf_memlm.data import check_tokenizer_fits

    try:
        check_tokenizer_fits(tokenizer, model.config)
    except ValueError as error:
        raise EvalInputError(f"{error} Use the tokenizer the model was trained with.") from error
    return tokenizer


def perplexity_dataset(args, tokenizer, segment_length):
    from datasets import Dataset

    from hf_memlm.data import default_text, load_text_corpus, pack_documents

    try:
        corpus = load_text_corpus(args.data) if args.data else Dataset.from_dict({"text": [default_text()]})
    except (OSError, ValueError) as error:
        raise EvalInputError(f"cannot read the perplexity documents {args.data}: {error}") from error
    dataset = pack_documents(corpus, tokenizer, segment_length, args.num_segments[0])
    if len(dataset) == 0:
        raise EvalInputError(
            f"no document is long enough for one example of {args.num_segments[0]} x {segment_length} tokens; "
            "lower --num-segments or pass longer documents with --data."
        )
    if args.max_examples is not None:
        dataset = dataset.select(range(min(args.max_examples, len(dataset))))
    return dataset
