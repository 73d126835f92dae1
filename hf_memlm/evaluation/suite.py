"""The long-context suite: RULER and BABILong tasks (`hf_memlm.data.long_context`) scored by task and length.

Each example's document is read into memory (`model.memorize`), then its prompt is asked in a fresh call
(`generate(prompt, memory_state=state)`: a new segment, positions from 0) and the reply, generated greedily,
is scored as the paper does (`score_reply`). Beside the memory model:

  * memory disabled: the same weights with memory off, asked the prompt alone (what it knows without the
    document; one reply per distinct prompt).
  * base model: the pretrained model without memory, given the document and the question in one turn (its
    chat template's user turn when it has one), cut to its own window: the last `base_window` tokens.

`python -m hf_memlm.integrations.lm_eval` runs the same examples through lm-evaluation-harness with
`answer_from_memory`, so its scores equal these (`tests/test_long_context_lm_eval.py`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from hf_memlm.data.long_context import (
    DEFAULT_EXAMPLES,
    DEFAULT_LENGTHS,
    SUITES,
    make_long_context_dataset,
    parse_length,
    score_reply,
    suite_tasks,
)

from .retrieval import describe_model

MEMORY, MEMORY_DISABLED, BASE_MODEL = "memory", "memory_disabled", "base_model"
LABELS = {MEMORY: "with memory", MEMORY_DISABLED: "memory disabled", BASE_MODEL: "base model (own window)"}
RULER_EFFECTIVE = 85.6  # Llama-2-7B's RULER average at 4k: a length is "effective" when the average beats it


@dataclass
class SuiteSettings:
    suites: list[str] = field(default_factory=lambda: ["ruler", "babilong"])  # suites or single task names
    lengths: list = field(default_factory=lambda: list(DEFAULT_LENGTHS))  # tokens (4k style accepted)
    num_examples: int = DEFAULT_EXAMPLES  # per task and length
    seed: int = 0
    baselines: bool = True
    base_window: int | None = None  # default: the base model's max_position_embeddings

    def __post_init__(self):
        self.tasks = suite_tasks(self.suites)
        self.lengths = [parse_length(length) for length in self.lengths]
        if not self.lengths:
            raise ValueError("lengths is empty: give at least one, e.g. 4k.")
        if isinstance(self.num_examples, bool) or not isinstance(self.num_examples, int) or self.num_examples < 1:
            raise ValueError(f"num_examples must be a positive integer, got {self.num_examples!r}.")
        if self.base_window is not None and (not isinstance(self.base_window, int) or self.base_window < 2):
            raise ValueError(f"base_window must be a number of tokens (at least 2), got {self.base_window!r}.")


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids as lm-eval's models encode a context: no special tokens added."""
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _generate(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, **kwargs) -> str:
    ids = torch.tensor([prompt_ids], device=model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=pad, **kwargs,
        )  # fmt: skip
    return tokenizer.decode(out[0, len(prompt_ids) :], skip_special_tokens=True)


def answer_from_memory(model, tokenizer, document: str, prompt: str, max_new_tokens: int) -> str:
    """Read `document` into memory, then ask `prompt` in a fresh call; the greedy reply (special tokens out).
    The one protocol of the suite and of its lm-eval tasks."""
    state = model.memorize(torch.tensor([encode_text(tokenizer, document)], device=model.device))
    return _generate(model, tokenizer, encode_text(tokenizer, prompt), max_new_tokens, memory_state=state)


def answer_without_memory(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    with model.disable_memory():
        return _generate(model, tokenizer, encode_text(tokenizer, prompt), max_new_tokens)


def base_model_answer(model, tokenizer, example: dict, window: int) -> str:
    """The base model alone: document and question in one turn, cut to the last `window` tokens (the
    document's end is kept; the question always is)."""
    new = example["max_new_tokens"]
    if getattr(tokenizer, "chat_template", None):

        def ids_for(document):
            messages = [{"role": "user", "content": f"{document}\n\n{example['question']}"}]
            ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
            return list(ids["input_ids"] if isinstance(ids, dict) else ids)
    else:

        def ids_for(document):
            return encode_text(tokenizer, f"{document}\n\n{example['prompt']}")

    document = encode_text(tokenizer, example["document"])
    room = max(window - new - len(ids_for("")), 0)
    ids = ids_for(tokenizer.decode(document[len(document) - room :]) if room else "")
    ids = ids[-(window - new) :]
    base = model.language_model  # no memory call is active: the hooks leave it as it was pretrained
    return _generate(base, tokenizer, ids, new)


def evaluate_suite(model, tokenizer, settings: SuiteSettings, text: str | None = None, progress: bool = True) -> dict:
    """Every task of `settings` at every length, under the three conditions; the results for `write_report`."""
    model.eval()
    window = settings.base_window or model.config.get_text_config().max_position_embeddings
    say = (lambda *args: print(*args, flush=True)) if progress else (lambda *args: None)
    answers, disabled, seconds = [], {}, {}
    for task in settings.tasks:
        started = time.perf_counter()
        data = make_long_context_dataset(
            task, tokenizer, settings.lengths, settings.num_examples, seed=settings.seed, text=text
        )
        for number, example in enumerate(data):
            record = {key: example[key] for key in ("task", "length", "answers", "document_tokens", "prompt_tokens")}
            record[MEMORY] = answer_from_memory(
                model, tokenizer, example["document"], example["prompt"], example["max_new_tokens"]
            )
            if settings.baselines:
                if example["prompt"] not in disabled:
                    disabled[example["prompt"]] = answer_without_memory(
                        model, tokenizer, example["prompt"], example["max_new_tokens"]
                    )
                record[MEMORY_DISABLED] = disabled[example["prompt"]]
                record[BASE_MODEL] = base_model_answer(model, tokenizer, example, window)
            for condition in (MEMORY, MEMORY_DISABLED, BASE_MODEL):
                if condition in record:
                    record[f"{condition}_score"] = score_reply(
                        record[condition], example["answers"], example["scoring"], example["choices"]
                    )
            answers.append(record)
            say(f"  {task}, {example['length']:,} tokens, example {number + 1}/{len(data)}: {record[MEMORY]!r}")
        seconds[task] = round(time.perf_counter() - started, 1)
    return {
        "kind": "suite",
        "task": "suite",
        "settings": {**settings.__dict__},
        "base_window": window,
        "rows": (rows := _rows(answers, settings)),
        "averages": _averages(rows, settings),
        "model": describe_model(model),
        "seconds": seconds,
        "answers": answers,
        "method": (
            "each document read into memory, its question asked in a fresh call (the chat template's user turn "
            "when the tokenizer has one), greedy generation; RULER: the share of the expected strings in the reply "
            "(x100), bAbI: the first place the reply names is the answer (x100)"
        ),
    }


def _mean(values):
    return 100 * sum(values) / len(values) if values else None


def _rows(answers: list[dict], settings: SuiteSettings) -> list[dict]:
    rows = []
    for task in settings.tasks:
        for length in settings.lengths:
            group = [a for a in answers if a["task"] == task and a["length"] == length]
            row = {"task": task, "length": length, "examples": len(group)}
            for condition in (MEMORY, MEMORY_DISABLED, BASE_MODEL):
                row[condition] = _mean([a[f"{condition}_score"] for a in group if f"{condition}_score" in a])
            rows.append(row)
    return rows


def _averages(rows: list[dict], settings: SuiteSettings) -> list[dict]:
    """Per suite and length: the mean of its tasks' scores (RULER's average), from the rows by task and length; None
    for a condition not run (`baselines=False`) or missing from a task."""
    averages = []
    for suite, tasks in SUITES.items():
        tasks = [task for task in tasks if task in settings.tasks]
        for length in settings.lengths if tasks else []:
            cells = [row for row in rows if row["task"] in tasks and row["length"] == length]
            average = {"suite": suite, "length": length, "tasks": len(tasks)}
            for condition in (MEMORY, MEMORY_DISABLED, BASE_MODEL):
                scores = [row[condition] for row in cells]
                average[condition] = None if None in scores else sum(scores) / len(scores)
            averages.append(average)
    return averages


def _cell(value) -> str:
    return "–" if value is None else f"{value:.1f}"


def format_suite(results: dict) -> str:
    """Scores (0-100) by task and length as Markdown, with each suite's average."""
    model = results["model"]
    lines = [
        f"# Long-context suite: {model.get('memory_type', '?')} memory on a {model.get('base_model_type', '?')} base, "
        f"segments of {model.get('segment_length', '?')}",
        "",
        "| task | length (tokens) | examples | with memory | memory disabled | base model (own window) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['task']} | {row['length']:,} | {row['examples']} | **{_cell(row[MEMORY])}** | "
            f"{_cell(row[MEMORY_DISABLED])} | {_cell(row[BASE_MODEL])} |"
        )
    if results["averages"]:
        lines += [
            "",
            "| suite average | length (tokens) | tasks | with memory | memory disabled | base model (own window) |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in results["averages"]:
            lines.append(
                f"| {row['suite']} | {row['length']:,} | {row['tasks']} | **{_cell(row[MEMORY])}** | "
                f"{_cell(row[MEMORY_DISABLED])} | {_cell(row[BASE_MODEL])} |"
            )
    lines += [
        "",
        f"The base model reads the last {results['base_window']:,} tokens (its window). RULER counts a length as "
        f"effective when its average beats {RULER_EFFECTIVE} (Llama-2-7B at 4k).",
        "",
        f"Method: {results['method']}.",
    ]
    return "\n".join(lines) + "\n"


def _short_length(tokens: int) -> str:
    """4096 -> 4k, 1048576 -> 1m, 3000 -> 3,000."""
    for size, suffix in ((1024 * 1024, "m"), (1024, "k")):
        if tokens % size == 0:
            return f"{tokens // size}{suffix}"
    return f"{tokens:,}"


def plot_suite(results: dict, path):
    """Each suite's average by length, one line per condition (`write_report` writes it as `suite.png`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = list(dict.fromkeys(row["suite"] for row in results["averages"]))
    figure, axes = plt.subplots(1, max(len(suites), 1), figsize=(5.2 * max(len(suites), 1), 3.8), squeeze=False)
    for axis, suite in zip(axes[0], suites):
        rows = [row for row in results["averages"] if row["suite"] == suite]
        for condition, style in ((MEMORY, "o-"), (MEMORY_DISABLED, "s--"), (BASE_MODEL, "^:")):
            points = [(row["length"], row[condition]) for row in rows if row[condition] is not None]
            if points:
                axis.plot(*zip(*points), style, label=LABELS[condition])
        if suite == "ruler":
            axis.axhline(RULER_EFFECTIVE, color="grey", linewidth=0.8, linestyle="--", label="RULER threshold")
        axis.set_xscale("log", base=2)
        lengths = [row["length"] for row in rows]
        axis.set_xticks(lengths, [_short_length(length) for length in lengths])
        axis.minorticks_off()
        axis.set_xlabel("length (tokens)")
        axis.set_ylabel("score")
        axis.set_ylim(-3, 103)
        axis.grid(alpha=0.3)
        axis.set_title(f"{suite}: average of {rows[0]['tasks']} task(s)")
        axis.legend(loc="best", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def merge_suite_results(reports: list[dict]) -> dict:
    """One report from suite runs of one model at different lengths (each length run with its own example count or
    baselines): their rows and replies side by side, each suite's average recomputed by length. Refused where the
    reports are not suite runs, come from different models or base windows, or score a task at a length twice."""
    if not reports or any(report.get("kind") != "suite" for report in reports):
        raise ValueError("merge_suite_results takes the suite.json reports of `hf-memlm eval --suite` runs.")
    first = reports[0]
    for report in reports[1:]:
        for key in ("model", "base_window"):
            if report[key] != first[key]:
                raise ValueError(f"the reports differ in {key}: {first[key]!r} and {report[key]!r}; merge one model's.")
    seen = set()
    for report in reports:
        for row in report["rows"]:
            cell = (row["task"], row["length"])
            if cell in seen:
                raise ValueError(f"{row['task']} at {row['length']:,} tokens is in two reports: keep one of them.")
            seen.add(cell)
    tasks = list(dict.fromkeys(row["task"] for report in reports for row in report["rows"]))
    lengths = sorted({row["length"] for report in reports for row in report["rows"]})
    order = {(task, length): (tasks.index(task), length) for task, length in seen}
    rows = sorted((row for report in reports for row in report["rows"]), key=lambda r: order[r["task"], r["length"]])
    settings = SuiteSettings(suites=tasks, lengths=lengths)
    return {
        **first,
        "settings": {"tasks": tasks, "lengths": lengths, "runs": [report["settings"] for report in reports]},
        "rows": rows,
        "averages": _averages(rows, settings),
        "seconds": [report["seconds"] for report in reports],
        "answers": [answer for report in reports for answer in report["answers"]],
    }


__all__ = [
    "SuiteSettings",
    "answer_from_memory",
    "answer_without_memory",
    "base_model_answer",
    "evaluate_suite",
    "format_suite",
    "merge_suite_results",
    "plot_suite",
]
